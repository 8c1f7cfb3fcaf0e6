"""C-STORE SCU: send result objects (SR, SC) to a DICOM peer with pynetdicom.

A destination of kind ``dicomweb`` gets them by STOW-RS instead
(:mod:`cxr_pipeline.service.dicomweb`).

One association per call. Each dataset's SOP class is proposed in one presentation
context per own transfer syntax, plus one with Explicit and Implicit VR Little Endian
as the fallback (separate contexts, because an acceptor picks by its own preference
within a context and might otherwise take the fallback over a syntax it supports);
pynetdicom converts
between uncompressed syntaxes itself, and a compressed dataset whose syntax the peer
refuses is decompressed (pydicom pixel handlers) before sending. Any refusal, abort,
timeout or non-success status raises :class:`~cxr_pipeline.errors.SendError`
(retryable); retries and backoff belong to the caller (:mod:`cxr_pipeline.service.jobs`).

DICOM TLS is set per destination / known peer (``tls`` table, context from
:mod:`cxr_pipeline.service.tls`); a destination named on the command line picks up the ``tls`` of
the configured peer with the same AE title, host and port. A failed handshake raises
``SendError("TLS handshake with ... failed: <reason>")``. With an audit trail, each call
writes Begin Transferring / DICOM Instances Transferred, and a Security Alert for a TLS
failure.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import STORE_SUCCESS_STATUSES, AuditAction, AuditOutcome
from cxr_pipeline.dicom.decode import transfer_syntax_of
from cxr_pipeline.errors import SendError
from cxr_pipeline.service.audit import AuditTrail, Participant, studies_of
from cxr_pipeline.service.dicomweb import stow_datasets
from cxr_pipeline.service.tls import describe_tls_error, peer_context
from cxr_pipeline.settings import Destination, SendSettings

log = logging.getLogger(__name__)

_FALLBACK_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128
"""PS3.8: at most 128 presentation contexts per association."""


def _contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """Presentation contexts to propose: (SOP class, transfer syntaxes), no duplicates."""
    proposed: list[tuple[str, list[str]]] = []
    for ds in datasets:
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise SendError("dataset to send has no SOP Class UID or SOP Instance UID")
        sop_class = str(ds.SOPClassUID)
        own = str(transfer_syntax_of(ds))
        for context in ((sop_class, [own]), (sop_class, list(_FALLBACK_SYNTAXES))):
            if context not in proposed and not (own in _FALLBACK_SYNTAXES and context[1] == [own]):
                proposed.append(context)
    if len(proposed) > _MAX_CONTEXTS:
        raise SendError(f"{len(proposed)} presentation contexts exceed one association's")
    return proposed


def _as_accepted(ds: Dataset, accepted: set[str]) -> Dataset:
    """Return the dataset, decompressed if the peer did not accept its compressed syntax."""
    syntax = transfer_syntax_of(ds)
    if str(syntax) in accepted or not syntax.is_compressed:
        return ds
    if not accepted & set(_FALLBACK_SYNTAXES):
        raise SendError(f"peer accepted no usable transfer syntax for {ds.SOPInstanceUID}")
    plain = copy.deepcopy(ds)
    try:
        # Same SOP Instance UID: only the encoding changes (PS3.5 10.1, 8.2).
        plain.decompress(generate_instance_uid=False)
    except Exception as exc:  # pydicom raises several types for undecodable pixel data
        raise SendError(f"cannot decompress {ds.SOPInstanceUID} for sending: {exc}") from exc
    return plain


def describe_routing(settings: SendSettings, kept_dir: Path) -> str:
    """Say in one line where results will go (printed when a service starts).

    Parameters
    ----------
    settings
        Send settings.
    kept_dir
        Where results are kept when there is no destination at all.

    Returns
    -------
    str
        For people; contains AE titles, hosts and ports only.
    """
    if settings.destinations:
        peers = ", ".join(d.label for d in settings.destinations)
        return f"results are sent to {peers}"
    if settings.known_peers:
        peers = ", ".join(d.label for d in settings.known_peers)
        return (
            f"results are sent back to the sending AE when it is a known peer ({peers}); "
            "images from other AEs fail with send_failed"
        )
    return (
        f"results are kept locally in {kept_dir} (no destination configured: "
        "use --send-to AE@host:port or send.destinations)"
    )


def configured_peer(destination: Destination, settings: SendSettings) -> Destination:
    """Return the destination with the TLS (and credentials) of the configured peer.

    Parameters
    ----------
    destination
        E.g. parsed from ``--send AE@host:port`` (no TLS table) or ``--send-stow URL``
        (no credentials: they never come from the command line).
    settings
        ``destinations`` and ``known_peers``.

    Returns
    -------
    Destination
        A DICOM peer with the ``tls`` of the configured peer at the same AE title, host and
        port; a DICOMweb service with the ``auth`` and ``tls`` of the configured
        ``dicomweb`` destination with the same URL; else ``destination`` itself.
    """
    if destination.kind == "dicomweb":
        url = str(destination.url).rstrip("/")
        for peer in settings.destinations:
            if peer.kind == "dicomweb" and str(peer.url).rstrip("/") == url:
                return destination.model_copy(update={"auth": peer.auth, "tls": peer.tls})
        return destination
    if destination.tls.enabled:
        return destination
    for peer in (*settings.destinations, *settings.known_peers):
        same = (peer.ae_title, peer.host, peer.port) == (
            destination.ae_title,
            destination.host,
            destination.port,
        )
        if same and peer.tls.enabled:
            return destination.model_copy(update={"tls": peer.tls})
    return destination


def send_datasets(
    datasets: Sequence[Dataset],
    destination: Destination,
    settings: SendSettings,
    *,
    audit: AuditTrail | None = None,
) -> None:
    """Send every dataset to one destination: C-STORE over one association, or STOW-RS.

    A ``dicomweb`` destination gets one STOW-RS request
    (:func:`cxr_pipeline.service.dicomweb.stow_datasets`); everything below describes the
    DICOM case, whose errors the DICOMweb case mirrors.

    Parameters
    ----------
    datasets
        Complete DICOM objects (e.g. the SR and SC of one analysis).
    destination
        AE title, host, port and TLS of the peer.
    settings
        Calling AE title and network timeout.
    audit
        Where to record the transfer (and TLS failures); None: not audited.

    Raises
    ------
    SendError
        Association rejected or aborted, TLS handshake failed, timeout, a refused
        context, or any C-STORE status other than success or warning. Objects before the
        failure may be stored.
    ConfigError
        The destination's TLS files are missing or unreadable.
    """
    if not datasets:
        return
    destination = configured_peer(destination, settings)
    if destination.kind == "dicomweb":
        stow_datasets(
            datasets,
            destination,
            calling_ae_title=settings.calling_ae_title,
            timeout_s=settings.timeout_s,
            audit=audit,
        )
        return
    tls_errors: list[str] = []
    context = peer_context(
        destination.tls, on_error=lambda exc, sock: tls_errors.append(describe_tls_error(exc))
    )
    tls_args = None
    if context is not None:
        tls_args = (context, destination.tls.server_name or destination.host)
    ae = AE(ae_title=settings.calling_ae_title)
    ae.acse_timeout = settings.timeout_s
    ae.dimse_timeout = settings.timeout_s
    ae.network_timeout = settings.timeout_s
    ae.connection_timeout = settings.timeout_s
    for sop_class, syntaxes in _contexts(datasets):
        ae.add_requested_context(sop_class, syntaxes)

    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    participants = (
        Participant(settings.calling_ae_title, "", True, codes.AUDIT_ROLE_SOURCE),
        Participant(destination.ae_title, destination.host, False, codes.AUDIT_ROLE_DESTINATION),
    )
    studies = studies_of(datasets)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        if tls_errors:
            why = f"TLS handshake with {peer} failed: {tls_errors[0]}"
            if audit is not None:
                audit.record(
                    "TLS failure (sending)",
                    codes.AUDIT_SECURITY_ALERT,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    participants=participants,
                    event_type=codes.AUDIT_NODE_AUTHENTICATION,
                    description=why,
                    node=destination.host,
                )
            raise SendError(why)
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(f"association with {peer} {why}")
    if audit is not None:
        audit.record(
            "begin transferring (sending)",
            codes.AUDIT_BEGIN_TRANSFERRING,
            participants=participants,
            studies=studies,
        )
    failure: str | None = None
    try:
        _store_all(assoc, datasets, peer)
    except SendError as exc:
        failure = exc.detail
        raise
    except (OSError, RuntimeError, ValueError, AttributeError) as exc:
        # pynetdicom raises these for a dropped connection or an unencodable dataset.
        failure = f"C-STORE to {peer} failed: {type(exc).__name__}: {exc}"
        raise SendError(failure) from exc
    finally:
        if assoc.is_established:
            assoc.release()
        if failure is not None and tls_errors:
            failure = f"{failure} (TLS: {tls_errors[0]})"
        if audit is not None:
            audit.record(
                "instances transferred (sent)",
                codes.AUDIT_INSTANCES_TRANSFERRED,
                action=AuditAction.READ,
                outcome=AuditOutcome.SUCCESS if failure is None else AuditOutcome.MINOR_FAILURE,
                participants=participants,
                studies=studies,
                description=failure,
            )


def _store_all(assoc: Association, datasets: Sequence[Dataset], peer: str) -> None:
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        accepted = {
            str(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class
        }
        if not accepted:
            raise SendError(f"{peer} refused SOP class {sop_class}")
        status = assoc.send_c_store(_as_accepted(ds, accepted))
        if "Status" not in status:
            raise SendError(
                f"no C-STORE response from {peer} for {ds.SOPInstanceUID} (timeout or abort)"
            )
        code = int(status.Status)
        if code not in STORE_SUCCESS_STATUSES:
            raise SendError(
                f"{peer} answered C-STORE of {ds.SOPInstanceUID} with status 0x{code:04X}"
            )
        log.info("sent %s to %s (status 0x%04X)", ds.SOPInstanceUID, peer, code)
