"""Same-origin web server: OHIF v3's built files plus a ``/dicom-web`` proxy to Orthanc.

OHIF is a single-page app: a path that is not a file (``/viewer``, ``/viewer/dicomsr``)
must return ``index.html`` so the app's router can read it, as the package's own
``_redirects`` rule (``/* /index.html 200``) says. ``/app-config.js`` is generated (our
data source instead of the package's demo server). ``/dicom-web/...`` is forwarded to
Orthanc's DICOMweb plugin with the method, query, body and content headers, and the
answer is streamed back.

The standard library's threading HTTP server is used on purpose: this is a local
viewing aid for one user, and it keeps the runtime free of a web framework.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import mimetypes
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from viewer.ohif_config import DICOMWEB_PREFIX, app_config_js

log = logging.getLogger(__name__)

_FORWARDED_REQUEST_HEADERS = ("Accept", "Content-Type", "Content-Length", "Range")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "server"}
)
_CHUNK = 256 * 1024
_EXTRA_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript"}


@dataclass(frozen=True)
class Upstream:
    """Where Orthanc's HTTP server answers (loopback)."""

    host: str
    port: int


def content_type(path: Path) -> str:
    """MIME type of a static file (``.wasm`` must be ``application/wasm`` for streaming)."""
    if path.suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[path.suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def _handler_class(
    root: Path, upstream: Upstream, config_js: bytes
) -> type[BaseHTTPRequestHandler]:
    index = root / "index.html"
    resolved_root = root.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cxr-viewer"

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        # -- dispatch ------------------------------------------------------------------

        def do_GET(self) -> None:
            self._dispatch()

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

        def do_DELETE(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            path = urlsplit(self.path).path
            if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static(path)
            else:
                self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        # -- static files --------------------------------------------------------------

        def _static(self, path: str) -> None:
            if path == "/app-config.js":
                self._send_bytes(config_js, "text/javascript", cache=False)
                return
            candidate = (root / path.lstrip("/")).resolve()
            inside = candidate == resolved_root or resolved_root in candidate.parents
            target = candidate if inside and candidate.is_file() else index
            self._send_file(target)

        def _send_bytes(self, body: bytes, mime: str, *, cache: bool) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-cache")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_file(self, target: Path) -> None:
            size = target.stat().st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type(target))
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-cache" if target == index else "max-age=3600")
            self.end_headers()
            if self.command == "HEAD":
                return
            with target.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    self.wfile.write(chunk)

        # -- DICOMweb proxy ------------------------------------------------------------

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                name: value
                for name in _FORWARDED_REQUEST_HEADERS
                if (value := self.headers.get(name)) is not None
            }
            connection = http.client.HTTPConnection(upstream.host, upstream.port, timeout=120)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                # Orthanc may answer chunked; the answer is re-sent with a length or
                # chunked, as HTTP/1.1 requires one of them.
                declared = answer.getheader("Content-Length")
                if declared is not None:
                    self.send_header("Content-Length", declared)
                    self.end_headers()
                    if self.command != "HEAD":
                        while chunk := answer.read(_CHUNK):
                            self.wfile.write(chunk)
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if self.command != "HEAD":
                        while chunk := answer.read(_CHUNK):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                log.warning("DICOMweb proxy to Orthanc failed: %s", exc)
                if not self.wfile.closed:
                    with contextlib.suppress(OSError):
                        self.send_error(HTTPStatus.BAD_GATEWAY, "Orthanc is not answering")
            finally:
                connection.close()

    return Handler


class ViewerServer:
    """The OHIF + DICOMweb proxy HTTP server, running in a background thread.

    Parameters
    ----------
    ohif_dir
        The ``dist/`` folder of npm ``@ohif/app`` (holds ``index.html``).
    upstream
        Orthanc's HTTP address.
    host, port
        Where to listen; port 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, ohif_dir: Path, upstream: Upstream, host: str = "127.0.0.1", port: int = 0):
        if not (ohif_dir / "index.html").is_file():
            raise FileNotFoundError(
                f"{ohif_dir} holds no OHIF build (index.html); run scripts/setup "
                "(it fetches npm @ohif/app into web/ohif)"
            )
        handler = _handler_class(ohif_dir, upstream, app_config_js())
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},  # stop() returns within 0.1 s
            name="cxr-viewer-http",
            daemon=True,
        )

    @property
    def host(self) -> str:
        """The address listened on."""
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The port listened on."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the viewer."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ViewerServer:
        """Start serving in the background; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (if started) and close the socket."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
