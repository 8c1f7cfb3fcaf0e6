"""End-to-end over the library: real DICOM in, SR + SC out, validated by independent tools."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.__main__ import EXIT_OK, EXIT_REJECTED, main
from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.errors import NotChestRadiograph
from cxr_pipeline.pipeline import Engine, analyse, write_results
from cxr_pipeline.settings import load_settings
from tests.conftest import testdata
from tests.support.dicom3tools import dciodvfy_errors, dsrdump


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine.from_settings(load_settings(None, model={"checkpoint": tiny_checkpoint}))


def test_rg1_uncompressed_and_j2k_lossless_agree(engine: Engine, tmp_path: Path) -> None:
    uncompressed = analyse(testdata("RG1_UNCR.dcm"), engine)
    j2k = analyse(testdata("RG1_J2KR.dcm"), engine)
    assert 0.0 <= uncompressed.finding.probability <= 1.0
    assert j2k.finding.probability == pytest.approx(uncompressed.finding.probability, abs=1e-5)
    lossy = analyse(testdata("RG1_J2KI.dcm"), engine)
    assert lossy.finding.probability == pytest.approx(uncompressed.finding.probability, abs=0.05)

    paths = write_results(uncompressed, tmp_path)
    assert len(paths) == 2
    for path in paths:
        assert dciodvfy_errors(path) == []
    source = pydicom.dcmread(testdata("RG1_UNCR.dcm"), stop_before_pixels=True)
    sr = pydicom.dcmread(paths[0])
    sc = pydicom.dcmread(paths[1])
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert "COVID" in dsrdump(paths[0])
    back = read_structured_report(sr)
    assert back.probability == pytest.approx(uncompressed.finding.probability, abs=1e-6)
    assert back.positive == uncompressed.finding.positive
    assert back.source_sop_instance_uid == source.SOPInstanceUID
    assert back.verification_flag == "UNVERIFIED"
    assert back.device_uid == engine.predictor.card.device_uid


def test_same_image_twice_gives_same_result_uids(engine: Engine) -> None:
    first = analyse(testdata("RG1_UNCR.dcm"), engine)
    second = analyse(testdata("RG1_UNCR.dcm"), engine)
    assert first.structured_report.SOPInstanceUID == second.structured_report.SOPInstanceUID
    assert first.secondary_capture.SOPInstanceUID == second.secondary_capture.SOPInstanceUID
    assert first.finding == second.finding


def test_shared_real_dicoms_are_analysed(engine: Engine, shared_dicom_dir: Path) -> None:
    files = sorted(shared_dicom_dir.glob("*.dcm"))
    assert len(files) == 4
    for path in files:
        analysis = analyse(path, engine)
        assert 0.0 <= analysis.finding.probability <= 1.0
        assert analysis.heatmap_method == "gradcam"


def test_non_chest_is_rejected(engine: Engine) -> None:
    with pytest.raises(NotChestRadiograph):
        analyse(testdata("RG3_UNCR.dcm"), engine)


def test_command_line_writes_results(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [str(testdata("RG1_UNCR.dcm")), "--out", str(tmp_path), "--checkpoint",
         str(tiny_checkpoint), "--heatmap", "none"]
    )
    assert status == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "done"
    assert Path(printed["structured_report"]).is_file()
    assert Path(printed["secondary_capture"]).is_file()
    assert printed["heatmap"] == "none"

    status = main([str(testdata("CT_small.dcm")), "--out", str(tmp_path), "--checkpoint",
                   str(tiny_checkpoint)])
    assert status == EXIT_REJECTED
    printed = json.loads(capsys.readouterr().out)
    assert printed["reason"] == "not_chest_radiograph"


def test_warm_up_analyses_a_generated_chest_radiograph(tiny_checkpoint: Path) -> None:
    from cxr_pipeline.dicom.ingest import check_chest_radiograph
    from cxr_pipeline.service.warmup import synthetic_radiograph, warm_up
    from cxr_pipeline.settings import IngestSettings

    ds = synthetic_radiograph()
    check_chest_radiograph(ds, IngestSettings())  # passes the default policy as is
    settings = load_settings(model={"checkpoint": str(tiny_checkpoint), "device": "cpu"})
    assert warm_up(Engine.from_settings(settings)) > 0


def test_command_line_and_results_carry_the_calibrated_probability(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from cxr_pipeline.model.architectures import load_checkpoint, save_checkpoint
    from cxr_pipeline.model.calibration import Calibration

    model, card = load_checkpoint(tiny_checkpoint)
    calibration = Calibration(method="platt", slope=2.0, intercept=1.0, fitted_on="test", n=9)
    calibrated = tmp_path / "calibrated.pt"
    save_checkpoint(calibrated, model, replace(card, calibration=calibration))
    status = main([str(testdata("RG1_UNCR.dcm")), "--out", str(tmp_path / "out"),
                   "--checkpoint", str(calibrated), "--heatmap", "none"])
    assert status == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    raw = printed["raw_score"]
    assert printed["covid_probability"] == pytest.approx(calibration.apply_one(raw), abs=1e-6)
    assert printed["covid_probability"] != pytest.approx(raw, abs=1e-3)
    assert printed["threshold"] == pytest.approx(calibration.apply_one(card.threshold), abs=1e-6)
    assert printed["threshold_scale"] == "calibrated probability (platt)"
    assert printed["decided_by"] == f"model card {card.name} {card.version}"
    positive = printed["covid_probability"] >= printed["threshold"]
    assert printed["covid_positive"] is positive
    assert printed["statement"].startswith(
        "COVID-19 suspected (above" if positive else "COVID-19 not suspected (below")
    back = read_structured_report(Path(printed["structured_report"]))
    assert back.probability == pytest.approx(printed["covid_probability"], abs=1e-6)
    assert back.threshold == pytest.approx(printed["threshold"], rel=1e-5)
    assert back.parameter("threshold_scale") == "calibrated probability (platt)"
    sc = pydicom.dcmread(printed["secondary_capture"], stop_before_pixels=True)
    assert printed["statement"] in sc.ImageComments
