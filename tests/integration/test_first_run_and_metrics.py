"""A fresh install's first run, and the Prometheus endpoint scraped during real round trips.

``cxr-listen`` runs as a real subprocess with no settings file at all: DCMTK ``storescu``
sends a chest CR and a CT. With no destination the results are kept locally and the job
is ``done`` (not ``failed``); with ``--send-to`` they reach a real C-STORE SCP. In both
runs ``/metrics`` is scraped and its numbers are checked against the ledger, and
``/healthz`` answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.service.jobs import KEPT_LOCALLY
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import Spool
from tests.conftest import testdata as data_file
from tests.support.dicom_network import (
    ListenerProcess,
    dcmtk_available,
    recording_scp,
    running_listener,
    storescu,
    wait_until,
)
from tests.support.http import http_get as _get
from tests.support.orthanc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _environment(checkpoint: Path) -> dict[str, str]:
    # Only what a test must pin (a tiny model, a small disk watermark): no destination.
    return {
        "CXR_MODEL__CHECKPOINT": str(checkpoint),
        "CXR_MODEL__DEVICE": "cpu",
        "CXR_LISTENER__MIN_FREE_BYTES": "1000000",
    }


def _scrape(port: int) -> Samples:
    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _settled(ledger: Ledger, total: int) -> bool:
    counts = ledger.counts()
    busy = counts[JobState.RECEIVED] + counts[JobState.QUEUED] + counts[JobState.PROCESSING]
    return busy == 0 and sum(counts.values()) == total


def _check_against_ledger(samples: Samples, ledger: Ledger, outcome: str) -> None:
    counts = ledger.counts()
    for state, count in counts.items():
        assert _value(samples, "cxr_jobs", state=state.value) == count, state
    assert _value(samples, "cxr_queue_depth") == 0
    assert _value(samples, "cxr_spool_free_bytes") > 0
    assert _value(samples, "cxr_instances_received_total") == 2
    assert _value(samples, "cxr_instances_accepted_total") == 1
    skipped = sum(v for (n, _), v in samples.items() if n == "cxr_instances_skipped_total")
    assert skipped == counts[JobState.SKIPPED] == 1
    assert _value(samples, "cxr_jobs_done_total", outcome=outcome) == counts[JobState.DONE] == 1
    for stage in ("ingest", "infer", "explain", "encode"):
        assert _value(samples, "cxr_stage_seconds_count", stage=stage) == 1, stage
        assert _value(samples, "cxr_stage_seconds_sum", stage=stage) > 0, stage
    # The analysed image's calibrated probability, its decision and the operating point.
    assert _value(samples, "cxr_covid_probability_count") == 1
    assert 0.0 <= _value(samples, "cxr_covid_probability_sum") <= 1.0
    decisions = [v for (n, _), v in samples.items() if n == "cxr_findings_total"]
    assert sum(decisions) == 1
    thresholds = {dict(labels)["decided_by"]: v for (n, labels), v in samples.items()
                  if n == "cxr_operating_threshold"}
    assert len(thresholds) == 1
    (decided_by,) = thresholds
    assert decided_by.startswith("model card ")


FILES = ("RG1_UNCR.dcm", "CT_small.dcm")  # one chest CR, one CT (skipped)


def _send_and_settle(listener: ListenerProcess, data_dir: Path) -> Ledger:
    files = [data_file(name) for name in FILES]
    sent = storescu(listener.port, files, calling_ae="MYPACS")
    assert sent.returncode == 0, sent.stdout + sent.stderr + listener.log_tail()
    ledger = Ledger(data_dir / "ledger.sqlite3")
    assert wait_until(lambda: _settled(ledger, len(files)), timeout_s=300), listener.log_tail()
    return ledger


def test_first_run_keeps_results_locally_and_metrics_match_the_ledger(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK storescu not installed")
    metrics_port = free_port()
    data_dir = tmp_path / "var"
    chest = data_file(FILES[0])
    chest_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).SOPInstanceUID)
    with running_listener(
        data_dir,
        environment=_environment(tiny_checkpoint),
        extra_args=["--metrics-port", str(metrics_port)],
    ) as listener:
        log = listener.log_tail(400)
        assert "results are kept locally" in log and "--send-to" in log
        status, body = _get(f"http://127.0.0.1:{metrics_port}/healthz")
        assert status == 200, body
        assert json.loads(body) == {
            "status": "ok",
            "checks": {"listening": True, "ledger": True, "spool_space": True},
        }
        assert _get(f"http://127.0.0.1:{metrics_port}/nothing")[0] == 404

        ledger = _send_and_settle(listener, data_dir)
        _check_against_ledger(_scrape(metrics_port), ledger, "kept")

        record = ledger.get(chest_uid)
        assert record is not None and record.state is JobState.DONE
        assert record.reason == KEPT_LOCALLY
        kept = Spool(data_dir / "spool").kept_files(chest_uid)
        assert {str(pydicom.dcmread(p).SOPClassUID) for p in kept} == {
            SopClass.COMPREHENSIVE_3D_SR,
            SopClass.SECONDARY_CAPTURE,
        }
        status_text = listener.status().stdout
        assert "kept locally" in status_text, status_text


def test_send_to_delivers_results_and_counts_send_latency(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK storescu not installed")
    metrics_port = free_port()
    data_dir = tmp_path / "var"
    with (
        recording_scp(ae_title="RESULTS") as scp,
        running_listener(
            data_dir,
            environment=_environment(tiny_checkpoint),
            extra_args=[
                "--metrics-port",
                str(metrics_port),
                "--send-to",
                f"RESULTS@127.0.0.1:{scp.port}",
            ],
        ) as listener,
    ):
        assert f"results are sent to RESULTS@127.0.0.1:{scp.port}" in listener.log_tail(400)
        ledger = _send_and_settle(listener, data_dir)
        samples = _scrape(metrics_port)
        _check_against_ledger(samples, ledger, "sent")
        assert _value(samples, "cxr_stage_seconds_count", stage="send") == 1
        assert _value(samples, "cxr_send_retries_total") == 0
        assert [str(d.SOPClassUID) for d in scp.received] == [
            SopClass.COMPREHENSIVE_3D_SR,
            SopClass.SECONDARY_CAPTURE,
        ]
