"""The audit trail: DICOM PS3.15 Annex A.5 audit messages (the form IHE ATNA uses).

Each event becomes one ``<AuditMessage>`` (the DICOM audit message schema, A.5.1),
appended as one JSON line (``time``, ``event``, ``outcome``, ``xml``) to an append-only
file and, when configured, sent to a syslog collector (RFC 5424,
:mod:`cxr_pipeline.service.syslog`).

Events written:

- Application Activity (110100): start / stop of ``cxr-listen``.
- Begin Transferring DICOM Instances (110102) and DICOM Instances Transferred (110104),
  for instances received by the listener (one pair per association) and results sent.
- Security Alert (110113): a rejected association (AE title or address not allowed), a
  failed TLS handshake (in or out), a command the listener aborts the association for, a
  cap or timeout of the listener's admission by address (at most once per address per
  minute).

Messages carry AE titles, addresses, Study and SOP Class UIDs and counts: never a patient
name or ID (the Patient participant PS3.15 suggests for 110104 is left out on purpose:
this node's audit trail must hold no patient data; a repository correlates by Study UID).
Auditing never fails the work it records: a write or send error is logged and dropped.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.sr.coding import Code

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import AuditAction, AuditOutcome, NetworkAccessPointType
from cxr_pipeline.service.syslog import SEVERITY_NOTICE, SEVERITY_WARNING, SyslogSender
from cxr_pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Participant:
    """An active participant: a DICOM application (us or a peer).

    Parameters
    ----------
    ae_title
        Its AE title (also written as ``AlternativeUserID="AETITLES=..."``).
    address
        Its IP address or host name ("" when unknown).
    requestor
        Whether it started the activity (the association requestor).
    role
        RoleIDCode (source, destination, application).
    """

    ae_title: str
    address: str
    requestor: bool
    role: Code


@dataclass
class StudyTransfer:
    """What one association carried of one study: instance counts by SOP class."""

    study_uid: str
    sop_classes: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class: str) -> None:
        """Count one more instance of ``sop_class``."""
        self.sop_classes[sop_class] = self.sop_classes.get(sop_class, 0) + 1


def studies_of(datasets: Iterable[Any]) -> list[StudyTransfer]:
    """Group the objects of one transfer by study, counting instances by SOP class.

    Parameters
    ----------
    datasets
        pydicom datasets with ``SOPClassUID`` (``StudyInstanceUID`` may be missing).

    Returns
    -------
    list of StudyTransfer
        One per study, in the order the studies first appear.
    """
    studies: dict[str, StudyTransfer] = {}
    for ds in datasets:
        uid = str(ds.get("StudyInstanceUID", "") or "")
        studies.setdefault(uid, StudyTransfer(uid)).add(str(ds.SOPClassUID))
    return list(studies.values())


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {
            "csd-code": code.value,
            "codeSystemName": code.scheme_designator,
            "originalText": code.meaning,
        },
    )


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _participant(root: ET.Element, who: Participant) -> None:
    attributes = {
        "UserID": who.ae_title or "-",
        "AlternativeUserID": f"AETITLES={who.ae_title}",
        "UserIsRequestor": "true" if who.requestor else "false",
    }
    if who.address:
        attributes["NetworkAccessPointID"] = who.address
        attributes["NetworkAccessPointTypeCode"] = (
            NetworkAccessPointType.IP_ADDRESS
            if _is_ip(who.address)
            else NetworkAccessPointType.MACHINE_NAME
        ).value
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    _coded(element, "RoleIDCode", who.role)


def build_message(
    event_id: Code,
    *,
    action: AuditAction,
    outcome: AuditOutcome,
    participants: Iterable[Participant],
    source_id: str,
    enterprise_site_id: str | None = None,
    event_type: Code | None = None,
    description: str | None = None,
    studies: Iterable[StudyTransfer] = (),
    node: str | None = None,
    when: datetime | None = None,
) -> str:
    """Build one DICOM audit message (PS3.15 A.5.1) as XML text.

    Parameters
    ----------
    event_id
        EventID (110100, 110102, 110104, 110113).
    action, outcome
        EventActionCode and EventOutcomeIndicator.
    participants
        Active participants, in order.
    source_id, enterprise_site_id
        AuditSourceIdentification.
    event_type
        EventTypeCode (application start/stop, the kind of security alert).
    description
        EventOutcomeDescription (why it failed; no patient data).
    studies
        Study participants with SOP classes and instance counts.
    node
        Participant object of a Security Alert: the offending node (its address).
    when
        EventDateTime; None: now.

    Returns
    -------
    str
        The ``<AuditMessage>`` element, UTF-8 text without an XML declaration.
    """
    root = ET.Element("AuditMessage")
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds")
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action.value,
            "EventDateTime": stamp,
            "EventOutcomeIndicator": outcome.value,
        },
    )
    _coded(event, "EventID", event_id)
    if event_type is not None:
        _coded(event, "EventTypeCode", event_type)
    if description:
        ET.SubElement(event, "EventOutcomeDescription").text = description
    for who in participants:
        _participant(root, who)
    source = {"AuditSourceID": source_id}
    if enterprise_site_id:
        source["AuditEnterpriseSiteID"] = enterprise_site_id
    source_element = ET.SubElement(root, "AuditSourceIdentification", source)
    _coded(source_element, "AuditSourceTypeCode", codes.AUDIT_SOURCE_APPLICATION_SERVER)
    for study in studies:
        element = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": study.study_uid,
                "ParticipantObjectTypeCode": codes.AUDIT_PARTICIPANT_SYSTEM_OBJECT,
                "ParticipantObjectTypeCodeRole": codes.AUDIT_PARTICIPANT_ROLE_REPORT,
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", codes.AUDIT_ID_STUDY_INSTANCE_UID)
        for sop_class, count in sorted(study.sop_classes.items()):
            ET.SubElement(element, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})
    if node:
        element = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": node,
                "ParticipantObjectTypeCode": codes.AUDIT_PARTICIPANT_SYSTEM_OBJECT,
                "ParticipantObjectTypeCodeRole": codes.AUDIT_PARTICIPANT_ROLE_SECURITY_RESOURCE,
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", codes.AUDIT_ID_NODE)
    return ET.tostring(root, encoding="unicode")


class AuditTrail:
    """Where audit messages go: the append-only file and, optionally, syslog.

    Parameters
    ----------
    settings
        All settings (``[audit]``, ``data_dir`` and our AE title).
    """

    def __init__(self, settings: Settings) -> None:
        audit = settings.audit
        self.enabled = audit.enabled
        self.path: Path = audit.file or Path(settings.data_dir) / "audit" / "audit.jsonl"
        self.source_id = audit.source_id or settings.listener.ae_title
        self.enterprise_site_id = audit.enterprise_site_id
        self._lock = threading.Lock()
        self._syslog = SyslogSender(audit) if audit.enabled and audit.syslog_host else None

    def record(
        self,
        event: str,
        event_id: Code,
        *,
        outcome: AuditOutcome = AuditOutcome.SUCCESS,
        action: AuditAction = AuditAction.EXECUTE,
        participants: Iterable[Participant] = (),
        **details: object,
    ) -> str | None:
        """Build, append and (optionally) send one audit message; never raises.

        Parameters
        ----------
        event
            A short name for people and grep (``"association rejected"``).
        event_id, outcome, action, participants
            As in :func:`build_message`.
        **details
            ``event_type``, ``description``, ``studies``, ``node`` of :func:`build_message`.

        Returns
        -------
        str or None
            The XML written, or None when auditing is disabled or failed.
        """
        if not self.enabled:
            return None
        try:
            xml = build_message(
                event_id,
                action=action,
                outcome=outcome,
                participants=participants,
                source_id=self.source_id,
                enterprise_site_id=self.enterprise_site_id,
                **details,  # type: ignore[arg-type]
            )
            line = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "event": event,
                "outcome": outcome.value,
                "xml": xml,
            }
            self._append(json.dumps(line, ensure_ascii=False) + "\n")
        except Exception as exc:  # the audit trail must not break the work it records
            log.error("audit message %r not written: %s", event, exc)
            return None
        if self._syslog is not None:
            severity = SEVERITY_NOTICE if outcome == AuditOutcome.SUCCESS else SEVERITY_WARNING
            self._syslog.send(xml, severity=severity)
        return xml

    def _append(self, text: str) -> None:
        data = text.encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: one write per message, so processes sharing the file never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Close the syslog connection."""
        if self._syslog is not None:
            self._syslog.close()


_TRAILS: dict[str, AuditTrail] = {}
_TRAILS_LOCK = threading.Lock()


def trail_for(settings: Settings) -> AuditTrail:
    """Return the process's audit trail for these settings (one per distinct configuration).

    Parameters
    ----------
    settings
        All settings.

    Returns
    -------
    AuditTrail
        Shared by every caller with the same ``[audit]``, ``data_dir`` and AE title, so
        one syslog connection serves all jobs.
    """
    key = json.dumps(
        [settings.audit.model_dump(mode="json"), str(settings.data_dir), settings.listener.ae_title]
    )
    with _TRAILS_LOCK:
        trail = _TRAILS.get(key)
        if trail is None:
            trail = _TRAILS[key] = AuditTrail(settings)
        return trail


def read_trail(path: Path) -> list[Mapping[str, str]]:
    """Read an audit file back (tests, ``cxr-status``): one dict per message."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]
