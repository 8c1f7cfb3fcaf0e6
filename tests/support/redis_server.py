"""A real, throw-away ``redis-server`` for integration tests.

Each server runs on a free port in its own temporary folder, without persistence, and is
stopped (SIGTERM, then SIGKILL) when the fixture ends. Tests that need Redis skip with a
reason when ``redis-server`` is not installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A running ``redis-server`` process."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """Broker URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        """Whether the server answers PING."""
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def start(self) -> None:
        """(Re)start the server on the same port, e.g. after :meth:`stop` in a fault test."""
        if self.process.poll() is None:
            return
        self.process = _spawn(self.port, self.workdir)
        _wait_ready(self)


def _spawn(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    assert exe is not None
    log = (workdir / "redis.log").open("ab")
    return subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(server: RedisServer, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = (server.workdir / "redis.log").read_text(errors="replace")
            raise RuntimeError(f"redis-server exited early: {log[-2000:]}")
        if server.ping():
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {server.port} not ready after {timeout_s} s")


def start_redis(workdir: Path) -> RedisServer:
    """Start a ``redis-server`` on a free port with its files under ``workdir``.

    Skips the calling test when ``redis-server`` is not installed.
    """
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(port=port, workdir=workdir, process=_spawn(port, workdir))
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
