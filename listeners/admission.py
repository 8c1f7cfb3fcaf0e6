"""Admission by address and short leashes for the listener's connections (issue 21).

pynetdicom counts every acceptor thread against one ``maximum_associations`` and checks
it only once an A-ASSOCIATE-RQ has been read; its only idle limit is ``network_timeout``,
counted per complete PDU. One address could therefore fill every slot (idle associations
kept for a minute, or connections that never finish their request) and lock every other
sender out, and a slow link could be cut in the middle of a large image. This module
takes those decisions instead (measured in ``tests/reliability/test_admission.py``):

Slots
    ``listener.max_associations`` connections may hold a slot at once, from accept until
    their association is over: association requested or established. One address holds
    at most ``listener.max_associations_per_address``. When some known peer has an address
    (``send.known_peers``: ``addresses``, or a ``host`` written as an IP address),
    ``listener.reserved_for_known_peers`` slots are open to known peers only, so a PACS
    always has room whatever unknown addresses hold.

Refusal
    A connection over a cap is refused the standard way, A-ASSOCIATE-RJ rejected-transient,
    source DICOM UL service-provider (presentation), reason local-limit-exceeded (PS3.8
    9.3.4; what pynetdicom itself answers at its limit), which tells a PACS to try again
    later. That answer needs the A-ASSOCIATE-RQ to be read first, which costs a thread and
    up to ``association_request_timeout_s``; so an address already being refused
    :data:`REFUSALS_PER_ADDRESS` times (a reconnect loop, a slow loris) has further
    connections closed at once, before anything is read (a TCP close is the only bounded
    answer to a flood: nothing of the request is there to reject yet). Connections that
    hold no slot but still a thread (refused, or ended and not closed by the peer yet) are
    bounded too: twice the per-address cap per address.

Leashes (:meth:`Admission.watch`, a watchdog thread)
    - A connection without an established association ``association_request_timeout_s``
      after accept is closed, however it trickles its bytes (the DUL thread may sit in a
      blocking ``recv`` that pynetdicom's ARTIM cannot interrupt).
    - An established association that received nothing for ``idle_timeout_s``
      (``known_peer_idle_timeout_s`` for known peers) while no request is being answered
      is released (A-RELEASE-RQ); pynetdicom aborts it when no A-RELEASE-RP comes within
      ``association_request_timeout_s``, and the watchdog closes the socket soon after if
      even that is stuck. Idleness is measured on the socket, byte by byte (not per PDU as
      pynetdicom's ``network_timeout``, which is switched off): a large image over a slow
      link is never cut while its bytes arrive.

Each refusal and each leash that acts is counted in ``cxr_associations_refused_total
{reason}`` and reported to ``on_action`` (the listener writes a rate-limited Security
Alert); ``cxr_associations_active{peer_kind}`` counts the slots held.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ

from cxr_pipeline.dicom.codes import AssociateReject
from cxr_pipeline.service import metrics
from cxr_pipeline.settings import Settings

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REFUSALS_PER_ADDRESS = 2
"""Connections of one address that may wait at once for their A-ASSOCIATE-RJ; more from
that address are closed on arrival. Two: a sender that opened one association too many
still gets the standard answer; a loop of connections does not get a thread each."""

WATCH_INTERVAL_S = 0.2
"""How often the watchdog looks at every connection."""

PARK_AFTER_S = 0.5
"""An established association idle this long (nothing received, no request being answered)
is parked until its next byte: see :meth:`Admission.park`."""

PARKED_LOOP_DELAY_S = 0.02
"""Sleep between two passes of a parked association's DUL loop (pynetdicom's: 1 ms)."""

ACTIVE_LOOP_DELAY_S = 0.001
"""pynetdicom's own DUL loop delay, given back when a parked association wakes up."""

RELEASE_GRACE_EXTRA_S = 2.0
"""Added to ``association_request_timeout_s`` (pynetdicom's wait for an A-RELEASE-RP, after
which it aborts) before the watchdog closes the socket of a release that is stuck."""


class PeerKind(StrEnum):
    """Who an address is: a known peer (``send.known_peers``) or anyone else."""

    KNOWN = "known"
    UNKNOWN = "unknown"


