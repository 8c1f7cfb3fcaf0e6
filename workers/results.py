"""The listener records what workers report through Redis, and sends their results.

Who C-STOREs the results: **the listener**. A worker puts the SR and SC bytes in
``cxr:result:<uid>`` and reports ``analysed``; the listener writes them durably to its
outbox, sends them with the usual retries and records DONE or FAILED in its ledger.

- For: one DICOM exit. Only the listener's host needs to reach the PACS and to be in its
  list of known AEs (GPU hosts can sit on a network that cannot reach the PACS at all);
  the send retries, the failed-with-reason rows and ``cxr-status --requeue-failed`` work
  exactly as in the embedded mode; a PACS outage costs no GPU time (workers go on with
  the next image while the listener retries).
- Against: result bytes cross Redis once more (an SR and a downsized SC, small next to the
  instance), and the listener's host does the sending.
- The other choice, workers sending straight to the destination, saves that hop but needs
  the PACS reachable from every GPU host, the destinations and TLS material on every
  worker, and a second record of sends that the listener would have to learn about.

Every event is acknowledged in the stream only after it is recorded (results written to
the outbox first), so a listener killed mid-way reads its pending events again on start.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import redis

from cxr_pipeline.service.delivery import JobInterrupted, deliver_outbox, outbox_complete
from cxr_pipeline.service.ledger import UNFINISHED_STATES, JobState, Ledger
from cxr_pipeline.service.spool import SUFFIX, Spool, validate_uid, write_durably
from cxr_pipeline.settings import Settings
from workers.transfer import (
    Event,
    Outcome,
    ack_event,
    drop_results,
    ensure_group,
    get_results,
    read_events,
)

log = logging.getLogger(__name__)


def _write(data: bytes, handle: BinaryIO) -> None:
    handle.write(data)


class ResultRecorder:
    """Consume the workers' events, record them, and send the results from the outbox.

    Parameters
    ----------
    settings
        Send settings and ``worker.send_threads``.
    ledger, spool
        The listener's.
    client
        Redis.
    republish
        Called with a UID whose payload a worker did not find, or whose results were lost
        (a Redis that restarted empty): the listener publishes it again from its spool.
    room_freed
        Called when a job ended and its payload left Redis (the backlog may move on).
    consumer
        This listener's consumer name in the events group (stable across restarts, so a
        restarted listener gets its own pending events back).
    start
        Start the consumer thread (tests call :meth:`record` instead).
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        spool: Spool,
        client: redis.Redis,
        *,
        republish: Callable[[str], None],
        room_freed: Callable[[], None],
        consumer: str = "listener",
        start: bool = True,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.spool = spool
        self.client = client
        self._republish = republish
        self._room_freed = room_freed
        self.consumer = consumer
        self._stop = threading.Event()
        self._sending: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(settings.worker.send_threads, 1), thread_name_prefix="cxr-send"
        )
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="cxr-events", daemon=True)
            self._thread.start()

    # -- events -------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Record one event in the ledger (idempotent: a repeated event changes nothing)."""
        uid = event.uid
        try:
            validate_uid(uid)
        except ValueError:
            log.error("event with an invalid UID ignored")
            return
        row = self.ledger.get(uid)
        if row is None:
            log.error("%s: event %s for an unknown instance ignored", uid, event.outcome.value)
            drop_results(self.client, uid)
            return
        unfinished = row.state in UNFINISHED_STATES
        outcome = event.outcome
        if outcome is Outcome.PROCESSING:
            if unfinished:
                self.ledger.mark(uid, JobState.PROCESSING)
                self.ledger.increment_attempts(uid)
            return
        if outcome is Outcome.ANALYSED:
            self._take_results(uid, unfinished)
        elif outcome is Outcome.SKIPPED:
            if unfinished:
                self.ledger.mark(uid, JobState.SKIPPED, reason=event.reason)
                log.info("%s skipped by the worker", uid)
                if not self.settings.listener.keep_received_files:
                    self.spool.remove(uid)
        elif outcome is Outcome.FAILED:
            if unfinished:
                self.ledger.mark(uid, JobState.FAILED, reason=event.reason)
                log.error("%s failed in the worker (reason recorded)", uid)
        elif (
            outcome is Outcome.NO_PAYLOAD
            and unfinished
            and not self.sending(uid)
            and not self.has_results(uid)
        ):
            log.info("%s: the worker found no payload; publishing it again", uid)
            self._republish(uid)
        self._room_freed()

    def _take_results(self, uid: str, unfinished: bool) -> None:
        results = get_results(self.client, uid)
        if not unfinished or self.sending(uid):  # a copy's results: already being sent
            drop_results(self.client, uid)
            return
        if not results:
            if not self.has_results(uid):
                log.warning("%s: results gone from Redis; publishing it again", uid)
                self._republish(uid)
                return
        else:
            folder = self.spool.outbox_dir(uid)
            for result_uid, data in results.items():
                validate_uid(result_uid)
                write_durably(folder / f"{result_uid}{SUFFIX}", functools.partial(_write, data))
            drop_results(self.client, uid)
        self.send(uid)

    def has_results(self, uid: str) -> bool:
        """Whether a complete result set of ``uid`` waits in the outbox."""
        return outbox_complete(self.spool, uid)

    # -- sending ------------------------------------------------------------------------

    def sending(self, uid: str) -> bool:
        """Whether the results of ``uid`` are being sent now."""
        with self._lock:
            return uid in self._sending

    def send(self, uid: str) -> None:
        """Send the outbox of ``uid`` in the background (once at a time per UID)."""
        with self._lock:
            if uid in self._sending or self._stop.is_set():
                return
            self._sending.add(uid)
        self._pool.submit(self._deliver, uid)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise JobInterrupted

    def _deliver(self, uid: str) -> None:
        try:
            deliver_outbox(uid, self.ledger, self.spool, self.settings, sleep=self._sleep)
        except Exception:  # a send thread must outlive one bad job
            log.exception("%s: delivery failed unexpectedly", uid)
        finally:
            with self._lock:
                self._sending.discard(uid)

    # -- the consumer thread ------------------------------------------------------------

    def _loop(self) -> None:
        pending = True  # first our own unacknowledged events (a restart after kill -9)
        while not self._stop.is_set():
            try:
                ensure_group(self.client)
                events = read_events(self.client, self.consumer, pending=pending)
                if pending and not events:
                    pending = False
                    continue
                for event in events:
                    self.record(event)
                    ack_event(self.client, event)
            except redis.RedisError as exc:
                log.warning("events stream unavailable (%s); retrying", type(exc).__name__)
                pending = True
                self._stop.wait(1.0)
            except Exception:  # the consumer must outlive a transient ledger error
                log.exception("recording an event failed")
                pending = True
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop consuming; sends in their backoff are interrupted (outbox kept)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
