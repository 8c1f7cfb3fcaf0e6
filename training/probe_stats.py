"""The linear probe's model and statistics (``cxr-probe``, :mod:`training.probe`).

scikit-learn does the fitting (``StandardScaler`` + class-balanced ``LogisticRegression``)
and the patient-grouped folds (``StratifiedGroupKFold``); the AUC interval is
:func:`training.metrics.bootstrap_auc_ci`. The paired bootstrap resamples whole patients,
because images of one patient are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from training.metrics import bootstrap_auc_ci

Views = tuple[np.ndarray, np.ndarray]
"""Features of the images and of their left-right flips, row for row."""

_NAN_CI = (math.nan, math.nan)


def json_number(value: float) -> float | None:
    """``value``, or None where it is NaN (a figure that could not be computed).

    Strict JSON has no NaN; every JSON-ready dict of this module goes through here.
    """
    return None if math.isnan(value) else value


def fit_probe(features: Views, labels: np.ndarray, *, c: float) -> Pipeline:
    """Fit the probe on both views (each image counts twice, once per view).

    Parameters
    ----------
    features
        ``(plain, flipped)`` feature arrays.
    labels
        1 COVID, 0 non-COVID.
    c
        Inverse L2 regularisation strength.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Standardisation and logistic regression.
    """
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=c, max_iter=5000, class_weight="balanced"))
    model.fit(np.concatenate(features), np.concatenate([labels, labels]))
    return model


def probe_scores(model: Pipeline, features: Views) -> np.ndarray:
    """COVID probability: the mean over the plain and flipped views."""
    plain = model.predict_proba(features[0])[:, 1]
    flipped = model.predict_proba(features[1])[:, 1]
    return np.asarray((plain + flipped) / 2.0, dtype=np.float64)


def cross_validated_scores(features: Views, labels: np.ndarray, groups: np.ndarray,
                           sources: np.ndarray, *, c: float, folds: int = 5,
                           seeds: Sequence[int] = (0,)) -> np.ndarray:
    """Out-of-fold scores, patient-grouped and stratified by (source, label).

    Parameters
    ----------
    features
        ``(plain, flipped)`` arrays.
    labels, groups, sources
        Per row: 1/0, patient id, source.
    c
        Inverse regularisation strength.
    folds
        Number of folds.
    seeds
        One fold assignment per seed; the returned scores are their mean.

    Returns
    -------
    numpy.ndarray
        Each row scored by probes that never saw its patient.

    Raises
    ------
    ValueError
        Fewer patients than folds.
    """
    strata = np.array([f"{s}|{y}" for s, y in zip(sources, labels, strict=True)])
    total = np.zeros(len(labels))
    for seed in seeds:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fit, held in splitter.split(features[0], strata, groups):
            model = fit_probe((features[0][fit], features[1][fit]), labels[fit], c=c)
            total[held] += probe_scores(model, (features[0][held], features[1][held]))
    return total / len(seeds)


@dataclass(frozen=True)
class SourceAucs:
    """AUCs that say where the separation comes from.

    Attributes
    ----------
    overall
        AUC and interval over all rows.
    within
        Per source holding both classes: its AUC and interval (the source cannot help).
    against_single_class
        The positives against the negatives of sources that hold no positives (here NIH):
        the contrast a source shortcut can win.
    n
        Rows, positives.
    """

    overall: tuple[float, tuple[float, float]]
    within: dict[str, tuple[float, tuple[float, float]]] = field(default_factory=dict)
    against_single_class: tuple[float, tuple[float, float]] = (math.nan, _NAN_CI)
    n: tuple[int, int] = (0, 0)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        def one(v: tuple[float, tuple[float, float]]) -> dict[str, Any]:
            return {"auc": json_number(v[0]),
                    "ci": [json_number(v[1][0]), json_number(v[1][1])]}

        return {"overall": one(self.overall),
                "within": {k: one(v) for k, v in self.within.items()},
                "against_single_class": one(self.against_single_class),
                "n": list(self.n)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceAucs:
        """Inverse of :meth:`as_dict`."""
        def num(x: float | None) -> float:
            return math.nan if x is None else float(x)

        def one(v: dict[str, Any]) -> tuple[float, tuple[float, float]]:
            return num(v["auc"]), (num(v["ci"][0]), num(v["ci"][1]))

        return cls(overall=one(data["overall"]),
                   within={k: one(v) for k, v in data["within"].items()},
                   against_single_class=one(data["against_single_class"]),
                   n=(int(data["n"][0]), int(data["n"][1])))

    def describe(self) -> str:
        """One line for the terminal."""
        def fmt(v: tuple[float, tuple[float, float]]) -> str:
            lo, hi = v[1]
            ci = "" if math.isnan(lo) else f" ({lo:.3f}-{hi:.3f})"
            return f"{v[0]:.3f}{ci}"

        parts = [f"AUC {fmt(self.overall)}"]
        parts += [f"within {k} {fmt(v)}" for k, v in self.within.items()]
        parts.append(f"against single-class sources {fmt(self.against_single_class)}")
        return "; ".join(parts)


def _auc(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int
         ) -> tuple[float, tuple[float, float]]:
    if len(set(labels.tolist())) != 2:
        return math.nan, _NAN_CI
    auc = float(roc_auc_score(labels, scores))
    ci = bootstrap_auc_ci(scores, labels, n_resamples=n_bootstrap) if n_bootstrap else _NAN_CI
    return auc, ci


def _masks(labels: np.ndarray, sources: np.ndarray
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows of each two-class source, and positives plus single-class-source negatives."""
    within = {str(s): sources == s for s in sorted(set(sources.tolist()))
              if len(set(labels[sources == s].tolist())) == 2}
    with_positives = set(sources[labels == 1].tolist())
    single = (labels == 1) | ~np.isin(sources, list(with_positives))
    return within, single


