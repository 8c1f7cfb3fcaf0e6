"""The Celery task of ``cxr-worker`` and its micro-batch collector.

One task message = one SOP Instance UID. When a worker takes a task it also takes up to
``model.batch_size - 1`` further analysis messages already waiting in its Redis queue
(waiting at most ``worker.micro_batch_wait_s`` for them), so that a backlog is classified
in one forward pass:

1. :func:`workers.broker.collect_waiting` pulls waiting messages with ``basic_get`` on
   the worker's own broker connection, unacknowledged: if the process dies they return to
   the queue after the visibility timeout, exactly like the task message (``acks_late``).
2. :func:`classify_batch` decodes the batch and runs **one** ``predict_images`` call
   for all images.
3. For each image in turn, :func:`write_batch_results` builds its heatmap, SR and SC with
   the probability from that batched pass and writes them durably to the spool outbox,
   then :func:`cxr_pipeline.jobs.process_job` finds them there (its documented resume
   path), sends them and records the outcome in the ledger. Anything the batch path could
   not do (a rejected or broken image) is left to ``process_job``, which analyses it alone
   and records why it failed.
4. The collected messages are acknowledged after step 3, or rejected back to the queue if
   the batch raised.

The model loads once per worker process: in ``worker_process_init`` for prefork
children, lazily on the first task for the solo pool. Nothing touches CUDA at import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import numpy as np
from celery import Celery, Task, signals
from pydicom.dataset import Dataset

from cxr_pipeline.errors import CxrError
from cxr_pipeline.inference import Predictor
from cxr_pipeline.ingest import Radiograph, load_radiograph
from cxr_pipeline.jobs import process_job
from cxr_pipeline.ledger import JobState, Ledger
from cxr_pipeline.pipeline import Engine, analyse_radiograph
from cxr_pipeline.settings import Settings
from cxr_pipeline.spool import SUFFIX, Spool, write_durably
from workers.broker import (
    TASK_ANALYSE,
    Collected,
    collect_waiting,
    settings_from_app,
    unacked_index_key,
)
from workers.lease import KOMBU_UNACKED_INDEX, LeaseKeeper
from workers.queue import ledger_path, spool_root

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED})
"""States after which a job's message is no longer needed in Redis."""


@dataclass
class WorkerRuntime:
    """What one worker process holds: settings, ledger, spool and the loaded model."""

    settings: Settings
    ledger: Ledger
    spool: Spool
    leases: LeaseKeeper | None = None
    _engine: Engine | None = field(default=None, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, unacked_index: str | None = None) -> WorkerRuntime:
        """Open the shared ledger and spool under ``settings.data_dir`` (no model yet).

        With a broker URL the runtime also holds a :class:`~workers.lease.LeaseKeeper`
        (``unacked_index``: kombu's unacked sorted set, see
        :func:`workers.broker.unacked_index_key`).
        """
        leases = None
        if settings.worker.broker_url is not None:
            leases = LeaseKeeper(settings, unacked_index_key=unacked_index or KOMBU_UNACKED_INDEX)
        return cls(
            settings=settings,
            ledger=Ledger(ledger_path(settings)),
            spool=Spool(spool_root(settings)),
            leases=leases,
        )

    @property
    def engine(self) -> Engine:
        """The model, loaded on first use in this process (after any fork)."""
        if self._engine is None:
            start = time.perf_counter()
            self._engine = Engine.from_settings(self.settings)
            log.info(
                "model %s loaded on %s in %.1f s",
                self._engine.predictor.card.name,
                self._engine.predictor.device,
                time.perf_counter() - start,
            )
        return self._engine


# One runtime per worker *process*: Celery gives tasks no per-process context object, so
# this module-level slot is the process-local home of the loaded model (never shared:
# prefork children fill it after the fork).
_RUNTIME: WorkerRuntime | None = None


