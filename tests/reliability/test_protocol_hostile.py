"""Hostile input at the socket, below DIMSE: one ``cxr-listen`` subprocess on loopback.

Malformed and truncated PDUs, an oversized PDU length, an A-ASSOCIATE-RQ with 128
presentation contexts and slow-loris senders (stalled and trickling) go to one listener
with ``max_associations = 4``. Between and after the attacks a real sender must get in and
its image must be analysed and its results delivered to the PACS; the listener must stay
up; its memory (VmRSS) must stay within a wide bound of the baseline; every connection
the listener refuses is in the audit trail. Counts and times are bounded (a few
connections per case, about two minutes in all). A table of what was tried and what the
listener did is printed (``-s``).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.audit import read_trail
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import ListenerSettings
from listeners.server import MAX_PDU_BYTES
from tests.reliability.harness import (
    Pacs,
    chest_datasets,
    rss_kib,
    scu,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
)
from tests.support.orthanc import free_port

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MAX_ASSOCIATIONS = 4
REQUEST_DEADLINE_S = ListenerSettings().association_request_timeout_s
RSS_GROWTH_LIMIT_KIB = 200 * 1024
"""Wide bound on the listener's RSS growth over all attacks (measured growth is printed);
without the PDU bound, one oversized-length connection alone grows it by what it sends."""

A_ABORT = 0x07
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03


def associate_rq(contexts: int = 1, calling: str = "HOSTILE") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU with ``contexts`` presentation contexts (Verification first)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "CXR_PIPELINE"
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    primitive.user_information = [length, implementation]
    storage = [build_context(c.abstract_syntax) for c in AllStoragePresentationContexts]
    proposed = [build_context(Verification), *storage][:contexts]
    for index, context in enumerate(proposed):
        context.context_id = 2 * index + 1
    primitive.presentation_context_definition_list = proposed
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def _answer(sock: socket.socket, timeout_s: float = 30.0) -> str:
    """What the listener did with this connection: the PDU type it answered, or closed."""
    sock.settimeout(timeout_s)
    try:
        head = sock.recv(6)
    except TimeoutError:
        return "no answer"
    except OSError:
        return "connection reset"
    if not head:
        return "connection closed"
    return {
        A_ABORT: "A-ABORT",
        A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
        A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    }.get(head[0], f"PDU 0x{head[0]:02X}")


@contextmanager
def connection(port: int) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        yield sock
    finally:
        sock.close()


def _send_until_closed(port: int, header: bytes, limit: int) -> int:
    """Send ``header`` then zeros until the listener closes; return the bytes it took."""
    sent = 0
    chunk = bytes(64 * 1024)
    with connection(port) as sock:
        sock.settimeout(30)
        try:
            sock.sendall(header)
            while sent < limit:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


def _real_sender_gets_in(port: int, dataset: object, deadline_s: float) -> tuple[float, int]:
    """Retry every second like a PACS until associated; return (seconds waited, status)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        assoc = scu(timeout_s=10).associate("127.0.0.1", port, ae_title="CXR_PIPELINE")
        if assoc.is_established:
            status = assoc.send_c_store(dataset)
            assoc.release()
            return time.monotonic() - start, int(status.Status)
        time.sleep(1.0)
    raise AssertionError(f"a real sender was locked out for {deadline_s} s")


