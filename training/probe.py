"""``cxr-probe``: a linear probe of frozen EfficientNet-Lite0 features, per source.

The question it answers is how far a frozen backbone's features separate COVID-19 from the
other findings *of the same source* (ieee8023: COVID-19 against other pneumonias and ARDS
from the same publications), where telling the sources apart cannot help. That
within-source AUC bounds what any head on those features can reach on a test split that
holds such hard negatives.

Features: mean and max over space of chosen layers (MBConv blocks by index, ``head`` for
the head activation), on the card's preprocessing (rank intensities, shorter-side resize,
centre crop) and on its left-right flip. The probe is scikit-learn's standardised,
class-balanced logistic regression trained on both views and scored as their mean.

Two estimates:

- **Whole pool**, patient-grouped, stratified (by source and label) k-fold
  cross-validation, repeated with several seeds: every image is scored once per repeat by a
  probe that never saw its patient. It uses every hard negative of the pool.
- **The split's test rows**, with the probe trained on train + validation and the
  regularisation chosen by grouped cross-validation on those rows only; with ``--compare``
  (another model's ``scores.csv`` from ``cxr-eval``) a paired, patient-level bootstrap of
  the AUC differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_pipeline.model.card import ModelCard, PreprocessingSpec
from training.datasets import DatasetError, Sample, load_image, read_manifest, resolve
from training.probe_stats import (
    SourceAucs,
    cross_validated_scores,
    fit_probe,
    paired_differences,
    probe_scores,
    source_aucs,
)

DEFAULT_LAYERS = ("10", "14", "15", "head")
"""Blocks 10 (112 channels, stride 16), 14 and 15 (192 and 320, stride 32) and the head
activation (1280): texture-level and object-level features."""

PROBE_SPLITS = ("train", "val", "test")
"""Split rows the probe uses (``unused`` rows of a split are left out)."""

DEFAULT_C = (0.01, 0.03, 0.1, 0.3)
"""Inverse regularisation strengths tried when choosing on train + validation."""


def probe_spec(crop: int = 224) -> PreprocessingSpec:
    """Return the packaged default model's preprocessing, scaled to a given crop.

    Read from the default's card (``default.card.json``), so the probe sees what the
    default model sees; the resize keeps the card's resize:crop ratio (256:224).

    Raises
    ------
    CheckpointError
        The packaged card is missing or invalid.
    """
    from cxr_pipeline.errors import CheckpointError
    from cxr_pipeline.model.architectures import default_checkpoint_path

    path = default_checkpoint_path().with_suffix(".card.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the default model card {path}: {exc}") from exc
    spec = ModelCard.from_dict(data).preprocessing
    return replace(spec, crop=crop, resize=round(spec.resize * crop / spec.crop))


def extract_features(samples: Sequence[Sample], data_dir: Path, *,
                     spec: PreprocessingSpec, layers: Sequence[str] = DEFAULT_LAYERS,
                     model: torch.nn.Module | None = None, batch: int = 32,
                     on_batch: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of every sample and of its left-right flip.

    Parameters
    ----------
    samples
        Images to read (``data_dir``-relative paths).
    data_dir
        The data folder.
    spec
        Preprocessing (:func:`probe_spec`).
    layers
        Block indices as strings, or ``"head"``.
    model
        An EfficientNet-Lite0 (default: the packaged ImageNet weights).
    batch
        Images per forward pass.
    on_batch
        Called with the number of images done after each batch (progress).

    Returns
    -------
    tuple of numpy.ndarray
        ``(features, flipped)``, each ``(n, 2 * channels)`` float32: mean then max of each
        layer, in ``layers`` order.

    Raises
    ------
    ValueError
        A layer name is not a block index or ``head``.
    """
    from cxr_pipeline.model.architectures import build_model
    from cxr_pipeline.model.preprocess import EvalTransform

    net = model if model is not None else build_model("efficientnet_lite0",
                                                      weights="IMAGENET1K")
    net.eval()
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        if name == "head":
            module = net.get_submodule("_head_act")
        elif name.isdigit():
            module = net.get_submodule(f"_blocks.{name}")
        else:
            raise ValueError(f"layer must be a block index or 'head', got {name!r}")
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, key=name: outputs.__setitem__(key, out)))

    def pooled(x: torch.Tensor) -> np.ndarray:
        net(x)
        parts = [torch.cat([outputs[n].mean((2, 3)), outputs[n].amax((2, 3))], 1)
                 for n in layers]
        return torch.cat(parts, 1).float().numpy()

    transform = EvalTransform(spec)
    plain: list[np.ndarray] = []
    flipped: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(samples), batch):
                chunk = samples[start:start + batch]
                x = torch.stack([transform(load_image(resolve(s, data_dir))) for s in chunk])
                plain.append(pooled(x))
                flipped.append(pooled(torch.flip(x, dims=[3])))
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return np.concatenate(plain), np.concatenate(flipped)


def choose_c(features: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
             groups: np.ndarray, sources: np.ndarray, *, candidates: Sequence[float],
             folds: int, seed: int = 0) -> tuple[float, dict[float, SourceAucs]]:
    """Choose the regularisation on grouped cross-validation of the given rows only.

    The score is the overall AUC plus the mean within-source AUC (so the hard negatives
    count, not only the source contrast).

    Returns
    -------
    tuple
        The chosen ``C`` and the cross-validated figures of every candidate.
    """
    figures: dict[float, SourceAucs] = {}
    for c in candidates:
        oof = cross_validated_scores(features, labels, groups, sources, c=c, folds=folds,
                                     seeds=(seed,))
        figures[c] = source_aucs(oof, labels, sources, n_bootstrap=0)

    def merit(f: SourceAucs) -> float:
        within = [a for a, _ in f.within.values()]
        return f.overall[0] + (float(np.mean(within)) if within else 0.0)

    best = max(candidates, key=lambda c: merit(figures[c]))
    return best, figures


