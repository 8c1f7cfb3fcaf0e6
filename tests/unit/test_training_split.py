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
from training.split import PAPER_RECIPE, SplitRecipe, check_patient_disjoint, main, make_split


@pytest.fixture(scope="module")
def pool(shared_data_dir: Path) -> list:
    return read_manifest(shared_data_dir / "manifest.csv")


def _splits_of_patients(samples: list) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        seen[s.patient_id].add(s.split)
    return seen


def test_small_pool_keeps_the_papers_proportions_and_says_so(pool: list) -> None:
    assert class_counts(pool) == {COVID: 128, NON_COVID: 326}
    result = make_split(pool, seed=0)
    assert len(result.notes) == 2 and all("POOL TOO SMALL" in n for n in result.notes)
    # Paper: COVID 84 train : 100 test; non-COVID 2000 : 3000.
    assert result.recipe.train_covid == round(128 * 84 / 184) == 58
    assert result.recipe.train_non_covid == round(326 * 0.4) == 130
    assert len(result.samples) == len(pool)  # the whole pool is used
    for patient, splits in _splits_of_patients(result.samples).items():
        assert len(splits) == 1, patient
    train = result.of("train")
    val = result.of("val")
    test = result.of("test")
    tv = class_counts(train + val)
    te = class_counts(test)
    # Whole patients: counts land within a few images of the targets.
    assert abs(tv[COVID] - 58) <= 3 and abs(te[COVID] - 70) <= 3
    assert abs(tv[NON_COVID] - 130) <= 3 and abs(te[NON_COVID] - 196) <= 3
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
    assert len(back) == 454 and {s.split for s in back} == {"train", "val", "test"}
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
