"""``scripts/containers-test [DICOM_DIR]``: the container stack, built and run for real.

1. Builds a Debian 12 base with ``debootstrap`` (Docker Hub is not needed), then the images of
   ``docker/`` on it with podman: CPU, GPU (built, not run: no GPU here), OHIF, and the local
   stand-ins for the official Redis and Orthanc images (``docker/local/``). podman's layer
   cache and the kept base make a second run quick.
2. Starts ``docker/compose.yaml`` with the override ``docker/compose.local.yaml`` under
   podman-compose: redis, orthanc (Lua auto-routing), listener, worker (no volume), ohif.
3. C-STOREs the DICOM files into the Orthanc container, checks that auto-routing brought
   every one to the listener, kills the worker container in the middle of a job (SIGKILL),
   starts it again, and checks that each file's SR and heatmap SC came back into its study
   in Orthanc: exactly one of each, referencing it.
4. Checks OHIF's page and ``/dicom-web`` through the ohif container, and every container's
   health check; then stops everything and removes the containers, volumes and network.

Exit status 0 when every check passed. Without ``DICOM_DIR``: the real radiographs of the
shared data folder (``$CXR_DATASET_DIR/dicom``) and pydicom-data's chest CR, one file per
SOP Instance UID. Needs root (debootstrap, rootful podman). Settings (environment):

``CXR_CONTAINERS_CACHE``     working folder (default ``~/.cache/cxr-pipeline/containers``)
``CXR_CONTAINERS_COLD=1``    remove the base, the images and the build cache first
``CXR_CONTAINERS_GPU=0``     do not build the GPU image
``CXR_CONTAINERS_KEEP=1``    leave the stack running at the end
``CXR_CONTAINERS_TORCH_INDEX_URL``  torch index of the CPU image (default: the Dockerfile's,
                             PyTorch's CPU wheels, where reachable; else pip's own index)
``CXR_DEBIAN_MIRROR``        debootstrap mirror (default http://deb.debian.org/debian)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from tests.containers.host_config import BuildConfig, prepare
from tests.support.dicom_network import storescu
from tests.support.orthanc import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PREFIX = "cxr-ctest-"
"""Compose project names: this prefix and the process id, so that runs never collide."""
BASE_IMAGE = "localhost/cxr-base:bookworm"
LOCAL_IMAGES = {
    "localhost/cxr-local/redis:bookworm": "docker/local/Dockerfile.redis",
    "localhost/cxr-local/orthanc:bookworm": "docker/local/Dockerfile.orthanc",
    "localhost/cxr-local/node:bookworm": "docker/local/Dockerfile.node",
}
CPU_IMAGE = "localhost/cxr-pipeline:cpu"
GPU_IMAGE = "localhost/cxr-pipeline:gpu"
OHIF_IMAGE = "localhost/cxr-pipeline:ohif"
SERVICES = ("redis", "orthanc", "listener", "worker", "ohif")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
CALLING_AE = "CXR_CTEST"
LEASE_PATTERN = "cxr:lease:*"

# Official Debian slim images keep documentation and translations out; so does the base here.
_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
_APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
"""
_DEBIAN_SOURCES = """\
Types: deb
URIs: {mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {security}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class StackError(RuntimeError):
    """A check failed; the message says which and what was seen."""


@dataclass
class Clock:
    """Elapsed-time stamps for the transcript, and named durations for the summary."""

    start: float = field(default_factory=time.monotonic)
    spans: dict[str, float] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f} s] {message}", flush=True)

    def span(self, name: str, since: float) -> float:
        took = time.monotonic() - since
        self.spans[name] = self.spans.get(name, 0.0) + took
        return took


@dataclass
class SentFile:
    """One DICOM file sent to the PACS."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    modality: str
    transfer_syntax: str


