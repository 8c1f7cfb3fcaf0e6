"""One queued job: analyse a spooled instance, write its results, send them, record it.

:func:`process_job` is what the embedded executor runs (Celery workers analyse from Redis
and the listener sends with :func:`cxr_pipeline.service.delivery.deliver_outbox`). It is
idempotent and keyed by SOP Instance UID: a DONE or SKIPPED instance is left alone,
results already waiting in the outbox are sent again without re-analysis, and result UIDs
are deterministic, so a PACS that receives the same result twice stores it once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

from cxr_pipeline.errors import CxrError, Reason, RejectedInput
from cxr_pipeline.pipeline import Engine, analyse

# Re-exported: these lived here before the sending half moved to ``delivery``.
from cxr_pipeline.service import metrics
from cxr_pipeline.service.delivery import (
    KEPT_LOCALLY,
    RESULT_SOP_CLASSES,
    JobInterrupted,
    Sleep,
    backoff_delays,
    deliver_outbox,
    destinations_for,
    outbox_complete,
    read_outbox,
    record_done,
    send_results,
    send_with_retries,
    tidy,
)
from cxr_pipeline.service.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.service.spool import SUFFIX, Spool, write_durably
from cxr_pipeline.settings import Settings

__all__ = [
    "KEPT_LOCALLY",
    "RESULT_SOP_CLASSES",
    "JobInterrupted",
    "Sleep",
    "backoff_delays",
    "deliver_outbox",
    "destinations_for",
    "outbox_complete",
    "process_job",
    "send_with_retries",
]

log = logging.getLogger(__name__)


def _save(ds: Dataset, handle: BinaryIO) -> None:
    ds.save_as(handle, enforce_file_format=True)


def _write_outbox(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}{SUFFIX}"
        write_durably(path, functools.partial(_save, ds))
        paths.append(path)
    return paths


def _results(
    record: JobRecord, engine: Engine, spool: Spool, lock: threading.Lock | None
) -> list[Dataset]:
    """Build (or reload from the outbox) the result objects of one instance."""
    uid = record.sop_instance_uid
    waiting = read_outbox(spool, uid)
    if waiting and {str(ds.get("SOPClassUID", "")) for ds in waiting} >= RESULT_SOP_CLASSES:
        log.info("%s: %d result files already in the outbox, sending them", uid, len(waiting))
        return waiting
    if waiting:
        log.warning("%s: incomplete results in the outbox, analysing again", uid)
        spool.clear_outbox(uid)
    with lock if lock is not None else contextlib.nullcontext():
        analysis = analyse(spool.path_for(uid), engine)
    metrics.observe_timings(analysis.timings_ms)
    metrics.observe_finding(analysis.finding)
    log.info(
        "%s analysed: positive=%s timings_ms=%s",
        uid,
        analysis.finding.positive,
        {k: round(v, 1) for k, v in analysis.timings_ms.items()},
    )
    datasets = list(analysis.result_datasets)
    _write_outbox(datasets, spool.outbox_dir(uid))
    return datasets


def process_job(
    uid: str,
    engine: Engine,
    ledger: Ledger,
    spool: Spool,
    *,
    sleep: Sleep = time.sleep,
    analyse_lock: threading.Lock | None = None,
) -> JobState:
    """Run the whole job for one received instance and record its outcome.

    Parameters
    ----------
    uid
        SOP Instance UID of a spooled instance recorded in the ledger.
    engine
        Loaded model and settings (``engine.settings.send`` for destinations and retries).
    ledger
        The job ledger.
    spool
        The spool holding the instance.
    sleep
        Waits between send attempts (injectable for tests); may raise
        :class:`JobInterrupted` to abandon the job for now.
    analyse_lock
        Held during analysis when threads share one engine (Grad-CAM hooks are not
        thread-safe); sending happens outside it.

    Returns
    -------
    JobState
        The final state: DONE, SKIPPED or FAILED (or the recorded state when the job was
        already finished; QUEUED when interrupted by a shutdown). Never raises for a bad
        input or a failed send; the reason is in the ledger.
    """
    record = ledger.get(uid)
    if record is None:
        log.error("%s: not in the ledger; nothing to do", uid)
        return JobState.FAILED
    if record.state in (JobState.DONE, JobState.SKIPPED):
        log.info("%s: already %s, skipping", uid, record.state.value)
        return record.state
    ledger.mark(uid, JobState.PROCESSING)
    attempt = ledger.increment_attempts(uid)
    settings: Settings = engine.settings
    try:
        datasets = _results(record, engine, spool, analyse_lock)
        sent = send_results(record, datasets, settings, sleep=sleep)
    except JobInterrupted:
        ledger.mark(uid, JobState.QUEUED, reason="interrupted: executor shutting down")
        log.info("%s interrupted by shutdown; left queued for the next start", uid)
        return JobState.QUEUED
    except RejectedInput as exc:
        ledger.mark(uid, JobState.SKIPPED, reason=str(exc))
        metrics.SKIPPED.labels(reason=exc.reason.value).inc()
        log.info("%s skipped: %s", uid, exc.reason.value)
        tidy(spool, uid, settings)
        return JobState.SKIPPED
    except CxrError as exc:
        ledger.mark(uid, JobState.FAILED, reason=str(exc))
        metrics.JOBS_FAILED.labels(reason=exc.reason.value).inc()
        log.error("%s failed (attempt %d): %s", uid, attempt, exc)
        return JobState.FAILED
    except Exception as exc:
        # Exception messages from third-party code may quote header values: record and log
        # only the type; the traceback goes to DEBUG.
        ledger.mark(uid, JobState.FAILED, reason=f"{Reason.INTERNAL.value}: {type(exc).__name__}")
        metrics.JOBS_FAILED.labels(reason=Reason.INTERNAL.value).inc()
        log.error("%s failed (attempt %d): unexpected %s", uid, attempt, type(exc).__name__)
        log.debug("%s traceback", uid, exc_info=True)
        return JobState.FAILED
    return record_done(uid, datasets, sent, ledger, spool, settings)
