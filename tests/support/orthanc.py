"""A real Orthanc PACS for tests: the Debian ``Orthanc`` binary on free ports.

Usage::

    with running_orthanc(tmp_path, modalities={"cxr": ("CXR_PIPELINE", "127.0.0.1", port)}) as pacs:
        pacs.upload(path)
        pacs.send_to_modality("cxr", [instance_id])
        pacs.study_instances(study_uid)

or the ``orthanc`` pytest fixture factory :func:`orthanc_factory`. Orthanc listens on
127.0.0.1 only, without HTTP authentication, with a temporary storage folder, and is
stopped (SIGTERM, then SIGKILL) when the block ends (:meth:`OrthancServer.stop` /
:meth:`~OrthancServer.start` stop and restart it in between, on the same ports and storage).

Like a PACS that serves a query/retrieve client it has not registered, it answers C-FIND
and C-GET from any AE title (``DicomAlwaysAllowFind`` / ``DicomAlwaysAllowGet``; C-MOVE
still needs the destination in ``modalities``), and where Debian's ``orthanc-dicomweb`` is
installed it serves QIDO/WADO/STOW-RS at :attr:`OrthancServer.dicomweb_url`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

ORTHANC_BINARY = "Orthanc"
DEFAULT_AE_TITLE = "ORTHANC"
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
"""Where Debian's ``orthanc-dicomweb`` puts the DICOMweb plugin."""
DICOMWEB_ROOT = "/dicom-web"


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin, where installed."""
    return next((p for p in DICOMWEB_PLUGIN_PATHS if p.is_file()), None)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_available() -> bool:
    """Whether the Orthanc binary is installed."""
    return shutil.which(ORTHANC_BINARY) is not None


@dataclass
class OrthancServer:
    """A running Orthanc: where it listens and small REST helpers."""

    rest_url: str
    dicom_port: int
    http_port: int
    ae_title: str
    storage_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    session: requests.Session = field(default_factory=requests.Session)
    host: str = "127.0.0.1"
    config_path: Path | None = None
    dicomweb: bool = False

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb plugin (QIDO/WADO/STOW-RS)."""
        if not self.dicomweb:
            raise RuntimeError("this Orthanc has no DICOMweb plugin")
        return f"{self.rest_url}{DICOMWEB_ROOT}"

    @property
    def address(self) -> str:
        """``AE@host:port`` of its DICOM server (cxr-batch --from-pacs / --send)."""
        return f"{self.ae_title}@{self.host}:{self.dicom_port}"

    # -- process -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL); its storage stays for :meth:`start`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start Orthanc again on the same configuration, ports and storage."""
        if self.process.poll() is None:
            return
        if self.config_path is None:
            raise RuntimeError("no configuration to restart from")
        self.process = _launch(self.config_path, self.log_path)
        _wait_ready(self, timeout_s)

    # -- REST --------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = self.session.get(f"{self.rest_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.session.post(f"{self.rest_url}{path}", data=data, timeout=120)
        response.raise_for_status()
        return response.json() if response.content else None

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/system")
        return result

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def study_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the instances of one study (by Study Instance UID)."""
        found = self.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": False},
        )
        return list(found)

    def get_instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags (keyword -> value) of one instance."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        response = self.session.get(f"{self.rest_url}/instances/{instance_id}/file", timeout=60)
        response.raise_for_status()
        return response.content

    def upload(self, path: Path | str) -> str:
        """Store a DICOM file through REST; returns its Orthanc instance id."""
        result = self.post("/instances", Path(path).read_bytes())
        return str(result["ID"])

    def send_to_modality(self, modality: str, resources: Sequence[str]) -> Any:
        """C-STORE resources (instance/series/study ids) to a configured modality, synchronously."""
        return self.post(
            f"/modalities/{modality}/store",
            {"Resources": list(resources), "Synchronous": True},
        )

    def echo(self, modality: str) -> bool:
        """C-ECHO a configured modality from Orthanc."""
        response = self.session.post(f"{self.rest_url}/modalities/{modality}/echo", data=b"{}")
        return response.status_code == 200

    def wait_for_instances(
        self, study_uid: str, count: int, *, timeout_s: float = 120.0
    ) -> list[str]:
        """Poll until the study holds at least ``count`` instances; return their ids."""
        deadline = time.monotonic() + timeout_s
        found: list[str] = []
        while time.monotonic() < deadline:
            found = self.study_instances(study_uid)
            if len(found) >= count:
                return found
            time.sleep(0.5)
        return found

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def orthanc_config(
    storage_dir: Path,
    *,
    http_port: int,
    dicom_port: int,
    ae_title: str,
    modalities: Mapping[str, tuple[str, str, int]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON configuration of a private test Orthanc."""
    config: dict[str, Any] = {
        "Name": "cxr-pipeline-test",
        "StorageDirectory": str(storage_dir / "db"),
        "IndexDirectory": str(storage_dir / "db"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        # cxr-batch --from-pacs queries (C-FIND) and retrieves (C-GET) as CXR_PIPELINE
        # without being listed in DicomModalities: what a site sets for a query/retrieve
        # client it does not register by address (C-MOVE still needs an entry).
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
        "DicomScuTimeout": 30,
        "Plugins": [],
        "LuaScripts": [],
        "ConcurrentJobs": 1,
        "StableAge": 1,
        "HttpTimeout": 60,
        "OverwriteInstances": True,
    }
    plugin = dicomweb_plugin()
    if plugin is not None:
        config["Plugins"] = [str(plugin)]
        config["DicomWeb"] = {"Enable": True, "Root": f"{DICOMWEB_ROOT}/", "EnableWado": True}
    if extra:
        config.update(extra)
    return config


def orthanc_tls_config(
    certificate: Path,
    private_key: Path,
    trusted: Path,
    *,
    require_client_certificate: bool = True,
) -> dict[str, Any]:
    """Configuration keys for Orthanc's DICOM TLS (Orthanc 1.9+; pass as ``extra_config``).

    Parameters
    ----------
    certificate, private_key
        Orthanc's PEM server certificate and key (also used when Orthanc is the client).
    trusted
        PEM bundle of the certificates / CAs Orthanc trusts for its peers.
    require_client_certificate
        ``DicomTlsRemoteCertificateRequired``: refuse SCUs without a trusted certificate.
    """
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certificate),
        "DicomTlsPrivateKey": str(private_key),
        "DicomTlsTrustedCertificates": str(trusted),
        "DicomTlsRemoteCertificateRequired": require_client_certificate,
    }


