"""The listener's association server: pynetdicom's, with bounds on what a socket may hold.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` trusts the peer in
three ways that let a hostile client lock real senders out or grow memory (measured in
``tests/reliability/test_protocol_hostile.py``):

- accepted sockets are blocking without a timeout, so a client that sends part of a PDU
  header and stops leaves the association's DUL thread in ``recv`` forever; the
  association thread's ``kill()`` after ARTIM then waits for that thread for ever, and
  the slot counts against ``max_associations`` until the listener restarts;
- a client can trickle an A-ASSOCIATE-RQ one byte at a time, never finishing it;
- the PDU length field (up to 4 GiB) is believed: the DUL appends whatever arrives to one
  buffer until that many bytes came.

:class:`GuardedAssociationServer` gives every accepted socket a read/write timeout, lets
:class:`listeners.admission.Admission` admit or refuse each connection by address (its
watchdog closes a connection whose association is not established in time and releases
idle ones), and refuses (closes) a connection whose PDU length exceeds
:data:`MAX_PDU_BYTES`. It is plugged in through pynetdicom's public
``AE.make_server(server_class=...)``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from listeners.admission import Admission

log = logging.getLogger(__name__)

GC_INTERVAL_S = 30.0
"""Least time between two ``gc.collect()`` of the accept loop (see ``service_actions``)."""

SOCKET_TIMEOUT_S = 30.0
"""Longest a read or write of an accepted socket may block without progress. The DUL only
reads once ``select`` says data is there, so an idle association is not affected; a PDU
that stops half-way for this long ends the connection."""

MAX_PDU_BYTES = 4 * 1024 * 1024
"""Largest PDU accepted (length field). Our A-ASSOCIATE-AC tells senders our maximum
P-DATA length (pynetdicom's 16382 by default); an association request with 128
presentation contexts is under 100 KiB. A larger length is an attack or a broken peer."""

_HEADER = struct.Struct(">BBL")


class PduLengthGuard:
    """Follow the PDU boundaries of one connection's bytes; raise at an oversized length."""

    def __init__(self, limit: int = MAX_PDU_BYTES) -> None:
        self.limit = limit
        self._header = b""
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        """Account for bytes just received.

        Raises
        ------
        ConnectionAbortedError
            A PDU header announces more than ``limit`` bytes.
        """
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = _HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == _HEADER.size:
                pdu_type, _, length = _HEADER.unpack(self._header)
                self._header = b""
                if length > self.limit:
                    raise ConnectionAbortedError(
                        f"PDU type 0x{pdu_type:02X} announces {length} bytes "
                        f"(limit {self.limit}): connection closed"
                    )
                self._remaining = length


class _GuardedSocket(socket.socket):
    """An accepted TCP socket that checks PDU lengths as it reads."""

    _guard: PduLengthGuard | None = None
    on_refused: Callable[[str, str], None] | None = None
    on_data: Callable[[Any], None] | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if self.on_data is not None:  # bytes, or b"" at the end of the stream
            self.on_data(self)
        if self._guard is None:
            self._guard = PduLengthGuard()
        try:
            self._guard.feed(data)
        except ConnectionAbortedError as exc:
            peer = _peer(self)
            log.warning("connection from %s refused: %s", peer, exc)
            if self.on_refused is not None:
                self.on_refused(peer, str(exc))
            with contextlib.suppress(OSError):  # nothing more is read from this peer
                self.shutdown(socket.SHUT_RDWR)
            raise
        return data


def pdu_inspector(
    on_refused: Callable[[str, str], None] | None,
    on_data: Callable[[Any], None] | None = None,
) -> Callable[[], Callable[[bytes, Any], None]]:
    """Return per-connection PDU length checks for TLS sockets (``server_context``).

    ``on_data`` is called with the socket for every chunk read (the admission's clock of
    idleness: :meth:`listeners.admission.Admission.touch`).
    """

    def make() -> Callable[[bytes, Any], None]:
        guard = PduLengthGuard()

        def inspect(data: bytes, sock: Any) -> None:
            if on_data is not None:
                on_data(sock)
            try:
                guard.feed(data)
            except ConnectionAbortedError as exc:
                peer = _peer(sock)
                log.warning("connection from %s refused: %s", peer, exc)
                if on_refused is not None:
                    on_refused(peer, str(exc))
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                raise

        return inspect

    return make


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return ""


class AdmittedRequestHandler(RequestHandler):
    """pynetdicom's request handler, telling :class:`Admission` which association is whose.

    ``handle`` is pynetdicom's own three steps (make the association, announce the
    connection, start it) with the association bound to its connection before it starts,
    so the first event already finds it.
    """

    server: GuardedAssociationServer

    def handle(self) -> None:
        """Make the acceptor association of this connection and start it."""
        assoc = self._create_association()
        self.server.admission.attach(self.request, assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission by address, socket timeouts and PDU bounds.

    :func:`start_guarded_server` sets ``admission`` and ``on_refused`` (called with the peer
    address and the reason of a connection closed for an oversized PDU) before it serves.
    """

    admission: Admission
    on_refused: Callable[[str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", AdmittedRequestHandler)
        super().__init__(*args, **kwargs)
        self._collected_at = time.monotonic()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection: timeout and PDU guard first, then TLS (as pynetdicom does)."""
        listening = self.socket
        assert listening is not None
        client, address = listening.accept()
        guarded = _GuardedSocket(client.family, client.type, client.proto, fileno=client.detach())
        guarded.on_refused = self.on_refused
        guarded.on_data = self.admission.touch
        guarded.settimeout(SOCKET_TIMEOUT_S)
        sock: socket.socket = guarded
        if self.ssl_context:
            # Our contexts defer the handshake to the association's thread
            # (cxr_pipeline.service.tls) and check PDU lengths on the decrypted bytes.
            sock = self.ssl_context.wrap_socket(guarded, server_side=True)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection or have it closed unread (:meth:`Admission.admit`)."""
        return self.admission.admit(request, str(client_address[0]))

    def shutdown_request(self, request: Any) -> None:
        """Close a connection (pynetdicom calls this when an association ends)."""
        self.admission.closed(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Collect garbage at most every :data:`GC_INTERVAL_S` seconds.

        pynetdicom runs ``gc.collect()`` every 60 passes of the accept loop, i.e. every 60
        connections under a reconnect loop; a full collection of this process (torch
        loaded) holds the GIL for a while and stalls every transfer. Dead association
        threads are still collected, on a clock instead of a connection count.
        """
        now = time.monotonic()
        if now - self._collected_at >= GC_INTERVAL_S:
            self._collected_at = now
            gc.collect()


def start_guarded_server(
    ae: AE,
    address: tuple[str, int],
    *,
    evt_handlers: list[Any],
    ssl_context: Any,
    admission: Admission,
    on_refused: Callable[[str, str], None] | None,
) -> tuple[GuardedAssociationServer, threading.Event]:
    """Start the server and its watchdog in daemon threads (as ``AE.start_server`` does).

    Parameters
    ----------
    ae
        The listener's AE.
    address
        Where to listen.
    evt_handlers
        pynetdicom handlers; the admission's own are bound first.
    ssl_context
        TLS context or None.
    admission
        Caps and leashes (:mod:`listeners.admission`); its watchdog runs in a thread.
    on_refused
        Called for a connection closed for an oversized PDU.

    Returns
    -------
    tuple
        The server (``shutdown()`` stops it) and the event that stops the watchdog.
    """
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=[*admission.handlers(), *evt_handlers],
        server_class=GuardedAssociationServer,
    )
    assert isinstance(server, GuardedAssociationServer)
    server.admission = admission
    server.on_refused = on_refused
    stop = threading.Event()
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    threading.Thread(
        target=admission.watch, args=(stop,), name="AssociationWatchdog", daemon=True
    ).start()
    ae._servers.append(server)  # so AE.shutdown() stops it too, as with start_server
    return server, stop
