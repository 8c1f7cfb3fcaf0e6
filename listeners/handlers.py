"""The thin C-STORE and C-ECHO handlers of ``cxr-listen``.

Check, spool durably, record, enqueue, return a status: nothing slow happens here
(pynetdicom's event-handler model). An exception never escapes: it becomes a named
failure status and a log line with UIDs only, never patient data.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.dicom.ingest import check_chest_radiograph
from cxr_pipeline.errors import InvalidUid, Reason, RejectedInput
from cxr_pipeline.service import metrics
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import Spool, validate_uid
from cxr_pipeline.settings import Settings
from workers.queue import JobQueue

log = logging.getLogger(__name__)


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


@dataclass(frozen=True)
class Admission:
    """The outcome of :meth:`StoreHandler.admit` for one object.

    Attributes
    ----------
    status
        The C-STORE status (Success once spooled and recorded).
    skipped
        Why it was recorded but not analysed (not a chest radiograph...); empty when it
        was queued for analysis (or refused).
    reason
        The reason code of ``skipped`` when this call decided it.
    """

    status: int
    skipped: str = ""
    reason: Reason | None = None


@dataclass
class StoreHandler:
    """The C-STORE SCP's work for one received object.

    Parameters
    ----------
    settings
        All settings (listener watermark, ingest policy).
    spool, ledger, queue
        Where objects are written, recorded and handed over.
    """

    settings: Settings
    spool: Spool
    ledger: Ledger
    queue: JobQueue

    def __call__(self, event: Event) -> int:
        """Handle ``evt.EVT_C_STORE``; return the C-STORE status."""
        metrics.RECEIVED.inc()
        status = self._status(event)
        if status != DimseStatus.SUCCESS:
            metrics.REFUSED.labels(status=f"0x{int(status):04X}").inc()
        return status

    def _status(self, event: Event) -> int:
        uid = "?"
        try:
            uid = validate_uid(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
            return self.store(event, uid)
        except InvalidUid:
            log.error("C-STORE from %s refused: invalid SOP Instance UID", _calling_ae(event))
            return DimseStatus.CANNOT_UNDERSTAND
        except Exception as exc:
            # Only the type: messages of third-party errors may quote header values.
            log.error("C-STORE of %s failed: %s", uid, type(exc).__name__)
            log.debug("C-STORE of %s traceback", uid, exc_info=True)
            return DimseStatus.CANNOT_UNDERSTAND

    def store(self, event: Event, uid: str) -> int:
        """Spool, record, check and enqueue one object (exceptions propagate).

        Parameters
        ----------
        event
            The C-STORE event.
        uid
            Its validated SOP Instance UID.

        Returns
        -------
        int
            The C-STORE status.
        """
        if not self.has_room(uid):
            return DimseStatus.OUT_OF_RESOURCES
        # Parse the header first: a data set pydicom cannot read is refused, not spooled.
        ds: Dataset = event.dataset
        mismatch = _command_mismatch(event, ds, uid)
        if mismatch is not None:
            log.error("C-STORE of %s refused: data set %s differs from the command", uid, mismatch)
            return DimseStatus.DATASET_DOES_NOT_MATCH
        # The object exactly as received (file meta + data set in the accepted transfer
        # syntax), on disk and fsynced before we answer Success.
        return self.admit(
            uid, ds, lambda: event.encoded_dataset(include_meta=True), _calling_ae(event)
        ).status

    def has_room(self, uid: str) -> bool:
        """Whether the spool is above its free-space watermark (logs a refusal if not)."""
        free = self.spool.free_bytes()
        if free < self.settings.listener.min_free_bytes:
            log.error(
                "spool below its free-space watermark (%d < %d bytes): refusing %s",
                free,
                self.settings.listener.min_free_bytes,
                uid,
            )
            return False
        return True

    def admit(
        self, uid: str, ds: Dataset, encoded: Callable[[], bytes], calling_ae: str
    ) -> Admission:
        """Check, spool durably, record and enqueue one parsed object.

        The one path every way in shares (C-STORE and STOW-RS): the answer is Success only
        once the file is fsynced in the spool and its ledger row written.

        Parameters
        ----------
        uid
            Its validated SOP Instance UID.
        ds
            The parsed data set (header at least).
        encoded
            Returns the complete Part 10 file to spool (called once, after the checks).
        calling_ae
            Who sent it (the ledger's calling AE: an AE title, or ``STOW-RS``).

        Returns
        -------
        Admission
            The status, and why the object was not analysed when it was recorded as
            skipped (or was already known as skipped).
        """
        # Decide before anything is written: an unexpected error while reading the header
        # is then refused (0xC210) with nothing spooled or recorded, instead of leaving a
        # RECEIVED row behind a failure status (which a re-enqueue sweep would pick up).
        rejection: RejectedInput | None = None
        try:
            check_chest_radiograph(ds, self.settings.ingest)
        except RejectedInput as exc:
            rejection = exc
        data = encoded()
        try:
            path = self.spool.store(uid, lambda handle: handle.write(data))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("spool full while storing %s: refusing", uid)
                return Admission(DimseStatus.OUT_OF_RESOURCES)
            raise
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        if not self.ledger.record_received(
            uid, study_uid=study_uid, calling_ae=calling_ae, spool_path=path
        ):
            return self._known(uid)
        if rejection is not None:
            self.ledger.mark(uid, JobState.SKIPPED, reason=str(rejection))
            metrics.SKIPPED.labels(reason=rejection.reason.value).inc()
            log.info("%s from %s skipped: %s", uid, calling_ae, rejection.reason.value)
            if not self.settings.listener.keep_received_files:
                self.spool.remove(uid)
            return Admission(DimseStatus.SUCCESS, skipped=str(rejection), reason=rejection.reason)
        self.queue.enqueue(uid)
        metrics.ACCEPTED.inc()
        log.info("%s from %s received and queued", uid, calling_ae)
        return Admission(DimseStatus.SUCCESS)

    def _known(self, uid: str) -> Admission:
        """Handle a re-sent object: finished jobs stay finished, failed ones run again."""
        record = self.ledger.get(uid)
        state = record.state if record is not None else None
        if state is JobState.FAILED:
            self.ledger.mark(uid, JobState.RECEIVED)
            self.queue.enqueue(uid)
            log.info("%s received again after failing: queued again", uid)
        else:
            log.info("%s received again (state %s): nothing to do", uid, state)
            if state in (JobState.DONE, JobState.SKIPPED) and not (
                self.settings.listener.keep_received_files
            ):
                self.spool.remove(uid)
        if state is JobState.SKIPPED and record is not None:
            return Admission(DimseStatus.SUCCESS, skipped=record.reason or "skipped")
        return Admission(DimseStatus.SUCCESS)


def _command_mismatch(event: Event, ds: Dataset, uid: str) -> str | None:
    """Name the UID in which the data set contradicts the C-STORE command, if any.

    The ledger, the spool file name and the result UIDs are keyed by the command's
    Affected SOP Instance UID while the results are built from the data set: a data set
    that names another instance (or class) would be processed under the wrong key, and
    two C-STOREs of it could yield two different results for one UID. A missing UID is
    left to the header check, which records it as a missing attribute.
    """
    instance = str(ds.get("SOPInstanceUID", "") or "").rstrip("\x00 ")
    if instance and instance != uid:
        return "SOP Instance UID"
    command_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "").rstrip("\x00 ")
    sop_class = str(ds.get("SOPClassUID", "") or "").rstrip("\x00 ")
    if sop_class and command_class and sop_class != command_class:
        return "SOP Class UID"
    return None


def handle_echo(event: Event) -> int:
    """Handle ``evt.EVT_C_ECHO``: always Success."""
    log.debug("C-ECHO from %s", _calling_ae(event))
    return DimseStatus.SUCCESS
