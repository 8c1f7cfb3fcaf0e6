"""Real DICOM network peers for tests: a recording C-STORE SCP, DCMTK senders and a
``cxr-listen`` subprocess.

Nothing here stubs the code under test: the SCP is a real pynetdicom server on a free
port, ``storescu``/``echoscu`` are the DCMTK binaries, and the listener is the real
``python -m listeners.storescp`` process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from cxr_pipeline.dicom.codes import SUPPORTED_TRANSFER_SYNTAXES
from tests.support.orthanc import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def dcmtk_available() -> bool:
    """Whether DCMTK's storescu and echoscu are installed."""
    return shutil.which("storescu") is not None and shutil.which("echoscu") is not None


# -- a recording C-STORE SCP ------------------------------------------------------------


@dataclass
class RecordingScp:
    """A pynetdicom C-STORE SCP that keeps what it receives."""

    port: int
    ae_title: str
    received: list[Dataset] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    calling_aes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def recording_scp(
    *,
    ae_title: str = "TEST_PACS",
    status: int = 0x0000,
    transfer_syntaxes: Sequence[str] = SUPPORTED_TRANSFER_SYNTAXES,
    require_calling_aet: Sequence[str] = (),
    delay_s: float = 0.0,
) -> Iterator[RecordingScp]:
    """Run a real C-STORE SCP on a free port for the duration of the block.

    Parameters
    ----------
    ae_title
        Its AE title.
    status
        The C-STORE status it answers (0x0000 Success; e.g. 0xA700 to test refusals).
    transfer_syntaxes
        Transfer syntaxes it accepts for every storage class.
    require_calling_aet
        Calling AE allow-list (empty: any).
    delay_s
        Sleep before answering each C-STORE (to test timeouts).
    """
    scp = RecordingScp(port=free_port(), ae_title=ae_title)

    def on_store(event: evt.Event) -> int:
        if delay_s:
            time.sleep(delay_s)
        ds = event.dataset
        ds.file_meta = event.file_meta
        with scp.lock:
            scp.received.append(ds)
            scp.transfer_syntaxes.append(str(event.context.transfer_syntax))
            scp.calling_aes.append(str(event.assoc.requestor.ae_title).strip())
        return status

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, list(transfer_syntaxes))
    if require_calling_aet:
        ae.require_calling_aet = list(require_calling_aet)
    server = ae.start_server(
        ("127.0.0.1", scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield scp
    finally:
        if server is not None:
            server.shutdown()


UNCOMPRESSED_ONLY: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# -- DCMTK ------------------------------------------------------------------------------


# storescu proposes uncompressed syntaxes unless told which compressed one to propose;
# it cannot decompress JPEG 2000 itself, so each file is sent with its own syntax proposed.
_STORESCU_PROPOSAL: dict[str, str] = {
    str(JPEG2000Lossless): "-xv",
    str(JPEG2000): "-xw",
    str(JPEGBaseline8Bit): "-xy",
    str(JPEGExtended12Bit): "-xx",
    str(JPEGLosslessSV1): "-xs",
    str(JPEGLossless): "-xq",
    str(JPEGLSLossless): "-xt",
    str(JPEGLSNearLossless): "-xu",
    str(RLELossless): "-xr",
    str(DeflatedExplicitVRLittleEndian): "-xd",
}


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling_ae: str = "ORTHANC",
    called_ae: str = "CXR_PIPELINE",
    host: str = "127.0.0.1",
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK ``storescu``, each in its own transfer syntax (no transcoding).

    Files are grouped by transfer syntax, one ``storescu`` run (one association) per
    group, in order of first appearance; the result merges the runs (highest exit code).
    """
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_STORESCU_PROPOSAL.get(syntax, "-x="), []).append(Path(path))
    runs = []
    for proposal, group in groups.items():
        cmd = [
            "storescu", proposal, "--required", "-aet", calling_ae, "-aec", called_ae,
            "-to", "30", host, str(port), *[str(f) for f in group],
        ]  # fmt: skip
        runs.append(
            subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        )
    return subprocess.CompletedProcess(
        args=[r.args for r in runs],
        returncode=max((r.returncode for r in runs), default=0),
        stdout="".join(r.stdout for r in runs),
        stderr="".join(r.stderr for r in runs),
    )


def echoscu(
    port: int, *, calling_ae: str = "ORTHANC", called_ae: str = "CXR_PIPELINE"
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK ``echoscu``."""
    cmd = ["echoscu", "-aet", calling_ae, "-aec", called_ae, "-to", "20", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


# -- cxr-listen as a real process -------------------------------------------------------


@dataclass
class ListenerProcess:
    """A running ``cxr-listen`` subprocess."""

    port: int
    ae_title: str
    data_dir: Path
    process: subprocess.Popen[str]
    log_path: Path
    env: dict[str, str]

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def status(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """Run ``cxr-status`` on this listener's data dir."""
        return subprocess.run(
            [sys.executable, "-m", "listeners.status", "--data-dir", str(self.data_dir), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            env=self.env,
            check=False,
        )


def _listener_env(environment: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(environment)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Keep torch from competing with the rest of the machine's cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextmanager
def running_listener(
    data_dir: Path,
    *,
    environment: Mapping[str, str] | None = None,
    config: Path | None = None,
    ae_title: str = "CXR_PIPELINE",
    port: int | None = None,
    startup_timeout_s: float = 180.0,
    extra_args: Sequence[str] = (),
) -> Iterator[ListenerProcess]:
    """Start ``python -m listeners.storescp`` and wait for its ready line.

    Parameters
    ----------
    data_dir
        Its spool/ledger root.
    environment
        ``CXR_*`` variables (other ``CXR_*`` of the test process are dropped).
    config
        TOML settings file.
    ae_title, port
        Listener AE title and port (None: a free port).
    startup_timeout_s
        How long to wait for the ready line (the model loads first).
    extra_args
        More command-line options.
    """
    port = free_port() if port is None else port
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _listener_env(environment or {})
    cmd = [
        sys.executable,
        "-m",
        "listeners.storescp",
        "--port",
        str(port),
        "--ae-title",
        ae_title,
        "--host",
        "127.0.0.1",
        "--data-dir",
        str(data_dir),
        *extra_args,
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    log_path = data_dir / "listener.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=env
    )
    listener = ListenerProcess(
        port=port,
        ae_title=ae_title,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        env=env,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while "cxr-listen ready on port" not in listener.log_tail(400):
            if process.poll() is not None:
                raise RuntimeError(
                    f"cxr-listen exited with {process.returncode}:\n{listener.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"cxr-listen not ready in {startup_timeout_s} s")
            time.sleep(0.2)
        yield listener
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log_file.close()


def wait_until(predicate: Any, *, timeout_s: float = 120.0, interval_s: float = 0.5) -> bool:
    """Poll ``predicate()`` until it is truthy or the timeout passes; return the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return bool(result)
        time.sleep(interval_s)
