"""The figures of a local validation: discrimination, the decision, calibration.

- AUC is scikit-learn's ``roc_auc_score`` on the raw scores (a monotone calibration does
  not change it), with a 95 % percentile interval from a **patient** bootstrap: patients
  are drawn with replacement and carry all their images, because one patient's images are
  not independent evidence.
- Sensitivity and specificity carry 95 % Wilson score intervals, which stay inside [0, 1]
  and are not degenerate at 0 or 100 %. Images of one patient are not independent (a
  patient followed with five radiographs that all score low is one miss five times), so the
  interval is computed on the **effective** number of images: the count divided by the
  design effect (Kish), the ratio of the patient-clustered variance of the proportion to
  the binomial one (at least 1; with every image agreeing, the number of patients).
- Calibration: expected calibration error (10 equal-width bins), Brier score and log loss
  (:mod:`cxr_pipeline.model.calibration`), and the reliability curve (scikit-learn's
  ``calibration_curve``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_pipeline.model.calibration import brier_score, expected_calibration_error, log_loss

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(proportion: float, n: float, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """Wilson score interval for a proportion observed on ``n`` (possibly effective) trials.

    The closed form (Wilson, 1927), written out because scipy's ``binomtest`` takes integer
    counts only, and an effective sample size is not an integer.
    """
    if n <= 0 or math.isnan(proportion):
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2.0))
    denominator = 1.0 + z * z / n
    centre = (proportion + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(proportion * (1.0 - proportion) / n + z * z / (4.0 * n * n))
    half /= denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def effective_count(hits: Any, groups: Sequence[str]) -> float:
    """Images' worth of independent evidence in a proportion clustered by patient.

    ``n / deff`` with the design effect ``deff = var_clustered / var_binomial`` (at least
    1): the clustered variance is the usual ratio-estimator (linearisation) variance over
    patients. When every image agrees (no variance to estimate), the number of patients.

    Parameters
    ----------
    hits
        Boolean per image (e.g. flagged, among COVID-19 images).
    groups
        Patient of each image.

    Returns
    -------
    float
        Between the number of patients and the number of images.
    """
    h = np.asarray(hits, dtype=np.float64)
    n = h.size
    if n == 0:
        return 0.0
    patients = _groups_index(groups)
    c = len(patients)
    p = float(h.mean())
    if p in (0.0, 1.0):
        return float(c)
    if c < 2 or c == n:
        return float(n)
    totals = np.array([h[i].sum() for i in patients])
    sizes = np.array([i.size for i in patients], dtype=np.float64)
    clustered = c / (c - 1) * float(np.sum((totals - p * sizes) ** 2)) / n**2
    binomial = p * (1.0 - p) / n
    return n / max(1.0, clustered / binomial)


def _groups_index(groups: Sequence[str]) -> list[np.ndarray]:
    _, inverse = np.unique(np.asarray(list(groups), dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return list(np.split(order, bounds))


def auc(scores: Any, labels: Any) -> float:
    """ROC AUC (scikit-learn); NaN without both classes."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def patient_bootstrap_auc(
    scores: Any,
    labels: Any,
    groups: Sequence[str],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the AUC over patient bootstrap resamples.

    Resamples without both classes are drawn again (they have no AUC).

    Parameters
    ----------
    scores, labels
        One per image.
    groups
        Patient of each image.
    n_resamples, confidence, seed
        Bootstrap size, interval level and seed.

    Returns
    -------
    tuple of float
        Lower and upper bound; NaN without both classes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(np.unique(y)) < 2:
        return (math.nan, math.nan)
    patients = _groups_index(groups)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    attempts = 0
    while len(values) < n_resamples and attempts < 20 * n_resamples:
        attempts += 1
        pick = rng.integers(0, len(patients), len(patients))
        index = np.concatenate([patients[i] for i in pick])
        if y[index].min() == y[index].max():
            continue
        values.append(float(roc_auc_score(y[index], s[index])))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Decision:
    """Counts and rates of one decision rule (flagged = COVID-19 suspected)."""

    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data: dict[str, Any] = _clean(asdict(self))
        return data


def decision(
    flagged: Any, labels: Any, groups: Sequence[str] | None = None, threshold: float = math.nan
) -> Decision:
    """Sensitivity and specificity of given decisions, with Wilson intervals.

    Parameters
    ----------
    flagged
        Boolean decision per image.
    labels
        1 for COVID-19, 0 otherwise.
    groups
        Patient of each image: the intervals use the effective number of images
        (:func:`effective_count`); None counts every image as independent.
    threshold
        Recorded with the result.

    Returns
    -------
    Decision
        Counts, rates and intervals (rates NaN where a class is absent).
    """
    f = np.asarray(flagged, dtype=bool)
    y = np.asarray(labels).astype(np.int64)
    g = np.asarray(
        [str(i) for i in range(y.size)] if groups is None else list(groups), dtype=object
    ).astype(str)
    tp, fn = int(np.sum(f & (y == 1))), int(np.sum(~f & (y == 1)))
    tn, fp = int(np.sum(~f & (y == 0))), int(np.sum(f & (y == 0)))
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    pos, neg = y == 1, y == 0
    return Decision(
        threshold=float(threshold),
        tp=tp, fn=fn, tn=tn, fp=fp,
        sensitivity=sensitivity,
        sensitivity_ci=wilson_interval(sensitivity, effective_count(f[pos], list(g[pos]))),
        specificity=specificity,
        specificity_ci=wilson_interval(specificity, effective_count(~f[neg], list(g[neg]))),
    )


@dataclass(frozen=True)
class CalibrationFigures:
    """How well probabilities match observed frequencies."""

    ece: float
    brier: float
    log_loss: float
    bin_mean_probability: tuple[float, ...]
    bin_frequency: tuple[float, ...]
    bin_count: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data: dict[str, Any] = _clean(asdict(self))
        return data


def calibration_figures(probabilities: Any, labels: Any, n_bins: int = 10) -> CalibrationFigures:
    """ECE, Brier score, log loss and the reliability curve's bins (equal width).

    The bins are those of :func:`expected_calibration_error` (and of scikit-learn's
    ``calibration_curve`` with the uniform strategy); empty bins are left out.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    means, freqs, counts = [], [], []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            means.append(float(p[mask].mean()))
            freqs.append(float(y[mask].mean()))
            counts.append(int(mask.sum()))
    both = len(np.unique(y)) == 2
    return CalibrationFigures(
        ece=expected_calibration_error(p, y, n_bins),
        brier=brier_score(p, y) if both else float(np.mean((p - y) ** 2)),
        log_loss=log_loss(p, y),
        bin_mean_probability=tuple(means),
        bin_frequency=tuple(freqs),
        bin_count=tuple(counts),
    )


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes None, tuples lists."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def clean(value: Any) -> Any:
    """Make a nested structure JSON-safe (NaN -> None, tuples -> lists)."""
    return _clean(value)
