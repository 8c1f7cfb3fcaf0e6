"""cxr-batch: walker, report/resume and the runner on a real mixed folder."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from cxr_pipeline.batch.report import (
    COLUMNS,
    CSV_NAME,
    JSONL_NAME,
    ReportWriter,
    Row,
    Status,
    read_rows,
)
from cxr_pipeline.batch.walker import FileKind, InputFile, detect_kind, walk
from cxr_pipeline.errors import ConfigError
from tests.conftest import testdata as data_file
from tests.support.batch_tree import build_tree


@pytest.fixture(scope="session")
def mixed_tree(
    tmp_path_factory: pytest.TempPathFactory, nih_png_paths: list[Path]
) -> tuple[Path, dict[str, tuple[str, str]]]:
    root = tmp_path_factory.mktemp("batch-tree")
    return root, build_tree(root, nih_png_paths)


# ----------------------------------------------------------------------------- walker


def test_walk_finds_every_file_once_sorted_and_excludes(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]], tmp_path: Path
) -> None:
    root, expected = mixed_tree
    found = list(walk([root, root / "chest", root / "DICOMDIR"], exclude=[root / "other"]))
    rel = [str(f.path.relative_to(root)) for f in found]
    assert len(rel) == len(set(rel))
    assert set(rel) == {k for k in expected if not k.startswith("other/")}
    assert all(f.path.is_absolute() and f.size == f.path.stat().st_size for f in found)
    assert rel == list(dict.fromkeys(rel))  # stable order, first occurrence wins
    with pytest.raises(ConfigError):
        list(walk([tmp_path / "missing"]))


def test_detect_kind_by_content_not_name(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
) -> None:
    root, _ = mixed_tree
    assert detect_kind(root / "DICOMDIR") is FileKind.DICOMDIR
    assert detect_kind(data_file("DICOMDIR")) is FileKind.DICOMDIR
    assert detect_kind(root / "chest" / "a" / "b" / "cr_jpegls") is FileKind.DICOM
    assert detect_kind(root / "chest" / "raw_dataset") is FileKind.DICOM  # no preamble
    assert detect_kind(root / "broken" / "truncated.dcm") is FileKind.DICOM
    assert detect_kind(root / "other" / "notes.dcm") is FileKind.OTHER
    assert detect_kind(root / "pictures" / "nih.png") is FileKind.PICTURE
    assert detect_kind(data_file("RG1_J2KR.dcm")) is FileKind.DICOM


def test_dicomdir_recognised_by_media_storage_class_under_another_name(tmp_path: Path) -> None:
    renamed = tmp_path / "index.bin"
    renamed.write_bytes(data_file("DICOMDIR").read_bytes())
    assert detect_kind(renamed) is FileKind.DICOMDIR


# ----------------------------------------------------------------------------- report


def _item(path: Path) -> InputFile:
    stat = path.stat()
    return InputFile(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def test_report_rows_round_trip_and_csv_agrees(tmp_path: Path) -> None:
    src = tmp_path / "a.dcm"
    src.write_bytes(b"x")
    out = tmp_path / "out"
    row = Row.for_file(
        _item(src),
        kind="dicom",
        status="done",
        probability=0.25,
        positive=False,
        threshold=0.5,
        outputs=["s/r/1.dcm", "s/r/2.dcm"],
        decode_ms=1.5,
    )
    with ReportWriter.open(out, [_item(src)]) as report:
        report.write(row)
    assert read_rows(out / JSONL_NAME) == [row]
    with (out / CSV_NAME).open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert tuple(lines[0].keys()) == COLUMNS
    assert lines[0]["probability"] == "0.25" and lines[0]["outputs"] == "s/r/1.dcm;s/r/2.dcm"
    assert lines[0]["positive"] == "False"


def test_resume_keeps_unchanged_drops_changed_torn_and_retried(tmp_path: Path) -> None:
    files = []
    for name in ("a", "b", "c", "d"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        files.append(path)
    out = tmp_path / "out"
    items = [_item(p) for p in files]
    with ReportWriter.open(out, items) as report:
        report.write(Row.for_file(items[0], status="done", probability=0.9))
        report.write(Row.for_file(items[1], status="failed", reason="corrupt_pixel_data"))
        report.write(Row.for_file(items[2], status="skipped", reason="not_dicom"))
    # d's row is torn (an interrupted write), c changes after the run
    with (out / JSONL_NAME).open("a") as handle:
        handle.write(Row.for_file(items[3], status="done").to_json()[:20])
    files[2].write_bytes(b"changed content")
    os.utime(files[2], ns=(1, 1))
    now = [_item(p) for p in files]

    report = ReportWriter.open(out, now)
    assert report.finished == {items[0].key, items[1].key}
    report.close()
    rows = read_rows(out / JSONL_NAME)
    assert [r.path for r in rows] == [str(files[0]), str(files[1])]
    assert (out / JSONL_NAME).read_text().endswith("\n")
    with (out / CSV_NAME).open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2

    with ReportWriter.open(out, now, retry_failed=True) as report:
        assert report.finished == {items[0].key}
    assert all(json.loads(line)["status"] == "done" for line in (out / JSONL_NAME).open())


def test_rows_of_files_not_in_this_run_are_kept(tmp_path: Path) -> None:
    one, two = tmp_path / "1", tmp_path / "2"
    one.write_bytes(b"1")
    two.write_bytes(b"2")
    out = tmp_path / "out"
    with ReportWriter.open(out, [_item(one)]) as report:
        report.write(Row.for_file(_item(one), status=Status.DONE.value))
    with ReportWriter.open(out, [_item(two)]) as report:
        assert report.finished == {_item(one).key}
