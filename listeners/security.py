"""Security at the listener's edge: who may associate, from where, and the audit trail.

:class:`EdgeGuard` is bound to the listener's pynetdicom events:

- ``EVT_REQUESTED``: the calling AE title must be allowed (``listener.allowed_calling_aes``)
  and, when a known peer with that AE title names ``addresses``, the connection must come
  from one of them. Otherwise the association is rejected (A-ASSOCIATE-RJ, rejected
  permanent, service user, "calling AE title not recognised"), logged with the reason and
  recorded as a Security Alert (Node Authentication).
- C-STORE (a wrapper around the handler): the first object of an association writes
  Begin Transferring DICOM Instances; when the association ends, one DICOM Instances
  Transferred message lists the studies and SOP classes received.
- ``EVT_DIMSE_RECV``: a command pynetdicom cannot turn into a primitive (a UID over 64
  characters, PS3.5 6.2) makes pynetdicom abort the association before any handler runs;
  the guard decodes it first, so the abort comes with a log line and a Security Alert
  saying why (nothing reaches the spool or the ledger).
- TLS errors of incoming connections (from :func:`cxr_pipeline.service.tls.server_context`):
  Security Alert (Node Authentication) with the peer's address.
- Caps and timeouts of :mod:`listeners.admission` (:meth:`EdgeGuard.admission_acted`): a
  warning and a Security Alert (Use of Restricted Function), at most once per address per
  minute, counting the ones in between.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import AssociateReject, AuditAction, AuditOutcome, DimseStatus
from cxr_pipeline.service import metrics
from cxr_pipeline.service.audit import AuditTrail, Participant, StudyTransfer
from cxr_pipeline.service.ledger import Ledger
from cxr_pipeline.service.tls import describe_tls_error
from cxr_pipeline.settings import Settings
from listeners.admission import Reason, peer_address

log = logging.getLogger(__name__)

ALERT_INTERVAL_S = 60.0
"""At most one Security Alert (and one warning) per address this often for the caps and
timeouts of admission (issue 21: once per address per minute, not once per connection)."""

MAX_TRACKED_ADDRESSES = 4096
"""Addresses remembered for that rate limit before the stale ones are dropped."""

_TIMEOUTS = frozenset({Reason.REQUEST_TIMEOUT, Reason.IDLE_TIMEOUT})

REJECTED_PERMANENT = AssociateReject.REJECTED_PERMANENT
SOURCE_SERVICE_USER = AssociateReject.SOURCE_SERVICE_USER
CALLING_AE_NOT_RECOGNISED = AssociateReject.CALLING_AE_NOT_RECOGNISED
"""A-ASSOCIATE-RJ result, source and diagnostic (PS3.8 9.3.4) used for every refusal of a
caller: the standard has no "address not allowed", and a caller must not learn which
check failed."""


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(peer_address(text))
    except ValueError:
        return None


def refusal_reason(settings: Settings, calling_ae: str, address: str) -> str | None:
    """Say why this caller may not associate, or None when it may.

    Parameters
    ----------
    settings
        ``listener.allowed_calling_aes`` and ``send.known_peers[].addresses``.
    calling_ae
        The Calling AE Title of the A-ASSOCIATE-RQ (stripped).
    address
        The IP address the connection comes from.

    Returns
    -------
    str or None
        The reason for the log and the audit trail (AE titles and addresses only).
    """
    allowed = [ae.strip() for ae in settings.listener.allowed_calling_aes]
    if allowed and calling_ae not in allowed:
        return f"calling AE title {calling_ae!r} is not in listener.allowed_calling_aes"
    networks = [
        ipaddress.ip_network(text, strict=False)
        for peer in settings.send.known_peers
        if peer.ae_title.strip() == calling_ae
        for text in peer.addresses
    ]
    if not networks:
        return None
    source = _address(address)
    if source is not None and any(source in network for network in networks):
        return None
    return (
        f"calling AE title {calling_ae!r} from address {address}, "
        "which is not one of the addresses its known peer entry allows"
    )


@dataclass
class _Transfer:
    """What one association has stored so far."""

    calling_ae: str
    address: str
    studies: dict[str, StudyTransfer] = field(default_factory=dict)


class EdgeGuard:
    """The listener's association policy and audit hooks (see the module docstring).

    Parameters
    ----------
    settings
        All settings.
    trail
        The audit trail.
    ledger
        The ledger (Study Instance UIDs of stored objects, for the audit messages).
    """

    def __init__(self, settings: Settings, trail: AuditTrail, ledger: Ledger) -> None:
        self.settings = settings
        self.trail = trail
        self.ledger = ledger
        self._lock = threading.Lock()
        self._transfers: dict[int, _Transfer] = {}
        self._alerted: dict[str, tuple[float | None, int]] = {}

    # -- participants ----------------------------------------------------------------------

    def _us(self, *, requestor: bool = False) -> Participant:
        listener = self.settings.listener
        return Participant(listener.ae_title, "", requestor, codes.AUDIT_ROLE_DESTINATION)

    @staticmethod
    def _caller(event: Event) -> Participant:
        requestor = event.assoc.requestor
        # At EVT_REQUESTED pynetdicom has not copied the AE title from the request yet.
        primitive = requestor.primitive
        ae_title = getattr(primitive, "calling_ae_title", None) or requestor.ae_title
        return Participant(
            str(ae_title or "").strip(), str(requestor.address), True, codes.AUDIT_ROLE_SOURCE
        )

    # -- bindings --------------------------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Callable[[Event], None]]]:
        """Return the pynetdicom notification handlers to bind when starting the server."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_DIMSE_RECV, self.on_dimse_received),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_CONN_CLOSE, self.on_ended),
        ]

    def application(self, *, started: bool) -> None:
        """Record Application Activity (start or stop of ``cxr-listen``)."""
        self.trail.record(
            "application start" if started else "application stop",
            codes.AUDIT_APPLICATION_ACTIVITY,
            participants=[
                Participant(
                    self.settings.listener.ae_title, "", False, codes.AUDIT_ROLE_APPLICATION
                )
            ],
            event_type=codes.AUDIT_APPLICATION_START if started else codes.AUDIT_APPLICATION_STOP,
        )

    # -- association policy ----------------------------------------------------------------

    def on_requested(self, event: Event) -> None:
        """Reject a caller whose AE title or address is not allowed (A-ASSOCIATE-RJ)."""
        if event.assoc.is_rejected:  # already refused by admission (listeners/admission.py)
            return
        caller = self._caller(event)
        reason = refusal_reason(self.settings, caller.ae_title, caller.address)
        if reason is None:
            return
        log.warning("association from %s rejected: %s", caller.address, reason)
        metrics.ASSOCIATIONS_REFUSED.labels(reason="calling_ae").inc()
        event.assoc.acse.send_reject(
            REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED
        )
        # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ is out
        # and the peer has closed (or ARTIM expired) before the socket is shut down.
        event.assoc.kill()
        self._alert("association rejected", caller, reason, codes.AUDIT_NODE_AUTHENTICATION)

    def on_rejected(self, event: Event) -> None:
        """Record rejections pynetdicom made itself (called AE title, association limit)."""
        primitive = event.assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        diagnostic = getattr(primitive, "diagnostic", None)
        source = getattr(primitive, "result_source", None)
        caller = self._caller(event)
        reason = f"A-ASSOCIATE-RJ result {result}, source {source}, diagnostic {diagnostic}"
        log.warning(
            "association from %s (%s) rejected: %s", caller.address, caller.ae_title, reason
        )
        called = diagnostic == AssociateReject.CALLED_AE_NOT_RECOGNISED
        metrics.ASSOCIATIONS_REFUSED.labels(reason="called_ae" if called else "rejected").inc()
        if result == REJECTED_PERMANENT and source == SOURCE_SERVICE_USER:
            self._alert("association rejected", caller, reason, codes.AUDIT_NODE_AUTHENTICATION)

    def on_dimse_received(self, event: Event) -> None:
        """Give a reason to the abort that follows a command pynetdicom cannot decode."""
        message = event.message
        try:
            message.message_to_primitive()
        except Exception as exc:  # the exact check pynetdicom is about to make
            caller = self._caller(event)
            reason = f"invalid DIMSE command: {exc}; association aborted, nothing stored"
            log.error("%s from %s: %s", caller.ae_title, caller.address, reason)
            self._alert("command refused", caller, reason, codes.AUDIT_USE_OF_RESTRICTED_FUNCTION)

    def tls_error(self, exc: OSError, sock: ssl.SSLSocket) -> None:
        """Record a failed TLS handshake or a TLS alert on an incoming connection."""
        try:
            address = str(sock.getpeername()[0])
        except OSError:
            address = ""
        reason = f"TLS handshake failed: {describe_tls_error(exc)}"
        log.warning("TLS connection from %s failed: %s", address or "?", reason)
        caller = Participant("", address, True, codes.AUDIT_ROLE_SOURCE)
        self._alert("TLS failure (receiving)", caller, reason, codes.AUDIT_NODE_AUTHENTICATION)

    def connection_refused(self, address: str, reason: str) -> None:
        """Record a connection the server closed for an oversized PDU."""
        metrics.ASSOCIATIONS_REFUSED.labels(reason="pdu_too_large").inc()
        caller = Participant("", address, True, codes.AUDIT_ROLE_SOURCE)
        self._alert("connection refused", caller, reason, codes.AUDIT_USE_OF_RESTRICTED_FUNCTION)

    def admission_acted(self, address: str, reason: Reason, description: str) -> None:
        """Log and audit a cap or a leash of :mod:`listeners.admission`, rate-limited.

        One warning and one Security Alert (Use of Restricted Function) per address per
        :data:`ALERT_INTERVAL_S`, saying how many more acted since the last one; a
        reconnect loop must not flood the log or the audit repository.
        """
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._alerted.get(address, (None, 0))
            if last is not None and now - last < ALERT_INTERVAL_S:
                self._alerted[address] = (last, suppressed + 1)
                return
            self._alerted[address] = (now, 0)
            if len(self._alerted) > MAX_TRACKED_ADDRESSES:
                self._alerted = {
                    a: v
                    for a, v in self._alerted.items()
                    if v[0] is not None and now - v[0] < ALERT_INTERVAL_S
                }
        if suppressed:
            description += (
                f" ({suppressed} more refusals or timeouts for this address in the last "
                f"{ALERT_INTERVAL_S:.0f} s were not alerted separately)"
            )
        log.warning("connection from %s: %s [%s]", address, description, reason.value)
        caller = Participant("", address, True, codes.AUDIT_ROLE_SOURCE)
        name = "association timed out" if reason in _TIMEOUTS else "association refused"
        self._alert(name, caller, description, codes.AUDIT_USE_OF_RESTRICTED_FUNCTION)

    def _alert(self, name: str, caller: Participant, reason: str, kind: Any) -> None:
        self.trail.record(
            name,
            codes.AUDIT_SECURITY_ALERT,
            outcome=AuditOutcome.MINOR_FAILURE,
            participants=[caller, self._us()],
            event_type=kind,
            description=reason,
            node=caller.address or None,
        )

    # -- transfers -------------------------------------------------------------------------

    def wrap_store(self, handler: Callable[[Event], int]) -> Callable[[Event], int]:
        """Wrap the C-STORE handler so every stored object is counted for the audit."""

        def store(event: Event) -> int:
            status = handler(event)
            if status == DimseStatus.SUCCESS:
                self._count(event)
            return status

        return store

    def _count(self, event: Event) -> None:
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        record = self.ledger.get(uid) if uid else None
        study = record.study_instance_uid if record is not None else ""
        key = id(event.assoc)
        with self._lock:
            transfer = self._transfers.get(key)
            first = transfer is None
            if transfer is None:
                caller = self._caller(event)
                transfer = self._transfers[key] = _Transfer(caller.ae_title, caller.address)
            transfer.studies.setdefault(study, StudyTransfer(study)).add(sop_class)
        if first:
            self.trail.record(
                "begin transferring (receiving)",
                codes.AUDIT_BEGIN_TRANSFERRING,
                participants=[self._caller(event), self._us()],
                studies=[StudyTransfer(study, {sop_class: 1})],
            )

    def on_ended(self, event: Event) -> None:
        """Write DICOM Instances Transferred for what the ending association stored."""
        with self._lock:
            transfer = self._transfers.pop(id(event.assoc), None)
        if transfer is None:
            return
        caller = Participant(transfer.calling_ae, transfer.address, True, codes.AUDIT_ROLE_SOURCE)
        aborted = bool(event.assoc.is_aborted)
        self.trail.record(
            "instances transferred (received)",
            codes.AUDIT_INSTANCES_TRANSFERRED,
            action=AuditAction.CREATE,
            outcome=AuditOutcome.MINOR_FAILURE if aborted else AuditOutcome.SUCCESS,
            participants=[caller, self._us()],
            studies=list(transfer.studies.values()),
            description="association aborted" if aborted else None,
        )
