r"""``cxr-validate``: validate the model on a site's own labelled DICOM, and fit a site profile.

Example::

    cxr-validate /data/site-cases --labels labels.csv --out validation/2024-05 \\
        --fit-site-profile site.toml --target-sensitivity 0.95 --site st-elsewhere

Every file under the inputs goes through ``cxr-batch``'s runner (the listener's chest check,
decode, preprocessing and model; nothing is sent), so the figures are those of the path the
service runs. The batch rows are kept in a work folder beside the output
(``.<name>.cxr-validate-work``) while it runs: an interrupted run resumes there, and the
finished output keeps them under ``batch/`` so that a later run redoes only new or changed
files. The report is written into a temporary folder and renamed to ``--out`` at the end
(and the profile likewise): a failed run leaves no half-written report or profile.

Exit status: 0 done, 2 bad input (labels, options, settings, a profile for another model),
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cxr_pipeline.errors import ConfigError, CxrError
from cxr_pipeline.settings import Settings, load_settings
from training.validate.labels import LabelsError, read_labels
from training.validate.profile import (
    DEFAULT_CONFIDENCE,
    DEFAULT_TARGET_SENSITIVITY,
    ProfileError,
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
BATCH_FOLDER = "batch"


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ``cxr-validate``."""
    p = argparse.ArgumentParser(
        prog="cxr-validate",
        description="Validate the model on a site's own labelled DICOM images "
        "(and fit a site profile).",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders")
    p.add_argument("--labels", type=Path, required=True, metavar="LABELS.csv",
                   help="label (covid/non_covid), path or sop_instance_uid, optional patient_id")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder")
    p.add_argument("--config", type=Path, help="TOML settings file (default $CXR_CONFIG)")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: packaged)")
    p.add_argument("--site-profile", type=Path, metavar="FILE",
                   help="also report the figures of this existing site profile")
    p.add_argument("--fit-site-profile", type=Path, metavar="FILE",
                   help="fit a site profile on these images and write it here (TOML)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="sensitivity the profile's threshold is chosen for (default 0.95)")
    p.add_argument("--threshold-confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="confidence that new patients' sensitivity reaches the target "
                        "(default 0.8; 0.5 is about the plain choice)")
    p.add_argument("--site", help="site name in the profile (default: the profile file's name)")
    p.add_argument("--workers", type=int, help="decode processes (default: CPU cores)")
    p.add_argument("--batch-size", type=int, help="images per model forward pass")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and fold seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    model: dict[str, Any] = {}
    if args.checkpoint is not None:
        model["checkpoint"] = str(args.checkpoint)
    batch: dict[str, Any] = {}
    if args.workers is not None:
        batch["decode_workers"] = args.workers
    if args.batch_size is not None:
        batch["batch_size"] = args.batch_size
    overrides: dict[str, Any] = {}
    if model:
        overrides["model"] = model
    if batch:
        overrides["batch"] = batch
    settings = load_settings(args.config, **overrides)
    # The raw scores are what is validated (and what a profile is fitted on); the model
    # card's point is reported, and a profile given here is applied to the raw scores.
    return settings.model_copy(
        update={"model": settings.model.model_copy(update={"site_profile": None})}
    )


def _check_args(args: argparse.Namespace) -> None:
    for path in args.inputs:
        if not path.exists():
            raise ConfigError(f"input {path} is neither a file nor a folder")
    if not 0.0 < args.target_sensitivity <= 1.0:
        raise ConfigError("--target-sensitivity must be in (0, 1]")
    if not 0.0 < args.threshold_confidence < 1.0:
        raise ConfigError("--threshold-confidence must be in (0, 1)")
    for name in ("workers", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_report(out))):
        raise ConfigError(
            f"--out {out} exists and is not a cxr-validate report folder: choose another"
        )


def _is_report(folder: Path) -> bool:
    try:
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == "cxr-validate"


