"""Build real test DICOM files from real pixels, in any transfer syntax the pipeline reads.

The pixels come from real radiographs (the NIH PNGs in the shared data folder, or the
pydicom-data ``RG1`` chest CR); only the header is synthetic. Encoding uses real codecs:
pydicom's encoders (RLE, JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg, deflate)
and DCMTK (``dcmcjpeg`` for the JPEG processes pydicom cannot encode, ``dcmconv`` for
explicit VR big endian, which pydicom refuses to write from little-endian data).

Typical use::

    pixels = load_png(path, size=256)            # float32 (rows, cols) in [0, 1]
    ds = make_dicom(pixels, modality="DX", photometric="MONOCHROME1")
    ds = encode(ds, JPEG2000Lossless)
    write(ds, tmp_path / "x.dcm")
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

__all__ = [
    "ALL_TRANSFER_SYNTAXES",
    "DCMTK_TRANSFER_SYNTAXES",
    "LOSSY_TRANSFER_SYNTAXES",
    "PYDICOM_TRANSFER_SYNTAXES",
    "dcmtk_available",
    "encode",
    "load_png",
    "make_dicom",
    "to_bytes",
    "write",
]

PYDICOM_TRANSFER_SYNTAXES: tuple[uid.UID, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
)
"""Transfer syntaxes :func:`encode` produces with pydicom's own encoders."""

_DCMCJPEG_OPTION: dict[str, str] = {
    uid.JPEGBaseline8Bit: "+eb",
    uid.JPEGExtended12Bit: "+ee",
    uid.JPEGLossless: "+el",
    uid.JPEGLosslessSV1: "+e1",
}
DCMTK_TRANSFER_SYNTAXES: tuple[uid.UID, ...] = (
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
)
"""Transfer syntaxes :func:`encode` produces with DCMTK command-line tools."""

ALL_TRANSFER_SYNTAXES: tuple[uid.UID, ...] = PYDICOM_TRANSFER_SYNTAXES + DCMTK_TRANSFER_SYNTAXES

LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {uid.JPEGLSNearLossless, uid.JPEG2000, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit}
)
"""Syntaxes whose round trip is only approximately equal to the source pixels."""

_DEFAULT_SOP_CLASS: dict[str, uid.UID] = {
    "CR": uid.ComputedRadiographyImageStorage,
    "DX": uid.DigitalXRayImageStorageForPresentation,
}

Photometric = Literal["MONOCHROME1", "MONOCHROME2", "RGB"]


def dcmtk_available() -> bool:
    """Whether the DCMTK tools :func:`encode` needs are on ``PATH``."""
    return all(shutil.which(tool) for tool in ("dcmcjpeg", "dcmconv"))


