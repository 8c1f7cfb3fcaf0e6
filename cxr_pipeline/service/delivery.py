"""Send results that wait in the outbox, with retries, and record the outcome.

The sending half of a job, shared by :func:`cxr_pipeline.service.jobs.process_job` (the embedded
executor, which analyses first) and the Celery listener, which sends the results workers
return through Redis (:mod:`workers.results`). Imports no model code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.errors import SendError
from cxr_pipeline.service import metrics
from cxr_pipeline.service.audit import AuditTrail, trail_for
from cxr_pipeline.service.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.service.send import send_datasets
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import Destination, SendSettings, Settings

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
        Audit trail of each attempt; None: not audited.

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
                destination.label,
                exc.detail,
                delays[attempt - 1],
            )
            sleep(delays[attempt - 1])


RESULT_SOP_CLASSES: frozenset[str] = frozenset(
    {SopClass.COMPREHENSIVE_3D_SR, SopClass.SECONDARY_CAPTURE}
)
"""What a complete result set holds (:attr:`Analysis.result_datasets`: the SR and the SC).
Each file is written atomically, so a crash half-way through writing leaves a set without
one of them: it is analysed again instead of sending half a set. Any writer of the outbox
(this module, the Celery micro-batch task) is covered without extra bookkeeping."""


def read_outbox(spool: Spool, uid: str) -> list[Dataset]:
    """Read the results waiting in the outbox; an unreadable set counts as none."""
    try:
        return [pydicom.dcmread(p) for p in spool.outbox_files(uid)]
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        log.warning("%s: unreadable result in the outbox (%s)", uid, type(exc).__name__)
        return [Dataset()]  # incomplete: the caller clears the outbox and analyses again


def tidy(spool: Spool, uid: str, settings: Settings) -> None:
    """Delete the received file of a finished job unless settings keep it."""
    if not settings.listener.keep_received_files:
        spool.remove(uid)


def outbox_complete(spool: Spool, uid: str) -> bool:
    """Whether the outbox of ``uid`` holds a complete result set (an SR and an SC)."""
    waiting = read_outbox(spool, uid)
    return (
        bool(waiting) and {str(ds.get("SOPClassUID", "")) for ds in waiting} >= RESULT_SOP_CLASSES
    )


def send_results(
    record: JobRecord, datasets: Sequence[Dataset], settings: Settings, *, sleep: Sleep
) -> bool:
    """Send one instance's results to every destination it has.

    Parameters
    ----------
    record
        The instance's ledger row (its calling AE picks a known peer).
    datasets
        The SR and SC.
    settings
        ``settings.send`` for destinations and retries; ``[audit]`` for the trail.
    sleep
        Waits between attempts; may raise :class:`JobInterrupted`.

    Returns
    -------
    bool
        True when sent; False when no destination is configured at all (a fresh install:
        the caller keeps the results locally).

    Raises
    ------
    SendError
        Known peers are configured but none is the sender, or the last attempt to a
        destination failed.
    """
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
    return bool(destinations)


def record_done(
    uid: str,
    datasets: Sequence[Dataset],
    sent: bool,
    ledger: Ledger,
    spool: Spool,
    settings: Settings,
) -> JobState:
    """Record a finished job: DONE, outbox cleared (sent) or moved to ``kept/`` (not sent).

    Parameters
    ----------
    uid
        The source SOP Instance UID.
    datasets
        Its result objects.
    sent
        What :func:`send_results` returned.
    ledger, spool, settings
        The service's ledger, spool and settings.

    Returns
    -------
    JobState
        DONE.
    """
    result_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if sent:
        ledger.mark(uid, JobState.DONE, result_uids=result_uids)
        metrics.JOBS_DONE.labels(outcome="sent").inc()
        spool.clear_outbox(uid)
        log.info("%s done: %d results sent", uid, len(result_uids))
    else:
        kept = spool.keep_results(uid)
        ledger.mark(uid, JobState.DONE, reason=KEPT_LOCALLY, result_uids=result_uids)
        metrics.JOBS_DONE.labels(outcome="kept").inc()
        log.info("%s done: %d results kept in %s (no destination)", uid, len(result_uids), kept)
    tidy(spool, uid, settings)
    return JobState.DONE


def deliver_outbox(
    uid: str,
    ledger: Ledger,
    spool: Spool,
    settings: Settings,
    *,
    sleep: Sleep = time.sleep,
) -> JobState:
    """Send the results already in the outbox of ``uid`` and record the outcome.

    The sending half of :func:`process_job`, for results built elsewhere (a Celery worker
    on another host returns them through Redis and the listener, the one DICOM exit of the
    deployment, sends them).

    Parameters
    ----------
    uid
        SOP Instance UID of a recorded instance whose outbox is complete.
    ledger, spool
        The listener's ledger and spool.
    settings
        ``settings.send`` for destinations and retries.
    sleep
        Waits between send attempts; may raise :class:`JobInterrupted` (the row is left
        as it is and the results stay in the outbox for the next start).

    Returns
    -------
    JobState
        DONE or FAILED (the reason is in the ledger); the recorded state when the row was
        already finished, unknown, or the send was interrupted.
    """
    record = ledger.get(uid)
    if record is None:
        log.error("%s: not in the ledger; results not sent", uid)
        return JobState.FAILED
    if record.state in (JobState.DONE, JobState.SKIPPED):
        spool.clear_outbox(uid)
        return record.state
    datasets = read_outbox(spool, uid)
    try:
        sent = send_results(record, datasets, settings, sleep=sleep)
    except JobInterrupted:
        log.info("%s: send interrupted by shutdown; results stay in the outbox", uid)
        return record.state
    except SendError as exc:
        ledger.mark(uid, JobState.FAILED, reason=str(exc))
        metrics.JOBS_FAILED.labels(reason=exc.reason.value).inc()
        log.error("%s failed: %s", uid, exc)
        return JobState.FAILED
    return record_done(uid, datasets, sent, ledger, spool, settings)
