"""Local fine-tuning on a site's own labelled DICOM: ``cxr-train INPUT... --labels LABELS.csv``.

The images are read as the service reads them: every file under the inputs is recognised by
content (``cxr-batch``'s walker), checked by the listener's chest-radiograph policy from its
header, and decoded by :func:`cxr_pipeline.dicom.ingest.load_radiograph` (through
:func:`training.datasets.load_image`); no conversion to PNG. Labels are matched as
``cxr-validate`` matches them (:mod:`training.validate.labels`).

The site's patients are split three ways, patient-disjoint and stratified by class
(scikit-learn's ``StratifiedGroupKFold``): train, validation (epoch and threshold choice)
and a local test part that neither sees. With ``--init packaged`` (or a checkpoint path)
training starts from that model and trains its head only, on cached features of the frozen
backbone (the paper's recipe, minutes on a CPU). The model before and after is measured on
the local test part through the inference path (:class:`cxr_pipeline.model.inference.Predictor`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pipeline.errors import CxrError
from cxr_pipeline.model.architectures import save_checkpoint
from cxr_pipeline.settings import IngestSettings
from training.datasets import DatasetError, Sample, load_image
from training.train import (
    TrainConfig,
    TrainResult,
    config_from_args,
    run_training,
    write_card_json,
)
from training.train import _parser as train_parser
from training.train import main as train_main
from training.validate.labels import FileRef, match_labels, read_labels
from training.validate.stats import auc, calibration_figures, decision, patient_bootstrap_auc


@dataclass(frozen=True)
class LocalSet:
    """The labelled images usable for training, and what was left out."""

    samples: list[Sample]
    left_out: list[tuple[str, str]]
    """(path, reason) of files not used."""
    unmatched: list[str]
    """Label rows that name no file."""


def read_local_dicom(inputs: Sequence[Path], labels_path: Path, ingest: IngestSettings
                     ) -> LocalSet:
    """Find the labelled chest radiographs under ``inputs``.

    Parameters
    ----------
    inputs
        DICOM files or folders.
    labels_path
        The site's LABELS.csv (see :mod:`training.validate.labels`).
    ingest
        The chest-radiograph policy (as the listener's).

    Returns
    -------
    LocalSet
        Samples (absolute paths; patient from the labels or the DICOM Patient ID; source
        from Manufacturer), files left out with their reason, unmatched label rows.

    Raises
    ------
    training.validate.labels.LabelsError
        Unusable labels file.
    """
    from cxr_pipeline.batch.walker import FileKind, detect_kind, walk
    from cxr_pipeline.dicom.ingest import check_chest_radiograph, read_dataset
    from cxr_pipeline.errors import CxrError

    labels = read_labels(labels_path)
    headers: dict[Path, Any] = {}
    left_out: list[tuple[str, str]] = []
    for item in walk(inputs):
        if detect_kind(item.path) is not FileKind.DICOM:
            left_out.append((str(item.path), "not_dicom"))
            continue
        try:
            ds = read_dataset(item.path)
            check_chest_radiograph(ds, ingest)
        except CxrError as exc:
            left_out.append((str(item.path), exc.reason.value))
            continue
        headers[item.path.resolve()] = ds
    refs = [FileRef(path, str(ds.get("SOPInstanceUID", ""))) for path, ds in headers.items()]
    matching = match_labels(labels, refs, list(inputs))
    samples: list[Sample] = []
    for path, ds in headers.items():
        row = matching.by_file.get(path)
        if row is None:
            left_out.append((str(path), "no_label"))
            continue
        patient = row.patient_id or str(ds.get("PatientID", "") or "") or f"file:{path}"
        samples.append(Sample(path=str(path), label=row.label, patient_id=patient,
                              source=str(ds.get("Manufacturer", "") or "")))
    return LocalSet(samples, left_out, [f"line {r.line}: {r.key}" for r in matching.unmatched])


def split_local(samples: Sequence[Sample], *, seed: int = 0, folds: int = 5
                ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split patient-disjoint into train (3/5), validation (1/5) and test (1/5).

    Raises
    ------
    DatasetError
        Too few patients of a class for the folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([s.target for s in samples])
    groups = np.array([s.patient_id for s in samples])
    fewest = min(len(set(groups[y == c])) for c in (0, 1)) if len(set(y)) == 2 else 0
    if fewest < folds:
        raise DatasetError(
            f"fine-tuning needs at least {folds} patients of each class (has {fewest})"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    parts = [test for _, test in splitter.split(np.zeros(y.size), y, groups)]
    test, val = set(parts[0].tolist()), set(parts[1].tolist())
    train = set(range(len(samples))) - test - val

    def part(index: set[int], name: str) -> list[Sample]:
        return [replace(s, split=name) for i, s in enumerate(samples) if i in index]

    return part(train, "train"), part(val, "val"), part(test, "test")


def measure(model: Any, card: Any, samples: Sequence[Sample]) -> dict[str, Any]:
    """AUC (patient bootstrap interval), decision and calibration of a model on samples."""
    from cxr_pipeline.model.inference import Predictor

    predictor = Predictor(model, card, device="cpu")
    images = [load_image(s.path) for s in samples]
    scores = predictor.predict_images(images).astype(np.float64)
    y = np.array([s.target for s in samples])
    groups = [s.patient_id for s in samples]
    point = card.operating_point()
    probabilities = point.calibration.apply(scores)
    d = decision(probabilities >= point.threshold, y, groups, point.threshold)
    return {
        "model": f"{card.name} {card.version}",
        "n": int(y.size),
        "n_covid": int(y.sum()),
        "auc": auc(scores, y),
        "auc_ci": list(patient_bootstrap_auc(scores, y, groups)),
        "decision": d.to_dict(),
        "ece": calibration_figures(probabilities, y).ece,
    }


@dataclass
class FineTuneResult:
    """What a local fine-tuning produced and measured."""

    result: TrainResult
    before: dict[str, Any]
    after: dict[str, Any]
    counts: dict[str, int]
    left_out: list[tuple[str, str]]
    unmatched: list[str]


def finetune(
    inputs: Sequence[Path],
    labels_path: Path,
    init: Path | None,
    cfg: TrainConfig,
    *,
    ingest: IngestSettings | None = None,
    progress: bool = True,
) -> FineTuneResult:
    """Fine-tune ``init``'s head on a site's DICOM and measure it before and after.

    Parameters
    ----------
    inputs, labels_path
        The site's images and labels.
    init
        Checkpoint to start from (the packaged default for ``--init packaged``): its head
        is trained on the frozen backbone's features, and name and version default to
        ``<init name>-local`` and ``<init version>+local.<date>``. None: a model is
        trained as ``cfg`` says and compared with the packaged default.
    cfg
        Training options.
    ingest
        Chest-radiograph policy (default: the listener's default).
    progress
        Show progress bars.

    Returns
    -------
    FineTuneResult
        The trained model and card, the before/after figures on the local test part.
    """
    from cxr_pipeline.model.architectures import default_checkpoint_path, load_checkpoint

    local = read_local_dicom(inputs, labels_path, ingest or IngestSettings())
    if not local.samples:
        raise DatasetError("no labelled chest radiograph found under the inputs")
    train, val, test = split_local(local.samples, seed=cfg.seed)
    model, card = load_checkpoint(init or default_checkpoint_path(), map_location="cpu")
    before = measure(model, card, test)
    summary = (f"local DICOM: train {len(train)}, val {len(val)}, test {len(test)} images "
               f"(patient-disjoint) from {', '.join(str(p) for p in inputs)}")
    initial = None
    if init is not None:
        today = datetime.now(UTC).strftime("%Y%m%d")
        cfg = replace(
            cfg,
            freeze_backbone=True,
            finetune_blocks=0,
            name=cfg.name or f"{card.name}-local",
            version=cfg.version if cfg.version != TrainConfig().version else
            f"{card.version}+local.{today}",
        )
        summary += f"; head trained from {card.name} {card.version}"
        initial = (model, card)
    result = run_training(train, val, Path("/"), cfg, progress=progress,
                          training_data=summary, initial=initial)
    after = measure(result.model, result.card, test)
    counts = {name: len(part) for name, part in (("train", train), ("val", val), ("test", test))}
    return FineTuneResult(result, before, after, counts, local.left_out, local.unmatched)


def write_record(outcome: FineTuneResult, checkpoint: Path, cfg: TrainConfig) -> Path:
    """Write ``<checkpoint>.finetune.json``: before/after, split sizes, what was left out."""
    path = checkpoint.with_suffix(".finetune.json")
    record = {
        "before": outcome.before,
        "after": outcome.after,
        "split": outcome.counts,
        "left_out": [{"path": p, "reason": r} for p, r in outcome.left_out],
        "unmatched_labels": outcome.unmatched,
        "card": outcome.result.card.to_dict(),
        "config": asdict(cfg),
        "best_epoch": outcome.result.best_epoch,
        "history": outcome.result.history,
    }
    from training.validate.stats import clean

    path.write_text(json.dumps(clean(record), indent=2) + "\n", encoding="utf-8")
    return path


def _main_local(args: argparse.Namespace, cfg: TrainConfig, console: Any) -> int:
    """Run ``cxr-train INPUT... --labels LABELS.csv [--init packaged]``."""
    from cxr_pipeline.model.architectures import default_checkpoint_path
    from cxr_pipeline.settings import load_settings
    from training.validate.labels import LabelsError

    if args.labels is None or not args.inputs:
        console.print("[bold red]cxr-train: the local form needs INPUT... and --labels")
        return 2
    init = None
    if args.init is not None:
        init = default_checkpoint_path() if args.init == "packaged" else Path(args.init)
    try:
        ingest = load_settings(args.config).ingest
        outcome = finetune(args.inputs, args.labels, init, cfg, ingest=ingest,
                           progress=not args.no_progress)
    except (DatasetError, CxrError, LabelsError, ValueError) as exc:
        console.print(f"[bold red]cxr-train: {exc}")
        return 2
    result = outcome.result
    save_checkpoint(args.out, result.model, result.card)
    write_card_json(result.card, args.out)
    record = write_record(outcome, args.out, cfg)
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, figures in (("before", outcome.before), ("after", outcome.after)):
        d, ci = figures["decision"], figures["auc_ci"]
        console.print(
            f"{name}: {figures['model']} on the local test part ({figures['n']} images): "
            f"AUC {fmt(figures['auc'])} ({fmt(ci[0])}-{fmt(ci[1])}), "
            f"sensitivity {fmt(d['sensitivity'])}, specificity {fmt(d['specificity'])}",
            highlight=False, soft_wrap=True)
    console.print(f"checkpoint {args.out} ({result.card.name} {result.card.version}); "
                  f"before/after in {record}", highlight=False, soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-train``.

    The local DICOM form (``INPUT... --labels``) runs here, the split form in
    :func:`training.train.main`.
    """
    from rich.console import Console

    args = train_parser().parse_args(argv)
    if args.labels is None and not args.inputs:
        return train_main(argv)
    console = Console(stderr=True)
    if args.no_progress:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _main_local(args, config_from_args(args), console)


if __name__ == "__main__":
    sys.exit(main())
