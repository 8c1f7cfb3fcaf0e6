"""Ingest on real files: pydicom-data's RG1/RG3/CT/MR, the shared chest DICOMs, and DICOMs
built from real NIH radiographs in every transfer syntax (tests/support/dicom_factory.py).
"""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_windowing

from cxr_pipeline.dicom.decode import area_downsample, window_unit
from cxr_pipeline.dicom.ingest import (
    Radiograph,
    check_chest_radiograph,
    load_picture,
    load_radiograph,
    read_dataset,
)
from cxr_pipeline.errors import (
    CorruptPixelData,
    CxrError,
    ImageTooLarge,
    ImageTooSmall,
    MissingAttribute,
    MultiFrameImage,
    NotAnImage,
    NotChestRadiograph,
    NotDicom,
    Reason,
    RejectedInput,
    UnsupportedPixelData,
    UnsupportedTransferSyntax,
)
from cxr_pipeline.settings import IngestSettings
from tests.conftest import testdata as pydicom_testdata
from tests.support.dicom_factory import (
    ALL_TRANSFER_SYNTAXES,
    DCMTK_TRANSFER_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    dcmtk_available,
    encode,
    load_png,
    make_dicom,
    to_bytes,
    write,
)

POLICY = IngestSettings()
SHARED_DICOMS = (
    "nih_dx_secondary_capture.dcm",
    "rsna_cr_ap_jpeg_baseline.dcm",
    "siim_cr_pa_fake_monochrome1.dcm",
    "siim_cr_pa_jpeg_baseline.dcm",
)


