"""The model card: everything that travels with a checkpoint's weights.

A checkpoint file is ``{"state_dict": ..., "card": ModelCard.to_dict()}`` saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``; the card holds only
plain types, so loading never unpickles code. The card feeds the SR (algorithm
identification, Contributing Equipment with the Device UID, the operating threshold).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cxr_pipeline.errors import CheckpointError

CARD_FORMAT_VERSION = 1

INTENSITY_STEPS: tuple[str, ...] = ("none", "rank")
"""Values of :attr:`PreprocessingSpec.intensity`."""


@dataclass(frozen=True)
class PreprocessingSpec:
    """Parameters of the shared preprocessing chain (see :mod:`cxr_pipeline.model.preprocess`)."""

    resize: int = 256
    """Shorter side after resizing, as torchvision's ImageNet recipe (the paper's code)."""
    crop: int = 224
    """Centre crop side: the model input size."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    intensity: str = "none"
    """Intensity step before resizing: ``"none"`` (the display-ready pixels as they are) or
    ``"rank"`` (each pixel replaced by its mid-rank among the image's pixels, so any
    monotone window/level, gamma or bit depth gives the same input; see
    :class:`cxr_pipeline.model.steps.RankNormalize`). Cards written before this field read
    as ``"none"``."""
    rank_clip: float = 0.0
    """With ``intensity="rank"``: ranks below ``rank_clip`` and above ``1 - rank_clip`` are
    clipped and the rest stretched to [0, 1], so any window that clips at most that share
    of the pixels at each end (a 1-99 % or 5-95 % window) gives the same model input."""

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_STEPS:
            raise ValueError(
                f"intensity must be one of {', '.join(INTENSITY_STEPS)}, got {self.intensity!r}"
            )
        if not 0.0 <= self.rank_clip < 0.5:
            raise ValueError(f"rank_clip must be in [0, 0.5), got {self.rank_clip}")


@dataclass(frozen=True)
class ModelCard:
    """Description of one trained model, stored inside its checkpoint.

    Attributes
    ----------
    name
        Human name, e.g. ``"deep-covid-squeezenet1_1"``.
    version
        Model version string, written to the SR as software version.
    architecture
        Registry key: ``resnet18``, ``resnet50``, ``squeezenet1_1`` or ``densenet121``.
    class_names
        Output order of the two-class head; must contain ``"covid"``.
    threshold
        Operating threshold: probability >= threshold is COVID-positive.
    device_uid
        DICOM UID identifying these weights (Contributing Equipment Device UID); it must
        change whenever the weights change.
    preprocessing
        Parameters of the preprocessing chain the model was trained with.
    training_data
        Free-text summary of the training data and split.
    metrics
        Evaluation figures (name -> value), e.g. ``{"auc": 0.97}``.
    intended_use
        Statement written into result objects.
    base_weights
        Where the initial (pretrained) weights came from and their licence; ``""`` for a
        model trained from random initialisation.
    """

    name: str
    version: str
    architecture: str
    device_uid: str
    class_names: tuple[str, ...] = ("non_covid", "covid")
    threshold: float = 0.5
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)
    training_data: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    intended_use: str = "Research use only. Not for diagnostic use."
    base_weights: str = ""

    @property
    def covid_index(self) -> int:
        """Index of the COVID class in the model output."""
        return self.class_names.index("covid")

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form stored in the checkpoint (safe for ``weights_only`` loading)."""
        data = dataclasses.asdict(self)
        data["format_version"] = CARD_FORMAT_VERSION
        data["class_names"] = list(self.class_names)
        data["preprocessing"]["mean"] = list(self.preprocessing.mean)
        data["preprocessing"]["std"] = list(self.preprocessing.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Rebuild a card from :meth:`to_dict` output.

        Raises
        ------
        CheckpointError
            A field is missing, unknown or of the wrong type, or the class order lacks
            ``"covid"``.
        """
        try:
            values = dict(data)
            version = values.pop("format_version", CARD_FORMAT_VERSION)
            if version != CARD_FORMAT_VERSION:
                raise CheckpointError(f"unsupported model card format {version}")
            pre = dict(values.pop("preprocessing", {}))
            for key in ("mean", "std"):
                if key in pre:
                    pre[key] = tuple(float(v) for v in pre[key])
            card = cls(
                preprocessing=PreprocessingSpec(**pre),
                class_names=tuple(values.pop("class_names", ("non_covid", "covid"))),
                metrics={str(k): float(v) for k, v in values.pop("metrics", {}).items()},
                **values,
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model card: {exc}") from exc
        if "covid" not in card.class_names:
            raise CheckpointError("model card class_names must contain 'covid'")
        if not 0.0 <= card.threshold <= 1.0:
            raise CheckpointError(f"threshold {card.threshold} outside [0, 1]")
        return card