def _run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to ``log`` (appended) or is captured."""
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            result = subprocess.run(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=dict(env) if env is not None else None,
                timeout=timeout,
                check=False,
            )
        result = subprocess.CompletedProcess(result.args, result.returncode, "", "")
    else:
        result = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
    if check and result.returncode != 0:
        tail = _tail(log) if log is not None else (result.stdout + result.stderr)[-3000:]
        raise StackError(f"{' '.join(cmd)} failed ({result.returncode}):\n{tail}")
    return result


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _image_exists(name: str) -> bool:
    return _run(["podman", "image", "exists", name], check=False).returncode == 0


def _image_size(name: str) -> int:
    out = _run(["podman", "image", "inspect", "--format", "{{.Size}}", name]).stdout
    return int(out.strip())


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- preflight


def preflight() -> None:
    """The tools the test needs, and a working podman."""
    missing = [t for t in ("podman", "podman-compose", "debootstrap") if not shutil.which(t)]
    if missing:
        raise StackError(f"missing {', '.join(missing)}: run ./scripts/setup")
    if not shutil.which("storescu"):
        raise StackError("DCMTK's storescu is missing: run ./scripts/setup")
    if os.geteuid() != 0:
        raise StackError("run as root: debootstrap and rootful podman need it")
    _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"])


# ----------------------------------------------------------------------------- images


def ensure_base(clock: Clock, work: Path) -> None:
    """``localhost/cxr-base:bookworm`` from debootstrap, kept between runs (the build cache
    of every image starts from it)."""
    if _image_exists(BASE_IMAGE):
        clock.say(f"base {BASE_IMAGE}: kept from an earlier run")
        return
    since = time.monotonic()
    mirror = os.environ.get("CXR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    security = mirror.rstrip("/").rsplit("/", 1)[0] + "/debian-security"
    with tempfile.TemporaryDirectory(dir=work, prefix="debootstrap-") as tmp:
        root = Path(tmp) / "root"
        log = work / "debootstrap.log"
        log.write_text("")
        _run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), mirror],
            log=log,
            timeout=1200,
        )
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(
            _DEBIAN_SOURCES.format(mirror=mirror, security=security)
        )
        (root / "etc/dpkg/dpkg.cfg.d/slim-excludes").write_text(_DPKG_EXCLUDES)
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(_APT_CLEAN)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["podman", "import", "--change", 'CMD ["bash"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise StackError(f"podman import failed: {imported.stderr[-2000:]}")
    took = clock.span("base", since)
    clock.say(
        f"base {BASE_IMAGE}: debootstrap + import in {took:.0f} s ({_gb(_image_size(BASE_IMAGE))})"
    )


def torch_index_url() -> str:
    """The CPU image's torch index: PyTorch's CPU wheels where reachable, else pip's own."""
    forced = os.environ.get("CXR_CONTAINERS_TORCH_INDEX_URL")
    if forced is not None:
        return forced
    try:
        with urllib.request.urlopen(f"{CPU_TORCH_INDEX}/torch/", timeout=15) as response:
            if response.status == 200:
                return CPU_TORCH_INDEX
    except (OSError, urllib.error.URLError):
        pass
    return ""


def build(
    clock: Clock,
    work: Path,
    tag: str,
    dockerfile: str,
    args: Mapping[str, str],
    host: BuildConfig | None = None,
    host_args: Sequence[str] = (),
) -> None:
    """``podman build`` with the layer cache; docker format keeps the HEALTHCHECK."""
    since = time.monotonic()
    log = work / "logs" / f"build-{tag.rsplit('/', 1)[-1].replace(':', '-')}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    cmd = ["podman", "build", "--format", "docker", "--layers", "-f", dockerfile, "-t", tag]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if host is not None:
        for mount in host.mounts:
            cmd += ["-v", mount]
        for key in host_args:
            if key in host.build_args:
                cmd += ["--build-arg", f"{key}={host.build_args[key]}"]
    cmd.append(str(REPO_ROOT))
    _run(cmd, log=log, timeout=3600)
    text = log.read_text(errors="replace")
    steps = len(re.findall(r"STEP \d+/\d+", text))
    cached = text.count("--> Using cache")
    took = clock.span("build", since)
    clock.say(
        f"image {tag}: {_gb(_image_size(tag))}, built in {took:.0f} s "
        f"({cached} of the steps from cache; {steps} steps; log {log})"
    )


