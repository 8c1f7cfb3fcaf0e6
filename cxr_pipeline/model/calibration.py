"""Calibrated probability: a monotone map from the model's raw score to a probability.

The softmax output of a network trained on a class-balanced, augmented set is a ranking
score, not the chance that the image shows COVID-19 at a given site: the default model's
scores were under-confident in the middle (images scored 0.1-0.5 were 67-82 % COVID-19 on a
held-out set). A :class:`Calibration` fitted on labelled images that the network did not
train on (the validation split for the packaged card, a site's own images for a site
profile) maps the score to a probability that matches observed frequencies.

Three standard maps, all monotone non-decreasing so the ranking (and so the AUC) is kept:

- ``temperature``: ``sigmoid(logit(s) / T)``, one parameter (Guo et al., 2017);
- ``platt``: ``sigmoid(a * logit(s) + b)``, logistic regression on the logit (Platt, 1999);
- ``isotonic``: scikit-learn's ``IsotonicRegression``, stored as its knots and applied by
  linear interpolation between them.

:func:`select_calibration` chooses among them by log loss measured out of fold (patient-
grouped folds when patient ids are given), then refits the chosen map on all rows, so the
choice is not won by the most flexible map memorising the rows it is scored on.

The decision threshold is kept on the same (calibrated) scale: :class:`OperatingPoint`
holds a calibration, the threshold on its output, and what set them (the model card or a
site profile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_pipeline.errors import CheckpointError

CALIBRATION_METHODS: tuple[str, ...] = ("identity", "temperature", "platt", "isotonic")
"""Values of :attr:`Calibration.method`."""
FIT_METHODS: tuple[str, ...] = ("temperature", "platt", "isotonic")
"""The maps :func:`select_calibration` chooses among."""
PROBABILITY_FLOOR = 1e-4
"""Calibrated probabilities are kept within [floor, 1 - floor]: an isotonic step that saw
only one class must not claim certainty (and an infinite log loss) on a new image."""
_SCORE_EPS = 1e-7


def _logit(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float64), _SCORE_EPS, 1.0 - _SCORE_EPS)
    out: np.ndarray = np.log(s) - np.log1p(-s)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic
    return out


@dataclass(frozen=True)
class Calibration:
    """A fitted monotone map from raw score to probability.

    Attributes
    ----------
    method
        One of :data:`CALIBRATION_METHODS`; ``identity`` leaves scores as they are.
    slope, intercept
        ``temperature`` (``slope = 1 / T``, ``intercept = 0``) and ``platt``: the map is
        ``sigmoid(slope * logit(score) + intercept)``.
    knots_x, knots_y
        ``isotonic``: the fitted step function's knots (scores, probabilities), applied by
        linear interpolation and held constant beyond the ends.
    fitted_on
        What it was fitted on, in words (e.g. ``"validation split, 215 images"``).
    n
        Number of labelled images it was fitted on.
    """

    method: str = "identity"
    slope: float = 1.0
    intercept: float = 0.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    fitted_on: str = ""
    n: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}")
        if self.method == "isotonic" and (
            len(self.knots_x) < 2 or len(self.knots_x) != len(self.knots_y)
        ):
            raise ValueError("isotonic calibration needs at least two knots of each kind")
        if self.method in ("temperature", "platt") and not self.slope > 0.0:
            raise ValueError("calibration slope must be positive (the map must keep the order)")

    def apply(self, scores: Any) -> np.ndarray:
        """Map raw scores (any shape) to calibrated probabilities (float64, same shape).

        Parameters
        ----------
        scores
            Raw model scores in [0, 1].

        Returns
        -------
        numpy.ndarray
            Probabilities; within ``[PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]`` for any
            fitted map, the scores unchanged for ``identity``.
        """
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "identity":
            return s.copy()
        if self.method == "isotonic":
            out = np.interp(s, np.asarray(self.knots_x), np.asarray(self.knots_y))
        else:
            out = _sigmoid(self.slope * _logit(s) + self.intercept)
        clipped: np.ndarray = np.clip(out, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
        return clipped

    def apply_one(self, score: float) -> float:
        """:meth:`apply` for one score."""
        return float(self.apply(np.asarray([score]))[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly form (lists for the knots)."""
        return {
            "method": self.method,
            "slope": self.slope,
            "intercept": self.intercept,
            "knots_x": list(self.knots_x),
            "knots_y": list(self.knots_y),
            "fitted_on": self.fitted_on,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Rebuild from :meth:`to_dict` output.

        Raises
        ------
        CheckpointError
            Unknown keys, wrong types or an invalid map.
        """
        try:
            values = dict(data)
            return cls(
                method=str(values.pop("method", "identity")),
                slope=float(values.pop("slope", 1.0)),
                intercept=float(values.pop("intercept", 0.0)),
                knots_x=tuple(float(v) for v in values.pop("knots_x", ())),
                knots_y=tuple(float(v) for v in values.pop("knots_y", ())),
                fitted_on=str(values.pop("fitted_on", "")),
                n=int(values.pop("n", 0)),
                **values,
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid calibration: {exc}") from exc


IDENTITY = Calibration()


def _check_rows(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isfinite(s).all() or ((s < 0) | (s > 1)).any():
        raise ValueError("scores must be finite and within [0, 1]")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("calibration needs labelled images of both classes")
    return s, y


def fit_calibration(
    scores: Any, labels: Any, method: str, *, fitted_on: str = ""
) -> Calibration:
    """Fit one calibration map.

    Parameters
    ----------
    scores
        Raw model scores in [0, 1].
    labels
        1 for COVID-19, 0 otherwise; both classes must be present.
    method
        ``temperature``, ``platt``, ``isotonic`` or ``identity``.
    fitted_on
        Description stored with the map.

    Returns
    -------
    Calibration
        The fitted map.

    Raises
    ------
    ValueError
        Unknown method, mismatched or invalid rows, one class only.
    """
    s, y = _check_rows(scores, labels)
    n = int(s.size)
    if method == "identity":
        return Calibration(fitted_on=fitted_on, n=n)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
        xs = np.asarray(iso.X_thresholds_, dtype=np.float64)
        ys = np.asarray(iso.y_thresholds_, dtype=np.float64)
        if xs.size < 2:  # every score equal: a constant map
            xs, ys = np.array([0.0, 1.0]), np.array([ys[0], ys[0]])
        return Calibration(
            method="isotonic",
            knots_x=tuple(float(v) for v in xs),
            knots_y=tuple(float(v) for v in ys),
            fitted_on=fitted_on,
            n=n,
        )
    z = _logit(s)
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        def loss(log_slope: float) -> float:
            return _log_loss(y, _sigmoid(math.exp(log_slope) * z))

        best = minimize_scalar(loss, bounds=(-6.0, 6.0), method="bounded")
        return Calibration(
            method="temperature", slope=math.exp(float(best.x)), fitted_on=fitted_on, n=n
        )
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Unpenalised logistic regression on the logit, as Platt scaling is defined.
        model = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], y)
        slope = float(model.coef_[0, 0])
        if slope <= 0.0:  # scores that do not rank at all: fall back to a constant-free map
            return fit_calibration(s, y, "temperature", fitted_on=fitted_on)
        return Calibration(
            method="platt",
            slope=slope,
            intercept=float(model.intercept_[0]),
            fitted_on=fitted_on,
            n=n,
        )
    raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, 1e-12, 1.0 - 1e-12)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def log_loss(probabilities: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the labels (natural log; probabilities clipped 1e-12).

    Parameters
    ----------
    probabilities
        Predicted COVID-19 probabilities.
    labels
        1 for COVID-19, 0 otherwise.

    Returns
    -------
    float
        The log loss.
    """
    return _log_loss(np.asarray(labels, dtype=np.float64), np.asarray(probabilities, float))


def expected_calibration_error(probabilities: Any, labels: Any, n_bins: int = 10) -> float:
    """Compute the expected calibration error with ``n_bins`` equal-width bins over [0, 1].

    ``sum_b (n_b / n) * |mean(label in b) - mean(probability in b)|``, the usual definition
    (Naeini et al., 2015; Guo et al., 2017). Written here because scikit-learn has the
    reliability curve (``calibration_curve``) but no ECE; the bins match its ``uniform``
    strategy (a probability of exactly 1 falls in the last bin).

    Parameters
    ----------
    probabilities
        Predicted probabilities in [0, 1].
    labels
        1 for the positive class, 0 otherwise.
    n_bins
        Number of bins.

    Returns
    -------
    float
        ECE in [0, 1]; NaN for no rows.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.sum() / p.size * abs(float(y[mask].mean()) - float(p[mask].mean()))
    return float(total)  # a Python float: numpy scalars do not load with weights_only


def brier_score(probabilities: Any, labels: Any) -> float:
    """Brier score (scikit-learn's ``brier_score_loss``): mean squared error of the probability.

    Parameters
    ----------
    probabilities
        Predicted probabilities in [0, 1].
    labels
        1 for the positive class, 0 otherwise.

    Returns
    -------
    float
        The Brier score.
    """
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(labels), np.asarray(probabilities, float)))


@dataclass(frozen=True)
class Selection:
    """What :func:`select_calibration` chose, and the out-of-fold log loss of every map."""

    calibration: Calibration
    out_of_fold_log_loss: dict[str, float] = field(default_factory=dict)


def _folds(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> list[Any]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    per_class = int(min(np.bincount(y, minlength=2)))
    if groups is not None:
        n_groups = min(len(np.unique(groups[y == c])) for c in (0, 1))
        k = max(2, min(n_splits, n_groups))
        splitter: Any = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(y.size), y, groups))
    k = max(2, min(n_splits, per_class))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(y.size), y))


def out_of_fold(
    scores: Any,
    labels: Any,
    method: str,
    *,
    groups: Sequence[str] | None = None,
    n_splits: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Calibrated probabilities for every row from a map fitted on the other folds.

    Parameters
    ----------
    scores, labels
        Raw scores and 0/1 labels.
    method
        Which map to fit in each fold.
    groups
        Patient ids: a patient's rows stay in one fold.
    n_splits, seed
        Folds (fewer when a class has fewer patients) and their shuffle.

    Returns
    -------
    numpy.ndarray
        One probability per row, each from a map that never saw that row's patient.
    """
    s, y = _check_rows(scores, labels)
    g = None if groups is None else np.asarray(list(groups))
    out = np.empty_like(s)
    for train, test in _folds(y, g, n_splits, seed):
        if len(np.unique(y[train])) < 2:
            out[test] = float(y[train].mean())
            continue
        out[test] = fit_calibration(s[train], y[train], method).apply(s[test])
    return out


def select_calibration(
    scores: Any,
    labels: Any,
    *,
    groups: Sequence[str] | None = None,
    methods: Sequence[str] = FIT_METHODS,
    n_splits: int = 5,
    seed: int = 0,
    fitted_on: str = "",
) -> Selection:
    """Choose the map with the lowest out-of-fold log loss and refit it on all rows.

    Parameters
    ----------
    scores, labels
        Raw scores and 0/1 labels (both classes).
    groups
        Patient ids for patient-grouped folds.
    methods
        Candidates (default: temperature, Platt, isotonic).
    n_splits, seed
        Cross-validation folds and shuffle.
    fitted_on
        Description stored with the chosen map.

    Returns
    -------
    Selection
        The refitted map and each candidate's out-of-fold log loss.
    """
    s, y = _check_rows(scores, labels)
    losses = {
        m: log_loss(out_of_fold(s, y, m, groups=groups, n_splits=n_splits, seed=seed), y)
        for m in methods
    }
    best = min(losses, key=lambda m: (losses[m], methods.index(m)))
    return Selection(fit_calibration(s, y, best, fitted_on=fitted_on), losses)


@dataclass(frozen=True)
class OperatingPoint:
    """How a raw score becomes the reported probability and the decision.

    Attributes
    ----------
    calibration
        Raw score -> probability.
    threshold
        Decision threshold on the calibrated scale: probability >= threshold is flagged.
    source
        What set it, for the SR and reports: ``"model card"`` or ``"site profile"``.
    name
        The card's ``NAME VERSION`` or the profile's site name.
    target_sensitivity
        The sensitivity the threshold was chosen for, when it was (e.g. 0.98).
    """

    calibration: Calibration
    threshold: float
    source: str = "model card"
    name: str = ""
    target_sensitivity: float | None = None

    def probability(self, score: float) -> float:
        """Calibrated probability of one raw score."""
        return self.calibration.apply_one(score)
