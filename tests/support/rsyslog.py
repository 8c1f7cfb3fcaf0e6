"""A private Debian ``rsyslogd`` on loopback for tests: UDP, TCP and TLS inputs on free ports.

Usage::

    with running_rsyslog(tmp_path, tls=(ca, cert, key)) as collector:
        ...  # send to collector.udp_port / tcp_port / tls_port
        collector.wait_for(lambda lines: len(lines) >= 3)

Each received message is written to ``messages.log`` as one line
``APP-NAME|MSGID|SEVERITY|MSG`` (rsyslog's RFC 5424 parser fills the fields). The daemon
runs in the foreground with a temporary configuration and work directory, listens on
127.0.0.1 only, and is stopped when the block ends.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.orthanc import free_port

RSYSLOGD = "rsyslogd"


def rsyslog_available() -> bool:
    """Whether the Debian ``rsyslog`` daemon is installed."""
    return shutil.which(RSYSLOGD) is not None or Path("/usr/sbin/rsyslogd").exists()


def tls_driver_available() -> bool:
    """Whether rsyslog's OpenSSL network stream driver (``rsyslog-openssl``) is installed."""
    return any(Path("/usr/lib").rglob("lmnsd_ossl.so"))


@dataclass
class Collector:
    """A running rsyslogd."""

    udp_port: int
    tcp_port: int
    tls_port: int | None
    output: Path
    process: subprocess.Popen[bytes]

    def lines(self) -> list[str]:
        """Messages received so far (one per line)."""
        if not self.output.exists():
            return []
        return self.output.read_text(encoding="utf-8", errors="replace").splitlines()

    def wait_for(
        self, predicate: Callable[[list[str]], bool], timeout_s: float = 30.0
    ) -> list[str]:
        """Poll the output until ``predicate(lines)`` holds; return the lines."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = self.lines()
            if predicate(lines):
                return lines
            time.sleep(0.2)
        return self.lines()


def _config(folder: Path, udp: int, tcp: int, tls: tuple[int, Path, Path, Path] | None) -> str:
    """Plain TCP on imptcp (octet counting on), TLS on imtcp with the OpenSSL driver."""
    output = folder / "messages.log"
    lines = [
        f'global(workDirectory="{folder / "work"}" maxMessageSize="256k")',
        'module(load="imudp")',
        f'input(type="imudp" address="127.0.0.1" port="{udp}")',
        'module(load="imptcp")',
        f'input(type="imptcp" address="127.0.0.1" port="{tcp}")',
    ]
    if tls is not None:
        port, ca, cert, key = tls
        lines += [
            'module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1"'
            ' streamDriver.authMode="anon")',
            f'input(type="imtcp" address="127.0.0.1" port="{port}"'
            f' streamDriver.CAFile="{ca}" streamDriver.CertFile="{cert}"'
            f' streamDriver.KeyFile="{key}")',
        ]
    lines += [
        'template(name="fields" type="string"'
        ' string="%app-name%|%msgid%|%syslogseverity%|%msg%\\n")',
        f'*.* action(type="omfile" file="{output}" template="fields")',
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def running_rsyslog(
    folder: Path, *, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[Collector]:
    """Start rsyslogd with UDP, TCP (and TLS) inputs on free loopback ports; stop it afterwards.

    Parameters
    ----------
    folder
        Temporary folder for the configuration, work directory, pid file and output.
    tls
        (CA, certificate, key) PEM files: also listen for RFC 5425 TLS (``rsyslog-openssl``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "work").mkdir(exist_ok=True)
    udp, tcp = free_port(), free_port()
    tls_port = free_port() if tls is not None else None
    config = folder / "rsyslog.conf"
    config.write_text(
        _config(folder, udp, tcp, None if tls is None or tls_port is None else (tls_port, *tls))
    )
    binary = shutil.which(RSYSLOGD) or "/usr/sbin/rsyslogd"
    check = subprocess.run([binary, "-N1", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"rsyslog rejects the test configuration:\n{check.stderr}")
    log = (folder / "rsyslogd.log").open("wb")
    process = subprocess.Popen(
        [binary, "-n", "-f", str(config), "-i", str(folder / "rsyslogd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    collector = Collector(udp, tcp, tls_port, folder / "messages.log", process)
    try:
        _wait_tcp(tcp, process)
        yield collector
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _wait_tcp(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rsyslogd exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"rsyslogd not listening on {port}")