def build_images(clock: Clock, work: Path, gpu: bool) -> dict[str, int]:
    """Every image of the test, on the local base; returns their sizes."""
    host = prepare(work / "host-config")
    for note in host.notes:
        clock.say(f"build configuration: {note}")
    base = {"BASE": BASE_IMAGE}
    for tag, dockerfile in LOCAL_IMAGES.items():
        build(clock, work, tag, dockerfile, base)
    index = torch_index_url()
    if index:
        clock.say(f"torch for the CPU image from {index} (the Dockerfile's default)")
    else:
        clock.say(
            f"{CPU_TORCH_INDEX} is not reachable from here: the CPU image takes torch from "
            "pip's own index, as scripts/setup does (PyPI's torch: the CUDA build)"
        )
    pip_args = ("PIP_CONFIG_FILE",)
    build(
        clock,
        work,
        CPU_IMAGE,
        "docker/Dockerfile.cpu",
        {**base, "TORCH_INDEX_URL": index},
        host,
        pip_args,
    )
    if gpu:
        build(clock, work, GPU_IMAGE, "docker/Dockerfile.gpu", base, host, pip_args)
    build(
        clock,
        work,
        OHIF_IMAGE,
        "docker/Dockerfile.ohif",
        {**base, "NODE_BASE": "localhost/cxr-local/node:bookworm"},
        host,
        ("NPM_CONFIG_USERCONFIG",),
    )
    tags = [*LOCAL_IMAGES, CPU_IMAGE, *([GPU_IMAGE] if gpu else []), OHIF_IMAGE]
    # Layers of earlier builds that no tagged image uses any more (an old dependency layer
    # is 0.8 GB): without this the store grows with every change.
    _run(["podman", "image", "prune", "-f"], check=False)
    return {tag: _image_size(tag) for tag in [BASE_IMAGE, *tags]}


def forget_images(clock: Clock) -> None:
    """A cold start: the base, the images and every cached layer go."""
    for tag in [GPU_IMAGE, CPU_IMAGE, OHIF_IMAGE, *LOCAL_IMAGES, BASE_IMAGE]:
        if _image_exists(tag):
            _run(["podman", "rmi", "-f", tag], check=False)
    _run(["podman", "image", "prune", "-a", "-f"], check=False)
    clock.say("cold start: base, images and cached layers removed")


