"""Classification metrics in the paper's form, with exact and bootstrap intervals.

The decision rule is the paper's: a probability ``p >= cut-off`` is COVID-positive.
Sensitivity and specificity carry 95% exact (Clopper-Pearson) intervals; the ROC AUC a
stratified bootstrap percentile interval. Labels are 1 for COVID, 0 for non-COVID.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

PAPER_CUTOFFS: tuple[float, ...] = (0.1, 0.2, 0.3)
"""Cut-offs of the paper's sensitivity/specificity table."""


def _arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-COVID) or 1 (COVID)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
    """Exact binomial confidence interval of a proportion.

    Parameters
    ----------
    successes, trials
        Observed count and number of trials; ``trials == 0`` gives ``(nan, nan)``.
    confidence
        Two-sided confidence level.

    Returns
    -------
    tuple of float
        Lower and upper bound.
    """
    if trials == 0:
        return (math.nan, math.nan)
    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence,
                                                     method="exact")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates at one cut-off (``p >= cutoff`` is COVID)."""

    cutoff: float
    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]

    @property
    def confusion(self) -> np.ndarray:
        """2x2 matrix, rows = true (non-COVID, COVID), columns = predicted."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)


def operating_point(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                    cutoff: float, confidence: float = 0.95) -> OperatingPoint:
    """Sensitivity and specificity (with exact intervals) at one cut-off."""
    s, y = _arrays(scores, labels)
    pred = s >= cutoff
    tp = int(np.sum(pred & (y == 1)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    pos, neg = tp + fn, tn + fp
    return OperatingPoint(
        cutoff=float(cutoff), tp=tp, fn=fn, tn=tn, fp=fp,
        sensitivity=tp / pos if pos else math.nan,
        sensitivity_ci=clopper_pearson(tp, pos, confidence),
        specificity=tn / neg if neg else math.nan,
        specificity_ci=clopper_pearson(tn, neg, confidence),
    )


def threshold_for_sensitivity(scores: Sequence[float] | np.ndarray,
                              labels: Sequence[int] | np.ndarray, target: float = 0.98) -> float:
    """Highest cut-off whose sensitivity (``p >= cut-off``) reaches ``target``.

    The ``ceil(target * positives)``-th highest COVID score: every higher cut-off misses
    the target, this one meets it with the best specificity.

    Raises
    ------
    ValueError
        No COVID sample, or ``target`` outside (0, 1].
    """
    s, y = _arrays(scores, labels)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity {target} outside (0, 1]")
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("no COVID samples to choose a threshold on")
    k = math.ceil(target * pos.size - 1e-9)
    return float(pos[k - 1])


@dataclass(frozen=True)
class Curve:
    """A ROC or PR curve: x, y and the thresholds."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray


def roc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
        ) -> tuple[Curve, float]:
    """ROC curve (x = 1 - specificity, y = sensitivity) and its AUC (scikit-learn)."""
    s, y = _arrays(scores, labels)
    fpr, tpr, thr = roc_curve(y, s)
    return Curve(fpr, tpr, thr), float(roc_auc_score(y, s))


def precision_recall(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
                     ) -> tuple[Curve, float]:
    """PR curve (x = recall, y = precision) and average precision (scikit-learn)."""
    s, y = _arrays(scores, labels)
    precision, recall, thr = precision_recall_curve(y, s)
    return Curve(recall, precision, thr), float(average_precision_score(y, s))


def bootstrap_auc_ci(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                     *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
                     ) -> tuple[float, float]:
    """Stratified bootstrap percentile interval of the ROC AUC.

    Positives and negatives are resampled separately (class counts fixed), so every
    resample has both classes.
    """
    s, y = _arrays(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_resamples)
    yy = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    for i in range(n_resamples):
        sample = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        aucs[i] = roc_auc_score(yy, sample)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(aucs, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))
