"""Figures of the local validation report (matplotlib ``Figure`` objects, Agg, no pyplot).

- ROC curve of the raw scores, with the operating points marked;
- reliability diagram: observed COVID-19 frequency against mean probability per bin, for
  the model card's probability and (when fitted) the site profile's cross-fitted one;
- score histogram by class with the threshold;
- a one-row summary of the three, small enough for a README.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from training.validate.stats import CalibrationFigures


@dataclass(frozen=True)
class Point:
    """An operating point to mark on the ROC curve (rates, not thresholds)."""

    label: str
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class Reliability:
    """One reliability curve to draw."""

    label: str
    figures: CalibrationFigures


def _roc(ax: Axes, scores: np.ndarray, labels: np.ndarray, auc: float,
         auc_ci: tuple[float, float], points: Sequence[Point]) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.3f} ({auc_ci[0]:.3f}-{auc_ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for i, p in enumerate(points):
        ax.plot(1 - p.specificity, p.sensitivity, marker="os^"[i % 3], ms=8, ls="none",
                label=p.label)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (patient-bootstrap CI)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize="small")


def _reliability(ax: Axes, curves: Sequence[Reliability]) -> None:
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    for curve in curves:
        f = curve.figures
        ax.plot(f.bin_mean_probability, f.bin_frequency, marker="o",
                label=f"{curve.label} (ECE {f.ece:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed COVID-19 frequency",
           title="Reliability (10 bins)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize="small")


def _histogram(ax: Axes, probabilities: np.ndarray, labels: np.ndarray, threshold: float,
               what: str) -> None:
    bins = [i / 40 for i in range(41)]
    ax.hist(probabilities[labels == 0], bins=bins, alpha=0.6, label="non-COVID", log=True)
    ax.hist(probabilities[labels == 1], bins=bins, alpha=0.6, label="COVID-19", log=True)
    ax.axvline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel=what, ylabel="images (log)", title="Probabilities by class")
    ax.legend(fontsize="small")


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def write_plots(
    out: Path,
    *,
    scores: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    auc: float,
    auc_ci: tuple[float, float],
    points: Sequence[Point],
    curves: Sequence[Reliability],
) -> dict[str, str]:
    """Write ``roc.png``, ``reliability.png``, ``probabilities.png`` and ``summary.png``.

    Parameters
    ----------
    out
        Folder for the PNG files.
    scores
        Raw scores (the ROC curve).
    probabilities, threshold
        The model card's calibrated probabilities and threshold (the histogram).
    labels
        1 for COVID-19, 0 otherwise.
    auc, auc_ci
        For the legend.
    points
        Operating points to mark.
    curves
        Reliability curves.

    Returns
    -------
    dict
        Figure name -> file name (relative to ``out``).
    """
    written: dict[str, Any] = {}
    what = "COVID-19 probability (model card)"
    fig = Figure(figsize=(5, 5), layout="tight")
    _roc(fig.subplots(), scores, labels, auc, auc_ci, points)
    written["roc"] = _save(fig, out / "roc.png")
    fig = Figure(figsize=(5, 5), layout="tight")
    _reliability(fig.subplots(), curves)
    written["reliability"] = _save(fig, out / "reliability.png")
    fig = Figure(figsize=(6, 4), layout="tight")
    _histogram(fig.subplots(), probabilities, labels, threshold, what)
    written["probabilities"] = _save(fig, out / "probabilities.png")
    fig = Figure(figsize=(12, 3.8), layout="tight")
    a, b, c = fig.subplots(1, 3)
    _roc(a, scores, labels, auc, auc_ci, points)
    _reliability(b, curves)
    _histogram(c, probabilities, labels, threshold, what)
    written["summary"] = _save(fig, out / "summary.png", dpi=72)
    return {name: path.name for name, path in written.items()}
