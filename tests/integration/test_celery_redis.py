"""Celery on a real Redis: the listener's queue, the micro-batch collector, end to end.

Every test runs a real ``redis-server`` (tests/support/redis_server.py). The end-to-end
test also runs ``cxr-listen --broker`` and a separate ``cxr-worker`` as subprocesses, a
real Orthanc as the PACS and DCMTK ``storescu`` as the modality.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis

from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import Settings, load_settings
from tests.conftest import testdata as dicom_testdata
from tests.support.orthanc import orthanc_available, running_orthanc
from tests.support.redis_server import RedisServer, free_port, redis_server  # noqa: F401
from tests.support.services import running_listener, running_worker, write_config
from workers.broker import TASK_ANALYSE, collect_waiting, create_app
from workers.publisher import CeleryJobQueue

pytestmark = pytest.mark.integration

UIDS = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"]


def _settings(server: RedisServer, data_dir: Path, **worker: object) -> Settings:
    return load_settings(
        None,
        data_dir=data_dir,
        worker={"broker_url": server.url, "requeue_after_s": 3600.0, **worker},
    )


def _ledger_with(data_dir: Path, uids: list[str]) -> Ledger:
    ledger = Ledger(data_dir / "ledger.sqlite3")
    for uid in uids:
        # The bytes the listener publishes as the payload (never decoded in these tests).
        (data_dir / f"{uid}.dcm").write_bytes(b"instance " + uid.encode())
        ledger.record_received(
            uid, study_uid="1.2.3", calling_ae="MODALITY", spool_path=data_dir / f"{uid}.dcm"
        )
    return ledger


def _queued(server: RedisServer, queue: str = "cxr") -> list[dict[str, object]]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_enqueue_publishes_uid_only_and_marks_queued(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path)
    ledger = _ledger_with(tmp_path, UIDS[:1])
    queue = CeleryJobQueue(settings, ledger, sweep=False)
    try:
        queue.enqueue(UIDS[0])
    finally:
        queue.close()
    messages = _queued(redis_server)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == TASK_ANALYSE  # type: ignore[index]
    record = ledger.get(UIDS[0])
    assert record is not None and record.state == JobState.QUEUED
    assert queue.pending() == set()


def test_broker_outage_keeps_image_received_and_sweep_requeues(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path)
    ledger = _ledger_with(tmp_path, UIDS[:2])
    redis_server.stop()
    queue = CeleryJobQueue(settings, ledger, sweep=False)
    try:
        start = time.monotonic()
        queue.enqueue(UIDS[0])  # must not raise and must not block for long
        assert time.monotonic() - start < 10
        record = ledger.get(UIDS[0])
        assert record is not None and record.state == JobState.RECEIVED
        assert queue.pending() == {UIDS[0]}
        assert queue.sweep_once() == []  # still down: nothing published, nothing lost
        assert queue.pending() == {UIDS[0]}

        redis_server.start()
        assert queue.sweep_once() == [UIDS[0]]
        assert queue.pending() == set()
        record = ledger.get(UIDS[0])
        assert record is not None and record.state == JobState.QUEUED
        # UIDS[1] was never enqueued and is younger than requeue_after_s: left alone.
        record = ledger.get(UIDS[1])
        assert record is not None and record.state == JobState.RECEIVED
    finally:
        queue.close()
    assert [m["headers"]["task"] for m in _queued(redis_server)] == [TASK_ANALYSE]  # type: ignore[index]


def test_sweep_requeues_stale_received_rows(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A row left RECEIVED (e.g. listener restarted during an outage) is published again."""
    settings = _settings(redis_server, tmp_path, requeue_after_s=0.0)
    ledger = _ledger_with(tmp_path, UIDS)
    ledger.mark(UIDS[2], JobState.DONE)
    queue = CeleryJobQueue(settings, ledger, sweep=False)
    try:
        assert sorted(queue.sweep_once()) == sorted(UIDS[:2])
    finally:
        queue.close()
    assert len(_queued(redis_server)) == 2


