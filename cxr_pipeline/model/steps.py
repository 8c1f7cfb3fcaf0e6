"""The steps every preprocessing chain shares, evaluation and training alike.

:class:`RankNormalize` (the intensity step), the shorter-side resize, the centre crop or
pad, and :func:`finish` (crop, grey to three channels, normalise) are written with
``torch`` operations, step for step what MONAI's ``Resize`` (``area`` / ``bilinear``),
``CenterSpatialCrop``, ``SpatialPad(method="symmetric")``, ``RepeatChannel`` and
``NormalizeIntensity(channel_wise=True)`` compute (see :mod:`cxr_pipeline.model.preprocess`
for why not MONAI itself). They live below both chains: the deterministic one in
:mod:`cxr_pipeline.model.preprocess` and the random one in :mod:`cxr_pipeline.model.augment`
use them, and this module imports neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from cxr_pipeline.errors import UnsupportedPixelData
from cxr_pipeline.model.card import PreprocessingSpec


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
