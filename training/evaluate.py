"""``cxr-eval``: test-set evaluation in the paper's form.

For every test image the COVID probability is computed through the deployed inference
path (:class:`cxr_pipeline.model.inference.Predictor`: the same preprocessing and softmax the
pipeline uses). Reported: sensitivity and specificity at the paper's cut-offs and at the
model's own threshold with the paper's rule (``p >= cut-off`` is COVID) and 95% exact
(Clopper-Pearson) intervals; ROC AUC with a stratified bootstrap interval; PR curve and
average precision; confusion matrix; score histograms; the same figures per data source
(the manifest's ``source`` column), because a model may recognise the source rather than
the disease.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr_pipeline.model.inference import Predictor
from training.datasets import DatasetError, Sample, load_image, read_manifest, resolve
from training.metrics import (
    PAPER_CUTOFFS,
    OperatingPoint,
    bootstrap_auc_ci,
    operating_point,
    precision_recall,
    roc,
)
from training.plots import plot_confusion, plot_histogram, plot_pr, plot_roc


@dataclass(frozen=True)
class SourceResult:
    """Figures of one data source at the model's threshold."""

    source: str
    n_covid: int
    n_non_covid: int
    point: OperatingPoint
    auc: float
    mean_score_covid: float
    mean_score_non_covid: float
    auc_ci: tuple[float, float] = (math.nan, math.nan)
    """Bootstrap 95% interval of the within-source AUC (NaN without both classes)."""


@dataclass
class EvaluationReport:
    """Everything ``cxr-eval`` measured on one split."""

    model: str
    threshold: float
    n_covid: int
    n_non_covid: int
    auc: float
    auc_ci: tuple[float, float]
    average_precision: float
    points: list[OperatingPoint]
    at_threshold: OperatingPoint
    per_source: list[SourceResult] = field(default_factory=list)

    @property
    def within_source(self) -> list[SourceResult]:
        """Sources holding both classes: their AUC cannot come from telling sources apart."""
        return [r for r in self.per_source if not math.isnan(r.auc)]

    def card_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Headline figures for the model card's ``metrics``.

        With exactly one source holding both classes (here ieee8023), its AUC and interval
        are added as ``<prefix>within_source_auc`` (``_ci_low``, ``_ci_high``).
        """
        p = self.at_threshold
        metrics = {f"{prefix}auc": self.auc, f"{prefix}auc_ci_low": self.auc_ci[0],
                   f"{prefix}auc_ci_high": self.auc_ci[1],
                   f"{prefix}sensitivity": p.sensitivity, f"{prefix}specificity": p.specificity,
                   f"{prefix}average_precision": self.average_precision}
        if len(self.within_source) == 1:
            r = self.within_source[0]
            metrics.update({f"{prefix}within_source_auc": r.auc,
                            f"{prefix}within_source_auc_ci_low": r.auc_ci[0],
                            f"{prefix}within_source_auc_ci_high": r.auc_ci[1]})
        return metrics


def score_samples(predictor: Predictor, samples: Sequence[Sample], data_dir: Path, *,
                  batch: int = 16, on_image: Callable[[int], None] | None = None
                  ) -> np.ndarray:
    """COVID probability of every sample, through the deployed inference path.

    Images are decoded ``batch`` at a time (full resolution, as the pipeline sees them).
    """
    out: list[np.ndarray] = [np.zeros((0,), dtype=np.float32)]
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        images = [load_image(resolve(s, data_dir)) for s in chunk]
        out.append(np.asarray(predictor.predict_images(images), dtype=np.float32))
        if on_image is not None:
            on_image(len(chunk))
    return np.concatenate(out)


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, *, threshold: float,
                    sources: Sequence[str] | None = None, model: str = "",
                    cutoffs: Sequence[float] = PAPER_CUTOFFS, n_bootstrap: int = 2000,
                    seed: int = 0) -> EvaluationReport:
    """Compute every figure of the report from scores and labels (1 = COVID).

    Raises
    ------
    ValueError
        The split lacks a class, or scores and labels differ in length.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(set(labels.tolist())) != 2:
        raise ValueError("evaluation needs COVID and non-COVID images")
    _, auc = roc(scores, labels)
    _, ap = precision_recall(scores, labels)
    report = EvaluationReport(
        model=model, threshold=threshold,
        n_covid=int(labels.sum()), n_non_covid=int((labels == 0).sum()),
        auc=auc, auc_ci=bootstrap_auc_ci(scores, labels, n_resamples=n_bootstrap, seed=seed),
        average_precision=ap,
        points=[operating_point(scores, labels, c) for c in cutoffs],
        at_threshold=operating_point(scores, labels, threshold),
    )
    if sources is not None:
        src = np.asarray(list(sources))
        for name in sorted(set(src.tolist())):
            m = src == name
            s, y = scores[m], labels[m]
            both = len(set(y.tolist())) == 2
            report.per_source.append(SourceResult(
                source=name, n_covid=int(y.sum()), n_non_covid=int((y == 0).sum()),
                point=operating_point(s, y, threshold),
                auc=roc(s, y)[1] if both else math.nan,
                auc_ci=(bootstrap_auc_ci(s, y, n_resamples=n_bootstrap, seed=seed) if both
                        else (math.nan, math.nan)),
                mean_score_covid=float(s[y == 1].mean()) if (y == 1).any() else math.nan,
                mean_score_non_covid=float(s[y == 0].mean()) if (y == 0).any() else math.nan,
            ))
    return report


