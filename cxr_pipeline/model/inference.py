"""Batched COVID probabilities from a loaded model.

:class:`Predictor` holds one model in eval mode on one device (CUDA when present with
``device="auto"``), in the channels-last memory format by default, and runs it under
``torch.inference_mode`` in micro-batches. The COVID probability is the softmax of the
two-class head at the card's COVID index. The forward pass runs on a copy of the model
with batch norms folded into the preceding convolutions (:func:`fold_batch_norms`); the
original stays for heatmaps (which hook named layers) and for saving.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_pipeline.errors import ConfigError, ModelError
from cxr_pipeline.model.architectures import default_checkpoint_path, load_checkpoint
from cxr_pipeline.model.calibration import OperatingPoint
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.model.preprocess import preprocess
from cxr_pipeline.model.site_profile import load_site_profile
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import ModelSettings

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Forward-pass compute types; None runs plain float32 (autocast off)."""


def resolve_device(device: str) -> torch.device:
    """Turn a device setting into a :class:`torch.device`.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ConfigError
        Unknown device string, or CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
    return resolved


def structure_copy(model: nn.Module, *, frozen: bool = False) -> nn.Module:
    """Copy a module tree without copying its tensors.

    ``copy.deepcopy`` with every parameter and buffer pre-entered in the memo: the modules
    are new objects, their tensors are the original storage. Changing the copy's structure
    (replacing or hooking a submodule) leaves ``model`` alone; nothing here writes weights.

    Parameters
    ----------
    model
        The module to copy.
    frozen
        Give the copy its own ``Parameter`` objects on the same storage with
        ``requires_grad=False`` (for autograd that must not reach the weights, without
        changing the original's flags); otherwise the copy shares the parameters themselves.

    Returns
    -------
    torch.nn.Module
        The copy, in the original's train/eval mode.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False) if frozen else param
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    copied: nn.Module = copy.deepcopy(model, memo)
    return copied


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Return an inference copy of ``model`` with batch norms folded into convolutions.

    Uses PyTorch's FX pass (``torch.fx.experimental.optimization.fuse``), which traces the
    model and replaces every ``Conv2d`` followed by an eval-mode ``BatchNorm2d`` with one
    convolution whose weights and bias absorb the normalisation. The result computes the
    same function (to float rounding) with one pass over each activation fewer.

    Parameters
    ----------
    model
        A model in eval mode (it is not changed).

    Returns
    -------
    torch.nn.Module
        The folded copy; ``model`` itself where there is no batch norm (nothing to fold,
        no copy needed) or it cannot be traced (custom control flow), which only costs the
        speed-up.
    """
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        return model
    try:
        # In place on a structure copy: the fused convolutions are new tensors, and the
        # rest shares the original weights (fuse(inplace=False) would copy every tensor).
        folded = fuse(structure_copy(model), inplace=True)
    except Exception as exc:  # untraceable models are fine as they are
        log.info("batch norms not folded (%s: %s)", type(exc).__name__, str(exc)[:200])
        return model
    return folded.eval()


class Predictor:
    """A model ready for inference, with its card.

    Parameters
    ----------
    model
        A classifier from :func:`cxr_pipeline.model.architectures.build_model` (moved, put in
        eval mode).
    card
        Its model card (class order, preprocessing, threshold).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    channels_last
        Use the channels-last memory format (faster convolutions on CPU and GPU).
    batch_size
        Largest micro-batch of one forward pass.
    precision
        ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: the compute type of the
        forward pass under ``torch.autocast``; probabilities are always float32.
    fold_batch_norm
        Run the forward pass on a copy with batch norms folded (:func:`fold_batch_norms`).

    Attributes
    ----------
    model : torch.nn.Module
        The model as given (eval mode, on the device): for heatmaps and saving. The
        folded copy is made once here: to change weights, build a new predictor.
    inference_model : torch.nn.Module
        What :meth:`predict_tensors` runs: the folded copy, or ``model`` itself.
    card : ModelCard
    device : torch.device
    """

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        *,
        device: str = "auto",
        channels_last: bool = True,
        batch_size: int = 16,
        precision: str = "float32",
        fold_batch_norm: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in _AUTOCAST_DTYPES:
            choices = sorted(_AUTOCAST_DTYPES)
            raise ConfigError(f"precision must be one of {choices}, got {precision!r}")
        self.precision = precision
        self.device = resolve_device(device)
        self.card = card
        self.operating_point = card.operating_point()
        self.channels_last = channels_last
        self.batch_size = batch_size
        model = model.to(self.device).eval()
        # Set both ways: a model shared with an earlier channels-last predictor is
        # converted back (Module.to changes the parameters in place).
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=layout)  # type: ignore[call-overload]
        self.model = model
        self.inference_model = model
        if fold_batch_norm:
            folded = fold_batch_norms(model)
            # Folded weights are new tensors: give them the layout too.
            self.inference_model = folded.to(memory_format=layout)  # type: ignore[call-overload]

    def use_operating_point(self, point: OperatingPoint) -> None:
        """Decide with ``point`` (a site profile's) instead of the card's own.

        Parameters
        ----------
        point
            Calibration and threshold; later :meth:`finding` calls use them.
        """
        self.operating_point = point

    def finding(self, score: float) -> Finding:
        """Turn one raw score into the reported finding (calibrated probability, decision).

        Parameters
        ----------
        score
            Raw COVID score from :meth:`predict_images` or :meth:`predict_tensors`.

        Returns
        -------
        Finding
            Calibrated probability, the threshold on its scale, the raw score and what set
            the operating point.
        """
        point = self.operating_point
        return Finding(
            probability=point.probability(float(score)),
            threshold=point.threshold,
            score=float(score),
            decided_by=f"{point.source} {point.name}".strip(),
            target_sensitivity=point.target_sensitivity,
            calibration_method=point.calibration.method,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | str,
        *,
        device: str = "auto",
        channels_last: bool = True,
        batch_size: int = 16,
        precision: str = "float32",
        fold_batch_norm: bool = True,
    ) -> Predictor:
        """Load a checkpoint (see :func:`cxr_pipeline.model.architectures.load_checkpoint`).

        Parameters
        ----------
        path
            Checkpoint file (``str`` or ``Path``).
        device, channels_last, batch_size, precision, fold_batch_norm
            As for the constructor.

        Returns
        -------
        Predictor
            The loaded predictor.

        Raises
        ------
        CheckpointError
            The checkpoint cannot be loaded safely.
        """
        model, card = load_checkpoint(Path(path), map_location="cpu")
        return cls(
            model,
            card,
            device=device,
            channels_last=channels_last,
            batch_size=batch_size,
            precision=precision,
            fold_batch_norm=fold_batch_norm,
        )

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> Predictor:
        """Build from the ``[model]`` settings; no checkpoint means the packaged default.

        Every service builds its model here (the pipeline :class:`Engine`, the workers,
        ``cxr-batch``), so this is where a configured site profile takes over the
        operating point, once per process.

        Parameters
        ----------
        settings
            Checkpoint path, device, batch size, memory format, site profile.

        Returns
        -------
        Predictor
            The loaded predictor, deciding with the site profile when one is set.

        Raises
        ------
        CheckpointError
            The checkpoint cannot be loaded.
        ConfigError
            The site profile cannot be read or belongs to another model.
        """
        profile = None
        if settings.site_profile is not None:  # read first: a bad file fails before the model
            profile = load_site_profile(settings.site_profile)
        path = settings.checkpoint if settings.checkpoint is not None else default_checkpoint_path()
        predictor = cls.from_checkpoint(
            path,
            device=settings.device,
            channels_last=settings.channels_last,
            batch_size=settings.batch_size,
            precision=settings.precision,
            fold_batch_norm=settings.fold_batch_norm,
        )
        if profile is not None:
            profile.check_model(predictor.card, path=settings.site_profile)
            predictor.use_operating_point(profile.operating_point())
            log.info(
                "site profile %s (%s) decides for %s", settings.site_profile, profile.site,
                profile.model,
            )
        return predictor

    def _check(self, batch: torch.Tensor) -> None:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch)
            raise ModelError(f"expected a (N, 3, H, W) tensor, got {shape}")
        if not batch.is_floating_point():
            raise ModelError(f"expected a floating point tensor, got {batch.dtype}")
        if not torch.isfinite(batch).all():
            raise ModelError("input tensor contains NaN or infinite values")

    def to_model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """Move a checked ``(N, 3, H, W)`` batch to the model's device, dtype and layout."""
        batch = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def predict_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """COVID probabilities of preprocessed images.

        Parameters
        ----------
        batch
            float tensor ``(N, 3, H, W)`` from :func:`cxr_pipeline.model.preprocess.preprocess`.

        Returns
        -------
        numpy.ndarray
            float32 ``(N,)`` softmax probabilities of the COVID class.

        Raises
        ------
        ModelError
            Bad input, or the forward pass failed.
        """
        self._check(batch)
        outputs: list[np.ndarray] = [np.zeros((0,), dtype=np.float32)]
        covid = self.card.covid_index
        dtype = _AUTOCAST_DTYPES[self.precision]
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            for start in range(0, int(batch.shape[0]), self.batch_size):
                chunk = self.to_model_input(batch[start : start + self.batch_size])
                try:
                    logits = self.inference_model(chunk)
                except RuntimeError as exc:
                    raise ModelError(f"forward pass failed: {exc}") from exc
                probs = torch.softmax(logits.float(), dim=1)[:, covid]
                outputs.append(probs.cpu().numpy().astype(np.float32))
        return np.concatenate(outputs)

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocess display-ready images and return their COVID probabilities.

        Parameters
        ----------
        images
            float32 ``(rows, cols)`` arrays in [0, 1] (any sizes).

        Returns
        -------
        numpy.ndarray
            float32 ``(len(images),)`` probabilities.
        """
        if len(images) == 0:
            return np.zeros((0,), dtype=np.float32)
        spec = self.card.preprocessing
        tensors = torch.stack([preprocess(image, spec) for image in images])
        return self.predict_tensors(tensors)
