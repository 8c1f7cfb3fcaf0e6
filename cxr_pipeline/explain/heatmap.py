"""The heatmap for one image: Grad-CAM (fast default) or occlusion (the paper's), placed on it.

Both methods produce a map over the model input (``crop x crop``);
:func:`heatmap_for_image` maps it back onto the radiograph through the preprocessing
geometry, with zeros outside the region the model saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from cxr_pipeline.explain.gradcam import gradcam
from cxr_pipeline.explain.occlusion import occlusion
from cxr_pipeline.model.preprocess import CropGeometry, input_geometry, preprocess
from cxr_pipeline.settings import ExplainSettings

if TYPE_CHECKING:
    from cxr_pipeline.model.inference import Predictor

__all__ = ["heatmap_for_image", "map_to_image"]


def map_to_image(crop_map: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Place a model-input map back onto the image it was computed from.

    The map is pasted at the crop's position in the resized image (zeros elsewhere), and
    that canvas is resized bilinearly to the image shape: the inverse of the evaluation
    chain's resize-then-crop.

    Parameters
    ----------
    crop_map
        ``(crop, crop)`` map.
    geometry
        From :func:`cxr_pipeline.model.preprocess.input_geometry` for the image.

    Returns
    -------
    numpy.ndarray
        float32 ``geometry.image_shape`` map, clipped to [0, 1].
    """
    rows, cols = geometry.resized_shape
    top, left = geometry.crop_start
    canvas = np.zeros((rows, cols), dtype=np.float32)
    # Intersection of the crop with the resized image (the crop may overhang when the
    # image was padded up to the crop size).
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + geometry.crop, rows), min(left + geometry.crop, cols)
    canvas[r0:r1, c0:c1] = crop_map[r0 - top : r1 - top, c0 - left : c1 - left]
    resized = F.interpolate(
        torch.from_numpy(canvas)[None, None],
        size=geometry.image_shape,
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    return resized.clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)


def heatmap_for_image(
    predictor: Predictor, pixels: np.ndarray, settings: ExplainSettings
) -> np.ndarray | None:
    """Heatmap of the COVID class at the image's resolution.

    Parameters
    ----------
    predictor
        The loaded model and its card (whose preprocessing is used).
    pixels
        float32 ``(rows, cols)`` display-ready image in [0, 1].
    settings
        Method and occlusion parameters.

    Returns
    -------
    numpy.ndarray or None
        float32 map in [0, 1] with ``pixels.shape``; None when ``settings.method`` is
        ``"none"``.
    """
    if settings.method == "none":
        return None
    spec = predictor.card.preprocessing
    tensor = preprocess(pixels, spec)
    if settings.method == "gradcam":
        crop_map = gradcam(predictor, tensor)
    else:
        crop_map = occlusion(
            predictor,
            tensor,
            patch=settings.occlusion_patch,
            stride=settings.occlusion_stride,
            batch=settings.occlusion_batch,
        )
    return map_to_image(crop_map, input_geometry(pixels.shape[:2], spec))
