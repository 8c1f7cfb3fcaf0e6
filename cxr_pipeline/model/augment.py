"""Training augmentation (MONAI): random windows and the paper's random geometry.

Imported only by training (``build_transform`` builds either chain for it), never on the
inference path, because any ``monai`` import loads all of MONAI (see
:mod:`cxr_pipeline.model.preprocess`). The chain ends with the same
:func:`~cxr_pipeline.model.steps.finish` step as evaluation, so a training tensor and an
inference tensor are normalised alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# Imported from their defining modules: ``monai.transforms`` does not re-export them for mypy.
from monai.transforms.compose import Compose
from monai.transforms.croppad.array import RandScaleCrop
from monai.transforms.intensity.array import RandAdjustContrast
from monai.transforms.spatial.array import RandFlip, RandRotate, Resize
from monai.transforms.transform import RandomizableTransform
from monai.transforms.utility.array import EnsureChannelFirst, EnsureType

from cxr_pipeline.model.card import PreprocessingSpec
from cxr_pipeline.model.preprocess import EvalTransform
from cxr_pipeline.model.steps import RankNormalize, check_pixels, finish, resize_shorter_side

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


def intensity_transforms(spec: PreprocessingSpec) -> list[Any]:
    """List the random intensity steps that run on the 2-D image before resizing.

    Parameters
    ----------
    spec
        The card's preprocessing (``spec.intensity``).

    Returns
    -------
    list
        The random window, a random gamma without rank normalisation, then the rank step
        when the card has one: each maps a ``(rows, cols)`` float array to one of the same
        shape.
    """
    steps: list[Any] = [RandWindow()]
    if spec.intensity == "none":
        steps.append(RandAdjustContrast(prob=0.5, gamma=TRAIN_GAMMA))
    if spec.intensity == "rank":
        steps.append(RankNormalize(clip=spec.rank_clip))
    return steps


class _ResizeShorterSide:
    """:func:`cxr_pipeline.model.steps.resize_shorter_side` as a chain step."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Any) -> torch.Tensor:
        return resize_shorter_side(torch.as_tensor(img, dtype=torch.float32), self.size)


class TrainTransform:
    """The random training chain as a picklable callable with ``set_random_state``.

    Parameters
    ----------
    chain
        MONAI ``Compose`` from the 2-D image to the ``(1, crop, crop)`` augmented image.
    spec
        The card's preprocessing, for the shared :func:`~cxr_pipeline.model.steps.finish` step.
    """

    def __init__(self, chain: Compose, spec: PreprocessingSpec) -> None:
        self.chain = chain
        self.spec = spec

    def set_random_state(self, seed: int) -> None:
        """Seed the random transforms (training reproducibility)."""
        self.chain.set_random_state(seed=seed)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """Map a float32 ``(rows, cols)`` array to an augmented ``(3, crop, crop)`` tensor."""
        check_pixels(pixels)
        out = self.chain(np.ascontiguousarray(pixels, dtype=np.float32))
        assert isinstance(out, torch.Tensor)
        return finish(out, self.spec)


def train_transform(spec: PreprocessingSpec, *, resized: bool = False) -> TrainTransform:
    """Build the random training chain.

    Random window (and gamma without rank normalisation), the rank step, then the paper's
    augmentation: random scaled crop resized to ``spec.crop``, horizontal flip, small
    rotation; finally the shared :func:`~cxr_pipeline.model.steps.finish`.

    Parameters
    ----------
    spec
        The card's preprocessing.
    resized
        The input is :func:`cxr_pipeline.model.preprocess.build_resized` output: skip the resize
        (the random window runs on it and the ranks are taken again, so clipped pixels tie
        as in a windowed image).

    Returns
    -------
    TrainTransform
        Seed it with ``set_random_state`` for reproducible training.
    """
    steps: list[Any] = [*intensity_transforms(spec), EnsureChannelFirst(channel_dim="no_channel")]
    if not resized:
        steps.append(_ResizeShorterSide(spec.resize))
    steps += [
        RandScaleCrop(roi_scale=TRAIN_MIN_CROP_SIDE, max_roi_scale=1.0, random_size=True),
        Resize(spatial_size=(spec.crop, spec.crop), mode="bilinear"),
        RandFlip(prob=0.5, spatial_axis=1),
        RandRotate(
            range_x=math.radians(TRAIN_ROTATION_DEG),
            prob=0.5,
            keep_size=True,
            padding_mode="zeros",
        ),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return TrainTransform(Compose(steps), spec)


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
        (:func:`cxr_pipeline.model.augment.train_transform`: random window, and gamma without
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
        return train_transform(spec, resized=resized)
    return EvalTransform(spec, resized=resized)
