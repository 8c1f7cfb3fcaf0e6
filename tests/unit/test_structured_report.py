"""TID 1500 SR: built from real headers, checked by dciodvfy and DCMTK, read back."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cxr_pipeline.dicom.codes import (
    ABSENT,
    AT_OR_ABOVE_OPERATING_POINT,
    BELOW_OPERATING_POINT,
    CODE_MEANING_MAX,
    COVID19,
    COVID19_NOT_SUSPECTED_DISPLAY,
    COVID19_SUSPECTED_DISPLAY,
    SUSPECTED,
    UCUM_PERCENT,
    SopClass,
)
from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.encode.structured_report import build_structured_report, display_measurements
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings
from tests.support.dicom3tools import dciodvfy, dsr2html, dsrdump
from tests.support.source_attributes import PATIENT_STUDY, SHARED_DICOMS


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard(
        name="test-squeezenet1_1",
        version="0.0.1-test",
        architecture="squeezenet1_1",
        device_uid="2.25.314159265358979323846264338327950288",
        threshold=0.5,
    )


@pytest.fixture(scope="module")
def settings() -> OutputSettings:
    return OutputSettings(institution_name="Test Hospital")


@pytest.fixture(scope="module")
def rg1_header(rg1_uncr: Path) -> Dataset:
    return dcmread(rg1_uncr, stop_before_pixels=True)


def _write(ds: Dataset, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_valid(path: Path) -> None:
    report = dciodvfy(path)
    assert report.errors == [], report.output


@pytest.mark.parametrize(
    ("probability", "positive"), [(0.8731, True), (0.5, True), (0.1234, False)]
)
def test_sr_is_valid_and_reads_back(
    rg1_header: Dataset,
    card: ModelCard,
    settings: OutputSettings,
    tmp_path: Path,
    probability: float,
    positive: bool,
) -> None:
    sr = build_structured_report(rg1_header, Finding(probability, card.threshold), card, settings)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)

    dump = dsrdump(path)
    assert '(126000,DCM,"Imaging Measurement Report")' in dump
    assert '(121058,DCM,"Procedure reported")=(36554-4,LN,' in dump
    assert '(121071,DCM,"Finding")=(840539006,SCT,"COVID-19")' in dump
    decision = SUSPECTED if positive else ABSENT
    assert f'(840539006,SCT,"COVID-19")=({decision.value},SCT,' in dump
    assert '(111012,DCM,"Certainty of Finding")' in dump
    assert "(%,UCUM," in dump
    assert rg1_header.SOPInstanceUID in dsr2html(path)

    back = read_structured_report(path)
    assert back.probability == pytest.approx(probability, abs=1e-9)
    assert back.positive is positive
    assert back.finding == COVID19
    assert back.evaluation == decision
    assert back.source_sop_instance_uid == rg1_header.SOPInstanceUID
    assert back.source_sop_class_uid == rg1_header.SOPClassUID
    assert back.device_uid == card.device_uid
    assert back.observer_device_uid == card.device_uid
    assert back.algorithm_name == card.name
    assert back.algorithm_version == card.version
    assert "threshold=0.5" in back.algorithm_parameters
    assert back.threshold == 0.5
    assert back.parameter("threshold_scale") == "raw score"
    assert "architecture=squeezenet1_1" in back.algorithm_parameters
    assert back.verification_flag == "UNVERIFIED"
    assert back.sop_instance_uid == sr.SOPInstanceUID


def test_sr_headers_join_the_source_study_in_a_new_series(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings
) -> None:
    sr = build_structured_report(rg1_header, Finding(0.7, 0.5), card, settings)
    for keyword in PATIENT_STUDY:
        assert sr.get(keyword) == rg1_header.get(keyword), keyword
    assert sr.SOPClassUID == SopClass.COMPREHENSIVE_3D_SR
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != rg1_header.SeriesInstanceUID
    assert sr.SeriesNumber == settings.sr_series_number
    assert sr.InstitutionName == "Test Hospital"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == rg1_header.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == rg1_header.SOPInstanceUID


def test_contributing_equipment_identifies_the_model(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings
) -> None:
    sr = build_structured_report(rg1_header, Finding(0.7, 0.5), card, settings)
    items = sr.ContributingEquipmentSequence
    ours = [item for item in items if item.get("DeviceUID")]
    assert len(ours) == 1
    processing = ours[0]
    assert processing.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert processing.DeviceUID == card.device_uid
    assert processing.Manufacturer == settings.manufacturer
    assert processing.ManufacturerModelName == card.name
    assert processing.SoftwareVersions == card.version
    assert "Not for diagnostic use" in processing.ContributionDescription
    # highdicom also records the source's acquisition equipment
    acquisition = [
        item for item in items if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    ]
    assert acquisition[0].Manufacturer == rg1_header.Manufacturer


def test_uids_are_deterministic_per_image_and_model(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings
) -> None:
    first = build_structured_report(rg1_header, Finding(0.7, 0.5), card, settings)
    again = build_structured_report(rg1_header, Finding(0.2, 0.5), card, settings)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID

    other_model = ModelCard(
        name=card.name, version="0.0.2", architecture=card.architecture, device_uid="2.25.42"
    )
    moved = build_structured_report(rg1_header, Finding(0.7, 0.5), other_model, settings)
    assert moved.SOPInstanceUID != first.SOPInstanceUID
    assert moved.SeriesInstanceUID != first.SeriesInstanceUID

    second_image = copy.deepcopy(rg1_header)
    second_image.SOPInstanceUID = rg1_header.SOPInstanceUID + ".2"
    sibling = build_structured_report(second_image, Finding(0.7, 0.5), card, settings)
    assert sibling.SOPInstanceUID != first.SOPInstanceUID
    # Each image's SR has its own series: OHIF v3 shows only the newest SR of a series.
    assert sibling.SeriesInstanceUID != first.SeriesInstanceUID
    assert sibling.SeriesNumber == first.SeriesNumber


@pytest.mark.parametrize("name", SHARED_DICOMS)
def test_sr_from_shared_radiographs(
    shared_dicom_dir: Path, card: ModelCard, settings: OutputSettings, tmp_path: Path, name: str
) -> None:
    source = dcmread(shared_dicom_dir / name, stop_before_pixels=True, force=True)
    sr = build_structured_report(source, Finding(0.61, 0.5), card, settings)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)
    back = read_structured_report(path)
    assert back.source_sop_instance_uid == source.SOPInstanceUID
    assert back.positive
    stored = dcmread(path)
    for keyword in PATIENT_STUDY:
        assert (stored.get(keyword) or "") == (source.get(keyword) or ""), keyword
    # values invalid for their VR (the NIH file's Patient's Age "81") are not copied
    assert "PatientAge" not in stored or len(str(stored.PatientAge)) == 4


def test_source_without_optional_attributes(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    bare = copy.deepcopy(rg1_header)
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
        "Manufacturer",
        "InstitutionName",
    ):
        delattr(bare, keyword)
    kept = copy.deepcopy(bare)
    sr = build_structured_report(bare, Finding(0.3, 0.5), card, settings)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)
    stored = dcmread(path)
    assert "PatientName" in stored and not stored.PatientName
    assert "AccessionNumber" in stored and not stored.AccessionNumber
    assert stored.PatientID == rg1_header.PatientID
    assert read_structured_report(path).positive is False
    assert bare == kept, "the caller's dataset must not be changed"


def test_no_patient_name_in_warnings_or_logs(
    shared_dicom_dir: Path,
    card: ModelCard,
    settings: OutputSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # single-component names make highdicom warn with the name in the message
    source = dcmread(
        shared_dicom_dir / "nih_dx_secondary_capture.dcm", stop_before_pixels=True, force=True
    )
    source.ReferringPhysicianName = "Referrer"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_structured_report(source, Finding(0.3, 0.5), card, settings)
    assert sr.PatientName == source.PatientName
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for text in texts:
        assert str(source.PatientName) not in text
        assert "Referrer" not in text


@pytest.mark.parametrize("probability", [float("nan"), -0.1, 1.5])
def test_invalid_probability_is_a_typed_error(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, probability: float
) -> None:
    with pytest.raises(EncodeError):
        build_structured_report(rg1_header, Finding(probability, 0.5), card, settings)


def test_source_without_sop_instance_uid_is_a_typed_error(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings
) -> None:
    broken = copy.deepcopy(rg1_header)
    del broken.SOPInstanceUID
    with pytest.raises(EncodeError, match="SOPInstanceUID"):
        build_structured_report(broken, Finding(0.5, 0.5), card, settings)


def test_reading_a_non_result_sr_is_a_typed_error(rg1_header: Dataset, tmp_path: Path) -> None:
    with pytest.raises(EncodeError):
        read_structured_report(rg1_header)
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a dicom file")
    with pytest.raises(EncodeError):
        read_structured_report(not_dicom)


def test_model_name_too_long_for_its_vr_is_a_typed_error(
    rg1_header: Dataset, settings: OutputSettings
) -> None:
    card = ModelCard(name="m" * 80, version="1", architecture="resnet18", device_uid="2.25.5")
    with pytest.raises(EncodeError):
        build_structured_report(rg1_header, Finding(0.5, 0.5), card, settings)


# --- what viewers need (issue 10): a planar region group, SEPARATE content, dates ---------


def _containers(item: Dataset) -> list[Dataset]:
    found = [item] if item.get("ValueType") == "CONTAINER" else []
    for child in item.get("ContentSequence", []):
        found.extend(_containers(child))
    return found


def _hot_square(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    heat = np.zeros(shape, dtype=np.float32)
    heat[rows, cols] = 1.0
    heat[rows.start + 2, cols.start + 2] = 1.0
    return heat


def test_planar_region_group_outlines_the_salient_area(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    # A heatmap at 1/8 of the image (as cxr-batch decodes) with one hot block.
    shape = (rg1_header.Rows // 8, rg1_header.Columns // 8)
    heat = _hot_square(shape, slice(40, 80), slice(100, 150))
    sr = build_structured_report(rg1_header, Finding(0.8731, 0.5), card, settings, heatmap=heat)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)

    back = read_structured_report(path)
    scale_r, scale_c = rg1_header.Rows / shape[0], rg1_header.Columns / shape[1]
    cols = [c for c, _ in back.region_points]
    rows = [r for _, r in back.region_points]
    assert min(cols) == pytest.approx(100 * scale_c, abs=1e-3)
    assert max(cols) == pytest.approx(150 * scale_c, abs=1e-3)
    assert min(rows) == pytest.approx(40 * scale_r, abs=1e-3)
    assert max(rows) == pytest.approx(80 * scale_r, abs=1e-3)

    report = hd.sr.MeasurementReport.from_sequence(
        hd.sr.Comprehensive3DSR.from_dataset(dcmread(path)).content
    )
    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == 1
    group = planar[0]
    # Same Tracking UID as the image-level group: OHIF merges them into one measurement.
    assert str(group.tracking_uid) == back.tracking_uid
    assert group.finding_type == COVID19
    assert group.reference_type == codes.DCM.ImageRegion
    region = group.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
    referenced = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == rg1_header.SOPInstanceUID
    label, point = group.get_measurements()
    assert label.name == COVID19_SUSPECTED_DISPLAY
    assert label.value == pytest.approx(87.31)
    assert label.unit == UCUM_PERCENT
    assert point.name.value == AT_OR_ABOVE_OPERATING_POINT.value
    assert point.name.meaning == "above the operating point"
    assert point.value == pytest.approx(50.0)
    assert point.unit == UCUM_PERCENT
    declared = sr.CodingSchemeIdentificationSequence[0]
    assert declared.CodingSchemeDesignator == COVID19_SUSPECTED_DISPLAY.scheme_designator


def test_without_heatmap_the_region_is_the_whole_image(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    sr = build_structured_report(rg1_header, Finding(0.2, 0.5), card, settings)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)
    back = read_structured_report(path)
    cols = [c for c, _ in back.region_points]
    rows = [r for _, r in back.region_points]
    assert (min(cols), max(cols)) == (0.0, float(rg1_header.Columns))
    assert (min(rows), max(rows)) == (0.0, float(rg1_header.Rows))
    dump = dsrdump(path)
    assert '"COVID-19 not suspected, probability")="20.0"' in dump
    assert '"below the operating point")="50.0"' in dump


def test_every_container_is_separate_and_dsr2html_labels_every_value(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    probability = 0.17446625232697
    sr = build_structured_report(rg1_header, Finding(probability, 0.5), card, settings)
    containers = _containers(sr)
    assert len(containers) >= 4  # report, imaging measurements, two groups
    assert {c.ContinuityOfContent for c in containers} == {"SEPARATE"}
    path = _write(sr, tmp_path, "sr.dcm")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dsr2html(path)))
    stored = dcmread(path)
    numbers = [
        item.MeasuredValueSequence[0].NumericValue
        for item in _items(stored)
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111012"
    ]
    assert len(numbers) == 1
    written = str(numbers[0])
    assert written.startswith("17.446625")
    assert f"Certainty of Finding = {written} %" in text
    assert "COVID-19: Absent" in text
    assert "COVID-19 not suspected, probability: 17.4466 %" in text
    assert "below the operating point: 50.0 %" in text
    assert "Present" not in text


def _items(item: Dataset) -> list[Dataset]:
    found = []
    for child in item.get("ContentSequence", []):
        found.append(child)
        found.extend(_items(child))
    return found


def ohif_lines(path: Path) -> list[str]:
    """The text lines OHIF v3.13 draws beside an SR's region (its cornerstone-dicom-sr logic).

    Measurement groups of Imaging Measurements are merged by Tracking UID; every NUM item
    directly in a merged group with a measured value becomes "meaning: value(2 dp) unit".
    """
    ds = dcmread(path)
    imaging = next(
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    merged: dict[str, list[Dataset]] = {}
    for group in imaging.ContentSequence:
        uid = next(i.UID for i in group.ContentSequence if i.ValueType == "UIDREF")
        merged.setdefault(uid, []).extend(group.ContentSequence)
    lines = []
    for content in merged.values():
        for item in content:
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                value = item.MeasuredValueSequence[0]
                lines.append(
                    f"{item.ConceptNameCodeSequence[0].CodeMeaning}: "
                    f"{float(value.NumericValue):.2f} "
                    f"{value.MeasurementUnitsCodeSequence[0].CodeValue}"
                )
    return lines


@pytest.mark.parametrize(
    ("finding", "lines"),
    [
        (
            Finding(0.4239, 0.27, target_sensitivity=0.98, calibration_method="platt",
                    decided_by="model card m 1"),
            ["COVID-19 suspected, probability: 42.39 %",
             "above the 98 %-sensitivity point: 27.00 %"],
        ),
        (
            Finding(0.031, 0.27, target_sensitivity=0.98, calibration_method="platt"),
            ["COVID-19 not suspected, probability: 3.10 %",
             "below the 98 %-sensitivity point: 27.00 %"],
        ),
        (
            Finding(0.9594, 0.5),
            ["COVID-19 suspected, probability: 95.94 %", "above the operating point: 50.00 %"],
        ),
        (
            Finding(0.2, 0.2, target_sensitivity=0.975),
            ["COVID-19 suspected, probability: 20.00 %",
             "at the 97.5 %-sensitivity point: 20.00 %"],
        ),
    ],
)
def test_ohif_draws_one_statement_and_dsr2html_shows_the_operating_point(
    rg1_header: Dataset,
    card: ModelCard,
    settings: OutputSettings,
    tmp_path: Path,
    finding: Finding,
    lines: list[str],
) -> None:
    sr = build_structured_report(rg1_header, finding, card, settings)
    path = _write(sr, tmp_path, "sr.dcm")
    _assert_valid(path)
    # The statement in two short lines, and no third "Certainty of Finding: 0.42 1" line:
    # the standard NUM sits below the coded decision, which OHIF does not print.
    assert ohif_lines(path) == lines
    assert read_structured_report(path).display == tuple(lines)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dsr2html(path)))
    assert "Present" not in text
    assert f"threshold={finding.threshold:.6g}" in text
    assert "COVID-19: Suspected" in text if finding.positive else "COVID-19: Absent" in text


def test_algorithm_parameters_record_the_operating_point_and_who_set_it(
    rg1_header: Dataset, card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    finding = Finding(0.4, 0.2, score=0.05, decided_by="site profile St Elsewhere",
                      target_sensitivity=0.95, calibration_method="isotonic")
    path = _write(build_structured_report(rg1_header, finding, card, settings), tmp_path, "s.dcm")
    back = read_structured_report(path)
    assert back.probability == pytest.approx(0.4)
    assert back.positive
    assert back.evaluation == SUSPECTED
    assert back.threshold == pytest.approx(0.2)
    assert back.parameter("threshold_scale") == "calibrated probability (isotonic)"
    assert back.parameter("target_sensitivity") == "0.95"
    assert back.parameter("decided_by") == "site profile St Elsewhere"
    assert back.display == ("COVID-19 suspected, probability: 40.00 %",
                            "above the 95 %-sensitivity point: 20.00 %")


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("target", [None, 0.98, 0.975])
def test_display_concepts_fit_their_vr_and_name_the_decision(
    positive: bool, target: float | None
) -> None:
    threshold = 0.1234567
    probability = threshold + (1e-5 if positive else -1e-5)
    verdict, point = display_measurements(Finding(probability, threshold,
                                                  target_sensitivity=target))
    assert verdict.name == (COVID19_SUSPECTED_DISPLAY if positive
                            else COVID19_NOT_SUSPECTED_DISPLAY)
    wanted = AT_OR_ABOVE_OPERATING_POINT if positive else BELOW_OPERATING_POINT
    assert point.name.value == wanted.value
    assert len(point.name.meaning) <= CODE_MEANING_MAX
    assert point.name.meaning.startswith("above the " if positive else "below the ")
    assert point.value == pytest.approx(100 * threshold, abs=1e-4)
