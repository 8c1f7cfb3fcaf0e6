"""``python -m training.compare``: two models' scores on the same images, paired.

Reads two ``scores.csv`` files written by ``cxr-eval`` (one per model, same split), keeps
the images both scored, drops every image that either model may have seen (``--exclude-seen
SPLIT.csv``: rows whose path or patient is in that split's ``train`` or ``val`` part), and
reports for each model the AUC overall, within each two-class source and against the
single-class sources (stratified bootstrap intervals), then the paired difference B - A
with a patient-level paired bootstrap (:func:`training.probe_stats.paired_differences`),
because images of one patient are not independent.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import DatasetError, read_manifest
from training.probe_stats import json_number, paired_differences, source_aucs


@dataclass(frozen=True)
class ScoredRow:
    """One image scored by ``cxr-eval``."""

    path: str
    label: str
    patient_id: str
    source: str
    score: float


def read_scores(path: Path) -> dict[str, ScoredRow]:
    """Read a ``cxr-eval`` ``scores.csv`` (raw score column ``covid_probability``).

    Raises
    ------
    DatasetError
        Missing file or columns.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    need = {"path", "label", "patient_id", "source", "covid_probability"}
    if rows and not need <= set(rows[0]):
        raise DatasetError(f"{path} lacks columns {sorted(need - set(rows[0]))}")
    return {r["path"]: ScoredRow(r["path"], r["label"], r["patient_id"], r["source"],
                                 float(r["covid_probability"])) for r in rows}


def seen_by(split_csv: Path) -> tuple[set[str], set[str]]:
    """Paths and patient ids of a split's ``train`` and ``val`` rows (what a model saw)."""
    rows = [s for s in read_manifest(split_csv) if s.split in ("train", "val")]
    return {s.path for s in rows}, {s.patient_id for s in rows}


def compare(a: dict[str, ScoredRow], b: dict[str, ScoredRow], *,
            exclude: Sequence[tuple[set[str], set[str]]] = (), n_bootstrap: int = 2000,
            seed: int = 0) -> dict[str, Any]:
    """AUCs of both models and their paired differences on the images both scored.

    Parameters
    ----------
    a, b
        Scores of model A and model B by image path.
    exclude
        ``(paths, patients)`` pairs; an image matching either is left out.
    n_bootstrap, seed
        Resamples of the intervals and their seed.

    Returns
    -------
    dict
        ``n`` (images, COVID), ``a`` and ``b`` (AUCs with intervals) and ``difference``
        (B - A, from :func:`training.probe_stats.paired_differences`).

    Raises
    ------
    DatasetError
        The files disagree on a label, or fewer than two classes remain.
    """
    paths = sorted(p for p in a.keys() & b.keys()
                   if not any(p in ps or a[p].patient_id in pt for ps, pt in exclude))
    for p in paths:
        if a[p].label != b[p].label:
            raise DatasetError(f"{p} is labelled {a[p].label} in one file, {b[p].label} in "
                               f"the other")
    labels = np.array([1 if a[p].label == "covid" else 0 for p in paths])
    if len(set(labels.tolist())) != 2:
        raise DatasetError("fewer than two classes left to compare on")
    sources = np.array([a[p].source for p in paths])
    groups = np.array([a[p].patient_id for p in paths])
    sa = np.array([a[p].score for p in paths])
    sb = np.array([b[p].score for p in paths])

    def aucs(scores: np.ndarray) -> dict[str, Any]:
        r = source_aucs(scores, labels, sources, n_bootstrap=n_bootstrap)
        out: dict[str, Any] = {"overall": [r.overall[0], *r.overall[1]]}
        out.update({f"within {k}": [v[0], *v[1]] for k, v in r.within.items()})
        out["against single-class sources"] = [r.against_single_class[0],
                                               *r.against_single_class[1]]
        return {k: [json_number(x) for x in v] for k, v in out.items()}

    by_source = {str(s): [int(labels[sources == s].sum()), int((labels[sources == s] == 0).sum())]
                 for s in sorted(set(sources.tolist()))}
    return {"n": [len(paths), int(labels.sum())], "per_source_covid_non_covid": by_source,
            "a": aucs(sa), "b": aucs(sb),
            "difference": paired_differences(sb, sa, labels, groups, sources,
                                             n_bootstrap=n_bootstrap, seed=seed)}


def markdown(result: dict[str, Any], name_a: str, name_b: str) -> str:
    """Format the comparison as a Markdown table (AUC, 95% intervals; B - A paired)."""

    def fmt(v: list[float | None]) -> str:
        if v[0] is None:
            return "n/a"
        ci = "" if v[1] is None or v[2] is None else f" ({v[1]:.3f}-{v[2]:.3f})"
        return f"{v[0]:.3f}{ci}"

    lines = [f"| {result['n'][0]} images ({result['n'][1]} COVID) | {name_a} | {name_b} | "
             f"paired difference {name_b} - {name_a} (95% CI, patient bootstrap) |",
             "|---|---|---|---|"]
    for key, diff in result["difference"].items():
        lo, hi = diff["ci"]
        ci = "n/a" if lo is None or hi is None else f"{lo:+.3f} to {hi:+.3f}"
        lines.append(f"| AUC {key} | {fmt(result['a'][key])} | {fmt(result['b'][key])} | "
                     f"{diff['difference']:+.3f} ({ci}) |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("scores_a", type=Path, help="model A's scores.csv (cxr-eval)")
    p.add_argument("scores_b", type=Path, help="model B's scores.csv (cxr-eval)")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("A", "B"))
    p.add_argument("--exclude-seen", type=Path, action="append", default=[],
                   help="split CSV whose train/val images and patients are left out "
                        "(repeatable: one per model)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the Markdown table and returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        result = compare(read_scores(args.scores_a), read_scores(args.scores_b),
                         exclude=[seen_by(s) for s in args.exclude_seen],
                         n_bootstrap=args.bootstrap)
    except DatasetError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result, *args.names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