def work_folder(out: Path) -> Path:
    """Give the resumable batch work folder of an output folder (a hidden sibling)."""
    return out.parent / f".{out.name}.cxr-validate-work"


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames (the old folder goes only once the new is in)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace, err: Console) -> int:
    """Run a validation (parsed arguments); returns the exit status."""
    from cxr_pipeline.batch.cli import start_fork_server
    from cxr_pipeline.batch.report import JSONL_NAME, read_rows
    from cxr_pipeline.batch.runner import BatchOptions, run_batch
    from cxr_pipeline.batch.walker import walk
    from cxr_pipeline.model.inference import Predictor
    from cxr_pipeline.model.site_profile import (
        load_site_profile,
        profile_for_model,
        save_site_profile,
    )
    from training.validate.analysis import collect, validate
    from training.validate.content import blocks, json_data
    from training.validate.plots import Point, Reliability, write_plots
    from training.validate.profile import fit_site_profile
    from training.validate.report import write_report

    _check_args(args)
    labels = read_labels(args.labels)  # bad labels: an error before anything is written
    settings = _settings(args)
    if args.site_profile is not None:
        load_site_profile(args.site_profile)  # unreadable: fail before loading the model
    start_fork_server(settings.batch.start_method)
    predictor = Predictor.from_settings(settings.model)
    card = predictor.card
    existing = None
    if args.site_profile is not None:
        existing = profile_for_model(args.site_profile, card)

    out: Path = args.out.resolve()
    work = work_folder(out)
    if not work.exists() and (out / BATCH_FOLDER / JSONL_NAME).is_file():
        shutil.copytree(out / BATCH_FOLDER, work)  # resume from the last finished run
    inputs = [p.resolve() for p in args.inputs]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    progress = Progress(*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=args.no_progress)
    task = progress.add_task("cxr-validate", total=None)
    with progress:
        summary = run_batch(
            inputs, work, settings, BatchOptions(), predictor=predictor,
            on_start=lambda todo, done: progress.update(task, total=todo),
            on_row=lambda row: progress.advance(task),
        )
    if summary.interrupted:
        err.print(f"cxr-validate: interrupted; run the same command again to resume ({work})")
        return EXIT_INTERRUPTED
    current = {str(item.path) for item in walk(inputs, exclude=[work])}
    rows = [row for row in read_rows(work / JSONL_NAME) if row.path in current]
    collected = collect(rows, labels, inputs)
    v = validate(collected, card, site_profile=existing, seed=args.seed)
    if args.fit_site_profile is not None:
        site = args.site or args.fit_site_profile.stem
        v.fitted, v.crossed = fit_site_profile(
            v.scores, v.labels, v.groups, card, site=site, target=args.target_sensitivity,
            confidence=args.threshold_confidence, seed=args.seed,
            notes=f"fitted by cxr-validate on {', '.join(str(p) for p in inputs)} "
                  f"with labels {args.labels}",
        )
        v.fitted_path = str(args.fit_site_profile.resolve())

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    profile_tmp: Path | None = None
    try:
        tmp.mkdir(parents=True)
        points = [Point(f"model card ({v.card_point.threshold:.3g})",
                        v.card_point.decision.sensitivity, v.card_point.decision.specificity)]
        curves = [Reliability("model card", v.card_point.calibration)]
        if v.site_point is not None:
            points.append(Point("site profile", v.site_point.decision.sensitivity,
                                v.site_point.decision.specificity))
            curves.append(Reliability("site profile", v.site_point.calibration))
        if v.crossed is not None:
            points.append(Point("fitted profile (cross-fitted)", v.crossed.decision.sensitivity,
                                v.crossed.decision.specificity))
            curves.append(Reliability("fitted profile (cross-fitted)", v.crossed.calibration))
        plots = write_plots(
            tmp, scores=v.scores, probabilities=v.card_point.probabilities, labels=v.labels,
            threshold=v.card_point.threshold, auc=v.auc, auc_ci=v.auc_ci, points=points,
            curves=curves,
        )
        shown_inputs = [str(p) for p in inputs]
        title, content = blocks(v, plots, shown_inputs)
        write_report(tmp, title, content, json_data(v, plots, shown_inputs, str(args.labels)))
        shutil.copytree(work, tmp / BATCH_FOLDER)
        if v.fitted is not None:
            target = args.fit_site_profile.resolve()
            profile_tmp = save_site_profile(
                v.fitted, target.with_name(f".{target.name}.tmp-{os.getpid()}")
            )
        _swap_in(tmp, out)
        if profile_tmp is not None:
            os.replace(profile_tmp, args.fit_site_profile.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if profile_tmp is not None:
            profile_tmp.unlink(missing_ok=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    _print_summary(v, out, err)
    return EXIT_OK


def _print_summary(v: Any, out: Path, console: Console) -> None:
    d = v.card_point.decision
    console.print(
        f"cxr-validate: {v.labels.size} images analysed, "
        f"{len(v.collected.not_analysed)} not, {len(v.collected.unmatched)} label rows "
        f"matching no file; AUC {v.auc:.3f} ({v.auc_ci[0]:.3f}-{v.auc_ci[1]:.3f}); "
        f"model card point: sensitivity {d.sensitivity:.3f}, specificity "
        f"{d.specificity:.3f}, ECE {v.card_point.calibration.ece:.3f}",
        highlight=False, soft_wrap=True,
    )
    if v.fitted is not None and v.crossed is not None:
        c = v.crossed
        console.print(
            f"site profile {v.fitted_path}: {v.fitted.calibration.method} map, threshold "
            f"{v.fitted.threshold:.4g}; cross-fitted sensitivity {c.decision.sensitivity:.3f} "
            f"({c.decision.sensitivity_ci[0]:.3f}-{c.decision.sensitivity_ci[1]:.3f}), "
            f"specificity {c.decision.specificity:.3f}, ECE {c.calibration.ece:.3f}",
            highlight=False, soft_wrap=True,
        )
    console.print(f"report: {out / 'report.html'}", highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-validate``; returns the exit status."""
    from training.validate.analysis import ValidationError

    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return run(args, err)
    except (CxrError, LabelsError, ProfileError, ValidationError) as exc:
        detail = exc.detail if isinstance(exc, CxrError) else str(exc)
        err.print(f"cxr-validate: {detail}", soft_wrap=True, highlight=False, markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("cxr-validate: interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
