"""cxr-split on the real shared manifest and on a COVID-Xray-5k layout of real images."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from training.datasets import (
    COVID,
    NON_COVID,
    DatasetError,
    class_counts,
    read_manifest,
    scan_covid_xray_5k,
    write_manifest,
)
from training.split import (
    PAPER_RECIPE,
    SPLITS,
    SplitRecipe,
    check_patient_disjoint,
    main,
    make_split,
    make_stratified_split,
    stratum_of,
    stratum_targets,
)


@pytest.fixture(scope="module")
def pool(shared_data_dir: Path) -> list:
    return read_manifest(shared_data_dir / "manifest.csv")


def _splits_of_patients(samples: list) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        seen[s.patient_id].add(s.split)
    return seen


def test_small_pool_keeps_the_papers_proportions_and_says_so(pool: list) -> None:
    counts = class_counts(pool)  # from the shared manifest, never hard-coded
    result = make_split(pool, seed=0)
    short = [c for c in (COVID, NON_COVID) if counts[c] < PAPER_RECIPE.needed(c)]
    assert short, "the shared pool is smaller than the paper's COVID-Xray-5k"
    assert sum("POOL TOO SMALL" in n for n in result.notes) == len(short)
    # Paper: COVID 84 train : 100 test; non-COVID 2000 : 3000. A short class keeps that
    # train share of the pool; a class with enough images keeps the paper's counts.
    share = {COVID: 84 / 184, NON_COVID: 0.4}
    paper_train = {COVID: 84, NON_COVID: 2000}
    recipe_train = {COVID: result.recipe.train_covid, NON_COVID: result.recipe.train_non_covid}
    for c in (COVID, NON_COVID):
        expected = round(counts[c] * share[c]) if c in short else paper_train[c]
        assert recipe_train[c] == expected
    assert len(result.samples) == len(pool)  # the whole pool is used (short pool: fill)
    for patient, splits in _splits_of_patients(result.samples).items():
        assert len(splits) == 1, patient
    train = result.of("train")
    val = result.of("val")
    test = result.of("test")
    tv = class_counts(train + val)
    te = class_counts(test)
    assert tv[COVID] + te[COVID] == counts[COVID]
    assert tv[NON_COVID] + te[NON_COVID] == counts[NON_COVID]
    # Whole patients: a short class lands within a few images of its targets.
    for c in short:
        assert abs(tv[c] - recipe_train[c]) <= 3
    assert class_counts(val)[COVID] >= 1 and class_counts(val)[NON_COVID] >= 1
    # 5x COVID copies in training only.
    assert {s.copies for s in train if s.label == COVID} == {5}
    assert {s.copies for s in val + test} == {1}
    assert {s.copies for s in train if s.label == NON_COVID} == {1}


def test_patients_with_both_classes_stay_together(pool: list) -> None:
    mixed = {"ieee-173", "ieee-270"}
    result = make_split(pool, seed=3)
    for patient in mixed:
        assert len(_splits_of_patients(result.samples)[patient]) == 1


def test_split_is_seeded(pool: list) -> None:
    a = [(s.path, s.split) for s in make_split(pool, seed=7).samples]
    b = [(s.path, s.split) for s in make_split(pool, seed=7).samples]
    c = [(s.path, s.split) for s in make_split(pool, seed=8).samples]
    assert a == b
    assert sorted(a) != sorted(c)


def test_explicit_counts_and_no_scaling(pool: list) -> None:
    recipe = SplitRecipe(train_covid=20, train_non_covid=40, test_covid=20, test_non_covid=40)
    result = make_split(pool, recipe, seed=0, scale=False)
    assert result.notes == [] or all("instead of" in n for n in result.notes)
    test = class_counts(result.of("test"))
    assert abs(test[COVID] - 20) <= 3 and abs(test[NON_COVID] - 40) <= 3
    assert result.of("unused")  # the rest of the pool is set aside, not used
    with pytest.raises(DatasetError, match="recipe needs"):
        make_split(pool, PAPER_RECIPE, scale=False)


def test_disjointness_check_catches_a_shared_patient(pool: list) -> None:
    samples = make_split(pool, seed=0).samples
    bad = [replace(samples[0], split="test" if samples[0].split != "test" else "train"),
           *samples]
    with pytest.raises(DatasetError, match="is in both"):
        check_patient_disjoint(bad)


def test_covid_xray_5k_layout_keeps_the_authors_test(tmp_path: Path, pool: list,
                                                     shared_data_dir: Path) -> None:
    covid = [s for s in pool if s.label == COVID][:12]
    non = [s for s in pool if s.label == NON_COVID][:18]
    root = tmp_path / "data_upload_v2"
    for i, s in enumerate(covid + non):
        split = "test" if i % 3 == 0 else "train"
        folder = root / split / ("covid" if s.label == COVID else "non")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(s.path).name).symlink_to(shared_data_dir / s.path)
    samples = scan_covid_xray_5k(tmp_path)
    assert len(samples) == 30
    assert {s.split for s in samples} == {"train", "test"}
    result = make_split(samples, seed=0, keep_test=True)
    before = {s.path for s in samples if s.split == "test"}
    assert {s.path for s in result.of("test")} == before
    assert result.of("val") and result.of("train")
    with pytest.raises(DatasetError):
        scan_covid_xray_5k(tmp_path / "data_upload_v2" / "train")


def test_cli_writes_a_manifest_that_reads_back(tmp_path: Path, shared_data_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "split.csv"
    assert main(["--manifest", str(shared_data_dir / "manifest.csv"), "--out", str(out),
                 "--seed", "0"]) == 0
    assert "POOL TOO SMALL" in capsys.readouterr().err
    back = read_manifest(out)
    pool = read_manifest(shared_data_dir / "manifest.csv")
    assert len(back) == len(pool) and {s.split for s in back} == {"train", "val", "test"}
    assert sorted(s.path for s in back) == sorted(s.path for s in pool)
    check_patient_disjoint(back)
    again = tmp_path / "again.csv"
    write_manifest(back, again)
    assert again.read_text() == out.read_text()
    assert main(["--manifest", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,covid\n")
    with pytest.raises(DatasetError, match="patient_id"):
        read_manifest(bad)
    bad.write_text("path,label,patient_id\na.png,flu,p1\n")
    with pytest.raises(DatasetError, match="unknown label"):
        read_manifest(bad)


FRACTIONS = (0.6, 0.15, 0.25)


def _stratum_counts(samples: list, split: str | None = None) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for s in samples:
        if split is None or s.split == split:
            counts[stratum_of(s)] += 1
    return dict(counts)


def test_stratified_split_is_patient_disjoint_and_keeps_every_strata_proportion(
        pool: list) -> None:
    result = make_stratified_split(pool, FRACTIONS, seed=0)
    assert len(result.samples) == len(pool)
    assert sorted(s.path for s in result.samples) == sorted(s.path for s in pool)
    assert {s.split for s in result.samples} == set(SPLITS)  # nothing unused
    for patient, splits in _splits_of_patients(result.samples).items():
        assert len(splits) == 1, patient
    check_patient_disjoint(result.samples)
    whole = _stratum_counts(pool)  # from the shared manifest, never hard-coded
    assert len(whole) >= 3  # NIH non-COVID, ieee8023 COVID, ieee8023 non-COVID at least
    sizes: dict[str, int] = defaultdict(int)
    for s in pool:
        sizes[s.patient_id] += 1
    slack = max(sizes.values())  # one whole patient
    for name, fraction in zip(SPLITS, FRACTIONS, strict=True):
        got = _stratum_counts(result.samples, name)
        for stratum, n in whole.items():
            assert abs(got.get(stratum, 0) - n * fraction) <= slack, (name, stratum)
            assert got.get(stratum, 0) >= 1, (name, stratum)  # no stratum starved
    # The hard negatives (a source holding both labels, non-COVID) are mostly in training.
    hard = [st for st in whole if st[1] == NON_COVID
            and (st[0], COVID) in whole]
    assert hard
    for st in hard:
        assert _stratum_counts(result.samples, "train")[st] > whole[st] / 2
    # 5 copies of each COVID training image, one of everything else.
    assert {s.copies for s in result.of("train") if s.label == COVID} == {5}
    assert {s.copies for s in result.samples
            if s.split != "train" or s.label != COVID} == {1}


def test_stratified_split_meets_the_rounded_targets_on_the_shared_pool(pool: list) -> None:
    result = make_stratified_split(pool, FRACTIONS, seed=0)
    targets = stratum_targets(_stratum_counts(pool), FRACTIONS)
    for name in SPLITS:
        got = _stratum_counts(result.samples, name)
        for stratum, want in targets[name].items():
            assert abs(got.get(stratum, 0) - want) <= 2, (name, stratum, got, want)
    missed = [n for n in result.notes if "instead of" in n]
    assert len(missed) == sum(
        _stratum_counts(result.samples, name).get(st, 0) != want
        for name in SPLITS for st, want in targets[name].items())


def test_stratum_targets_round_to_the_stratum_size() -> None:
    sizes = {("a", COVID): 350, ("a", NON_COVID): 99, ("b", NON_COVID): 517}
    targets = stratum_targets(sizes, FRACTIONS)
    assert [targets[n][("a", NON_COVID)] for n in SPLITS] == [59, 15, 25]
    assert [targets[n][("b", NON_COVID)] for n in SPLITS] == [310, 78, 129]
    assert [targets[n][("a", COVID)] for n in SPLITS] == [210, 53, 87]
    for st, n in sizes.items():
        assert sum(targets[name][st] for name in SPLITS) == n
    for bad in ((0.5, 0.5), (0.6, 0.3, 0.3), (1.0, 0.0, 0.0)):
        with pytest.raises(DatasetError, match="fractions"):
            stratum_targets({("a", COVID): 10}, bad)


def test_stratified_split_is_deterministic_by_seed(pool: list) -> None:
    a = [(s.path, s.split) for s in make_stratified_split(pool, FRACTIONS, seed=0).samples]
    b = [(s.path, s.split) for s in make_stratified_split(pool, FRACTIONS, seed=0).samples]
    c = [(s.path, s.split) for s in make_stratified_split(pool, FRACTIONS, seed=1).samples]
    assert a == b
    assert a != c


def test_patients_with_both_labels_stay_together_in_the_stratified_split(pool: list) -> None:
    mixed = [p for p, labels in _labels_of_patients(pool).items() if len(labels) == 2]
    assert mixed
    result = make_stratified_split(pool, FRACTIONS, seed=0)
    for patient in mixed:
        assert len(_splits_of_patients(result.samples)[patient]) == 1


def _labels_of_patients(samples: list) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        seen[s.patient_id].add(s.label)
    return seen


def test_cli_fractions_write_the_stratified_split(tmp_path: Path, shared_data_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "split.csv"
    manifest = str(shared_data_dir / "manifest.csv")
    assert main(["--manifest", manifest, "--out", str(out), "--seed", "0",
                 "--fractions", *map(str, FRACTIONS)]) == 0
    err = capsys.readouterr().err
    assert "Stratified by source and label" in err and "POOL TOO SMALL" not in err
    back = read_manifest(out)
    pool = read_manifest(shared_data_dir / "manifest.csv")
    expected = make_stratified_split(pool, FRACTIONS, seed=0).samples
    assert [(s.path, s.split, s.copies) for s in back] == [
        (s.path, s.split, s.copies) for s in expected]
    assert main(["--manifest", manifest, "--out", str(out), "--fractions", "0.5", "0.5",
                 "0.5"]) == 2
    assert main(["--manifest", manifest, "--out", str(out), "--fractions", *map(str, FRACTIONS),
                 "--keep-test"]) == 2
