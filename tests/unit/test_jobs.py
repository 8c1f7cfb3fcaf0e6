"""process_job on real files with a real (tiny, seeded) model and a real C-STORE peer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.dicom.codes import DimseStatus, SopClass
from cxr_pipeline.pipeline import Engine
from cxr_pipeline.service.jobs import KEPT_LOCALLY, backoff_delays, destinations_for, process_job
from cxr_pipeline.service.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.service.send import describe_routing
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import Destination, SendSettings, Settings, load_settings
from tests.conftest import testdata as data_file
from tests.support.dicom_network import recording_scp


@pytest.fixture(scope="module")
def base_engine(tiny_checkpoint: Path) -> Engine:
    settings = load_settings(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
        explain={"method": "gradcam"},
    )
    return Engine.from_settings(settings)


def _engine(base: Engine, tmp: Path, **send: object) -> Engine:
    merged = base.settings.model_dump()
    merged["data_dir"] = str(tmp)
    merged["send"] = {**merged["send"], "backoff_initial_s": 1.0, **send}
    return Engine(settings=Settings.model_validate(merged), predictor=base.predictor)


class Service:
    def __init__(self, root: Path) -> None:
        self.spool = Spool(root / "spool")
        self.ledger = Ledger(root / "ledger.sqlite3")

    def receive(self, name: str, calling_ae: str = "PACS") -> str:
        source = data_file(name)
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        path = self.spool.store(uid, lambda f: f.write(source.read_bytes()))
        self.ledger.record_received(
            uid, study_uid=str(ds.StudyInstanceUID), calling_ae=calling_ae, spool_path=path
        )
        return uid


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield Service(tmp_path)


def test_chest_radiograph_is_analysed_sent_and_recorded(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = service.receive("RG1_UNCR.dcm")
    source = pydicom.dcmread(data_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    with recording_scp() as scp:
        engine = _engine(
            base_engine,
            tmp_path,
            destinations=[{"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
        )
        assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
        record = service.ledger.get(uid)
        assert record is not None and record.state is JobState.DONE and record.attempts == 1
        classes = [str(d.SOPClassUID) for d in scp.received]
        assert classes == [SopClass.COMPREHENSIVE_3D_SR, SopClass.SECONDARY_CAPTURE]
        assert record.result_uids == tuple(str(d.SOPInstanceUID) for d in scp.received)
        for result in scp.received:
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
        # Done: outbox cleared, received file removed (keep_received_files is False).
        assert service.spool.outbox_files(uid) == []
        assert not service.spool.exists(uid)
        # Idempotent: a second run sends nothing and keeps the state.
        assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
        assert len(scp.received) == 2


def test_non_chest_image_is_skipped_with_reason(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = service.receive("CT_small.dcm")
    engine = _engine(base_engine, tmp_path)
    assert process_job(uid, engine, service.ledger, service.spool) is JobState.SKIPPED
    record = service.ledger.get(uid)
    assert record is not None and record.reason is not None
    assert record.reason.split(":")[0] in {"not_chest_radiograph", "not_image"}
    assert process_job(uid, engine, service.ledger, service.spool) is JobState.SKIPPED


def test_send_failure_retries_with_backoff_then_fails_and_keeps_results(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = service.receive("RG1_UNCR.dcm", calling_ae="ORTHANC")
    waits: list[float] = []
    with recording_scp(status=DimseStatus.OUT_OF_RESOURCES) as refusing:
        engine = _engine(
            base_engine,
            tmp_path,
            max_attempts=3,
            known_peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": refusing.port}],
        )
        state = process_job(uid, engine, service.ledger, service.spool, sleep=waits.append)
    assert state is JobState.FAILED
    assert waits == [1.0, 2.0]
    assert len(refusing.received) == 3  # the SR, refused, on each attempt
    record = service.ledger.get(uid)
    assert record is not None and record.reason is not None
    assert record.reason.startswith("send_failed") and "0xA700" in record.reason
    waiting = service.spool.outbox_files(uid)
    assert len(waiting) == 2

    # Requeued later: the results in the outbox are sent as they are, without
    # analysing again (the received file is gone, so analysing would fail).
    assert service.ledger.requeue_failed() == [uid]
    service.spool.path_for(uid).unlink()
    with recording_scp() as scp:
        engine = _engine(
            base_engine,
            tmp_path,
            known_peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": scp.port}],
        )
        assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
    assert sorted(str(d.SOPInstanceUID) for d in scp.received) == sorted(p.stem for p in waiting)
    assert service.spool.outbox_files(uid) == []


def test_unknown_sender_with_known_peers_fails_with_results_in_outbox(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = service.receive("RG1_UNCR.dcm", calling_ae="STRANGER")
    peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]
    engine = _engine(base_engine, tmp_path, known_peers=peers)
    assert process_job(uid, engine, service.ledger, service.spool) is JobState.FAILED
    record = service.ledger.get(uid)
    assert record is not None and record.reason is not None
    assert "STRANGER" in record.reason and "known_peers" in record.reason
    assert len(service.spool.outbox_files(uid)) == 2


def test_no_destination_at_all_keeps_results_locally_and_is_done(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = service.receive("RG1_UNCR.dcm", calling_ae="MYPACS")
    engine = _engine(base_engine, tmp_path)
    assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
    record = service.ledger.get(uid)
    assert record is not None and record.reason == KEPT_LOCALLY
    kept = service.spool.kept_files(uid)
    assert sorted(p.stem for p in kept) == sorted(record.result_uids)
    assert {str(pydicom.dcmread(p).SOPClassUID) for p in kept} == {
        SopClass.COMPREHENSIVE_3D_SR,
        SopClass.SECONDARY_CAPTURE,
    }
    assert service.spool.outbox_files(uid) == []
    # The same image again (e.g. re-sent): still done, the kept set unchanged.
    assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
    assert service.spool.kept_files(uid) == kept


def test_describe_routing_names_where_results_go(tmp_path: Path) -> None:
    peer = Destination(ae_title="ORTHANC", host="127.0.0.1", port=4242)
    assert "ORTHANC@127.0.0.1:4242" in describe_routing(SendSettings(destinations=[peer]), tmp_path)
    assert "known peer" in describe_routing(SendSettings(known_peers=[peer]), tmp_path)
    local = describe_routing(SendSettings(), tmp_path / "kept")
    assert "kept locally" in local and str(tmp_path / "kept") in local and "--send-to" in local


def test_unreadable_spool_file_fails_cleanly(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.77"
    path = service.spool.store(uid, lambda f: f.write(b"this is not DICOM"))
    service.ledger.record_received(uid, study_uid="", calling_ae="PACS", spool_path=path)
    state = process_job(uid, _engine(base_engine, tmp_path), service.ledger, service.spool)
    assert state is JobState.SKIPPED
    record = service.ledger.get(uid)
    assert record is not None and record.reason is not None
    assert record.reason.startswith("not_dicom")


def test_unknown_uid_returns_failed(base_engine: Engine, service: Service, tmp_path: Path) -> None:
    state = process_job("1.2.3.4", _engine(base_engine, tmp_path), service.ledger, service.spool)
    assert state is JobState.FAILED


def test_destinations_and_backoff() -> None:
    fixed = Destination(ae_title="ARCHIVE", host="10.0.0.1", port=104)
    peer = Destination(ae_title="ORTHANC", host="10.0.0.2", port=4242)

    record = JobRecord("1.2", "1.3", "ORTHANC", Path("x"), JobState.RECEIVED, None, (), 0, 0, 0)
    assert destinations_for(record, SendSettings(known_peers=[peer])) == [peer]
    assert destinations_for(record, SendSettings(destinations=[fixed], known_peers=[peer])) == [
        fixed
    ]
    assert destinations_for(record, SendSettings()) == []
    assert backoff_delays(SendSettings(max_attempts=5, backoff_initial_s=2, backoff_max_s=10)) == [
        2.0,
        4.0,
        8.0,
        10.0,
    ]
    assert backoff_delays(SendSettings(max_attempts=1)) == []


def test_local_pool_runs_jobs_and_sweeps_stale_rows(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    from workers.local import LocalWorkerPool
    from workers.queue import JobQueue

    merged = base_engine.settings.model_dump()
    merged["worker"] = {**merged["worker"], "requeue_after_s": 0.0, "concurrency": 2}
    settings = Settings.model_validate(merged)
    engine = Engine(settings=settings, predictor=base_engine.predictor)
    pool = LocalWorkerPool(settings, service.ledger, service.spool, engine=engine, sweep=False)
    assert isinstance(pool, JobQueue)
    try:
        ct = service.receive("CT_small.dcm")
        pool.enqueue(ct)
        assert pool.wait_idle(60)
        record = service.ledger.get(ct)
        assert record is not None and record.state is JobState.SKIPPED

        # A row left RECEIVED (e.g. requeued by cxr-status) is picked up by the sweep.
        rg3 = service.receive("RG3_UNCR.dcm")
        assert pool.sweep_once() == [rg3]
        assert pool.wait_idle(60)
        record = service.ledger.get(rg3)
        assert record is not None and record.state is JobState.SKIPPED
        assert pool.sweep_once() == []
    finally:
        pool.close()
    with pytest.raises(RuntimeError):
        pool.enqueue(ct)


def test_closing_the_pool_during_send_backoff_leaves_the_job_queued(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    import time

    from workers.local import LocalWorkerPool

    uid = service.receive("RG1_UNCR.dcm")
    with recording_scp(status=DimseStatus.OUT_OF_RESOURCES) as refusing:
        engine = _engine(
            base_engine,
            tmp_path,
            max_attempts=5,
            backoff_initial_s=120.0,
            destinations=[{"ae_title": "X", "host": "127.0.0.1", "port": refusing.port}],
        )
        pool = LocalWorkerPool(engine.settings, service.ledger, service.spool, engine=engine)
        pool.enqueue(uid)
        deadline = time.monotonic() + 120
        while not refusing.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert refusing.received, "the first send attempt never came"
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 30  # not the 120 s backoff
    record = service.ledger.get(uid)
    assert record is not None and record.state is JobState.QUEUED
    assert record.reason is not None and record.reason.startswith("interrupted")
    assert len(service.spool.outbox_files(uid)) == 2
    assert [r.sop_instance_uid for r in service.ledger.unfinished()] == [uid]


def test_incomplete_outbox_is_not_sent(
    base_engine: Engine, service: Service, tmp_path: Path
) -> None:
    """Half a result set left by a crash is discarded and the image analysed again."""
    uid = service.receive("RG1_UNCR.dcm")
    stale = service.spool.outbox_dir(uid) / "2.25.1234.dcm"
    stale.write_bytes(data_file("CT_small.dcm").read_bytes())  # a real file, wrong object
    (stale.parent / "2.25.5678.dcm").write_bytes(b"torn write")  # unreadable
    with recording_scp() as scp:
        engine = _engine(
            base_engine,
            tmp_path,
            destinations=[{"ae_title": "X", "host": "127.0.0.1", "port": scp.port}],
        )
        assert process_job(uid, engine, service.ledger, service.spool) is JobState.DONE
    assert [str(d.SOPClassUID) for d in scp.received] == [
        SopClass.COMPREHENSIVE_3D_SR,
        SopClass.SECONDARY_CAPTURE,
    ]
