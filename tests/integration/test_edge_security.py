"""Peers known by address, the listener's audit trail and reasoned refusals.

The listener runs in-process (:func:`listeners.storescp.start_service`, as ``cxr-listen``)
on 127.0.0.1; a second loopback source address (127.0.0.2) plays "another host". The
audit file is read back and every message is checked against the structure of the DICOM
audit message schema (PS3.15 A.5.1). No package ships that schema (neither Debian nor
PyPI), so it is not validated with a schema processor; the check below covers the element
order, required attributes and the coded values we use.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from cxr_pipeline.dicom import codes
from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.audit import read_trail
from cxr_pipeline.service.ledger import Ledger
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import load_settings
from listeners.security import refusal_reason
from listeners.storescp import Service, start_service
from tests.conftest import testdata
from tests.reliability.harness import body_bytes, send_raw
from tests.support.pki import Pki, make_pki
from workers.local import LocalWorkerPool
from workers.queue import ledger_path, spool_root

pytestmark = [pytest.mark.integration]

EVENT_IDS = {
    codes.AUDIT_APPLICATION_ACTIVITY.value,
    codes.AUDIT_BEGIN_TRANSFERRING.value,
    codes.AUDIT_INSTANCES_TRANSFERRED.value,
    codes.AUDIT_SECURITY_ALERT.value,
}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    settings = load_settings(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"}, explain={"method": "none"}
    )
    return Engine.from_settings(settings)


@contextmanager
def listening(engine: Engine, data_dir: Path, **sections: Any) -> Iterator[Service]:
    listener = {"host": "127.0.0.1", "port": 0, "min_free_bytes": 1_000_000}
    listener.update(sections.pop("listener", {}))
    settings = load_settings(
        data_dir=data_dir,
        model=engine.settings.model.model_dump(),
        explain={"method": "none"},
        listener=listener,
        **sections,
    )
    merged = Engine(settings=settings, predictor=engine.predictor)
    pool = LocalWorkerPool(
        settings, Ledger(ledger_path(settings)), Spool(spool_root(settings)), engine=merged
    )
    service = start_service(settings, queue=pool)
    try:
        yield service
    finally:
        service.stop()


def _scu(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _associate(port: int, calling: str, source: str = "127.0.0.1") -> Any:
    return _scu(calling).associate(
        "127.0.0.1", port, ae_title="CXR_PIPELINE", bind_address=(source, 0)
    )


def check_audit_message(xml: str) -> ET.Element:
    """Check one message against the structure of PS3.15 A.5.1 (see the module docstring)."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    participants = tags[1 : tags.index("AuditSourceIdentification")]
    assert participants and set(participants) == {"ActiveParticipant"}
    rest = tags[tags.index("AuditSourceIdentification") + 1 :]
    assert set(rest) <= {"ParticipantObjectIdentification"}
    event = root[0]
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert event.get("EventDateTime")
    event_id = event.find("EventID")
    assert event_id is not None and event_id.get("csd-code") in EVENT_IDS
    assert event_id.get("codeSystemName") == "DCM" and event_id.get("originalText")
    for participant in root.iter("ActiveParticipant"):
        assert participant.get("UserID") and participant.get("UserIsRequestor") in {"true", "false"}
        role = participant.find("RoleIDCode")
        assert role is not None and role.get("codeSystemName") == "DCM"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for item in root.iter("ParticipantObjectIdentification"):
        assert item.get("ParticipantObjectID") is not None
        assert item.find("ParticipantObjectIDTypeCode") is not None
    return root


def _trail(service: Service) -> list[Mapping[str, str]]:
    messages = read_trail(Path(service.settings.data_dir) / "audit" / "audit.jsonl")
    for message in messages:
        check_audit_message(message["xml"])
    return messages


