"""``cxr-split``: the paper's patient-disjoint train/validation/test split of an image pool.

The Deep-COVID recipe (Minaee et al. 2020, COVID-Xray-5k): train 84 COVID + 2000
non-COVID, test 100 COVID + 3000 non-COVID, the 84 COVID training images augmented 5x
(420). The paper has no validation set; here a validation split is carved from the
training patients so that the best epoch and the operating threshold are never chosen
on the test set.

When the pool is smaller than the recipe, the split says so loudly and applies the
paper's per-class train/test proportions (COVID 84:100, non-COVID 2000:3000) to the
whole pool, unless explicit counts are given. It never changes the recipe silently.
Images of one patient always land in the same split.

For small pools, ``--fractions TRAIN VAL TEST`` makes a patient-disjoint split
**stratified by source and label** instead (:func:`make_stratified_split`): every
(source, label) stratum, e.g. the Cohen collection's non-COVID findings, is divided in
those proportions, so no stratum is starved in training. Scaling the paper's 2000:3000
non-COVID proportion down to the shared pool put 72 of its 99 ieee8023 non-COVID images
(the hard negatives: other pneumonias, ARDS) in the test split and 21 in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from training.datasets import (
    COVID,
    LABELS,
    NON_COVID,
    DatasetError,
    Sample,
    class_counts,
    read_manifest,
    scan_covid_xray_5k,
    write_manifest,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitRecipe:
    """Image counts per split and class, and the COVID training copies."""

    train_covid: int = 84
    train_non_covid: int = 2000
    test_covid: int = 100
    test_non_covid: int = 3000
    covid_copies: int = 5
    """Training copies of each COVID training image (the paper: 5x augmentation)."""
    val_fraction: float = 0.15
    """Share of the training patients (per class) held out for validation."""

    def needed(self, label: str) -> int:
        """Images of ``label`` the recipe uses (train + test, validation included)."""
        if label == COVID:
            return self.train_covid + self.test_covid
        return self.train_non_covid + self.test_non_covid


PAPER_RECIPE = SplitRecipe()
"""The paper's COVID-Xray-5k counts."""


@dataclass
class SplitResult:
    """A split pool plus how it was made.

    Attributes
    ----------
    samples
        Every pool image with its ``split`` (``train``/``val``/``test``/``unused``).
    recipe
        The counts actually targeted.
    notes
        Human-readable statements about deviations from the paper's recipe.
    """

    samples: list[Sample]
    recipe: SplitRecipe
    notes: list[str] = field(default_factory=list)

    def of(self, split: str) -> list[Sample]:
        """Return the samples of one split."""
        return [s for s in self.samples if s.split == split]


def scale_to_pool(recipe: SplitRecipe, pool: Sequence[Sample]) -> tuple[SplitRecipe, list[str]]:
    """Shrink a recipe to a smaller pool keeping each class's train:test proportion.

    Parameters
    ----------
    recipe
        Target counts.
    pool
        The available images.

    Returns
    -------
    tuple of (SplitRecipe, list of str)
        The recipe to use (unchanged when the pool is large enough) and notes saying
        what was changed and why.
    """
    counts = class_counts(pool)
    notes: list[str] = []
    values: dict[str, int] = {}
    for label, train_key, test_key in (
        (COVID, "train_covid", "test_covid"),
        (NON_COVID, "train_non_covid", "test_non_covid"),
    ):
        need = recipe.needed(label)
        have = counts[label]
        if have >= need:
            continue
        train_share = getattr(recipe, train_key) / need
        train_n = round(have * train_share)
        values[train_key] = train_n
        values[test_key] = have - train_n
        notes.append(
            f"POOL TOO SMALL for the paper's recipe: {have} {label} images, the recipe needs "
            f"{need} ({getattr(recipe, train_key)} train + {getattr(recipe, test_key)} test). "
            f"Using the paper's {label} train:test proportion {train_share:.3f}:"
            f"{1 - train_share:.3f} -> {train_n} train (validation included) + "
            f"{have - train_n} test."
        )
    return replace(recipe, **values), notes  # type: ignore[arg-type]


def _groups(samples: Sequence[Sample]) -> list[list[Sample]]:
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s)
    return [by_patient[k] for k in sorted(by_patient)]