class Reason(StrEnum):
    """Why a connection was refused or ended (the ``reason`` label of the metric)."""

    ADDRESS_CAP = "address_cap"
    LISTENER_FULL = "listener_full"
    KNOWN_PEER_RESERVE = "known_peer_reserve"
    REQUEST_TIMEOUT = "request_timeout"
    IDLE_TIMEOUT = "idle_timeout"


ActionSink = Callable[[str, Reason, str], None]
"""Called with the address, the reason and a sentence for the log and the audit trail."""


def peer_address(text: str) -> str:
    """Normalise a peer address: an IPv4-mapped IPv6 address is written as IPv4.

    Parameters
    ----------
    text
        The address as the socket gives it (``"::ffff:10.0.0.5"``, ``"fe80::1%eth0"``).

    Returns
    -------
    str
        The address one cap counts under (the text itself when it is not an IP address).
    """
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True)
class AdmissionPolicy:
    """The caps and timeouts of :class:`Admission` (see the module docstring).

    ``reserved_for_known`` is the effective reserve: 0 when no known peer has an address.
    """

    max_associations: int = 10
    per_address: int = 4
    reserved_for_known: int = 0
    known_networks: tuple[Network, ...] = ()
    request_timeout_s: float = 5.0
    idle_timeout_s: float = 10.0
    known_idle_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionPolicy:
        """Build the policy from ``[listener]`` and the addresses of ``send.known_peers``."""
        listener = settings.listener
        networks = tuple(settings.send.known_networks())
        return cls(
            max_associations=listener.max_associations,
            per_address=listener.max_associations_per_address,
            reserved_for_known=listener.reserved_for_known_peers if networks else 0,
            known_networks=networks,
            request_timeout_s=listener.association_request_timeout_s,
            idle_timeout_s=listener.idle_timeout_s,
            known_idle_timeout_s=listener.known_peer_idle_timeout_s,
        )

    def kind(self, address: str) -> PeerKind:
        """Say whether ``address`` (normalised) belongs to a known peer."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return PeerKind.UNKNOWN
        known = any(ip.version == net.version and ip in net for net in self.known_networks)
        return PeerKind.KNOWN if known else PeerKind.UNKNOWN

    def idle_timeout(self, kind: PeerKind) -> float:
        """Seconds an established association of this kind of peer may stay idle."""
        return self.known_idle_timeout_s if kind is PeerKind.KNOWN else self.idle_timeout_s

    @property
    def release_grace_s(self) -> float:
        """Seconds from the start of an idle release to a hard close of the socket."""
        return self.request_timeout_s + RELEASE_GRACE_EXTRA_S

    def refusal(self, kind: PeerKind, *, here: int, total: int, unknown: int) -> Reason | None:
        """Decide on a new connection from the slots already held.

        Parameters
        ----------
        kind
            The new connection's peer kind.
        here, total, unknown
            Slots held by its address, by everyone, by unknown addresses.

        Returns
        -------
        Reason or None
            Why it is refused, or None when it may take a slot.
        """
        if here >= self.per_address:
            return Reason.ADDRESS_CAP
        if total >= self.max_associations:
            return Reason.LISTENER_FULL
        if kind is PeerKind.UNKNOWN and unknown >= self.max_associations - self.reserved_for_known:
            return Reason.KNOWN_PEER_RESERVE
        return None

    def describe(self, reason: Reason, address: str, here: int) -> str:
        """Say why a connection from ``address`` was refused (for the log and audit)."""
        if reason is Reason.ADDRESS_CAP:
            return (
                f"{address} already holds {here} association slots "
                f"(listener.max_associations_per_address = {self.per_address})"
            )
        if reason is Reason.LISTENER_FULL:
            return f"all {self.max_associations} association slots are taken"
        return (
            f"the {self.max_associations - self.reserved_for_known} slots open to unknown "
            f"addresses are taken ({self.reserved_for_known} reserved for known peers)"
        )


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, from accept until its socket is closed."""

    address: str
    kind: PeerKind
    sock: socket.socket
    accepted_at: float
    refusal: Reason | None = None
    """Set when it was accepted only to be answered A-ASSOCIATE-RJ (holds no slot)."""
    assoc: Association | None = None
    last_activity: float = 0.0
    """Monotonic time of the last byte received or response sent."""
    serving: bool = False
    """A request was received and its response is not sent yet (the handler runs)."""
    deadline: float | None = None
    """Monotonic time at which the socket is closed whatever happens (None: established)."""
    release_started: float | None = None
    closed: bool = False
    parked: bool = False
    """Its reactor waits at its checkpoint and its DUL polls slowly (see ``park``)."""

    @property
    def open(self) -> bool:
        """Whether it still holds its socket."""
        if self.closed:
            return False
        assoc = self.assoc
        return assoc is None or assoc.ident is None or assoc.is_alive()

    @property
    def ended(self) -> bool:
        """Its association is over (released, aborted, rejected) though the socket may linger."""
        assoc = self.assoc
        if assoc is None:
            return False
        dul_gone = assoc.dul.ident is not None and not assoc.dul.is_alive()
        return bool(assoc.is_released or assoc.is_aborted or assoc.is_rejected or dul_gone)

    @property
    def holds_slot(self) -> bool:
        """Whether it counts against the caps: open, admitted, association not over.

        A released association whose peer has not closed its socket yet no longer counts,
        so a PACS at its cap that releases and at once associates again is not refused.
        """
        return self.refusal is None and self.open and not self.ended

    def describe(self, now: float) -> str:
        """Say what this connection is doing (debug logs)."""
        assoc = self.assoc
        if assoc is None:
            state = "no association yet"
        else:
            flags = ("established", "rejected", "aborted", "released")
            state = ", ".join(f for f in flags if getattr(assoc, f"is_{f}")) or "requested"
            state += f", DUL {assoc.dul.state_machine.current_state}"
        return f"{now - self.accepted_at:.1f} s old: {state}"

    @property
    def pending(self) -> bool:
        """No association yet: the request is still awaited (or being read)."""
        assoc = self.assoc
        if assoc is None:
            return True
        ended = assoc.is_established or assoc.is_rejected or assoc.is_aborted
        return not (ended or assoc.is_released)


