"""The one preprocessing chain shared by training and inference (MONAI transforms).

Input: a display-ready float32 greyscale image ``(rows, cols)`` in [0, 1] (from
:mod:`cxr_pipeline.ingest`: DICOM after modality/VOI LUT and MONOCHROME1 inversion, or a
PNG/JPEG). Output: a float32 tensor ``(3, crop, crop)`` normalised with the ImageNet mean
and standard deviation, as the paper's torchvision recipe (``Resize(256)``,
``CenterCrop(224)``, grey replicated to three channels).

Because PNGs and DICOMs both reach this chain as the same [0, 1] array, the same pixels
give the same tensor whatever container they came in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Imported from their defining modules: ``monai.transforms`` does not re-export them for mypy.
from monai.transforms.compose import Compose
from monai.transforms.croppad.array import CenterSpatialCrop, RandScaleCrop, SpatialPad
from monai.transforms.intensity.array import NormalizeIntensity
from monai.transforms.spatial.array import RandFlip, RandRotate, Resize
from monai.transforms.transform import Transform
from monai.transforms.utility.array import EnsureChannelFirst, EnsureType, RepeatChannel

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.model_card import PreprocessingSpec

TRAIN_MIN_CROP_SIDE = 0.5
"""Smallest random-crop side in training, as a fraction of the image side (area >= 25%)."""
TRAIN_ROTATION_DEG = 10.0
"""Largest random rotation in training, degrees (the paper's "small rotations")."""


@dataclass(frozen=True)
class CropGeometry:
    """Where the model input sits in the original image.

    Attributes
    ----------
    image_shape
        ``(rows, cols)`` of the input image.
    resized_shape
        ``(rows, cols)`` after the shorter-side resize.
    crop_start
        ``(row, col)`` of the crop's top-left corner in the resized image (may be
        negative when the resized image is smaller than the crop and gets padded).
    crop
        Side of the square model input.
    """

    image_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    crop_start: tuple[int, int]
    crop: int

    @property
    def scale(self) -> tuple[float, float]:
        """Resized / original size along rows and columns."""
        return (
            self.resized_shape[0] / self.image_shape[0],
            self.resized_shape[1] / self.image_shape[1],
        )

    @property
    def image_box(self) -> tuple[float, float, float, float]:
        """The model input's extent in image pixels: ``(top, left, bottom, right)``."""
        sy, sx = self.scale
        top, left = self.crop_start
        return (top / sy, left / sx, (top + self.crop) / sy, (left + self.crop) / sx)


def resized_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` (torchvision ``Resize(int)`` rule).

    Parameters
    ----------
    shape
        ``(rows, cols)``.
    size
        Target shorter side.

    Returns
    -------
    tuple of int
        ``(rows, cols)``; the longer side is ``int(size * long / short)``.
    """
    rows, cols = shape
    if rows <= cols:
        return size, int(size * cols / rows)
    return int(size * rows / cols), size


class ResizeShorterSide(Transform):
    """Resize a channel-first image so its shorter side is ``size``, keeping the aspect.

    MONAI's ``Resize`` offers "all sides" and "longest side" modes but not torchvision's
    shorter-side rule used by the paper's recipe, so this computes the target shape and
    delegates to ``monai.transforms.Resize``. Downsampling uses ``area`` (box filter,
    anti-aliased and fast); upsampling uses bilinear interpolation.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Any) -> Any:
        """Resize ``img`` of shape ``(C, rows, cols)``."""
        rows, cols = int(img.shape[-2]), int(img.shape[-1])
        target = resized_shape((rows, cols), self.size)
        mode = "area" if min(rows, cols) > self.size else "bilinear"
        return Resize(spatial_size=target, mode=mode)(img)


def _normalise(spec: PreprocessingSpec) -> NormalizeIntensity:
    return NormalizeIntensity(
        subtrahend=np.asarray(spec.mean, dtype=np.float32),
        divisor=np.asarray(spec.std, dtype=np.float32),
        channel_wise=True,
    )


def _check_pixels(pixels: Any) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
        shape = getattr(pixels, "shape", None)
        raise UnsupportedPixelData(f"expected a 2-D greyscale array, got shape {shape}")
    if min(pixels.shape) < 1:
        raise UnsupportedPixelData(f"empty image of shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise UnsupportedPixelData("image contains NaN or infinite values")


class _Checked:
    """Validate the input array, then run the MONAI chain (a picklable callable)."""

    def __init__(self, chain: Compose) -> None:
        self.chain = chain

    def set_random_state(self, seed: int) -> None:
        """Seed the random transforms (training reproducibility)."""
        self.chain.set_random_state(seed=seed)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        _check_pixels(pixels)
        out = self.chain(np.ascontiguousarray(pixels, dtype=np.float32))
        assert isinstance(out, torch.Tensor)
        return out


def build_transform(
    spec: PreprocessingSpec, *, train: bool = False
) -> Callable[[np.ndarray], torch.Tensor]:
    """Build the shared preprocessing chain.

    Parameters
    ----------
    spec
        Resize, crop and normalisation parameters (from the model card).
    train
        False: deterministic evaluation chain (resize shorter side to ``spec.resize``,
        centre crop ``spec.crop``). True: the paper's augmentation (random scaled crop
        resized to ``spec.crop``, horizontal flip, small rotation).

    Returns
    -------
    callable
        Maps a float32 ``(rows, cols)`` array in [0, 1] to a float32 tensor
        ``(3, spec.crop, spec.crop)``. It has ``set_random_state(seed)``.

    Raises
    ------
    UnsupportedPixelData
        (when called) the input is not a finite 2-D array.
    """
    head: list[Any] = [
        EnsureChannelFirst(channel_dim="no_channel"),
        ResizeShorterSide(spec.resize),
    ]
    if train:
        geometry: list[Any] = [
            RandScaleCrop(roi_scale=TRAIN_MIN_CROP_SIDE, max_roi_scale=1.0, random_size=True),
            Resize(spatial_size=(spec.crop, spec.crop), mode="bilinear"),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate(
                range_x=math.radians(TRAIN_ROTATION_DEG),
                prob=0.5,
                keep_size=True,
                padding_mode="zeros",
            ),
        ]
    else:
        geometry = [CenterSpatialCrop(roi_size=(spec.crop, spec.crop))]
    tail: list[Any] = [
        # A centre crop larger than a small image leaves it smaller: pad to the crop size.
        SpatialPad(spatial_size=(spec.crop, spec.crop), method="symmetric", mode="constant"),
        RepeatChannel(repeats=3),
        _normalise(spec),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return _Checked(Compose([*head, *geometry, *tail]))


_EVAL_CACHE: dict[Hashable, Callable[[np.ndarray], torch.Tensor]] = {}


def preprocess(pixels: np.ndarray, spec: PreprocessingSpec) -> torch.Tensor:
    """Apply the evaluation chain to one image.

    Parameters
    ----------
    pixels
        float32 ``(rows, cols)`` in [0, 1].
    spec
        Preprocessing parameters.

    Returns
    -------
    torch.Tensor
        float32 ``(3, spec.crop, spec.crop)``, ImageNet-normalised.
    """
    transform = _EVAL_CACHE.get(spec)
    if transform is None:
        transform = _EVAL_CACHE.setdefault(spec, build_transform(spec, train=False))
    return transform(pixels)


def input_geometry(shape: tuple[int, int], spec: PreprocessingSpec) -> CropGeometry:
    """Describe where the evaluation chain's model input lies in an image.

    Parameters
    ----------
    shape
        ``(rows, cols)`` of the image given to :func:`preprocess`.
    spec
        Preprocessing parameters.

    Returns
    -------
    CropGeometry
        Resized shape and the crop's offset in it, enough to map a ``crop x crop``
        map back to the image.
    """
    rows, cols = int(shape[0]), int(shape[1])
    resized = resized_shape((rows, cols), spec.resize)
    # MONAI's centre crop starts at side // 2 - crop // 2; symmetric padding of a
    # smaller side puts (crop - side) // 2 before it.
    start = tuple(
        side // 2 - spec.crop // 2 if side >= spec.crop else -((spec.crop - side) // 2)
        for side in resized
    )
    return CropGeometry(
        image_shape=(rows, cols),
        resized_shape=resized,
        crop_start=(start[0], start[1]),
        crop=spec.crop,
    )
