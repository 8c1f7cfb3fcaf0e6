"""One queued job: analyse a spooled instance, write its results, send them, record it.

:func:`process_job` is what every executor runs (the embedded thread pool and the Celery
task alike). It is idempotent and keyed by SOP Instance UID: a DONE or SKIPPED instance
is left alone, results already waiting in the outbox are sent again without
re-analysis, and result UIDs are deterministic, so a PACS that receives the same
result twice stores it once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from cxr_pipeline import metrics
from cxr_pipeline.audit import AuditTrail, trail_for
from cxr_pipeline.codes import SopClass
from cxr_pipeline.errors import CxrError, Reason, RejectedInput, SendError
from cxr_pipeline.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.pipeline import Engine, analyse
from cxr_pipeline.send import send_datasets
from cxr_pipeline.settings import Destination, SendSettings, Settings
from cxr_pipeline.spool import SUFFIX, Spool, write_durably

log = logging.getLogger(__name__)

Sleep = Callable[[float], None]

KEPT_LOCALLY = "kept locally: no destination configured"
"""Reason of a DONE row whose results were kept in the spool's ``kept/`` folder because
neither ``send.destinations`` nor ``send.known_peers`` is set (a fresh install)."""


class JobInterrupted(Exception):
    """Raised by an executor's ``sleep`` when it is shutting down during send backoff.

    :func:`process_job` then puts the job back to QUEUED (results stay in the outbox), so
    the next start picks it up instead of recording a spurious failure.
    """


def destinations_for(record: JobRecord, settings: SendSettings) -> list[Destination]:
    """Where the results of one instance go.

    Parameters
    ----------
    record
        The instance's ledger row (its calling AE).
    settings
        Send settings.

    Returns
    -------
    list of Destination
        ``settings.destinations`` when set; else the known peer whose AE title is the
        calling AE that sent the image; else an empty list.
    """
    if settings.destinations:
        return list(settings.destinations)
    return [peer for peer in settings.known_peers if peer.ae_title.strip() == record.calling_ae]


def backoff_delays(settings: SendSettings) -> list[float]:
    """Compute the waits between send attempts: exponential, capped (``max_attempts - 1`` values).

    Parameters
    ----------
    settings
        ``backoff_initial_s``, ``backoff_max_s`` and ``max_attempts``.

    Returns
    -------
    list of float
        Seconds to wait after each failed attempt but the last.
    """
    return [
        min(settings.backoff_initial_s * 2.0**k, settings.backoff_max_s)
        for k in range(max(settings.max_attempts - 1, 0))
    ]


def send_with_retries(
    datasets: Sequence[Dataset],
    destination: Destination,
    settings: SendSettings,
    *,
    sleep: Sleep = time.sleep,
    audit: AuditTrail | None = None,
) -> None:
    """Send with up to ``settings.max_attempts`` tries and exponential backoff.

    Parameters
    ----------
    datasets
        Objects to send.
    destination
        The peer.
    settings
        Send settings.
    sleep
        Waits between attempts (injectable so tests need not wait).
    audit
        Audit trail of each attempt (issue 14); None: not audited.

    Raises
    ------
    SendError
        The last attempt failed.
    """
    delays = backoff_delays(settings)
    for attempt in range(1, max(settings.max_attempts, 1) + 1):
        try:
            with metrics.STAGE_SECONDS.labels(stage="send").time():
                send_datasets(datasets, destination, settings, audit=audit)
            return
        except SendError as exc:
            if attempt > len(delays):
                raise
            metrics.SEND_RETRIES.inc()
            log.warning(
                "send attempt %d/%d to %s failed (%s); retrying in %.1f s",
                attempt,
                settings.max_attempts,
                destination.ae_title,
                exc.detail,
                delays[attempt - 1],
            )
            sleep(delays[attempt - 1])


def _save(ds: Dataset, handle: BinaryIO) -> None:
    ds.save_as(handle, enforce_file_format=True)


RESULT_SOP_CLASSES: frozenset[str] = frozenset(
    {SopClass.COMPREHENSIVE_3D_SR, SopClass.SECONDARY_CAPTURE}
)
"""What a complete result set holds (:attr:`Analysis.result_datasets`: the SR and the SC).
Each file is written atomically, so a crash half-way through writing leaves a set without
one of them: it is analysed again instead of sending half a set. Any writer of the outbox
(this module, the Celery micro-batch task) is covered without extra bookkeeping."""


def _write_outbox(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}{SUFFIX}"
        write_durably(path, functools.partial(_save, ds))
        paths.append(path)
    return paths


def _read_outbox(spool: Spool, uid: str) -> list[Dataset]:
    """Read the results waiting in the outbox; an unreadable set counts as none."""
    try:
        return [pydicom.dcmread(p) for p in spool.outbox_files(uid)]
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        log.warning("%s: unreadable result in the outbox (%s)", uid, type(exc).__name__)
        return [Dataset()]  # incomplete: the caller clears the outbox and analyses again


def _results(
    record: JobRecord, engine: Engine, spool: Spool, lock: threading.Lock | None
) -> list[Dataset]:
    """Build (or reload from the outbox) the result objects of one instance."""
    uid = record.sop_instance_uid
    waiting = _read_outbox(spool, uid)
    if waiting and {str(ds.get("SOPClassUID", "")) for ds in waiting} >= RESULT_SOP_CLASSES:
        log.info("%s: %d result files already in the outbox, sending them", uid, len(waiting))
        return waiting
    if waiting:
        log.warning("%s: incomplete results in the outbox, analysing again", uid)
        spool.clear_outbox(uid)
    with lock if lock is not None else contextlib.nullcontext():
        analysis = analyse(spool.path_for(uid), engine)
    metrics.observe_timings(analysis.timings_ms)
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
        destinations = destinations_for(record, settings.send)
        if not destinations and settings.send.known_peers:
            # A routing table exists but does not know this sender: a configuration error.
            # Results stay in the outbox; fix the settings, then ``cxr-status --requeue-failed``.
            raise SendError(
                f"no destination: send.destinations is empty and calling AE "
                f"{record.calling_ae!r} is not in send.known_peers"
            )
        for destination in destinations:
            send_with_retries(
                datasets, destination, settings.send, sleep=sleep, audit=trail_for(settings)
            )
    except JobInterrupted:
        ledger.mark(uid, JobState.QUEUED, reason="interrupted: executor shutting down")
        log.info("%s interrupted by shutdown; left queued for the next start", uid)
        return JobState.QUEUED
    except RejectedInput as exc:
        ledger.mark(uid, JobState.SKIPPED, reason=str(exc))
        metrics.SKIPPED.labels(reason=exc.reason.value).inc()
        log.info("%s skipped: %s", uid, exc.reason.value)
        _tidy(spool, uid, settings)
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
    result_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if destinations:
        ledger.mark(uid, JobState.DONE, result_uids=result_uids)
        metrics.JOBS_DONE.labels(outcome="sent").inc()
        spool.clear_outbox(uid)
        log.info("%s done: %d results sent", uid, len(result_uids))
    else:
        kept = spool.keep_results(uid)
        ledger.mark(uid, JobState.DONE, reason=KEPT_LOCALLY, result_uids=result_uids)
        metrics.JOBS_DONE.labels(outcome="kept").inc()
        log.info("%s done: %d results kept in %s (no destination)", uid, len(result_uids), kept)
    _tidy(spool, uid, settings)
    return JobState.DONE


def _tidy(spool: Spool, uid: str, settings: Settings) -> None:
    """Delete the received file of a finished job unless settings keep it."""
    if not settings.listener.keep_received_files:
        spool.remove(uid)
