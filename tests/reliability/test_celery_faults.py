"""Faults of the Celery deployment, with workers isolated from the listener's disk.

Real ``redis-server`` on a free port, ``cxr-listen --broker`` and ``cxr-worker`` as
subprocesses, a real Orthanc as the destination, a pynetdicom SCU as the modality. Every
worker runs under ``unshare --mount`` with the listener's data folder covered by an empty
tmpfs (:func:`tests.reliability.harness.isolation_prefix`): it shares nothing with the
listener but Redis.
(A prefork *child* SIGKILLed mid-job is tested in
``tests/integration/test_celery_redis.py``; here the whole worker dies and another
worker must finish its tasks.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
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
    kill9,
    send_datasets,
    service_config,
    spawn_listener,
    spawn_worker,
    stop,
    wait_finished,
    wait_log_count,
)
from tests.support.orthanc import free_port
from tests.support.redis_server import RedisServer, start_redis
from tests.support.services import REPO_ROOT, clean_env

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

STATUS = [sys.executable, "-m", "listeners.status"]


@pytest.fixture
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


def _states(ledger: Ledger, uids: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for uid in uids:
        row = ledger.get(uid)
        out[uid] = None if row is None else row.state.value
    return out


def test_worker_killed_while_holding_tasks_another_worker_finishes(
    tmp_path: Path, pacs: Pacs, redis: RedisServer, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        broker=redis.url,
        # Occlusion heatmaps: a job long enough to be killed in.
        explain="occlusion",
        # Unacknowledged messages of a dead worker come back after this many seconds.
        worker={"visibility_timeout_s": 5, "micro_batch_wait_s": 0.2},
    )
    datasets = chest_datasets(pngs, 6)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    tally = Tally("kill -9 Celery worker holding tasks")
    tally.sent(datasets)
    listener_log, log_a, log_b = (tmp_path / n for n in ("listener.log", "a.log", "b.log"))

    listener = spawn_listener(config, port, listener_log, broker=redis.url)
    worker_b = None
    try:
        tally.answered(send_datasets(port, datasets))
        assert len(tally.acknowledged) == len(datasets)
        ledger = Ledger(data_dir / "ledger.sqlite3")
        worker_a = spawn_worker(config, log_a, hostname="a@%h", hide=data_dir)
        deadline = time.monotonic() + 180
        while JobState.PROCESSING.value not in _states(ledger, uids).values():
            assert time.monotonic() < deadline, worker_a.log_tail()
            time.sleep(0.05)
        kill9(worker_a)  # no ack, no reject: its messages sit in Redis' unacked set
        held = [u for u, s in _states(ledger, uids).items() if s != JobState.DONE.value]
        assert held, "worker A finished everything before it was killed"

        worker_b = spawn_worker(config, log_b, hostname="b@%h", hide=data_dir)
        rows = wait_finished(ledger, uids, timeout_s=300)
        assert all(r is not None and r.state is JobState.DONE for r in rows.values()), (
            _states(ledger, uids),
            worker_b.log_tail(),
        )
        # Worker B did the work A was killed in (at least once more than A could).
        assert any(r is not None and r.attempts >= 2 for r in rows.values())
        assert "2 results to the listener" in worker_b.log_text()
        assert "done: 2 results sent" in listener.log_text()  # the listener sends
    finally:
        if worker_b is not None:
            stop(worker_b)
        stop(listener)
    row = tally.evaluate(ledger, pacs)
    assert row["lost"] == 0 and row["duplicates"] == 0, row
    assert row["delivered"] == len(datasets)
    # Redelivered copies: every message worker A held comes back once (kombu restores it
    # after the visibility timeout), and nothing else makes copies: the sweep publishes no
    # row whose message is still in Redis or whose job B holds under its lease, and B's
    # own messages are not redelivered while it runs, however slow the machine (before
    # the leases the copies grew with B's job time: 14 on a loaded machine). No job ran
    # more than once after A's attempt.
    text = log_b.read_text()
    copies = text.count("no payload in Redis") + text.count("copy dropped")
    assert copies <= len(datasets), copies
    assert all(r is not None and r.attempts <= 2 for r in rows.values()), rows
    assert_no_phi(listener_log, log_a, log_b)


def test_redis_down_listener_keeps_accepting_and_backlog_drains(
    tmp_path: Path, pacs: Pacs, redis: RedisServer, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        broker=redis.url,
        explain="gradcam",
        # The production default: the image published before the outage (and lost with
        # Redis, which restarts empty) must not wait this long to be published again.
        worker={"visibility_timeout_s": 3600},
    )
    datasets = chest_datasets(pngs, 8)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    tally = Tally("Redis down while images arrive")
    tally.sent(datasets)
    listener_log, worker_log = tmp_path / "listener.log", tmp_path / "worker.log"

    listener = spawn_listener(config, port, listener_log, broker=redis.url)
    worker = None
    try:
        # A first image while Redis is up, so the listener holds a broker connection
        # that the outage then breaks.
        tally.answered(send_datasets(port, datasets[:1]))
        redis.stop()
        start = time.monotonic()
        tally.answered(send_datasets(port, datasets[1:]))
        accept_s = time.monotonic() - start
        assert tally.acknowledged == sorted(uids), tally.statuses
        assert set(tally.statuses.values()) == {DimseStatus.SUCCESS}
        # One failed publish may cost a connection attempt; the images after it must not
        # each wait for the dead broker (they did, ~6 s apiece, before the fix).
        assert accept_s < 30, f"accepting {len(datasets) - 1} images took {accept_s:.1f} s"

        ledger = Ledger(data_dir / "ledger.sqlite3")
        spool = data_dir / "spool" / "incoming"
        for uid in uids[1:]:
            row = ledger.get(uid)
            assert row is not None and row.state is JobState.RECEIVED, row
            assert (spool / f"{uid}.dcm").is_file()
        time.sleep(2)  # a few sweeps run against the dead broker: nothing is lost
        assert all(s == JobState.RECEIVED.value for s in _states(ledger, uids[1:]).values())

        redis.start()  # empty (no persistence): every message must be published again
        worker = spawn_worker(config, worker_log, hide=data_dir)
        rows = wait_finished(ledger, uids, timeout_s=240)
        assert all(r is not None and r.state is JobState.DONE for r in rows.values()), (
            _states(ledger, uids),
            listener.log_tail(),
            worker.log_tail(),
        )
        assert all(r is not None and r.attempts == 1 for r in rows.values())
    finally:
        if worker is not None:
            stop(worker)
        stop(listener)
    table = tally.evaluate(ledger, pacs)
    assert table["lost"] == 0 and table["duplicates"] == 0, table
    assert table["delivered"] == len(datasets)
    # The stale-row sweep must not flood the queue with copies of waiting tasks.
    assert worker_log.read_text().count("no payload in Redis") <= len(datasets)
    assert_no_phi(listener_log, worker_log)


def _wait_log(path: Path, text: str, count: int, timeout_s: float = 180) -> None:
    wait_log_count(path, text, count, timeout_s)


def test_listener_killed_while_workers_return_results_restarts_and_delivers(
    tmp_path: Path, pacs: Pacs, redis: RedisServer, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    """kill -9 of the listener while an isolated worker goes on returning results: the
    events and results wait in Redis, and the restarted listener records and sends them."""
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        broker=redis.url,
        explain="occlusion",  # jobs long enough for the kill to land between results
        worker={"micro_batch_wait_s": 0.2},
    )
    datasets = chest_datasets(pngs, 6)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    tally = Tally("kill -9 listener, isolated worker")
    tally.sent(datasets)
    listener_log, worker_log = tmp_path / "listener.log", tmp_path / "worker.log"

    listener = spawn_listener(config, port, listener_log, broker=redis.url)
    worker = None
    try:
        tally.answered(send_datasets(port, datasets))
        assert len(tally.acknowledged) == len(datasets)
        ledger = Ledger(data_dir / "ledger.sqlite3")
        worker = spawn_worker(config, worker_log, hide=data_dir)
        deadline = time.monotonic() + 240
        while JobState.DONE.value not in _states(ledger, uids).values():
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.05)
        kill9(listener)
        states = _states(ledger, uids)
        assert JobState.DONE.value in states.values()
        # The worker goes on without the listener: every result lands in Redis.
        _wait_log(worker_log, "results to the listener", len(datasets), timeout_s=300)
        assert _states(ledger, uids) == states  # nobody else writes the listener's ledger

        listener = spawn_listener(config, port, listener_log, broker=redis.url)
        rows = wait_finished(ledger, uids, timeout_s=180)
        assert all(r is not None and r.state is JobState.DONE for r in rows.values()), (
            _states(ledger, uids),
            listener.log_tail(),
        )
    finally:
        if worker is not None:
            stop(worker)
        stop(listener)
    row = tally.evaluate(ledger, pacs)
    assert row["lost"] == 0 and row["duplicates"] == 0, row
    assert row["delivered"] == len(datasets)
    assert all(r is not None and r.attempts == 1 for r in rows.values()), rows  # no re-analysis
    assert_no_phi(listener_log, worker_log)


def test_pacs_down_with_isolated_workers_retries_then_fails_and_requeue_delivers(
    tmp_path: Path, pacs: Pacs, redis: RedisServer, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    """The listener sends (the one DICOM exit): a PACS outage costs the worker nothing, the
    listener retries, records FAILED with the reason after the last attempt, and
    ``cxr-status --requeue-failed`` sends the kept results without analysing again."""
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        broker=redis.url,
        explain="gradcam",
        # 6 attempts, waits 0.5 + 1 + 2 + 3 + 3 s: a window an Orthanc restart fits in.
        send={"max_attempts": 6, "backoff_initial_s": 0.5, "backoff_max_s": 3.0},
        worker={"send_threads": 3},
    )
    first, second = chest_datasets(pngs, 3), chest_datasets(pngs, 2)
    tally = Tally("PACS down: back within retries (isolated workers)")
    tally_failed = Tally("PACS down: retries exhausted, requeue (isolated workers)")
    tally.sent(first)
    tally_failed.sent(second)
    listener_log, worker_log = tmp_path / "listener.log", tmp_path / "worker.log"

    listener = spawn_listener(config, port, listener_log, broker=redis.url)
    worker = spawn_worker(config, worker_log, hide=data_dir)
    try:
        ledger = Ledger(data_dir / "ledger.sqlite3")
        # 1. Down while results come back, up again before the attempts run out.
        pacs.stop()
        tally.answered(send_datasets(port, first))
        assert len(tally.acknowledged) == len(first)
        _wait_log(listener_log, "retrying in", len(first))
        pacs.start()
        rows = wait_finished(ledger, tally.acknowledged, timeout_s=180)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}, listener.log_tail()
        assert all(r is not None and r.attempts == 1 for r in rows.values())

        # 2. Down for longer than the attempts: FAILED with the reason; the worker finished
        #    its part long before (the outage held no GPU time).
        pacs.stop()
        tally_failed.answered(send_datasets(port, second))
        rows = wait_finished(ledger, tally_failed.acknowledged, timeout_s=180)
        for row in rows.values():
            assert row is not None and row.state is JobState.FAILED, listener.log_tail()
            assert row.reason is not None and row.reason.startswith(Reason.SEND_FAILED.value)
        analysed = worker_log.read_text().count("results to the listener")
        assert analysed == len(first) + len(second)

        # 3. PACS back, operator re-queues: the kept results are sent, not re-analysed.
        pacs.start()
        snapshot = tally_failed.evaluate(ledger, pacs, label="PACS down: after all attempts")
        assert snapshot["failed_with_reason"] == len(second) and snapshot["lost"] == 0
        requeue = subprocess.run(
            [*STATUS, "--config", str(config), "--requeue-failed", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            env=clean_env(),
            check=False,
        )
        assert requeue.returncode == 0, requeue.stdout + requeue.stderr
        assert '"backlog"' in requeue.stdout
        rows = wait_finished(ledger, tally_failed.acknowledged, timeout_s=180)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}, listener.log_tail()
        assert worker_log.read_text().count("results to the listener") == analysed
    finally:
        stop(worker)
        stop(listener)
    for t in (tally, tally_failed):
        table = t.evaluate(ledger, pacs)
        assert table["lost"] == 0 and table["duplicates"] == 0, table
        assert table["delivered"] == len(t.studies)
    assert_no_phi(listener_log, worker_log)
