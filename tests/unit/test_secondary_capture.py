"""Heatmap Secondary Capture: real radiographs in, dciodvfy-valid RGB SC out."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import ImplicitVRLittleEndian

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.encode.secondary_capture import annotation_lines, build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings
from tests.support.dicom3tools import dciodvfy
from tests.support.source_attributes import PATIENT_STUDY, SHARED_DICOMS


def _display(ds: Dataset, step: int) -> np.ndarray:
    """Display-ready float pixels: modality + VOI LUT, MONOCHROME1 inverted, [0, 1]."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)[::step, ::step]
    values = values.astype(np.float32)
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = 1.0 - values
    return np.asarray(values, dtype=np.float32)


def _gaussian(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return np.asarray(np.exp(-distance / (2 * sigma**2)), dtype=np.float32)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard(
        name="test-squeezenet1_1",
        version="0.0.1-test",
        architecture="squeezenet1_1",
        device_uid="2.25.314159265358979323846264338327950288",
    )


@pytest.fixture(scope="module")
def settings() -> OutputSettings:
    return OutputSettings()


@pytest.fixture(scope="module")
def rg1(rg1_uncr: Path) -> tuple[Dataset, np.ndarray]:
    """RG1 (MONOCHROME1 chest CR) header and display pixels at 1/4 resolution."""
    ds = dcmread(rg1_uncr)
    pixels = _display(ds, 4)
    del ds.PixelData
    return ds, pixels


@pytest.fixture(scope="module")
def heatmap(rg1: tuple[Dataset, np.ndarray]) -> np.ndarray:
    shape = rg1[1].shape
    return _gaussian(shape, (shape[0] * 0.45, shape[1] * 0.3), shape[0] / 10)


def _write_valid(sc: Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    assert report.errors == [], report.output
    return path


@pytest.mark.parametrize("with_heatmap", [True, False])
@pytest.mark.parametrize("probability", [0.91, 0.08])
def test_sc_is_valid_rgb_with_burned_in_text(
    rg1: tuple[Dataset, np.ndarray],
    heatmap: np.ndarray,
    card: ModelCard,
    settings: OutputSettings,
    tmp_path: Path,
    with_heatmap: bool,
    probability: float,
) -> None:
    source, pixels = rg1
    sc = build_secondary_capture(
        source, pixels, heatmap if with_heatmap else None, Finding(probability, 0.5), card, settings
    )
    path = _write_valid(sc, tmp_path)
    stored = dcmread(path)
    assert stored.SOPClassUID == SopClass.SECONDARY_CAPTURE
    assert stored.PhotometricInterpretation == "RGB"
    assert (stored.SamplesPerPixel, stored.BitsAllocated) == (3, 8)
    assert (stored.Rows, stored.Columns) == pixels.shape
    assert stored.BurnedInAnnotation == "YES"
    assert "DERIVED" in stored.ImageType
    assert "NOT FOR DIAGNOSTIC USE" in stored.SeriesDescription
    verdict = "suspected" if probability >= 0.5 else "not suspected"
    side = "above" if probability >= 0.5 else "below"
    assert (f"COVID-19 {verdict} ({side} the operating point, 50 %): probability "
            f"{100 * probability:.0f} %") in stored.ImageComments
    assert "POSITIVE" not in stored.ImageComments and "Present" not in stored.ImageComments
    reference = stored.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    np.testing.assert_array_equal(stored.pixel_array, sc.pixel_array)


def test_sc_headers_join_the_source_study_in_a_new_series(
    rg1: tuple[Dataset, np.ndarray],
    heatmap: np.ndarray,
    card: ModelCard,
    settings: OutputSettings,
) -> None:
    source, pixels = rg1
    sc = build_secondary_capture(source, pixels, heatmap, Finding(0.7, 0.5), card, settings)
    for keyword in PATIENT_STUDY:
        assert sc.get(keyword) == source.get(keyword), keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SeriesNumber == settings.sc_series_number
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert sc.BodyPartExamined == "CHEST"
    ours = [item for item in sc.ContributingEquipmentSequence if item.get("DeviceUID")]
    assert [item.DeviceUID for item in ours] == [card.device_uid]


def test_monochrome1_source_is_not_inverted_again(
    rg1: tuple[Dataset, np.ndarray], card: ModelCard, settings: OutputSettings
) -> None:
    source, pixels = rg1
    assert source.PhotometricInterpretation == "MONOCHROME1"
    rgb = build_secondary_capture(
        source, pixels, None, Finding(0.2, 0.5), card, settings
    ).pixel_array.astype(np.float32)
    rows = pixels.shape[0]
    body = slice(rows // 8, rows - rows // 8)  # away from the burned-in text boxes
    red, green, blue = (rgb[body, :, channel] for channel in range(3))
    np.testing.assert_array_equal(red, green)
    np.testing.assert_array_equal(green, blue)
    np.testing.assert_allclose(red / 255.0, pixels[body], atol=1 / 255 + 1e-6)


def test_heatmap_is_coloured_where_hot_and_grey_where_cold(
    rg1: tuple[Dataset, np.ndarray],
    heatmap: np.ndarray,
    card: ModelCard,
    settings: OutputSettings,
) -> None:
    source, pixels = rg1
    rgb = build_secondary_capture(
        source, pixels, heatmap, Finding(0.7, 0.5), card, settings
    ).pixel_array.astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    hot = heatmap > 0.9
    cold = heatmap < 1e-3
    cold[: pixels.shape[0] // 8] = False  # text boxes
    cold[-pixels.shape[0] // 8 :] = False
    assert spread[hot].mean() > 40
    assert spread[cold].max() <= 1


def test_text_boxes_are_burned_in(
    rg1: tuple[Dataset, np.ndarray], card: ModelCard, settings: OutputSettings
) -> None:
    source, pixels = rg1
    rgb = build_secondary_capture(source, pixels, None, Finding(0.7, 0.5), card, settings)
    array = rgb.pixel_array.astype(np.int16)
    top = array[:20, : array.shape[1] // 2]
    bottom = array[-20:, : array.shape[1] // 2]
    red_mark = (top[..., 0] > 200) & (top[..., 1] < 120) & (top[..., 2] < 120)
    assert red_mark.sum() > 20, "the red NOT FOR DIAGNOSTIC USE mark is missing"
    assert ((bottom == 0).all(axis=2)).sum() > 100, "the black result box is missing"
    assert ((bottom > 200).all(axis=2)).sum() > 20, "the white result text is missing"


def test_large_radiograph_is_downsampled(rg1_uncr: Path, card: ModelCard, tmp_path: Path) -> None:
    ds = dcmread(rg1_uncr)
    pixels = _display(ds, 1)
    del ds.PixelData
    settings = OutputSettings(sc_max_size=512)
    heat = _gaussian(pixels.shape, (900, 700), 200)
    sc = build_secondary_capture(ds, pixels, heat, Finding(0.7, 0.5), card, settings)
    assert max(sc.Rows, sc.Columns) == 512
    assert sc.Rows / sc.Columns == pytest.approx(pixels.shape[0] / pixels.shape[1], rel=0.01)
    _write_valid(sc, tmp_path)


def test_uids_are_deterministic_and_distinct_from_the_sr(
    rg1: tuple[Dataset, np.ndarray], card: ModelCard, settings: OutputSettings
) -> None:
    source, pixels = rg1
    first = build_secondary_capture(source, pixels, None, Finding(0.7, 0.5), card, settings)
    again = build_secondary_capture(source, pixels, None, Finding(0.1, 0.5), card, settings)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    other = ModelCard(name="m", version="2", architecture="resnet18", device_uid="2.25.7")
    moved = build_secondary_capture(source, pixels, None, Finding(0.7, 0.5), other, settings)
    assert moved.SOPInstanceUID != first.SOPInstanceUID
    assert moved.SeriesInstanceUID != first.SeriesInstanceUID
    sr = build_structured_report(source, Finding(0.7, 0.5), card, settings)
    assert sr.SOPInstanceUID != first.SOPInstanceUID
    assert sr.SeriesInstanceUID != first.SeriesInstanceUID


@pytest.mark.parametrize("name", SHARED_DICOMS)
def test_sc_from_shared_radiographs(
    shared_dicom_dir: Path, card: ModelCard, settings: OutputSettings, tmp_path: Path, name: str
) -> None:
    ds = dcmread(shared_dicom_dir / name, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        ds.file_meta = ds.get("file_meta", Dataset())
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # raw file, no meta
    pixels = _display(ds, 2)
    del ds.PixelData
    heat = _gaussian(pixels.shape, (200, 300), 60)
    sc = build_secondary_capture(ds, pixels, heat, Finding(0.4, 0.5), card, settings)
    path = _write_valid(sc, tmp_path)
    stored = dcmread(path)
    for keyword in PATIENT_STUDY:
        assert (stored.get(keyword) or "") == (ds.get(keyword) or ""), keyword
    assert "PatientAge" not in stored or len(str(stored.PatientAge)) == 4


def test_source_without_optional_attributes(
    rg1: tuple[Dataset, np.ndarray], card: ModelCard, settings: OutputSettings, tmp_path: Path
) -> None:
    source, pixels = rg1
    bare = copy.deepcopy(source)
    for keyword in (
        "PatientName",
        "AccessionNumber",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "PatientOrientation",
        "BodyPartExamined",
        "Manufacturer",
    ):
        delattr(bare, keyword)
    sc = build_secondary_capture(bare, pixels, None, Finding(0.7, 0.5), card, settings)
    path = _write_valid(sc, tmp_path)
    stored = dcmread(path)
    assert "PatientName" in stored and not stored.PatientName
    assert "PatientOrientation" in stored and not stored.PatientOrientation
    assert stored.PatientID == source.PatientID


@pytest.mark.parametrize(
    ("pixels", "heat", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), None, "2D"),
        (np.full((64, 64), np.nan, np.float32), None, "NaN"),
        (np.zeros((64, 64), np.float32), np.zeros((32, 32), np.float32), "shape"),
    ],
)
def test_bad_pixels_are_a_typed_error(
    rg1: tuple[Dataset, np.ndarray],
    card: ModelCard,
    settings: OutputSettings,
    pixels: np.ndarray,
    heat: np.ndarray | None,
    match: str,
) -> None:
    with pytest.raises(EncodeError, match=match):
        build_secondary_capture(rg1[0], pixels, heat, Finding(0.5, 0.5), card, settings)


def test_unknown_colormap_is_a_typed_error(
    rg1: tuple[Dataset, np.ndarray], heatmap: np.ndarray, card: ModelCard
) -> None:
    settings = OutputSettings(heatmap_colormap="no-such-map")
    with pytest.raises(EncodeError, match="colormap"):
        build_secondary_capture(rg1[0], rg1[1], heatmap, Finding(0.5, 0.5), card, settings)


def test_sc_has_series_and_content_dates_and_no_window(
    rg1: tuple[Dataset, np.ndarray], heatmap: np.ndarray, card: ModelCard, settings: OutputSettings
) -> None:
    source = copy.deepcopy(rg1[0])
    # A grey source's window must not travel to the RGB result.
    source.WindowCenter, source.WindowWidth = 2048, 4096
    sc = build_secondary_capture(source, rg1[1], heatmap, Finding(0.7, 0.5), card, settings)
    for keyword in ("SeriesDate", "SeriesTime", "ContentDate", "ContentTime"):
        assert sc.get(keyword), keyword
    assert (sc.SeriesDate, sc.SeriesTime) == (sc.ContentDate, sc.ContentTime)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        assert keyword not in sc, keyword
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.PlanarConfiguration == 0


def test_burned_in_lines_carry_the_statement_and_a_site_profile() -> None:
    card = ModelCard(name="m", version="2.0.0", architecture="efficientnet_lite0",
                     device_uid="2.25.1")
    by_card = Finding(0.23, 0.12, target_sensitivity=0.98, decided_by="model card m 2.0.0")
    assert annotation_lines(by_card, card) == [
        "COVID-19 suspected (above the 98 %-sensitivity point, 12 %): probability 23 %",
        "m 2.0.0",
    ]
    by_site = Finding(0.08, 0.12, target_sensitivity=0.95,
                      decided_by="site profile St Elsewhere")
    assert annotation_lines(by_site, card) == [
        "COVID-19 not suspected (below the 95 %-sensitivity point, 12 %): probability 8 %",
        "m 2.0.0",
        "operating point: site profile St Elsewhere",
    ]
