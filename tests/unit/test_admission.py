"""Admission by address (listeners/admission.py): decisions, deadlines and rate-limited alerts.

Real sockets (socket pairs) stand for accepted connections; the watchdog's clock is passed
in, so deadlines are checked without waiting. The network behaviour is in
``tests/reliability/test_admission.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.service import metrics
from cxr_pipeline.service.audit import AuditTrail, read_trail
from cxr_pipeline.settings import load_settings
from listeners.admission import (
    ACTIVE_LOOP_DELAY_S,
    PARKED_LOOP_DELAY_S,
    REFUSALS_PER_ADDRESS,
    Admission,
    AdmissionPolicy,
    PeerKind,
    Reason,
    peer_address,
)
from listeners.security import ALERT_INTERVAL_S, EdgeGuard


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def _sock(made: list[socket.socket]) -> socket.socket:
    a, b = socket.socketpair()
    made += [a, b]
    return a


def _refused(reason: Reason) -> float:
    return metrics.ASSOCIATIONS_REFUSED.labels(reason=reason.value)._value.get()


def test_peer_addresses_are_normalised() -> None:
    assert peer_address("::ffff:10.0.0.5") == "10.0.0.5"
    assert peer_address("fe80::1%eth0") == "fe80::1"
    assert peer_address("127.0.0.2") == "127.0.0.2"
    assert peer_address("not-an-ip") == "not-an-ip"


def test_policy_from_settings_knows_peers_by_address_and_reserves_only_for_them() -> None:
    plain = AdmissionPolicy.from_settings(load_settings(None))
    assert (plain.max_associations, plain.per_address, plain.reserved_for_known) == (10, 4, 0)
    assert (plain.request_timeout_s, plain.idle_timeout_s, plain.known_idle_timeout_s) == (
        5.0,
        10.0,
        60.0,
    )
    settings = load_settings(
        None,
        send={
            "known_peers": [
                {
                    "ae_title": "PACS",
                    "host": "10.20.1.5",
                    "port": 104,
                    "addresses": ["10.30.0.0/16"],
                },
                {"ae_title": "NAMED", "host": "pacs.hospital.local", "port": 104},
            ]
        },
    )
    policy = AdmissionPolicy.from_settings(settings)
    assert policy.reserved_for_known == 4
    assert policy.kind("10.20.1.5") is PeerKind.KNOWN  # the host, written as an IP
    assert policy.kind("10.30.7.7") is PeerKind.KNOWN  # one of its networks
    assert policy.kind("10.20.1.6") is PeerKind.UNKNOWN
    assert policy.kind("::1") is PeerKind.UNKNOWN
    assert policy.idle_timeout(PeerKind.KNOWN) == 60.0


def test_a_reserve_that_leaves_unknown_addresses_nothing_is_a_config_error() -> None:
    peers = {"known_peers": [{"ae_title": "PACS", "host": "10.0.0.1", "port": 104}]}
    with pytest.raises(ConfigError, match="reserved_for_known_peers"):
        load_settings(None, listener={"max_associations": 4}, send=peers)
    # Without known addresses the reserve is inert: small limits stay valid.
    assert load_settings(None, listener={"max_associations": 1}).listener.max_associations == 1


def test_refusal_order_address_cap_then_listener_then_reserve() -> None:
    policy = AdmissionPolicy(max_associations=10, per_address=4, reserved_for_known=4)
    unknown, known = PeerKind.UNKNOWN, PeerKind.KNOWN
    assert policy.refusal(unknown, here=3, total=5, unknown=5) is None
    assert policy.refusal(unknown, here=4, total=4, unknown=4) is Reason.ADDRESS_CAP
    assert policy.refusal(known, here=4, total=4, unknown=0) is Reason.ADDRESS_CAP
    assert policy.refusal(unknown, here=0, total=6, unknown=6) is Reason.KNOWN_PEER_RESERVE
    assert policy.refusal(known, here=0, total=6, unknown=6) is None
    assert policy.refusal(known, here=0, total=10, unknown=6) is Reason.LISTENER_FULL


def test_one_address_holds_its_cap_then_gets_two_rejections_then_closes(
    sockets: list[socket.socket],
) -> None:
    admission = Admission(AdmissionPolicy(max_associations=10, per_address=4))
    held = [_sock(sockets) for _ in range(4)]
    assert all(admission.admit(s, "127.0.0.2") for s in held)
    before = _refused(Reason.ADDRESS_CAP)
    # Over the cap: accepted to be answered A-ASSOCIATE-RJ, at most two at a time ...
    rejecting = [_sock(sockets) for _ in range(REFUSALS_PER_ADDRESS)]
    assert all(admission.admit(s, "127.0.0.2") for s in rejecting)
    # ... then closed unread.
    assert not admission.admit(_sock(sockets), "127.0.0.2")
    assert _refused(Reason.ADDRESS_CAP) == before + REFUSALS_PER_ADDRESS + 1
    # Another address is not affected, and the slots held are counted by kind.
    assert admission.admit(_sock(sockets), "127.0.0.1")
    assert admission.counts() == {PeerKind.KNOWN: 0, PeerKind.UNKNOWN: 5}
    # A slot frees when its connection closes.
    admission.closed(held[0])
    admission.closed(rejecting[0])
    assert admission.admit(_sock(sockets), "127.0.0.2")
    assert admission.counts()[PeerKind.UNKNOWN] == 5


def test_unknown_addresses_leave_the_reserve_to_known_peers(sockets: list[socket.socket]) -> None:
    policy = AdmissionPolicy.from_settings(
        load_settings(
            None,
            listener={"max_associations": 6},
            send={"known_peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}]},
        )
    )
    acted: list[tuple[str, Reason]] = []
    admission = Admission(policy, lambda address, reason, _: acted.append((address, reason)))
    assert admission.admit(_sock(sockets), "127.0.0.2")
    assert admission.admit(_sock(sockets), "127.0.0.3")
    assert admission.admit(_sock(sockets), "127.0.0.4")  # refused, answered with an RJ
    assert acted == [("127.0.0.4", Reason.KNOWN_PEER_RESERVE)]
    assert all(admission.admit(_sock(sockets), "::ffff:127.0.0.1") for _ in range(4))
    assert admission.counts() == {PeerKind.KNOWN: 4, PeerKind.UNKNOWN: 2}


def test_a_connection_without_association_is_closed_at_its_deadline(
    sockets: list[socket.socket],
) -> None:
    acted: list[tuple[str, Reason, str]] = []
    admission = Admission(AdmissionPolicy(request_timeout_s=5.0), lambda *a: acted.append(a))
    silent = _sock(sockets)
    assert admission.admit(silent, "127.0.0.2")
    conn = admission._by_socket[id(silent)]
    admission.sweep(conn.accepted_at + 4.9)
    assert not acted and conn.open
    admission.sweep(conn.accepted_at + 5.1)
    assert [(a, r) for a, r, _ in acted] == [("127.0.0.2", Reason.REQUEST_TIMEOUT)]
    assert "no association after 5 s" in acted[0][2]
    assert not conn.open
    # The socket was shut down under whoever reads it: the peer sees the close.
    peer = sockets[sockets.index(silent) + 1]
    peer.settimeout(5)
    assert peer.recv(10) == b""
    admission.sweep(conn.accepted_at + 6)
    assert admission.counts()[PeerKind.UNKNOWN] == 0


def test_alerts_are_rate_limited_per_address(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path)
    guard = EdgeGuard(settings, AuditTrail(settings), ledger=None)  # type: ignore[arg-type]
    for _ in range(25):
        guard.admission_acted("127.0.0.2", Reason.ADDRESS_CAP, "association refused: cap")
    guard.admission_acted("127.0.0.9", Reason.IDLE_TIMEOUT, "association idle for 10 s")
    alerts = [m for m in read_trail(tmp_path / "audit" / "audit.jsonl") if "110113" in m["xml"]]
    assert len(alerts) == 2
    assert "127.0.0.2" in alerts[0]["xml"] and "127.0.0.9" in alerts[1]["xml"]
    assert alerts[1]["event"] == "association timed out"
    # A minute later the next one goes out and says how many were held back.
    last, _ = guard._alerted["127.0.0.2"]
    assert last is not None
    guard._alerted["127.0.0.2"] = (last - ALERT_INTERVAL_S, 24)
    guard.admission_acted("127.0.0.2", Reason.ADDRESS_CAP, "association refused: cap")
    alerts = [m for m in read_trail(tmp_path / "audit" / "audit.jsonl") if "110113" in m["xml"]]
    assert len(alerts) == 3
    assert "24 more refusals or timeouts" in alerts[2]["xml"]


class _Assoc:
    """Stands in for a pynetdicom acceptor association, in the states the watchdog reads."""

    ident = 1  # started

    def __init__(self) -> None:
        self.is_established = True
        self.is_released = self.is_aborted = self.is_rejected = False
        self.dul = SimpleNamespace(ident=None, is_alive=lambda: True, _run_loop_delay=0.001)
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self.releases = 0

    def is_alive(self) -> bool:
        return True

    def release(self) -> None:
        self.releases += 1


def test_a_released_association_frees_its_slot_before_its_socket_closes(
    sockets: list[socket.socket],
) -> None:
    admission = Admission(AdmissionPolicy(per_address=2))
    held = []
    for _ in range(2):
        sock, assoc = _sock(sockets), _Assoc()
        assert admission.admit(sock, "127.0.0.1")
        admission.attach(sock, assoc)  # type: ignore[arg-type]
        held.append(assoc)
    assert admission.admit(_sock(sockets), "127.0.0.1")  # refused: answered with an RJ
    assert admission.counts()[PeerKind.UNKNOWN] == 2
    held[0].is_established, held[0].is_released = False, True  # peer released, socket open
    assert admission.counts()[PeerKind.UNKNOWN] == 1
    sock = _sock(sockets)
    assert admission.admit(sock, "127.0.0.1")
    assert admission._by_socket[id(sock)].refusal is None


def test_an_idle_association_is_released_unless_bytes_or_a_request_are_under_way(
    sockets: list[socket.socket],
) -> None:
    acted: list[Reason] = []
    policy = AdmissionPolicy(idle_timeout_s=10.0, known_idle_timeout_s=60.0)
    admission = Admission(policy, lambda _a, reason, _d: acted.append(reason))
    sock, assoc = _sock(sockets), _Assoc()
    assert admission.admit(sock, "127.0.0.2")
    admission.attach(sock, assoc)  # type: ignore[arg-type]
    conn = admission._by_socket[id(sock)]
    start = conn.last_activity
    admission.sweep(start + 9.0)
    # Idle for a while: parked (reactor paused, DUL polling slowly) ...
    assert conn.parked and not assoc._reactor_checkpoint.is_set()
    assert assoc.dul._run_loop_delay == PARKED_LOOP_DELAY_S
    admission.touch(sock)  # ... until a byte arrives; and the idle clock starts again
    assert not conn.parked and assoc._reactor_checkpoint.is_set()
    assert assoc.dul._run_loop_delay == ACTIVE_LOOP_DELAY_S
    admission.sweep(conn.last_activity + 9.0)
    conn.serving = True  # a request is being answered (the handler runs)
    admission.sweep(conn.last_activity + 30.0)
    assert not acted and assoc.releases == 0 and conn.deadline is None
    conn.serving = False
    admission.sweep(conn.last_activity + 10.0)
    deadline = time.monotonic() + 5
    while assoc.releases == 0 and time.monotonic() < deadline:  # in its own thread
        time.sleep(0.01)
    assert acted == [Reason.IDLE_TIMEOUT] and assoc.releases == 1
    assert not conn.parked and assoc._reactor_checkpoint.is_set()  # released awake
    assert conn.deadline == conn.release_started + policy.release_grace_s  # type: ignore[operator]
    admission.sweep(conn.last_activity + 11.0)
    assert assoc.releases == 1  # once