def _pct(value: float, ci: tuple[float, float]) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{100 * value:.1f}% ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def table_rows(report: EvaluationReport) -> list[list[str]]:
    """Build the paper's table: cut-off, sensitivity and specificity with 95% intervals."""
    rows = []
    for p in [*report.points, report.at_threshold]:
        label = f"{p.cutoff:.4g}" + (" (model threshold)" if p is report.at_threshold else "")
        rows.append([report.model, label, _pct(p.sensitivity, p.sensitivity_ci),
                     _pct(p.specificity, p.specificity_ci), str(p.tp), str(p.fn), str(p.tn),
                     str(p.fp)])
    return rows


TABLE_HEADER = ["model", "cut-off", "sensitivity (95% CI)", "specificity (95% CI)",
                "TP", "FN", "TN", "FP"]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(report: EvaluationReport, samples: Sequence[Sample], scores: np.ndarray,
                 out_dir: Path, *, caveat: str = "") -> list[Path]:
    """Write scores CSV, tables (Markdown + CSV), JSON and plots under ``out_dir``.

    Returns
    -------
    list of Path
        The written files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.target for s in samples])
    written: list[Path] = []
    scores_csv = out_dir / "scores.csv"
    with scores_csv.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "label", "patient_id", "source", "covid_probability"])
        for s, p in zip(samples, scores, strict=True):
            w.writerow([s.path, s.label, s.patient_id, s.source, f"{p:.6f}"])
    written.append(scores_csv)
    rows = table_rows(report)
    table_csv = out_dir / "table.csv"
    with table_csv.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([TABLE_HEADER, *rows])
    written.append(table_csv)
    src_header = ["source", "COVID", "non-COVID", "sensitivity (95% CI)",
                  "specificity (95% CI)", "AUC (95% CI)", "mean p (COVID)",
                  "mean p (non-COVID)"]
    src_rows = [[r.source, str(r.n_covid), str(r.n_non_covid),
                 _pct(r.point.sensitivity, r.point.sensitivity_ci),
                 _pct(r.point.specificity, r.point.specificity_ci),
                 "n/a" if math.isnan(r.auc) else f"{r.auc:.3f} ({r.auc_ci[0]:.3f}-"
                                                 f"{r.auc_ci[1]:.3f})",
                 "n/a" if math.isnan(r.mean_score_covid) else f"{r.mean_score_covid:.3f}",
                 "n/a" if math.isnan(r.mean_score_non_covid)
                 else f"{r.mean_score_non_covid:.3f}"] for r in report.per_source]
    source_csv = out_dir / "per_source.csv"
    with source_csv.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([src_header, *src_rows])
    written.append(source_csv)
    curve_roc, _ = roc(scores, labels)
    curve_pr, _ = precision_recall(scores, labels)
    written += [
        plot_roc(curve_roc, report.auc, report.auc_ci, out_dir / "roc.png",
                 title=f"ROC, {report.model}"),
        plot_pr(curve_pr, report.average_precision, report.n_covid / len(samples),
                out_dir / "pr.png", title=f"Precision-recall, {report.model}"),
        plot_histogram(scores, labels, report.threshold, out_dir / "histogram.png"),
        plot_confusion(report.at_threshold.confusion, report.threshold,
                       out_dir / "confusion.png"),
    ]
    md = out_dir / "evaluation.md"
    md.write_text(
        f"# Evaluation: {report.model}\n\n"
        + (f"> {caveat}\n\n" if caveat else "")
        + f"{report.n_covid} COVID and {report.n_non_covid} non-COVID test images. "
        f"Rule: probability >= cut-off is COVID. Intervals: 95% exact (Clopper-Pearson) "
        f"for sensitivity and specificity, stratified bootstrap for the AUC.\n\n"
        f"ROC AUC {report.auc:.3f} (95% CI {report.auc_ci[0]:.3f}-{report.auc_ci[1]:.3f}); "
        f"average precision {report.average_precision:.3f}; model threshold "
        f"{report.threshold:.4f} (chosen on validation).\n\n"
        + _markdown(TABLE_HEADER, rows)
        + "\n## Per data source (at the model threshold)\n\n"
        + _markdown(src_header, src_rows)
        + "".join(
            f"\n**Within-source AUC ({r.source}: COVID-19 against the same source's other "
            f"findings, {r.n_covid} vs {r.n_non_covid} images): {r.auc:.3f} (95% CI "
            f"{r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f}).** Here the source cannot give the answer "
            f"away; this is the figure closest to telling COVID-19 from other lung disease. "
            f"Its 95% interval "
            + ("includes chance (0.5)" if r.auc_ci[0] <= 0.5 else "excludes chance (0.5)")
            + ".\n"
            for r in report.within_source)
        + "\n![ROC](roc.png) ![PR](pr.png) ![histogram](histogram.png) "
        "![confusion](confusion.png)\n",
        encoding="utf-8",
    )
    written.append(md)
    js = out_dir / "evaluation.json"
    data = asdict(report)
    js.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    written.append(js)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint (default: the packaged model)")
    p.add_argument("--split", type=Path, required=True, help="split manifest from cxr-split")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--which", default="test", help="split to evaluate (default: test)")
    p.add_argument("--cutoffs", type=float, nargs="+", default=list(PAPER_CUTOFFS))
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--update-card", action="store_true",
                   help="write the test figures into the checkpoint's card metrics")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-eval``; returns the exit status."""
    from rich.console import Console
    from rich.progress import Progress

    from cxr_pipeline.errors import CxrError
    from cxr_pipeline.model.architectures import default_checkpoint_path, save_checkpoint

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    checkpoint = args.checkpoint or default_checkpoint_path()
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device,
                                              channels_last=False)
        samples = [s for s in read_manifest(args.split) if s.split == args.which]
        if not samples:
            raise DatasetError(f"no {args.which!r} rows in {args.split}")
        with Progress(console=console) as bar:
            task = bar.add_task(f"scoring {args.which}", total=len(samples))
            scores = score_samples(predictor, samples, args.data_dir,
                                   on_image=lambda n: bar.advance(task, n))
        card = predictor.card
        report = evaluate_scores(
            scores, np.array([s.target for s in samples]), threshold=card.threshold,
            sources=[s.source for s in samples], model=card.name, cutoffs=args.cutoffs,
            n_bootstrap=args.bootstrap)
    except (CxrError, DatasetError, ValueError) as exc:
        console.print(f"[bold red]cxr-eval: {exc}")
        return 2
    from training.train import SOURCE_CAVEAT, write_card_json

    files = write_report(report, samples, scores, args.out, caveat=SOURCE_CAVEAT)
    if args.update_card:
        new_card = replace(card, metrics={**card.metrics, **report.card_metrics()})
        # channels_last=False above: the weights are saved exactly as loaded.
        save_checkpoint(checkpoint, predictor.model.cpu(), new_card)
        write_card_json(new_card, checkpoint)
    console.print(f"AUC {report.auc:.3f} ({report.auc_ci[0]:.3f}-{report.auc_ci[1]:.3f}); "
                  f"at threshold {card.threshold:.4f}: sensitivity "
                  f"{_pct(report.at_threshold.sensitivity, report.at_threshold.sensitivity_ci)},"
                  f" specificity "
                  f"{_pct(report.at_threshold.specificity, report.at_threshold.specificity_ci)}")
    console.print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
