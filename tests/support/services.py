"""Start ``cxr-listen`` and ``cxr-worker`` as real subprocesses for tests and benchmarks.

Both run from the repository with the venv's Python (``python -m listeners.storescp`` and
``python -m workers.celery_app``), configured by one TOML file passed as ``--config``.
``CXR_*`` variables of the calling environment are removed so that, e.g., a
``CXR_DATA_DIR`` of the calling shell never becomes the service's ``data_dir``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int, float, Path or list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(path: Path, top: Mapping[str, Any], sections: Mapping[str, Any]) -> Path:
    """Write a settings TOML file.

    ``sections`` maps a section name to a dict of scalars, or to a list of dicts (written
    as an array of tables, e.g. ``"send.destinations"``).
    """
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"\n[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def clean_env() -> dict[str, str]:
    """The current environment without ``CXR_*`` variables, with the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Service:
    """A running subprocess and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        """The end of its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """Its whole log."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _start(name: str, argv: Sequence[str], log_path: Path) -> Service:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO_ROOT,
            env=clean_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Service(name=name, process=process, log_path=log_path)


def wait_port(port: int, service: Service, timeout_s: float = 90.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited early:\n{service.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{service.name} not listening on {port}:\n{service.log_tail()}")


def wait_log(service: Service, text: str, timeout_s: float = 120.0) -> None:
    """Wait until ``text`` appears in the service's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in service.log_text():
            return
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited early:\n{service.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"{service.name}: {text!r} not logged:\n{service.log_tail()}")


@contextmanager
def running_listener(
    config: Path, port: int, log_path: Path, *, broker: str | None = None
) -> Iterator[Service]:
    """``cxr-listen`` on ``port`` (embedded workers, or Celery when ``broker`` is set)."""
    argv = ["-m", "listeners.storescp", "--config", str(config), "--port", str(port)]
    if broker:
        argv += ["--broker", broker]
    service = _start("cxr-listen", argv, log_path)
    try:
        wait_port(port, service)
        yield service
    finally:
        service.stop()


@contextmanager
def running_worker(
    config: Path, log_path: Path, *, concurrency: int = 1, pool: str = "prefork"
) -> Iterator[Service]:
    """A ``cxr-worker`` process; ready once Celery logs that it is ready."""
    argv = [
        "-m",
        "workers.celery_app",
        "--config",
        str(config),
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
    ]
    service = _start("cxr-worker", argv, log_path)
    try:
        wait_log(service, "ready.")
        yield service
    finally:
        service.stop()
