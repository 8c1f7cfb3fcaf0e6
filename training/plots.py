"""Evaluation and training figures.

Figures are built with :class:`matplotlib.figure.Figure` directly (rendered by the Agg
canvas): no pyplot global state, no display needed, safe in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from training.metrics import Curve


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_roc(curve: Curve, auc: float, auc_ci: tuple[float, float], path: Path,
             title: str = "ROC") -> Path:
    """ROC curve with its AUC and bootstrap interval in the legend."""
    fig = Figure(figsize=(5, 5), layout="tight")
    ax = fig.subplots()
    ax.plot(curve.x, curve.y, lw=2,
            label=f"AUC {auc:.3f} (95% CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title,
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(curve: Curve, ap: float, prevalence: float, path: Path,
            title: str = "Precision-recall") -> Path:
    """Precision-recall curve with average precision and the chance level."""
    fig = Figure(figsize=(5, 5), layout="tight")
    ax = fig.subplots()
    ax.plot(curve.x, curve.y, lw=2, label=f"AP {ap:.3f}")
    ax.axhline(prevalence, ls="--", c="grey", lw=1, label=f"prevalence {prevalence:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=title,
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float, path: Path,
                   title: str = "COVID probability by class") -> Path:
    """Score histograms of both classes (log counts, as the paper's figure)."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    bins = [i / 40 for i in range(41)]
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="non-COVID", log=True)
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="COVID", log=True)
    ax.axvline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="predicted COVID probability", ylabel="images (log)", title=title)
    ax.legend()
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, threshold: float, path: Path) -> Path:
    """2x2 confusion matrix (rows true, columns predicted) with counts."""
    fig = Figure(figsize=(4, 4), layout="tight")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    names = ("non-COVID", "COVID")
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(xlabel="predicted", ylabel="true", title=f"cut-off {threshold:.3f}")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black")
    return _save(fig, path)


@dataclass(frozen=True)
class ReliabilityPanel:
    """One panel of a reliability diagram: raw and calibrated probabilities of a group."""

    title: str
    raw: np.ndarray
    calibrated: np.ndarray
    labels: np.ndarray
    ece_before: float
    ece_after: float


def _reliability_points(p: np.ndarray, y: np.ndarray, n_bins: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probability, observed COVID fraction and count of every non-empty bin.

    The bins are scikit-learn's ``calibration_curve(strategy="uniform")`` bins; the counts
    (which it does not return) size the markers.
    """
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    used = [b for b in range(n_bins) if (bins == b).any()]
    mean_p = np.array([p[bins == b].mean() for b in used])
    observed = np.array([y[bins == b].mean() for b in used])
    counts = np.array([(bins == b).sum() for b in used])
    return mean_p, observed, counts


def plot_reliability(panels: Sequence[ReliabilityPanel], path: Path, *, n_bins: int = 10
                     ) -> Path:
    """Reliability diagrams, one panel per group: observed COVID fraction per probability bin.

    Each panel shows the raw score ("before") and the calibrated probability ("after"),
    marker area proportional to the images in the bin, with the ECE of each in the legend.
    """
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows), layout="tight")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        y = np.asarray(panel.labels, dtype=np.float64)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        for p, name, ece, colour in ((panel.raw, "before (raw score)", panel.ece_before, "C0"),
                                     (panel.calibrated, "after (calibrated)", panel.ece_after,
                                      "C1")):
            mean_p, observed, counts = _reliability_points(np.asarray(p, float), y, n_bins)
            ax.plot(mean_p, observed, c=colour, lw=1.5, label=f"{name}, ECE {ece:.3f}")
            ax.scatter(mean_p, observed, s=8 + 120 * counts / max(len(y), 1), c=colour)
        ax.set(xlabel="predicted COVID probability", ylabel="observed COVID fraction",
               title=panel.title, xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_history(history: Sequence[dict[str, float]], best_epoch: int, path: Path) -> Path:
    """Training and validation loss and validation AUC per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_auc"] for h in history], c="C2", label="validation AUC")
    ax2.set(ylabel="AUC", ylim=(0, 1.02))
    ax.axvline(best_epoch, c="k", ls=":", lw=1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    return _save(fig, path)
