"""Fit a site profile on a site's labelled images, and estimate honestly what it does.

The fit has two parts, both on the model's **raw** scores of the site's images:

1. a calibration map, chosen by :func:`cxr_pipeline.model.calibration.select_calibration`
   (temperature, Platt or isotonic, by patient-grouped out-of-fold log loss, then refitted
   on every image);
2. a threshold on the calibrated scale for a target sensitivity, chosen **conservatively**.
   Setting it at exactly the target on the fitting images gives, on new patients, a
   sensitivity that falls below the target about half the time, and a few COVID-19 images
   either way move it by percents at a site's sample sizes. So the threshold is the k-th
   lowest calibrated probability of the site's COVID-19 images, with k the largest rank for
   which a distribution-free tolerance bound holds: the share of new COVID-19 images
   scoring below the k-th lowest of n is Beta(k, n + 1 - k) distributed whatever the score
   distribution, and k is chosen so that this share is at most ``1 - target`` with
   probability ``confidence`` (default 0.8). With ``confidence = 0.5`` it is about the
   plain choice. Fewer COVID-19 images give a lower (more cautious) threshold; when even the
   lowest cannot assure the target, the profile says so (``assured = false``).
   The bound assumes independent images; a patient's images are not (on the shared
   ieee8023 images, a patient with five radiographs all scoring low is five misses at
   once), so n is the *effective* number of COVID-19 images: divided by the Kish design
   effect ``1 + (m - 1) * icc``, with ``m`` the image-weighted mean number of images per
   patient and ``icc`` the intra-patient correlation of the scores' ranks. The rank found
   for the effective n is carried over to the images as the same quantile.

What the profile reports is **cross-fitted by patient**: the site's patients are split into
folds, a whole profile (map, selection and threshold) is fitted without each fold and
applied to it, so every image's probability and decision come from a profile that never
saw its patient. Sensitivity, specificity (Wilson intervals), ECE, Brier score and log loss
are computed on those, which estimates what the profile fitted on all images will do on the
site's next patients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy.stats import beta

from cxr_pipeline.model.calibration import Calibration, Selection, select_calibration
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.model.site_profile import SiteProfile
from training.validate.stats import (
    CalibrationFigures,
    Decision,
    auc,
    calibration_figures,
    decision,
)

DEFAULT_TARGET_SENSITIVITY = 0.95
DEFAULT_CONFIDENCE = 0.8
MIN_PATIENTS_PER_CLASS = 5
"""Fewer patients of a class leave no folds to cross-fit or choose a map on."""


class ProfileError(ValueError):
    """The labelled images cannot support a site profile (the message says why)."""


def tolerance_rank(n_positive: int, target: float, confidence: float) -> tuple[int, bool]:
    """Rank (1 = lowest) of the COVID-19 score to put the threshold at.

    Parameters
    ----------
    n_positive
        COVID-19 images the threshold is chosen on.
    target
        Sensitivity wanted on new images, in (0, 1].
    confidence
        Probability, over the sampling of the site's images, that the threshold reaches it.

    Returns
    -------
    tuple of (int, bool)
        The largest rank ``k`` with ``P(Beta(k, n + 1 - k) <= 1 - target) >= confidence``
        and True; ``(1, False)`` when not even the lowest score assures the target.
    """
    if n_positive < 1:
        raise ProfileError("no COVID-19 images to choose a threshold on")
    if not 0.0 < target <= 1.0 or not 0.0 < confidence < 1.0:
        raise ProfileError("target sensitivity must be in (0, 1] and confidence in (0, 1)")
    best = 0
    for k in range(1, n_positive + 1):
        if beta.cdf(1.0 - target, k, n_positive + 1 - k) >= confidence:
            best = k
        else:
            break  # the probability falls as k grows
    return (best, True) if best else (1, False)


def design_effect(values: Any, groups: Sequence[str]) -> float:
    """Kish design effect ``1 + (m - 1) * icc`` of values clustered by patient.

    ``icc`` is the one-way ANOVA intra-class correlation of the values' ranks (clipped to
    [0, 1]; ranks, so a few extreme scores do not dominate), ``m`` the image-weighted mean
    cluster size ``sum(m_c^2) / n``.

    Parameters
    ----------
    values
        One value per image (e.g. the COVID-19 images' probabilities).
    groups
        Patient of each image.

    Returns
    -------
    float
        At least 1; exactly 1 when every patient has one image.
    """
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    _, inverse = np.unique(np.asarray(list(groups), dtype=object).astype(str),
                           return_inverse=True)
    sizes = np.bincount(inverse).astype(np.float64)
    c, n = sizes.size, v.size
    if n < 3 or c < 2 or c == n:
        return 1.0
    r = rankdata(v) / (n + 1)
    means = np.bincount(inverse, weights=r) / sizes
    between = float(np.sum(sizes * (means - r.mean()) ** 2)) / (c - 1)
    within = float(np.sum((r - means[inverse]) ** 2)) / (n - c)
    m0 = (n - float(np.sum(sizes**2)) / n) / (c - 1)
    denominator = between + (m0 - 1.0) * within
    icc = (between - within) / denominator if denominator > 0 else 0.0
    icc = min(max(icc, 0.0), 1.0)
    return 1.0 + (float(np.sum(sizes**2)) / n - 1.0) * icc


def choose_threshold(
    probabilities: Any,
    labels: Any,
    target: float,
    confidence: float,
    groups: Sequence[str] | None = None,
) -> tuple[float, bool]:
    """Threshold on the calibrated scale for ``target`` sensitivity (see the module text).

    Parameters
    ----------
    probabilities, labels
        Calibrated probabilities and 0/1 labels of the fitting images.
    target, confidence
        See :func:`tolerance_rank`.
    groups
        Patient of each image (None: every image its own patient).

    Returns
    -------
    tuple of (float, bool)
        The threshold (the chosen COVID-19 image's probability: ``>=`` flags it and every
        higher one) and whether the target is assured at ``confidence``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    positives = np.sort(p[y == 1])
    n = int(positives.size)
    effective = n
    if groups is not None and n:
        g = np.asarray(list(groups), dtype=object).astype(str)
        effective = max(1, math.floor(n / design_effect(p[y == 1], list(g[y == 1]))))
    k, assured = tolerance_rank(effective, target, confidence)
    # The same quantile among the images: rank k of `effective` sits at k / (effective + 1).
    rank = max(1, math.floor(k / (effective + 1) * (n + 1))) if effective < n else k
    return float(positives[rank - 1]), assured


@dataclass(frozen=True)
class OperatingFit:
    """A calibration map and a threshold fitted on one set of images."""

    calibration: Calibration
    threshold: float
    assured: bool
    selection: Selection


def fit_operating_point(
    scores: Any,
    labels: Any,
    groups: Sequence[str],
    *,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    fitted_on: str = "",
) -> OperatingFit:
    """Fit the map (chosen by patient-grouped out-of-fold log loss) and the threshold.

    Parameters
    ----------
    scores
        Raw model scores.
    labels
        1 for COVID-19, 0 otherwise.
    groups
        Patient of each image.
    target, confidence
        See :func:`choose_threshold`.
    seed
        Fold shuffling of the map selection.
    fitted_on
        Description stored in the map.

    Returns
    -------
    OperatingFit
        Map, threshold and the selection's out-of-fold losses.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    selection = select_calibration(s, y, groups=list(groups), seed=seed, fitted_on=fitted_on)
    calibration = selection.calibration
    threshold, assured = choose_threshold(calibration.apply(s), y, target, confidence, groups)
    return OperatingFit(calibration, threshold, assured, selection)


@dataclass
class CrossFit:
    """A profile's figures on patients it was not fitted on.

    Attributes
    ----------
    probabilities
        Each image's calibrated probability from the fold's profile.
    flagged
        Each image's decision from the fold's profile.
    decision
        Sensitivity and specificity of those decisions.
    calibration
        ECE, Brier score, log loss, reliability bins of those probabilities.
    auc
        AUC of the cross-fitted probabilities.
    folds
        Number of patient folds.
    fold_thresholds
        The threshold each fold's profile chose.
    """

    probabilities: np.ndarray
    flagged: np.ndarray
    decision: Decision
    calibration: CalibrationFigures
    auc: float
    folds: int
    fold_thresholds: list[float] = field(default_factory=list)


def _check_patients(labels: np.ndarray, groups: np.ndarray) -> None:
    for cls, name in ((1, "COVID-19"), (0, "non-COVID")):
        n = len(np.unique(groups[labels == cls]))
        if n < MIN_PATIENTS_PER_CLASS:
            raise ProfileError(
                f"only {n} patient(s) with {name} images: a site profile needs at least "
                f"{MIN_PATIENTS_PER_CLASS} patients of each class to be fitted and checked"
            )


def cross_fit(
    scores: Any,
    labels: Any,
    groups: Sequence[str],
    *,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    confidence: float = DEFAULT_CONFIDENCE,
    n_splits: int = 5,
    seed: int = 0,
) -> CrossFit:
    """Fit a profile without each patient fold and apply it to that fold.

    Parameters
    ----------
    scores, labels, groups
        Raw scores, 0/1 labels and patients.
    target, confidence
        As for :func:`fit_operating_point`.
    n_splits, seed
        Patient folds (fewer when a class has fewer patients) and their shuffle.

    Returns
    -------
    CrossFit
        Cross-fitted probabilities, decisions and their figures.

    Raises
    ------
    ProfileError
        Too few patients of a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    g = np.asarray(list(groups), dtype=object).astype(str)
    _check_patients(y, g)
    k = max(2, min(n_splits, *(len(np.unique(g[y == c])) for c in (0, 1))))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probabilities = np.empty_like(s)
    flagged = np.zeros(s.shape, dtype=bool)
    thresholds: list[float] = []
    for train, test in splitter.split(np.zeros(s.size), y, g):
        fit = fit_operating_point(
            s[train], y[train], list(g[train]), target=target, confidence=confidence, seed=seed
        )
        probabilities[test] = fit.calibration.apply(s[test])
        flagged[test] = probabilities[test] >= fit.threshold
        thresholds.append(fit.threshold)
    return CrossFit(
        probabilities=probabilities,
        flagged=flagged,
        decision=decision(flagged, y, list(g)),
        calibration=calibration_figures(probabilities, y),
        auc=auc(probabilities, y),
        folds=k,
        fold_thresholds=thresholds,
    )


def fit_site_profile(
    scores: Any,
    labels: Any,
    groups: Sequence[str],
    card: ModelCard,
    *,
    site: str,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    notes: str = "",
) -> tuple[SiteProfile, CrossFit]:
    """Fit a site profile on all images and cross-fit its figures.

    Parameters
    ----------
    scores, labels, groups
        Raw scores of the site's analysed images, 0/1 labels, patients.
    card
        The model the scores came from (the profile belongs to it).
    site
        The site's name.
    target, confidence
        Target sensitivity and the confidence of reaching it on new patients.
    seed
        Fold shuffling.
    notes
        Stored in the profile.

    Returns
    -------
    tuple of (SiteProfile, CrossFit)
        The profile (its figures are the cross-fitted ones) and the cross-fit itself.

    Raises
    ------
    ProfileError
        Too few patients of a class, or an invalid target/confidence.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    g = [str(v) for v in groups]
    crossed = cross_fit(s, y, g, target=target, confidence=confidence, seed=seed)
    n_patients = len(set(g))
    fit = fit_operating_point(
        s, y, g, target=target, confidence=confidence, seed=seed,
        fitted_on=f"site {site}: {s.size} images of {n_patients} patients",
    )
    apparent = decision(fit.calibration.apply(s) >= fit.threshold, y, g)
    d, c = crossed.decision, crossed.calibration
    figures: dict[str, float] = {
        "sensitivity": d.sensitivity,
        "sensitivity_ci_low": d.sensitivity_ci[0],
        "sensitivity_ci_high": d.sensitivity_ci[1],
        "specificity": d.specificity,
        "specificity_ci_low": d.specificity_ci[0],
        "specificity_ci_high": d.specificity_ci[1],
        "ece": c.ece,
        "brier": c.brier,
        "log_loss": c.log_loss,
        "auc": crossed.auc,
        "folds": float(crossed.folds),
        "apparent_sensitivity": apparent.sensitivity,
        "apparent_specificity": apparent.specificity,
        "threshold_assured": float(fit.assured),
    }
    for method, loss in fit.selection.out_of_fold_log_loss.items():
        figures[f"out_of_fold_log_loss_{method}"] = loss
    profile = SiteProfile(
        site=site,
        model_name=card.name,
        model_version=card.version,
        device_uid=card.device_uid,
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
        calibration=fit.calibration,
        threshold=fit.threshold,
        target_sensitivity=target,
        threshold_confidence=confidence,
        data={
            "n": int(s.size),
            "n_covid": int(y.sum()),
            "n_non_covid": int(s.size - y.sum()),
            "n_patients": n_patients,
        },
        figures={k: float(v) for k, v in figures.items() if not math.isnan(float(v))},
        notes=notes,
    )
    return profile, crossed