def _pydicom_data(name: str) -> Path:
    try:
        return pydicom_testdata(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def rg1() -> dict[str, Radiograph]:
    """RG1 (real 16-bit MONOCHROME1 chest CR) in its four transfer syntaxes, ingested once."""
    names = ("RG1_UNCR", "RG1_UNCI", "RG1_J2KR", "RG1_J2KI")
    return {name: load_radiograph(_pydicom_data(f"{name}.dcm"), POLICY) for name in names}


@pytest.fixture(scope="session")
def nih_small(nih_png_paths: list[Path]) -> np.ndarray:
    """A real NIH radiograph, area-downsampled to 256 px, float32 in [0, 1]."""
    return load_png(nih_png_paths[0], size=256)


# ---------------------------------------------------------------------------------------
# Real radiographs are accepted and decoded correctly
# ---------------------------------------------------------------------------------------


def test_rg1_all_transfer_syntaxes(rg1: dict[str, Radiograph]) -> None:
    for name, image in rg1.items():
        assert image.pixels.dtype == np.float32, name
        assert image.pixels.shape == (1955, 1841), name
        assert 0.0 <= float(image.pixels.min()) < float(image.pixels.max()) <= 1.0, name
        assert image.sop_class_uid == uid.ComputedRadiographyImageStorage
        assert "PixelData" not in image.header
        assert image.header.BodyPartExamined == "CHEST"
        # Pixel Spacing is 0.000 in this file: not a usable spacing.
        assert image.pixel_spacing_mm is None
    # JPEG 2000 lossless is bit-exact after ingest; lossy is close to its own source.
    np.testing.assert_array_equal(rg1["RG1_J2KR"].pixels, rg1["RG1_UNCR"].pixels)
    lossy_error = np.abs(rg1["RG1_J2KI"].pixels - rg1["RG1_UNCI"].pixels)
    assert float(lossy_error.mean()) < 0.005
    assert rg1["RG1_J2KR"].transfer_syntax_uid == uid.JPEG2000Lossless
    assert rg1["RG1_J2KI"].transfer_syntax_uid == uid.JPEG2000


def test_rg1_monochrome1_is_inverted(rg1: dict[str, Radiograph]) -> None:
    """Lungs (dark) sit beside the bright mediastinum: inversion must have happened."""
    pixels = rg1["RG1_UNCR"].pixels
    rows, cols = pixels.shape
    lung = pixels[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    mediastinum = pixels[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert lung < mediastinum - 0.1


def test_rg1_window_from_header(rg1: dict[str, Radiograph]) -> None:
    """WC 15000 / WW 30000 on 15-bit data: stored v -> 1 - v/30000 (inverted), unclipped."""
    ds = pydicom.dcmread(_pydicom_data("RG1_UNCR.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((stored - 14999.5) / 29999 + 0.5, 0, 1)
    np.testing.assert_allclose(rg1["RG1_UNCR"].pixels, expected, atol=2e-6)


@pytest.mark.parametrize("name", SHARED_DICOMS)
def test_shared_chest_dicoms_accepted(shared_dicom_dir: Path, name: str) -> None:
    image = load_radiograph(shared_dicom_dir / name, POLICY)
    assert image.pixels.shape == (1024, 1024)
    assert image.pixels.dtype == np.float32
    assert float(image.pixels.std()) > 0.05


def test_fake_monochrome1_is_inverted_relative_to_original(shared_dicom_dir: Path) -> None:
    """The relabelled file is taken at its word: MONOCHROME1 is inverted (1 - original).

    A mislabelled photometric interpretation cannot be detected from the header; we honour
    the header, as every DICOM viewer does.
    """
    original = load_radiograph(shared_dicom_dir / "siim_cr_pa_jpeg_baseline.dcm", POLICY)
    relabelled = load_radiograph(shared_dicom_dir / "siim_cr_pa_fake_monochrome1.dcm", POLICY)
    np.testing.assert_allclose(relabelled.pixels, 1.0 - original.pixels, atol=1e-6)


def test_shared_dicom_metadata(shared_dicom_dir: Path) -> None:
    rsna = load_radiograph(shared_dicom_dir / "rsna_cr_ap_jpeg_baseline.dcm", POLICY)
    assert rsna.pixel_spacing_mm == pytest.approx((0.168, 0.168))
    assert rsna.transfer_syntax_uid == uid.JPEGBaseline8Bit
    sc = load_radiograph(shared_dicom_dir / "nih_dx_secondary_capture.dcm", POLICY)
    assert sc.sop_class_uid == uid.SecondaryCaptureImageStorage
    assert sc.pixel_spacing_mm is None
    # 8-bit without VOI: the stored range is the display range (like a PNG).
    stored = pydicom.dcmread(shared_dicom_dir / "nih_dx_secondary_capture.dcm").pixel_array
    np.testing.assert_allclose(sc.pixels, stored / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# NIH-derived DICOMs in every transfer syntax and both greyscale photometrics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("syntax", ALL_TRANSFER_SYNTAXES, ids=lambda s: uid.UID(s).keyword)
def test_nih_roundtrip_every_syntax(
    nih_small: np.ndarray, syntax: str, photometric: str, tmp_path: Path
) -> None:
    if syntax in DCMTK_TRANSFER_SYNTAXES and not dcmtk_available():
        pytest.skip("DCMTK (dcmcjpeg, dcmconv) not installed")
    bits = 8 if syntax == uid.JPEGBaseline8Bit else 12
    ds = make_dicom(nih_small, bits_stored=bits, photometric=photometric, transfer_syntax=syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    path = write(ds, tmp_path / "nih.dcm")
    image = load_radiograph(path, POLICY)
    assert image.transfer_syntax_uid == syntax
    assert image.pixels.shape == nih_small.shape
    error = np.abs(image.pixels - nih_small)
    if syntax in LOSSY_TRANSFER_SYNTAXES:
        assert float(error.mean()) < 0.01
        assert float(np.percentile(error, 99)) < 0.06
    else:
        # Only the quantisation to `bits` separates the two.
        assert float(error.max()) <= 0.5 / ((1 << bits) - 1) + 1e-6


def test_factory_reencodes_from_any_syntax(nih_small: np.ndarray) -> None:
    reference = make_dicom(nih_small).pixel_array
    sources = [uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian, uid.RLELossless]
    if dcmtk_available():
        sources.append(uid.ExplicitVRBigEndian)
    for source in sources:
        ds = make_dicom(nih_small, transfer_syntax=source)
        for target in (uid.ExplicitVRLittleEndian, uid.JPEG2000Lossless):
            again = encode(ds, target)
            assert again.file_meta.TransferSyntaxUID == target
            np.testing.assert_array_equal(again.pixel_array, reference)


def test_nih_full_resolution_dicom_equals_png(nih_png_paths: list[Path]) -> None:
    """An 8-bit DICOM of the PNG's own values ingests to exactly load_picture(png)."""
    png = nih_png_paths[1]
    picture = load_picture(png)
    stored = np.asarray(Image.open(png).convert("L"))
    ds = make_dicom(stored, bits_stored=8, transfer_syntax=uid.RLELossless, window=None)
    image = load_radiograph(io.BytesIO(to_bytes(ds)), POLICY)
    np.testing.assert_array_equal(image.pixels, picture)


def test_rgb_and_ybr_become_grey(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, bits_stored=8, photometric="RGB", modality="DX")
    grey = load_radiograph(ds, POLICY).pixels
    assert float(np.abs(grey - nih_small).max()) <= 0.5 / 255 + 1e-5
    if dcmtk_available():
        ybr = encode(ds, uid.JPEGBaseline8Bit)
        assert ybr.PhotometricInterpretation.startswith("YBR")
        assert float(np.abs(load_radiograph(ybr, POLICY).pixels - nih_small).mean()) < 0.01


def test_window_absent_deep_image_uses_min_max(nih_small: np.ndarray) -> None:
    values = np.rint(nih_small * 1000 + 500).astype(np.uint16)  # 12-bit data using 500..1500
    ds = make_dicom(values, bits_stored=12, window=None)
    pixels = load_radiograph(ds, POLICY).pixels
    expected = (values - values.min()) / float(values.max() - values.min())
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_rescale_then_window(nih_small: np.ndarray) -> None:
    values = np.rint(nih_small * 4095).astype(np.uint16)
    # Rescale to -1024..3071, window exactly over that range: same image back.
    ds = make_dicom(
        values, RescaleSlope=1, RescaleIntercept=-1024, window=(1024.0, 4096.0), bits_stored=12
    )
    np.testing.assert_allclose(load_radiograph(ds, POLICY).pixels, values / 4095, atol=1e-5)


def _pydicom_window_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's apply_windowing, rescaled from its own output range to [0, 1]."""
    with np.errstate(over="ignore"):
        low, high = apply_windowing(np.array([-1e30, 1e30]), ds)
        return (apply_windowing(values.astype(np.float64), ds) - low) / (high - low)


def test_window_matches_pydicom(nih_small: np.ndarray) -> None:
    rg1 = pydicom.dcmread(_pydicom_data("RG1_UNCR.dcm"))
    values = rg1.pixel_array
    unit = window_unit(values, rg1)
    assert unit is not None and unit.dtype == np.float32
    np.testing.assert_allclose(unit, _pydicom_window_unit(values, rg1), atol=2e-6)
    stored = np.rint(nih_small * 4095).astype(np.uint16)
    for function, center, width in (
        ("SIGMOID", 2000.0, 1500.0),
        ("LINEAR_EXACT", 1800.0, 2500.0),
        ("LINEAR", 1500.0, 1.0),
        ("LINEAR", 2048.0, 4096.0),
    ):
        ds = make_dicom(stored, window=(center, width), VOILUTFunction=function)
        unit = window_unit(stored, ds)
        assert unit is not None
        np.testing.assert_allclose(unit, _pydicom_window_unit(stored, ds), atol=2e-6)
    ds = make_dicom(stored, window=(2048.0, 0.0))
    assert window_unit(stored, ds) is None  # invalid width: treated as no window


def test_voi_lut_sequence_applied(nih_small: np.ndarray) -> None:
    values = np.rint(nih_small * 255).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", [int(v) for v in np.arange(256) ** 2])  # non-linear VOI LUT
    ds = make_dicom(values, bits_stored=12, window=None, VOILUTSequence=[item])
    pixels = load_radiograph(ds, POLICY).pixels
    np.testing.assert_allclose(pixels, (values.astype(np.float64) / 255) ** 2, atol=1e-6)


def test_signed_data_with_rescale(nih_small: np.ndarray) -> None:
    """Signed 16-bit stored values (two's complement) through rescale and window."""
    values = np.rint(nih_small * 4000 - 2000).astype(np.int16)
    ds = make_dicom(np.zeros(values.shape, np.uint16), bits_stored=16, window=None)
    ds.PixelRepresentation = 1
    ds.PixelData = values.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, 100
    ds.WindowCenter, ds.WindowWidth = 100.0, 8001.0  # covers -3900..4100 after rescale
    expected = np.clip((values * 2.0 + 100 - 99.5) / 8000 + 0.5, 0, 1)
    np.testing.assert_allclose(load_radiograph(ds, POLICY).pixels, expected, atol=1e-6)


def test_presentation_lut_inverse_on_monochrome2(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, modality="DX", PresentationLUTShape="INVERSE")
    np.testing.assert_allclose(load_radiograph(ds, POLICY).pixels, 1 - nih_small, atol=2e-4)
    # DX MONOCHROME1 carries INVERSE as a description of the same inversion: applied once.
    ds = make_dicom(nih_small, modality="DX", photometric="MONOCHROME1")
    assert ds.PresentationLUTShape == "INVERSE"
    np.testing.assert_allclose(load_radiograph(ds, POLICY).pixels, nih_small, atol=2e-4)


def test_input_dataset_not_modified_and_header_shallow(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small)
    image = load_radiograph(ds, POLICY)
    assert "PixelData" in ds
    assert "PixelData" not in image.header
    assert image.header.SOPInstanceUID == ds.SOPInstanceUID == image.sop_instance_uid
    assert image.header.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    assert image.study_instance_uid == ds.StudyInstanceUID
    assert image.series_instance_uid == ds.SeriesInstanceUID
    assert image.pixel_spacing_mm == pytest.approx((0.2, 0.2))
    image.header.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian


def test_read_dataset_sources(nih_small: np.ndarray, tmp_path: Path) -> None:
    ds = make_dicom(nih_small)
    path = write(ds, tmp_path / "x.dcm")
    assert read_dataset(ds) is ds
    assert read_dataset(path).SOPInstanceUID == ds.SOPInstanceUID
    assert read_dataset(str(path)).SOPInstanceUID == ds.SOPInstanceUID
    assert read_dataset(io.BytesIO(path.read_bytes())).SOPInstanceUID == ds.SOPInstanceUID


# ---------------------------------------------------------------------------------------
# Reduced-resolution fast path
# ---------------------------------------------------------------------------------------


def test_max_side_j2k_uses_codec_reduction(rg1: dict[str, Radiograph]) -> None:
    small = load_radiograph(_pydicom_data("RG1_J2KR.dcm"), POLICY, max_side=512)
    assert max(small.pixels.shape) <= 512
    reference = area_downsample(rg1["RG1_J2KR"].pixels, 512)
    assert small.pixels.shape == reference.shape
    # Wavelet low-pass versus box average: close, not identical.
    assert float(np.abs(small.pixels - reference).mean()) < 0.01


def test_max_side_native_is_area_average(rg1: dict[str, Radiograph]) -> None:
    small = load_radiograph(_pydicom_data("RG1_UNCR.dcm"), POLICY, max_side=512)
    np.testing.assert_allclose(small.pixels, area_downsample(rg1["RG1_UNCR"].pixels, 512))


def test_max_side_jpeg_dct_scaling(shared_dicom_dir: Path) -> None:
    path = shared_dicom_dir / "siim_cr_pa_jpeg_baseline.dcm"
    full = load_radiograph(path, POLICY)
    small = load_radiograph(path, POLICY, max_side=256)
    assert small.pixels.shape == (256, 256)
    assert small.pixel_spacing_mm == pytest.approx((0.672, 0.672))
    assert float(np.abs(small.pixels - area_downsample(full.pixels, 256)).mean()) < 0.01


def test_max_side_j2k_12_bit_nih(nih_png_paths: list[Path]) -> None:
    pixels = load_png(nih_png_paths[2], size=None)
    ds = make_dicom(pixels, bits_stored=12, transfer_syntax=uid.JPEG2000Lossless)
    full = load_radiograph(ds, POLICY).pixels
    small = load_radiograph(ds, POLICY, max_side=256).pixels
    assert small.shape == (256, 256)
    reference = area_downsample(full, 256)
    # The 5/3 wavelet low-pass is sharper than a box average: per-pixel noise differs,
    # brightness and structure do not.
    assert float(np.abs(small - reference).mean()) < 0.02
    assert abs(float(small.mean() - reference.mean())) < 0.002
    assert float(np.corrcoef(small.ravel(), reference.ravel())[0, 1]) > 0.99


# ---------------------------------------------------------------------------------------
# Rejections, each with its reason
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("RG3_UNCR.dcm", NotChestRadiograph),
        ("RG3_J2KR.dcm", NotChestRadiograph),
        ("CT_small.dcm", NotChestRadiograph),
        ("MR_small.dcm", NotChestRadiograph),
        ("test-SR.dcm", NotAnImage),
        ("rtplan.dcm", NotAnImage),
    ],
)
def test_real_non_chest_files_rejected(name: str, error: type[RejectedInput]) -> None:
    with pytest.raises(error) as info:
        load_radiograph(_pydicom_data(name), POLICY)
    assert info.value.reason == error.reason


def test_truncated_files(tmp_path: Path) -> None:
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        data = _pydicom_data(name).read_bytes()
        half = tmp_path / f"half_{name}"
        half.write_bytes(data[: len(data) // 2])
        with pytest.raises(CorruptPixelData) as info:
            load_radiograph(half, POLICY)
        assert info.value.reason is Reason.CORRUPT_PIXEL_DATA
        with pytest.raises(CorruptPixelData):
            load_radiograph(io.BytesIO(data[: len(data) // 2]), POLICY)
        stub = tmp_path / f"stub_{name}"
        stub.write_bytes(data[:100])
        with pytest.raises(NotDicom):
            load_radiograph(stub, POLICY)


def test_garbled_j2k_codestream(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, transfer_syntax=uid.JPEG2000Lossless)
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    frame[200:] = bytes(len(frame) - 200)  # keep the header, zero the code-blocks
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    for max_side in (None, 64):
        with pytest.raises(CorruptPixelData):
            load_radiograph(ds, POLICY, max_side=max_side)


def test_not_dicom(nih_png_paths: list[Path], tmp_path: Path) -> None:
    with pytest.raises(NotDicom) as info:
        load_radiograph(nih_png_paths[0], POLICY)
    assert info.value.reason is Reason.NOT_DICOM
    with pytest.raises(NotDicom):
        read_dataset(tmp_path / "missing.dcm")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(NotDicom):
        read_dataset(empty)


def test_multi_frame_rejected(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(MultiFrameImage):
        load_radiograph(ds, POLICY)


def test_absurd_size_rejected_before_decoding(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, bits_stored=16)
    ds.Rows = ds.Columns = 65535  # 8 GiB if anyone allocated it
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            load_radiograph(ds, POLICY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


def test_too_small_and_odd_shapes(nih_small: np.ndarray) -> None:
    with pytest.raises(ImageTooSmall):
        load_radiograph(make_dicom(nih_small[:64, :64]), POLICY)
    with pytest.raises(NotChestRadiograph, match="aspect"):
        load_radiograph(make_dicom(nih_small[:128, :]), IngestSettings(max_aspect_ratio=1.5))


def test_bits_allocated_32_rejected(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, bits_stored=16)
    ds.BitsAllocated = 32
    ds.PixelData = np.rint(nih_small * 65535).astype(np.uint32).tobytes()
    with pytest.raises(UnsupportedPixelData) as info:
        load_radiograph(ds, POLICY)
    assert info.value.reason is Reason.UNSUPPORTED_PIXEL_DATA


def test_unsupported_photometric_and_bits(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small, bits_stored=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedPixelData):
        check_chest_radiograph(ds, POLICY)
    ds = make_dicom(nih_small, bits_stored=8)
    ds.BitsStored = 12
    with pytest.raises(UnsupportedPixelData):
        check_chest_radiograph(ds, POLICY)


def test_unknown_transfer_syntax_rejected(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    with pytest.raises(UnsupportedTransferSyntax) as info:
        load_radiograph(ds, POLICY)
    assert info.value.reason is Reason.UNSUPPORTED_TRANSFER_SYNTAX


def test_short_native_pixel_data(nih_small: np.ndarray) -> None:
    ds = make_dicom(nih_small)
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(CorruptPixelData, match="bytes"):
        load_radiograph(ds, POLICY)


def test_zero_length_pixel_data_read_from_file(nih_small: np.ndarray, tmp_path: Path) -> None:
    ds = make_dicom(nih_small)
    ds.PixelData = b""
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptPixelData, match="empty") as info:
        load_radiograph(path, POLICY)
    assert info.value.reason is Reason.CORRUPT_PIXEL_DATA


@pytest.mark.parametrize(
    "keyword",
    ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Rows", "Modality"],
)
def test_missing_attributes(nih_small: np.ndarray, keyword: str) -> None:
    ds = make_dicom(nih_small, **{keyword: None})
    with pytest.raises(MissingAttribute, match=keyword) as info:
        load_radiograph(ds, POLICY)
    assert info.value.reason is Reason.MISSING_ATTRIBUTE


def test_empty_uid_is_missing(nih_small: np.ndarray) -> None:
    with pytest.raises(MissingAttribute):
        check_chest_radiograph(make_dicom(nih_small, StudyInstanceUID=""), POLICY)


# ---------------------------------------------------------------------------------------
# The chest policy
# ---------------------------------------------------------------------------------------


def test_policy_body_part_and_view(nih_small: np.ndarray) -> None:
    accepted = [
        make_dicom(nih_small, body_part="CHEST", view="AP"),
        make_dicom(nih_small, body_part="THORAX", view=None, modality="DX"),
        make_dicom(nih_small, body_part=None, view="PA", SeriesDescription="Chest PA"),
        make_dicom(nih_small, body_part=None, view=None, modality="DX", sop_class=None),
        make_dicom(
            nih_small,
            modality="CR",
            sop_class=uid.DigitalXRayImageStorageForProcessing,
            body_part="CHEST",
        ),
    ]
    for ds in accepted:
        check_chest_radiograph(ds, POLICY)
    rejected = [
        make_dicom(nih_small, body_part="KNEE"),
        make_dicom(nih_small, body_part=None, StudyDescription="XR HAND 3 VIEWS"),
        make_dicom(nih_small, view="CC"),
        make_dicom(
            nih_small,
            modality="MG",
            sop_class=uid.DigitalMammographyXRayImageStorageForPresentation,
        ),
        make_dicom(nih_small, modality="OT", sop_class=uid.SecondaryCaptureImageStorage),
        make_dicom(nih_small, modality="CT"),
    ]
    for ds in rejected:
        with pytest.raises(NotChestRadiograph):
            check_chest_radiograph(ds, POLICY)


def test_policy_switches(nih_small: np.ndarray) -> None:
    no_body_part = make_dicom(nih_small, body_part=None)
    check_chest_radiograph(no_body_part, POLICY)
    with pytest.raises(NotChestRadiograph):
        check_chest_radiograph(no_body_part, IngestSettings(require_body_part=True))
    sc = make_dicom(nih_small, modality="DX", sop_class=uid.SecondaryCaptureImageStorage)
    check_chest_radiograph(sc, POLICY)
    with pytest.raises(NotChestRadiograph):
        check_chest_radiograph(sc, IngestSettings(accept_secondary_capture=False))
    with pytest.raises(ImageTooLarge):
        check_chest_radiograph(sc, IngestSettings(max_size=200))


# ---------------------------------------------------------------------------------------
# load_picture
# ---------------------------------------------------------------------------------------


def test_load_picture_png_variants(nih_png_paths: list[Path], tmp_path: Path) -> None:
    source = nih_png_paths[0]
    grey8 = np.asarray(Image.open(source).convert("L"))
    picture = load_picture(source)
    assert picture.dtype == np.float32 and picture.shape == grey8.shape
    np.testing.assert_allclose(picture, grey8 / 255.0, atol=1e-7)
    sixteen = tmp_path / "x16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(sixteen)
    np.testing.assert_allclose(load_picture(sixteen), picture, atol=1e-6)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(grey8).convert("RGB").save(rgb)
    np.testing.assert_allclose(load_picture(rgb), picture, atol=1e-7)
    jpeg = tmp_path / "x.jpg"
    Image.fromarray(grey8).save(jpeg, quality=95)
    assert float(np.abs(load_picture(jpeg) - picture).mean()) < 0.01


def test_load_picture_itk_formats(nih_png_paths: list[Path], tmp_path: Path) -> None:
    import SimpleITK as sitk  # noqa: N813

    grey8 = np.asarray(Image.open(nih_png_paths[0]).convert("L"))[::4, ::4].copy()
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        path = tmp_path / f"x{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(grey8), str(path))
        np.testing.assert_allclose(load_picture(path), grey8 / 255.0, atol=1e-7)
    floats = grey8.astype(np.float32) * 3.0 - 100.0
    path = tmp_path / "f.nii"
    sitk.WriteImage(sitk.GetImageFromArray(floats), str(path))
    expected = (floats - floats.min()) / (floats.max() - floats.min())
    np.testing.assert_allclose(load_picture(path), expected, atol=1e-6)


def test_load_picture_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedPixelData):
        load_picture(tmp_path / "x.gif")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptPixelData):
        load_picture(broken)
    with pytest.raises(CorruptPixelData):
        load_picture(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------
# Never a bare traceback: random header / pixel data damage gives a typed error
# ---------------------------------------------------------------------------------------

_BASE_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless)


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    syntax_index=st.integers(0, len(_BASE_SYNTAXES) - 1),
    rows=st.sampled_from([None, 0, 1, 128, 160, 9000, 65535]),
    bits_allocated=st.sampled_from([None, 1, 8, 16, 32]),
    bits_stored=st.sampled_from([None, 0, 8, 12, 16, 17]),
    samples=st.sampled_from([None, 1, 3]),
    photometric=st.sampled_from([None, "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", ""]),
    signed=st.sampled_from([None, 1]),
    frames=st.sampled_from([None, 0, 1, 2]),
    window=st.sampled_from([None, (2048.0, 4096.0), (0.0, 0.0), (-5.0, 1.0)]),
    cut=st.sampled_from([None, 0, 1, 100, 5000]),
    max_side=st.sampled_from([None, 64]),
)
def test_damaged_headers_give_typed_errors(
    nih_small: np.ndarray,
    syntax_index: int,
    rows: int | None,
    bits_allocated: int | None,
    bits_stored: int | None,
    samples: int | None,
    photometric: str | None,
    signed: int | None,
    frames: int | None,
    window: tuple[float, float] | None,
    cut: int | None,
    max_side: int | None,
) -> None:
    ds = make_dicom(nih_small[:160, :200], transfer_syntax=_BASE_SYNTAXES[syntax_index])
    for keyword, value in (
        ("Rows", rows),
        ("BitsAllocated", bits_allocated),
        ("BitsStored", bits_stored),
        ("SamplesPerPixel", samples),
        ("PhotometricInterpretation", photometric),
        ("PixelRepresentation", signed),
        ("NumberOfFrames", frames),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if cut is not None:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) - cut] if cut else b""
    try:
        image = load_radiograph(ds, POLICY, max_side=max_side)
    except CxrError as error:
        assert isinstance(error, RejectedInput)
        assert error.reason in set(Reason)
        return
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert np.isfinite(image.pixels).all()
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0