@contextmanager
def running_orthanc(
    workdir: Path,
    *,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    ae_title: str = DEFAULT_AE_TITLE,
    extra_config: Mapping[str, Any] | None = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[OrthancServer]:
    """Start a private Orthanc, wait until ``/system`` answers, stop it afterwards.

    Parameters
    ----------
    workdir
        Temporary folder for the configuration, storage and log.
    modalities
        DicomModalities entries: name -> (AE title, host, port), e.g. our listener.
    ae_title
        Orthanc's own AE title.
    extra_config
        More configuration keys (e.g. ``LuaScripts``), overriding the defaults.
    startup_timeout_s
        How long to wait for the REST API.
    """
    if not orthanc_available():
        raise FileNotFoundError("Orthanc binary not installed (Debian package 'orthanc')")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = orthanc_config(
        workdir,
        http_port=http_port,
        dicom_port=dicom_port,
        ae_title=ae_title,
        modalities=modalities or {},
        extra=extra_config,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    server = OrthancServer(
        rest_url=f"http://127.0.0.1:{http_port}",
        dicom_port=dicom_port,
        http_port=http_port,
        ae_title=ae_title,
        storage_dir=workdir / "db",
        log_path=log_path,
        process=_launch(config_path, log_path),
        config_path=config_path,
        dicomweb="DicomWeb" in config and bool(config["Plugins"]),
    )
    try:
        _wait_ready(server, startup_timeout_s)
        yield server
    finally:
        server.session.close()
        server.stop()


def _launch(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [ORTHANC_BINARY, "--no-jobs", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
        )


def _wait_ready(server: OrthancServer, timeout_s: float) -> None:
    """Wait until ``/system`` answers; raise with the log's tail if Orthanc exits or hangs."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            server.system()
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Orthanc did not answer in {timeout_s} s:\n{server.log_tail()}"
                ) from None
            time.sleep(0.2)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc without modalities (import this fixture into a test module)."""
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server
