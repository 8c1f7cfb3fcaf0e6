"""Grad-CAM heatmaps (Selvaraju et al. 2017).

The map is what ``monai.visualize.GradCAM`` computes (the class logit's gradient at the
target layer, averaged over space, weights the layer's channels; ReLU; bilinear upsampling
to the input size, ``align_corners=False``), written here with one forward hook and
``torch.autograd.grad``, because importing ``monai.visualize`` loads all of MONAI (about 2.5 s
of the one-image start-up budget, see :mod:`cxr_pipeline.model.preprocess`).
``tests/unit/test_explain.py`` checks the map against MONAI's ``GradCAM`` on the packaged
model.

It works on a private copy of the predictor's model (made once per served model and
cached, keyed weakly by that model so proxies of a predictor share it), never the model that
serves predictions: the hook stays off the served model, so concurrent ``predict_tensors``
calls are hook-free, and a lock serialises Grad-CAM calls on the copy (the hook keeps
per-call state). The copy is a snapshot: a served model's weights are not expected to
change.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from cxr_pipeline.errors import ModelError
from cxr_pipeline.model.inference import structure_copy

if TYPE_CHECKING:
    from cxr_pipeline.model.inference import Predictor

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


class _Twin:
    """A gradient-free copy of a served model that records one layer's output."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        # Backpropagate only from the output to the target layer: no weight gradients (the
        # copy's parameters share the served weights' storage with requires_grad off), and
        # the layer's input is where the graph starts (3-6x faster than a full backward).
        self.model = structure_copy(model, frozen=True).eval()
        target = self.model.get_submodule(layer)
        if isinstance(getattr(target, "inplace", None), bool):
            # Its output must survive for the gradient (as MONAI does).
            setattr(target, "inplace", False)  # noqa: B010 - nn.Module types attributes as Tensor | Module
        target.register_forward_pre_hook(_start_graph_here)
        target.register_forward_hook(self._record)
        self.activation: torch.Tensor | None = None
        self.lock = threading.Lock()

    def _record(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        self.activation = output if isinstance(output, torch.Tensor) else None

    def cam(self, x: torch.Tensor, class_idx: int) -> torch.Tensor:
        """Grad-CAM of ``class_idx`` for the batch ``x``, at the input's size.

        Parameters
        ----------
        x
            ``(B, 3, H, W)`` model input.
        class_idx
            Output index whose logit is explained.

        Returns
        -------
        torch.Tensor
            ``(B, 1, H, W)``, not normalised.
        """
        self.activation = None
        logits = self.model(x)
        activation = self.activation
        self.activation = None
        if activation is None or not activation.requires_grad:
            raise ModelError("the Grad-CAM target layer did not produce a differentiable map")
        (grad,) = torch.autograd.grad(logits[:, class_idx].sum(), activation)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        acti_map = F.relu((weights * activation).sum(1, keepdim=True))
        return F.interpolate(acti_map, size=x.shape[2:], mode="bilinear", align_corners=False)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Twin] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _start_graph_here(_module: nn.Module, args: tuple[Any, ...]) -> None:
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not arg.requires_grad:
            arg.requires_grad_(True)


def _twin_for(predictor: Predictor, target_layer: str | None) -> _Twin:
    with _CACHE_LOCK:
        twin = _CACHE.get(predictor.model)
        if twin is not None and target_layer is None:
            return twin
        layer = target_layer or TARGET_LAYERS.get(predictor.card.architecture)
        if layer is None:
            raise ModelError(f"no Grad-CAM target layer for {predictor.card.architecture!r}")
        if layer not in dict(predictor.model.named_modules()):
            raise ModelError(f"Grad-CAM target layer {layer!r} not in the model")
        twin = _Twin(predictor.model, layer)
        if target_layer is None:
            _CACHE[predictor.model] = twin
        return twin


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
    twin = _twin_for(predictor, target_layer)
    # Clone outside inference mode: tensors made under torch.inference_mode cannot
    # take part in autograd.
    with torch.inference_mode(False), torch.enable_grad():
        x = predictor.to_model_input(batch.detach().clone())
        with twin.lock:
            raw = twin.cam(x, predictor.card.covid_index)
    cam_map = torch.nan_to_num(raw.detach().float()[0, 0]).clamp_min_(0.0)
    peak = float(cam_map.max())
    if peak > 0.0:
        cam_map = cam_map / peak
    return cam_map.cpu().numpy().astype(np.float32)