def test_background_sweep_thread_recovers_after_outage(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path, requeue_interval_s=0.2)
    ledger = _ledger_with(tmp_path, UIDS[:1])
    redis_server.stop()
    queue = CeleryJobQueue(settings, ledger)
    try:
        queue.enqueue(UIDS[0])
        redis_server.start()
        deadline = time.monotonic() + 20
        while queue.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue.pending() == set()
    finally:
        queue.close()
    assert len(_queued(redis_server)) == 1


def test_collector_takes_waiting_messages_and_acks_them(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path)
    ledger = _ledger_with(tmp_path, UIDS)
    queue = CeleryJobQueue(settings, ledger, sweep=False)
    for uid in UIDS:
        queue.enqueue(uid)
    queue.close()
    app = create_app(settings)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        with collect_waiting(app, settings, limit=2) as taken:
            assert [item.uid for item in taken] == UIDS[:2]  # oldest first, at most limit
            assert client.llen("cxr") == 1
            assert client.hlen("unacked") == 2  # held, not lost, until acknowledged
        assert client.hlen("unacked") == 0
        assert client.llen("cxr") == 1

        # A batch that fails puts its messages back on the queue.
        with pytest.raises(RuntimeError), collect_waiting(app, settings, limit=5) as taken:
            assert [item.uid for item in taken] == UIDS[2:]
            raise RuntimeError("batch failed")
        assert client.llen("cxr") == 1
        assert client.hlen("unacked") == 0
    finally:
        app.close()


def test_collector_returns_after_waiting_when_queue_is_empty(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path, micro_batch_wait_s=0.2)
    app = create_app(settings)
    try:
        start = time.monotonic()
        with collect_waiting(app, settings, limit=4) as taken:
            assert taken == []
        assert 0.15 <= time.monotonic() - start < 5
    finally:
        app.close()


def _wait_ledger(ledger: Ledger, uids: list[str], timeout_s: float) -> dict[str, JobState]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, JobState] = {}
    while time.monotonic() < deadline:
        records = {uid: ledger.get(uid) for uid in uids}
        states = {uid: r.state for uid, r in records.items() if r is not None}
        finished = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)
        if len(states) == len(uids) and all(s in finished for s in states.values()):
            return states
        time.sleep(0.5)
    return states


