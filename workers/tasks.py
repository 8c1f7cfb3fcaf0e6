"""The Celery task of ``cxr-worker`` and its micro-batch collector.

A worker shares nothing with the listener but Redis (:mod:`workers.transfer`): one task
message = one SOP Instance UID, whose instance bytes wait in ``cxr:payload:<uid>``. When a
worker takes a task it also takes up to ``model.batch_size - 1`` further analysis messages
already waiting in its Redis queue (waiting at most ``worker.micro_batch_wait_s`` for
them), so that a backlog is classified in one forward pass:

1. Every job runs under its UID's lease (:mod:`workers.lease`); a copy of a job another
   live worker holds is dropped. :func:`workers.broker.collect_waiting` pulls waiting
   messages with ``basic_get``, unacknowledged: if the process dies they return to the
   queue after the visibility timeout, exactly like the task message (``acks_late``).
2. :func:`run_batch` reads the payloads, reports ``processing``, decodes them and
   :func:`classify_batch` runs **one** ``predict_images`` call for all images.
3. For each image in turn it builds the heatmap, SR and SC with the probability from that
   batched pass, puts them in ``cxr:result:<uid>``, reports ``analysed`` (or ``skipped`` /
   ``failed`` with the reason) and deletes the payload. The listener records the outcome,
   moves the results into its outbox and sends them: it is the only DICOM exit.
4. The collected messages are acknowledged after step 3, or rejected back to the queue if
   the batch raised.

The model loads once per worker process: in ``worker_process_init`` for prefork
children, lazily on the first task for the solo pool. Nothing touches CUDA at import.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import redis
from celery import Celery, Task, signals
from pydicom.dataset import Dataset

from cxr_pipeline.dicom.ingest import Radiograph, load_radiograph
from cxr_pipeline.errors import CxrError, Reason, RejectedInput
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.pipeline import Engine, analyse_radiograph
from cxr_pipeline.service import metrics
from cxr_pipeline.service.warmup import warm_up
from cxr_pipeline.settings import Settings
from workers.broker import (
    TASK_ANALYSE,
    Collected,
    collect_waiting,
    settings_from_app,
    unacked_index_key,
)
from workers.lease import KOMBU_UNACKED_INDEX, LeaseKeeper, redis_client
from workers.transfer import (
    Event,
    Outcome,
    drop_payload,
    emit,
    get_payload,
    keys_ttl_s,
    put_results,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """What one worker process holds: settings, its Redis client, leases and the model.

    Nothing here points at the listener's disk: instance bytes come from Redis and
    results and states go back there (:mod:`workers.transfer`).
    """

    settings: Settings
    client: redis.Redis
    leases: LeaseKeeper | None = None
    _engine: Engine | None = field(default=None, repr=False)
    endpoint: metrics.MetricsServer | None = field(default=None, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, unacked_index: str | None = None) -> WorkerRuntime:
        """Connect to the broker's Redis (no model yet).

        Parameters
        ----------
        settings
            ``worker.broker_url`` must be set.
        unacked_index
            kombu's unacked sorted set (:func:`workers.broker.unacked_index_key`).
        """
        url = settings.worker.broker_url
        if url is None:
            raise ValueError("a Celery worker needs worker.broker_url")
        client = redis_client(url)
        leases = LeaseKeeper(
            settings, unacked_index_key=unacked_index or KOMBU_UNACKED_INDEX, client=client
        )
        runtime = cls(settings=settings, client=client, leases=leases)
        runtime.endpoint = _start_endpoint(settings, client)
        return runtime

    @property
    def engine(self) -> Engine:
        """The model, loaded on first use in this process (after any fork)."""
        if self._engine is None:
            start = time.perf_counter()
            self._engine = Engine.from_settings(self.settings)
            # highdicom's tables and the model's first passes: paid now, not on image one.
            warm_up(self._engine)
            log.info(
                "model %s loaded and warmed up on %s in %.1f s",
                self._engine.predictor.card.name,
                self._engine.predictor.device,
                time.perf_counter() - start,
            )
        return self._engine


def _start_endpoint(settings: Settings, client: redis.Redis) -> metrics.MetricsServer | None:
    """Serve this worker process's ``/metrics`` and ``/healthz`` if ``metrics.worker_port`` is set.

    Each process that runs tasks counts its own work, so each serves its own endpoint: the
    solo pool on ``worker_port``, prefork child *i* (Celery's pool index) on
    ``worker_port + i``. Healthy while Redis answers a PING.
    """
    port = settings.metrics.worker_port
    if port is None:
        return None
    from billiard.process import current_process  # Celery's multiprocessing fork

    index = int(getattr(current_process(), "index", 0) or 0)

    def health() -> dict[str, bool]:
        try:
            return {"broker": bool(client.ping())}
        except redis.RedisError:
            return {"broker": False}

    try:
        server = metrics.start_metrics_server(settings.metrics.host, port + index, health)
    except OSError as exc:
        log.error("metrics endpoint on port %d not started: %s", port + index, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", settings.metrics.host, server.port)
    return server


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


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class ClassifiedBatch:
    """Decoded images of a micro-batch and an engine that knows their probabilities."""

    engine: Engine
    images: dict[str, Radiograph]
    infer_ms_per_image: float


def classify_batch(images: dict[str, Radiograph], runtime: WorkerRuntime) -> ClassifiedBatch | None:
    """Classify several decoded images in one forward pass.

    Parameters
    ----------
    images
        UID -> decoded radiograph.
    runtime
        The worker process's model.

    Returns
    -------
    ClassifiedBatch or None
        None when fewer than two images could be batched (nothing to gain).
    """
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
        images=dict(images),
        infer_ms_per_image=infer_ms / len(images),
    )


def _report(runtime: WorkerRuntime, uid: str, outcome: Outcome, reason: str = "") -> Outcome:
    emit(runtime.client, Event(uid=uid, outcome=outcome, reason=reason))
    return outcome


def _finish(runtime: WorkerRuntime, uid: str, outcome: Outcome, reason: str = "") -> Outcome:
    """Report an outcome, then free the payload (the listener still has the spooled file)."""
    _report(runtime, uid, outcome, reason)
    drop_payload(runtime.client, uid)
    return outcome


def _analyse_one(
    uid: str, image: Radiograph, engine: Engine, runtime: WorkerRuntime, timings: dict[str, float]
) -> Outcome:
    """Analyse one decoded image, put its results in Redis and report the outcome."""
    try:
        analysis = analyse_radiograph(image, engine, timings)
        results = {str(ds.SOPInstanceUID): _part10(ds) for ds in analysis.result_datasets}
        metrics.observe_timings(analysis.timings_ms)
        metrics.observe_finding(analysis.finding)
    except RejectedInput as exc:
        log.info("%s skipped: %s", uid, exc.reason.value)
        return _finish(runtime, uid, Outcome.SKIPPED, str(exc))
    except CxrError as exc:
        log.error("%s failed: %s", uid, exc)
        return _finish(runtime, uid, Outcome.FAILED, str(exc))
    except Exception as exc:
        # Third-party messages may quote header values: only the type is reported.
        log.error("%s failed: unexpected %s", uid, type(exc).__name__)
        log.debug("%s traceback", uid, exc_info=True)
        return _finish(
            runtime, uid, Outcome.FAILED, f"{Reason.INTERNAL.value}: {type(exc).__name__}"
        )
    put_results(runtime.client, uid, results, keys_ttl_s(runtime.settings))
    log.info(
        "%s analysed: positive=%s, %d results to the listener, timings_ms=%s",
        uid,
        analysis.finding.positive,
        len(results),
        {k: round(v, 1) for k, v in analysis.timings_ms.items()},
    )
    return _finish(runtime, uid, Outcome.ANALYSED)


def run_batch(uids: Sequence[str], runtime: WorkerRuntime) -> dict[str, Outcome]:
    """Analyse several instances from their Redis payloads (one forward pass where possible).

    Each image is finished (heatmap, encode, results to Redis, event) before the next one
    starts, so the first result of a batch is not held back by the others' heatmaps.

    Parameters
    ----------
    uids
        SOP Instance UIDs taken from the queue (under their leases).
    runtime
        The worker process's Redis client and model.

    Returns
    -------
    dict
        UID -> the :class:`Outcome` reported to the listener.
    """
    unique = list(dict.fromkeys(uids))
    outcomes: dict[str, Outcome] = {}
    images: dict[str, Radiograph] = {}
    ingest_ms: dict[str, float] = {}
    for uid in unique:
        data = get_payload(runtime.client, uid)
        if data is None:
            log.info("%s: no payload in Redis (finished, or lost with Redis); reported", uid)
            outcomes[uid] = _report(runtime, uid, Outcome.NO_PAYLOAD)
            continue
        _report(runtime, uid, Outcome.PROCESSING)
        start = time.perf_counter()
        try:
            images[uid] = load_radiograph(io.BytesIO(data), runtime.settings.ingest)
        except RejectedInput as exc:
            log.info("%s skipped: %s", uid, exc.reason.value)
            outcomes[uid] = _finish(runtime, uid, Outcome.SKIPPED, str(exc))
        except CxrError as exc:
            log.error("%s failed: %s", uid, exc)
            outcomes[uid] = _finish(runtime, uid, Outcome.FAILED, str(exc))
        except Exception as exc:
            log.error("%s failed: unexpected %s while decoding", uid, type(exc).__name__)
            reason = f"{Reason.INTERNAL.value}: {type(exc).__name__}"
            outcomes[uid] = _finish(runtime, uid, Outcome.FAILED, reason)
        ingest_ms[uid] = (time.perf_counter() - start) * 1000.0
    batch = classify_batch(images, runtime)
    for uid, image in images.items():
        engine = batch.engine if batch is not None else runtime.engine
        timings = {"ingest": ingest_ms[uid]}
        if batch is not None:
            timings["batch_infer"] = batch.infer_ms_per_image
            del batch.images[uid]  # free the decoded image early
        outcomes[uid] = _analyse_one(uid, image, engine, runtime, timings)
    return outcomes


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
        The :class:`~workers.transfer.Outcome` value reported for ``uid``, or
        :data:`DROPPED`.
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
                    if state != Outcome.NO_PAYLOAD:
                        leases.finished(done_uid)
    finally:
        if leases is not None:
            for held in dict.fromkeys(taken):
                leases.release(held)
    return states[uid].value