def _assign(
    groups: list[list[Sample]],
    targets: dict[str, dict[str, int]],
    rng: np.random.Generator,
    *,
    fill: bool,
) -> dict[str, list[Sample]]:
    # scikit-learn's group splitters (GroupShuffleSplit, StratifiedGroupKFold) take a
    # fraction or a fold count, not per-class image counts per split; this greedy packing
    # places whole patients where they fill the most missing images of their classes.
    remaining = {name: dict(t) for name, t in targets.items()}
    out: dict[str, list[Sample]] = {name: [] for name in [*targets, "unused"]}
    order = [groups[i] for i in rng.permutation(len(groups))]
    order.sort(key=len, reverse=True)  # stable: random order within equal sizes
    for group in order:
        have = class_counts(group)
        best_name, best_gain = "unused", 0 if not fill else -(10**9)
        for name, rem in remaining.items():
            gain = sum(min(have[c], rem[c]) - max(0, have[c] - rem[c]) for c in LABELS)
            if gain > best_gain:
                best_name, best_gain = name, gain
        out[best_name].extend(group)
        if best_name != "unused":
            for c in LABELS:
                remaining[best_name][c] -= have[c]
    return out


def make_split(
    pool: Sequence[Sample],
    recipe: SplitRecipe = PAPER_RECIPE,
    *,
    seed: int = 0,
    scale: bool = True,
    keep_test: bool = False,
) -> SplitResult:
    """Split a pool into patient-disjoint train, validation and test sets.

    Parameters
    ----------
    pool
        Labelled images with patient ids.
    recipe
        Target counts; validation is ``recipe.val_fraction`` of the training counts.
    seed
        Seed of the patient shuffling.
    scale
        When the pool is smaller than the recipe, apply the recipe's proportions to the
        pool (with a loud note). When False, a too-small pool is an error.
    keep_test
        Keep the pool's own ``split == "test"`` assignment (the authors' test set) and
        split only the rest into train and validation.

    Returns
    -------
    SplitResult
        Samples with ``split`` and ``copies`` set.

    Raises
    ------
    DatasetError
        Pool too small with ``scale=False``, or a patient would span two splits.
    """
    if not pool:
        raise DatasetError("empty pool")
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    if keep_test:
        test = [replace(s, split="test", copies=1) for s in pool if s.split == "test"]
        rest = [s for s in pool if s.split != "test"]
        test_patients = {s.patient_id for s in test}
        if any(s.patient_id in test_patients for s in rest):
            raise DatasetError("the pool's own test split shares patients with its train split")
        tc = class_counts(test)
        used = replace(recipe, test_covid=tc[COVID], test_non_covid=tc[NON_COVID])
        rc = class_counts(rest)
        if (rc[COVID], rc[NON_COVID]) != (used.train_covid, used.train_non_covid):
            notes.append(
                f"Keeping the pool's own test split ({tc[COVID]} COVID, {tc[NON_COVID]} "
                f"non-COVID); training pool has {rc[COVID]} COVID, {rc[NON_COVID]} non-COVID "
                f"(paper: {recipe.train_covid}, {recipe.train_non_covid}): all are used."
            )
        used = replace(used, train_covid=rc[COVID], train_non_covid=rc[NON_COVID])
        trainval = rest
        unused: list[Sample] = []
    else:
        counts = class_counts(pool)
        short = any(counts[c] < recipe.needed(c) for c in LABELS)
        if short and not scale:
            raise DatasetError(
                f"pool has {counts[COVID]} COVID and {counts[NON_COVID]} non-COVID images; "
                f"the recipe needs {recipe.needed(COVID)} and {recipe.needed(NON_COVID)}"
            )
        used, notes = scale_to_pool(recipe, pool) if short else (recipe, [])
        targets = {
            "test": {COVID: used.test_covid, NON_COVID: used.test_non_covid},
            "trainval": {COVID: used.train_covid, NON_COVID: used.train_non_covid},
        }
        parts = _assign(_groups(pool), targets, rng, fill=short)
        test = parts["test"]
        trainval = parts["trainval"]
        unused = parts["unused"]
    tv = class_counts(trainval)
    val_targets = {c: round(tv[c] * used.val_fraction) for c in LABELS}
    parts = _assign(
        _groups(trainval),
        {"val": val_targets, "train": {c: tv[c] - val_targets[c] for c in LABELS}},
        rng,
        fill=True,
    )
    samples = [
        *(replace(s, split="train", copies=used.covid_copies if s.label == COVID else 1)
          for s in parts["train"]),
        *(replace(s, split="val", copies=1) for s in parts["val"]),
        *(replace(s, split="test", copies=1) for s in test),
        *(replace(s, split="unused", copies=1) for s in unused),
    ]
    check_patient_disjoint(samples)
    result = SplitResult(samples=samples, recipe=used, notes=notes)
    for split, target in (("test", (used.test_covid, used.test_non_covid)),):
        got = class_counts(result.of(split))
        if (got[COVID], got[NON_COVID]) != target:
            notes.append(
                f"{split}: {got[COVID]} COVID / {got[NON_COVID]} non-COVID instead of "
                f"{target[0]} / {target[1]} (whole patients cannot be divided)"
            )
    return result