# ----------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """The compose project under podman-compose."""

    work: Path
    ports: dict[str, int]
    project: str = field(default_factory=lambda: f"{PROJECT_PREFIX}{os.getpid()}")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({name: str(port) for name, port in self.ports.items()})
        return env

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman-compose",
            "-p",
            self.project,
            "-f",
            str(REPO_ROOT / "docker/compose.yaml"),
            "-f",
            str(REPO_ROOT / "docker/compose.local.yaml"),
            *args,
        ]
        return _run(cmd, env=self.env, check=check, log=self.work / "logs" / "compose.log")

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *cmd: str, check: bool = True) -> str:
        return _run(["podman", "exec", self.container(service), *cmd], check=check).stdout

    def http(self, port_name: str, path: str, *, timeout: float = 15) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.ports[port_name]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def orthanc(self, path: str, body: bytes | None = None) -> Any:
        url = f"http://127.0.0.1:{self.ports['ORTHANC_HTTP_PORT']}{path}"
        request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        return data if path.endswith("/file") else json.loads(data)

    def ledger(self) -> dict[str, dict[str, Any]]:
        out = self.exec("listener", "cxr-status", "--json", "--limit", "100000")
        return {row["sop_instance_uid"]: row for row in json.loads(out)["recent"]}

    def leases(self) -> list[str]:
        out = self.exec("redis", "redis-cli", "--scan", "--pattern", LEASE_PATTERN, check=False)
        return [line for line in out.split() if line]

    def env_of(self, service: str) -> dict[str, str]:
        out = _run(
            ["podman", "inspect", "--format", "{{json .Config.Env}}", self.container(service)]
        ).stdout
        return dict(item.partition("=")[::2] for item in json.loads(out))

    def mounts_of(self, service: str) -> list[str]:
        out = _run(
            ["podman", "inspect", "--format", "{{json .Mounts}}", self.container(service)]
        ).stdout
        return [f"{m.get('Name') or m.get('Source')}:{m['Destination']}" for m in json.loads(out)]

    def healthy(self, service: str) -> bool:
        result = _run(["podman", "healthcheck", "run", self.container(service)], check=False)
        return result.returncode == 0

    def remove(self) -> None:
        """Containers, volumes and the network of the project, whatever state they are in."""
        self.compose("down", "-v", "-t", "10", check=False)
        label = f"label=io.podman.compose.project={self.project}"
        for kind in ("container", "volume", "network"):
            listed = _run(["podman", kind, "ls", "-q", "--filter", label], check=False)
            names = listed.stdout.split()
            if names:
                _run(["podman", kind, "rm", "-f", *names], check=False)
        for volume in ("redis-data", "orthanc-db", "cxr-data"):
            _run(["podman", "volume", "rm", "-f", f"{self.project}_{volume}"], check=False)
        _run(["podman", "network", "rm", "-f", f"{self.project}_default"], check=False)

    def logs(self, lines: int = 40) -> str:
        parts = []
        for service in SERVICES:
            out = _run(
                ["podman", "logs", "--tail", str(lines), self.container(service)], check=False
            )
            parts.append(f"--- {service} ---\n{out.stdout}{out.stderr}")
        return "\n".join(parts)


