"""Embedded executor: a thread pool inside the listener process (no broker).

``cxr-listen`` without ``--broker`` does the whole job in one process: the C-STORE
handler enqueues a UID, a worker thread runs :func:`cxr_pipeline.service.jobs.process_job`.
The model is loaded once per pool (one :class:`~cxr_pipeline.pipeline.Engine`) and
shared by the threads; analysis is serialised by a lock because Grad-CAM hooks on a
shared model are not thread-safe, while sending runs in parallel.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.jobs import JobInterrupted, process_job
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.service.warmup import warm_up
from cxr_pipeline.settings import Settings

log = logging.getLogger(__name__)

_STOP = None


class LocalWorkerPool:
    """A :class:`workers.queue.JobQueue` served by threads in this process.

    Parameters
    ----------
    settings
        All settings; ``worker.concurrency`` threads are started.
    ledger, spool
        The service's ledger and spool.
    engine
        A loaded engine to share; None builds one from ``settings`` (loads the model).
    sleep
        Waits between send attempts (injectable for tests). Default: a wait that
        :meth:`close` interrupts (the job goes back to QUEUED for the next start).
    sweep
        Run a background sweep that queues ledger rows left RECEIVED for longer than
        ``worker.requeue_after_s`` (e.g. FAILED jobs moved back by
        ``cxr-status --requeue-failed``), every ``worker.requeue_interval_s``.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        spool: Spool,
        *,
        engine: Engine | None = None,
        sleep: Callable[[float], None] | None = None,
        sweep: bool = True,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.spool = spool
        if engine is None:
            engine = Engine.from_settings(settings)
            # highdicom's tables and the model's first passes: paid now, not on image one.
            warm_up(engine)
        self.engine = engine
        self._sleep = sleep if sleep is not None else self._interruptible_sleep
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._analyse_lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"cxr-worker-{i}", daemon=True)
            for i in range(max(settings.worker.concurrency, 1))
        ]
        self._stop = threading.Event()
        if sweep:
            self._threads.append(
                threading.Thread(target=self._sweep_loop, name="cxr-requeue", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def enqueue(self, uid: str) -> None:
        """Queue one instance (a UID already pending is not queued twice).

        Parameters
        ----------
        uid
            SOP Instance UID of a spooled instance recorded in the ledger.

        Raises
        ------
        RuntimeError
            The pool was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            if uid in self._pending:
                return
            self._pending.add(uid)
        record = self.ledger.get(uid)
        if record is not None and record.state == JobState.RECEIVED:
            self.ledger.mark(uid, JobState.QUEUED)
        self._queue.put(uid)

    def pending(self) -> int:
        """Count the queued or running jobs."""
        with self._lock:
            return len(self._pending)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no job is queued or running.

        Parameters
        ----------
        timeout_s
            Longest wait; None waits for ever.

        Returns
        -------
        bool
            True when idle, False on timeout.
        """
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout=timeout_s)

    def close(self) -> None:
        """Stop the threads; running jobs finish their current step.

        Jobs still waiting in the queue, and jobs waiting for a send retry, stay QUEUED in
        the ledger and run on the next start.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join()

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise JobInterrupted("worker pool closing")

    def sweep_once(self) -> list[str]:
        """Queue the rows that stayed RECEIVED longer than ``worker.requeue_after_s``.

        Returns
        -------
        list of str
            The UIDs queued.
        """
        cutoff = time.time() - self.settings.worker.requeue_after_s
        stale = [
            r.sop_instance_uid
            for r in self.ledger.unfinished()
            if r.state == JobState.RECEIVED and r.updated_at <= cutoff
        ]
        for uid in stale:
            self.enqueue(uid)
        return stale

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.worker.requeue_interval_s):
            try:
                self.sweep_once()
            except Exception as exc:  # keep sweeping; the ledger may be busy
                log.warning("re-enqueue sweep failed: %s", type(exc).__name__)

    def _run(self) -> None:
        while True:
            uid = self._queue.get()
            if uid is _STOP:
                return
            if self._stop.is_set():  # shutting down: leave it QUEUED for the next start
                with self._idle:
                    self._pending.discard(uid)
                    self._idle.notify_all()
                continue
            try:
                process_job(
                    uid,
                    self.engine,
                    self.ledger,
                    self.spool,
                    sleep=self._sleep,
                    analyse_lock=self._analyse_lock,
                )
            except Exception as exc:  # process_job records its own failures; belt and braces
                log.error("%s: worker error %s", uid, type(exc).__name__)
            finally:
                with self._idle:
                    self._pending.discard(uid)
                    self._idle.notify_all()
