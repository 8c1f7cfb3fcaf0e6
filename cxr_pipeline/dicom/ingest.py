"""DICOM object -> validated, decoded, display-ready chest radiograph plus its source header.

Three steps, each a public function:

1. :func:`read_dataset` reads a Part 10 file, stream or received dataset (:class:`NotDicom`).
2. :func:`check_chest_radiograph` decides from the header alone, before any pixel data is
   decoded, whether the object is a single-frame chest radiograph we can decode
   (:class:`~cxr_pipeline.errors.RejectedInput` subclasses name the reason).
3. :func:`load_radiograph` decodes (:mod:`cxr_pipeline.dicom.decode`) and returns a
   :class:`Radiograph`.

The chest decision, in order:

* SOP class: CR and DX (for presentation and for processing) are radiography; Secondary
  Capture is considered when ``accept_secondary_capture``; any other class is
  :class:`NotAnImage` when it has no pixel data (SR, presentation states, ...) and
  :class:`NotChestRadiograph` otherwise (CT, MR, US, mammography, ...).
* Modality: radiography classes need one of ``accepted_modalities``; a Secondary Capture
  needs one of ``secondary_capture_modalities`` (CR, DX, RG): an SC screenshot of a CT
  (Modality CT or OT) is not analysed.
* Body Part Examined, when present, must contain one of ``chest_body_parts``. When absent
  (common for SC, e.g. ``nih_dx_secondary_capture.dcm``) the image is rejected only if
  ``require_body_part`` is set or Study/Series Description or Protocol Name names another
  body part (``non_chest_terms``) and no chest term.
* View Position, when present, must be one of ``chest_view_positions``.
* Geometry: single frame, ``min_size <= Rows, Columns <= max_size`` and an aspect ratio of
  at most ``max_aspect_ratio``.
* Image Laterality is not used: chest radiographs are often sent with L/R set.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_pipeline.dicom.codes import RADIOGRAPHY_SOP_CLASSES, SECONDARY_CAPTURE_SOP_CLASSES
from cxr_pipeline.dicom.decode import (
    area_downsample,
    check_transfer_syntax,
    decode_stored_values,
    to_display,
)
from cxr_pipeline.dicom.pictures import load_picture
from cxr_pipeline.errors import (
    CorruptPixelData,
    ImageTooLarge,
    ImageTooSmall,
    MissingAttribute,
    MultiFrameImage,
    NotAnImage,
    NotChestRadiograph,
    NotDicom,
    UnsupportedPixelData,
)
from cxr_pipeline.settings import IngestSettings

__all__ = [
    "Radiograph",
    "check_chest_radiograph",
    "load_picture",
    "load_radiograph",
    "read_dataset",
]

_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"})
_REQUIRED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_REQUIRED_PIXEL_MODULE = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PhotometricInterpretation",
)


@dataclass(frozen=True)
class Radiograph:
    """A decoded chest radiograph ready for preprocessing, with its source header.

    Attributes
    ----------
    pixels
        float32 (rows, cols) in [0, 1], display-ready: Modality LUT/rescale, then VOI LUT
        or window, MONOCHROME1 inverted (bright = dense), colour converted to grey.
    header
        The source dataset without Pixel Data (a shallow copy sharing the elements), for
        the result encoders (patient, study and source-image references).
    pixel_spacing_mm
        (row, column) spacing of ``pixels`` in mm from Pixel Spacing or Imager Pixel
        Spacing, scaled when the image was decoded smaller; None when absent or zero.
    """

    pixels: NDArray[np.float32]
    header: Dataset
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    pixel_spacing_mm: tuple[float, float] | None


def read_dataset(source: Path | str | BinaryIO | Dataset) -> Dataset:
    """Read a DICOM dataset from a Part 10 file, a binary stream or a dataset.

    Parameters
    ----------
    source
        File path, readable binary stream, or an already parsed dataset (returned as is).

    Returns
    -------
    pydicom.dataset.Dataset
        The parsed dataset, pixel data included (not yet decoded).

    Raises
    ------
    NotDicom
        The file cannot be read or is not a DICOM Part 10 file.
    """
    if isinstance(source, Dataset):
        return source
    name = str(source) if isinstance(source, str | Path) else "stream"
    start = None if isinstance(source, str | Path) else _tell(source)
    ds = _dcmread(source, name)
    if len(ds) == 0 and (start is not None or isinstance(source, str | Path)):
        # pydicom returns an empty dataset when a file ends inside encapsulated pixel
        # data; reading the header alone tells a truncated image (no Pixel Data: corrupt,
        # decided later) from a file that never held any data element.
        if start is not None:
            cast(BinaryIO, source).seek(start)
        ds = _dcmread(source, name, stop_before_pixels=True)
    if len(ds) == 0:
        raise NotDicom(f"{name} holds no DICOM data elements")
    return ds


def _tell(stream: BinaryIO) -> int | None:
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _dcmread(
    source: Path | str | BinaryIO, name: str, *, stop_before_pixels: bool = False
) -> Dataset:
    try:
        with warnings.catch_warnings():
            # Truncated files warn and return a partial dataset; the checks that follow
            # name what is missing.
            warnings.simplefilter("ignore")
            return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise NotDicom(f"{name} is not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # OSError, EOFError, struct / value errors from a broken file
        raise NotDicom(f"cannot read {name} as DICOM: {type(exc).__name__}: {exc}") from exc


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip().upper()


def _require(ds: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MissingAttribute(f"{keyword} is missing or empty")


def _words(text: str) -> set[str]:
    return set(re.split(r"[^A-Z0-9]+", text.upper())) - {""}


def _check_sop_class(ds: Dataset, policy: IngestSettings) -> bool:
    """Check SOP class and Modality; return True for a Secondary Capture."""
    _require(ds, ("SOPClassUID",))
    sop_class = str(ds.SOPClassUID)
    is_sc = sop_class in SECONDARY_CAPTURE_SOP_CLASSES
    name = pydicom.uid.UID(sop_class).name
    if sop_class not in RADIOGRAPHY_SOP_CLASSES and not is_sc:
        if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
            raise NotAnImage(f"SOP class {name} carries no pixel data")
        raise NotChestRadiograph(f"SOP class {name} is not a projection radiograph")
    if is_sc and not policy.accept_secondary_capture:
        raise NotChestRadiograph("Secondary Capture images are not accepted by the policy")
    _require(ds, ("Modality",))
    modality = _text(ds, "Modality")
    allowed = policy.secondary_capture_modalities if is_sc else policy.accepted_modalities
    if modality not in {m.upper() for m in allowed}:
        raise NotChestRadiograph(f"Modality {modality} is not accepted for {name}")
    return is_sc


def _check_anatomy(ds: Dataset, policy: IngestSettings) -> None:
    chest_terms = [term.upper() for term in policy.chest_body_parts]
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if not any(term in body_part for term in chest_terms):
            raise NotChestRadiograph(f"Body Part Examined is {body_part}, not chest")
    else:
        if policy.require_body_part:
            raise NotChestRadiograph("Body Part Examined is absent and the policy requires it")
        described = " ".join(
            _text(ds, k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName")
        )
        words = _words(described)
        others = words & {term.upper() for term in policy.non_chest_terms}
        if others and not any(term in described for term in chest_terms):
            raise NotChestRadiograph(
                f"no Body Part Examined and the descriptions name {sorted(others)[0]}"
            )
    view = _text(ds, "ViewPosition")
    if view not in {v.strip().upper() for v in policy.chest_view_positions}:
        raise NotChestRadiograph(f"View Position {view} is not a chest view")


def _check_geometry(ds: Dataset, policy: IngestSettings) -> None:
    frames_value = ds.get("NumberOfFrames")
    try:
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise UnsupportedPixelData(f"Number of Frames {frames_value!r} is invalid") from exc
    if frames > 1:
        raise MultiFrameImage(f"{frames} frames; a chest radiograph has one")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if max(rows, cols) > policy.max_size:
        raise ImageTooLarge(f"{rows}x{cols} exceeds the limit of {policy.max_size}")
    if min(rows, cols) < max(1, policy.min_size):
        raise ImageTooSmall(f"{rows}x{cols} is below the minimum of {policy.min_size}")
    if max(rows, cols) / min(rows, cols) > policy.max_aspect_ratio:
        raise NotChestRadiograph(f"aspect ratio of {rows}x{cols} is not a chest radiograph's")


def _check_pixel_module(ds: Dataset) -> None:
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if bits_allocated not in (8, 16):
        raise UnsupportedPixelData(f"Bits Allocated {bits_allocated} (8 or 16 supported)")
    if not 1 <= bits_stored <= bits_allocated:
        raise UnsupportedPixelData(
            f"Bits Stored {bits_stored} with Bits Allocated {bits_allocated}"
        )
    photometric = _text(ds, "PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric in _GREY:
        if samples != 1:
            raise UnsupportedPixelData(f"{photometric} with {samples} samples per pixel")
    elif photometric in _COLOUR:
        if samples != 3 or bits_allocated != 8:
            raise UnsupportedPixelData(
                f"{photometric} with {samples} samples of {bits_allocated} bits"
            )
    else:
        raise UnsupportedPixelData(f"Photometric Interpretation {photometric} not supported")


def check_chest_radiograph(ds: Dataset, policy: IngestSettings) -> None:
    """Decide from the header alone whether ``ds`` is a chest radiograph we analyse.

    Nothing is decoded: absurd sizes and unsupported encodings are refused before any
    pixel buffer is allocated. The rules are in this module's docstring.

    Parameters
    ----------
    ds
        The received or read dataset.
    policy
        What counts as a chest radiograph.

    Raises
    ------
    MissingAttribute
        SOP Class/Instance, Study or Series UID, Modality or a pixel module attribute
        (Rows, Columns, Bits Allocated/Stored, Photometric Interpretation) missing.
    NotAnImage
        A non-image SOP class (SR, presentation state, ...).
    NotChestRadiograph
        Another modality, SOP class, body part, view or shape.
    MultiFrameImage, ImageTooLarge, ImageTooSmall
        Geometry outside the policy.
    UnsupportedPixelData, UnsupportedTransferSyntax
        Bits, photometric interpretation or transfer syntax we do not decode.
    """
    _check_sop_class(ds, policy)
    _require(ds, _REQUIRED_UIDS)
    _require(ds, _REQUIRED_PIXEL_MODULE)
    _check_anatomy(ds, policy)
    _check_geometry(ds, policy)
    _check_pixel_module(ds)
    check_transfer_syntax(ds)


def _header_of(ds: Dataset) -> Dataset:
    """Shallow copy of ``ds`` without Pixel Data (the caller's dataset is untouched)."""
    header = Dataset()
    for element in ds:
        if element.tag != _PIXEL_DATA_TAG:
            header.add(element)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = copy.deepcopy(meta)  # FileMetaDataset(meta) would share its dict
    return header


def _spacing(ds: Dataset, scale_rows: float, scale_cols: float) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value: Any = ds.get(keyword)
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return row * scale_rows, col * scale_cols
    return None


def load_radiograph(
    source: Path | str | BinaryIO | Dataset,
    policy: IngestSettings,
    *,
    max_side: int | None = None,
) -> Radiograph:
    """Read, check and decode one chest radiograph.

    Parameters
    ----------
    source
        DICOM file path, binary stream or dataset.
    policy
        Ingest settings (what is accepted).
    max_side
        None: full resolution. Otherwise the returned pixels are area-downsampled so the
        longer side is at most ``max_side``; JPEG 2000 and 8-bit JPEG are decoded at
        reduced resolution by the codec (see :mod:`cxr_pipeline.dicom.decode`), which is much
        faster. A fast path for inference; the SR/SC are unaffected.

    Returns
    -------
    Radiograph
        Display-ready pixels and the source header.

    Raises
    ------
    NotDicom, cxr_pipeline.errors.RejectedInput
        As :func:`read_dataset` and :func:`check_chest_radiograph`.
    CorruptPixelData
        Pixel data missing, short or undecodable.
    """
    if max_side is not None and max_side < 1:
        raise ValueError("max_side must be positive")
    ds = read_dataset(source)
    check_chest_radiograph(ds, policy)
    values = decode_stored_values(ds, max_side=max_side)
    pixels = to_display(values, ds)
    if max_side is not None:
        pixels = area_downsample(pixels, max_side)
    if not np.isfinite(pixels).all():
        raise CorruptPixelData("decoded pixels are not finite")
    rows, cols = int(ds.Rows), int(ds.Columns)
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        header=_header_of(ds),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(check_transfer_syntax(ds)),
        pixel_spacing_mm=_spacing(ds, rows / pixels.shape[0], cols / pixels.shape[1]),
    )
