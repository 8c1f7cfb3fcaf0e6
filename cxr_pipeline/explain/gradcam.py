"""Grad-CAM heatmaps (Selvaraju et al. 2017) with ``monai.visualize.GradCAM``.

MONAI's implementation works with the torchvision models given the right target layer,
but it installs permanent forward/backward hooks on the module it wraps and turns off
``inplace`` on the target layer. So it wraps a private copy of the predictor's model (made
once per served model and cached, keyed weakly by that model so proxies of a predictor
share it), never the model that serves predictions: concurrent ``predict_tensors`` calls
stay hook-free, and a lock serialises Grad-CAM calls on the copy (the hooks keep per-call
state). The copy is a snapshot: a served model's weights are not expected to change.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.visualize.class_activation_maps import GradCAM
from torch import nn

from cxr_pipeline.errors import ModelError

if TYPE_CHECKING:
    from cxr_pipeline.inference import Predictor

TARGET_LAYERS: dict[str, str] = {
    "resnet18": "layer4",
    "resnet50": "layer4",
    "squeezenet1_1": "features.12",  # the last Fire module
    # DenseNet.forward applies an in-place ReLU to the output of ``features`` (and so of
    # ``features.norm5``), which PyTorch's full backward hooks refuse; the last dense
    # block is the deepest layer whose output is not modified in place.
    "densenet121": "features.denseblock4",
    # The 1280-channel feature map after the head convolution, batch norm and ReLU6.
    "efficientnet_lite0": "_head_act",
}
"""Last convolutional block of each architecture, as a ``named_modules`` name."""


@dataclass
class _CamState:
    cam: Any
    lock: threading.Lock


_CACHE: weakref.WeakKeyDictionary[nn.Module, _CamState] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _identity(x: torch.Tensor) -> torch.Tensor:
    # MONAI's default post-processing maps (min, max) to (1, 0), i.e. it flips the map;
    # we normalise ourselves (see gradcam()).
    return x


def _start_graph_here(_module: nn.Module, args: tuple[Any, ...]) -> None:
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not arg.requires_grad:
            arg.requires_grad_(True)


def _state_for(predictor: Predictor, target_layer: str | None) -> _CamState:
    with _CACHE_LOCK:
        state = _CACHE.get(predictor.model)
        if state is not None and target_layer is None:
            return state
        layer = target_layer or TARGET_LAYERS.get(predictor.card.architecture)
        if layer is None:
            raise ModelError(f"no Grad-CAM target layer for {predictor.card.architecture!r}")
        if layer not in dict(predictor.model.named_modules()):
            raise ModelError(f"Grad-CAM target layer {layer!r} not in the model")
        twin = copy.deepcopy(predictor.model).eval()
        # Backpropagate only from the output to the target layer: no weight gradients, and
        # the layer's input is where the graph starts (3-6x faster than a full backward).
        for param in twin.parameters():
            param.requires_grad_(False)
        twin.get_submodule(layer).register_forward_pre_hook(_start_graph_here)
        cam = GradCAM(nn_module=twin, target_layers=layer, postprocessing=_identity)
        state = _CamState(cam=cam, lock=threading.Lock())
        if target_layer is None:
            _CACHE[predictor.model] = state
        return state


def gradcam(
    predictor: Predictor, tensor: torch.Tensor, *, target_layer: str | None = None
) -> np.ndarray:
    """Grad-CAM map of the COVID class for one preprocessed image.

    Parameters
    ----------
    predictor
        The loaded model and its card.
    tensor
        One preprocessed image, ``(3, H, W)`` or ``(1, 3, H, W)``.
    target_layer
        ``named_modules`` name of the layer to explain; None: the architecture's last
        convolutional block (:data:`TARGET_LAYERS`).

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in [0, 1], upsampled bilinearly from the layer's grid; the
        maximum is 1 unless the map is all zero (no positive evidence).

    Raises
    ------
    ModelError
        Bad tensor shape, or no target layer for the architecture.
    """
    batch = tensor[None] if tensor.ndim == 3 else tensor
    if batch.ndim != 4 or batch.shape[0] != 1 or batch.shape[1] != 3:
        raise ModelError(f"expected one (3, H, W) image, got {tuple(tensor.shape)}")
    state = _state_for(predictor, target_layer)
    # Clone outside inference mode: tensors made under torch.inference_mode cannot
    # take part in autograd.
    with torch.inference_mode(False), torch.enable_grad():
        x = predictor.to_model_input(batch.detach().clone())
        with state.lock:
            raw = state.cam(x, class_idx=predictor.card.covid_index)
    cam_map = torch.nan_to_num(raw.detach().float()[0, 0]).clamp_min_(0.0)
    peak = float(cam_map.max())
    if peak > 0.0:
        cam_map = cam_map / peak
    return cam_map.cpu().numpy().astype(np.float32)