def test_protocol_level_hostile_input(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml", data_dir=data_dir, checkpoint=tiny_checkpoint, pacs=pacs,
        listen_port=port, listener={"max_associations": MAX_ASSOCIATIONS},
    )  # fmt: skip
    datasets = chest_datasets(pngs, 4)
    listener = spawn_listener(config, port, tmp_path / "listener.log")
    table: list[tuple[str, str]] = []
    accepted: list[str] = []
    try:
        pid = listener.process.pid
        waited, status = _real_sender_gets_in(port, datasets[0], 60)
        assert status == DimseStatus.SUCCESS
        accepted.append(str(datasets[0].SOPInstanceUID))
        baseline, _ = rss_kib(pid)

        # -- malformed and truncated PDUs -------------------------------------------------
        malformed = {
            "unknown PDU type 0x09": _pdu(0x09, bytes(10)),
            "A-ASSOCIATE-RQ with a garbage body": _pdu(0x01, b"\xff" * 68),
            "P-DATA-TF before any association": _pdu(0x04, b"\x00\x00\x00\x02\x01\x03"),
            "A-ASSOCIATE-RQ truncated (says 17 KiB, sends 100 B, closes)": associate_rq(128)[:100],
        }
        for name, payload in malformed.items():
            outcomes = set()
            for _ in range(3):
                with connection(port) as sock:
                    sock.sendall(payload)
                    if "closes" in name:
                        sock.shutdown(socket.SHUT_WR)
                    outcomes.add(_answer(sock))
            table.append((name, ", ".join(sorted(outcomes))))
            assert outcomes <= {"A-ABORT", "connection closed", "connection reset"}, outcomes

        # -- oversized PDU length ---------------------------------------------------------
        over = struct.pack(">BBL", 0x01, 0, 0xFFFF_FFF0)
        threads_sent: list[int] = []
        workers = [
            threading.Thread(target=lambda: threads_sent.append(
                _send_until_closed(port, over, 64 * 1024 * 1024)))
            for _ in range(3)
        ]  # fmt: skip
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert len(threads_sent) == 3
        # Closed at the header: at most the socket buffers' worth is taken, never 64 MiB.
        assert max(threads_sent) < 64 * 1024 * 1024, threads_sent
        table.append((
            "PDU length 0xFFFFFFF0, then 64 MiB of zeros (x3 at once)",
            f"closed after the header (sender got {max(threads_sent) // 1024} KiB into "
            f"socket buffers; limit {MAX_PDU_BYTES // (1024 * 1024)} MiB)",
        ))  # fmt: skip
        just_under = struct.pack(">BBL", 0x04, 0, MAX_PDU_BYTES)
        _send_until_closed(port, just_under, MAX_PDU_BYTES + 1024 * 1024)

        # -- 128 presentation contexts ----------------------------------------------------
        # The refused connections' slots free within moments: retry like a PACS would.
        for _ in range(30):
            with connection(port) as sock:
                sock.sendall(associate_rq(128))
                answer = _answer(sock)
            if answer != "A-ASSOCIATE-RJ":
                break
            time.sleep(1.0)
        table.append(("A-ASSOCIATE-RQ with 128 presentation contexts", answer))
        assert answer == "A-ASSOCIATE-AC"

        # -- slow loris: stalled and trickling requests hold every slot -------------------
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for sock in stalled:
            sock.sendall(b"\x01\x00\x00")  # half a PDU header, then nothing
        trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        request = associate_rq(1)
        stop_trickle = threading.Event()

        def trickle(sock: socket.socket) -> None:
            for byte in request:  # one byte a second: never finishes within the deadline
                if stop_trickle.wait(1.0):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        trickle_threads = [threading.Thread(target=trickle, args=(s,)) for s in trickling]
        for thread in trickle_threads:
            thread.start()
        try:
            time.sleep(1.0)
            waited, status = _real_sender_gets_in(port, datasets[1], 4 * REQUEST_DEADLINE_S)
            assert status == DimseStatus.SUCCESS
            accepted.append(str(datasets[1].SOPInstanceUID))
            table.append((
                f"slow loris: 2 stalled + 2 trickling (1 B/s) connections, "
                f"max_associations={MAX_ASSOCIATIONS}",
                f"closed after {REQUEST_DEADLINE_S:.0f} s; a real sender got in after "
                f"{waited:.1f} s",
            ))  # fmt: skip
        finally:
            stop_trickle.set()
            for thread in trickle_threads:
                thread.join(timeout=10)
            for sock in stalled + trickling:
                with suppress(OSError):
                    sock.close()

        # -- afterwards: still up, still serving, memory bounded --------------------------
        assert listener.process.poll() is None, listener.log_tail()
        for dataset in datasets[2:]:
            _, status = _real_sender_gets_in(port, dataset, 60)
            assert status == DimseStatus.SUCCESS
            accepted.append(str(dataset.SOPInstanceUID))
        rss, hwm = rss_kib(pid)
        ledger = Ledger(data_dir / "ledger.sqlite3")
        rows = wait_finished(ledger, accepted)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}, rows
    finally:
        stop(listener)
    growth = rss - baseline
    table.append(("memory", f"VmRSS {baseline // 1024} -> {rss // 1024} MiB "
                  f"(peak {hwm // 1024} MiB)"))  # fmt: skip
    print("\nattack | what the listener did")
    for name, outcome in table:
        print(f"{name} | {outcome}")
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB"
    trail = read_trail(data_dir / "audit" / "audit.jsonl")
    reasons = " ".join(m["xml"] for m in trail if m["event"] == "connection refused")
    assert "announces 4294967280 bytes" in reasons
    # Caps and timeouts of admission: at most one alert per address per minute, so the
    # first of them (a refusal or "no association after 5 s") stands for the others.
    admission = [m for m in trail if m["event"] in ("association refused", "association timed out")]
    assert admission and all("127.0.0.1" in m["xml"] for m in admission)
