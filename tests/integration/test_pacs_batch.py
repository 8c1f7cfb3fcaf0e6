"""``cxr-batch --from-pacs`` against a real Orthanc (DICOM query/retrieve), on real
radiographs filed as studies of two dates (:mod:`tests.support.pacs_studies`).

The Orthanc is a fresh test PACS that does not list us in DicomModalities: C-FIND and
C-GET from an unknown AE title are allowed by ``DicomAlwaysAllowFind`` / ``Get`` (the
fixture's configuration), C-MOVE needs the destination registered.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from cxr_pipeline.batch.cli import incomplete_line
from cxr_pipeline.batch.pacs import DimseSource
from cxr_pipeline.batch.remote import RemoteQuery, RunPlan
from cxr_pipeline.batch.remote_run import run_remote
from cxr_pipeline.batch.report import JSONL_NAME, Row, read_rows
from cxr_pipeline.batch.runner import BatchOptions
from cxr_pipeline.settings import Destination, Settings, load_settings, parse_destination
from tests.support.batch_cli import run_batch_cli
from tests.support.orthanc import OrthancServer, free_port, orthanc_available, running_orthanc
from tests.support.pacs_results import results_by_source
from tests.support.pacs_studies import (
    DATE_A,
    DATE_B,
    RANGE_A,
    RANGE_B,
    DatedArchive,
    build_dated_archive,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def archive(tmp_path: Path, shared_dicom_dir: Path) -> DatedArchive:
    if not orthanc_available():
        pytest.skip("Orthanc binary not installed (Debian package 'orthanc')")
    return build_dated_archive(tmp_path / "archive", shared_dicom_dir)


def _load(pacs: OrthancServer, archive: DatedArchive) -> None:
    for image in archive.images:
        pacs.upload(image.path)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_batch_cli(*args, timeout=timeout)


def _settings(checkpoint: Path, **batch: object) -> Settings:
    return load_settings(
        None,
        model={"checkpoint": str(checkpoint), "device": "cpu"},
        batch={"decode_workers": 1, "batch_size": 2, **batch},
        send={"timeout_s": 10.0},
    )


def _one_sr_and_sc_each(pacs: OrthancServer, sources: set[str]) -> None:
    found = results_by_source(pacs)
    assert found == {uid: Counter({"SR": 1, "SC": 1}) for uid in sources}


def test_a_date_query_analyses_its_studies_sends_to_them_and_a_rerun_adds_nothing(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    chest_a = {i.sop_instance_uid for i in archive.of_date(DATE_A, chest=True)}
    with running_orthanc(tmp_path / "orthanc") as pacs:
        _load(pacs, archive)
        out = tmp_path / "out"
        args = ["--from-pacs", pacs.address, "--study-date", RANGE_A, "--out", str(out)]
        args += ["--send", pacs.address, "--checkpoint", str(tiny_checkpoint), "--workers", "1"]
        first = _cli(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        rows = read_rows(out / JSONL_NAME)
        # Only the CR/DX images of the date: the CT series and date B are never fetched.
        assert {r.sop_instance_uid for r in rows} == chest_a
        assert {r.status for r in rows} == {"done"}
        assert all(r.path.startswith(f"{pacs.address}/studies/") for r in rows)
        assert all(len(r.outputs) == 2 and r.send_ms is not None for r in rows)
        _one_sr_and_sc_each(pacs, chest_a)  # in the source studies, once
        assert not list((out / "retrieved").iterdir())  # retrieved files are not kept

        count, report = len(pacs.instances()), (out / JSONL_NAME).read_bytes()
        second = _cli(*args)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"resuming: {len(chest_a)} images already done, 0 to do" in second.stderr
        assert len(pacs.instances()) == count  # nothing retrieved, nothing sent twice
        assert (out / JSONL_NAME).read_bytes() == report


def test_orthanc_stopped_mid_run_then_a_rerun_finishes_the_job(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    chest = {i.sop_instance_uid for i in archive.images if i.chest}
    settings = _settings(tiny_checkpoint, batch_size=1)
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as pacs:
        _load(pacs, archive)
        options = BatchOptions(write_sr=True, write_sc=True, send=parse_destination(pacs.address))
        stopped: list[Row] = []

        def stop_pacs(row: Row) -> None:
            if not stopped:
                stopped.append(row)
                pacs.stop()  # the PACS goes away after the first image is done

        source = DimseSource(parse_destination(pacs.address), settings.send, settings.batch)
        first = run_remote(source, RemoteQuery(), out, settings, options, on_row=stop_pacs)
        assert stopped and stopped[0].status == "done"
        failed = [r for r in first.rows if r.status == "failed"]
        assert failed and {r.reason for r in failed} <= {"retrieve_failed", "send_failed"}
        assert all(r.detail for r in failed)
        line = incomplete_line(first)
        assert line is not None and "run the same command again" in line

        pacs.start()
        second = run_remote(source, RemoteQuery(), out, settings, options)
        source.close()
        assert second.already_done == len(first.rows) - len(failed)
        rows = {r.sop_instance_uid: r for r in read_rows(out / JSONL_NAME)}
        assert {uid for uid, r in rows.items() if r.status == "done"} == chest
        assert {r.reason for r in rows.values() if r.status == "skipped"} == {
            "not_chest_radiograph"
        }
        assert incomplete_line(second) is None
        _one_sr_and_sc_each(pacs, chest)


def test_c_move_to_the_runs_own_storage_scp(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    move_port = free_port()
    chest_b = {i.sop_instance_uid for i in archive.of_date(DATE_B, chest=True)}
    # What a site sets up for C-MOVE: our AE title, at our address and the run's port.
    modalities = {"cxr": ("CXR_PIPELINE", "127.0.0.1", move_port)}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        _load(pacs, archive)
        out = tmp_path / "out"
        moved = _cli(
            "--from-pacs", pacs.address, "--study-date", RANGE_B, "--out", str(out),
            "--retrieve", "move", "--move-dest", "CXR_PIPELINE", "--move-port", str(move_port),
            "--checkpoint", str(tiny_checkpoint), "--workers", "1",
            "--max-concurrent-retrievals", "2",
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr[-3000:]
        rows = {r.sop_instance_uid: r for r in read_rows(out / JSONL_NAME)}
        assert {uid for uid, r in rows.items() if r.status == "done"} == chest_b
        assert [r.reason for r in rows.values() if r.status == "skipped"] == [
            "not_chest_radiograph"
        ]
        for uid in chest_b:  # no --send: results are kept in the output folder
            assert all((out / p).is_file() for p in rows[uid].outputs)
        assert results_by_source(pacs) == {}

        # A destination the PACS does not know: every image gets a failed row saying so.
        settings = _settings(tiny_checkpoint, retrieve="move", move_ae_title="NOBODY", move_port=0)
        source = DimseSource(parse_destination(pacs.address), settings.send, settings.batch)
        try:
            summary = run_remote(
                source, RemoteQuery(study_date=RANGE_B), tmp_path / "unknown", settings
            )
        finally:
            source.close()
        assert {r.reason for r in summary.rows} == {"retrieve_failed"}
        # Orthanc 1.10 answers 0xC000 (unable to process) rather than 0xA801 here.
        assert all("C-MOVE final status 0x" in r.detail for r in summary.rows), summary.rows
        assert all("sent 0 of" in r.detail for r in summary.rows)


def test_a_retrieve_short_of_what_was_announced_is_failed_then_picked_up(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_checkpoint)
    b1 = archive.of_date(DATE_B, chest=True)
    gone = b1[0]
    with running_orthanc(tmp_path / "orthanc") as pacs:
        _load(pacs, archive)
        ids = {pacs.get_instance_tags(i)["SOPInstanceUID"]: i for i in pacs.instances()}

        def delete_after_query(plan: RunPlan) -> None:
            # Between the query and the retrieve the PACS loses one image.
            assert plan.images == 3
            pacs.session.delete(f"{pacs.rest_url}/instances/{ids[gone.sop_instance_uid]}")

        source = DimseSource(parse_destination(pacs.address), settings.send, settings.batch)
        out = tmp_path / "out"
        query = RemoteQuery(study_date=RANGE_B)
        first = run_remote(source, query, out, settings, on_plan=delete_after_query)
        rows = {r.sop_instance_uid: r for r in first.rows}
        assert rows[gone.sop_instance_uid].status == "failed"
        assert rows[gone.sop_instance_uid].reason == "retrieve_failed"
        assert "sent 0 of 1 instances asked for" in rows[gone.sop_instance_uid].detail

        pacs.upload(gone.path)
        second = run_remote(source, query, out, settings)
        source.close()
        # Only the lost image failed: the others of its series were asked for one by one.
        assert [r.sop_instance_uid for r in first.rows if r.status == "failed"] == [
            gone.sop_instance_uid
        ]
        assert rows[b1[1].sop_instance_uid].status == "done"
        # The rerun fetched only what failed, and finished it.
        assert [r.sop_instance_uid for r in second.rows] == [gone.sop_instance_uid]
        final = {r.sop_instance_uid: r.status for r in read_rows(out / JSONL_NAME)}
        assert all(final[i.sop_instance_uid] == "done" for i in b1)


def test_a_pacs_that_refuses_us_or_is_down_is_a_clear_error(
    archive: DatedArchive, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    strict = {"DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False}
    with running_orthanc(tmp_path / "orthanc", extra_config=strict) as pacs:
        _load(pacs, archive)
        refused = _cli("--from-pacs", pacs.address, "--out", str(tmp_path / "refused"))
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "could not be queried" in refused.stderr
        assert "CXR_PIPELINE" in refused.stderr and "DicomModalities" in refused.stderr
        address = pacs.address
    down = _cli("--from-pacs", address, "--out", str(tmp_path / "down"))
    assert down.returncode == 1, down.stderr[-3000:]
    assert "association with" in down.stderr and "nothing was retrieved" in down.stderr


def test_options_of_a_pacs_run_are_checked(tmp_path: Path) -> None:
    for args, message in [
        (["--from-pacs", "PACS@h:1", str(tmp_path)], "not both"),
        (["--study-date", "20200301", str(tmp_path)], "--study-date needs --from-pacs"),
        (["--from-pacs", "PACS@h:1", "--study-date", "2020-03"], "YYYYMMDD"),
        (["--from-dicomweb", "http://h/dw", "--retrieve", "move"], "--from-pacs"),
        (["--from-pacs", "PACS@h:1", "--send", "A@h:1", "--send-stow", "http://h"], "not both"),
        (["--from-dicomweb", "http://u:p@h/dw"], "credentials"),
    ]:
        result = _cli(*args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_destination_defaults_stay_dimse() -> None:
    assert Destination(ae_title="A", host="h", port=1).kind == "dimse"
