"""Send audit messages to a syslog collector: RFC 5424 over UDP, TCP or TLS.

Written here because the standard library's :class:`logging.handlers.SysLogHandler`
speaks the older BSD format (RFC 3164) and has no TLS transport, and audit record
repositories (IHE ATNA) expect RFC 5424 with the XML as MSG, over TLS (RFC 5425) where
the network is not trusted. TCP and TLS frames use octet counting (RFC 6587 3.4.1, the
framing RFC 5425 mandates), so a message may contain new lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from datetime import UTC, datetime

from cxr_pipeline.service.tls import peer_context
from cxr_pipeline.settings import AuditSettings

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10
"""Security/authorization messages (RFC 5424 6.2.1): where ATNA repositories expect audits."""
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
MSGID_AUDIT = "IHE+RFC-3881"
"""MSGID that IHE ATNA gives DICOM audit messages (ITI TF-2 3.20.7.1)."""
MAX_UDP_BYTES = 65_000
"""Larger messages cannot travel in one UDP datagram; they are sent truncated."""


def _header_field(text: str, limit: int) -> str:
    cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def format_rfc5424(
    message: str,
    *,
    app_name: str,
    severity: int = SEVERITY_NOTICE,
    hostname: str | None = None,
    when: datetime | None = None,
) -> bytes:
    """Encode one RFC 5424 syslog message.

    Parameters
    ----------
    message
        The MSG part (here: an audit message's XML), sent as UTF-8 with a BOM.
    app_name
        APP-NAME.
    severity
        RFC 5424 severity (5 notice, 4 warning).
    hostname
        HOSTNAME; None: this machine's name.
    when
        TIMESTAMP; None: now (UTC, microseconds).

    Returns
    -------
    bytes
        ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG``.
    """
    stamp = (when or datetime.now(UTC)).isoformat(timespec="microseconds")
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            stamp.replace("+00:00", "Z"),
            _header_field(hostname or socket.gethostname(), 255),
            _header_field(app_name, 48),
            str(os.getpid()),
            MSGID_AUDIT,
            "-",
        )
    )
    return header.encode("ascii") + b" \xef\xbb\xbf" + message.encode("utf-8")


class SyslogSender:
    """One connection to a syslog collector, reopened after a failure; never raises.

    Parameters
    ----------
    settings
        ``[audit]``: host, port, transport, TLS and APP-NAME.
    """

    def __init__(self, settings: AuditSettings) -> None:
        if settings.syslog_host is None:
            raise ValueError("no syslog host")
        self._settings = settings
        self._host = settings.syslog_host
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._context: ssl.SSLContext | None = None
        if settings.syslog_transport == "tls":
            self._context = peer_context(settings.syslog_tls.model_copy(update={"enabled": True}))

    def _connect(self) -> socket.socket:
        transport = self._settings.syslog_transport
        if transport == "udp":
            family = socket.getaddrinfo(self._host, self._settings.syslog_port)[0][0]
            return socket.socket(family, socket.SOCK_DGRAM)
        sock = socket.create_connection((self._host, self._settings.syslog_port), timeout=10)
        if self._context is not None:
            name = self._settings.syslog_tls.server_name or self._host
            sock = self._context.wrap_socket(sock, server_hostname=name)
        return sock

    def send(self, message: str, *, severity: int = SEVERITY_NOTICE) -> bool:
        """Send one message; on failure log a warning and return False (the file has it).

        Parameters
        ----------
        message
            The MSG (the audit XML).
        severity
            RFC 5424 severity.

        Returns
        -------
        bool
            Whether it was handed to the transport.
        """
        frame = format_rfc5424(message, app_name=self._settings.syslog_app_name, severity=severity)
        with self._lock:
            for attempt in (1, 2):  # a collector restart breaks the kept TCP connection once
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    if self._settings.syslog_transport == "udp":
                        self._sock.sendto(
                            frame[:MAX_UDP_BYTES], (self._host, self._settings.syslog_port)
                        )
                    else:
                        self._sock.sendall(str(len(frame)).encode("ascii") + b" " + frame)
                    return True
                except OSError as exc:
                    self.close_locked()
                    if attempt == 2:
                        log.warning(
                            "audit message not sent to syslog %s:%d (%s)",
                            self._host,
                            self._settings.syslog_port,
                            exc,
                        )
        return False

    def close_locked(self) -> None:
        """Close the connection (caller holds the lock, or no other thread uses it)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.close_locked()