def source_aucs(scores: np.ndarray, labels: np.ndarray, sources: np.ndarray, *,
                n_bootstrap: int = 2000) -> SourceAucs:
    """Overall, within-source and against-single-class-source AUCs (stratified bootstrap).

    ``n_bootstrap=0`` skips the intervals (NaN).
    """
    scores = np.asarray(scores, dtype=np.float64)
    within, single = _masks(labels, sources)
    return SourceAucs(
        overall=_auc(scores, labels, n_bootstrap),
        within={k: _auc(scores[m], labels[m], n_bootstrap) for k, m in within.items()},
        against_single_class=_auc(scores[single], labels[single], n_bootstrap),
        n=(len(labels), int(labels.sum())),
    )


def paired_differences(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                       groups: np.ndarray, sources: np.ndarray, *,
                       n_bootstrap: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """AUC(a) - AUC(b) on the same rows, with a patient-level paired bootstrap.

    Returns
    -------
    dict
        ``{"overall": {...}, "within <source>": {...}, ...}``, each with the observed
        ``difference``, the bootstrap ``median`` and the 95% percentile ``ci`` (None where
        no resample held both classes). A group of rows with one class only (no
        single-class source, say) has no entry.
    """
    within, single = _masks(labels, sources)
    candidates = {"overall": np.ones(len(labels), dtype=bool),
                  **{f"within {k}": m for k, m in within.items()},
                  "against single-class sources": single}
    masks = {k: m for k, m in candidates.items() if len(set(labels[m].tolist())) == 2}
    patients = np.unique(groups)
    rows_of = {p: np.flatnonzero(groups == p) for p in patients}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in masks}
    for _ in range(n_bootstrap):
        rows = np.concatenate([rows_of[p] for p in rng.choice(patients, len(patients))])
        for key, mask in masks.items():
            r = rows[mask[rows]]
            if len(set(labels[r].tolist())) == 2:
                draws[key].append(float(roc_auc_score(labels[r], scores_a[r])
                                        - roc_auc_score(labels[r], scores_b[r])))
    out: dict[str, dict[str, Any]] = {}
    for key, mask in masks.items():
        observed = (float(roc_auc_score(labels[mask], scores_a[mask])
                          - roc_auc_score(labels[mask], scores_b[mask])))
        d = np.array(draws[key]) if draws[key] else np.array([math.nan])
        out[key] = {"difference": observed, "median": json_number(float(np.median(d))),
                    "ci": [json_number(float(np.quantile(d, q))) for q in (0.025, 0.975)]}
    return out
