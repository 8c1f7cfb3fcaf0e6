"""The metrics endpoint: ledger gauges, health answers, and the Grafana dashboard's names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cxr_pipeline.service import metrics
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.metrics import LedgerCollector, start_metrics_server
from tests.support.http import http_get as _get

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ledger_gauges_and_health(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for i in range(3):
        uid = f"1.2.3.{i + 1}"
        ledger.record_received(uid, study_uid="1.2", calling_ae="PACS", spool_path=tmp_path)
    ledger.mark("1.2.3.1", JobState.DONE)
    ledger.mark("1.2.3.2", JobState.QUEUED)
    healthy = {"ledger": True, "spool_space": True}
    registry = CollectorRegistry()
    server = start_metrics_server(
        "127.0.0.1",
        0,
        lambda: healthy,
        collectors=[LedgerCollector(ledger, lambda: 12345)],
        registry=registry,
    )
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, text = _get(f"{base}/metrics")
        assert status == 200
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert values[("cxr_jobs", (("state", "done"),))] == 1
        assert values[("cxr_jobs", (("state", "queued"),))] == 1
        assert values[("cxr_jobs", (("state", "received"),))] == 1
        assert values[("cxr_jobs", (("state", "failed"),))] == 0
        assert values[("cxr_queue_depth", ())] == 2  # received + queued
        assert values[("cxr_spool_free_bytes", ())] == 12345

        assert json.loads(_get(f"{base}/healthz")[1])["status"] == "ok"
        healthy["spool_space"] = False
        status, body = _get(f"{base}/healthz")
        assert status == 503
        assert json.loads(body) == {
            "status": "unhealthy",
            "checks": {"ledger": True, "spool_space": False},
        }
    finally:
        server.stop()
    # The collector left the registry with the server: a second server can register again.
    again = start_metrics_server(
        "127.0.0.1", 0, lambda: {}, collectors=[LedgerCollector(ledger, lambda: 1)],
        registry=registry,
    )  # fmt: skip
    again.stop()


def test_a_raising_health_check_is_unhealthy_not_a_crash() -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("database is locked")

    server = start_metrics_server("127.0.0.1", 0, broken, registry=CollectorRegistry())
    try:
        status, body = _get(f"http://127.0.0.1:{server.port}/healthz")
    finally:
        server.stop()
    assert status == 503
    assert json.loads(body)["checks"] == {"check_raised_RuntimeError": False}


def test_observe_timings_fills_the_stage_histogram() -> None:
    before = metrics.STAGE_SECONDS.labels(stage="infer")._sum.get()
    metrics.observe_timings({"infer": 250.0, "not_a_stage": 1.0})
    after = metrics.STAGE_SECONDS.labels(stage="infer")._sum.get()
    assert abs((after - before) - 0.25) < 1e-9


def test_observe_finding_records_the_calibrated_probability_and_operating_point() -> None:
    from cxr_pipeline.results import Finding

    finding = Finding(0.23, 0.12, score=0.04, decided_by="site profile Test Hospital",
                      target_sensitivity=0.95, calibration_method="platt")
    before_sum = metrics.PROBABILITY._sum.get()
    before_flagged = metrics.FINDINGS.labels(decision="suspected")._value.get()
    metrics.observe_finding(finding)
    # the calibrated probability, not the raw score
    assert abs((metrics.PROBABILITY._sum.get() - before_sum) - 0.23) < 1e-9
    assert metrics.FINDINGS.labels(decision="suspected")._value.get() == before_flagged + 1
    threshold = metrics.OPERATING_THRESHOLD.labels(
        decided_by="site profile Test Hospital", target_sensitivity="0.95")
    assert threshold._value.get() == 0.12


def test_grafana_dashboard_uses_only_exported_metric_names() -> None:
    dashboard = json.loads((REPO_ROOT / "configs" / "grafana" / "cxr-pipeline.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bcxr_[a-z_]+", e)}
    exported = {
        "cxr_queue_depth",
        "cxr_jobs",
        "cxr_spool_free_bytes",
        *(f"{c._name}_total" for c in (
            metrics.RECEIVED, metrics.ACCEPTED, metrics.SKIPPED, metrics.REFUSED,
            metrics.JOBS_DONE, metrics.JOBS_FAILED, metrics.SEND_RETRIES,
            metrics.ASSOCIATIONS_REFUSED,
        )),
        metrics.ASSOCIATIONS_ACTIVE._name,
        f"{metrics.FINDINGS._name}_total",
        f"{metrics.STAGE_SECONDS._name}_bucket",
        f"{metrics.PROBABILITY._name}_bucket",
        metrics.OPERATING_THRESHOLD._name,
    }  # fmt: skip
    assert used and used <= exported, used - exported
