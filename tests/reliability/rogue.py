"""A misbehaving host for the load-under-abuse test: run as its own process.

``python -m tests.reliability.rogue --port P --bind 127.0.0.2 --seconds 120`` opens, all from
the one (loopback) address it binds to:

- ``--idle`` associations that complete A-ASSOCIATE and then send nothing, each re-opened as
  soon as the listener closes it (a refused one tries again after ``--pause`` seconds);
- ``--loris`` slow-loris connections that send one byte of a PDU header and stop, each
  re-opened after ``--pause`` seconds once the listener closes it;
- one reconnect loop: associate, C-ECHO if accepted, release, again after ``--pause / 5``.

Everything stops by itself after ``--seconds`` (or at SIGTERM/SIGINT), and each loop is
bounded in count; then one JSON line with what happened goes to stdout. It refuses to bind
anything but a loopback address. A separate process, so that its threads do not share the
test's interpreter lock with the real senders whose latency is measured.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from types import FrameType

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

MAX_PER_LOOP = 5000
"""Most connections one loop opens, whatever ``--seconds`` says."""

TIMEOUT_S = 5.0
"""pynetdicom timeouts of the rogue's own associations (it must wind down quickly)."""

WIND_DOWN_S = 30.0
"""Longest wait for the loops to end after the stop; the report is printed regardless."""


class Rogue:
    """The three kinds of abuse, sharing one stop event and one tally."""

    def __init__(self, host: str, port: int, bind: str, pause_s: float) -> None:
        self.host, self.port, self.bind, self.pause_s = host, port, bind, pause_s
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.longest: dict[str, float] = {"idle_held_s": 0.0, "loris_held_s": 0.0}
        self._lock = threading.Lock()

    def _count(self, key: str, held_s: float | None = None, held_key: str = "") -> None:
        with self._lock:
            self.counts[key] += 1
            if held_s is not None:
                self.longest[held_key] = max(self.longest[held_key], held_s)

    def _ae(self) -> AE:
        ae = AE(ae_title="ROGUE")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = TIMEOUT_S
        ae.network_timeout = None  # its idle associations must not end on their own
        return ae

    def _associate(self) -> Association:
        return self._ae().associate(
            self.host, self.port, ae_title="CXR_PIPELINE", bind_address=(self.bind, 0)
        )

    def idle(self) -> None:
        """Hold an idle association; re-open it as soon as the listener ends it."""
        for _ in range(MAX_PER_LOOP):
            if self.stop.is_set():
                return
            assoc = self._associate()
            if not assoc.is_established:
                self._count("idle_refused")
                self.stop.wait(self.pause_s)
                continue
            self._count("idle_established")
            start = time.monotonic()
            while assoc.is_established and not self.stop.wait(0.05):
                pass
            if self.stop.is_set():
                if assoc.is_established:
                    assoc.release()
                return
            ended = "released" if assoc.is_released else "aborted"
            self._count(f"idle_{ended}_by_listener", time.monotonic() - start, "idle_held_s")

    def loris(self) -> None:
        """Send one byte of an A-ASSOCIATE-RQ header and nothing more; again when closed."""
        for _ in range(MAX_PER_LOOP):
            if self.stop.is_set():
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((self.bind, 0))
                sock.settimeout(5)
                sock.connect((self.host, self.port))
                sock.sendall(b"\x01")
            except OSError:
                self._count("loris_connect_failed")
                sock.close()
                self.stop.wait(self.pause_s)
                continue
            self._count("loris_opened")
            start = time.monotonic()
            sock.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    if sock.recv(64) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            if not self.stop.is_set():
                self._count("loris_closed_by_listener", time.monotonic() - start, "loris_held_s")
            sock.close()
            self.stop.wait(self.pause_s)

    def reconnect(self) -> None:
        """Associate, echo, release, at once again: a client stuck in a loop."""
        for _ in range(MAX_PER_LOOP):
            if self.stop.is_set():
                return
            assoc = self._associate()
            if assoc.is_established:
                self._count("reconnect_established")
                assoc.send_c_echo()
                assoc.release()
            else:
                self._count("reconnect_refused")
            self.stop.wait(self.pause_s / 5)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the abuse until ``--seconds`` pass or a signal comes; print the tally."""
    parser = argparse.ArgumentParser(prog="rogue")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.2")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--idle", type=int, default=12)
    parser.add_argument("--loris", type=int, default=12)
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority: on a small shared machine, a niced rogue "
        "stands in for a separate host (its own CPU use is not the listener's to bear)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    if not ipaddress.ip_address(args.bind).is_loopback:
        parser.error("--bind must be a loopback address")
    rogue = Rogue(args.host, args.port, args.bind, args.pause)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        rogue.stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    loops = [rogue.idle] * args.idle + [rogue.loris] * args.loris + [rogue.reconnect]
    threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    print("rogue started", flush=True)
    rogue.stop.wait(args.seconds)
    rogue.stop.set()
    deadline = time.monotonic() + WIND_DOWN_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    report = {
        **rogue.counts,
        **{k: round(v, 1) for k, v in rogue.longest.items()},
        "seconds": round(time.monotonic() - start, 1),
        "loops_still_running": sum(1 for thread in threads if thread.is_alive()),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
