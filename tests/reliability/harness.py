"""Real processes and real peers for the reliability suite, and its accounting.

* :class:`Pacs`: a real Orthanc that can be stopped and started again on the same ports
  with the same storage (the "PACS down" fault).
* :func:`spawn_listener` / :func:`spawn_worker`: ``cxr-listen`` and ``cxr-worker`` as
  subprocesses that a test may ``kill -9`` and start again (logs are appended).
* :func:`send_raw`: a pynetdicom C-STORE of arbitrary encoded bytes under any command
  UIDs (hostile input that ``send_c_store`` would refuse to build).
* :class:`Tally`: the invariant of issue 6. Every instance answered Success ends with
  exactly one SR and one SC in the PACS, or with a ledger row in ``failed``/``skipped``
  that says why; nothing is lost, nothing is processed into two different results.
  Each scenario adds one row to :data:`REPORT_ROWS`, printed at the end of the run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as encode_body

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.ledger import JobRecord, JobState, Ledger
from tests.support.dicom_factory import load_png, make_dicom
from tests.support.orthanc import free_port, orthanc_config
from tests.support.services import REPO_ROOT, Service, clean_env, write_config

PHI_NAME = "Quillfeather^Zebulonia"
"""Distinctive patient name put in every generated DICOM: must never reach a log."""
PHI_ID = "RELPHI-7734219"
"""Distinctive patient ID put in every generated DICOM: must never reach a log."""
LISTENER_AE = "CXR_PIPELINE"
SENDER_AE = "MODALITY"

FINISHED_STATES = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)

REPORT_ROWS: list[dict[str, Any]] = []
"""One row per scenario run (see :meth:`Tally.evaluate`), printed by conftest."""


# -- generated chest radiographs -----------------------------------------------------


@lru_cache(maxsize=4)
def _pixels(paths: tuple[Path, ...], size: int) -> tuple[np.ndarray, ...]:
    return tuple(load_png(p, size=size) for p in paths)


def chest_datasets(
    pngs: Sequence[Path], count: int, *, size: int = 256, **attrs: Any
) -> list[Dataset]:
    """``count`` small CR chest radiographs from real NIH pixels, one study each.

    Every dataset carries :data:`PHI_NAME` / :data:`PHI_ID` and fresh UIDs.
    """
    pixels = _pixels(tuple(pngs[:8]), size)
    out = []
    for i in range(count):
        out.append(
            make_dicom(
                pixels[i % len(pixels)],
                modality="CR",
                PatientName=PHI_NAME,
                PatientID=PHI_ID,
                InstanceNumber=i + 1,
                **attrs,
            )
        )
    return out


def real_radiographs(files: Sequence[Path], count: int) -> list[Dataset]:
    """``count`` copies of real DICOM radiographs (cycled), each a new instance in a new study.

    Pixel data, transfer syntax and headers are the files' own; Study, Series and SOP
    Instance UIDs are fresh, and the patient is :data:`PHI_NAME` / :data:`PHI_ID`.
    """
    originals = [pydicom.dcmread(path) for path in files]
    out = []
    for i in range(count):
        ds = deepcopy(originals[i % len(originals)])
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = PHI_NAME
        ds.PatientID = PHI_ID
        out.append(ds)
    return out


def write_datasets(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write datasets as Part 10 files named by SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- Orthanc that can go down and come back ----------------------------------------------


class Pacs:
    """A real Orthanc on fixed ports and storage that can be stopped and restarted."""

    def __init__(self, workdir: Path, modalities: Mapping[str, tuple[str, str, int]]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        config = orthanc_config(
            workdir,
            http_port=self.http_port,
            dicom_port=self.dicom_port,
            ae_title="ORTHANC",
            modalities=modalities,
        )
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.rest_url = f"http://127.0.0.1:{self.http_port}"
        self.ae_title = "ORTHANC"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start Orthanc and wait until its REST API answers."""
        if self.process is not None and self.process.poll() is None:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["Orthanc", "--no-jobs", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.session.get(f"{self.rest_url}/system", timeout=5).raise_for_status()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def get(self, path: str) -> Any:
        response = self.session.get(f"{self.rest_url}{path}", timeout=60)
        response.raise_for_status()
        return response.json()

    def results_by_study(self) -> tuple[dict[str, Counter[str]], set[str]]:
        """Count SR and non-SR instances per Study Instance UID; also every SOP Instance UID.

        Three REST calls whatever the number of instances (Orthanc 1.10 has no
        ``RequestedTags`` in ``/tools/find``).
        """
        studies = {
            s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in self.get("/studies?expand")
        }
        counts: dict[str, Counter[str]] = {}
        for series in self.get("/series?expand"):
            kind = "SR" if series["MainDicomTags"].get("Modality") == "SR" else "SC"
            study = studies[series["ParentStudy"]]
            counts.setdefault(study, Counter())[kind] += len(series["Instances"])
        uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}
        return counts, uids


