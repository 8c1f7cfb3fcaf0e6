"""The listener's job queue on Celery + Redis (imports no model code).

Workers share nothing with the listener but Redis (:mod:`workers.transfer`): the listener
publishes each task with the instance bytes as its payload, within a payload budget
(backpressure from the durable spool above it), and :class:`workers.results.ResultRecorder`
records what workers report and sends their results. Only the listener touches its spool
and ledger. It never loses an image when Redis is down: a failed publish leaves the ledger
row RECEIVED and a sweep thread publishes it again once Redis is back. See
:mod:`workers.broker` for the delivery guarantees and :mod:`workers.lease` for how the
sweep avoids copies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from cxr_pipeline.errors import Reason
from cxr_pipeline.service.ledger import UNFINISHED_STATES, JobRecord, JobState, Ledger
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import Settings
from workers.broker import TASK_ANALYSE, create_app
from workers.lease import PublishMarks, redis_client
from workers.queue import ledger_path, spool_root
from workers.results import ResultRecorder
from workers.transfer import keys_ttl_s, payload_bytes, put_payload

log = logging.getLogger(__name__)


class CeleryJobQueue:
    """The listener's :class:`workers.queue.JobQueue` on Celery + Redis.

    :meth:`enqueue` never raises for a broker outage: the image is already spooled and
    recorded RECEIVED, so it is kept in a retry set and a background sweep publishes it
    again every ``worker.requeue_interval_s``. The sweep also re-publishes ledger rows
    that stayed RECEIVED longer than ``worker.requeue_after_s`` (e.g. the listener was
    restarted during an outage) and rows QUEUED/PROCESSING for longer than the
    visibility timeout whose message is gone (a Redis without persistence restarted):
    rows whose UID has a live worker lease or a publish marker in Redis are left alone
    (see :mod:`workers.lease`), so a backlog waiting behind slow workers is not copied
    again and again. Once the broker answers again after an outage this queue saw, every
    QUEUED row without a marker is published again at once. A publish makes one connection
    attempt, and while a backlog waits for the sweep new UIDs join it without one, so
    C-STORE handlers are never held up by a dead broker.

    Parameters
    ----------
    settings
        Broker URL, queue name and sweep timings from ``settings.worker``.
    ledger
        The listener's ledger; None opens ``data_dir/ledger.sqlite3``.
    sweep
        Start the background sweep thread (tests call :meth:`sweep_once` instead).
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | None = None,
        spool: Spool | None = None,
        *,
        sweep: bool = True,
        results: bool = True,
    ) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # The listener publishes from C-STORE handler threads: with kombu's default a
        # publish to a dead broker retries connecting for about 6 s, per image, so a PACS
        # would see every C-STORE stall during an outage. One attempt, then the sweep.
        options = dict(self.app.conf.broker_transport_options or {})
        options["max_retries"] = 0
        self.app.conf.broker_transport_options = options
        self.ledger = ledger if ledger is not None else Ledger(ledger_path(settings))
        self.spool = spool if spool is not None else Spool(spool_root(settings))
        url = settings.worker.broker_url
        assert url is not None  # create_app raised ConfigError otherwise
        self.client = redis_client(url)
        self.marks = PublishMarks(settings, self.client)
        self._keys_ttl_s = keys_ttl_s(settings)
        self._retry: set[str] = set()
        """Backlog: UIDs to publish (broker down, or payload budget full)."""
        self._forced: set[str] = set()
        """UIDs to publish even though Redis still shows a marker or lease for them."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.recorder: ResultRecorder | None = None
        if results:
            self.recorder = ResultRecorder(
                settings,
                self.ledger,
                self.spool,
                self.client,
                republish=self.republish,
                room_freed=self._room_freed,
            )
        self._outage_seen = False
        """A publish failed since the last full recovery: QUEUED messages may be gone."""
        self._thread: threading.Thread | None = None
        if sweep:
            self._thread = threading.Thread(
                target=self._sweep_loop, name="cxr-requeue", daemon=True
            )
            self._thread.start()

    # -- publishing --------------------------------------------------------------------

    def _publish(self, uid: str, data: bytes) -> bool:
        try:
            put_payload(self.client, uid, data, self._keys_ttl_s)
            self.app.send_task(
                TASK_ANALYSE, args=[uid], queue=self.settings.worker.queue_name, retry=False
            )
        except Exception as exc:  # kombu raises OperationalError, redis-py RedisError
            log.warning("broker unavailable, %s stays RECEIVED for re-enqueue: %s", uid, exc)
            return False
        self.marks.published(uid)
        return True

    def enqueue(self, uid: str, spool_path: str | Path | None = None) -> None:
        """Publish one analysis task with its payload; else keep it for the sweep.

        While earlier UIDs wait for the sweep (the broker was down a moment ago, or the
        payload budget is full), the UID joins them at once without a publish attempt: the
        C-STORE handler is not held up, and the sweep publishes the backlog in arrival
        order once the broker answers and room frees. A row whose results already wait in
        the outbox (the listener restarted before sending them) is sent, not published.

        Parameters
        ----------
        uid
            SOP Instance UID of a spooled, recorded instance.
        spool_path
            Ignored (the ledger row says where it is spooled); kept for callers.
        """
        with self._lock:
            if self._retry:
                self._retry.add(uid)
                return
        self._publish_recorded(uid)

    def _room_for(self, size: int) -> bool:
        """Whether ``size`` more payload bytes fit the budget (always, when none is used)."""
        try:
            used = payload_bytes(self.client)
        except redis.RedisError:
            return True  # the publish will tell whether Redis is down
        return used == 0 or used + size <= self.settings.worker.payload_budget_bytes

    def _publish_recorded(self, uid: str, spool_path: str | Path | None = None) -> bool:
        """Publish one task with its payload, keeping the ledger row consistent.

        The ledger row is marked QUEUED before publishing (so a fast worker's PROCESSING
        is never overwritten) and put back to RECEIVED if the publish fails.

        Returns
        -------
        bool
            False when the UID stays in the backlog: the broker failed, or the payload
            budget is full (backpressure: the row stays RECEIVED, the image in the spool).
        """
        record = self.ledger.get(uid)
        if record is None or record.state not in UNFINISHED_STATES:
            self._discard(uid)
            return True
        if self.recorder is not None and self.recorder.has_results(uid):
            self.recorder.send(uid)
            self._discard(uid)
            return True
        with self._lock:
            forced = uid in self._forced
        if not forced and record.state != JobState.RECEIVED and uid in self._still_in_redis([uid]):
            # Published before (e.g. this listener restarted): its message, lease or
            # results are still in Redis; a copy would only be analysed again.
            self._discard(uid)
            return True
        try:
            data = record.spool_path.read_bytes()
        except OSError as exc:
            reason = f"{Reason.INTERNAL.value}: spooled file unreadable ({type(exc).__name__})"
            self.ledger.mark(uid, JobState.FAILED, reason=reason)
            log.error("%s failed: %s", uid, reason)
            self._discard(uid)
            return True
        if not self._room_for(len(data)):
            with self._lock:
                self._retry.add(uid)
            return False
        if record.state == JobState.RECEIVED:
            self.ledger.mark(uid, JobState.QUEUED)
        if self._publish(uid, data):
            self._discard(uid)
            return True
        if record.state == JobState.RECEIVED:
            self.ledger.mark(uid, JobState.RECEIVED)
        with self._lock:
            self._retry.add(uid)
            self._outage_seen = True
        return False

    def _discard(self, uid: str) -> None:
        with self._lock:
            self._retry.discard(uid)
            self._forced.discard(uid)

    def republish(self, uid: str) -> None:
        """Publish ``uid`` again now (a worker found no payload: Redis lost it)."""
        with self._lock:
            self._retry.add(uid)
            self._forced.add(uid)
        self._wake.set()

    def _room_freed(self) -> None:
        with self._lock:
            waiting = bool(self._retry)
        if waiting:
            self._wake.set()

    # -- the re-enqueue sweep ----------------------------------------------------------

    def _stale(self, record: JobRecord, now: float) -> bool:
        worker = self.settings.worker
        age = now - record.updated_at
        if record.state == JobState.RECEIVED:
            return age >= worker.requeue_after_s
        return age >= worker.visibility_timeout_s + worker.requeue_after_s

    def sweep_once(self) -> list[str]:
        """Publish what failed to publish and stale unfinished ledger rows.

        Returns
        -------
        list of str
            UIDs published by this sweep.
        """
        with self._lock:
            wanted = set(self._retry)
        now = time.time()
        records = {r.sop_instance_uid: r for r in self.ledger.unfinished()}
        wanted.update(uid for uid, r in records.items() if self._stale(r, now))
        wanted -= self._still_in_redis(
            uid
            for uid in wanted
            if uid in records and records[uid].state in (JobState.QUEUED, JobState.PROCESSING)
        )
        published: list[str] = []
        for uid in sorted(wanted, key=lambda u: records[u].received_at if u in records else 0):
            record = records.get(uid)
            if record is None:  # finished (or unknown) since its publish failed
                with self._lock:
                    self._retry.discard(uid)
                continue
            if not self._publish_recorded(uid, record.spool_path):
                break  # broker still down: try again next sweep
            if record.state in (JobState.QUEUED, JobState.PROCESSING):
                # A stale row published again: restart its clock (only if no worker moved
                # it meanwhile), or every sweep would publish it again until a worker
                # takes it, flooding the queue with duplicates.
                self.ledger.touch(uid, record.state)
            published.append(uid)
        with self._lock:
            recovered = self._outage_seen and not self._retry
        if recovered:
            published += self._republish_queued(set(published))
        if published:
            log.info("re-enqueued %d instance(s)", len(published))
        return published

    def _still_in_redis(self, uids: Iterable[str]) -> set[str]:
        """UIDs a live worker holds or whose message Redis still has (all, if it is down)."""
        candidates = set(uids)
        try:
            return self.marks.busy(candidates)
        except redis.RedisError:
            return candidates  # no answer: publishing would fail anyway

    def _republish_queued(self, skip: set[str]) -> list[str]:
        """After an outage, publish every QUEUED row again.

        A broker that went down may have lost the messages it held (Redis without
        persistence restarts empty); waiting for the stale-row rule would delay those
        images by the visibility timeout (an hour by default). Rows whose publish marker
        or lease survived (Redis kept its data) are left alone; extra copies would be
        harmless anyway: workers skip finished rows and result UIDs are deterministic.
        """
        published: list[str] = []
        queued = [
            r
            for r in self.ledger.unfinished()
            if r.state == JobState.QUEUED and r.sop_instance_uid not in skip
        ]
        busy = self._still_in_redis(r.sop_instance_uid for r in queued)
        for record in queued:
            uid = record.sop_instance_uid
            if uid in busy:
                continue
            if not self._publish_recorded(uid, record.spool_path):
                return published  # down again: the flag stays set, retried next sweep
            self.ledger.touch(uid, JobState.QUEUED)
            published.append(uid)
        with self._lock:
            if not self._retry:
                self._outage_seen = False
        return published

    def pending(self) -> set[str]:
        """UIDs waiting to be published (broker down, or payload budget full)."""
        with self._lock:
            return set(self._retry)

    def _sweep_loop(self) -> None:
        while True:
            self._wake.wait(self.settings.worker.requeue_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sweep_once()
                payload_bytes(self.client, prune=True)  # sizes of expired payloads
            except Exception:  # the sweep must outlive a transient ledger or Redis error
                log.exception("re-enqueue sweep failed")

    def close(self) -> None:
        """Stop the sweep and release broker connections."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.recorder is not None:
            self.recorder.close()
        self.app.close()
        self.marks.close()
