"""STOW-RS in: ``cxr-listen --dicomweb-port N`` takes ``POST /studies`` over HTTP(S).

A DICOMweb sender (a cloud PACS, a modern archive's forwarding rule) posts instances as
``multipart/related; type="application/dicom"`` (PS3.18 10.5). Each part goes through the
C-STORE path's own admission (:meth:`listeners.handlers.StoreHandler.admit`: chest check,
spool fsync, ledger row, queue), so the guarantee is the same: the answer is sent only
after every instance it reports as stored is on disk and recorded. The response is a
DICOM JSON data set (PS3.18 10.5.3) with a ReferencedSOPSequence item per instance taken
for analysis and a FailedSOPSequence item (Failure Reason) per instance that was not:
objects that are not chest radiographs are recorded as skipped, as with C-STORE, and
listed as failed with :data:`~cxr_pipeline.dicom.codes.StowFailureReason.NOT_ANALYSED`
and the reason in a ``Warning`` header. HTTP 200 when all were taken, 202 when some, 409
when none; the whole request is refused, with nothing stored, when it is malformed (400:
truncated body, bad multipart), of another media type (415), too large (413, before the
body is read), too slow (408) or not authorised (401).

Off unless ``listener.dicomweb.port`` is set. Every request needs a bearer token from the
allow-list (``tokens_file`` / ``tokens_env``), unless ``allow_anonymous`` is set for a
lab; refusals are audited. HTTPS with the listener's TLS settings (``listener.tls``: the
same certificate, key and client-certificate policy as DICOM TLS).

Why the standard library's :class:`~http.server.ThreadingHTTPServer` and a hand-written
multipart splitter: one endpoint, one method, and the server must decide when the body is
read (size checked before, time limited while) and when the answer goes (after the spool
and ledger writes), which ``http.server`` leaves to us; a web framework would add a large
dependency for that. ``dicomweb-client`` is a client library (no server side), and the
standard ``email`` parser is built for mail, not for hundreds of megabytes of binary parts.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from cxr_pipeline.dicom.codes import (
    MEDIA_TYPE_DICOM,
    MEDIA_TYPE_DICOM_JSON,
    MEDIA_TYPE_MULTIPART_RELATED,
    STOW_WARNING_CODE,
    DimseStatus,
    StowFailureReason,
)
from cxr_pipeline.errors import ConfigError, InvalidUid, Reason
from cxr_pipeline.service.spool import validate_uid
from cxr_pipeline.service.tls import server_context
from cxr_pipeline.settings import DicomwebListenerSettings, Settings
from listeners.handlers import StoreHandler

log = logging.getLogger(__name__)

STOW_CALLING_AE = "STOW-RS"
"""The ledger's calling AE of instances received by STOW-RS (no AE title in HTTP)."""

READ_CHUNK = 1 << 20
"""Bytes read from the socket at a time (the deadline is checked between reads)."""

_PATH = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*/studies(?:/(?P<study>[0-9.]+))?/?$")
"""``/studies`` or ``/studies/{StudyInstanceUID}``, under any base path (``/dicom-web``)."""