# -- cxr-listen / cxr-worker subprocesses ---------------------------------------------------


def service_config(
    path: Path,
    *,
    data_dir: Path,
    checkpoint: Path,
    pacs: Pacs,
    listen_port: int,
    broker: str | None = None,
    explain: str = "none",
    log_level: str = "INFO",
    listener: Mapping[str, Any] | None = None,
    send: Mapping[str, Any] | None = None,
    worker: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> Path:
    """Write the TOML settings shared by the listener and workers of one scenario.

    ``sections``: more sections as :func:`tests.support.services.write_config` takes them
    (e.g. ``{"metrics": {"port": 9101}}``).
    """
    worker_section: dict[str, Any] = {
        "concurrency": 1,
        "requeue_after_s": 1.0,
        "requeue_interval_s": 0.5,
        **(worker or {}),
    }
    if broker is not None:
        worker_section["broker_url"] = broker
    return write_config(
        path,
        {"data_dir": data_dir, "log_level": log_level},
        {
            "model": {"checkpoint": checkpoint, "device": "cpu", "batch_size": 8},
            "explain": {"method": explain},
            "listener": {
                "host": "127.0.0.1",
                "port": listen_port,
                "min_free_bytes": 0,
                **(listener or {}),
            },
            "worker": worker_section,
            "send": {
                "max_attempts": 4,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 1.0,
                "timeout_s": 10.0,
                **(send or {}),
            },
            "send.destinations": [
                {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            **(sections or {}),
        },
    )


def _env() -> dict[str, str]:
    env = clean_env()
    env["OMP_NUM_THREADS"] = "1"  # a 2-core machine shared with others
    return env


def _spawn(
    name: str, argv: Sequence[str], log_path: Path, *, prefix: Sequence[str] = ()
) -> Service:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*prefix, sys.executable, *argv],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # kill -9 of the group reaches Celery's children too
        )
    return Service(name=name, process=process, log_path=log_path)


def wait_log_count(path: Path, text: str, count: int, timeout_s: float) -> None:
    """Wait until ``text`` stands at least ``count`` times in the log file ``path``."""
    deadline = time.monotonic() + timeout_s
    while path.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not logged"
        time.sleep(0.2)


def _wait_text(service: Service, text: str, start: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in service.log_text()[start:]:
            return
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"{service.name}: {text!r} not logged:\n{service.log_tail()}")


def _log_size(path: Path) -> int:
    try:
        return len(path.read_text(errors="replace"))
    except OSError:
        return 0


def spawn_listener(
    config: Path, port: int, log_path: Path, *, broker: str | None = None
) -> Service:
    """Start ``cxr-listen`` and wait for its ready line."""
    argv = ["-m", "listeners.storescp", "--config", str(config), "--port", str(port)]
    if broker:
        argv += ["--broker", broker]
    start = _log_size(log_path)
    service = _spawn("cxr-listen", argv, log_path)
    try:
        _wait_text(service, "cxr-listen ready on port", start, 240)
    except BaseException:
        stop(service)
        raise
    return service


ISOLATED_LINE = "isolated worker: the listener's data folder shows {} entries"


def isolation_prefix(hidden: Path) -> list[str]:
    """Command prefix running a process where ``hidden`` is an empty tmpfs.

    ``unshare --mount`` gives the process its own mount namespace (private propagation, so
    nothing leaks back) and mounts an empty tmpfs over ``hidden``: the worker cannot see the
    listener's spool or ledger at all. Needs root or user namespaces; skips with the reason
    where the kernel refuses it.
    """
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.strip()}")
    count = '$(ls -A "$0" | wc -l)'
    script = (
        'mount -t tmpfs -o size=1m,mode=700 cxr-hidden "$0" && '
        'echo "' + ISOLATED_LINE.format(count) + '" && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hidden)]


def spawn_worker(
    config: Path,
    log_path: Path,
    *,
    pool: str = "solo",
    hostname: str | None = None,
    hide: Path | None = None,
) -> Service:
    """Start ``cxr-worker`` and wait until Celery says it is ready.

    ``hide``: run it under :func:`isolation_prefix` (that folder, the listener's data
    folder, covered by an empty tmpfs), and check it saw the folder empty.
    """
    argv = ["-m", "workers.celery_app", "--config", str(config), "--pool", pool]
    argv += ["--concurrency", "1"]
    if hostname:
        argv += ["--hostname", hostname]
    start = _log_size(log_path)
    prefix = [] if hide is None else isolation_prefix(hide)
    service = _spawn("cxr-worker", argv, log_path, prefix=prefix)
    if hide is not None:
        try:
            _wait_text(service, ISOLATED_LINE.format(0), start, 60)
        except BaseException:
            stop(service)
            raise
    try:
        _wait_text(service, "ready.", start, 240)
    except BaseException:
        stop(service)
        raise
    return service


def kill9(service: Service) -> None:
    """``kill -9`` the service's whole process group (no clean-up of any kind)."""
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=30)


