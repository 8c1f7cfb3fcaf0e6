"""Plain result records passed between pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Finding:
    """The classifier's answer for one image.

    Attributes
    ----------
    probability
        Calibrated probability of COVID-19, in [0, 1] (the raw score where the operating
        point has no calibration).
    threshold
        The operating threshold, on the same scale as ``probability``.
    score
        The model's raw score (softmax of the COVID class), when known.
    decided_by
        What set the calibration and threshold: ``"model card NAME VERSION"`` or
        ``"site profile NAME"``; empty when not recorded.
    target_sensitivity
        The sensitivity the threshold was chosen to reach, when it was.
    """

    probability: float
    threshold: float
    score: float | None = None
    decided_by: str = ""
    target_sensitivity: float | None = None

    @property
    def positive(self) -> bool:
        """The paper's rule: probability >= threshold means COVID-19 present."""
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Analysis:
    """Everything produced for one analysed radiograph.

    Attributes
    ----------
    sop_instance_uid, study_instance_uid
        Of the source image.
    finding
        Probability and decision.
    structured_report
        The TID 1500 Comprehensive 3D SR dataset.
    secondary_capture
        The heatmap Secondary Capture dataset.
    heatmap_method
        ``"gradcam"``, ``"occlusion"`` or ``"none"``.
    timings_ms
        Stage name -> milliseconds, for logs and batch reports.
    """

    sop_instance_uid: str
    study_instance_uid: str
    finding: Finding
    structured_report: Dataset
    secondary_capture: Dataset
    heatmap_method: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def result_datasets(self) -> tuple[Dataset, Dataset]:
        """The objects to store on the PACS: (SR, SC)."""
        return (self.structured_report, self.secondary_capture)
