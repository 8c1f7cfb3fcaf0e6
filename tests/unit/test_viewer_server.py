"""The viewer's web server: OHIF files, SPA fallback, generated config, DICOMweb proxy."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from viewer.ohif_config import app_config
from viewer.server import Upstream, ViewerServer


class _FakeOrthanc(BaseHTTPRequestHandler):
    """Echoes what it received, as JSON, like a DICOMweb answer would come back."""

    protocol_version = "HTTP/1.1"
    chunked = False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "accept": self.headers.get("Accept"),
                "body": body.decode(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        if self.path.endswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(payload) // 2
            for part in (payload[:half], payload[half:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    do_GET = _answer  # noqa: N815
    do_POST = _answer  # noqa: N815


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOrthanc)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield Upstream("127.0.0.1", int(httpd.server_address[1]))
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def ohif_dir(tmp_path: Path) -> Path:
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<html>OHIF index</html>")
    (root / "app.bundle.js").write_text("console.log('app');")
    (root / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    (root / "app-config.js").write_text("window.config = {demo: true};")
    (tmp_path / "secret.txt").write_text("outside the dist folder")
    return root


@pytest.fixture
def server(ohif_dir: Path, upstream: Upstream) -> Iterator[ViewerServer]:
    running = ViewerServer(ohif_dir, upstream).start()
    try:
        yield running
    finally:
        running.stop()


def _get(url: str, **headers: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()


def test_static_files_with_their_types(server: ViewerServer) -> None:
    status, mime, body = _get(f"{server.url}/app.bundle.js")
    assert (status, mime, body) == (200, "text/javascript", b"console.log('app');")
    assert _get(f"{server.url}/codec.wasm")[1] == "application/wasm"


@pytest.mark.parametrize("path", ["/", "/viewer", "/viewer/dicomsr?StudyInstanceUIDs=1.2.3"])
def test_unknown_paths_return_index_html(server: ViewerServer, path: str) -> None:
    status, mime, body = _get(f"{server.url}{path}")
    assert status == 200 and mime == "text/html" and body == b"<html>OHIF index</html>"


def test_paths_outside_the_dist_folder_are_not_served(server: ViewerServer) -> None:
    _, _, body = _get(f"{server.url}/../secret.txt")
    assert b"outside" not in body
    _, _, body = _get(f"{server.url}/%2e%2e/secret.txt")
    assert b"outside" not in body


def test_app_config_points_at_the_same_origin_dicomweb(server: ViewerServer) -> None:
    _, mime, body = _get(f"{server.url}/app-config.js")
    assert mime == "text/javascript"
    text = body.decode()
    assert "demo" not in text  # ours, not the package's demo configuration
    config = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert config == app_config()
    source = config["dataSources"][0]["configuration"]
    assert source["qidoRoot"] == source["wadoRoot"] == "/dicom-web"


def test_dicomweb_is_proxied_with_query_headers_and_body(server: ViewerServer) -> None:
    _, mime, body = _get(
        f"{server.url}/dicom-web/studies?PatientID=x&limit=5", Accept="application/dicom+json"
    )
    assert mime == "application/dicom+json"
    seen = json.loads(body)
    assert seen == {
        "method": "GET",
        "path": "/dicom-web/studies?PatientID=x&limit=5",
        "accept": "application/dicom+json",
        "body": "",
    }
    request = urllib.request.Request(
        f"{server.url}/dicom-web/studies", data=b"payload", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["body"] == "payload"


def test_chunked_upstream_answers_come_through_whole(server: ViewerServer) -> None:
    _, _, body = _get(f"{server.url}/dicom-web/studies/1/chunked")
    assert json.loads(body)["path"] == "/dicom-web/studies/1/chunked"


def test_upstream_down_is_a_bad_gateway(ohif_dir: Path) -> None:
    running = ViewerServer(ohif_dir, Upstream("127.0.0.1", 9)).start()  # nothing on port 9
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(f"{running.url}/dicom-web/studies")
        assert caught.value.code == 502
    finally:
        running.stop()


def test_missing_ohif_build_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts/setup"):
        ViewerServer(tmp_path, Upstream("127.0.0.1", 9))


def test_orthanc_url_must_be_plain_http_host_and_port() -> None:
    from viewer.cli import _upstream

    assert _upstream("http://orthanc:8042") == Upstream("orthanc", 8042)
    assert _upstream("http://127.0.0.1") == Upstream("127.0.0.1", 80)
    for bad in ("https://orthanc:8042", "http://orthanc:8042/dicom-web", "orthanc:8042"):
        with pytest.raises(ValueError):
            _upstream(bad)
