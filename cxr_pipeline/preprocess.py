"""The one preprocessing chain shared by training and inference.

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
training covers with random windows (:class:`cxr_pipeline.augment.RandWindow`).

The deterministic (evaluation and inference) chain is written with ``torch`` operations
here, step for step what MONAI's ``Resize`` (``area`` / ``bilinear``),
``CenterSpatialCrop``, ``SpatialPad(method="symmetric")``, ``RepeatChannel`` and
``NormalizeIntensity(channel_wise=True)`` compute; ``tests/unit/test_preprocess.py`` checks
that it gives the same tensor as that MONAI chain on real radiographs. The reason is start-up
time: any ``monai`` import runs ``monai/__init__``, which imports every MONAI sub-package,
torchvision's detection models and ``torch._dynamo`` (about 2.5 s of a 3 s budget for one
image on a 2-core machine). Training's random augmentation is MONAI's
(:mod:`cxr_pipeline.augment`), imported only when ``train=True`` is asked for.

Because PNGs and DICOMs both reach this chain as the same [0, 1] array, the same pixels
give the same tensor whatever container they came in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.model_card import PreprocessingSpec


class RankNormalize:
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


def _resize_mode(shape: tuple[int, int], size: int) -> str:
    """``area`` (box filter, anti-aliased and fast) to shrink, bilinear to enlarge."""
    return "area" if min(shape) > size else "bilinear"


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(C, rows, cols)`` so that the shorter side is ``size``, keeping the aspect.

    torchvision's ``Resize(int)`` rule (:func:`resized_shape`), computed as MONAI's
    ``Resize(spatial_size, mode)`` does: one ``torch.nn.functional.interpolate`` call,
    ``area`` to shrink and bilinear (``align_corners=False``) to enlarge, no smoothing.

    Parameters
    ----------
    image
        float32 ``(C, rows, cols)``.
    size
        Target shorter side.

    Returns
    -------
    torch.Tensor
        float32 ``(C, rows', cols')``.
    """
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    target = resized_shape(shape, size)
    if target == shape:
        return image
    mode = _resize_mode(shape, size)
    align = False if mode == "bilinear" else None
    return F.interpolate(image[None], size=target, mode=mode, align_corners=align)[0]


def crop_or_pad_centre(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Centre-crop ``(C, rows, cols)`` to ``crop x crop``, zero-padding a shorter side.

    A side longer than ``crop`` starts at ``side // 2 - crop // 2`` (MONAI's
    ``CenterSpatialCrop``); a shorter one gets ``(crop - side) // 2`` zeros before it and the
    rest after (``SpatialPad(method="symmetric")``), as :func:`input_geometry` describes.

    Parameters
    ----------
    image
        ``(C, rows, cols)``.
    crop
        Side of the square output.

    Returns
    -------
    torch.Tensor
        ``(C, crop, crop)``.
    """
    rows, cols = int(image.shape[-2]), int(image.shape[-1])
    r0 = max(rows // 2 - crop // 2, 0)
    c0 = max(cols // 2 - crop // 2, 0)
    out = image[:, r0 : r0 + crop, c0 : c0 + crop]
    pad_rows, pad_cols = crop - int(out.shape[-2]), crop - int(out.shape[-1])
    if pad_rows or pad_cols:
        out = F.pad(
            out,
            (pad_cols // 2, pad_cols - pad_cols // 2, pad_rows // 2, pad_rows - pad_rows // 2),
        )
    return out


def finish(image: torch.Tensor, spec: PreprocessingSpec) -> torch.Tensor:
    """Centre-crop or pad to the crop size, replicate grey to 3 channels, normalise.

    The last steps of every chain, random or not (:func:`crop_or_pad_centre`, so a crop
    larger than a small image is padded to ``spec.crop``), then ``(x - mean[c]) / std[c]``
    per channel.

    Parameters
    ----------
    image
        float32 ``(1, rows, cols)``.
    spec
        The card's crop size, mean and standard deviation.

    Returns
    -------
    torch.Tensor
        Contiguous float32 ``(3, spec.crop, spec.crop)``.
    """
    square = crop_or_pad_centre(image, spec.crop)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    out = (square.expand(3, -1, -1) - mean) / std
    return out.contiguous()


def check_pixels(pixels: Any) -> None:
    """Raise :class:`UnsupportedPixelData` unless ``pixels`` is a finite, non-empty 2-D array.

    Parameters
    ----------
    pixels
        What a chain was given.

    Raises
    ------
    UnsupportedPixelData
        Wrong type or shape, empty, NaN or infinite values.
    """
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
        shape = getattr(pixels, "shape", None)
        raise UnsupportedPixelData(f"expected a 2-D greyscale array, got shape {shape}")
    if min(pixels.shape) < 1:
        raise UnsupportedPixelData(f"empty image of shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise UnsupportedPixelData("image contains NaN or infinite values")


def _intensity(pixels: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    if spec.intensity == "rank":
        return RankNormalize(clip=spec.rank_clip)(arr)
    return arr


class EvalTransform:
    """The deterministic chain as a picklable callable (validation and inference).

    Parameters
    ----------
    spec
        The card's preprocessing.
    resized
        The input is :func:`build_resized` output: skip the intensity step and the resize.
    """

    def __init__(self, spec: PreprocessingSpec, *, resized: bool = False) -> None:
        self.spec = spec
        self.resized = resized

    def set_random_state(self, seed: int) -> None:
        """Nothing to seed (the chain is deterministic); kept for the training loop."""

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """Map a float32 ``(rows, cols)`` array to the ``(3, crop, crop)`` model input."""
        check_pixels(pixels)
        if self.resized:
            image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
        else:
            image = torch.from_numpy(_intensity(pixels, self.spec))[None]
            image = resize_shorter_side(image, self.spec.resize)
        return finish(image, self.spec)


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

    def run(pixels: np.ndarray) -> np.ndarray:
        check_pixels(pixels)
        image = torch.from_numpy(_intensity(pixels, spec))[None]
        return resize_shorter_side(image, spec.resize)[0].numpy().astype(np.float32, copy=False)

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
        ``spec.resize``, centre crop ``spec.crop``). True: MONAI's random augmentation
        (:func:`cxr_pipeline.augment.train_transform`: random window, and gamma without
        rank normalisation, then the paper's random scaled crop, flip and small rotation).
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
    if train:
        from cxr_pipeline.augment import train_transform  # MONAI: training only

        return train_transform(spec, resized=resized)
    return EvalTransform(spec, resized=resized)


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
        transform = _EVAL_CACHE.setdefault(spec, EvalTransform(spec))
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
