"""DICOM TLS into the listener from real DCMTK and Orthanc peers, and a TLS round trip.

- DCMTK ``storescu +tls`` / ``echoscu +tls`` into a listener that requires a client
  certificate: a trusted client stores; one signed by another CA is refused and the
  refusal is a Security Alert.
- Orthanc 1.10 with DICOM TLS sends a chest radiograph to the listener over TLS; the
  results (SR + SC) go back to Orthanc over TLS (known peer with a ``tls`` table, client
  certificate required by Orthanc) and land in the same study.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.audit import read_trail
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import load_settings
from tests.conftest import testdata
from tests.integration.test_edge_security import listening
from tests.support.dicom_network import wait_until
from tests.support.orthanc import orthanc_available, orthanc_tls_config, running_orthanc
from tests.support.pki import Pki, make_pki

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    settings = load_settings(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"}, explain={"method": "none"}
    )
    return Engine.from_settings(settings)


def _listener_tls(pki: Pki) -> dict[str, object]:
    return {
        "enabled": True,
        "certificate": str(pki.server.certificate),
        "private_key": str(pki.server.key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": True,
    }


def _state(ledger: Ledger, uid: str) -> JobState | None:
    record = ledger.get(uid)
    return None if record is None else record.state


def _dcmtk(tool: str, port: int, pki: Pki, client: tuple[Path, Path], *files: Path) -> str:
    key, cert = client[1], client[0]
    result = subprocess.run(
        [tool, "+tls", str(key), str(cert), "+cf", str(pki.ca), "-aet", "MODALITY",
         "-aec", "CXR_PIPELINE", "-to", "10", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return f"rc={result.returncode} {result.stdout}{result.stderr}"


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")
def test_dcmtk_into_the_listener_over_tls(engine: Engine, tmp_path: Path, pki: Pki) -> None:
    ct = testdata("CT_small.dcm")
    uid = str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID)
    trusted = (pki.client.certificate, pki.client.key)
    foreign = (pki.other_client.certificate, pki.other_client.key)
    with listening(engine, tmp_path, listener={"tls": _listener_tls(pki)}) as service:
        out = _dcmtk("storescu", service.port, pki, trusted, ct)
        assert out.startswith("rc=0"), out
        record = service.ledger.get(uid)
        assert record is not None and record.state is JobState.SKIPPED  # a CT: not a chest
        refused = _dcmtk("echoscu", service.port, pki, foreign)
        assert not refused.startswith("rc=0"), refused
        deadline = time.monotonic() + 10
        alerts: list[str] = []
        while time.monotonic() < deadline and not alerts:
            trail = read_trail(Path(service.settings.data_dir) / "audit" / "audit.jsonl")
            alerts = [m["xml"] for m in trail if m["event"] == "TLS failure (receiving)"]
            time.sleep(0.2)
    assert alerts and "certificate" in alerts[0], alerts


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_orthanc_round_trip_over_tls(engine: Engine, tmp_path: Path, pki: Pki) -> None:
    source = testdata("RG1_UNCR.dcm")
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    # Orthanc's one certificate is its server and its client certificate (signed by our CA).
    orthanc_tls = orthanc_tls_config(pki.server.certificate, pki.server.key, pki.ca)
    with running_orthanc(tmp_path / "orthanc", extra_config=orthanc_tls) as pacs:
        peer_tls = {
            "enabled": True,
            "ca_certificates": str(pki.ca),
            "certificate": str(pki.client.certificate),  # our client certificate to Orthanc
            "private_key": str(pki.client.key),
            "verify": True,
            "server_name": "localhost",
        }
        peers = [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
                  "tls": peer_tls, "addresses": ["127.0.0.1"]}]  # fmt: skip
        with listening(
            engine,
            tmp_path / "data",
            listener={"tls": _listener_tls(pki), "allowed_calling_aes": [pacs.ae_title]},
            send={"known_peers": peers, "max_attempts": 2, "backoff_initial_s": 0.5},
        ) as service:
            modality = {"AET": "CXR_PIPELINE", "Host": "127.0.0.1", "Port": service.port,
                        "UseDicomTls": True}  # fmt: skip
            pacs.session.put(
                f"{pacs.rest_url}/modalities/cxr", json=modality, timeout=30
            ).raise_for_status()
            instance = pacs.upload(source)
            pacs.send_to_modality("cxr", [instance])
            found = pacs.wait_for_instances(study_uid, 3, timeout_s=120)
            assert len(found) == 3, pacs.log_tail()
            uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
            # The SR and SC reach the PACS before the ledger row turns DONE: wait for it.
            assert wait_until(lambda: _state(service.ledger, uid) is JobState.DONE, timeout_s=60)
            events = [
                m["event"]
                for m in read_trail(Path(service.settings.data_dir) / "audit" / "audit.jsonl")
            ]
    assert "instances transferred (received)" in events
    assert "instances transferred (sent)" in events
    assert not [e for e in events if "TLS failure" in e or "rejected" in e], events
