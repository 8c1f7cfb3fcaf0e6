"""Results out over DICOM TLS: real DCMTK ``storescp +tls`` and a real Orthanc with TLS.

A test PKI (CA, other CA, server, expired server, client certificates) is made with the
``cryptography`` package. Sends go through :func:`cxr_pipeline.service.send.send_datasets` and the
job path (:func:`cxr_pipeline.service.jobs.process_job`, which ``cxr-listen`` workers run), so
a TLS failure must leave a ``failed`` ledger row whose reason says why, and a Security
Alert in the audit trail.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.dicom import codes
from cxr_pipeline.errors import SendError
from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.audit import AuditTrail, read_trail
from cxr_pipeline.service.jobs import process_job
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.send import configured_peer, send_datasets
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import (
    Destination,
    PeerTlsSettings,
    SendSettings,
    load_settings,
    parse_destination,
)
from tests.conftest import testdata
from tests.support.orthanc import (
    free_port,
    orthanc_available,
    orthanc_tls_config,
    running_orthanc,
)
from tests.support.pki import Pki, make_pki

pytestmark = [pytest.mark.integration]

QUICK = SendSettings(timeout_s=10, max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    settings = load_settings(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"}, explain={"method": "none"}
    )
    return Engine.from_settings(settings)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"storescp not listening on {port}")


@contextmanager
def dcmtk_tls_scp(folder: Path, certificate: Path, key: Path, ca: Path) -> Iterator[int]:
    """DCMTK ``storescp +tls``: requires a client certificate signed by ``ca``."""
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp not installed")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "storescp.log").open("wb") as log:
        process = subprocess.Popen(
            ["storescp", "+tls", str(key), str(certificate), "+cf", str(ca),
             "-od", str(folder), "-aet", "STORESCP", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # A plain TCP probe is harmless: storescp logs a failed handshake and goes on.
        _wait_listening(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _tls(pki: Pki, *, ca: Path | None = None, client: bool = True) -> PeerTlsSettings:
    return PeerTlsSettings(
        enabled=True,
        ca_certificates=ca or pki.ca,
        certificate=pki.client.certificate if client else None,
        private_key=pki.client.key if client else None,
    )


def _trail(tmp_path: Path) -> AuditTrail:
    return AuditTrail(load_settings(data_dir=tmp_path / "audit-data"))


def _events(trail: AuditTrail) -> list[str]:
    return [line["event"] for line in read_trail(trail.path)]


def test_results_to_dcmtk_storescp_over_tls(pki: Pki, tmp_path: Path) -> None:
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    trail = _trail(tmp_path)
    with dcmtk_tls_scp(tmp_path / "scp", pki.server.certificate, pki.server.key, pki.ca) as port:
        peer = Destination(ae_title="STORESCP", host="127.0.0.1", port=port, tls=_tls(pki))
        send_datasets([ct], peer, QUICK, audit=trail)
        stored: list[Path] = []
        for _ in range(100):  # storescp may finish writing just after it answers
            stored = [p for p in (tmp_path / "scp").iterdir() if p.name.startswith("CT.")]
            if stored:
                break
            time.sleep(0.1)
        assert [pydicom.dcmread(p).SOPInstanceUID for p in stored] == [ct.SOPInstanceUID]
        # Verification is on by default: the host name is checked as well.
        wrong_name = peer.model_copy(
            update={"tls": _tls(pki).model_copy(update={"server_name": "pacs.example.org"})}
        )
        with pytest.raises(SendError, match=r"TLS handshake .* failed: certificate verify failed"):
            send_datasets([ct], wrong_name, QUICK, audit=trail)
        # storescp requires a client certificate: without one the handshake fails.
        anonymous = peer.model_copy(update={"tls": _tls(pki, client=False)})
        # TLS 1.3: the server's "certificate required" alert may come after our side of the
        # handshake is done (then we read the alert) or as the connection closes.
        refused = r"TLS handshake .* failed: (the peer closed|tlsv13 alert certificate required)"
        with pytest.raises(SendError, match=refused):
            send_datasets([ct], anonymous, QUICK)
    assert _events(trail) == [
        "begin transferring (sending)",
        "instances transferred (sent)",
        "TLS failure (sending)",
    ]
    transferred = read_trail(trail.path)[1]["xml"]
    assert str(ct.StudyInstanceUID) in transferred and 'NumberOfInstances="1"' in transferred
    assert str(ct.PatientName) not in transferred


def _receive(root: Path, calling_ae: str = "PACS") -> tuple[Spool, Ledger, str]:
    spool, ledger = Spool(root / "spool"), Ledger(root / "ledger.sqlite3")
    source = testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    path = spool.store(uid, lambda f: f.write(source.read_bytes()))
    ledger.record_received(
        uid, study_uid=str(ds.StudyInstanceUID), calling_ae=calling_ae, spool_path=path
    )
    return spool, ledger, uid


def _job_engine(base: Engine, data_dir: Path, peer: Destination) -> Engine:
    merged = base.settings.model_dump(mode="json")
    merged["data_dir"] = str(data_dir)
    merged["send"] = {**merged["send"], "max_attempts": 1, "timeout_s": 10,
                      "destinations": [peer.model_dump(mode="json")]}  # fmt: skip
    # load_settings, not Settings(...): CXR_DATA_DIR (settings.data_dir) in the environment
    # must not win.
    return Engine(settings=load_settings(**merged), predictor=base.predictor)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong CA", "certificate verify failed: self-signed certificate in certificate chain"),
        ("expired certificate", "certificate verify failed: certificate has expired"),
    ],
)
def test_tls_failure_gives_a_failed_row_with_the_reason(
    pki: Pki, engine: Engine, tmp_path: Path, case: str, reason: str
) -> None:
    server = pki.expired_server if case == "expired certificate" else pki.server
    ca = pki.other_ca if case == "wrong CA" else pki.ca
    with dcmtk_tls_scp(tmp_path / "scp", server.certificate, server.key, pki.ca) as port:
        peer = Destination(ae_title="STORESCP", host="127.0.0.1", port=port, tls=_tls(pki, ca=ca))
        job = _job_engine(engine, tmp_path / "data", peer)
        spool, ledger, uid = _receive(tmp_path / "data")
        assert process_job(uid, job, ledger, spool) is JobState.FAILED
    record = ledger.get(uid)
    assert record is not None and record.state is JobState.FAILED
    assert record.reason is not None
    assert record.reason.startswith("send_failed: TLS handshake with STORESCP@127.0.0.1:")
    assert reason in record.reason, record.reason
    assert spool.outbox_files(uid), "results stay in the outbox for a later retry"
    alerts = [m for m in read_trail(tmp_path / "data" / "audit" / "audit.jsonl")]
    assert [m["event"] for m in alerts] == ["TLS failure (sending)"]
    assert codes.AUDIT_SECURITY_ALERT.value in alerts[0]["xml"]
    assert reason in alerts[0]["xml"]


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_results_to_orthanc_over_tls_with_client_certificate(pki: Pki, tmp_path: Path) -> None:
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    tls = orthanc_tls_config(pki.server.certificate, pki.server.key, pki.ca)
    with running_orthanc(tmp_path / "orthanc", extra_config=tls) as pacs:
        peer = Destination(
            ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port, tls=_tls(pki)
        )
        send_datasets([ct], peer, QUICK)
        assert len(pacs.study_instances(str(ct.StudyInstanceUID))) == 1
        # Orthanc requires a client certificate its trusted bundle signs.
        foreign = PeerTlsSettings(
            enabled=True,
            ca_certificates=pki.ca,
            certificate=pki.other_client.certificate,
            private_key=pki.other_client.key,
        )
        with pytest.raises(SendError, match=r"TLS handshake with ORTHANC.* failed"):
            send_datasets([ct], peer.model_copy(update={"tls": foreign}), QUICK)
        # Plain TCP to a TLS-only Orthanc gets no association.
        with pytest.raises(SendError, match="association with ORTHANC"):
            send_datasets([ct], peer.model_copy(update={"tls": PeerTlsSettings()}), QUICK)


def test_command_line_destination_picks_up_the_configured_tls(pki: Pki) -> None:
    settings = load_settings(
        send={
            "known_peers": [
                {"ae_title": "PACS", "host": "10.0.0.5", "port": 2762,
                 "tls": {"enabled": True, "ca_certificates": str(pki.ca)}},
            ]
        }
    ).send  # fmt: skip
    assert configured_peer(parse_destination("PACS@10.0.0.5:2762"), settings).tls.enabled
    assert not configured_peer(parse_destination("PACS@10.0.0.5:104"), settings).tls.enabled


def test_missing_tls_file_is_a_config_error(tmp_path: Path) -> None:
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    tls = PeerTlsSettings(enabled=True, ca_certificates=tmp_path / "missing.pem")
    peer = Destination(ae_title="X", host="127.0.0.1", port=free_port(), tls=tls)
    with pytest.raises(Exception, match="ca_certificates file not found"):
        send_datasets([ct], peer, QUICK)
