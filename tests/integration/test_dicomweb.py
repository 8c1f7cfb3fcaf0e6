"""DICOMweb in and out with real peers: Orthanc's DICOMweb plugin (QIDO-RS, WADO-RS,
STOW-RS) and ``cxr-listen``'s own STOW-RS endpoint, on real radiographs.

- ``cxr-batch --from-dicomweb URL --send-stow URL``: a date query analyses its studies,
  the SR and SC of each image land in its study by STOW-RS, a rerun adds nothing.
- ``cxr-listen --dicomweb-port``: a wrong or missing token, a truncated body and a body
  cut before its closing boundary are refused with nothing stored; a chest radiograph, a
  non-chest radiograph and a non-DICOM part get one outcome each; the chest image's
  results reach Orthanc through a ``dicomweb`` send destination; HTTPS with the
  listener's TLS, our client verifying the server's certificate by default.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from cxr_pipeline.batch.report import JSONL_NAME, read_rows
from cxr_pipeline.dicom.codes import StowFailureReason
from cxr_pipeline.errors import SendError
from cxr_pipeline.service.delivery import send_with_retries
from cxr_pipeline.service.dicomweb import stow_datasets
from cxr_pipeline.settings import Destination, PeerTlsSettings, SendSettings
from tests.support.batch_cli import run_batch_cli
from tests.support.dicom_network import ListenerProcess, running_listener, wait_until
from tests.support.orthanc import OrthancServer, free_port, orthanc_available, running_orthanc
from tests.support.pacs_results import results_by_source
from tests.support.pacs_studies import DATE_B, RANGE_B, DatedArchive, build_dated_archive
from tests.support.pki import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "stow-test-token-0123456789"
STOW_TIMEOUT_S = 8
STOW_MAX_BODY = 32 * 1024 * 1024
BOUNDARY = "cxr-test-boundary"


@pytest.fixture
def archive(tmp_path: Path, shared_dicom_dir: Path) -> DatedArchive:
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    return build_dated_archive(tmp_path / "archive", shared_dicom_dir)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_batch_cli(*args, timeout=timeout)


def test_qido_wado_in_and_stow_out_then_a_rerun_adds_nothing(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    chest_b = {i.sop_instance_uid for i in archive.of_date(DATE_B, chest=True)}
    with running_orthanc(tmp_path / "orthanc") as pacs:
        for image in archive.images:
            pacs.upload(image.path)
        out = tmp_path / "out"
        args = ["--from-dicomweb", pacs.dicomweb_url, "--study-date", RANGE_B, "--out", str(out)]
        args += ["--send-stow", pacs.dicomweb_url]
        args += ["--checkpoint", str(tiny_checkpoint), "--workers", "1"]
        first = _cli(*args, "--images-per-minute", "600")  # one image per 0.1 s at most
        assert first.returncode == 0, first.stderr[-3000:]
        rows = {r.sop_instance_uid: r for r in read_rows(out / JSONL_NAME)}
        assert {uid for uid, r in rows.items() if r.status == "done"} == chest_b
        assert [r.reason for r in rows.values() if r.status == "skipped"] == [
            "not_chest_radiograph"
        ]
        assert all(r.path.startswith(f"{pacs.dicomweb_url}/studies/") for r in rows.values())
        assert results_by_source(pacs) == {uid: Counter({"SR": 1, "SC": 1}) for uid in chest_b}

        count = len(pacs.instances())
        second = _cli(*args)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "resuming: 3 images already done, 0 to do" in second.stderr
        assert len(pacs.instances()) == count


def _multipart(parts: list[bytes], *, close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
        body += b"\r\n"
    if close:
        body += f"--{BOUNDARY}--\r\n".encode()
    return body


CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _post(url: str, body: bytes, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
    headers = {"Content-Type": CONTENT_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{url}/studies", data=body, headers=headers, timeout=120, **kwargs)


def _raw_post(port: int, body: bytes, *, length: int, stop: bool = True) -> bytes:
    """Announce ``length`` body bytes, send ``body``, then stop sending (or stall, with
    ``stop=False``); return the raw answer."""
    head = (
        f"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        if stop:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _counts(listener: ListenerProcess) -> dict[str, int]:
    result = listener.status("--json", "--limit", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    counts: dict[str, int] = json.loads(result.stdout)["counts"]
    return counts


def _listener_env(checkpoint: Path, tokens: Path, pacs: OrthancServer) -> dict[str, str]:
    return {
        "CXR_MODEL__CHECKPOINT": str(checkpoint),
        "CXR_MODEL__DEVICE": "cpu",
        "CXR_LISTENER__MIN_FREE_BYTES": "1000000",
        "CXR_LISTENER__DICOMWEB__TOKENS_FILE": str(tokens),
        "CXR_LISTENER__DICOMWEB__TIMEOUT_S": str(STOW_TIMEOUT_S),
        "CXR_LISTENER__DICOMWEB__MAX_BODY_BYTES": str(STOW_MAX_BODY),
        # Results leave by STOW-RS: a send destination of kind dicomweb.
        "CXR_SEND__DESTINATIONS": json.dumps([{"kind": "dicomweb", "url": pacs.dicomweb_url}]),
        "CXR_SEND__MAX_ATTEMPTS": "3",
        "CXR_SEND__BACKOFF_INITIAL_S": "0.5",
    }


def test_stow_rs_in_refuses_bad_tokens_and_truncated_bodies_and_reports_each_instance(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    chest = archive.of_date(DATE_B, chest=True)[0]
    chest_other = archive.of_date(DATE_B, chest=True)[1]
    tibia = archive.of_date(DATE_B, chest=False)[0]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# STOW-RS senders\n{TOKEN}\n")
    web_port = free_port()
    with running_orthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(chest.path)  # the source study lives in the PACS, as in practice
        pacs.upload(chest_other.path)
        env = _listener_env(tiny_checkpoint, tokens, pacs)
        with running_listener(
            tmp_path / "data", environment=env, extra_args=["--dicomweb-port", str(web_port)]
        ) as listener:
            url = f"http://127.0.0.1:{web_port}"
            body = _multipart([chest.path.read_bytes()])
            for token in ("wrong-token", None):
                refused = _post(url, body, token=token)
                assert refused.status_code == 401, refused.text
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            answer = _raw_post(web_port, body[: len(body) // 2], length=len(body))
            assert answer.split(b" ", 2)[1] == b"400" and b"truncated" in answer, answer
            too_big = _raw_post(web_port, b"", length=STOW_MAX_BODY + 1)
            assert too_big.split(b" ", 2)[1] == b"413", too_big  # refused before reading
            started = time.monotonic()
            stalled = _raw_post(web_port, body[:100], length=len(body), stop=False)
            assert stalled.split(b" ", 2)[1] == b"408", stalled
            assert time.monotonic() - started < 4 * STOW_TIMEOUT_S
            unclosed = _post(url, _multipart([chest.path.read_bytes()], close=False))
            assert unclosed.status_code == 400 and "truncated" in unclosed.text
            wrong_type = requests.post(
                f"{url}/studies",
                data=body,
                headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            assert wrong_type.status_code == 415
            assert sum(_counts(listener).values()) == 0  # nothing stored or recorded
            assert not list((tmp_path / "data" / "spool" / "incoming").glob("*.dcm"))

            mixed = _post(
                url,
                _multipart(
                    [chest.path.read_bytes(), tibia.path.read_bytes(), b"not a DICOM object"]
                ),
            )
            assert mixed.status_code == 202, mixed.text
            assert mixed.headers["Content-Type"] == "application/dicom+json"
            response = Dataset.from_json(mixed.json())
            assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [
                chest.sop_instance_uid
            ]
            failed = {
                str(i.get("ReferencedSOPInstanceUID", "")): int(i.FailureReason)
                for i in response.FailedSOPSequence
            }
            assert failed == {
                tibia.sop_instance_uid: StowFailureReason.NOT_ANALYSED,
                "": StowFailureReason.CANNOT_UNDERSTAND,
            }
            assert "not_chest_radiograph" in mixed.headers["Warning"]

            # A real DICOMweb client with the right token: 200 for a chest radiograph.
            client = DICOMwebClient(url, headers={"Authorization": f"Bearer {TOKEN}"})
            stored = client.store_instances([pydicom.dcmread(chest_other.path)])
            assert [str(i.ReferencedSOPInstanceUID) for i in stored.ReferencedSOPSequence] == [
                chest_other.sop_instance_uid
            ]
            assert "FailedSOPSequence" not in stored

            def settled() -> bool:
                counts = _counts(listener)
                return counts["done"] == 2 and counts["skipped"] == 1

            assert wait_until(settled, timeout_s=300), listener.log_tail()
            assert _counts(listener)["failed"] == 0
            wanted = {chest.sop_instance_uid, chest_other.sop_instance_uid}
            assert results_by_source(pacs) == {uid: Counter({"SR": 1, "SC": 1}) for uid in wanted}


def test_stow_rs_over_https_and_our_client_verifies_the_server(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    chest = archive.of_date(DATE_B, chest=True)[0]
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    web_port = free_port()
    env = {
        "CXR_MODEL__CHECKPOINT": str(tiny_checkpoint),
        "CXR_MODEL__DEVICE": "cpu",
        "CXR_LISTENER__MIN_FREE_BYTES": "1000000",
        "CXR_LISTENER__DICOMWEB__TOKENS_FILE": str(tokens),
        "CXR_LISTENER__TLS__ENABLED": "true",
        "CXR_LISTENER__TLS__CERTIFICATE": str(pki.server.certificate),
        "CXR_LISTENER__TLS__PRIVATE_KEY": str(pki.server.key),
    }
    with running_listener(
        tmp_path / "data", environment=env, extra_args=["--dicomweb-port", str(web_port)]
    ) as listener:
        url = f"https://127.0.0.1:{web_port}"
        assert "STOW-RS on https://" in listener.log_tail(400)
        settings = SendSettings(timeout_s=20.0)
        trusting = Destination(
            kind="dicomweb",
            url=url,
            auth={"bearer_token_file": token_file},  # type: ignore[arg-type]
            tls={"ca_certificates": pki.ca},  # type: ignore[arg-type]
        )
        stow_datasets(
            [pydicom.dcmread(chest.path)],
            trusting,
            calling_ae_title=settings.calling_ae_title,
            timeout_s=settings.timeout_s,
        )
        # Verification is on by default: the test CA is not in the system's trust store.
        untrusting = trusting.model_copy(update={"tls": PeerTlsSettings()})
        with pytest.raises(SendError, match=r"STOW-RS to https://.* failed: SSLError"):
            stow_datasets(
                [pydicom.dcmread(chest.path)],
                untrusting,
                calling_ae_title=settings.calling_ae_title,
                timeout_s=settings.timeout_s,
            )
        assert wait_until(lambda: _counts(listener)["done"] == 1, timeout_s=300), (
            listener.log_tail()
        )


def test_a_dicomweb_destination_retries_like_c_store_then_fails(shared_dicom_dir: Path) -> None:
    chest = pydicom.dcmread(shared_dicom_dir / "siim_cr_pa_jpeg_baseline.dcm")
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    destination = Destination(kind="dicomweb", url=closed)
    settings = SendSettings(max_attempts=3, backoff_initial_s=0.1, timeout_s=5.0)
    waits: list[float] = []
    with pytest.raises(SendError) as caught:
        send_with_retries([chest], destination, settings, sleep=waits.append)
    assert waits == [0.1, 0.2]  # three attempts, the same backoff as C-STORE
    assert caught.value.reason.value == "send_failed"
    assert "ConnectionError" in caught.value.detail
