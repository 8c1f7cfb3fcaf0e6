"""Occlusion sensitivity, the Deep-COVID paper's heatmap.

A square patch slides over the model input; for each position the image with that patch
occluded is classified, and the drop of the COVID probability is recorded. Each pixel's
value is the mean drop over the positions that covered it. The sliding, batching and
averaging are ``monai.visualize.OcclusionSensitivity``; the patch is filled with the image
mean (``mode="mean_img"``), a neutral grey that adds no new edges of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr_pipeline.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from cxr_pipeline.model.inference import Predictor


def _overlap(patch: int, stride: int) -> float:
    # MONAI steps by int(patch * (1 - overlap)); the half pixel keeps float rounding from
    # turning e.g. 10 into 9.
    return 0.0 if stride >= patch else 1.0 - (stride + 0.5) / patch


def occlusion(
    predictor: Predictor, tensor: torch.Tensor, *, patch: int, stride: int, batch: int
) -> np.ndarray:
    """Occlusion map of the COVID probability for one preprocessed image.

    Parameters
    ----------
    predictor
        The loaded model and its card.
    tensor
        One preprocessed image, ``(3, H, W)`` or ``(1, 3, H, W)``.
    patch
        Side of the occluding square, in model-input pixels.
    stride
        Step between positions (``1 <= stride <= patch``).
    batch
        Occluded copies per forward pass.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in [0, 1]: the probability drop scaled so its maximum is 1
        (all zeros when no occlusion lowers the probability).

    Raises
    ------
    ConfigError
        Patch, stride or batch out of range.
    ModelError
        Bad tensor shape.
    """
    x = tensor[None] if tensor.ndim == 3 else tensor
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ModelError(f"expected one (3, H, W) image, got {tuple(tensor.shape)}")
    if not 1 <= patch <= min(int(x.shape[2]), int(x.shape[3])):
        raise ConfigError(f"occlusion patch {patch} must be in [1, input size]")
    if not 1 <= stride <= patch:
        raise ConfigError(f"occlusion stride {stride} must be in [1, patch={patch}]")
    if batch < 1:
        raise ConfigError(f"occlusion batch {batch} must be >= 1")
    base = float(predictor.predict_tensors(x)[0])
    # Imported here: any monai import loads all of MONAI (seconds), which the default
    # Grad-CAM path and start-up do not need.
    from monai.visualize.occlusion_sensitivity import OcclusionSensitivity

    sensitivity = OcclusionSensitivity(
        nn_module=predictor.inference_model,
        mask_size=patch,
        n_batch=batch,
        verbose=False,
        mode="mean_img",
        overlap=_overlap(patch, stride),
        activate=True,
    )
    with torch.inference_mode():
        occluded, _ = sensitivity(predictor.to_model_input(x.detach()))
    occluded_prob = torch.as_tensor(occluded)[0, predictor.card.covid_index].float()
    drop = (base - occluded_prob).clamp_min_(0.0)
    peak = float(drop.max())
    if peak > 0.0:
        drop = drop / peak
    return drop.cpu().numpy().astype(np.float32)
