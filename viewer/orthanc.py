"""A private Orthanc with the DICOMweb plugin, for the local viewer.

Orthanc 1.10 cannot bind to one address: its HTTP and DICOM servers listen on every
interface. It is kept local by configuration instead:

- HTTP: ``RemoteAccessAllowed`` false, so Orthanc answers only requests from localhost
  (others get 403); the browser reaches it only through the viewer's proxy.
- DICOM: only the modalities listed (all on 127.0.0.1, checked with
  ``DicomCheckModalityHost``) may store, echo or query; ``DicomAlwaysAllowStore`` and
  ``DicomAlwaysAllowEcho`` are off. ``dicom_port=None`` turns the DICOM server off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
"""Where Debian's ``orthanc-dicomweb`` puts the plugin."""


def dicomweb_plugin() -> Path:
    """Path of the Orthanc DICOMweb plugin.

    Raises
    ------
    FileNotFoundError
        The Debian package ``orthanc-dicomweb`` is not installed.
    """
    for path in DICOMWEB_PLUGIN_PATHS:
        if path.is_file():
            return path
    raise FileNotFoundError("Orthanc DICOMweb plugin not found: install Debian orthanc-dicomweb")


def orthanc_config(
    storage_dir: Path,
    *,
    http_port: int,
    dicom_port: int | None,
    ae_title: str,
    modalities: Mapping[str, tuple[str, str, int]],
    plugin: Path,
) -> dict[str, Any]:
    """Return the JSON configuration of the viewer's Orthanc (see the module notes)."""
    return {
        "Name": "cxr-viewer",
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": dicom_port is not None,
        "DicomAet": ae_title,
        "DicomPort": dicom_port or 4242,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "OverwriteInstances": True,
        "StableAge": 1,
    }


@dataclass
class RunningOrthanc:
    """An Orthanc process started by :func:`start_orthanc`."""

    http_port: int
    dicom_port: int | None
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def rest_url(self) -> str:
        """Orthanc's REST root on loopback."""
        return f"http://127.0.0.1:{self.http_port}"

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through REST; returns Orthanc's answer."""
        request = urllib.request.Request(
            f"{self.rest_url}/instances",
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            result: dict[str, Any] = json.load(answer)
        return result

    def stop(self) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after 20 s)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of Orthanc's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_orthanc(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int | None,
    ae_title: str = "CXR_VIEWER",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    timeout_s: float = 60.0,
) -> RunningOrthanc:
    """Start Orthanc with the DICOMweb plugin and wait until DICOMweb answers.

    Raises
    ------
    FileNotFoundError
        Orthanc or its DICOMweb plugin is not installed.
    RuntimeError
        Orthanc exited or did not answer in time (the message has its log's end).
    """
    binary = shutil.which(ORTHANC_BINARY)
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (Debian package orthanc)")
    storage = workdir / "db"
    storage.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        storage,
        http_port=http_port,
        dicom_port=dicom_port,
        ae_title=ae_title,
        modalities=modalities or {},
        plugin=dicomweb_plugin(),
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [binary, "--no-jobs", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    orthanc = RunningOrthanc(http_port, dicom_port, process, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{orthanc.log_tail()}")
        try:
            with urllib.request.urlopen(f"{orthanc.rest_url}/dicom-web/studies", timeout=5):
                return orthanc
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                orthanc.stop()
                raise RuntimeError(
                    f"Orthanc did not answer in {timeout_s} s:\n{orthanc.log_tail()}"
                ) from None
            time.sleep(0.2)


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files under the given files/folders that start like DICOM Part 10 (``DICM`` at 128)."""
    found: list[Path] = []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            with candidate.open("rb") as stream:
                stream.seek(128)
                if stream.read(4) == b"DICM":
                    found.append(candidate)
    return found
