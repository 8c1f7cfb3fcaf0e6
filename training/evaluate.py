"""``cxr-eval``: test-set evaluation in the paper's form.

For every test image the COVID probability is computed through the deployed inference
path (:class:`cxr_pipeline.model.inference.Predictor`: the same preprocessing and softmax the
pipeline uses). Reported: sensitivity and specificity at the paper's cut-offs and at the
model's own threshold with the paper's rule (``p >= cut-off`` is COVID) and 95% exact
(Clopper-Pearson) intervals; ROC AUC with a stratified bootstrap interval; PR curve and
average precision; confusion matrix; score histograms; the same figures per data source
(the manifest's ``source`` column), because a model may recognise the source rather than
the disease.

Calibration (:mod:`cxr_pipeline.model.calibration`): the report gives, overall and per
source, the expected calibration error (10 equal-width bins), the Brier score and the log
loss of the raw score ("before") and of the card's calibrated probability ("after"), and a
reliability diagram (``reliability.png``). ``--fit-calibration`` first fits the card's
calibration on the validation split (temperature, Platt or isotonic, chosen by
patient-grouped out-of-fold log loss, then refitted on all validation images); with
``--update-card`` it is stored in the checkpoint and its ``.card.json``. The ranking and so
every AUC is the same on both scales; the model threshold is applied to the raw score, which
flags the same images as its calibrated image applied to the probability.
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

from cxr_pipeline.model.calibration import (
    Calibration,
    Selection,
    brier_score,
    expected_calibration_error,
    log_loss,
    select_calibration,
)
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
from training.plots import (
    ReliabilityPanel,
    plot_confusion,
    plot_histogram,
    plot_pr,
    plot_reliability,
    plot_roc,
)

ECE_BINS = 10
"""Equal-width bins of the expected calibration error and of the reliability diagram."""


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


@dataclass(frozen=True)
class CalibrationResult:
    """Calibration figures of one group of images (all, or one source), before and after.

    "Before" is the raw score read as a probability, "after" the card's calibrated
    probability. Log loss is in nats.
    """

    scope: str
    n: int
    n_covid: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    log_loss_before: float
    log_loss_after: float


def calibration_result(scope: str, raw: np.ndarray, calibrated: np.ndarray,
                       labels: np.ndarray) -> CalibrationResult:
    """ECE, Brier score and log loss of ``raw`` and ``calibrated`` against ``labels``."""
    return CalibrationResult(
        scope=scope, n=int(labels.size), n_covid=int(labels.sum()),
        ece_before=expected_calibration_error(raw, labels, ECE_BINS),
        ece_after=expected_calibration_error(calibrated, labels, ECE_BINS),
        brier_before=brier_score(raw, labels), brier_after=brier_score(calibrated, labels),
        log_loss_before=log_loss(raw, labels), log_loss_after=log_loss(calibrated, labels))


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
    calibration: dict[str, object] = field(default_factory=dict)
    """The card's calibration map (:meth:`Calibration.to_dict`)."""
    calibrated_threshold: float = math.nan
    """The model threshold on the calibrated scale (the same decisions)."""
    calibration_figures: list[CalibrationResult] = field(default_factory=list)
    """Overall (scope ``"all"``) first, then one row per source."""

    @property
    def within_source(self) -> list[SourceResult]:
        """Sources holding both classes: their AUC cannot come from telling sources apart."""
        return [r for r in self.per_source if not math.isnan(r.auc)]

    def card_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Headline figures for the model card's ``metrics``.

        With exactly one source holding both classes (here ieee8023), its AUC and interval
        are added as ``<prefix>within_source_auc`` (``_ci_low``, ``_ci_high``); the overall
        ECE and Brier score as ``<prefix>ece`` and ``<prefix>brier`` (calibrated) and
        ``<prefix>ece_uncalibrated``, ``<prefix>brier_uncalibrated`` (raw score).
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
        if self.calibration_figures:
            overall = self.calibration_figures[0]
            metrics.update({f"{prefix}ece_uncalibrated": overall.ece_before,
                            f"{prefix}ece": overall.ece_after,
                            f"{prefix}brier_uncalibrated": overall.brier_before,
                            f"{prefix}brier": overall.brier_after})
        # Plain floats: the card is stored in a checkpoint loaded with weights_only=True.
        return {k: float(v) for k, v in metrics.items()}


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
                    seed: int = 0, calibration: Calibration | None = None
                    ) -> EvaluationReport:
    """Compute every figure of the report from raw scores and labels (1 = COVID).

    ``calibration`` (identity when None) gives the "after" side of the calibration
    figures; AUCs, cut-offs and the threshold are on the raw score.

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
    cal = calibration if calibration is not None else Calibration()
    calibrated = cal.apply(scores)
    report.calibration = cal.to_dict()
    report.calibrated_threshold = (cal.apply_one(threshold) if cal.method != "identity"
                                   else threshold)
    report.calibration_figures.append(calibration_result("all", scores, calibrated, labels))
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
            report.calibration_figures.append(
                calibration_result(name, s, calibrated[m], y))
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


CALIBRATION_HEADER = ["images", "n (COVID)", "ECE before", "ECE after", "Brier before",
                      "Brier after", "log loss before", "log loss after"]


def calibration_rows(report: EvaluationReport) -> list[list[str]]:
    """Build the calibration table: ECE, Brier score and log loss before and after, per scope."""
    return [[r.scope, f"{r.n} ({r.n_covid})", f"{r.ece_before:.3f}", f"{r.ece_after:.3f}",
             f"{r.brier_before:.3f}", f"{r.brier_after:.3f}", f"{r.log_loss_before:.3f}",
             f"{r.log_loss_after:.3f}"] for r in report.calibration_figures]


def _calibration_text(report: EvaluationReport) -> str:
    cal = Calibration.from_dict(dict(report.calibration))
    if cal.method == "identity":
        what = ("The card has no calibration (identity): \"after\" equals \"before\". Fit one "
                "with `cxr-eval --fit-calibration`.")
    else:
        fitted = f", fitted on the {cal.fitted_on}" if cal.fitted_on else ""
        what = (f"Calibration map: **{cal.method}**{fitted}. The model threshold "
                f"{report.threshold:.4g} on the raw score is {report.calibrated_threshold:.3f} "
                f"on the calibrated probability (the same decisions).")
    return (f"\n## Calibration (before: raw score; after: calibrated probability)\n\n{what} "
            f"ECE: expected calibration error, {ECE_BINS} equal-width bins; Brier: mean "
            f"squared error of the probability; log loss in nats. A source with one class "
            f"only has an ECE equal to its mean probability (its label is 0 throughout).\n\n"
            + _markdown(CALIBRATION_HEADER, calibration_rows(report))
            + "\n![reliability](reliability.png)\n")


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
    calibrated = Calibration.from_dict(dict(report.calibration)).apply(scores) \
        if report.calibration else np.asarray(scores, dtype=np.float64)
    written: list[Path] = []
    scores_csv = out_dir / "scores.csv"
    with scores_csv.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        # covid_probability: the raw score (as before calibration existed, read by cxr-probe).
        w.writerow(["path", "label", "patient_id", "source", "covid_probability",
                    "calibrated_probability"])
        for s, p, q in zip(samples, scores, calibrated, strict=True):
            w.writerow([s.path, s.label, s.patient_id, s.source, f"{p:.6f}", f"{q:.6f}"])
    written.append(scores_csv)
    calibration_csv = out_dir / "calibration.csv"
    with calibration_csv.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([CALIBRATION_HEADER, *calibration_rows(report)])
    written.append(calibration_csv)
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
        plot_reliability(_reliability_panels(report, samples, scores, calibrated),
                         out_dir / "reliability.png", n_bins=ECE_BINS),
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
        + _calibration_text(report)
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


def _reliability_panels(report: EvaluationReport, samples: Sequence[Sample],
                        scores: np.ndarray, calibrated: np.ndarray) -> list[ReliabilityPanel]:
    labels = np.array([s.target for s in samples])
    src = np.array([s.source for s in samples])
    by_scope = {r.scope: r for r in report.calibration_figures}
    panels = []
    for scope, mask in [("all", np.ones(len(samples), dtype=bool)),
                        *[(r.source, src == r.source) for r in report.per_source]]:
        r = by_scope[scope]
        panels.append(ReliabilityPanel(
            # The source's name up to "/" keeps three panel titles apart.
            title=f"{scope.split('/')[0]} ({r.n} images, {r.n_covid} COVID)",
            raw=np.asarray(scores)[mask],
            calibrated=calibrated[mask], labels=labels[mask],
            ece_before=r.ece_before, ece_after=r.ece_after))
    return panels


def fit_card_calibration(predictor: Predictor, samples: Sequence[Sample], data_dir: Path, *,
                         split_name: str, on_image: Callable[[int], None] | None = None
                         ) -> tuple[Selection, np.ndarray]:
    """Fit the calibration of ``predictor``'s card on labelled images it did not train on.

    Temperature, Platt and isotonic maps are compared by out-of-fold log loss over
    patient-grouped folds; the best is refitted on every image
    (:func:`cxr_pipeline.model.calibration.select_calibration`).

    Parameters
    ----------
    predictor
        The model (its raw scores are calibrated).
    samples
        The calibration images (the validation split).
    data_dir
        Folder the sample paths are relative to.
    split_name
        How the images are named in the card, e.g. ``"validation split (split.csv)"``.
    on_image
        Progress callback (images scored).

    Returns
    -------
    tuple of (Selection, numpy.ndarray)
        The chosen map with every candidate's out-of-fold log loss, and the raw scores.
    """
    scores = score_samples(predictor, samples, data_dir, on_image=on_image)
    labels = np.array([s.target for s in samples])
    n_covid = int(labels.sum())
    described = (f"{split_name}, {len(samples)} images ({n_covid} COVID, "
                 f"{len(samples) - n_covid} non-COVID)")
    selection = select_calibration(scores, labels, groups=[s.patient_id for s in samples],
                                   fitted_on=described)
    return selection, scores


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
                   help="write the test figures (and a calibration fitted with "
                        "--fit-calibration) into the checkpoint's card")
    p.add_argument("--fit-calibration", action="store_true",
                   help="fit the card's calibration on the --calibrate-on split first "
                        "(temperature/Platt/isotonic by patient-grouped out-of-fold log loss)")
    p.add_argument("--calibrate-on", default="val",
                   help="split the calibration is fitted on (default: val)")
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
    selection: Selection | None = None
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device,
                                              channels_last=False)
        rows = read_manifest(args.split)
        samples = [s for s in rows if s.split == args.which]
        if not samples:
            raise DatasetError(f"no {args.which!r} rows in {args.split}")
        card = predictor.card
        with Progress(console=console) as bar:
            if args.fit_calibration:
                fit_on = [s for s in rows if s.split == args.calibrate_on]
                if not fit_on:
                    raise DatasetError(f"no {args.calibrate_on!r} rows in {args.split} to "
                                       f"fit the calibration on")
                if {s.path for s in fit_on} & {s.path for s in samples}:
                    raise DatasetError(f"the {args.calibrate_on!r} and {args.which!r} rows "
                                       f"share images: calibrate on images you do not test on")
                task = bar.add_task(f"scoring {args.calibrate_on}", total=len(fit_on))
                name = {"val": "validation", "train": "training"}.get(args.calibrate_on,
                                                                     args.calibrate_on)
                selection, _ = fit_card_calibration(
                    predictor, fit_on, args.data_dir,
                    split_name=f"{name} split of {args.split.name}",
                    on_image=lambda n: bar.advance(task, n))
                card = replace(card, calibration=selection.calibration)
            task = bar.add_task(f"scoring {args.which}", total=len(samples))
            scores = score_samples(predictor, samples, args.data_dir,
                                   on_image=lambda n: bar.advance(task, n))
        report = evaluate_scores(
            scores, np.array([s.target for s in samples]), threshold=card.threshold,
            sources=[s.source for s in samples], model=f"{card.name} {card.version}",
            cutoffs=args.cutoffs, n_bootstrap=args.bootstrap, calibration=card.calibration)
    except (CxrError, DatasetError, ValueError) as exc:
        console.print(f"[bold red]cxr-eval: {exc}")
        return 2
    from training.train import SOURCE_CAVEAT, write_card_json

    files = write_report(report, samples, scores, args.out, caveat=SOURCE_CAVEAT)
    if selection is not None:
        chosen = args.out / "calibration.json"
        chosen.write_text(json.dumps({
            "chosen": selection.calibration.to_dict(),
            "out_of_fold_log_loss": selection.out_of_fold_log_loss,
            "calibrated_threshold": report.calibrated_threshold,
        }, indent=2) + "\n", encoding="utf-8")
        files.append(chosen)
        losses = ", ".join(f"{k} {v:.4f}" for k, v in selection.out_of_fold_log_loss.items())
        console.print(f"calibration: {selection.calibration.method} (out-of-fold log loss "
                      f"{losses}); threshold {card.threshold:.4g} -> "
                      f"{report.calibrated_threshold:.4f} calibrated")
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
