"""DICOM pixel data -> display-ready float32 image: decode, Modality LUT, VOI, polarity.

Decoding uses pydicom's pixel data decoders (numpy for native data, pylibjpeg / GDCM /
pyjpegls for compressed data) through :func:`pydicom.pixels.get_decoder`, so the caller's
dataset is never modified and no decoded array is cached on it. Grey values then go
through :func:`pydicom.pixels.apply_modality_lut` and
:func:`pydicom.pixels.apply_voi` / :func:`~pydicom.pixels.apply_windowing`, are scaled to
[0, 1] in float32 (never through an 8-bit preview) and MONOCHROME1 is inverted so that
bright always means dense.

Reduced-resolution decoding (``max_side``), per transfer syntax:

* JPEG 2000 (lossless and lossy), greyscale unsigned: the codestream is decoded at a
  lower wavelet resolution level with OpenJPEG through Pillow (``reduce``), which skips
  the finest levels' work altogether (about 4x faster per level on RG1).
* JPEG Baseline / Extended with 8-bit greyscale data: libjpeg DCT-domain scaling
  (Pillow ``draft``) decodes at 1/2, 1/4 or 1/8 size.
* Every other syntax (native, deflate, RLE, JPEG lossless, JPEG-LS) has no cheaper
  partial decode: the full image is decoded and then area-averaged.

After any codec reduction the display image is area-averaged (Pillow ``reduce``) by an
integer factor so that its longer side is at most ``max_side``.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from cxr_pipeline.dicom.codes import (
    DCT_JPEG_TRANSFER_SYNTAXES,
    JPEG2000_TRANSFER_SYNTAXES,
    SUPPORTED_TRANSFER_SYNTAXES,
)
from cxr_pipeline.errors import CorruptPixelData, UnsupportedTransferSyntax

# pydicom tries plugins in a fixed order (GDCM first); on RG1 and NIH images these are
# faster (bench/bench_decode.py): RLE pylibjpeg-rle ~10x pydicom's own, JPEG-LS pyjpegls
# ~1.5x GDCM, 8-bit JPEG Pillow (libjpeg-turbo) ~2x, JPEG 2000 OpenJPEG ~1.2x GDCM.
_PREFERRED_PLUGIN: dict[str, str] = {
    _uid.RLELossless: "pylibjpeg",
    _uid.JPEGLSLossless: "pyjpegls",
    _uid.JPEGLSNearLossless: "pyjpegls",
    _uid.JPEG2000Lossless: "pylibjpeg",
    _uid.JPEG2000: "pylibjpeg",
    _uid.JPEGBaseline8Bit: "pillow",
    _uid.JPEGExtended12Bit: "pillow",
}
# ITU-R BT.601 luma weights, the same as Pillow's RGB -> "L" conversion used for PNG input.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def transfer_syntax_of(ds: Dataset) -> _uid.UID:
    """Return the transfer syntax a dataset's pixel data is encoded in.

    Parameters
    ----------
    ds
        Dataset read from a file or received over the network.

    Returns
    -------
    pydicom.uid.UID
        From the file meta information; for a dataset built in memory without it, the
        syntax it was read in, else explicit VR little endian (native in-memory data).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return _uid.UID(str(meta.TransferSyntaxUID))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        return _uid.ExplicitVRBigEndian
    if implicit is True:
        return _uid.ImplicitVRLittleEndian
    return _uid.ExplicitVRLittleEndian


def check_transfer_syntax(ds: Dataset) -> _uid.UID:
    """Return the transfer syntax, or raise when no installed decoder handles it.

    Raises
    ------
    UnsupportedTransferSyntax
        Not one of :data:`cxr_pipeline.dicom.codes.SUPPORTED_TRANSFER_SYNTAXES`, or its
        decoder plugins are not installed.
    """
    syntax = transfer_syntax_of(ds)
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntax(f"transfer syntax {syntax} ({syntax.name}) not supported")
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntax(f"no installed decoder for {syntax.name}")
    return syntax


