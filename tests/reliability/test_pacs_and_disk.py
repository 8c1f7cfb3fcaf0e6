"""The destination PACS down when results are ready; the spool below its watermark.

Real ``cxr-listen`` subprocesses (embedded workers), a real Orthanc that is stopped and
started again on the same ports and storage, a pynetdicom SCU as the modality and the
real ``cxr-status`` command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.errors import Reason
from cxr_pipeline.service.ledger import JobState, Ledger
from tests.reliability.harness import (
    Pacs,
    Tally,
    assert_no_phi,
    chest_datasets,
    send_datasets,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
    wait_log_count,
)
from tests.support.orthanc import free_port
from tests.support.services import REPO_ROOT, clean_env

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _wait_log(path: Path, text: str, count: int, timeout_s: float = 120) -> None:
    wait_log_count(path, text, count, timeout_s)


def test_pacs_down_retries_then_fails_and_requeue_delivers(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        # 6 attempts, waits 0.5 + 1 + 2 + 3 + 3 s: a window an Orthanc restart fits in.
        send={"max_attempts": 6, "backoff_initial_s": 0.5, "backoff_max_s": 3.0},
        # Threads: every job waits in its own backoff (analysis itself is serialised).
        worker={"concurrency": 3},
    )
    log = tmp_path / "listener.log"
    first, second = chest_datasets(pngs, 3), chest_datasets(pngs, 2)
    tally = Tally("PACS down: back within retries")
    tally_failed = Tally("PACS down: retries exhausted, requeue")
    tally.sent(first)
    tally_failed.sent(second)

    listener = spawn_listener(config, port, log)
    try:
        ledger = Ledger(data_dir / "ledger.sqlite3")
        # 1. Down while results are ready, back before the attempts run out.
        pacs.stop()
        tally.answered(send_datasets(port, first))
        assert len(tally.acknowledged) == len(first)
        _wait_log(log, "retrying in", len(first))
        pacs.start()
        rows = wait_finished(ledger, tally.acknowledged, timeout_s=120)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}, listener.log_tail()
        assert all(r is not None and r.attempts == 1 for r in rows.values())

        # 2. Down for longer than the attempts: rows FAILED with the reason.
        pacs.stop()
        tally_failed.answered(send_datasets(port, second))
        rows = wait_finished(ledger, tally_failed.acknowledged, timeout_s=120)
        for row in rows.values():
            assert row is not None and row.state is JobState.FAILED, listener.log_tail()
            assert row.reason is not None and row.reason.startswith(Reason.SEND_FAILED.value)

        # 3. PACS back: the rows stay FAILED (with why) until the operator re-queues
        #    them; the running listener's sweep then picks them up and delivers them.
        pacs.start()
        snapshot = tally_failed.evaluate(ledger, pacs, label="PACS down: after all attempts")
        assert snapshot["failed_with_reason"] == len(second) and snapshot["lost"] == 0
        cmd = [sys.executable, "-m", "listeners.status", "--config", str(config)]
        requeue = subprocess.run(
            [*cmd, "--requeue-failed", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            env=clean_env(),
            check=False,
        )
        assert requeue.returncode == 0, requeue.stdout + requeue.stderr
        assert '"requeued"' in requeue.stdout
        for row in rows.values():
            assert row is not None and row.sop_instance_uid in requeue.stdout
        rows = wait_finished(ledger, tally_failed.acknowledged, timeout_s=120)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}, listener.log_tail()
    finally:
        stop(listener)
    for t in (tally, tally_failed):
        table = t.evaluate(ledger, pacs)
        assert table["lost"] == 0 and table["duplicates"] == 0, table
        assert table["delivered"] == len(t.studies)
    assert_no_phi(log)


def test_spool_below_watermark_refuses_with_out_of_resources(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        listener={"min_free_bytes": 2**62},  # no disk is that large: always "full"
    )
    log = tmp_path / "listener.log"
    datasets = chest_datasets(pngs, 4)
    tally = Tally("spool below free-space watermark")
    tally.sent(datasets)
    listener = spawn_listener(config, port, log)
    try:
        tally.answered(send_datasets(port, datasets))
        assert set(tally.statuses.values()) == {DimseStatus.OUT_OF_RESOURCES}
        assert listener.process.poll() is None  # still serving
        ledger = Ledger(data_dir / "ledger.sqlite3")
        assert sum(ledger.counts().values()) == 0
        # Nothing half-written: no spooled object, no temporary file, no outbox.
        leftovers = [p for p in (data_dir / "spool").rglob("*") if p.is_file()]
        assert leftovers == []
    finally:
        stop(listener)
    row = tally.evaluate(ledger, pacs)
    assert row["acknowledged"] == 0 and row["lost"] == 0, row
    assert_no_phi(log)
