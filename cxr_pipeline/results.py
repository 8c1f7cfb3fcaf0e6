"""Plain result records passed between pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

FINDING_NAME = "COVID-19"
"""What the classifier reports on, as every output words it."""


def _figures(value: float, digits: int) -> str:
    text = f"{100.0 * value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if digits else text


def _digits(value: float) -> int:
    """Decimals a percentage needs to be read: 12 %, 3.4 %, 0.27 %."""
    percent = 100.0 * abs(value)
    if percent >= 9.5 or percent == 0.0:
        return 0
    return 1 if percent >= 0.95 else 2


def percent_pair(probability: float, threshold: float) -> tuple[str, str]:
    """Format a probability and a threshold as percentages whose order can be read.

    Each gets the decimals its size needs (``12``, ``3.4``, ``0.27``); where the two would
    then look equal, or in the wrong order, both get more decimals (``12.4`` against
    ``12.3``), so "above 12 %" never sits beside "12 %".

    Parameters
    ----------
    probability, threshold
        Values in [0, 1].

    Returns
    -------
    tuple of str
        The two numbers without the percent sign.
    """
    dp, dt = _digits(probability), _digits(threshold)
    for extra in range(0, 5):
        a, b = _figures(probability, dp + extra), _figures(threshold, dt + extra)
        shown = (float(a) > float(b)) - (float(a) < float(b))
        true = (probability > threshold) - (probability < threshold)
        if shown == true:
            return a, b
    return _figures(probability, 6), _figures(threshold, 6)


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

    calibration_method: str = ""
    """``identity``, ``temperature``, ``platt`` or ``isotonic``: how ``probability`` was
    made from ``score``; empty when not recorded."""

    @property
    def positive(self) -> bool:
        """The paper's rule: probability >= threshold flags COVID-19 (suspected)."""
        return self.probability >= self.threshold

    @property
    def calibrated(self) -> bool:
        """True when ``probability`` and ``threshold`` are on a fitted calibrated scale."""
        return self.calibration_method not in ("", "identity")

    @property
    def verdict(self) -> str:
        """``"COVID-19 suspected"`` or ``"COVID-19 not suspected"``.

        The operating point is a screening one (chosen for high sensitivity), so a flag
        means "look at this image", not "present": the probability of a flagged image can
        be well below 50 %.
        """
        return f"{FINDING_NAME} {'suspected' if self.positive else 'not suspected'}"

    def point_name(self) -> str:
        """Name of the operating point: ``"the 98 %-sensitivity point"`` where known."""
        if self.target_sensitivity is None:
            return "the operating point"
        target = f"{100.0 * self.target_sensitivity:.1f}".rstrip("0").rstrip(".")
        return f"the {target} %-sensitivity point"

    def side(self) -> str:
        """``"above"``, ``"at"`` or ``"below"``: the probability against the threshold."""
        if not self.positive:
            return "below"
        return "above" if self.probability > self.threshold else "at"

    def relation(self) -> str:
        """Where the probability lies: ``"above the 98 %-sensitivity point, 12 %"``."""
        _, threshold = percent_pair(self.probability, self.threshold)
        return f"{self.side()} {self.point_name()}, {threshold} %"

    def probability_text(self) -> str:
        """Format the probability as a percentage, as precise as the comparison needs."""
        return f"{percent_pair(self.probability, self.threshold)[0]} %"

    def statement(self) -> str:
        """Word the result in one sentence, as readers see it.

        E.g. ``"COVID-19 suspected (above the 98 %-sensitivity point, 12 %): probability
        23 %"`` or ``"COVID-19 not suspected (below the 98 %-sensitivity point, 12 %):
        probability 3.1 %"``. The decision never appears without the operating point.
        """
        return f"{self.verdict} ({self.relation()}): probability {self.probability_text()}"


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