def runtime_for(app: Celery) -> WorkerRuntime:
    """Return this process's runtime, created from the app's settings on first use."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = WorkerRuntime.open(settings_from_app(app), unacked_index=unacked_index_key(app))
    return _RUNTIME


class _PrecomputedPredictor:
    """Serves probabilities from a batched forward pass to the per-image pipeline stages.

    :func:`cxr_pipeline.pipeline.analyse_radiograph` asks the predictor for each image
    again; this proxy answers for the arrays of the batch (looked up by identity, they are
    the very arrays that were classified) and delegates everything else (the model for
    Grad-CAM, the card, the device) to the real predictor.
    """

    def __init__(self, inner: Predictor, probabilities: dict[int, float]) -> None:
        self._inner = inner
        self._probabilities = probabilities

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if all(id(image) in self._probabilities for image in images):
            return np.asarray([self._probabilities[id(i)] for i in images], dtype=np.float32)
        return self._inner.predict_images(images)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _writer(ds: Dataset) -> Callable[[BinaryIO], None]:
    def write(handle: BinaryIO) -> None:
        ds.save_as(handle, enforce_file_format=True)

    return write


@dataclass
class ClassifiedBatch:
    """Decoded images of a micro-batch and an engine that knows their probabilities."""

    engine: Engine
    images: dict[str, Radiograph]
    infer_ms_per_image: float


def classify_batch(uids: Sequence[str], runtime: WorkerRuntime) -> ClassifiedBatch | None:
    """Decode several spooled instances and classify them in one forward pass.

    Instances already finished, with results already in the outbox, or that cannot be
    decoded are left out (``process_job`` handles and records them).

    Parameters
    ----------
    uids
        SOP Instance UIDs recorded in the ledger.
    runtime
        The worker process's ledger, spool and model.

    Returns
    -------
    ClassifiedBatch or None
        None when fewer than two images could be batched (nothing to gain).
    """
    ledger, spool, settings = runtime.ledger, runtime.spool, runtime.settings
    images: dict[str, Radiograph] = {}
    for uid in uids:
        record = ledger.get(uid)
        if record is None or record.state in (JobState.DONE, JobState.SKIPPED):
            continue
        if spool.outbox_files(uid):
            continue
        try:
            images[uid] = load_radiograph(spool.path_for(uid), settings.ingest)
        except CxrError as exc:
            log.info("%s: left to the single-image path (%s)", uid, exc.reason.value)
    if len(images) < 2:
        return None
    engine = runtime.engine
    start = time.perf_counter()
    probabilities = engine.predictor.predict_images([image.pixels for image in images.values()])
    infer_ms = (time.perf_counter() - start) * 1000.0
    log.info("micro-batch of %d images classified in %.1f ms", len(images), infer_ms)
    proxy = _PrecomputedPredictor(
        engine.predictor,
        {
            id(image.pixels): float(p)
            for image, p in zip(images.values(), probabilities, strict=True)
        },
    )
    return ClassifiedBatch(
        engine=Engine(settings=engine.settings, predictor=cast(Predictor, proxy)),
        images=images,
        infer_ms_per_image=infer_ms / len(images),
    )


def write_batch_results(uid: str, batch: ClassifiedBatch, spool: Spool) -> bool:
    """Build the heatmap, SR and SC of one classified image and put them in its outbox.

    Parameters
    ----------
    uid
        One of ``batch.images``.
    batch
        The classified micro-batch.
    spool
        Where the outbox is.

    Returns
    -------
    bool
        True when the results are in the outbox; False when this failed (the outbox is
        cleared and ``process_job`` analyses the image alone, recording any failure).
    """
    image = batch.images[uid]
    try:
        analysis = analyse_radiograph(
            image, batch.engine, {"batch_infer": batch.infer_ms_per_image}
        )
        folder = spool.outbox_dir(uid)
        for ds in analysis.result_datasets:
            write_durably(folder / f"{ds.SOPInstanceUID}{SUFFIX}", _writer(ds))
    except Exception as exc:
        spool.clear_outbox(uid)
        log.warning("%s: batch encode failed (%s), left to process_job", uid, type(exc).__name__)
        return False
    return True


def run_batch(uids: Sequence[str], runtime: WorkerRuntime) -> dict[str, JobState]:
    """Analyse (one forward pass where possible), send and record several instances.

    Each image is finished (heatmap, encode, send, ledger) before the next one starts,
    so the first result of a batch is not held back by the others' heatmaps.

    Parameters
    ----------
    uids
        SOP Instance UIDs taken from the queue.
    runtime
        The worker process's ledger, spool and model.

    Returns
    -------
    dict
        UID -> final :class:`JobState` as recorded by ``process_job``.
    """
    unique = list(dict.fromkeys(uids))
    batch = classify_batch(unique, runtime) if len(unique) > 1 else None
    states: dict[str, JobState] = {}
    for uid in unique:
        if batch is not None and uid in batch.images:
            write_batch_results(uid, batch, runtime.spool)
            del batch.images[uid]  # free the decoded image early
        states[uid] = process_job(uid, runtime.engine, runtime.ledger, runtime.spool)
    return states


def _on_worker_process_init(**kwargs: Any) -> None:
    """Prefork child started: load the model now, after the fork (safe for CUDA)."""
    app = _REGISTERED_APP
    if app is not None:
        engine = runtime_for(app).engine
        log.debug("worker process ready with model %s", engine.predictor.card.version)


_REGISTERED_APP: Celery | None = None


def register_tasks(app: Celery) -> Task:
    """Register the analysis task on ``app`` and the per-process model loading.

    Parameters
    ----------
    app
        The worker's app from :func:`workers.broker.create_app`.

    Returns
    -------
    celery.Task
        The registered task (name :data:`workers.broker.TASK_ANALYSE`).
    """
    global _REGISTERED_APP
    _REGISTERED_APP = app
    signals.worker_process_init.connect(_on_worker_process_init, weak=False)

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_ANALYSE, bind=True, acks_late=True, reject_on_worker_lost=True
    )
    def analyse_instance(self: Task, uid: str, spool_path: str | None = None) -> str:
        """Analyse one spooled instance, batching with any others waiting in the queue."""
        runtime = runtime_for(self.app)
        tag = (self.request.properties or {}).get("delivery_tag")
        return run_leased(
            uid, tag, runtime, lambda limit: collect_waiting(self.app, runtime.settings, limit)
        )

    return cast(Task, analyse_instance)


DROPPED = "duplicate"
"""What the task returns for a copy of a job another live worker holds (not executed)."""


def run_leased(
    uid: str,
    delivery_tag: Any,
    runtime: WorkerRuntime,
    collect: Callable[[int], AbstractContextManager[list[Collected]]],
) -> str:
    """Run the job of ``uid`` (and of waiting messages) under per-UID leases.

    A message whose UID another worker holds is a redelivered copy. The task message waits
    for that lease (:meth:`~workers.lease.LeaseKeeper.takeover_wait_s`): still renewed, the
    holder is alive and the copy is acknowledged without running anything (logged "copy
    dropped"); expired, its holder died and this worker takes the job over. A collected
    copy is put back on the queue at once. Every job that reaches a
    final state has its publish marker deleted, and its lease is released before its
    message is acknowledged.

    Parameters
    ----------
    uid, delivery_tag
        The task message's UID and delivery tag (None when unknown).
    runtime
        The worker process's runtime (``runtime.leases`` None: no deduplication).
    collect
        ``limit -> context manager`` yielding further waiting messages
        (:func:`workers.broker.collect_waiting`).

    Returns
    -------
    str
        The final :class:`JobState` value of ``uid``, or :data:`DROPPED`.
    """
    leases = runtime.leases
    if leases is not None and not leases.acquire(
        uid, delivery_tag, wait_s=leases.takeover_wait_s()
    ):
        log.info("%s: held by another live worker, copy dropped", uid)
        return DROPPED
    taken = [uid]
    try:
        limit = max(runtime.settings.model.batch_size - 1, 0)
        with collect(limit) as extra:
            for item in list(extra):
                if leases is None or leases.acquire(item.uid, item.message.delivery_tag):
                    taken.append(item.uid)
                else:
                    # Not waited for here (it would hold the batch up): back to the queue,
                    # where a task of its own waits for the lease (and takes it over or
                    # drops the copy).
                    item.message.reject(requeue=True)
                    extra.remove(item)
                    log.info("%s: held by another worker, copy put back", item.uid)
            if len(taken) > 1:
                log.info("%s: batched with %d waiting instance(s)", uid, len(taken) - 1)
            states = run_batch(taken, runtime)
            if leases is not None:
                for done_uid, state in states.items():
                    if state in FINAL_STATES:
                        leases.finished(done_uid)
    finally:
        if leases is not None:
            for held in dict.fromkeys(taken):
                leases.release(held)
    return states[uid].value