def remove_stale_projects(clock: Clock, work: Path) -> None:
    """Remove what interrupted runs left (their process is gone); running ones are kept."""
    names: set[str] = set()
    for kind in ("ps", "volume", "network"):
        cmd = ["podman", kind, "ls", "--format", "{{.Name}}"]
        if kind == "ps":
            cmd = ["podman", "ps", "-a", "--format", "{{.Names}}"]
        listed = _run(cmd, check=False).stdout.split()
        names.update(n.split("_", 1)[0] for n in listed if n.startswith(PROJECT_PREFIX))
    for project in sorted(names):
        pid = project.removeprefix(PROJECT_PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            Stack(work=work, ports={}, project=project).remove()
            clock.say(f"removed the leftovers of an interrupted run ({project})")


def _ok(answer: tuple[int, bytes]) -> tuple[int, bytes] | None:
    return answer if answer[0] == 200 else None


def wait_for(what: str, predicate: Any, timeout_s: float, interval_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# ----------------------------------------------------------------------------- DICOM


def _dicom_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.upper() != "DICOMDIR":
            yield path


def default_sources() -> list[Path]:
    """The shared real radiographs and pydicom-data's chest CR (never copied)."""
    dataset = os.environ.get("CXR_DATASET_DIR") or str(REPO_ROOT.parent / "shared/data/cxr")
    files = list(_dicom_files(Path(dataset) / "dicom")) if Path(dataset).is_dir() else []
    try:
        from pydicom.data import get_testdata_files

        with warnings.catch_warnings():  # pydicom also tries its own download list: no network
            warnings.simplefilter("ignore")
            files += sorted(Path(p) for p in get_testdata_files("RG1_*.dcm"))
    except (ImportError, ValueError):
        pass
    return files


def read_sources(paths: Sequence[Path], clock: Clock) -> list[SentFile]:
    """One entry per SOP Instance UID (a second file with the same UID is the same instance
    to a PACS: it is left out, and said so)."""
    seen: dict[str, SentFile] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            clock.say(f"  {path.name}: not sent ({type(exc).__name__}: not a DICOM instance)")
            continue
        if uid in seen:
            clock.say(f"  {path.name}: same SOP Instance UID as {seen[uid].path.name}, left out")
            continue
        seen[uid] = SentFile(
            path=path,
            sop_instance_uid=uid,
            study_instance_uid=str(ds.StudyInstanceUID),
            modality=str(ds.get("Modality", "")),
            transfer_syntax=ds.file_meta.TransferSyntaxUID.name,
        )
    return list(seen.values())


def _references(ds: pydicom.Dataset, uid: str) -> bool:
    return any(elem.VR == "UI" and elem.value == uid for elem in ds.iterall()) and (
        str(ds.SOPInstanceUID) != uid
    )


def results_in_orthanc(stack: Stack, sent: SentFile) -> dict[str, list[str]]:
    """SR and SC instances in the source's study (in Orthanc) that reference the source."""
    study = stack.orthanc(
        "/tools/find",
        json.dumps(
            {
                "Level": "Study",
                "Query": {"StudyInstanceUID": sent.study_instance_uid},
                "Expand": True,
            }
        ).encode(),
    )
    found: dict[str, list[str]] = {"SR": [], "SC": []}
    if not study:
        return found
    for series_id in study[0]["Series"]:
        series = stack.orthanc(f"/series/{series_id}")
        for instance_id in series["Instances"]:
            sop_class = stack.orthanc(f"/instances/{instance_id}/metadata?expand").get(
                "SopClassUid", ""
            )
            kind = (
                "SR"
                if sop_class.startswith(SR_CLASS_PREFIX)
                else "SC"
                if sop_class.startswith(SC_CLASS_PREFIX)
                else None
            )
            if kind is None:
                continue
            raw = stack.orthanc(f"/instances/{instance_id}/file")
            ds = pydicom.dcmread(io.BytesIO(raw))
            if _references(ds, sent.sop_instance_uid):
                found[kind].append(str(ds.SOPInstanceUID))
    return found


# ----------------------------------------------------------------------------- the run


def run_stack(clock: Clock, work: Path, sources: list[SentFile]) -> dict[str, Any]:
    """Start the stack, send, kill the worker mid-job, check results, OHIF and health."""
    ports = {
        name: free_port()
        for name in ("ORTHANC_DICOM_PORT", "ORTHANC_HTTP_PORT", "OHIF_PORT", "LISTENER_DICOM_PORT")
    }
    stack = Stack(work=work, ports=ports)
    report: dict[str, Any] = {"ports": ports}
    remove_stale_projects(clock, work)
    since = time.monotonic()
    try:
        stack.compose("up", "-d", "--no-build", *SERVICES)
        clock.say(f"compose up: {', '.join(SERVICES)} (project {stack.project}; ports {ports})")
        wait_for(
            "Orthanc's REST API", lambda: stack.http("ORTHANC_HTTP_PORT", "/system")[0] == 200, 180
        )
        wait_for(
            "the listener's /healthz (image HEALTHCHECK)", lambda: stack.healthy("listener"), 300, 2
        )
        wait_for(
            "the worker's /healthz (image HEALTHCHECK)", lambda: stack.healthy("worker"), 300, 2
        )
        wait_for("redis' health check (compose)", lambda: stack.healthy("redis"), 60)
        clock.say("up and healthy: orthanc answers, listener, worker and redis health checks pass")
        listener_mounts, worker_mounts = stack.mounts_of("listener"), stack.mounts_of("worker")
        if worker_mounts or f"{stack.project}_cxr-data:/var/lib/cxr" not in listener_mounts:
            raise StackError(f"volumes: listener {listener_mounts}, worker {worker_mounts}")
        clock.say(f"volumes: listener {listener_mounts}; worker none (it shares only Redis)")
        report["startup_s"] = clock.span("startup", since)

        # The worker is stopped while the images arrive, so that every job is still queued
        # when it starts and the kill below lands in the middle of one, however few files.
        _run(["podman", "stop", "-t", "30", stack.container("worker")])
        since = time.monotonic()
        files = [s.path for s in sources]
        sent = storescu(
            ports["ORTHANC_DICOM_PORT"], files, calling_ae=CALLING_AE, called_ae="ORTHANC"
        )
        if sent.returncode != 0:
            raise StackError(f"storescu to Orthanc failed:\n{sent.stdout}\n{sent.stderr}")
        for s in sources:
            clock.say(
                f"  C-STORE -> orthanc: {s.path.name} ({s.modality}, {s.transfer_syntax})"
                f" {s.sop_instance_uid}"
            )
        uids = [s.sop_instance_uid for s in sources]
        rows = wait_for(
            "auto-routing to bring every file to the listener",
            lambda: (ledger := stack.ledger()) and all(u in ledger for u in uids) and ledger,
            180,
            2,
        )
        clock.say(
            f"auto-routed: the listener's ledger has all {len(uids)} "
            f"({sorted({rows[u]['state'] for u in uids})}), calling AE "
            f"{sorted({rows[u]['calling_ae'] for u in uids})}"
        )

        _run(["podman", "start", stack.container("worker")])
        wait_for("the worker to take a job (a lease in Redis)", stack.leases, 300, 0.2)
        _run(["podman", "kill", "--signal", "KILL", stack.container("worker")])
        at_kill = stack.ledger()
        unfinished = [u for u in uids if at_kill[u]["state"] != "done"]
        clock.say(
            f"worker container killed (SIGKILL) holding a job: {len(unfinished)} of "
            f"{len(uids)} not done at the kill "
            f"({sorted(at_kill[u]['state'] for u in uids)})"
        )
        if not unfinished:
            # Possible only when the worker finishes its whole micro-batch within the moment
            # between the lease showing up and the kill (one small file on a fast machine):
            # said plainly, and the rest of the checks still run.
            clock.say("NOTE: the worker had finished every job before the kill landed")
        report["unfinished_at_kill"] = len(unfinished)
        # A dead worker's unacknowledged tasks become visible again visibility_timeout_s
        # after its last lease renewal, and kombu looks for them when a worker starts (then
        # only every 100 s). Restarting after that, as a supervisor with a back-off would,
        # keeps the test short; restarting at once works too, about 100 s slower.
        visibility = float(stack.env_of("worker").get("CXR_WORKER__VISIBILITY_TIMEOUT_S", 0))
        time.sleep(visibility + 3)
        _run(["podman", "start", stack.container("worker")])
        clock.say(
            f"worker container started again ({visibility + 3:.0f} s after the kill: "
            "the visibility timeout of compose.local.yaml)"
        )
        done = wait_for(
            "every job to finish after the kill",
            lambda: (
                (ledger := stack.ledger())
                and all(ledger[u]["state"] in ("done", "failed", "skipped") for u in uids)
                and ledger
            ),
            900,
            3,
        )
        states = {u: done[u]["state"] for u in uids}
        if set(states.values()) != {"done"}:
            raise StackError(f"not every job is done: {states}")
        attempts = {u: done[u]["attempts"] for u in uids}
        clock.say(
            f"all {len(uids)} jobs done; attempts per job {sorted(attempts.values())} "
            f"(a job the kill interrupted runs again)"
        )
        report["attempts"] = attempts

        # Results in the PACS: one SR and one SC per file, in the file's own study.
        found: dict[str, dict[str, list[str]]] = {}

        def complete() -> bool:
            for s in sources:
                found[s.sop_instance_uid] = results_in_orthanc(stack, s)
            return all(len(f["SR"]) >= 1 and len(f["SC"]) >= 1 for f in found.values())

        wait_for("SR and SC of every file in Orthanc", complete, 300, 3)
        problems = []
        for s in sources:
            f = found[s.sop_instance_uid]
            ledger_uids = set(done[s.sop_instance_uid]["result_uids"])
            clock.say(f"  {s.path.name}: SR {f['SR']} SC {f['SC']} in study {s.study_instance_uid}")
            if len(f["SR"]) != 1 or len(f["SC"]) != 1:
                problems.append(f"{s.path.name}: {len(f['SR'])} SR, {len(f['SC'])} SC")
            elif ledger_uids != {*f["SR"], *f["SC"]}:
                problems.append(f"{s.path.name}: Orthanc has {f}, the ledger {ledger_uids}")
        if problems:
            raise StackError("results in Orthanc: " + "; ".join(problems))
        clock.say(
            f"results: one SR and one SC per file ({len(sources)} files) in each file's "
            "study in Orthanc, referencing it; the ledger names the same UIDs"
        )
        report["results"] = {s.path.name: found[s.sop_instance_uid] for s in sources}
        report["pipeline_s"] = clock.span("pipeline", since)

        # OHIF and DICOMweb through the ohif container.
        status, page = wait_for("OHIF's page", lambda: _ok(stack.http("OHIF_PORT", "/")), 120)
        if b"<title>OHIF Viewer</title>" not in page:
            raise StackError(f"OHIF's page: {page[:200]!r}")
        study = sources[0].study_instance_uid
        status, body = stack.http("OHIF_PORT", f"/dicom-web/studies/{study}/series")
        if status != 200:
            raise StackError(f"/dicom-web/studies/{study}/series through ohif: HTTP {status}")
        modalities = sorted(
            str(s.get("00080060", {}).get("Value", ["?"])[0]) for s in json.loads(body)
        )
        if "SR" not in modalities:
            raise StackError(f"DICOMweb series of {study}: {modalities}, no SR")
        clock.say(
            f"ohif: page answers (OHIF Viewer); /dicom-web/studies/{study}/series "
            f"through it lists {modalities}"
        )
        for service in ("listener", "worker", "redis", "ohif"):
            if not stack.healthy(service):
                raise StackError(f"{service}: health check fails at the end")
        clock.say("health checks at the end: listener, worker, redis, ohif healthy")
        return report
    except BaseException:
        print(stack.logs(), file=sys.stderr, flush=True)
        raise
    finally:
        if os.environ.get("CXR_CONTAINERS_KEEP") == "1":
            clock.say(
                f"stack left running (CXR_CONTAINERS_KEEP=1): podman-compose -p {stack.project}"
            )
        else:
            since = time.monotonic()
            stack.remove()
            clock.span("teardown", since)
            left = _run(
                [
                    "podman",
                    "ps",
                    "-a",
                    "-q",
                    "--filter",
                    f"label=io.podman.compose.project={stack.project}",
                ],
                check=False,
            )
            clock.say(
                "stopped and removed: containers, volumes, network"
                + ("" if not left.stdout.strip() else f" (left: {left.stdout.split()})")
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="containers-test", description=__doc__.splitlines()[0])
    parser.add_argument("dicom_dir", nargs="?", type=Path, help="DICOM files to send")
    args = parser.parse_args(argv)
    clock = Clock()
    work = Path(
        os.environ.get("CXR_CONTAINERS_CACHE") or Path.home() / ".cache/cxr-pipeline/containers"
    )
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    try:
        preflight()
        paths = list(_dicom_files(args.dicom_dir)) if args.dicom_dir else default_sources()
        sources = read_sources(paths, clock)
        if not sources:
            raise StackError(f"no DICOM files in {args.dicom_dir or 'the default folders'}")
        clock.say(f"{len(sources)} DICOM files to send")
        if os.environ.get("CXR_CONTAINERS_COLD") == "1":
            forget_images(clock)
        ensure_base(clock, work)
        sizes = build_images(clock, work, gpu=os.environ.get("CXR_CONTAINERS_GPU", "1") != "0")
        run_stack(clock, work, sources)
    except StackError as exc:
        clock.say(f"FAILED: {exc}")
        return 1
    total = time.monotonic() - clock.start
    clock.say("image sizes: " + ", ".join(f"{t} {_gb(s)}" for t, s in sizes.items()))
    clock.say(
        "times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in clock.spans.items())
        + f"; total {total:.0f} s"
    )
    with (work / "timings.jsonl").open("a") as out:
        out.write(
            json.dumps(
                {
                    "at": time.time(),
                    "total_s": round(total, 1),
                    **{k: round(v, 1) for k, v in clock.spans.items()},
                    "files": len(sources),
                }
            )
            + "\n"
        )
    clock.say(f"PASSED: {len(sources)} files, one SR + one SC each, worker kill survived")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