def load_png(path: Path | str, *, size: int | None = 256) -> NDArray[np.float32]:
    """Read a real PNG radiograph as float32 (rows, cols) in [0, 1], optionally smaller.

    Parameters
    ----------
    path
        8- or 16-bit greyscale or RGB PNG (e.g. an NIH ChestX-ray8 image).
    size
        Longest side after area downsampling by an integer factor (Pillow ``reduce``);
        None keeps full resolution.

    Returns
    -------
    numpy.ndarray
        Grey values divided by the format's maximum (255 or 65535).
    """
    with Image.open(path) as opened:
        opened.load()
        image: Image.Image = opened
        if image.mode in ("RGB", "RGBA", "P", "LA"):
            image = image.convert("L")
        maximum = 255.0 if image.mode == "L" else 65535.0
        array: NDArray[np.float32] = np.asarray(image, dtype=np.float32) / np.float32(maximum)
    if size is not None and max(array.shape) > size:
        factor = -(-max(array.shape) // size)
        array = np.asarray(Image.fromarray(array, mode="F").reduce(factor), dtype=np.float32)
    return np.clip(array, 0.0, 1.0).astype(np.float32)


def _stored_values(pixels: NDArray[Any], bits_stored: int) -> NDArray[Any]:
    maximum = (1 << bits_stored) - 1
    if np.issubdtype(pixels.dtype, np.floating):
        if pixels.size and (float(np.nanmin(pixels)) < 0.0 or float(np.nanmax(pixels)) > 1.0):
            raise ValueError("float pixels must lie in [0, 1]")
        values = np.rint(pixels.astype(np.float64) * maximum)
    elif np.issubdtype(pixels.dtype, np.integer):
        values = pixels.astype(np.int64)
        if values.size and (int(values.min()) < 0 or int(values.max()) > maximum):
            raise ValueError(f"integer pixels must lie in [0, {maximum}] for {bits_stored} bits")
    else:
        raise ValueError(f"unsupported pixel dtype {pixels.dtype}")
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return values.astype(dtype)


def make_dicom(
    pixels: NDArray[Any],
    *,
    modality: str = "CR",
    sop_class: str | None = None,
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    window: tuple[float, float] | Literal["full"] | None = "full",
    pixel_spacing_mm: float | None = 0.2,
    **attrs: Any,
) -> Dataset:
    """Build a single-frame radiograph dataset around real pixels.

    Parameters
    ----------
    pixels
        (rows, cols) greyscale: float in [0, 1] (scaled to the full ``bits_stored`` range)
        or integers already in range (stored as they are). For ``RGB`` also (rows, cols, 3).
        The values are what a viewer should *display* (bright = dense): for
        ``MONOCHROME1`` the stored values are inverted, so a correct reader that inverts
        MONOCHROME1 gets ``pixels`` back.
    modality
        Modality (0008,0060).
    sop_class
        SOP Class UID; default CR image storage for CR, DX for presentation for DX,
        Secondary Capture otherwise.
    photometric
        Photometric Interpretation.
    bits_stored
        Bits Stored (1-16); Bits Allocated is 8 up to 8 bits, else 16. RGB needs 8.
    transfer_syntax
        Output transfer syntax, applied with :func:`encode`.
    body_part, view
        Body Part Examined and View Position; None leaves them out.
    window
        ``"full"``: a Window Center/Width whose linear function maps the stored range
        exactly onto the display range; a (center, width) pair; None: no VOI attributes.
    pixel_spacing_mm
        Imager Pixel Spacing (and Pixel Spacing), None leaves them out.
    **attrs
        Any further attributes by keyword, applied last; ``None`` deletes an attribute
        (e.g. ``SOPInstanceUID=None`` for a missing-UID test).

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset with file meta information, encoded in ``transfer_syntax``.
    """
    if not 1 <= bits_stored <= 16:
        raise ValueError("bits_stored must be in 1..16")
    array = np.asarray(pixels)
    if photometric == "RGB":
        if bits_stored != 8:
            raise ValueError("RGB test images are 8-bit")
        if array.ndim == 2:
            array = np.repeat(array[..., np.newaxis], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError("RGB pixels must be (rows, cols) or (rows, cols, 3)")
    elif array.ndim != 2:
        raise ValueError("greyscale pixels must be (rows, cols)")
    stored = _stored_values(array, bits_stored)
    if photometric == "MONOCHROME1":
        stored = (((1 << bits_stored) - 1) - stored.astype(np.int64)).astype(stored.dtype)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class_uid = (
        uid.UID(sop_class)
        if sop_class
        else _DEFAULT_SOP_CLASS.get(modality, uid.SecondaryCaptureImageStorage)
    )
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID = uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.PatientName = "Factory^Test"
    ds.PatientID = "FACTORY-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20200101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "cxr-pipeline test factory"
    is_sc = sop_class_uid == uid.SecondaryCaptureImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY"] if is_sc else ["ORIGINAL", "PRIMARY"]
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
        ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    if window == "full":
        ds.WindowCenter = float(1 << (bits_stored - 1))
        ds.WindowWidth = float(1 << bits_stored)
    elif window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    if sop_class_uid in (
        uid.DigitalXRayImageStorageForPresentation,
        uid.DigitalXRayImageStorageForProcessing,
    ):
        ds.PresentationIntentType = (
            "FOR PROCESSING"
            if sop_class_uid == uid.DigitalXRayImageStorageForProcessing
            else "FOR PRESENTATION"
        )
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return encode(ds, transfer_syntax)


def to_bytes(ds: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file in its own transfer syntax."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path | str) -> Path:
    """Write a dataset as a DICOM Part 10 file and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds))
    return path


def _native_copy(ds: Dataset) -> Dataset:
    """A copy in explicit VR little endian with native (uncompressed) pixel data."""
    syntax = uid.UID(str(ds.file_meta.TransferSyntaxUID))
    copy: Dataset
    if syntax == uid.ExplicitVRLittleEndian:
        # Nothing to convert: also works for deliberately broken headers (no Rows, ...).
        return pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    if syntax.is_compressed:
        copy = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
        copy.decompress()
    else:
        # Rebuild rather than re-save: pydicom refuses to write big endian data as little
        # endian, and the pixel bytes must be re-ordered anyway.
        array = ds.pixel_array
        copy = Dataset()
        for element in ds:
            if element.keyword != "PixelData":
                copy.add(element)
        copy.file_meta = deepcopy(ds.file_meta)  # FileMetaDataset(...) would share the dict
        copy.PixelData = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
        copy["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
    copy.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    return pydicom.dcmread(io.BytesIO(to_bytes(copy)))


def _run_dcmtk(args: Sequence[str], ds: Dataset) -> Dataset:
    if not dcmtk_available():
        raise RuntimeError("DCMTK (dcmcjpeg, dcmconv) is not installed")
    with tempfile.TemporaryDirectory(prefix="cxr-factory-") as folder:
        source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        write(ds, source)
        result = subprocess.run(
            [*args, str(source), str(target)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}")
        return pydicom.dcmread(target)


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Re-encode a dataset's pixel data in another transfer syntax, with a real codec.

    Parameters
    ----------
    ds
        A dataset with pixel data in any syntax pydicom decodes (it is not modified).
    transfer_syntax
        One of :data:`ALL_TRANSFER_SYNTAXES`. JPEG Baseline needs 8-bit data, JPEG
        Extended up to 12 bits.

    Returns
    -------
    pydicom.dataset.Dataset
        A new dataset read back from the encoded bytes, so it is exactly what a receiver
        of such a file would see.

    Raises
    ------
    ValueError
        The syntax is not one this factory produces, or the pixel data does not fit it.
    RuntimeError
        A DCMTK tool is missing or failed.
    """
    target = uid.UID(transfer_syntax)
    native = _native_copy(ds)
    if target in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        native.file_meta.TransferSyntaxUID = target
        return pydicom.dcmread(io.BytesIO(to_bytes(native)))
    if target == uid.DeflatedExplicitVRLittleEndian:
        native.file_meta.TransferSyntaxUID = target
        return pydicom.dcmread(io.BytesIO(to_bytes(native)))
    if target == uid.ExplicitVRBigEndian:
        return _run_dcmtk(["dcmconv", "+tb"], native)
    if target in _DCMCJPEG_OPTION:
        bits = int(native.BitsStored)
        if target == uid.JPEGBaseline8Bit and bits > 8:
            raise ValueError("JPEG Baseline needs BitsStored <= 8")
        if target == uid.JPEGExtended12Bit and bits > 12:
            raise ValueError("JPEG Extended needs BitsStored <= 12")
        return _run_dcmtk(["dcmcjpeg", _DCMCJPEG_OPTION[target]], native)
    if target in PYDICOM_TRANSFER_SYNTAXES:
        kwargs: dict[str, Any] = {}
        if target == uid.JPEG2000:
            kwargs["j2k_psnr"] = [80]
        elif target == uid.JPEGLSNearLossless:
            kwargs["jls_error"] = 2
        native.compress(target, **kwargs)
        return pydicom.dcmread(io.BytesIO(to_bytes(native)))
    raise ValueError(f"transfer syntax {target} is not produced by this factory")
