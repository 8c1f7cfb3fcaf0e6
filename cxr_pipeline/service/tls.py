"""TLS for DICOM associations (PS3.15 Annex B, "basic TLS secure transport"), both ways.

Every :class:`ssl.SSLContext` of the pipeline is built here, with the standard library's
defaults (TLS 1.2 or newer, certificate verification on): the listener's server context
(:func:`server_context`) and the client context used to send results to a peer
(:func:`peer_context`). pynetdicom wraps its sockets with them.

pynetdicom logs a failed TLS handshake and reports only "association failed"; the server
side even swallows it. Contexts built here therefore carry a socket class
(``SSLContext.sslsocket_class``, a documented hook) that hands each TLS error to a
callback, so the caller can record the reason ("certificate has expired", "unable to get
local issuer certificate") in the ledger and the audit trail.

The server context also defers the handshake to the association's own thread: pynetdicom
wraps accepted sockets in its single accept loop, where a client that connects and never
says "hello" would stall every other sender (a TLS slow-loris).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.settings import PeerTlsSettings, TlsSettings

DataInspector = Callable[[bytes, "ssl.SSLSocket"], None]
"""Called with each chunk of decrypted bytes a server socket reads; may raise ``OSError``
to end the connection (the listener's PDU length bound)."""

TlsErrorSink = Callable[[OSError, "ssl.SSLSocket"], None]
"""Called with a TLS error and the socket it happened on (peer address via
``getpeername``); must not raise."""

HANDSHAKE_TIMEOUT_S = 10.0
"""Longest a listener-side TLS handshake may take (same as the listener's ARTIM)."""


def _readable(path: Path | None, what: str, section: str) -> Path:
    if path is None:
        raise ConfigError(f"{section}.enabled needs {section}.{what}")
    if not Path(path).is_file():
        raise ConfigError(f"{section}.{what} file not found: {path}")
    return Path(path)


def describe_tls_error(exc: BaseException) -> str:
    """Say in a few words why a TLS connection failed (no patient data: none is involved).

    Parameters
    ----------
    exc
        The error raised by :mod:`ssl` (or a socket error during the handshake).

    Returns
    -------
    str
        E.g. ``"certificate verify failed: certificate has expired"``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return (
            "the peer closed the connection during the handshake (it may require a client "
            "certificate, or not trust ours)"
        )
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).replace("_", " ").lower()
        return str(exc.strerror or type(exc).__name__)
    return f"{type(exc).__name__}: {exc}"


def _recording(
    context: ssl.SSLContext,
    sink: TlsErrorSink | None,
    *,
    lazy: bool,
    inspector: Callable[[], DataInspector] | None = None,
) -> None:
    """Make ``context`` report TLS errors to ``sink`` (and, when ``lazy``, shake hands late).

    ``inspector`` makes one :data:`DataInspector` per socket for the bytes it reads.
    """

    def report(exc: OSError, sock: ssl.SSLSocket) -> None:
        if sink is not None and not isinstance(
            exc, ssl.SSLZeroReturnError | ssl.SSLWantReadError | ssl.SSLWantWriteError
        ):
            sink(exc, sock)

    class _ReportingSocket(ssl.SSLSocket):
        _handshaken = False
        _inspect: DataInspector | None = None

        def _inspected(self, data: bytes) -> bytes:
            if inspector is not None and data:
                if self._inspect is None:
                    self._inspect = inspector()
                self._inspect(data, self)
            return data

        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                report(exc, self)
                raise
            self._handshaken = True

        def _shake_first(self) -> None:
            if lazy and self.server_side and not self._handshaken:
                # First use in the association's thread: a bounded handshake.
                previous = self.gettimeout()
                self.settimeout(HANDSHAKE_TIMEOUT_S)
                try:
                    self.do_handshake()
                finally:
                    self.settimeout(previous)

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            self._shake_first()
            try:
                data = super().recv(buflen, flags)
            except ssl.SSLError as exc:
                report(exc, self)
                raise
            return self._inspected(data)

        def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
            self._shake_first()
            try:
                return super().recv_into(buffer, nbytes, flags)  # type: ignore[arg-type]
            except ssl.SSLError as exc:
                report(exc, self)
                raise

        def sendall(self, data: Any, flags: int = 0) -> None:
            self._shake_first()
            try:
                super().sendall(data, flags)
            except ssl.SSLError as exc:
                report(exc, self)
                raise

        def send(self, data: Any, flags: int = 0) -> int:
            self._shake_first()
            try:
                return super().send(data, flags)
            except ssl.SSLError as exc:
                report(exc, self)
                raise

        def pending(self) -> int:
            if lazy and self.server_side and not self._handshaken:
                return 0  # nothing decrypted yet; recv() shakes hands once data is there
            return super().pending()

    context.sslsocket_class = _ReportingSocket


class _ServerContext(ssl.SSLContext):
    """A server context whose sockets shake hands on first use, not inside ``accept``."""

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, *args: Any, **kwargs: Any
    ) -> ssl.SSLSocket:
        if server_side:
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side, *args, **kwargs)


def server_context(
    settings: TlsSettings,
    *,
    on_error: TlsErrorSink | None = None,
    inspector: Callable[[], DataInspector] | None = None,
) -> ssl.SSLContext | None:
    """Build the listener's TLS context, or None when TLS is disabled.

    Parameters
    ----------
    settings
        Certificate, private key, optional CA bundle for client certificates and whether
        a client certificate is required.
    on_error
        Called with each TLS error of an incoming connection (failed handshake, refused
        client certificate), e.g. to write a Security Alert.
    inspector
        Makes, per connection, a check of the decrypted bytes read (PDU length bound).

    Returns
    -------
    ssl.SSLContext or None
        A server-side context: TLS 1.2+, client certificates verified against
        ``ca_certificates`` when given (required when ``require_client_certificate``).

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or a client certificate is required without a CA.
    """
    if not settings.enabled:
        return None
    section = "listener.tls"
    certificate = _readable(settings.certificate, "certificate", section)
    private_key = _readable(settings.private_key, "private_key", section)
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=certificate, keyfile=private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the listener's TLS certificate or key: {exc}") from exc
    if settings.ca_certificates is not None:
        ca = _readable(settings.ca_certificates, "ca_certificates", section)
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA certificates: {exc}") from exc
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    elif settings.require_client_certificate:
        raise ConfigError("listener.tls.require_client_certificate needs ca_certificates")
    else:
        context.verify_mode = ssl.CERT_NONE
    _recording(context, on_error, lazy=True, inspector=inspector)
    return context


def client_context(
    ca_certificates: Path | None,
    *,
    certificate: Path | None = None,
    private_key: Path | None = None,
    check_hostname: bool = True,
    verify: bool = True,
    on_error: TlsErrorSink | None = None,
) -> ssl.SSLContext:
    """Build a client-side TLS context (an SCU connecting to a TLS listener).

    Parameters
    ----------
    ca_certificates
        CA bundle (or the self-signed server certificate) that signs the server's; None:
        the system's trust store.
    certificate, private_key
        Client certificate and key, for listeners that require one.
    check_hostname
        Verify the server certificate's host name.
    verify
        Verify the server's certificate at all (off: no chain or name check).
    on_error
        Called with each TLS error on the connection.

    Returns
    -------
    ssl.SSLContext
        The context to pass to ``AE.associate(..., tls_args=(context, hostname))``.

    Raises
    ------
    ConfigError
        A file is missing or unreadable.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if ca_certificates is None else str(ca_certificates),
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS CA certificates {ca_certificates}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname and verify
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        try:
            context.load_cert_chain(certfile=certificate, keyfile=private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client TLS certificate or key: {exc}") from exc
    _recording(context, on_error, lazy=False)
    return context


def peer_context(
    settings: PeerTlsSettings, *, on_error: TlsErrorSink | None = None
) -> ssl.SSLContext | None:
    """Build the client context for sending to one peer, or None when its TLS is off.

    Parameters
    ----------
    settings
        The peer's ``tls`` table (CA bundle, client certificate and key, verification).
    on_error
        Called with each TLS error on the connection.

    Returns
    -------
    ssl.SSLContext or None
        For ``tls_args``.

    Raises
    ------
    ConfigError
        A named file is missing or unreadable.
    """
    if not settings.enabled:
        return None
    section = "send peer tls"
    ca = None
    if settings.ca_certificates is not None:
        ca = _readable(settings.ca_certificates, "ca_certificates", section)
    certificate = None
    if settings.certificate is not None:
        certificate = _readable(settings.certificate, "certificate", section)
    key = None
    if settings.private_key is not None:
        key = _readable(settings.private_key, "private_key", section)
    return client_context(
        ca,
        certificate=certificate,
        private_key=key,
        check_hostname=settings.verify,
        verify=settings.verify,
        on_error=on_error,
    )