def stop(service: Service) -> None:
    """SIGTERM, then SIGKILL of the group after 30 s."""
    if service.process.poll() is None:
        service.process.terminate()
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill9(service)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from ``/proc/<pid>/status``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


# -- a C-STORE SCU that sends what it is given ------------------------------------------------


def scu(calling_ae: str = SENDER_AE, *, timeout_s: float = 30.0) -> AE:
    """A pynetdicom SCU proposing every storage class in the uncompressed syntaxes."""
    ae = AE(ae_title=calling_ae)
    for cx in StoragePresentationContexts:
        ae.add_requested_context(
            str(cx.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def associate(port: int, calling_ae: str = SENDER_AE) -> Association:
    """Open an association with the listener (asserting it is established)."""
    assoc = scu(calling_ae).associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        raise ConnectionError(f"association with 127.0.0.1:{port} not established")
    return assoc


def body_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set (no file meta) encoded as it travels in P-DATA."""
    tsyntax = UID(syntax)
    encoded = encode_body(ds, tsyntax.is_implicit_VR, tsyntax.is_little_endian, False)
    if encoded is None:
        raise ValueError("dataset cannot be encoded")
    return bytes(encoded)


def send_raw(
    assoc: Association,
    sop_class: str,
    sop_instance: str,
    payload: bytes,
    syntax: str = ExplicitVRLittleEndian,
) -> int | None:
    """C-STORE ``payload`` as the data set, with the given command UIDs.

    Mirrors ``Association.send_c_store`` (which needs a decodable dataset) but puts the
    bytes on the wire unchanged. Returns the response status, or None when no response
    came (timeout, or the peer aborted).
    """
    context = assoc._get_valid_context(UID(sop_class), UID(syntax), "scu", allow_conversion=False)
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    try:
        req.AffectedSOPInstanceUID = sop_instance
    except ValueError:  # pynetdicom refuses to build some invalid UIDs: put it there anyway
        req._affected_sop_instance_uid = UID(sop_instance)
    req.DataSet = io.BytesIO(payload)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, int(context.context_id or 0))
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    status = getattr(rsp, "Status", None)
    return None if status is None else int(status)


def send_datasets(port: int, datasets: Sequence[Dataset]) -> dict[str, int | None]:
    """Send datasets over one association; SOP Instance UID -> status (None: no answer)."""
    statuses: dict[str, int | None] = {}
    assoc = associate(port)
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                statuses[uid] = None
                continue
            status = assoc.send_c_store(ds)
            statuses[uid] = int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


# -- the invariant ------------------------------------------------------------------------------


def wait_finished(
    ledger: Ledger, uids: Iterable[str], *, timeout_s: float = 240.0
) -> dict[str, JobRecord | None]:
    """Poll the ledger until every UID's row is DONE, SKIPPED or FAILED (or timeout)."""
    wanted = list(uids)
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {uid: ledger.get(uid) for uid in wanted}
        if all(r is not None and r.state in FINISHED_STATES for r in rows.values()):
            return rows
        if time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


@dataclass
class Tally:
    """What one scenario sent and what became of it."""

    scenario: str
    studies: dict[str, str] = field(default_factory=dict)
    """SOP Instance UID of each sent source -> its Study Instance UID."""
    statuses: dict[str, int | None] = field(default_factory=dict)
    """Last C-STORE status per source (None: never answered)."""

    def sent(self, datasets: Iterable[Dataset]) -> None:
        for ds in datasets:
            self.studies[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)

    def answered(self, statuses: Mapping[str, int | None]) -> None:
        """Record responses; a later Success wins over an earlier failure (a re-send)."""
        for uid, status in statuses.items():
            if self.statuses.get(uid) != DimseStatus.SUCCESS:
                self.statuses[uid] = status

    @property
    def acknowledged(self) -> list[str]:
        return sorted(u for u, s in self.statuses.items() if s == DimseStatus.SUCCESS)

    def evaluate(self, ledger: Ledger, pacs: Pacs, *, label: str | None = None) -> dict[str, Any]:
        """Check the invariant against the ledger and the PACS; record and return the row.

        ``label`` names an intermediate snapshot (default: the scenario's name).
        """
        counts, stored = pacs.results_by_study()
        delivered, failed, lost, duplicates = [], [], [], []
        for uid in self.acknowledged:
            row = ledger.get(uid)
            study = counts.get(self.studies.get(uid, ""), Counter())
            if study["SR"] > 1 or study["SC"] > 1:
                duplicates.append(uid)
            if (
                row is not None
                and row.state is JobState.DONE
                and study["SR"] >= 1
                and study["SC"] >= 1
                and len(row.result_uids) == 2
                and set(row.result_uids) <= stored
            ):
                delivered.append(uid)
            elif (
                row is not None and row.state in (JobState.FAILED, JobState.SKIPPED) and row.reason
            ):
                failed.append(uid)
            else:
                lost.append(uid)
        result = {
            "scenario": label or self.scenario,
            "sent": len(self.studies),
            "acknowledged": len(self.acknowledged),
            "delivered": len(delivered),
            "failed_with_reason": len(failed),
            "lost": len(lost),
            "duplicates": len(duplicates),
            "lost_uids": lost,
            "duplicate_uids": duplicates,
        }
        REPORT_ROWS.append(result)
        return result


def assert_no_phi(*logs: Path) -> None:
    """The distinctive patient name and ID of the generated DICOMs appear in no log."""
    needles = [PHI_NAME, PHI_ID, *PHI_NAME.split("^")]
    for path in logs:
        text = path.read_text(errors="replace")
        for needle in needles:
            assert needle not in text, f"{needle!r} leaked into {path.name}"


def fresh_uid() -> str:
    return str(generate_uid())


def read_part10(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)