class Admission:
    """Admission by address and the watchdog of the listener's connections.

    Parameters
    ----------
    policy
        Caps and timeouts.
    on_action
        Called (outside the lock) whenever a cap or a leash acts; must not raise.
    """

    def __init__(self, policy: AdmissionPolicy, on_action: ActionSink | None = None) -> None:
        self.policy = policy
        self.on_action = on_action
        self._lock = threading.Lock()
        self._by_socket: dict[int, Connection] = {}
        self._by_assoc: dict[int, Connection] = {}

    # -- accept ----------------------------------------------------------------------------

    def admit(self, sock: socket.socket, address: str) -> bool:
        """Decide on a just-accepted connection (the server's ``verify_request``).

        Parameters
        ----------
        sock
            The accepted socket (as the association will use it).
        address
            The peer's IP address.

        Returns
        -------
        bool
            False: close it now, unread. True: serve it (it may still be marked to be
            answered A-ASSOCIATE-RJ).
        """
        address = peer_address(address)
        kind = self.policy.kind(address)
        now = time.monotonic()
        with self._lock:
            live = [c for c in self._by_socket.values() if c.open]
            holding = [c for c in live if c.holds_slot]
            here = sum(1 for c in holding if c.address == address)
            reason = self.policy.refusal(
                kind,
                here=here,
                total=len(holding),
                unknown=sum(1 for c in holding if c.kind is PeerKind.UNKNOWN),
            )
            refusing_here = sum(1 for c in live if c.refusal is not None and c.address == address)
            refusing = sum(1 for c in live if c.refusal is not None)
            # Connections that hold no slot (refused, or ended but not closed yet) still
            # hold a thread: an address gets at most twice its cap of them.
            spare_here = sum(1 for c in live if not c.holds_slot and c.address == address)
            if reason is None and spare_here >= 2 * self.policy.per_address:
                reason, answer = Reason.ADDRESS_CAP, False
            else:
                answer = reason is None or (
                    refusing_here < REFUSALS_PER_ADDRESS and refusing < self.policy.max_associations
                )
            if answer:
                conn = Connection(address, kind, sock, now, refusal=reason, last_activity=now)
                conn.deadline = now + self.policy.request_timeout_s
                self._by_socket[id(sock)] = conn
            self._publish()
            if reason is not None and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "slots of %s: %s",
                    address,
                    [c.describe(now) for c in holding if c.address == address],
                )
        if reason is not None:
            if answer:
                how = "answered A-ASSOCIATE-RJ (rejected-transient, local limit exceeded)"
            else:
                how = (
                    f"closed before its request was read ({refusing_here} refusals and "
                    f"{spare_here} closing connections of {address} in progress)"
                )
            self._report(address, reason, f"association refused: {how}: " + (
                self.policy.describe(reason, address, here)
            ))  # fmt: skip
        return answer

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        """Bind the association pynetdicom made for ``sock`` (before it starts)."""
        with self._lock:
            conn = self._by_socket.get(id(sock))
            if conn is not None:
                conn.assoc = assoc
                self._by_assoc[id(assoc)] = conn

    def touch(self, sock: Any) -> None:
        """Note that bytes (or the end of the stream) arrived on ``sock``; wake it if parked.

        Called for every ``recv`` of an accepted socket, in the DUL thread.
        """
        conn = self._by_socket.get(id(sock))
        if conn is not None:
            conn.last_activity = time.monotonic()
            if conn.parked:
                self.unpark(conn)

    @staticmethod
    def park(conn: Connection) -> None:
        """Stop an idle association's busy polling until its next byte.

        pynetdicom runs two loops per association that wake every millisecond (the
        association reactor and its DUL), idle or not: measured here, 8 idle associations
        cost the listener 20 % of a core, and a host holding idle associations slows every
        other sender's transfers through the interpreter lock. A parked association's
        reactor waits at its checkpoint (the pause pynetdicom's own ``release()`` and
        ``send_*()`` use) and its DUL polls the socket every :data:`PARKED_LOOP_DELAY_S`;
        the first byte received (:meth:`touch`), the connection's close, a release or the
        watchdog wakes it. Activity seen while parking wakes it at once.
        """
        assoc = conn.assoc
        if assoc is None or conn.parked:
            return
        seen = conn.last_activity
        assoc._reactor_checkpoint.clear()
        assoc.dul._run_loop_delay = PARKED_LOOP_DELAY_S
        conn.parked = True
        if conn.last_activity != seen or conn.serving:  # a byte came in meanwhile
            Admission.unpark(conn)

    @staticmethod
    def unpark(conn: Connection) -> None:
        """Give a parked association its reactor and its fast DUL loop back."""
        assoc = conn.assoc
        conn.parked = False
        if assoc is not None:
            assoc.dul._run_loop_delay = ACTIVE_LOOP_DELAY_S
            assoc._reactor_checkpoint.set()

    def closed(self, sock: Any) -> None:
        """Note that the server shut ``sock`` down (end of its association, or an error)."""
        with self._lock:
            conn = self._by_socket.get(id(sock))
            if conn is not None:
                conn.closed = True
                self._publish()

    def connection(self, assoc: Association) -> Connection | None:
        """Return the connection of an association (None when not admitted here)."""
        return self._by_assoc.get(id(assoc))

    def counts(self) -> dict[PeerKind, int]:
        """Slots held now, by peer kind."""
        with self._lock:
            return self._held()

    # -- pynetdicom events -----------------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Callable[[Event], None]]]:
        """Return the notification handlers to bind, before any other ``EVT_REQUESTED`` one."""
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_DIMSE_RECV, self._on_request),
            (evt.EVT_DIMSE_SENT, self._on_response),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]

    def _on_requested(self, event: Event) -> None:
        conn = self.connection(event.assoc)
        if conn is None or conn.refusal is None:
            return
        event.assoc.acse.send_reject(
            AssociateReject.REJECTED_TRANSIENT,
            AssociateReject.SOURCE_SERVICE_PROVIDER_PRESENTATION,
            AssociateReject.LOCAL_LIMIT_EXCEEDED,
        )
        # As pynetdicom after its own rejections: the A-ASSOCIATE-RJ goes out, then the
        # peer closes (or ARTIM, or our deadline, ends the connection).
        event.assoc.kill()

    def _on_request(self, event: Event) -> None:
        conn = self.connection(event.assoc)
        if conn is not None:
            conn.serving = True
            if conn.parked:
                self.unpark(conn)

    def _on_response(self, event: Event) -> None:
        conn = self.connection(event.assoc)
        if conn is not None:
            conn.serving = False
            conn.last_activity = time.monotonic()

    def _on_close(self, event: Event) -> None:
        conn = self.connection(event.assoc)
        if conn is not None:
            if conn.parked:  # its reactor must see the abort and end
                self.unpark(conn)
            with self._lock:
                conn.closed = True
                self._publish()

    # -- watchdog --------------------------------------------------------------------------

    def watch(self, stop: threading.Event, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Run :meth:`sweep` until ``stop`` is set (the listener's watchdog thread)."""
        while not stop.wait(interval_s):
            try:
                self.sweep(time.monotonic())
            except Exception:  # the watchdog must outlive any one bad connection
                log.exception("admission watchdog")

    def sweep(self, now: float) -> None:
        """Apply the leashes at time ``now`` (monotonic) and forget closed connections."""
        releases: list[Connection] = []
        closes: list[tuple[Connection, Reason | None]] = []
        with self._lock:
            for key, conn in list(self._by_socket.items()):
                if not conn.open:
                    del self._by_socket[key]
                    self._by_assoc.pop(id(conn.assoc), None)
                    continue
                assoc = conn.assoc
                if assoc is not None and assoc.is_established and conn.release_started is None:
                    conn.deadline = None
                    idle = now - conn.last_activity
                    if not conn.serving and idle >= self.policy.idle_timeout(conn.kind):
                        conn.release_started = now
                        conn.deadline = now + self.policy.release_grace_s
                        releases.append(conn)
                    elif not conn.serving and idle >= PARK_AFTER_S:
                        self.park(conn)
                    continue
                if conn.parked:  # ended or ending: let pynetdicom wind it down
                    self.unpark(conn)
                if conn.deadline is None:  # ended after being established: closing now
                    conn.deadline = now + self.policy.release_grace_s
                if now >= conn.deadline:
                    timed_out = conn.pending and conn.refusal is None
                    closes.append((conn, Reason.REQUEST_TIMEOUT if timed_out else None))
                    conn.closed = True
            self._publish()
        for conn in releases:
            idle = now - conn.last_activity
            self._report(
                conn.address,
                Reason.IDLE_TIMEOUT,
                f"association idle for {idle:.0f} s (limit "
                f"{self.policy.idle_timeout(conn.kind):.0f} s for {conn.kind.value} peers): "
                "released, aborted if the peer does not answer",
            )
            threading.Thread(
                target=self._release, args=(conn,), name="IdleRelease", daemon=True
            ).start()
        for conn, reason in closes:
            self._shut(conn)
            if reason is not None:
                self._report(
                    conn.address,
                    reason,
                    f"no association after {now - conn.accepted_at:.0f} s: connection closed",
                )
            else:
                log.debug("connection from %s closed at its deadline", conn.address)

    @staticmethod
    def _release(conn: Connection) -> None:
        """A-RELEASE-RQ; pynetdicom sends A-ABORT when no A-RELEASE-RP comes in time."""
        assoc = conn.assoc
        if assoc is None:
            return
        Admission.unpark(conn)
        try:
            assoc.release()
        except Exception as exc:  # the watchdog's deadline closes the socket anyway
            log.debug("release of an idle association from %s: %s", conn.address, exc)

    @staticmethod
    def _shut(conn: Connection) -> None:
        """Close a connection's socket under the DUL (which may be stuck in ``recv``)."""
        sock = conn.sock
        if conn.release_started is not None and not isinstance(sock, ssl.SSLSocket):
            # A release that got stuck: say A-ABORT (service provider) before closing,
            # best effort and never blocking. Not over TLS: this thread must not write
            # to an SSL object the DUL thread may be reading.
            with contextlib.suppress(OSError):
                sock.send(_ABORT_PDU, socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            # The plain socket's shutdown: SSLSocket.shutdown would drop its SSL object
            # under the DUL thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # -- accounting ------------------------------------------------------------------------

    def _held(self) -> dict[PeerKind, int]:
        held = dict.fromkeys(PeerKind, 0)
        for conn in self._by_socket.values():
            if conn.holds_slot:
                held[conn.kind] += 1
        return held

    def _publish(self) -> None:
        for kind, count in self._held().items():
            metrics.ASSOCIATIONS_ACTIVE.labels(peer_kind=kind.value).set(count)

    def _report(self, address: str, reason: Reason, description: str) -> None:
        metrics.ASSOCIATIONS_REFUSED.labels(reason=reason.value).inc()
        log.debug("%s: %s", address, description)
        if self.on_action is not None:
            self.on_action(address, reason, description)


def _abort_pdu() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider
    pdu.reason_diagnostic = 0x00  # reason not specified
    return bytes(pdu.encode())


_ABORT_PDU = _abort_pdu()
