"""``cxr-batch`` as a real process: results checked by dciodvfy, sending to a real SCP,
Ctrl-C in the middle of a run, and resuming."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.batch.report import CSV_NAME, JSONL_NAME, read_rows
from cxr_pipeline.batch.runner import BatchOptions, run_batch
from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.settings import Destination, load_settings
from tests.conftest import REPO_ROOT
from tests.support.batch_cli import run_batch_cli
from tests.support.batch_tree import build_tree
from tests.support.dicom3tools import dciodvfy_errors, require_tool
from tests.support.dicom_network import recording_scp

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_batch_cli(*args, timeout=timeout)


@pytest.fixture(scope="module")
def tree(
    tmp_path_factory: pytest.TempPathFactory, nih_png_paths: list[Path]
) -> tuple[Path, dict[str, tuple[str, str]]]:
    root = tmp_path_factory.mktemp("cli-tree")
    return root, build_tree(root, nih_png_paths)


def test_cli_writes_valid_sr_and_sc_then_a_second_run_does_nothing(
    tree: tuple[Path, dict[str, tuple[str, str]]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    require_tool("dciodvfy")
    root, expected = tree
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    args += ["--write-sr", "--write-sc", "--workers", "1", "--batch-size", "4"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done" in first.stdout and "positives" in first.stdout

    rows = read_rows(out / JSONL_NAME)
    assert sorted(str(Path(r.path).relative_to(root)) for r in rows) == sorted(expected)
    statuses = {str(Path(r.path).relative_to(root)): r.status for r in rows}
    assert statuses == {rel: status for rel, (status, _) in expected.items()}
    written = 0
    for row in rows:
        if row.status != "done" or row.kind != "dicom":
            assert row.outputs == []
            continue
        sr_file, sc_file = (out / p for p in row.outputs)
        for path in (sr_file, sc_file):
            assert dciodvfy_errors(path) == [], path
            written += 1
        back = read_structured_report(sr_file)
        assert back.probability == pytest.approx(row.probability, abs=1e-6)
        assert back.source_sop_instance_uid == row.sop_instance_uid
        sc = pydicom.dcmread(sc_file)
        assert sc.StudyInstanceUID == row.study_instance_uid
        assert sr_file.parent.parent.name == row.study_instance_uid  # OUT/<study>/<series>/
    assert written == 2 * sum(1 for r in rows if r.status == "done" and r.kind == "dicom")

    jsonl, csv_text = (out / JSONL_NAME).read_bytes(), (out / CSV_NAME).read_text()
    second = _cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming: {len(expected)} files already done, 0 to do" in second.stderr
    assert (out / JSONL_NAME).read_bytes() == jsonl
    assert (out / CSV_NAME).read_text() == csv_text


def test_send_stores_results_on_a_real_scp_and_a_refusal_is_a_failed_row(
    tree: tuple[Path, dict[str, tuple[str, str]]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    root, _ = tree
    settings = load_settings(
        None,
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
        batch={"decode_workers": 1, "batch_size": 8},
        send={"timeout_s": 10.0},
    )
    chest = root / "chest"
    with recording_scp(ae_title="TEST_PACS") as scp:
        dest = Destination(ae_title="TEST_PACS", host="127.0.0.1", port=scp.port)
        summary = run_batch(
            [chest], tmp_path / "ok", settings, BatchOptions(write_sr=True, send=dest)
        )
    done = [r for r in summary.rows if r.status == "done"]
    assert done and len(done) == len(summary.rows)
    sent = {str(ds.SOPInstanceUID) for ds in scp.received}
    assert sent == {Path(r.outputs[0]).stem for r in done}
    assert all(r.send_ms is not None for r in done)

    with recording_scp(ae_title="TEST_PACS", status=0xA700) as refusing:
        dest = Destination(ae_title="TEST_PACS", host="127.0.0.1", port=refusing.port)
        refused = run_batch(
            [chest], tmp_path / "refused", settings, BatchOptions(write_sr=True, send=dest)
        )
    assert {r.status for r in refused.rows} == {"failed"}
    assert {r.reason for r in refused.rows} == {"send_failed"}
    assert all(r.probability is not None for r in refused.rows)


def test_ctrl_c_leaves_a_valid_report_and_the_next_run_completes_it(
    nih_png_paths: list[Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    chosen = nih_png_paths[:30]
    for path in chosen:
        (pictures / path.name).symlink_to(path)
    out = tmp_path / "out"
    args = [str(pictures), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    args += ["--workers", "1", "--batch-size", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cxr_pipeline.batch", *args, "--no-progress"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    jsonl = out / JSONL_NAME
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if jsonl.is_file() and len(jsonl.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]

    lines = jsonl.read_text().splitlines()
    assert 2 <= len(lines) < len(chosen)
    assert all(json.loads(line)["status"] == "done" for line in lines)  # no torn line

    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_rows(jsonl)
    assert sorted(Path(r.path).name for r in rows) == sorted(p.name for p in chosen)
    assert {r.status for r in rows} == {"done"}
