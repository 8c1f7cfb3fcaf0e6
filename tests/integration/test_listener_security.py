"""The listener's association policy, TLS and refusals, with real peers.

The listener runs in-process (:func:`listeners.storescp.start_service`, the same code as
``cxr-listen``) on a free port with an embedded worker pool; peers are DCMTK
``echoscu``/``storescu`` and pynetdicom SCUs. TLS uses a self-signed pair made with the
``openssl`` CLI in the test.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.errors import ConfigError
from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import Settings, TlsSettings, load_settings
from listeners.admission import PeerKind
from listeners.storescp import Service, start_service
from listeners.tls import client_context, server_context
from tests.conftest import REPO_ROOT
from tests.conftest import testdata as data_file
from tests.support.dicom_network import dcmtk_available, echoscu
from workers.local import LocalWorkerPool
from workers.queue import ledger_path, spool_root

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    settings = load_settings(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"}, explain={"method": "none"}
    )
    return Engine.from_settings(settings)


@contextmanager
def listening(
    engine: Engine, data_dir: Path, send: dict[str, Any] | None = None, **listener: Any
) -> Iterator[Service]:
    settings = load_settings(
        data_dir=data_dir,
        model=engine.settings.model.model_dump(),
        explain={"method": "none"},
        listener={"host": "127.0.0.1", "port": 0, "min_free_bytes": 1_000_000, **listener},
        send=send or {},
    )
    merged = Engine(settings=settings, predictor=engine.predictor)
    service = start_service(settings, queue=_pool(settings, merged, data_dir))
    try:
        yield service
    finally:
        service.stop()


def _pool(settings: Settings, engine: Engine, data_dir: Path) -> LocalWorkerPool:
    return LocalWorkerPool(
        settings, Ledger(ledger_path(settings)), Spool(spool_root(settings)), engine=engine
    )


def _scu(calling: str = "ORTHANC") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


# -- association policy ----------------------------------------------------------------


def test_unknown_calling_ae_is_rejected(engine: Engine, tmp_path: Path) -> None:
    with listening(engine, tmp_path, allowed_calling_aes=["ORTHANC"]) as service:
        assoc = _scu("INTRUDER").associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert assoc.is_rejected
        rejection = assoc.acceptor.primitive
        assert rejection is not None
        # PS3.8 9.3.4: rejected-permanent (1), service-user (1), calling AE not recognised (3)
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)

        ok = _scu("ORTHANC").associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert ok.is_established
        assert ok.send_c_echo().Status == DimseStatus.SUCCESS
        ok.release()

        if dcmtk_available():
            refused = echoscu(service.port, calling_ae="INTRUDER")
            assert refused.returncode != 0
            assert "calling ae title not recognized" in (refused.stdout + refused.stderr).lower()
            assert echoscu(service.port, calling_ae="ORTHANC").returncode == 0


def test_wrong_called_ae_is_rejected_when_checked(engine: Engine, tmp_path: Path) -> None:
    with listening(engine, tmp_path, require_called_ae=True) as service:
        assoc = _scu().associate("127.0.0.1", service.port, ae_title="SOMEONE_ELSE")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive is not None
        assert assoc.acceptor.primitive.diagnostic == 7  # called AE title not recognised
        ok = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert ok.is_established
        ok.release()


def test_association_limit(engine: Engine, tmp_path: Path) -> None:
    with listening(engine, tmp_path, max_associations=1) as service:
        first = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert first.is_established
        second = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert second.is_rejected
        first.release()


def _from(address: str, port: int, calling: str = "ORTHANC") -> Any:
    """Associate from ``address`` (a loopback address) to the listener."""
    return _scu(calling).associate(
        "127.0.0.1", port, ae_title="CXR_PIPELINE", bind_address=(address, 0)
    )


def test_known_peer_has_reserved_slots_and_a_longer_leash(engine: Engine, tmp_path: Path) -> None:
    pacs = {"known_peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]}
    limits = {"max_associations": 6, "idle_timeout_s": 2.0, "known_peer_idle_timeout_s": 60.0}
    with listening(engine, tmp_path, send=pacs, **limits) as service:
        # Two unknown addresses share the 6 - 4 = 2 slots not reserved for known peers.
        unknown = [_from(address, service.port) for address in ("127.0.0.2", "127.0.0.3") * 2]
        assert [a.is_established for a in unknown] == [True, True, False, False]
        refused = unknown[2].acceptor.primitive
        # PS3.8 9.3.4: rejected-transient (2), service-provider presentation (3), local
        # limit exceeded (2): try again later.
        assert (refused.result, refused.result_source, refused.diagnostic) == (2, 3, 2)
        # The known PACS always has its per-address cap of room.
        known = [_from("127.0.0.1", service.port) for _ in range(4)]
        assert all(a.is_established for a in known)
        assert _from("127.0.0.1", service.port).is_rejected  # its own cap
        assert service.admission is not None
        assert service.admission.counts() == {PeerKind.KNOWN: 4, PeerKind.UNKNOWN: 2}
        # Idle: the unknown peers are released after 2 s, the known one is kept.
        time.sleep(2.0 + 3.0)
        assert not any(a.is_established for a in unknown[:2])
        assert all(a.is_released for a in unknown[:2])
        assert all(a.is_established for a in known)
        assert known[0].send_c_echo().Status == DimseStatus.SUCCESS
        for assoc in known:
            assoc.release()


def test_idle_tls_association_is_released_while_an_active_one_is_kept(
    engine: Engine, tmp_path: Path, tls_pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = tls_pairs["server"]
    tls = {"enabled": True, "certificate": str(cert), "private_key": str(key)}
    with listening(engine, tmp_path, tls=tls, idle_timeout_s=2.0) as service:
        idle = _tls_assoc(service.port, client_context(cert))
        busy = _tls_assoc(service.port, client_context(cert))
        assert idle.is_established and busy.is_established
        for _ in range(8):  # 6 s of a C-ECHO every 0.75 s: never idle for 2 s
            assert busy.send_c_echo().Status == DimseStatus.SUCCESS
            time.sleep(0.75)
        assert not idle.is_established and idle.is_released
        assert busy.is_established
        busy.release()


# -- refusals --------------------------------------------------------------------------


def test_full_disk_answers_out_of_resources(engine: Engine, tmp_path: Path) -> None:
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    with listening(engine, tmp_path, min_free_bytes=2**62) as service:
        assoc = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert assoc.is_established
        assert assoc.send_c_store(ct).Status == DimseStatus.OUT_OF_RESOURCES
        assoc.release()
        assert sum(service.ledger.counts().values()) == 0
        assert list(service.spool.incoming.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uid_is_refused(engine: Engine, tmp_path: Path) -> None:
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    evil = "1.2.3/../../../../escaped"
    ct.SOPInstanceUID = evil
    ct.file_meta.MediaStorageSOPInstanceUID = evil
    with listening(engine, tmp_path / "data") as service:
        assoc = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert assoc.is_established
        assert assoc.send_c_store(ct).Status == DimseStatus.CANNOT_UNDERSTAND
        assoc.release()
        assert sum(service.ledger.counts().values()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert not list(tmp_path.rglob("escaped*"))


def test_non_chest_image_is_acknowledged_and_skipped(engine: Engine, tmp_path: Path) -> None:
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    with listening(engine, tmp_path) as service:
        assoc = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert assoc.send_c_store(ct).Status == DimseStatus.SUCCESS
        assoc.release()
        record = service.ledger.get(str(ct.SOPInstanceUID))
        assert record is not None and record.state is JobState.SKIPPED
        assert record.calling_ae == "ORTHANC"
        assert not service.spool.exists(str(ct.SOPInstanceUID))


# -- TLS -------------------------------------------------------------------------------


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    folder = tmp_path_factory.mktemp("tls")
    return {"server": _self_signed(folder, "server"), "client": _self_signed(folder, "client")}


def _tls_assoc(port: int, context: ssl.SSLContext) -> Any:
    return _scu().associate(
        "127.0.0.1", port, ae_title="CXR_PIPELINE", tls_args=(context, "localhost")
    )


def test_tls_association_with_self_signed_pair(
    engine: Engine, tmp_path: Path, tls_pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = tls_pairs["server"]
    tls = {"enabled": True, "certificate": str(cert), "private_key": str(key)}
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    with listening(engine, tmp_path, tls=tls) as service:
        assoc = _tls_assoc(service.port, client_context(cert))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == DimseStatus.SUCCESS
        assert assoc.send_c_store(ct).Status == DimseStatus.SUCCESS
        assoc.release()
        record = service.ledger.get(str(ct.SOPInstanceUID))
        assert record is not None and record.state is JobState.SKIPPED

        # Plain TCP to a TLS listener gets no association.
        plain = _scu().associate("127.0.0.1", service.port, ae_title="CXR_PIPELINE")
        assert not plain.is_established
        # A client that does not trust the server's certificate refuses it.
        untrusting = client_context(tls_pairs["client"][0])
        assert not _tls_assoc(service.port, untrusting).is_established


def test_tls_client_certificate_required(
    engine: Engine, tmp_path: Path, tls_pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = tls_pairs["server"]
    client_cert, client_key = tls_pairs["client"]
    tls = {
        "enabled": True,
        "certificate": str(cert),
        "private_key": str(key),
        "ca_certificates": str(client_cert),
        "require_client_certificate": True,
    }
    with listening(engine, tmp_path, tls=tls) as service:
        anonymous = _tls_assoc(service.port, client_context(cert))
        established = anonymous.is_established
        if established:  # TLS 1.3 reports the missing certificate after the handshake
            established = anonymous.send_c_echo().get("Status") == DimseStatus.SUCCESS
            anonymous.abort()
        assert not established
        known = client_context(cert, certificate=client_cert, private_key=client_key)
        assoc = _tls_assoc(service.port, known)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == DimseStatus.SUCCESS
        assoc.release()


def test_tls_settings_errors(tmp_path: Path) -> None:
    assert server_context(TlsSettings()) is None
    with pytest.raises(ConfigError, match="certificate"):
        server_context(TlsSettings(enabled=True))
    with pytest.raises(ConfigError, match="not found"):
        server_context(
            TlsSettings(
                enabled=True, certificate=tmp_path / "no.pem", private_key=tmp_path / "no.key"
            )
        )
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(TlsSettings(enabled=True, certificate=bogus, private_key=bogus))


def test_example_config_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "configs" / "cxr-pipeline.toml")
    assert settings.listener.allowed_calling_aes == ["ORTHANC"]
    assert settings.send.known_peers[0].ae_title == "ORTHANC"
    assert settings.worker.broker_url is None
