"""``python -m training.compare``: paired AUCs of two cxr-eval score files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.compare import compare, main, read_scores, seen_by
from training.datasets import DatasetError


def _scores(path: Path, rows: list[tuple[str, str, str, str, float]]) -> Path:
    with path.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "label", "patient_id", "source", "covid_probability"])
        w.writerows(rows)
    return path


def _rows(seed: int, n: int = 60) -> list[tuple[str, str, str, str, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        covid = i % 3 == 0
        source = "ieee" if covid or i % 2 else "nih"
        out.append((f"img/{i}.png", "covid" if covid else "non_covid", f"p{i // 2}", source,
                    float(np.clip(rng.normal(0.6 if covid else 0.4, 0.2), 0, 1))))
    return out


def test_aucs_and_paired_difference_on_the_images_both_scored(tmp_path: Path) -> None:
    a_rows, b_rows = _rows(0), _rows(1)
    a = read_scores(_scores(tmp_path / "a.csv", a_rows))
    b = read_scores(_scores(tmp_path / "b.csv", b_rows[5:]))  # B scored fewer images
    split = tmp_path / "split.csv"
    with split.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "label", "patient_id", "source", "split"])
        w.writerow(["img/10.png", "non_covid", "p5", "ieee", "train"])  # p5 = images 10, 11
        w.writerow(["img/58.png", "non_covid", "p29", "nih", "test"])  # test rows stay
    result = compare(a, b, exclude=[seen_by(split)], n_bootstrap=200)
    kept = [r for r in a_rows[5:] if r[2] != "p5"]
    assert result["n"] == [len(kept), sum(r[1] == "covid" for r in kept)]
    y = [int(r[1] == "covid") for r in kept]
    auc_a = roc_auc_score(y, [r[4] for r in kept])
    by_path = {r[0]: r[4] for r in b_rows}
    auc_b = roc_auc_score(y, [by_path[r[0]] for r in kept])
    assert result["a"]["overall"][0] == pytest.approx(auc_a)
    assert result["b"]["overall"][0] == pytest.approx(auc_b)
    assert result["difference"]["overall"]["difference"] == pytest.approx(auc_b - auc_a)
    assert "within ieee" in result["difference"]


def test_the_same_scores_differ_by_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    path = _scores(tmp_path / "a.csv", _rows(2))
    assert main([str(path), str(path), "--bootstrap", "100", "--out",
                 str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "| AUC overall |" in printed and "+0.000 (+0.000 to +0.000)" in printed
    assert (tmp_path / "c.json").is_file()


def test_disagreeing_labels_are_an_error(tmp_path: Path) -> None:
    rows = _rows(3)
    flipped = [(p, "covid" if lab == "non_covid" else "non_covid", g, s, v)
               for p, lab, g, s, v in rows]
    a = read_scores(_scores(tmp_path / "a.csv", rows))
    b = read_scores(_scores(tmp_path / "b.csv", flipped))
    with pytest.raises(DatasetError, match="labelled"):
        compare(a, b, n_bootstrap=10)
