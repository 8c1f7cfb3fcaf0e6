"""The one preprocessing chain shared by training and inference (MONAI transforms).

Input: a display-ready float32 greyscale image ``(rows, cols)`` in [0, 1] (from
:mod:`cxr_pipeline.ingest`: DICOM after modality/VOI LUT and MONOCHROME1 inversion, or a
PNG/JPEG). Output: a float32 tensor ``(3, crop, crop)`` normalised with the card's mean
and standard deviation, as the paper's torchvision recipe (``Resize(256)``,
``CenterCrop(224)``, grey replicated to three channels).

With ``intensity="rank"`` in the card the chain first replaces every pixel by its mid-rank
among the image's pixels (:class:`RankNormalize`), at the resolution it was given, before
resizing. Ranks do not change under any increasing intensity map, so the window/level a
PACS applied, a gamma curve, or 12- versus 16-bit storage give the same model input; only a
window that clips (ties the pixels beyond it) still changes the picture a little, which
training covers with random windows (:class:`RandWindow`).

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
from monai.transforms.intensity.array import NormalizeIntensity, RandAdjustContrast
from monai.transforms.spatial.array import RandFlip, RandRotate, Resize
from monai.transforms.transform import RandomizableTransform, Transform
from monai.transforms.utility.array import EnsureChannelFirst, EnsureType, RepeatChannel

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.model_card import PreprocessingSpec

TRAIN_MIN_CROP_SIDE = 0.5
"""Smallest random-crop side in training, as a fraction of the image side (area >= 25%)."""
TRAIN_ROTATION_DEG = 10.0
"""Largest random rotation in training, degrees (the paper's "small rotations")."""
TRAIN_WINDOW_PROB = 0.7
"""Chance that a training image is clipped by a random window (:class:`RandWindow`)."""
TRAIN_WINDOW_MAX_CLIP = 0.12
"""Largest share of the pixels a random window clips at each end (a 5-95 % window clips 5 %)."""
TRAIN_GAMMA = (0.7, 1.4)
"""Random gamma range in training (only with ``intensity="none"``: ranks ignore gamma)."""


class RankNormalize(Transform):
    """Replace each pixel by its mid-rank among the image's pixels, scaled to (0, 1).

    ``out = (#pixels below v + #pixels equal to v / 2) / #pixels``: the image's empirical
    cumulative histogram, evaluated exactly. Any strictly increasing intensity map (window
    and level without clipping, gamma, a change of bit depth, a modality LUT) leaves the
    ranks, and so the output, unchanged. MONAI's ``HistogramNormalize`` equalises with a
    fixed number of value bins between the minimum and maximum, so a gamma curve moves
    pixels between bins and changes its output; exact ranks (one ``numpy.unique``, a sort)
    do not, which is the whole point here.

    With ``clip > 0`` the ranks are then clipped to ``[clip, 1 - clip]`` and stretched to
    [0, 1]. A display window that clips the darkest and brightest pixels ties them; their
    ranks then differ from the unwindowed image's only below ``clip`` and above
    ``1 - clip`` as long as the window clips at most that share at each end, and those are
    exactly the ranks the clip flattens: such windows give (to ties) the same output.
    """

    def __init__(self, clip: float = 0.0) -> None:
        self.clip = float(clip)

    def __call__(self, img: Any) -> np.ndarray:
        """Rank-normalise a float array of any shape (a single image)."""
        arr = np.asarray(img, dtype=np.float32)
        flat = arr.ravel()
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        cdf = (np.cumsum(counts, dtype=np.float64) - 0.5 * counts) / flat.size
        if self.clip > 0.0:
            cdf = np.clip((cdf - self.clip) / (1.0 - 2.0 * self.clip), 0.0, 1.0)
        out: np.ndarray = cdf[inverse].reshape(arr.shape).astype(np.float32)
        return out


class RandWindow(RandomizableTransform):
    """Random display window: clip the darkest and brightest pixels, rescale to [0, 1].

    With probability ``prob`` the image is clipped to its ``lo`` and ``1 - hi`` quantiles,
    ``lo`` and ``hi`` drawn uniformly from ``[0, max_clip]``: what a PACS window around the
    stored values' percentiles does (the 1-99 % and 5-95 % windows of the benchmark). Then
    the clipped pixels tie, as in a windowed DICOM. MONAI has no quantile-window transform
    (``ScaleIntensityRangePercentiles`` is deterministic), hence this small one.
    """

    def __init__(self, prob: float = TRAIN_WINDOW_PROB,
                 max_clip: float = TRAIN_WINDOW_MAX_CLIP) -> None:
        RandomizableTransform.__init__(self, prob)
        self.max_clip = max_clip
        self._lo = 0.0
        self._hi = 0.0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to clip and the two clipped shares."""
        super().randomize(None)
        self._lo = float(self.R.uniform(0.0, self.max_clip))
        self._hi = float(self.R.uniform(0.0, self.max_clip))

    def __call__(self, img: Any, randomize: bool = True) -> np.ndarray:
        """Window a float image in [0, 1] (any shape)."""
        if randomize:
            self.randomize()
        arr = np.asarray(img, dtype=np.float32)
        if not self._do_transform:
            return arr
        low, high = np.quantile(arr, [self._lo, 1.0 - self._hi])
        if high <= low:
            return arr
        out: np.ndarray = ((np.clip(arr, low, high) - low) / (high - low)).astype(np.float32)
        return out


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


def intensity_transforms(spec: PreprocessingSpec, *, train: bool) -> list[Any]:
    """List the intensity steps that run on the 2-D image before resizing.

    Parameters
    ----------
    spec
        The card's preprocessing (``spec.intensity``).
    train
        Add the random window (and, without rank normalisation, a random gamma).

    Returns
    -------
    list
        Transforms mapping a ``(rows, cols)`` float array to one of the same shape.
    """
    steps: list[Any] = []
    if train:
        steps.append(RandWindow())
        if spec.intensity == "none":
            steps.append(RandAdjustContrast(prob=0.5, gamma=TRAIN_GAMMA))
    if spec.intensity == "rank":
        steps.append(RankNormalize(clip=spec.rank_clip))
    return steps


def build_resized(spec: PreprocessingSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Build the evaluation chain's steps up to the shorter-side resize (for image caches).

    ``build_transform(spec, resized=True)`` applied to this function's output gives exactly
    ``build_transform(spec)`` of the original image, so training can decode and resize each
    image once.

    Parameters
    ----------
    spec
        Preprocessing parameters.

    Returns
    -------
    callable
        Maps a float32 ``(rows, cols)`` array to a float32 ``(rows', cols')`` array whose
        shorter side is ``spec.resize``.
    """
    chain = Compose([*intensity_transforms(spec, train=False),
                     EnsureChannelFirst(channel_dim="no_channel"),
                     ResizeShorterSide(spec.resize)])

    def run(pixels: np.ndarray) -> np.ndarray:
        _check_pixels(pixels)
        out = chain(np.ascontiguousarray(pixels, dtype=np.float32))
        return np.asarray(out[0], dtype=np.float32)

    return run


def build_transform(
    spec: PreprocessingSpec, *, train: bool = False, resized: bool = False
) -> Callable[[np.ndarray], torch.Tensor]:
    """Build the shared preprocessing chain.

    Parameters
    ----------
    spec
        Intensity step, resize, crop and normalisation parameters (from the model card).
    train
        False: deterministic evaluation chain (intensity step, resize shorter side to
        ``spec.resize``, centre crop ``spec.crop``). True: random window (and gamma without
        rank normalisation), then the paper's augmentation (random scaled crop resized to
        ``spec.crop``, horizontal flip, small rotation).
    resized
        The input is :func:`build_resized` output: skip the steps it already applied (in
        training, the random window runs on it and the ranks are taken again so clipped
        pixels tie as in a windowed image).

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
    intensity = intensity_transforms(spec, train=train) if (train or not resized) else []
    head: list[Any] = [*intensity, EnsureChannelFirst(channel_dim="no_channel")]
    if not resized:
        head.append(ResizeShorterSide(spec.resize))
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
        float32 ``(3, spec.crop, spec.crop)``, normalised with the card's mean and std.
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