class MultipartError(ValueError):
    """A request body that is not a complete multipart message."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into its media type and parameters (lower-case names)."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): str(v) for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body (RFC 2046 5.1) into (headers, content) parts.

    Parameters
    ----------
    body
        The whole request body.
    boundary
        The ``boundary`` parameter of its Content-Type.

    Returns
    -------
    list of (dict, bytes)
        Header names lower-cased; content exactly as sent.

    Raises
    ------
    MultipartError
        No opening boundary, or the body ends before the closing one (truncated).
    """
    delimiter = b"--" + boundary.encode("latin-1")
    position = body.find(delimiter)
    if position < 0:
        raise MultipartError("no multipart boundary in the body")
    position += len(delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise MultipartError("the body ends inside a boundary line (truncated)")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError(
                f"the body ends inside part {len(parts) + 1} (truncated: no closing boundary)"
            )
        part = body[start:end]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            head, separator, content = part.partition(b"\r\n\r\n")
            if not separator:
                raise MultipartError(f"part {len(parts) + 1} has no end of headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        position = end + 2 + len(delimiter)


def load_tokens(settings: DicomwebListenerSettings) -> frozenset[str]:
    """Read the bearer-token allow-list (file lines and/or an environment variable).

    Raises
    ------
    ConfigError
        The file cannot be read, or no token source is set and anonymous access is off.
    """
    tokens: set[str] = set()
    if settings.tokens_file is not None:
        try:
            text = settings.tokens_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read listener.dicomweb.tokens_file {settings.tokens_file}: {exc.strerror}"
            ) from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.add(line)
    if settings.tokens_env is not None:
        tokens.update(t for t in re.split(r"[\s,]+", os.environ.get(settings.tokens_env, "")) if t)
    if not tokens and not settings.allow_anonymous:
        raise ConfigError(
            "listener.dicomweb: no bearer token configured (tokens_file or tokens_env); "
            "set allow_anonymous = true only for a lab"
        )
    return frozenset(tokens)


@dataclass
class _Outcome:
    """Per-instance results of one request, for the response."""

    referenced: list[Dataset] = field(default_factory=list)
    failed: list[Dataset] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def take(self, sop_class: str, uid: str) -> None:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        self.referenced.append(item)

    def fail(self, sop_class: str, uid: str, reason: int, why: str) -> None:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        self.failed.append(item)
        text = why.replace('"', "'")[:300]
        self.warnings.append(f'{STOW_WARNING_CODE} cxr-listen "{uid or "?"}: {text}"')

    @property
    def status(self) -> HTTPStatus:
        if not self.failed:
            return HTTPStatus.OK
        return HTTPStatus.ACCEPTED if self.referenced else HTTPStatus.CONFLICT

    def body(self) -> bytes:
        response = Dataset()
        if self.referenced:
            response.ReferencedSOPSequence = self.referenced
        if self.failed:
            response.FailedSOPSequence = self.failed
        return json.dumps(response.to_json_dict()).encode()


class _Refused(Exception):
    """Refuse the whole request with this HTTP status and reason."""

    def __init__(self, status: HTTPStatus, why: str, headers: dict[str, str] | None = None):
        super().__init__(why)
        self.status, self.why, self.headers = status, why, headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        store: StoreHandler,
        settings: DicomwebListenerSettings,
        tokens: frozenset[str],
        on_refused: Callable[[str, str], None] | None,
        max_requests: int,
        context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(address, _StowHandler)
        self.context = context
        self.store = store
        self.settings = settings
        self.tokens = tokens
        self.on_refused = on_refused
        self.slots = threading.BoundedSemaphore(max_requests)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection and, with TLS, wrap it.

        The handshake runs in the connection's own thread on first use, so a silent client
        cannot hold up ``accept``.
        """
        connection, address = self.socket.accept()
        if self.context is not None:
            connection = self.context.wrap_socket(connection, server_side=True)
        return connection, address


class _StowHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cxr-listen"

    def setup(self) -> None:
        limit = self.server.settings.timeout_s
        # A hard stop for a client trickling its request line and headers byte by byte
        # (the body has its own deadline and gets a 408 answer).
        self._watchdog = threading.Timer(2 * limit + 5.0, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        super().setup()
        self.connection.settimeout(limit)  # each socket read

    def finish(self) -> None:
        self._watchdog.cancel()
        super().finish()

    def _expire(self) -> None:
        log.warning("STOW-RS connection from %s closed: too slow", self.client_address[0])
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("stow-rs http: " + format, *args)

    def _answer(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str]
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _refuse(self, refusal: _Refused) -> None:
        log.warning("STOW-RS from %s refused: %s", self.client_address[0], refusal.why)
        body = json.dumps({"error": refusal.why}).encode()
        # The client may be gone (e.g. it closed after a truncated body).
        with contextlib.suppress(OSError):
            self._answer(refusal.status, body, "application/json", refusal.headers)

    def do_GET(self) -> None:
        self._refuse(_Refused(HTTPStatus.METHOD_NOT_ALLOWED, "only POST /studies (STOW-RS)"))

    def do_POST(self) -> None:
        """Handle one STOW-RS request."""
        if not self.server.slots.acquire(blocking=False):
            self._refuse(_Refused(HTTPStatus.SERVICE_UNAVAILABLE, "too many requests at once"))
            return
        try:
            outcome = self._store_all()
        except _Refused as refusal:
            self._refuse(refusal)
        else:
            headers = {"Warning": ", ".join(outcome.warnings)} if outcome.warnings else {}
            self._answer(outcome.status, outcome.body(), MEDIA_TYPE_DICOM_JSON, headers)
        finally:
            self.server.slots.release()

    # -- the request, step by step -------------------------------------------------------

    def _store_all(self) -> _Outcome:
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            raise _Refused(HTTPStatus.NOT_FOUND, "STOW-RS is POST /studies[/{study}]")
        self._authorise()
        boundary = self._check_media_type()
        body = self._read_body()
        try:
            parts = split_multipart(body, boundary)
        except MultipartError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"{exc}; nothing stored") from exc
        if not parts:
            raise _Refused(HTTPStatus.BAD_REQUEST, "no instance in the request")
        for number, (headers, _) in enumerate(parts, start=1):
            media_type, _ = parse_media_type(headers.get("content-type", MEDIA_TYPE_DICOM))
            if media_type != MEDIA_TYPE_DICOM:
                raise _Refused(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"part {number} is {media_type}: only {MEDIA_TYPE_DICOM} parts are taken",
                )
        outcome = _Outcome()
        for _, content in parts:
            self._store_one(content, match.group("study"), outcome)
        return outcome

    def _authorise(self) -> None:
        tokens = self.server.tokens
        if not tokens and self.server.settings.allow_anonymous:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode()
        accepted = scheme.lower() == "bearer" and any(
            hmac.compare_digest(given, known.encode()) for known in tokens
        )
        if not accepted:
            why = "STOW-RS: no bearer token" if not token else "STOW-RS: bearer token refused"
            if self.server.on_refused is not None:
                self.server.on_refused(str(self.client_address[0]), why)
            raise _Refused(
                HTTPStatus.UNAUTHORIZED, why, {"WWW-Authenticate": 'Bearer realm="cxr-listen"'}
            )

    def _check_media_type(self) -> str:
        media_type, params = parse_media_type(self.headers.get("Content-Type", ""))
        part_type = params.get("type", MEDIA_TYPE_DICOM).lower()
        if media_type != MEDIA_TYPE_MULTIPART_RELATED or part_type != MEDIA_TYPE_DICOM:
            raise _Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f'want {MEDIA_TYPE_MULTIPART_RELATED}; type="{MEDIA_TYPE_DICOM}", got '
                f"{media_type} (type {part_type})",
            )
        boundary = params.get("boundary")
        if not boundary:
            raise _Refused(HTTPStatus.BAD_REQUEST, "multipart/related without a boundary")
        return boundary

    def _read_body(self) -> bytes:
        """Read the whole body within the size and time limits.

        Content-Length or chunked: dicomweb-client sends bodies over 1 MB in chunks.
        """
        settings = self.server.settings
        deadline = time.monotonic() + settings.timeout_s
        body = io.BytesIO()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self._read_line(deadline)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _Refused(HTTPStatus.BAD_REQUEST, "bad chunk size line") from None
                if size == 0:
                    while self._read_line(deadline).strip():
                        pass  # trailer fields, up to the empty line
                    return body.getvalue()
                self._check_size(body.tell() + size)
                self._read_exact(size, deadline, body)
                if self._read_line(deadline).strip():
                    raise _Refused(HTTPStatus.BAD_REQUEST, "chunk longer than its size line")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length required") from None
        self._check_size(length)
        self._read_exact(length, deadline, body)
        return body.getvalue()

    def _check_size(self, length: int) -> None:
        limit = self.server.settings.max_body_bytes
        if length < 0 or length > limit:
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {limit}"
            )

    def _read_line(self, deadline: float) -> bytes:
        if time.monotonic() > deadline:
            raise self._too_slow()
        try:
            line = self.rfile.readline(1024)
        except TimeoutError:
            raise self._too_slow() from None
        if not line.endswith(b"\n"):
            raise _Refused(HTTPStatus.BAD_REQUEST, "chunked body truncated; nothing stored")
        return line

    def _read_exact(self, length: int, deadline: float, body: io.BytesIO) -> None:
        remaining = length
        while remaining:
            if time.monotonic() > deadline:
                raise self._too_slow()
            try:
                chunk = self.rfile.read1(min(remaining, READ_CHUNK))
            except TimeoutError:
                raise self._too_slow() from None
            if not chunk:
                raise _Refused(
                    HTTPStatus.BAD_REQUEST,
                    f"body ended {remaining} bytes short of what was announced (truncated); "
                    "nothing stored",
                )
            body.write(chunk)
            remaining -= len(chunk)

    def _too_slow(self) -> _Refused:
        limit = self.server.settings.timeout_s
        return _Refused(HTTPStatus.REQUEST_TIMEOUT, f"body not received in {limit} s")

    def _store_one(self, content: bytes, study: str | None, outcome: _Outcome) -> None:
        store = self.server.store
        try:
            ds = pydicom.dcmread(io.BytesIO(content))
            sop_class = str(ds.get("SOPClassUID", "") or "")
            uid = validate_uid(str(ds.get("SOPInstanceUID", "") or ""))
        except InvalidUid:
            outcome.fail("", "", StowFailureReason.CANNOT_UNDERSTAND, "invalid SOP Instance UID")
            return
        except Exception as exc:  # any parse failure: pydicom raises many types
            why = f"not a DICOM Part 10 object ({type(exc).__name__})"
            outcome.fail("", "", StowFailureReason.CANNOT_UNDERSTAND, why)
            return
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            why = "its Study Instance UID differs from the request's"
            outcome.fail(sop_class, uid, StowFailureReason.DATASET_DOES_NOT_MATCH, why)
            return
        if not store.has_room(uid):
            why = "spool below its free-space watermark"
            outcome.fail(sop_class, uid, StowFailureReason.OUT_OF_RESOURCES, why)
            return
        try:
            admission = store.admit(uid, ds, lambda: content, STOW_CALLING_AE)
        except Exception as exc:  # recorded per instance; the others still go through
            log.error("STOW-RS of %s failed: %s", uid, type(exc).__name__)
            why = f"not stored ({type(exc).__name__})"
            outcome.fail(sop_class, uid, StowFailureReason.PROCESSING_FAILURE, why)
            return
        if admission.status == DimseStatus.OUT_OF_RESOURCES:
            outcome.fail(sop_class, uid, StowFailureReason.OUT_OF_RESOURCES, "spool full")
        elif admission.skipped:
            code = (
                StowFailureReason.SOP_CLASS_NOT_SUPPORTED
                if admission.reason is Reason.NOT_IMAGE
                else StowFailureReason.NOT_ANALYSED
            )
            outcome.fail(sop_class, uid, code, f"recorded, not analysed: {admission.skipped}")
        else:
            outcome.take(sop_class, uid)


@dataclass
class StowServer:
    """A running STOW-RS endpoint."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    tls: bool

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_stow_server(
    settings: Settings,
    store: StoreHandler,
    *,
    on_refused: Callable[[str, str], None] | None = None,
    on_tls_error: Callable[..., None] | None = None,
) -> StowServer | None:
    """Serve STOW-RS in a background thread when ``listener.dicomweb.port`` is set.

    Parameters
    ----------
    settings
        ``listener.dicomweb`` (port, tokens, limits), ``listener.tls``, ``listener.host``
        and ``listener.max_associations`` (most requests at once).
    store
        The C-STORE handler whose admission every instance goes through.
    on_refused
        Called with (client address, reason) for each refused token (audit).
    on_tls_error
        Called with each failed TLS handshake (audit).

    Returns
    -------
    StowServer or None
        None when the endpoint is off.

    Raises
    ------
    ConfigError
        No token source (and anonymous access off), or unreadable TLS files.
    OSError
        The port cannot be bound.
    """
    web = settings.listener.dicomweb
    if web.port is None:
        return None
    tokens = load_tokens(web)
    context = server_context(settings.listener.tls, on_error=on_tls_error)
    host = web.host if web.host is not None else settings.listener.host
    server = _Server(
        (host, web.port),
        store,
        web,
        tokens,
        on_refused,
        settings.listener.max_associations,
        context,
    )
    thread = threading.Thread(target=server.serve_forever, name="cxr-stow-rs", daemon=True)
    thread.start()
    scheme = "https" if context is not None else "http"
    log.info("STOW-RS on %s://%s:%d/studies", scheme, host, server.server_address[1])
    return StowServer(server=server, thread=thread, tls=context is not None)