Stratum = tuple[str, str]
"""(source, label) of an image."""


def stratum_of(sample: Sample) -> Stratum:
    """Return the (source, label) stratum of a sample."""
    return (sample.source, sample.label)


def stratum_targets(counts: dict[Stratum, int], fractions: Sequence[float]
                    ) -> dict[str, dict[Stratum, int]]:
    """Images of every stratum wanted in each split (largest-remainder rounding).

    Parameters
    ----------
    counts
        Images per (source, label) stratum.
    fractions
        Train, validation and test fractions (positive, summing to 1).

    Returns
    -------
    dict
        ``{split: {stratum: count}}``; the counts of a stratum sum to its size.

    Raises
    ------
    DatasetError
        Not three fractions, a fraction not positive, or a sum other than 1.
    """
    if len(fractions) != len(SPLITS):
        raise DatasetError(f"need {len(SPLITS)} fractions (train, val, test), got {fractions}")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DatasetError(f"fractions must be positive and sum to 1, got {fractions}")
    out: dict[str, dict[Stratum, int]] = {name: {} for name in SPLITS}
    for stratum in sorted(counts):
        n = counts[stratum]
        exact = [n * f for f in fractions]
        base = [int(np.floor(x)) for x in exact]
        # Largest remainder first; ties go to the earlier split (train, val, test).
        by_remainder = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - base[i]), i))
        for i in by_remainder[: n - sum(base)]:
            base[i] += 1
        for name, k in zip(SPLITS, base, strict=True):
            out[name][stratum] = k
    return out


def make_stratified_split(
    pool: Sequence[Sample],
    fractions: Sequence[float] = (0.6, 0.15, 0.25),
    *,
    seed: int = 0,
    covid_copies: int = PAPER_RECIPE.covid_copies,
) -> SplitResult:
    """Split a pool patient-disjoint, every (source, label) stratum in the same proportions.

    Patients are taken largest first (random order among equal sizes, from ``seed``) and
    each goes, whole, to the split where it fills the most still-missing images of its
    strata (images beyond a split's target count against it); among equally good splits
    the one missing the largest share of its targets for those strata wins, so large
    patients spread over the splits. A patient with images in several strata (e.g.
    COVID-19 and another finding) counts in each.

    Parameters
    ----------
    pool
        Labelled images with patient ids and sources.
    fractions
        Train, validation and test fractions of every stratum.
    seed
        Seed of the patient order.
    covid_copies
        Training copies of each COVID training image (the paper's 5x augmentation).

    Returns
    -------
    SplitResult
        Every pool image with ``split`` and ``copies`` set; ``notes`` gives the targets
        a stratum missed because whole patients cannot be divided.

    Raises
    ------
    DatasetError
        Empty pool, bad fractions, or a patient spanning two splits.
    """
    if not pool:
        raise DatasetError("empty pool")
    targets = stratum_targets(Counter(stratum_of(s) for s in pool), fractions)
    remaining = {name: dict(t) for name, t in targets.items()}
    rng = np.random.default_rng(seed)
    groups = _groups(pool)
    order = [groups[i] for i in rng.permutation(len(groups))]
    order.sort(key=len, reverse=True)  # stable: random order within equal sizes
    chosen: dict[str, str] = {}
    for group in order:
        have: dict[Stratum, int] = defaultdict(int)
        for s in group:
            have[stratum_of(s)] += 1

        def score(name: str, have: dict[Stratum, int] = have) -> tuple[int, float]:
            rem = remaining[name]
            gain = sum(min(k, max(rem[st], 0)) - max(0, k - max(rem[st], 0))
                       for st, k in have.items())
            share = sum(max(rem[st], 0) / max(targets[name][st], 1) for st in have)
            return gain, share

        best = max(SPLITS, key=score)  # max keeps the first of equal scores
        chosen[group[0].patient_id] = best
        for st, k in have.items():
            remaining[best][st] -= k
    samples = [replace(s, split=chosen[s.patient_id],
                       copies=covid_copies if chosen[s.patient_id] == "train"
                       and s.label == COVID else 1) for s in pool]
    check_patient_disjoint(samples)
    recipe = replace(PAPER_RECIPE, covid_copies=covid_copies, val_fraction=fractions[1])
    train_val = class_counts([s for s in samples if s.split != "test"])
    test = class_counts([s for s in samples if s.split == "test"])
    recipe = replace(recipe, train_covid=train_val[COVID], train_non_covid=train_val[NON_COVID],
                     test_covid=test[COVID], test_non_covid=test[NON_COVID])
    placed = Counter((s.split, stratum_of(s)) for s in samples)
    notes: list[str] = []
    for name in SPLITS:
        for st, want in sorted(targets[name].items()):
            got = placed[(name, st)]
            if got != want:
                notes.append(f"{name} {st[0]} {st[1]}: {got} images instead of {want} "
                             f"(whole patients cannot be divided)")
    return SplitResult(samples=samples, recipe=recipe, notes=notes)


