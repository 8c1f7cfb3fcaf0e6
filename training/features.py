"""Frozen-backbone training on cached features.

With the paper's recipe (ImageNet backbone frozen, only the last layer trained) the
backbone's output for an input never changes, so it is computed once and the head is
trained on the cached features. The result equals the naive loop (image -> whole model
-> loss, every epoch) as long as the frozen backbone runs in eval mode, which is what
"frozen" means here: the authors' code (the PyTorch transfer-learning tutorial) calls
``model.train()`` on the whole model, which also keeps updating the frozen batch-norm
running statistics; we keep the backbone in eval mode instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def split_backbone_head(model: nn.Module, architecture: str) -> tuple[nn.Module, nn.Module]:
    """Split a :func:`cxr_pipeline.model.architectures.build_model` model into backbone and head.

    ``head(backbone(x))`` equals ``model(x)``; both parts share the model's parameters
    (nothing is copied), so training the head trains the model.

    Parameters
    ----------
    model
        A torchvision classifier with the 2-class head.
    architecture
        Its registry key.

    Returns
    -------
    tuple of nn.Module
        (backbone, head). The head is the last layer the paper trains (with the pooling
        and dropout that torchvision applies around it).

    Raises
    ------
    ValueError
        Unknown architecture.
    """
    def m(name: str) -> nn.Module:
        return model.get_submodule(name)

    if architecture.startswith("resnet"):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool")
        return nn.Sequential(*(m(n) for n in names), nn.Flatten(1)), m("fc")
    if architecture == "densenet121":
        # torchvision's DenseNet.forward: features -> relu -> adaptive avg pool -> flatten.
        backbone = nn.Sequential(
            m("features"), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1)
        )
        return backbone, m("classifier")
    if architecture == "squeezenet1_1":
        # classifier = Dropout, final 1x1 conv, ReLU, global average pool.
        return m("features"), nn.Sequential(m("classifier"), nn.Flatten(1))
    if architecture == "efficientnet_lite0":
        lite = ("_stem_pad", "_conv_stem", "_bn0", "_stem_act", "_blocks", "_conv_head",
                "_bn1", "_head_act", "_avg_pooling", "_flatten")
        return nn.Sequential(*(m(n) for n in lite)), nn.Sequential(m("_dropout"), m("_fc"))
    raise ValueError(f"no backbone/head rule for {architecture!r}")


def split_for_finetune(model: nn.Module, architecture: str, blocks: int
                       ) -> tuple[nn.Module, nn.Module]:
    """Split a model into a frozen prefix and its last ``blocks`` blocks plus the head.

    ``suffix(prefix(x))`` equals ``model(x)``; the parts share the model's parameters.
    Fine-tuning trains the suffix on cached prefix outputs (:func:`compute_features`).

    Parameters
    ----------
    model
        An ``efficientnet_lite0`` model from :func:`cxr_pipeline.model.architectures.build_model`.
    architecture
        Its registry key.
    blocks
        How many of the last MBConv blocks (of 16) are trained, with the head convolution,
        its batch norm and the classifier.

    Returns
    -------
    tuple of nn.Module
        (prefix, suffix).

    Raises
    ------
    ValueError
        Architecture without a block rule, or ``blocks`` outside 1-16.
    """
    if architecture != "efficientnet_lite0":
        raise ValueError(f"fine-tuning the last blocks is implemented for efficientnet_lite0, "
                         f"not {architecture!r}")
    all_blocks = model.get_submodule("_blocks")
    assert isinstance(all_blocks, nn.Sequential)
    if not 1 <= blocks <= len(all_blocks):
        raise ValueError(f"blocks must be in 1-{len(all_blocks)}, got {blocks}")
    cut = len(all_blocks) - blocks
    stem = [model.get_submodule(n) for n in ("_stem_pad", "_conv_stem", "_bn0", "_stem_act")]
    prefix = nn.Sequential(*stem, *all_blocks[:cut])
    tail = [model.get_submodule(n) for n in ("_conv_head", "_bn1", "_head_act", "_avg_pooling",
                                              "_flatten", "_dropout", "_fc")]
    return prefix, nn.Sequential(*all_blocks[cut:], *tail)


def freeze_batch_norm_statistics(module: nn.Module) -> None:
    """Put every batch norm of ``module`` in eval mode (running statistics stay fixed).

    Fine-tuning with batches of ~20 images: the ImageNet statistics are kept; the batch
    norms' affine parameters are still trained.
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eval()


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter and put the module in eval mode."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that still require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


@torch.inference_mode()
def compute_features(
    backbone: nn.Module,
    count: int,
    load: Callable[[Sequence[int]], torch.Tensor],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the frozen backbone once over ``count`` inputs.

    Parameters
    ----------
    backbone
        Frozen, eval-mode backbone.
    count
        Number of inputs.
    load
        Builds the input batch (N, 3, H, W) for a list of indices.
    batch_size
        Inputs per forward pass.
    device
        Where the backbone runs; features come back on the CPU.
    on_batch
        Called with the batch size after each batch (progress bars).

    Returns
    -------
    torch.Tensor
        Features, shape (count, ...), float32 on the CPU.
    """
    backbone.eval()
    chunks = []
    for start in range(0, count, batch_size):
        idx = list(range(start, min(count, start + batch_size)))
        chunks.append(backbone(load(idx).to(device)).float().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(chunks)
