"""Deduplicated redelivery on a real Redis: per-UID leases, publish markers, the sweep.

Every test runs a real ``redis-server`` (tests/support/redis_server.py). The timings are
short leases and polls with wide margins (a lease of 0.6 s must survive 3 s of renewals;
an unrenewed one must be gone after 5 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import Settings, load_settings
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401
from workers import tasks
from workers.broker import Collected
from workers.lease import (
    KOMBU_UNACKED_INDEX,
    LEASE_PREFIX,
    QUEUED_PREFIX,
    LeaseKeeper,
    lease_ttl_s,
)
from workers.publisher import CeleryJobQueue

pytestmark = pytest.mark.integration

UIDS = ["1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"]


def _settings(server: RedisServer, data_dir: Path, **worker: object) -> Settings:
    return load_settings(
        None,
        data_dir=data_dir,
        worker={"broker_url": server.url, "requeue_after_s": 0.0, **worker},
    )


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _stop_renewing(keeper: LeaseKeeper) -> None:
    """Stop the renewal thread, as if the worker process were gone."""
    keeper._wake.set()
    if keeper._thread is not None:
        keeper._thread.join(timeout=10)


def test_lease_ttl_is_at_most_half_the_visibility_timeout(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert lease_ttl_s(_settings(redis_server, tmp_path, visibility_timeout_s=5)) == 2.5
    assert lease_ttl_s(_settings(redis_server, tmp_path)) == 15.0


def test_a_lease_excludes_other_workers_is_renewed_and_expires_when_its_holder_stops(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path, lease_ttl_s=0.6)
    holder, other = LeaseKeeper(settings), LeaseKeeper(settings)
    try:
        assert holder.acquire(UIDS[0])
        assert holder.acquire(UIDS[0])  # the holder itself may take it again
        assert not other.acquire(UIDS[0])
        time.sleep(3.0)  # five TTLs: only the renewal thread keeps it
        assert not other.acquire(UIDS[0])
        holder.release(UIDS[0])
        assert other.acquire(UIDS[0])
        other.release(UIDS[0])

        # A holder that stops renewing (a killed worker): its lease expires by itself.
        assert holder.acquire(UIDS[1])
        _stop_renewing(holder)
        assert _wait(lambda: other.acquire(UIDS[1]), 5.0)
        # The old holder's release must not remove the new holder's lease.
        holder.release(UIDS[1])
        assert _client(redis_server).exists(LEASE_PREFIX + UIDS[1])
    finally:
        holder.close()
        other.close()


def test_renewal_refreshes_held_unacked_messages_only(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    client = _client(redis_server)
    client.zadd(KOMBU_UNACKED_INDEX, {"tag-held": 100.0, "tag-other": 100.0})
    keeper = LeaseKeeper(_settings(redis_server, tmp_path))
    try:
        assert keeper.acquire(UIDS[0], "tag-held")
        assert keeper.acquire(UIDS[1], "tag-acked")  # not in the index: must not be added
        keeper.renew_once()
    finally:
        keeper.close()
    assert client.zscore(KOMBU_UNACKED_INDEX, "tag-held") == pytest.approx(time.time(), abs=30)
    assert client.zscore(KOMBU_UNACKED_INDEX, "tag-other") == 100.0
    assert client.zscore(KOMBU_UNACKED_INDEX, "tag-acked") is None


def _queued_ledger(data_dir: Path) -> Ledger:
    ledger = Ledger(data_dir / "ledger.sqlite3")
    for uid in UIDS:
        # The bytes the listener publishes as the payload (never decoded in these tests).
        (data_dir / f"{uid}.dcm").write_bytes(b"instance " + uid.encode())
        ledger.record_received(
            uid, study_uid="1.2.3", calling_ae="MODALITY", spool_path=data_dir / f"{uid}.dcm"
        )
        ledger.mark(uid, JobState.QUEUED)
    return ledger


def test_sweep_leaves_rows_alone_while_redis_has_their_message_or_a_worker_holds_them(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Rows QUEUED longer than the visibility timeout: stale by the ledger's clock.
    settings = _settings(redis_server, tmp_path, visibility_timeout_s=0)
    ledger = _queued_ledger(tmp_path)
    queue = CeleryJobQueue(settings, ledger, sweep=False)
    keeper = LeaseKeeper(settings)
    client = _client(redis_server)
    try:
        queue.marks.published(UIDS[0])  # its message waits in Redis
        assert keeper.acquire(UIDS[1])  # a live worker runs it
        for _ in range(5):  # however many sweeps run, no copy is made
            assert queue.sweep_once() == []
        assert client.llen("cxr") == 0

        # Redis restarted empty: marker and lease are gone, both rows are published once.
        _stop_renewing(keeper)
        client.flushall()
        assert sorted(queue.sweep_once()) == sorted(UIDS)
        assert client.llen("cxr") == 2
        assert client.exists(QUEUED_PREFIX + UIDS[0], QUEUED_PREFIX + UIDS[1]) == 2
        assert queue.sweep_once() == []  # published: the markers stop further copies
    finally:
        keeper.close()
        queue.close()


class _Message:
    def __init__(self, tag: str) -> None:
        self.delivery_tag = tag
        self.requeued = False

    def reject(self, requeue: bool) -> None:
        self.requeued = requeue


def test_a_copy_of_a_job_another_worker_holds_is_dropped_not_run(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(redis_server, tmp_path, lease_ttl_s=0.6)
    other = LeaseKeeper(settings)
    runtime = SimpleNamespace(settings=settings, leases=LeaseKeeper(settings))
    ran: list[list[str]] = []
    waiting = _Message("t2")

    def fake_run_batch(uids: list[str], _runtime: object) -> dict[str, JobState]:
        ran.append(list(uids))
        return dict.fromkeys(uids, JobState.DONE)

    @contextmanager
    def collect(limit: int) -> Iterator[list[Collected]]:
        yield [Collected(uid=UIDS[1], message=waiting)]

    monkeypatch.setattr(tasks, "run_batch", fake_run_batch)
    client = _client(redis_server)
    try:
        client.set(QUEUED_PREFIX + UIDS[0], b"1")
        assert other.acquire(UIDS[1])  # the waiting message is a copy of B's job
        state = tasks.run_leased(UIDS[0], "t1", runtime, collect)  # type: ignore[arg-type]
        assert state == JobState.DONE.value
        assert ran == [[UIDS[0]]]  # the collected copy was not run
        assert waiting.requeued  # but put back on the queue for its own task
        assert not client.exists(QUEUED_PREFIX + UIDS[0])  # finished: marker deleted
        assert not client.exists(LEASE_PREFIX + UIDS[0])  # and the lease released

        # A live holder (it keeps renewing for two TTLs): the copy is dropped, not run.
        assert other.acquire(UIDS[0])
        start = time.monotonic()
        assert tasks.run_leased(UIDS[0], "t3", runtime, collect) == tasks.DROPPED  # type: ignore[arg-type]
        assert time.monotonic() - start >= 1.0
        assert len(ran) == 1

        # A dead holder (a killed prefork child; Celery redelivers at once): its lease
        # expires while the copy waits, and the copy takes the job over (and the collected
        # message, whose lease died with the same holder).
        _stop_renewing(other)
        assert tasks.run_leased(UIDS[0], "t4", runtime, collect) == JobState.DONE.value  # type: ignore[arg-type]
        assert ran[-1] == UIDS
    finally:
        other.close()
        runtime.leases.close()