def check_patient_disjoint(samples: Sequence[Sample]) -> None:
    """Raise :class:`DatasetError` if one patient appears in two of train/val/test."""
    seen: dict[str, str] = {}
    for s in samples:
        if s.split not in SPLITS:
            continue
        other = seen.setdefault(s.patient_id, s.split)
        if other != s.split:
            raise DatasetError(f"patient {s.patient_id} is in both {other} and {s.split}")


def summary_rows(result: SplitResult) -> list[tuple[str, str, int, int, int]]:
    """(split, source, COVID, non-COVID, COVID training copies) per split and source."""
    rows = []
    for split in (*SPLITS, "unused"):
        members = result.of(split)
        for source in sorted({s.source for s in members}):
            sub = [s for s in members if s.source == source]
            c = class_counts(sub)
            copies = sum(s.copies for s in sub if s.label == COVID)
            rows.append((split, source, c[COVID], c[NON_COVID], copies))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-split", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="pool manifest CSV (path,label,patient_id,...)")
    src.add_argument("--covid-xray-5k", type=Path, help="folder with train/{covid,non}, test/...")
    p.add_argument("--out", type=Path, required=True, help="split manifest CSV to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-covid", type=int, help="explicit count (default: paper's 84)")
    p.add_argument("--train-non-covid", type=int, help="explicit count (default: 2000)")
    p.add_argument("--test-covid", type=int, help="explicit count (default: 100)")
    p.add_argument("--test-non-covid", type=int, help="explicit count (default: 3000)")
    p.add_argument("--covid-copies", type=int, default=PAPER_RECIPE.covid_copies)
    p.add_argument("--val-fraction", type=float, default=PAPER_RECIPE.val_fraction)
    p.add_argument("--no-scale", action="store_true",
                   help="fail instead of scaling the recipe down to a smaller pool")
    p.add_argument("--keep-test", action="store_true",
                   help="keep the pool's own test split (e.g. the authors' COVID-Xray-5k test)")
    p.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="small pools: patient-disjoint split stratified by source and label, "
                        "these fractions of every stratum (instead of the paper's counts)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-split``; returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.manifest is not None:
            pool = read_manifest(args.manifest)
        else:
            pool = scan_covid_xray_5k(args.covid_xray_5k)
        explicit = {
            k: getattr(args, k)
            for k in ("train_covid", "train_non_covid", "test_covid", "test_non_covid")
            if getattr(args, k) is not None
        }
        if args.fractions is not None:
            if explicit or args.keep_test or args.no_scale:
                raise DatasetError("--fractions cannot be combined with explicit counts, "
                                   "--keep-test or --no-scale")
            result = make_stratified_split(pool, args.fractions, seed=args.seed,
                                           covid_copies=args.covid_copies)
        else:
            recipe = replace(PAPER_RECIPE, covid_copies=args.covid_copies,
                             val_fraction=args.val_fraction, **explicit)
            result = make_split(pool, recipe, seed=args.seed,
                                scale=not (explicit or args.no_scale), keep_test=args.keep_test)
    except DatasetError as exc:
        console.print(f"[bold red]cxr-split: {exc}")
        return 2
    if args.fractions is not None:
        train, val, test = args.fractions
        console.print(f"Stratified by source and label: fractions train {train:g}, val {val:g}, "
                      f"test {test:g} of every stratum (not the paper's counts).")
    for note in result.notes:
        console.print(f"[bold red]WARNING:[/] {note}")
    write_manifest(result.samples, args.out)
    table = Table(title=f"split written to {args.out} (seed {args.seed})")
    for col in ("split", "source", "COVID", "non-COVID", "COVID training copies"):
        table.add_column(col)
    for row in summary_rows(result):
        table.add_row(*(str(v) for v in row))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
