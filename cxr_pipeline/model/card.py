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
from cxr_pipeline.model.calibration import Calibration, OperatingPoint

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
        Operating threshold on the raw score: score >= threshold is COVID-positive.
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
    calibration
        Map from the raw score to the reported probability
        (:mod:`cxr_pipeline.model.calibration`); identity for cards without one.
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
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def covid_index(self) -> int:
        """Index of the COVID class in the model output."""
        return self.class_names.index("covid")

    def operating_point(self) -> OperatingPoint:
        """Give the card's own operating point: its calibration and threshold on that scale.

        :attr:`threshold` is on the raw score's scale (it was chosen on raw scores); the
        calibration is monotone, so the calibrated image of the threshold flags the same
        images (ties of an isotonic step aside, which it flags too).

        Returns
        -------
        OperatingPoint
            Source ``"model card"``, named ``NAME VERSION``.
        """
        threshold = self.threshold
        if self.calibration.method != "identity":
            threshold = self.calibration.apply_one(self.threshold)
        return OperatingPoint(
            calibration=self.calibration,
            threshold=threshold,
            source="model card",
            name=f"{self.name} {self.version}",
            target_sensitivity=self.metrics.get("target_sensitivity"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form stored in the checkpoint (safe for ``weights_only`` loading)."""
        data = dataclasses.asdict(self)
        data["format_version"] = CARD_FORMAT_VERSION
        data["class_names"] = list(self.class_names)
        data["preprocessing"]["mean"] = list(self.preprocessing.mean)
        data["preprocessing"]["std"] = list(self.preprocessing.std)
        data["calibration"] = self.calibration.to_dict()
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
            calibration = Calibration.from_dict(dict(values.pop("calibration", {})))
            card = cls(
                preprocessing=PreprocessingSpec(**pre),
                calibration=calibration,
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
