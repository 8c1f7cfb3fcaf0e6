"""The one preprocessing chain shared by training and inference.

Input: a display-ready float32 greyscale image ``(rows, cols)`` in [0, 1] (from
:mod:`cxr_pipeline.dicom.ingest`: DICOM after modality/VOI LUT and MONOCHROME1 inversion, or a
PNG/JPEG). Output: a float32 tensor ``(3, crop, crop)`` normalised with the card's mean
and standard deviation, as the paper's torchvision recipe (``Resize(256)``,
``CenterCrop(224)``, grey replicated to three channels).

With ``intensity="rank"`` in the card the chain first replaces every pixel by its mid-rank
among the image's pixels (:class:`RankNormalize`), at the resolution it was given, before
resizing. Ranks do not change under any increasing intensity map, so the window/level a
PACS applied, a gamma curve, or 12- versus 16-bit storage give the same model input; only a
window that clips (ties the pixels beyond it) still changes the picture a little, which
training covers with random windows (:class:`cxr_pipeline.model.augment.RandWindow`).

The deterministic (evaluation and inference) chain is written with ``torch`` operations
here, step for step what MONAI's ``Resize`` (``area`` / ``bilinear``),
``CenterSpatialCrop``, ``SpatialPad(method="symmetric")``, ``RepeatChannel`` and
``NormalizeIntensity(channel_wise=True)`` compute; ``tests/unit/test_preprocess.py`` checks
that it gives the same tensor as that MONAI chain on real radiographs. The reason is start-up
time: any ``monai`` import runs ``monai/__init__``, which imports every MONAI sub-package,
torchvision's detection models and ``torch._dynamo`` (about 2.5 s of a 3 s budget for one
image on a 2-core machine). Training's random augmentation is MONAI's
(:mod:`cxr_pipeline.model.augment`, which also builds either chain for training with
``build_transform``); this module never imports it. The steps both chains share are in
:mod:`cxr_pipeline.model.steps`.

Because PNGs and DICOMs both reach this chain as the same [0, 1] array, the same pixels
give the same tensor whatever container they came in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from cxr_pipeline.model.card import PreprocessingSpec
from cxr_pipeline.model.steps import (
    RankNormalize,
    check_pixels,
    finish,
    resize_shorter_side,
    resized_shape,
)


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
