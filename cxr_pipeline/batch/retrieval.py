"""Fetch a PACS run's images in the background and hand them to the run loop.

:class:`Feed` is the hand-over: retrieval threads put retrieved files (and report rows for
what could not be fetched) in, the run loop (:func:`cxr_pipeline.batch.runner.run_remote`)
takes them out as its decode processes have room. :class:`Retriever` works through a
:class:`~cxr_pipeline.batch.remote.RunPlan` gently:

- at most ``batch.max_concurrent_retrievals`` series at a time (default 1);
- at most ``batch.images_per_minute`` images a minute when set (:class:`RateLimiter`);
- never more retrieved-but-unprocessed files on disk than the run loop can use soon
  (``room``), so a fast PACS does not fill the disk ahead of a slow model;
- after ``batch.max_consecutive_failures`` retrieves in a row that could not reach the
  PACS, the rest is not attempted.

Every instance of the plan gets exactly one item: its file, or a failed row whose reason
says why it is missing (the PACS was down, refused, or sent fewer instances than asked);
a rerun retries those. Instances a multi-instance retrieve did not bring are asked for again
one at a time, so one image the archive lost does not fail the others of its series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cxr_pipeline.batch.remote import (
    InstanceMatch,
    RemoteSource,
    RunPlan,
    SeriesWork,
    instance_label,
    study_label,
)
from cxr_pipeline.batch.report import Row, Status
from cxr_pipeline.batch.walker import FileKind, InputFile
from cxr_pipeline.errors import Reason, RetrieveError
from cxr_pipeline.settings import BatchSettings

log = logging.getLogger(__name__)

FeedItem = InputFile | Row
"""A retrieved file to analyse, or a row to write as it is."""

RETRIEVE_CHUNK = 50
"""Most instances asked for in one C-GET / C-MOVE (one association)."""


class Feed:
    """A thread-safe queue of :data:`FeedItem` that knows when no more will come.

    Parameters
    ----------
    room
        Most retrieved files waiting to be analysed at once; producers wait in
        :meth:`wait_for_room`. None: no limit.
    """

    def __init__(self, *, room: int | None = None) -> None:
        self._items: deque[FeedItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._staged = 0
        self._room = room
        self.cancelled = threading.Event()

    @classmethod
    def of(cls, items: Iterable[FeedItem]) -> Feed:
        """Make a closed feed of these items (a folder run: everything known up front)."""
        feed = cls()
        feed._items.extend(items)
        feed._closed = True
        return feed

    def put(self, item: FeedItem) -> None:
        """Add one item; a file counts against the room until :meth:`release`."""
        with self._cond:
            self._items.append(item)
            if isinstance(item, InputFile):
                self._staged += 1
            self._cond.notify_all()

    def close(self) -> None:
        """No more items will be put."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stop the producers (Ctrl-C); they close the feed as they end."""
        self.cancelled.set()
        with self._cond:
            self._cond.notify_all()

    def take(self, timeout: float | None = 0.0) -> FeedItem | None:
        """Take the next item, or None when there is none.

        Waits up to ``timeout`` seconds (None: until one comes or the feed is closed).
        """
        with self._cond:
            if not self._items and not self._closed and timeout != 0.0:
                self._cond.wait_for(lambda: bool(self._items) or self._closed, timeout)
            return self._items.popleft() if self._items else None

    @property
    def empty(self) -> bool:
        """Nothing waiting right now."""
        with self._cond:
            return not self._items

    @property
    def finished(self) -> bool:
        """Closed and empty: nothing more will come."""
        with self._cond:
            return self._closed and not self._items

    def release(self) -> None:
        """Make room for one more file (a retrieved one was analysed and its row written)."""
        with self._cond:
            self._staged = max(0, self._staged - 1)
            self._cond.notify_all()

    def wait_for_room(self, count: int) -> None:
        """Block while ``count`` more files would exceed the room (or until cancelled)."""
        room = self._room
        if room is None:
            return
        with self._cond:
            self._cond.wait_for(
                lambda: self.cancelled.is_set() or self._staged == 0 or self._staged + count <= room
            )