def _arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([s.target for s in samples]), np.array([s.patient_id for s in samples]),
            np.array([s.source for s in samples]))


def run_probe(samples: Sequence[Sample], features: tuple[np.ndarray, np.ndarray], *,
              candidates: Sequence[float] = DEFAULT_C, folds: int = 5,
              seeds: Sequence[int] = (0, 1, 2), compare: dict[str, float] | None = None,
              n_bootstrap: int = 2000) -> dict[str, Any]:
    """Both estimates (module docstring) as a JSON-ready dict.

    Parameters
    ----------
    samples
        Split rows (``train``/``val``/``test``; ``unused`` rows are ignored).
    features
        :func:`extract_features` output for ``samples``, row for row.
    candidates
        ``C`` values tried.
    folds, seeds
        Cross-validation folds and repeats.
    compare
        Test scores of another model by image path (paired bootstrap against it).
    n_bootstrap
        Bootstrap resamples for intervals.

    Raises
    ------
    DatasetError
        No test rows, or a compared model lacks scores for some test images.
    """
    keep = np.array([s.split in PROBE_SPLITS for s in samples])
    rows = [s for s, k in zip(samples, keep, strict=True) if k]
    feats = (features[0][keep], features[1][keep])
    labels, groups, sources = _arrays(rows)
    test = np.array([s.split == "test" for s in rows])
    if not test.any():
        raise DatasetError("the split has no test rows")
    fit = ~test
    c, fit_cv = choose_c((feats[0][fit], feats[1][fit]), labels[fit], groups[fit],
                         sources[fit], candidates=candidates, folds=folds)
    probe = fit_probe((feats[0][fit], feats[1][fit]), labels[fit], c=c)
    test_scores = probe_scores(probe, (feats[0][test], feats[1][test]))
    pool_scores = cross_validated_scores(feats, labels, groups, sources, c=c, folds=folds,
                                         seeds=seeds)
    result: dict[str, Any] = {
        "c": c,
        "c_candidates": {str(k): v.as_dict() for k, v in fit_cv.items()},
        "test": source_aucs(test_scores, labels[test], sources[test],
                            n_bootstrap=n_bootstrap).as_dict(),
        "pool_cv": source_aucs(pool_scores, labels, sources, n_bootstrap=n_bootstrap).as_dict(),
        "n_test": int(test.sum()), "n_pool": len(rows), "folds": folds, "seeds": list(seeds),
    }
    if compare is not None:
        test_rows = [s for s, t in zip(rows, test, strict=True) if t]
        missing = [s.path for s in test_rows if s.path not in compare]
        if missing:
            raise DatasetError(f"--compare lacks scores for {len(missing)} test images, "
                               f"e.g. {missing[0]}")
        other = np.array([compare[s.path] for s in test_rows])
        result["compare"] = {
            "other": source_aucs(other, labels[test], sources[test],
                                 n_bootstrap=n_bootstrap).as_dict(),
            "probe_minus_other": paired_differences(
                test_scores, other, labels[test], groups[test], sources[test],
                n_bootstrap=n_bootstrap),
        }
    return result


def _read_scores(path: Path) -> dict[str, float]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: float(row["covid_probability"]) for row in csv.DictReader(handle)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-probe", description=__doc__.splitlines()[0])
    p.add_argument("--split", type=Path, required=True, help="split CSV (cxr-split)")
    p.add_argument("--data-dir", type=Path, required=True, help="folder the paths refer to")
    p.add_argument("--out", type=Path, required=True, help="folder for probe.json")
    p.add_argument("--crop", type=int, default=224, help="model input side (default 224)")
    p.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                   help="comma-separated block indices and/or 'head'")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3, help="cross-validation repeats")
    p.add_argument("--compare", type=Path, help="another model's scores.csv (cxr-eval)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--bootstrap", type=int, default=2000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-probe``; returns the exit status."""
    from rich.console import Console
    from rich.progress import Progress

    from cxr_pipeline.errors import CxrError

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # Only the rows run_probe uses are read and passed through the backbone.
        samples = [s for s in read_manifest(args.split) if s.split in PROBE_SPLITS]
        layers = tuple(n.strip() for n in args.layers.split(",") if n.strip())
        compare = _read_scores(args.compare) if args.compare else None
        with Progress(console=console) as bar:
            task = bar.add_task("features", total=len(samples))
            features = extract_features(samples, args.data_dir, spec=probe_spec(args.crop),
                                        layers=layers, on_batch=lambda n: bar.advance(task, n))
        result = run_probe(samples, features, folds=args.folds, seeds=tuple(range(args.seeds)),
                           compare=compare, n_bootstrap=args.bootstrap)
    except (CxrError, DatasetError, ValueError, OSError) as exc:
        console.print(f"[bold red]cxr-probe: {exc}")
        return 2
    result.update({"crop": args.crop, "layers": list(layers)})
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, allow_nan=False)  # NaN is None already
    (args.out / "probe.json").write_text(text + "\n", encoding="utf-8")
    for key, title in (("test", "test split"), ("pool_cv", "whole pool, grouped CV")):
        f = SourceAucs.from_dict(result[key])
        console.print(f"{title}: {f.describe()}")
    if "compare" in result:
        d = result["compare"]["probe_minus_other"]
        console.print("probe - other, paired: " + "; ".join(
            f"{k} {v['difference']:+.3f}" + ("" if v["ci"][0] is None else
                                             f" ({v['ci'][0]:+.3f} to {v['ci'][1]:+.3f})")
            for k, v in d.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
