"""The SQLite job ledger: states, idempotence, threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from cxr_pipeline.errors import InvalidUid
from cxr_pipeline.service.ledger import JobState, Ledger

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.2.{i}"


def _record(ledger: Ledger, i: int, ae: str = "PACS") -> bool:
    return ledger.record_received(
        _uid(i), study_uid=STUDY, calling_ae=ae, spool_path=Path(f"/spool/{_uid(i)}.dcm")
    )


def test_life_cycle(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert _record(ledger, 1, ae="ORTHANC ")
    rec = ledger.get(_uid(1))
    assert rec is not None
    assert rec.state is JobState.RECEIVED
    assert rec.calling_ae == "ORTHANC"
    assert rec.study_instance_uid == STUDY
    assert rec.spool_path == Path(f"/spool/{_uid(1)}.dcm")
    assert rec.reason is None and rec.result_uids == () and rec.attempts == 0

    ledger.mark(_uid(1), JobState.QUEUED)
    ledger.mark(_uid(1), JobState.PROCESSING)
    assert ledger.increment_attempts(_uid(1)) == 1
    ledger.mark(_uid(1), JobState.DONE, result_uids=["2.25.1", "2.25.2"])
    done = ledger.get(_uid(1))
    assert done is not None
    assert done.state is JobState.DONE
    assert done.result_uids == ("2.25.1", "2.25.2")
    assert done.attempts == 1
    assert done.updated_at >= done.received_at
    # Marking without result UIDs keeps them.
    ledger.mark(_uid(1), JobState.DONE)
    again = ledger.get(_uid(1))
    assert again is not None and again.result_uids == ("2.25.1", "2.25.2")


def test_record_received_is_idempotent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert _record(ledger, 1)
    ledger.mark(_uid(1), JobState.DONE, result_uids=["2.25.9"])
    assert not _record(ledger, 1)
    rec = ledger.get(_uid(1))
    assert rec is not None and rec.state is JobState.DONE


def test_invalid_uid_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    with pytest.raises(InvalidUid):
        ledger.record_received("../x", study_uid=STUDY, calling_ae="A", spool_path=Path("x"))


def test_unknown_uid(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.get(_uid(5)) is None
    with pytest.raises(KeyError):
        ledger.mark(_uid(5), JobState.DONE)
    with pytest.raises(KeyError):
        ledger.increment_attempts(_uid(5))


def test_counts_unfinished_recent_and_requeue(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    for i in range(6):
        _record(ledger, i)
    ledger.mark(_uid(1), JobState.QUEUED)
    ledger.mark(_uid(2), JobState.PROCESSING)
    ledger.mark(_uid(3), JobState.DONE)
    ledger.mark(_uid(4), JobState.SKIPPED, reason="not_chest_radiograph: CT")
    ledger.increment_attempts(_uid(5))
    ledger.mark(_uid(5), JobState.FAILED, reason="send_failed: refused")

    counts = ledger.counts()
    assert counts == {
        JobState.RECEIVED: 1,
        JobState.QUEUED: 1,
        JobState.PROCESSING: 1,
        JobState.DONE: 1,
        JobState.SKIPPED: 1,
        JobState.FAILED: 1,
    }
    assert [r.sop_instance_uid for r in ledger.unfinished()] == [_uid(0), _uid(1), _uid(2)]
    recent = ledger.recent(2)
    assert [r.sop_instance_uid for r in recent] == [_uid(5), _uid(4)]
    assert recent[1].reason == "not_chest_radiograph: CT"

    assert ledger.requeue_failed() == [_uid(5)]
    rec = ledger.get(_uid(5))
    assert rec is not None
    assert rec.state is JobState.RECEIVED and rec.reason is None and rec.attempts == 0
    assert ledger.requeue_failed() == []


def test_many_threads_share_one_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for i in range(start, start + 25):
                _record(ledger, i)
                ledger.mark(_uid(i), JobState.DONE)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ledger.counts()[JobState.DONE] == 100


def _process_writer(path: str, start: int) -> None:
    ledger = Ledger(Path(path))
    for i in range(start, start + 20):
        _record(ledger, i)
        ledger.increment_attempts(_uid(i))
        ledger.mark(_uid(i), JobState.SKIPPED, reason="x")


def test_safe_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(path), k * 100)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    ledger = Ledger(path)
    assert ledger.counts()[JobState.SKIPPED] == 40
    assert all(r.attempts == 1 for r in ledger.recent(100))


def test_cxr_status_reports_and_requeues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from listeners.status import main

    assert main(["--data-dir", str(tmp_path), "--json"]) == 2  # no ledger yet
    capsys.readouterr()
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for i in range(3):
        _record(ledger, i)
    ledger.mark(_uid(0), JobState.SKIPPED, reason="not_chest_radiograph: CT")
    ledger.mark(_uid(1), JobState.FAILED, reason="send_failed: refused")

    assert main(["--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "not_chest_radiograph: CT" in text and _uid(1) in text

    assert main(["--data-dir", str(tmp_path), "--json", "--requeue-failed"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requeued"] == [_uid(1)]
    assert report["counts"] == {
        "received": 2, "queued": 0, "processing": 0, "done": 0, "skipped": 1, "failed": 0,
    }  # fmt: skip
    assert {r["sop_instance_uid"] for r in report["recent"]} == {_uid(i) for i in range(3)}


def test_cxr_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _record(ledger, 0)
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "listeners.status", "--data-dir", str(tmp_path), "--watch", "0.2"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A row that changes while it watches (the process polls every 0.2 s; it imports no
        # torch, so it is watching well within these waits even on a slow machine).
        time.sleep(5.0)
        ledger.mark(_uid(0), JobState.FAILED, reason="send_failed: refused")
        time.sleep(3.0)
        assert process.poll() is None, process.communicate()  # still watching
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "jobs by state" in out and _uid(0) in out
    assert "send_failed: refused" in out  # the last refresh shows the change


def test_connections_of_finished_threads_are_released(tmp_path: Path) -> None:
    import gc
    import sqlite3
    import warnings

    ledger = Ledger(tmp_path / "l.db")

    def one_association(i: int) -> None:
        _record(ledger, i)

    for i in range(50):
        t = threading.Thread(target=one_association, args=(i,))
        t.start()
        t.join()
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object pokes lazy torch attributes
        warnings.simplefilter("ignore")
        open_connections = [o for o in gc.get_objects() if isinstance(o, sqlite3.Connection)]
    assert len(open_connections) < 10
    assert ledger.counts()[JobState.RECEIVED] == 50