def _worker_metrics(port: int) -> dict[str, Any]:
    """Scrape a prefork worker's endpoint (child i serves ``port + i``; one child here)."""
    import json
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    for candidate in (port, port + 1):
        try:
            base = f"http://127.0.0.1:{candidate}"
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
                health = json.loads(response.read())
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:
            continue
        counts = {
            s.labels["stage"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "cxr_stage_seconds_count"
        }
        return {"health": health, "counts": counts}
    raise AssertionError(f"no worker metrics endpoint on {port} or {port + 1}")


@pytest.mark.slow
def test_listener_and_separate_worker_process_deliver_results_to_orthanc(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    shared_dicom_dir: Path,
) -> None:
    """storescu -> cxr-listen --broker -> Redis -> cxr-worker -> SR + SC in Orthanc's study.

    The worker starts only after every image is queued, so it must take the backlog as
    one micro-batch (one forward pass) through the collector.
    """
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK storescu not installed")
    sources = [
        dicom_testdata("RG1_UNCR.dcm"),
        shared_dicom_dir / "siim_cr_pa_jpeg_baseline.dcm",
        shared_dicom_dir / "rsna_cr_ap_jpeg_baseline.dcm",
    ]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    uids = [str(h.SOPInstanceUID) for h in headers]
    listen_port, metrics_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    with running_orthanc(tmp_path / "orthanc") as pacs:
        for path in sources:  # the PACS already holds the source images
            pacs.upload(path)
        config = write_config(
            tmp_path / "cxr.toml",
            {"data_dir": data_dir, "log_level": "INFO"},
            {
                "model": {"checkpoint": tiny_checkpoint, "device": "cpu", "batch_size": 8},
                "explain": {"method": "gradcam"},
                "listener": {"host": "127.0.0.1", "port": listen_port, "min_free_bytes": 0},
                "worker": {"broker_url": redis_server.url, "micro_batch_wait_s": 0.5},
                "send": {"max_attempts": 3, "backoff_initial_s": 0.5},
                "metrics": {"worker_port": metrics_port},
                "send.destinations": [
                    {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
                ],
            },
        )
        with running_listener(
            config, listen_port, tmp_path / "listener.log", broker=redis_server.url
        ) as listener:
            sent = subprocess.run(
                [
                    "storescu",
                    "-xy",  # also propose JPEG Baseline (the shared files are JPEG)
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "CXR_PIPELINE",
                    "127.0.0.1",
                    str(listen_port),
                    *map(str, sources),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr + listener.log_tail()
            client = redis.Redis(host="127.0.0.1", port=redis_server.port)
            deadline = time.monotonic() + 30
            while client.llen("cxr") < len(uids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.llen("cxr") == len(uids), listener.log_tail()

            with running_worker(config, tmp_path / "worker.log") as worker:
                ledger = Ledger(data_dir / "ledger.sqlite3")
                states = _wait_ledger(ledger, uids, timeout_s=300)
                assert states == dict.fromkeys(uids, JobState.DONE), worker.log_tail()
                log_text = worker.log_text()
                assert f"batched with {len(uids) - 1} waiting" in log_text, worker.log_tail()
                assert f"micro-batch of {len(uids)} images classified" in log_text
                # The worker process's own endpoint counted the three images' stages.
                scraped = _worker_metrics(metrics_port)
                assert scraped["health"] == {"status": "ok", "checks": {"broker": True}}
                for stage in ("ingest", "infer", "explain", "encode"):
                    assert scraped["counts"].get(stage) == len(uids), (stage, scraped)

        assert client.llen("cxr") == 0 and client.hlen("unacked") == 0
        for header in headers:
            study = str(header.StudyInstanceUID)
            found = pacs.wait_for_instances(study, 3, timeout_s=60)
            tags = [pacs.get_instance_tags(i) for i in found]
            results = [t for t in tags if t["SOPInstanceUID"] != header.SOPInstanceUID]
            assert sorted(t["Modality"] for t in results)[-1] == "SR", pacs.log_tail()
            assert len(results) == 2
            for t in results:
                assert t["StudyInstanceUID"] == study
                assert t["SeriesInstanceUID"] != header.SeriesInstanceUID
            record = ledger.get(str(header.SOPInstanceUID))
            assert record is not None
            assert sorted(record.result_uids) == sorted(t["SOPInstanceUID"] for t in results)


@pytest.mark.slow
def test_micro_batch_gives_the_single_image_results(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    shared_dicom_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One forward pass for the batch, from Redis payloads; each SR/SC returned through
    Redis equals what the single-image path builds. No data folder is involved."""
    import io
    import logging

    from cxr_pipeline.encode.reading import read_structured_report
    from cxr_pipeline.pipeline import analyse
    from workers.tasks import WorkerRuntime, run_batch
    from workers.transfer import EVENTS, Outcome, get_results, put_payload

    settings = load_settings(
        None,
        data_dir=tmp_path / "never-created",
        model={"checkpoint": tiny_checkpoint, "device": "cpu"},
        explain={"method": "gradcam"},
        worker={"broker_url": redis_server.url},
    )
    runtime = WorkerRuntime.open(settings)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    names = [
        "siim_cr_pa_jpeg_baseline.dcm",
        "rsna_cr_ap_jpeg_baseline.dcm",
        "nih_dx_secondary_capture.dcm",
    ]
    uids, payloads = [], {}
    for name in names:
        path = shared_dicom_dir / name
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        payloads[uid] = path.read_bytes()
        uids.append(uid)
    for uid in uids[:2]:  # the third finished already: its payload left Redis
        put_payload(client, uid, payloads[uid], 600)

    with caplog.at_level(logging.INFO, logger="workers.tasks"):
        outcomes = run_batch(uids, runtime)
    assert outcomes == {
        uids[0]: Outcome.ANALYSED,
        uids[1]: Outcome.ANALYSED,
        uids[2]: Outcome.NO_PAYLOAD,
    }
    assert "micro-batch of 2 images classified" in caplog.text
    assert not (tmp_path / "never-created").exists()
    events = [(f[b"uid"].decode(), f[b"outcome"].decode()) for _id, f in client.xrange(EVENTS)]
    assert events == [
        (uids[0], "processing"),
        (uids[1], "processing"),
        (uids[2], "no_payload"),
        (uids[0], "analysed"),
        (uids[1], "analysed"),
    ]
    for uid in uids[:2]:
        assert client.get(f"cxr:payload:{uid}") is None  # freed once analysed
        returned = get_results(client, uid)
        single = analyse(io.BytesIO(payloads[uid]), runtime.engine)
        assert sorted(returned) == sorted(str(ds.SOPInstanceUID) for ds in single.result_datasets)
        srs = [pydicom.dcmread(io.BytesIO(b)) for b in returned.values()]
        sr = next(ds for ds in srs if ds.Modality == "SR")
        read = read_structured_report(sr)
        assert read.source_sop_instance_uid == uid
        assert read.probability == pytest.approx(single.finding.probability, abs=1e-4)
    assert client.hlen("cxr:payload_sizes") == 0


@pytest.mark.slow
@pytest.mark.reliability
def test_worker_process_killed_mid_job_is_redelivered_and_finished(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
) -> None:
    """SIGKILL the prefork child while it analyses: the task returns to the queue
    (acks_late + reject_on_worker_lost), a new child finishes it, results arrive once."""
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    if shutil.which("storescu") is None or shutil.which("pgrep") is None:
        pytest.skip("DCMTK storescu or pgrep not installed")
    source = dicom_testdata("RG1_UNCR.dcm")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    uid = str(header.SOPInstanceUID)
    listen_port = free_port()
    data_dir = tmp_path / "data"
    with running_orthanc(tmp_path / "orthanc") as pacs:
        config = write_config(
            tmp_path / "cxr.toml",
            {"data_dir": data_dir, "log_level": "INFO"},
            {
                "model": {"checkpoint": tiny_checkpoint, "device": "cpu"},
                # Occlusion: many forward passes, a wide window to kill the job in.
                "explain": {"method": "occlusion"},
                "listener": {"host": "127.0.0.1", "port": listen_port, "min_free_bytes": 0},
                "worker": {"broker_url": redis_server.url},
                "send.destinations": [
                    {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
                ],
            },
        )
        with (
            running_listener(
                config, listen_port, tmp_path / "listener.log", broker=redis_server.url
            ),
            running_worker(config, tmp_path / "worker.log") as worker,
        ):
            sent = subprocess.run(
                ["storescu", "-aec", "CXR_PIPELINE", "127.0.0.1", str(listen_port), str(source)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            ledger = Ledger(data_dir / "ledger.sqlite3")
            deadline = time.monotonic() + 120
            record = ledger.get(uid)
            while (record is None or record.state != JobState.PROCESSING) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
                record = ledger.get(uid)
            assert record is not None and record.state == JobState.PROCESSING, worker.log_tail()
            children = subprocess.run(
                ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True
            ).stdout.split()
            assert len(children) == 1, children
            subprocess.run(["kill", "-KILL", children[0]], check=True)

            states = _wait_ledger(ledger, [uid], timeout_s=300)
            assert states == {uid: JobState.DONE}, worker.log_tail()
            record = ledger.get(uid)
            assert record is not None and record.attempts == 2
            assert "WorkerLostError" in worker.log_text()
        found = pacs.wait_for_instances(str(header.StudyInstanceUID), 2, timeout_s=60)
        assert len(found) == 2  # SR + SC, stored once
