"""Instance bytes through Redis on a real server: the payload budget, backpressure, status.

No worker runs here: the test plays the worker's part on the Redis keys
(:mod:`workers.transfer`) and checks what the listener's queue does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import Settings, load_settings
from listeners.status import main as status_main
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401
from workers.publisher import CeleryJobQueue
from workers.transfer import PAYLOAD_PREFIX, drop_payload, get_payload, payload_bytes

pytestmark = pytest.mark.integration

SIZE = 1000
UIDS = [f"1.2.826.0.1.3680043.8.498.2{i}" for i in range(5)]


def _settings(server: RedisServer, data_dir: Path, **worker: object) -> Settings:
    return load_settings(
        None,
        data_dir=data_dir,
        worker={"broker_url": server.url, "requeue_after_s": 3600.0, **worker},
    )


def _ledger(data_dir: Path) -> Ledger:
    ledger = Ledger(data_dir / "ledger.sqlite3")
    for n, uid in enumerate(UIDS):
        path = data_dir / f"{uid}.dcm"
        path.write_bytes(bytes([n]) * SIZE)
        ledger.record_received(uid, study_uid="1.2.3", calling_ae="MODALITY", spool_path=path)
    return ledger


def test_above_the_payload_budget_images_wait_in_the_spool_and_follow_as_room_frees(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(redis_server, tmp_path, payload_budget_bytes=int(2.5 * SIZE))
    ledger = _ledger(tmp_path)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    queue = CeleryJobQueue(settings, ledger, sweep=False, results=False)
    try:
        for uid in UIDS:
            queue.enqueue(uid)
        # Two fit; the other three are accepted (RECEIVED, in the spool) and wait.
        assert client.llen("cxr") == 2
        assert payload_bytes(client) == 2 * SIZE
        assert get_payload(client, UIDS[0]) == bytes([0]) * SIZE
        assert queue.pending() == set(UIDS[2:])
        assert [ledger.get(u).state for u in UIDS] == [  # type: ignore[union-attr]
            JobState.QUEUED,
            JobState.QUEUED,
            JobState.RECEIVED,
            JobState.RECEIVED,
            JobState.RECEIVED,
        ]
        assert queue.sweep_once() == []  # still full: nothing moves, nothing is lost

        # cxr-status shows the backlog.
        monkeypatch.setenv("CXR_WORKER__BROKER_URL", redis_server.url)
        monkeypatch.setenv("CXR_WORKER__PAYLOAD_BUDGET_BYTES", str(int(2.5 * SIZE)))
        assert status_main(["--data-dir", str(tmp_path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["backlog"]
        assert shown["waiting_in_spool"] == 3
        assert shown["payload_bytes"] == 2 * SIZE
        assert shown["tasks_waiting"] == 2

        # A worker finishes one: its payload leaves Redis and the next image follows, in
        # arrival order.
        drop_payload(client, UIDS[0])
        assert queue.sweep_once() == [UIDS[2]]
        assert client.llen("cxr") == 3
        assert queue.pending() == set(UIDS[3:])
        assert payload_bytes(client) == 2 * SIZE

        # A payload whose TTL backstop fired no longer counts against the budget.
        client.delete(PAYLOAD_PREFIX + UIDS[1])
        assert payload_bytes(client, prune=True) == SIZE
        assert queue.sweep_once() == [UIDS[3]]
    finally:
        queue.close()


def test_an_image_larger_than_the_whole_budget_is_published_alone(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _settings(redis_server, tmp_path, payload_budget_bytes=SIZE // 2)
    ledger = _ledger(tmp_path)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    queue = CeleryJobQueue(settings, ledger, sweep=False, results=False)
    try:
        queue.enqueue(UIDS[0])
        queue.enqueue(UIDS[1])
        assert client.llen("cxr") == 1  # never starved, never two at once
        assert queue.pending() == {UIDS[1]}
    finally:
        queue.close()