class RateLimiter:
    """At most ``per_minute`` images a minute, spread evenly (None: no limit).

    Parameters
    ----------
    per_minute
        Images per minute.
    clock
        Monotonic seconds (injectable for tests).
    """

    def __init__(
        self, per_minute: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def chunk(self) -> int:
        """Instances to ask for at once: about ten seconds' worth under a limit."""
        if self.per_minute is None:
            return RETRIEVE_CHUNK
        return max(1, min(RETRIEVE_CHUNK, int(self.per_minute / 6)))

    def delay(self, count: int) -> float:
        """Reserve ``count`` images; return how long to wait before fetching them."""
        if self.per_minute is None:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + count * 60.0 / self.per_minute
            return start - now


def _failed_row(instance: InstanceMatch, source: str, reason: Reason, detail: str) -> Row:
    return Row(
        path=instance_label(source, instance),
        size=0,
        mtime_ns=0,
        kind=FileKind.DICOM.value,
        status=Status.FAILED.value,
        reason=reason.value,
        detail=detail,
        sop_instance_uid=instance.sop_instance_uid,
        study_instance_uid=instance.study_uid,
        series_instance_uid=instance.series_uid,
    )


def plan_rows(plan: RunPlan, source: str) -> list[Row]:
    """Rows a plan settles without retrieving: non-image instances, unlisted studies."""
    rows = []
    for instance in plan.not_analysable:
        rows.append(
            Row(
                path=instance_label(source, instance),
                size=0,
                mtime_ns=0,
                kind=FileKind.DICOM.value,
                status=Status.SKIPPED.value,
                reason=Reason.NOT_IMAGE.value,
                detail=f"SOP class {instance.sop_class_uid} is not analysed: not retrieved",
                sop_instance_uid=instance.sop_instance_uid,
                study_instance_uid=instance.study_uid,
                series_instance_uid=instance.series_uid,
            )
        )
    for study in plan.unreachable:
        rows.append(
            Row(
                path=study_label(source, study.study_uid),
                size=0,
                mtime_ns=0,
                status=Status.FAILED.value,
                reason=Reason.QUERY_FAILED.value,
                detail=study.detail,
                study_instance_uid=study.study_uid,
            )
        )
    return rows


class Retriever:
    """Retrieve a plan's series in background threads into a :class:`Feed`.

    Parameters
    ----------
    source
        The PACS.
    work
        The series to retrieve (:attr:`RunPlan.work`).
    feed
        Where files and failed rows go; closed when every series is through.
    folder
        Where retrieved files are written (``<out>/retrieved``).
    settings
        Concurrency, rate limit and failure limit.
    """

    def __init__(
        self,
        source: RemoteSource,
        work: Sequence[SeriesWork],
        feed: Feed,
        folder: Path,
        settings: BatchSettings,
    ) -> None:
        self.source = source
        self.work = list(work)
        self.feed = feed
        self.folder = folder
        self.settings = settings
        self.limiter = RateLimiter(settings.images_per_minute)
        self._lock = threading.Lock()
        self._failures = 0
        self._halted: str | None = None
        self._thread = threading.Thread(target=self._run, name="cxr-retrieve", daemon=True)

    def start(self) -> None:
        """Start retrieving in the background."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the retrieval threads to end."""
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            workers = self.settings.max_concurrent_retrievals
            with ThreadPoolExecutor(workers, thread_name_prefix="cxr-retrieve") as pool:
                for future in [pool.submit(self._series, work) for work in self.work]:
                    future.result()
        finally:
            self.feed.close()

    def _series(self, work: SeriesWork) -> None:
        size = self.limiter.chunk()
        for start in range(0, len(work.instances), size):
            chunk = work.instances[start : start + size]
            if self.feed.cancelled.is_set():
                return
            try:
                self._chunk(work, chunk)
            except Exception as exc:  # a bug must not leave instances without a row
                log.exception("retrieve of series %s failed", work.series.series_uid)
                detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                for instance in chunk:
                    self.feed.put(_failed_row(instance, self.source.label, Reason.INTERNAL, detail))

    def _chunk(self, work: SeriesWork, chunk: list[InstanceMatch]) -> None:
        label = self.source.label
        with self._lock:
            halted = self._halted
        if halted is not None:
            for instance in chunk:
                self.feed.put(_failed_row(instance, label, Reason.RETRIEVE_FAILED, halted))
            return
        self.feed.wait_for_room(len(chunk))
        if self.feed.cancelled.wait(self.limiter.delay(len(chunk))):
            return
        try:
            got = self.source.retrieve(work.series, chunk, self.folder)
        except RetrieveError as exc:
            with self._lock:
                self._failures += 1
                if self._failures >= self.settings.max_consecutive_failures:
                    self._halted = (
                        f"not attempted: {self._failures} retrieves in a row failed ({exc.detail})"
                    )
            for instance in chunk:
                self.feed.put(_failed_row(instance, label, Reason.RETRIEVE_FAILED, exc.detail))
            return
        with self._lock:
            self._failures = 0
        missing = [i for i in chunk if i.sop_instance_uid not in got.files]
        if missing and len(chunk) > 1:
            # Some archives (Orthanc) fail a whole multi-instance request for one instance
            # they lost: ask for the missing ones one by one, so each costs only itself.
            for instance in missing:
                try:
                    alone = self.source.retrieve(work.series, [instance], self.folder)
                except RetrieveError as exc:
                    got.detail = exc.detail
                    continue
                got.files.update(alone.files)
                got.detail = alone.detail or got.detail
        for instance in chunk:
            path = got.files.get(instance.sop_instance_uid)
            if path is None:
                detail = got.detail or "not sent by the PACS"
                self.feed.put(_failed_row(instance, label, Reason.RETRIEVE_FAILED, detail))
                continue
            stat = path.stat()
            self.feed.put(
                InputFile(
                    path=path,
                    size=stat.st_size,
                    mtime_ns=stat.st_mtime_ns,
                    source=instance_label(label, instance),
                )
            )