def test_known_peer_is_held_to_its_addresses(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers = [{"ae_title": "ORTHANC", "host": "127.0.0.2", "port": 4242,
              "addresses": ["127.0.0.2/32"]}]  # fmt: skip
    with (
        caplog.at_level(logging.WARNING, logger="listeners.security"),
        listening(engine, tmp_path, send={"known_peers": peers}) as service,
    ):
        spoofed = _associate(service.port, "ORTHANC", source="127.0.0.1")
        assert spoofed.is_rejected
        rejection = spoofed.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
        genuine = _associate(service.port, "ORTHANC", source="127.0.0.2")
        assert genuine.is_established
        assert genuine.send_c_echo().Status == DimseStatus.SUCCESS
        genuine.release()
        # Another AE title is not bound to an address (default permissive, like storescp).
        other = _associate(service.port, "MODALITY", source="127.0.0.1")
        assert other.is_established
        other.release()
        alerts = [m for m in _trail(service) if m["event"] == "association rejected"]
    assert "from address 127.0.0.1, which is not one of the addresses" in caplog.text
    assert len(alerts) == 1
    root = check_audit_message(alerts[0]["xml"])
    event = root[0]
    assert event.find("EventID").get("csd-code") == codes.AUDIT_SECURITY_ALERT.value  # type: ignore[union-attr]
    assert event.find("EventTypeCode").get("csd-code") == codes.AUDIT_NODE_AUTHENTICATION.value  # type: ignore[union-attr]
    assert "127.0.0.1" in alerts[0]["xml"] and "ORTHANC" in alerts[0]["xml"]


def test_strict_allow_list_and_addresses_together() -> None:
    settings = load_settings(
        listener={"allowed_calling_aes": ["ORTHANC"]},
        send={"known_peers": [{"ae_title": "ORTHANC", "host": "10.1.2.3", "port": 4242,
                               "addresses": ["10.1.2.3", "fd00::/8"]}]},
    )  # fmt: skip
    assert refusal_reason(settings, "ORTHANC", "10.1.2.3") is None
    assert refusal_reason(settings, "ORTHANC", "::ffff:10.1.2.3") is None
    assert refusal_reason(settings, "ORTHANC", "fd00::7") is None
    assert "not one of the addresses" in str(refusal_reason(settings, "ORTHANC", "10.1.2.4"))
    assert "allowed_calling_aes" in str(refusal_reason(settings, "INTRUDER", "10.1.2.3"))
    with pytest.raises(Exception, match="not an IP address"):
        load_settings(send={"known_peers": [{"ae_title": "A", "host": "h", "port": 1,
                                             "addresses": ["pacs.local"]}]})  # fmt: skip


def test_audit_trail_of_a_received_association(engine: Engine, tmp_path: Path) -> None:
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    with listening(engine, tmp_path) as service:
        assoc = _associate(service.port, "MODALITY")
        assert assoc.send_c_store(ct).Status == DimseStatus.SUCCESS
        assoc.release()
    messages = _trail(service)
    names = [m["event"] for m in messages]
    assert names == [
        "application start",
        "begin transferring (receiving)",
        "instances transferred (received)",
        "application stop",
    ]
    transferred = check_audit_message(messages[2]["xml"])
    study = transferred.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == str(ct.StudyInstanceUID)
    sop = study.find("SOPClass")
    assert sop is not None and sop.get("UID") == str(ct.SOPClassUID)
    assert sop.get("NumberOfInstances") == "1"
    text = "".join(m["xml"] for m in messages)
    assert str(ct.PatientName) not in text and str(ct.PatientID) not in text


def test_long_uid_in_the_command_is_a_recorded_refusal(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    long_uid = "1." + "2" * 63  # 65 characters: PS3.5 allows 64
    with (
        caplog.at_level(logging.ERROR, logger="listeners.security"),
        listening(engine, tmp_path) as service,
    ):
        assoc = _associate(service.port, "MODALITY")
        with pytest.warns(UserWarning):
            status = send_raw(assoc, str(ct.SOPClassUID), long_uid, body_bytes(ct))
        assert status is None
        for _ in range(100):
            if not assoc.is_alive():
                break
            time.sleep(0.05)
        assert assoc.is_aborted
        assert sum(service.ledger.counts().values()) == 0
        assert list(service.spool.incoming.iterdir()) == []
        # The listener goes on serving.
        again = _associate(service.port, "MODALITY")
        assert again.send_c_store(ct).Status == DimseStatus.SUCCESS
        again.release()
        refused = [m for m in _trail(service) if m["event"] == "command refused"]
    assert len(refused) == 1
    assert "must not exceed 64 characters" in refused[0]["xml"]
    assert "nothing stored" in caplog.text


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_incoming_tls_failures_are_security_alerts(
    engine: Engine, tmp_path: Path, pki: Pki
) -> None:
    from cxr_pipeline.service.tls import client_context

    tls = {"enabled": True, "certificate": str(pki.server.certificate),
           "private_key": str(pki.server.key), "ca_certificates": str(pki.ca),
           "require_client_certificate": True}  # fmt: skip
    with listening(engine, tmp_path, listener={"tls": tls}) as service:
        plain = _associate(service.port, "MODALITY")
        assert not plain.is_established
        foreign = client_context(
            pki.ca, certificate=pki.other_client.certificate, private_key=pki.other_client.key
        )
        refused = _scu("MODALITY").associate(
            "127.0.0.1", service.port, ae_title="CXR_PIPELINE", tls_args=(foreign, "localhost")
        )
        if refused.is_established:  # TLS 1.3: the server's verdict arrives after the handshake
            assert "Status" not in refused.send_c_echo()
        good = client_context(
            pki.ca, certificate=pki.client.certificate, private_key=pki.client.key
        )
        ok = _scu("MODALITY").associate(
            "127.0.0.1", service.port, ae_title="CXR_PIPELINE", tls_args=(good, "localhost")
        )
        assert ok.is_established and ok.send_c_echo().Status == DimseStatus.SUCCESS
        ok.release()
        alerts = [m for m in _trail(service) if m["event"] == "TLS failure (receiving)"]
    assert len(alerts) >= 2, alerts
    text = " ".join(m["xml"] for m in alerts)
    assert "TLS handshake failed" in text and "127.0.0.1" in text
