"""cxr-batch: walker, report/resume and the runner on a real mixed folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_pipeline.batch.cli import main as cli_main
from cxr_pipeline.batch.decode import model_max_side
from cxr_pipeline.batch.report import (
    COLUMNS,
    CSV_NAME,
    JSONL_NAME,
    ReportWriter,
    Row,
    Status,
    Summary,
    read_rows,
)
from cxr_pipeline.batch.runner import BatchOptions, run_batch
from cxr_pipeline.batch.walker import FileKind, InputFile, detect_kind, walk
from cxr_pipeline.dicom.codes import JPEG2000_TRANSFER_SYNTAXES
from cxr_pipeline.dicom.decode import transfer_syntax_of
from cxr_pipeline.dicom.ingest import load_picture, load_radiograph
from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.errors import ConfigError
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.model.preprocess import preprocess
from cxr_pipeline.settings import Destination, Settings, load_settings, parse_destination
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


# ----------------------------------------------------------------------------- runner


@pytest.fixture(scope="session")
def batch_settings(tiny_checkpoint: Path) -> Settings:
    return load_settings(
        None,
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
        batch={"decode_workers": 1, "batch_size": 4},
    )


@pytest.fixture(scope="session")
def first_run(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
    batch_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Summary]:
    root, _ = mixed_tree
    out = tmp_path_factory.mktemp("batch-out")
    seen: list[Row] = []
    summary = run_batch(
        [root], out, batch_settings, BatchOptions(write_sr=True), on_row=seen.append
    )
    assert seen == summary.rows
    return out, summary


def _rows_by_rel(out: Path, root: Path) -> dict[str, Row]:
    rows = read_rows(out / JSONL_NAME)
    by_rel = {str(Path(r.path).relative_to(root)): r for r in rows}
    assert len(by_rel) == len(rows), "one row per file"
    return by_rel


def test_every_file_gets_exactly_one_row_with_the_right_status(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]], first_run: tuple[Path, Summary]
) -> None:
    root, expected = mixed_tree
    out, summary = first_run
    rows = _rows_by_rel(out, root)
    assert set(rows) == set(expected)
    for rel, (status, reasons) in expected.items():
        row = rows[rel]
        assert row.status == status, (rel, row.status, row.reason, row.detail)
        if reasons:
            assert row.reason in reasons.split("|"), (rel, row.reason)
        if status == "done":
            assert row.probability is not None and 0.0 <= row.probability <= 1.0
            assert row.positive == (row.probability >= 0.5)
            assert row.model_name == "test-squeezenet1_1" and row.model_version == "0.0.1-test"
            assert row.decode_ms is not None and row.infer_ms is not None
        else:
            assert row.probability is None and row.detail
    done = sum(1 for s, _ in expected.values() if s == "done")
    assert summary.counts["done"] == done and summary.classified == done
    assert summary.counts["skipped"] + summary.counts["failed"] == len(expected) - done
    assert not summary.interrupted and summary.images_per_s > 0
    assert rows["chest/raw_dataset"].sop_instance_uid  # DICOM rows carry the source UIDs
    assert rows["other/tibia_cr.dcm"].sop_instance_uid


def test_batched_probability_equals_one_image_in_process(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
    first_run: tuple[Path, Summary],
    batch_settings: Settings,
) -> None:
    root, _ = mixed_tree
    out, _ = first_run
    rows = _rows_by_rel(out, root)
    predictor = Predictor.from_settings(batch_settings.model)
    spec = predictor.card.preprocessing
    assert batch_settings.batch.decode_max_side is None  # decode sized to fit the model
    for rel in ("chest/dx_mono1_j2k.dcm", "chest/a/b/cr_jpegls", "chest/raw_dataset"):
        ds = pydicom.dcmread(root / rel, force=True)
        max_side = model_max_side(
            int(ds.Rows),
            int(ds.Columns),
            spec.resize,
            exact_reduction=transfer_syntax_of(ds) not in JPEG2000_TRANSFER_SYNTAXES,
        )
        image = load_radiograph(ds, batch_settings.ingest, max_side=max_side)
        alone = float(predictor.predict_tensors(preprocess(image.pixels, spec)[None])[0])
        assert rows[rel].probability == pytest.approx(alone, abs=1e-5)
        assert rows[rel].sop_instance_uid == image.sop_instance_uid
    picture = preprocess(load_picture(root / "pictures" / "nih.png"), spec)[None]
    alone = float(predictor.predict_tensors(picture)[0])
    assert rows["pictures/nih.png"].probability == pytest.approx(alone, abs=1e-5)


def test_written_sr_reads_back_with_the_row_probability(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]], first_run: tuple[Path, Summary]
) -> None:
    root, _ = mixed_tree
    out, _ = first_run
    row = _rows_by_rel(out, root)["chest/cr_explicit_le.dcm"]
    (sr_path,) = row.outputs
    back = read_structured_report(out / sr_path)
    assert back.probability == pytest.approx(row.probability, abs=1e-6)
    assert back.source_sop_instance_uid == row.sop_instance_uid
    assert back.study_instance_uid == row.study_instance_uid
    assert _rows_by_rel(out, root)["pictures/nih.png"].outputs == []


def test_second_run_does_nothing_new_and_retry_failed_redoes_only_failures(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
    first_run: tuple[Path, Summary],
    batch_settings: Settings,
    tmp_path: Path,
) -> None:
    root, expected = mixed_tree
    out, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = (copy / JSONL_NAME).read_bytes()
    again = run_batch([root], copy, batch_settings, BatchOptions(write_sr=True))
    assert sum(again.counts.values()) == 0 and again.already_done == len(expected)
    assert (copy / JSONL_NAME).read_bytes() == before

    retry = batch_settings.model_copy(
        update={"batch": batch_settings.batch.model_copy(update={"retry_failed": True})}
    )
    redone = run_batch([root], copy, retry, BatchOptions())
    failed = {k for k, (s, _) in expected.items() if s == "failed"}
    assert {str(Path(r.path).relative_to(root)) for r in redone.rows} == failed
    assert set(_rows_by_rel(copy, root)) == set(expected)


def test_parse_destination() -> None:
    assert parse_destination("ORTHANC@127.0.0.1:4242") == Destination(
        ae_title="ORTHANC", host="127.0.0.1", port=4242
    )
    for bad in ("ORTHANC@host", "host:104", "@h:1", "AE@h:0", "AE@h:x", "A" * 17 + "@h:1"):
        with pytest.raises(ConfigError):
            parse_destination(bad)


def test_cli_refuses_bad_options_with_a_clear_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert cli_main([str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert cli_main([str(tmp_path), "--out", str(tmp_path / "o"), "--send", "X@h:1"]) == 2


def test_reduced_resolution_decode_gives_the_same_model_input(
    nih_png_paths: list[Path], batch_settings: Settings
) -> None:
    # 1024 px -> decode_max_side 512 -> area resize to 256 equals 1024 -> 256 directly.
    from cxr_pipeline.model.card import PreprocessingSpec
    from tests.support import dicom_factory as factory

    ds = factory.make_dicom(factory.load_png(nih_png_paths[5], size=None), bits_stored=12)
    assert (ds.Rows, ds.Columns) == (1024, 1024)
    spec = PreprocessingSpec()
    full = preprocess(np.array(load_radiograph(ds, batch_settings.ingest).pixels), spec)
    reduced = load_radiograph(ds, batch_settings.ingest, max_side=512)
    assert reduced.pixels.shape == (512, 512)
    assert float((preprocess(np.array(reduced.pixels), spec) - full).abs().max()) < 1e-3
    # Sized to fit the model (the default): 1024 -> 256 block average is the area resize.
    assert model_max_side(1024, 1024, spec.resize) == 256
    fitted = load_radiograph(ds, batch_settings.ingest, max_side=256)
    assert fitted.pixels.shape == (256, 256)
    assert float((preprocess(np.array(fitted.pixels), spec) - full).abs().max()) < 1e-3


@pytest.mark.parametrize(
    ("rows", "columns", "resize", "exact", "expected"),
    [
        (1024, 1024, 256, True, 256),  # exact block average to the model size
        (1024, 1024, 256, False, 512),  # JPEG 2000 levels keep a 2x margin
        (1024, 1024, 183, True, 512),  # non-integer final resize: keep a 2x margin
        (1955, 1841, 256, True, 978),  # never below the model size
        (2048, 2500, 256, True, 313),
        (300, 300, 256, True, None),  # already small: full resolution
    ],
)
def test_model_max_side(
    rows: int, columns: int, resize: int, exact: bool, expected: int | None
) -> None:
    max_side = model_max_side(rows, columns, resize, exact_reduction=exact)
    assert max_side == expected
    if max_side is not None:
        factor = -(-max(rows, columns) // max_side)
        assert min(rows, columns) // factor >= resize


def test_heatmaps_without_sc_are_saved_as_png_at_image_size(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
    batch_settings: Settings,
    tmp_path: Path,
) -> None:
    from PIL import Image

    root, _ = mixed_tree
    inputs = [root / "pictures" / "nih.png", root / "chest" / "cr_explicit_le.dcm"]
    summary = run_batch(inputs, tmp_path / "out", batch_settings, BatchOptions(heatmaps=True))
    assert [r.status for r in summary.rows] == ["done", "done"]
    for row in summary.rows:
        (png,) = row.outputs
        assert png.startswith("heatmaps/") and row.explain_ms is not None
        with Image.open(tmp_path / "out" / png) as image:
            source = Path(row.path)
            expected = (1024, 1024) if source.suffix == ".png" else (256, 256)
            assert image.size == expected


def test_a_killed_decode_process_costs_no_row(
    mixed_tree: tuple[Path, dict[str, tuple[str, str]]],
    batch_settings: Settings,
    tmp_path: Path,
) -> None:
    # A native decoder that crashes its process breaks the pool; the runner starts a new
    # one and retries what was in flight, so every file still gets exactly one row.
    import multiprocessing
    import signal

    root, expected = mixed_tree
    settings = batch_settings.model_copy(
        update={"batch": batch_settings.batch.model_copy(update={"batch_size": 2})}
    )
    killed: list[int] = []

    def kill_a_decoder(row: Row) -> None:
        if not killed:
            children = multiprocessing.active_children()
            assert children, "no decode process to kill"
            os.kill(children[0].pid or 0, signal.SIGKILL)
            killed.append(children[0].pid or 0)

    summary = run_batch([root / "chest"], tmp_path / "out", settings, on_row=kill_a_decoder)
    assert killed and summary.decoder_restarts >= 1
    chest = {k: s for k, (s, _) in expected.items() if k.startswith("chest/")}
    rows = read_rows(tmp_path / "out" / JSONL_NAME)
    assert sorted(str(Path(r.path).relative_to(root)) for r in rows) == sorted(chest)
    assert {r.status for r in summary.rows} == {"done"}



def test_a_decode_result_crosses_in_shared_memory_behind_an_atomic_message() -> None:
    # A result sent whole through the executor's pipe can be cut in half by a kill,
    # which hangs ProcessPoolExecutor; the pipe carries only a handle small enough for
    # one atomic write, and the block is freed once read.
    import pickle
    from multiprocessing.shared_memory import SharedMemory

    from cxr_pipeline.batch.decode import Decoded
    from cxr_pipeline.batch.handoff import ATOMIC_MESSAGE_BYTES, put, take

    rng = np.random.default_rng(0)
    decoded = Decoded(
        item=InputFile(path=Path("/data/a.dcm"), size=1, mtime_ns=2),
        kind=FileKind.DICOM,
        tensor=rng.standard_normal((3, 224, 224)).astype(np.float32),
        pixels=rng.integers(0, 4096, (1024, 1024), dtype=np.uint16),
        sop_instance_uid="1.2.3",
    )
    handoff = put(decoded)
    # The executor wraps it in a small envelope (work id, no exception): far below.
    assert len(pickle.dumps(handoff)) < ATOMIC_MESSAGE_BYTES // 8
    back = take(handoff)
    assert back.item == decoded.item and back.sop_instance_uid == "1.2.3"
    assert back.tensor is not None and np.array_equal(back.tensor, decoded.tensor)
    assert back.pixels is not None and np.array_equal(back.pixels, decoded.pixels)
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=handoff.name)


def test_a_full_dev_shm_fails_that_file_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # Writing into a block past a full /dev/shm would kill the decode process (SIGBUS);
    # the file gets a failed row saying why instead.
    from cxr_pipeline.batch import handoff
    from cxr_pipeline.batch.decode import Decoded

    item = InputFile(path=Path("/data/b.dcm"), size=1, mtime_ns=2)
    tensor = np.zeros((3, 224, 224), np.float32)
    monkeypatch.setattr(handoff, "shm_free_bytes", lambda: 1 << 20)
    back = handoff.take(handoff.put(Decoded(item=item, kind=FileKind.DICOM, tensor=tensor)))
    assert back.item == item and back.tensor is None
    assert back.status == Status.FAILED and "--shm-size" in back.detail


def test_decode_processes_start_with_the_runner_already_imported(
    batch_settings: Settings,
) -> None:
    # The fork server preloads the decoders and the runner (and its heavy imports), so a
    # new decode pool is a set of cheap forks, not a fresh import of highdicom & co. each.
    # The probe lives in a module that imports nothing, so unpickling it loads nothing.
    from cxr_pipeline.batch.runner import decode_pool
    from tests.support.process_probe import imported

    assert batch_settings.batch.start_method == "forkserver"
    executor = decode_pool(batch_settings, 1)
    try:
        names = ("cxr_pipeline.batch.runner", "highdicom", "torch", "monai")
        # MONAI is not needed to decode and preprocess, and so not loaded at all.
        assert executor.submit(imported, names).result(timeout=120) == [True, True, True, False]
    finally:
        executor.shutdown()
