"""Plain picture files (PNG, JPEG, ITK formats) -> float32 greyscale in [0, 1].

Used for training data and ``cxr-analyse`` on non-DICOM images. PNG/JPEG/TIFF/BMP go
through Pillow, volumes-as-images formats (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``,
``.nrrd``, ``.nhdr``) through SimpleITK.

Scaling: 8-bit data is divided by 255 and 16-bit PNG/TIFF data by 65535 (the format's
range, so a PNG and the same pixels in an 8-bit DICOM give the same values); any other
type (ITK floats, signed integers, 16-bit ITK images that rarely use the full range) is
scaled by its own min/max. Colour is converted to BT.601 luma (Pillow ``"L"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from cxr_pipeline.errors import CorruptPixelData, UnsupportedPixelData

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
ITK_SUFFIXES = frozenset({".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr"})


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _min_max(array: NDArray[np.floating]) -> NDArray[np.float32]:
    low, high = float(np.min(array)), float(np.max(array))
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _read_pillow(path: Path) -> NDArray[np.float32]:
    with Image.open(path) as opened:
        opened.load()
        image: Image.Image = opened
        if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
            image = image.convert("L")
        array = np.asarray(image)
    if array.dtype == np.uint8:
        return (array.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    if image.mode.startswith("I;16") or (
        image.mode == "I" and array.size and int(array.min()) >= 0 and int(array.max()) <= 65535
    ):
        return (array.astype(np.float32) / np.float32(65535.0)).astype(np.float32)
    return _min_max(array.astype(np.float64))


def _read_itk(path: Path) -> NDArray[np.float32]:
    import SimpleITK as sitk  # noqa: N813 - the library's conventional name

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    components = int(image.GetNumberOfComponentsPerPixel())  # type: ignore[no-untyped-call]
    if components == 3:
        array = array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    array = np.squeeze(array)
    if array.ndim != 2:
        raise UnsupportedPixelData(f"{path.name}: {array.shape} is not a 2D image")
    if array.dtype == np.uint8:
        return (array.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    return _min_max(array.astype(np.float64))


def load_picture(path: Path | str) -> NDArray[np.float32]:
    """Read a PNG/JPEG/TIFF/BMP (Pillow) or ITK image (SimpleITK) as a grey image.

    Parameters
    ----------
    path
        The picture file.

    Returns
    -------
    numpy.ndarray
        float32 (rows, cols) in [0, 1]; see the module docstring for the scaling.

    Raises
    ------
    UnsupportedPixelData
        Unknown file type, or not a 2D image.
    CorruptPixelData
        The file cannot be read or decoded.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in PILLOW_SUFFIXES | ITK_SUFFIXES:
        raise UnsupportedPixelData(f"{path.name}: unsupported picture type {suffix or '(none)'}")
    try:
        pixels = _read_pillow(path) if suffix in PILLOW_SUFFIXES else _read_itk(path)
    except UnsupportedPixelData:
        raise
    except (OSError, UnidentifiedImageError, RuntimeError, ValueError) as exc:
        # SimpleITK raises RuntimeError, Pillow OSError / UnidentifiedImageError.
        raise CorruptPixelData(f"cannot read picture {path.name}: {exc}") from exc
    if pixels.ndim != 2:
        raise UnsupportedPixelData(f"{path.name}: {pixels.shape} is not a 2D grey image")
    return np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