def _decode_full(ds: Dataset, syntax: _uid.UID) -> NDArray[Any]:
    """Decode frame 0 with the fastest installed plugin, then with any that works."""
    decoder = get_decoder(syntax)
    options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB before grey
    preferred = _PREFERRED_PLUGIN.get(syntax)
    if preferred == "pillow" and int(ds.BitsAllocated) != 8:
        preferred = None  # Pillow's libjpeg is 8-bit only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if preferred in decoder.available_plugins:
            try:
                array, _meta = decoder.as_array(ds, index=0, decoding_plugin=preferred, **options)
                return array
            except Exception:  # fall back to pydicom trying every installed plugin
                pass
        array, _meta = decoder.as_array(ds, index=0, **options)
        return array


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _j2k_reduced(ds: Dataset, factor: int) -> NDArray[Any] | None:
    """Decode a JPEG 2000 frame at 1/2**r resolution, or None where that cannot work."""
    from openjpeg.utils import get_parameters

    frame = _first_frame(ds)
    params = get_parameters(frame)
    precision = int(params["precision"])
    if params["is_signed"] or int(params["samples_per_pixel"]) != 1 or precision > 16:
        return None
    rows, cols = int(params["rows"]), int(params["columns"])
    level = int(math.log2(factor))
    while level > 0:
        power = 1 << level
        # Pillow sizes the reduced image as round(n / 2**r) while OpenJPEG produces
        # ceil(n / 2**r); where the two disagree Pillow reports a broken stream, so only
        # levels where they agree are tried.
        if all((n + power // 2) // power == -(-n // power) for n in (rows, cols)):
            try:
                with Image.open(io.BytesIO(frame)) as image:
                    image.reduce = level  # type: ignore[method-assign,assignment]
                    image.load()
                    array = np.asarray(image)
            except (OSError, ValueError, SyntaxError):
                array = None
            if array is not None:
                if array.dtype.itemsize == 2 and precision < 16:
                    # Pillow scales sub-16-bit samples up to the full 16-bit range.
                    array = array >> (16 - precision)
                return array
        level -= 1
    return None


def _jpeg_reduced(ds: Dataset, factor: int) -> NDArray[Any] | None:
    """Decode an 8-bit greyscale DCT JPEG frame with libjpeg's 1/2, 1/4, 1/8 scaling."""
    if int(ds.BitsStored) > 8 or int(ds.BitsAllocated) != 8:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        with Image.open(io.BytesIO(_first_frame(ds))) as image:
            if image.mode != "L":
                return None
            image.draft("L", (max(1, cols // factor), max(1, rows // factor)))
            image.load()
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError):
        return None


def decode_stored_values(ds: Dataset, *, max_side: int | None = None) -> NDArray[Any]:
    """Decode the first frame's stored values, at reduced resolution where cheap.

    Parameters
    ----------
    ds
        Dataset with Pixel Data whose header has been checked.
    max_side
        Wanted longest side; the codec may return an image up to twice as large
        (power-of-two reductions only). None: full resolution.

    Returns
    -------
    numpy.ndarray
        (rows, cols) stored values, or (rows, cols, 3) RGB for colour images.

    Raises
    ------
    CorruptPixelData
        Pixel data missing, shorter than the header says, or the decoder failed.
    UnsupportedTransferSyntax
        No decoder for the transfer syntax.
    """
    if "PixelData" not in ds:
        raise CorruptPixelData("no Pixel Data element (file truncated?)")
    if not ds.PixelData:
        raise CorruptPixelData("Pixel Data element is empty")
    syntax = check_transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    if not syntax.is_compressed:
        expected = rows * cols * samples * (int(ds.BitsAllocated) // 8)
        if len(ds.PixelData) < expected:
            raise CorruptPixelData(
                f"pixel data has {len(ds.PixelData)} bytes, the header needs {expected}"
            )
    factor = 1 if max_side is None else max(1, -(-max(rows, cols) // max_side))
    if factor >= 2 and samples == 1 and int(ds.get("PixelRepresentation", 0)) == 0:
        try:
            if syntax in JPEG2000_TRANSFER_SYNTAXES:
                reduced = _j2k_reduced(ds, factor)
            elif syntax in DCT_JPEG_TRANSFER_SYNTAXES:
                reduced = _jpeg_reduced(ds, factor)
            else:
                reduced = None
        except Exception as exc:  # any codec failure here means corrupt data
            raise CorruptPixelData(f"{syntax.name} decoding failed: {exc}") from exc
        if reduced is not None and reduced.ndim == 2:
            return reduced
    try:
        array = _decode_full(ds, syntax)
    except Exception as exc:  # decoders raise many types; all mean corrupt data
        raise CorruptPixelData(f"{syntax.name} decoding failed: {exc}") from exc
    expected_shape: tuple[int, ...] = (rows, cols) if samples == 1 else (rows, cols, samples)
    if array.shape != expected_shape:
        raise CorruptPixelData(f"decoded shape {array.shape} != header {expected_shape}")
    return array


def _first_value(value: Any) -> float:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0]
    return float(value)


def window_unit(values: NDArray[Any], ds: Dataset) -> NDArray[np.float32] | None:
    """Apply the first Window Center/Width, scaled to [0, 1]; None when absent or invalid.

    The PS3.3 C.11.2.1.2 functions (LINEAR, LINEAR_EXACT, SIGMOID) with the output range
    taken as [0, 1]. Written out here rather than calling
    :func:`pydicom.pixels.apply_windowing` because that works in float64 on the whole
    image and took ~85 ms of a 130 ms ingest of the 3.6 Mpixel RG1; in float32 it is ~4x
    faster. ``test_window_matches_pydicom`` checks it against pydicom on real images.
    """
    try:
        center = _first_value(ds.WindowCenter)
        width = _first_value(ds.WindowWidth)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    x = values.astype(np.float32, copy=False)
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    if function == "SIGMOID":
        if width <= 0:
            return None
        with np.errstate(over="ignore"):  # exp overflow -> inf -> 0, as intended
            unit = 1.0 / (1.0 + np.exp(np.float32(-4.0 / width) * (x - np.float32(center))))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        unit = (x - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    else:
        if width < 1:
            return None
        if width == 1:  # a threshold at center - 0.5
            unit = (x > np.float32(center - 0.5)).astype(np.float32)
        else:
            unit = (x - np.float32(center - 0.5)) * np.float32(1.0 / (width - 1)) + np.float32(0.5)
    result: NDArray[np.float32] = np.clip(unit, 0.0, 1.0).astype(np.float32, copy=False)
    return result


def _voi_unit(values: NDArray[Any], ds: Dataset) -> NDArray[np.float32] | None:
    """Apply the first VOI LUT (preferred, as pydicom does) or window, scaled to [0, 1]."""
    sequence = ds.get("VOILUTSequence")
    if sequence and all(item in sequence[0] for item in ("LUTDescriptor", "LUTData")):
        lut = np.asarray(sequence[0].LUTData, dtype=np.float64)
        if lut.size and float(lut.max()) > float(lut.min()):
            # The LUT's own span, not 2**bits: descriptors often claim 16 bits for 12-bit data.
            low, high = float(lut.min()), float(lut.max())
            shown = apply_voi(values, ds, 0).astype(np.float32)
            unit: NDArray[np.float32] = np.clip(
                (shown - np.float32(low)) / np.float32(high - low), 0.0, 1.0
            )
            return unit
    return window_unit(values, ds)


def to_display(values: NDArray[Any], ds: Dataset) -> NDArray[np.float32]:
    """Turn stored values into a display-ready float32 image in [0, 1].

    Greyscale: Modality LUT or rescale, then the VOI LUT or first window. Without a
    usable VOI, images of at most 8 bits stored use their full stored range (they are
    display-ready, like the 8-bit PNGs the models are trained on) and deeper images use
    their own min/max (a per-image full-range window). MONOCHROME1, and MONOCHROME2 with
    Presentation LUT Shape INVERSE, are inverted. Colour (already RGB): BT.601 luma.

    Parameters
    ----------
    values
        Output of :func:`decode_stored_values`.
    ds
        The dataset the values came from (its pixel and VOI modules are read).

    Returns
    -------
    numpy.ndarray
        float32, (rows, cols), in [0, 1], bright = dense.
    """
    if values.ndim == 3:
        maximum = float((1 << int(ds.BitsStored)) - 1)
        grey: NDArray[np.float32] = values.astype(np.float32) @ _LUMA / np.float32(maximum)
        return np.clip(grey, 0.0, 1.0).astype(np.float32)
    modality = apply_modality_lut(values, ds)
    unit = _voi_unit(modality, ds)
    if unit is None:
        if int(ds.BitsStored) <= 8:
            stored_range = np.array([0, (1 << int(ds.BitsStored)) - 1])
            ends = apply_modality_lut(stored_range, ds)
            low, high = float(np.min(ends)), float(np.max(ends))
        else:
            low, high = float(np.min(modality)), float(np.max(modality))
        if high <= low:
            unit = np.zeros(modality.shape, dtype=np.float32)
        else:
            shifted = modality.astype(np.float32) - np.float32(low)
            # Divide (not multiply by the reciprocal): 8-bit data then equals PNG v / 255.
            unit = np.clip(shifted / np.float32(high - low), 0.0, 1.0)
    image: NDArray[np.float32] = unit.astype(np.float32, copy=False)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE"):
        image = np.float32(1.0) - image
    return image


def area_downsample(image: NDArray[np.float32], max_side: int) -> NDArray[np.float32]:
    """Average blocks of an integer factor so the longer side is at most ``max_side``.

    Parameters
    ----------
    image
        float32 (rows, cols).
    max_side
        Largest allowed side after downsampling.

    Returns
    -------
    numpy.ndarray
        The image itself when already small enough, else a float32 area average
        (Pillow ``Image.reduce``; edge blocks average the pixels they have).
    """
    factor = -(-max(image.shape) // max_side)
    if factor <= 1:
        return image
    reduced = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    result: NDArray[np.float32] = np.asarray(reduced.reduce(factor), dtype=np.float32)
    return result
