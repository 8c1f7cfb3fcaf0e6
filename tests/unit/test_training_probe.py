"""cxr-probe: per-source AUCs, patient-grouped folds, paired bootstrap, real features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from cxr_pipeline.model.architectures import default_checkpoint_path
from tests.support.pool import one_image_per_patient
from training.datasets import COVID, NON_COVID, Sample, read_manifest, with_split, write_manifest
from training.probe import extract_features, probe_spec
from training.probe import main as probe_main
from training.probe_stats import (
    cross_validated_scores,
    fit_probe,
    paired_differences,
    probe_scores,
    source_aucs,
)


def _toy(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = np.array(["ieee"] * 40 + ["nih"] * 40)
    labels = np.array([1] * 25 + [0] * 15 + [0] * 40)
    scores = rng.random(80) + labels * 0.5 + (sources == "ieee") * 0.3
    return scores, labels, sources


def test_source_aucs_split_the_contrast_from_the_within_source_figure() -> None:
    scores, labels, sources = _toy()
    f = source_aucs(scores, labels, sources, n_bootstrap=200)
    assert f.overall[0] == pytest.approx(roc_auc_score(labels, scores))
    assert list(f.within) == ["ieee"]  # nih holds one class: no within-source AUC
    w = sources == "ieee"
    assert f.within["ieee"][0] == pytest.approx(roc_auc_score(labels[w], scores[w]))
    single = (labels == 1) | (sources == "nih")
    assert f.against_single_class[0] == pytest.approx(
        roc_auc_score(labels[single], scores[single]))
    lo, hi = f.within["ieee"][1]
    assert lo < f.within["ieee"][0] < hi
    assert f.n == (80, 25)
    again = type(f).from_dict(json.loads(json.dumps(f.as_dict())))
    assert again == f


def test_folds_never_split_a_patient() -> None:
    # Each patient has 3 images with the same random 300-d features and one label drawn
    # at random: nothing generalises, but a probe that saw a patient's other images
    # memorises it. Grouped folds must give chance; image-level folds would not.
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(60), 3)
    per_patient = rng.normal(size=(60, 300))
    feats = per_patient[patients] + 0.01 * rng.normal(size=(180, 300))
    labels = rng.integers(0, 2, 60)[patients]
    sources = np.array(["s"] * 180)
    views = (feats, feats)
    grouped = cross_validated_scores(views, labels, patients.astype(str), sources, c=10.0,
                                     folds=5, seeds=(0,))
    assert roc_auc_score(labels, grouped) < 0.75
    leaky = np.zeros(180)
    for fit, held in KFold(5, shuffle=True, random_state=0).split(feats):
        model = fit_probe((feats[fit], feats[fit]), labels[fit], c=10.0)
        leaky[held] = probe_scores(model, (feats[held], feats[held]))
    assert roc_auc_score(labels, leaky) > 0.95  # the test can tell the difference


def test_paired_difference_of_a_model_with_itself_is_zero_and_a_better_one_wins() -> None:
    scores, labels, sources = _toy()
    groups = np.array([f"p{i // 2}" for i in range(80)])
    same = paired_differences(scores, scores, labels, groups, sources, n_bootstrap=100)
    assert same["overall"]["difference"] == 0.0
    assert same["overall"]["ci"] == [0.0, 0.0]
    better = scores + labels * 2.0
    d = paired_differences(better, scores, labels, groups, sources, n_bootstrap=200)
    assert d["overall"]["difference"] > 0
    assert d["within ieee"]["ci"][0] > 0
    assert set(d) == {"overall", "within ieee", "against single-class sources"}


def _real_rows(shared_data_dir: Path) -> list[Sample]:
    """One image per patient: 8 ieee8023 COVID, 6 ieee8023 other, 8 NIH."""
    picked = one_image_per_patient(read_manifest(shared_data_dir / "manifest.csv"),
                                   ((COVID, "ieee", 8), (NON_COVID, "ieee", 6),
                                    (NON_COVID, "NIH", 8)))
    # every other image of each stratum to test, the rest to train
    return [with_split([s], "test" if i % 2 else "train")[0] for i, s in enumerate(picked)]


def test_real_features_are_the_backbone_output_and_its_flip(shared_data_dir: Path) -> None:
    from cxr_pipeline.model.architectures import build_model
    from cxr_pipeline.model.preprocess import EvalTransform
    from training.datasets import load_image, resolve
    from training.features import split_backbone_head

    rows = _real_rows(shared_data_dir)[:3]
    spec = probe_spec(96)
    model = build_model("efficientnet_lite0", weights="IMAGENET1K").eval()
    plain, flipped = extract_features(rows, shared_data_dir, spec=spec, layers=("14", "head"),
                                      model=model, batch=2)
    assert plain.shape == flipped.shape == (3, 2 * (192 + 1280))
    backbone, _ = split_backbone_head(model, "efficientnet_lite0")
    x = torch.stack([EvalTransform(spec)(load_image(resolve(s, shared_data_dir)))
                     for s in rows])
    with torch.inference_mode():
        pooled_head = backbone(x).numpy()
        pooled_head_flipped = backbone(torch.flip(x, dims=[3])).numpy()
    head_mean = slice(2 * 192, 2 * 192 + 1280)  # block 14 mean+max, then head mean
    # (batches of 2 here, of 3 there: float sums differ in the last bits)
    np.testing.assert_allclose(plain[:, head_mean], pooled_head, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flipped[:, head_mean], pooled_head_flipped, rtol=1e-4, atol=1e-4)
    assert not np.allclose(plain, flipped)
    with pytest.raises(ValueError, match="block index"):
        extract_features(rows, shared_data_dir, spec=spec, layers=("stem",), model=model)


def test_cli_end_to_end_on_real_images(shared_data_dir: Path, tmp_path: Path) -> None:
    rows = _real_rows(shared_data_dir)
    split = tmp_path / "split.csv"
    # an unused row is never read (its file does not exist)
    unused = with_split([Sample("images/missing.png", NON_COVID, "nih-x", "NIH")], "unused")
    write_manifest([*rows, *unused], split)
    test_rows = [s for s in rows if s.split == "test"]
    scores = tmp_path / "scores.csv"
    scores.write_text("path,covid_probability\n" + "".join(
        f"{s.path},{0.9 if s.label == COVID else 0.1}\n" for s in test_rows))
    args = ["--split", str(split), "--data-dir", str(shared_data_dir), "--crop", "64",
            "--folds", "2", "--seeds", "1", "--bootstrap", "50", "--threads", "1"]
    assert probe_main([*args, "--out", str(tmp_path / "out"), "--compare", str(scores)]) == 0
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert result["n_test"] == len(test_rows) and result["n_pool"] == len(rows)
    assert set(result["test"]["within"]) == {"ieee8023/covid-chestxray-dataset"}
    # the compared "model" separates perfectly, so the probe cannot beat it
    assert result["compare"]["other"]["overall"]["auc"] == 1.0
    assert result["compare"]["probe_minus_other"]["overall"]["difference"] <= 0.0
    scores.write_text("path,covid_probability\n" + f"{test_rows[0].path},0.5\n")
    assert probe_main([*args, "--out", str(tmp_path / "out2"), "--compare", str(scores)]) == 2
    assert not (tmp_path / "out2" / "probe.json").exists()


def test_figures_without_intervals_are_strict_json() -> None:
    scores, labels, sources = _toy()
    f = source_aucs(scores, labels, sources, n_bootstrap=0)
    text = json.dumps(f.as_dict(), allow_nan=False)
    assert json.loads(text)["overall"]["ci"] == [None, None]
    again = type(f).from_dict(json.loads(text))
    assert again.overall[0] == f.overall[0] and np.isnan(again.overall[1][0])


def test_probe_spec_is_the_packaged_default_models_preprocessing() -> None:
    from cxr_pipeline.model.architectures import load_checkpoint

    _, card = load_checkpoint(default_checkpoint_path())
    assert probe_spec(card.preprocessing.crop) == card.preprocessing
    wider = probe_spec(320)
    assert (wider.crop, wider.resize) == (320, round(320 * 256 / 224))


def test_paired_difference_without_a_single_class_source_has_no_such_entry() -> None:
    scores, labels, sources = _toy()
    only = sources == "ieee"  # one source holding both classes, nothing else
    groups = np.array([f"p{i}" for i in range(int(only.sum()))])
    d = paired_differences(scores[only] + labels[only], scores[only], labels[only], groups,
                           sources[only], n_bootstrap=50)
    assert set(d) == {"overall", "within ieee"}
    assert json.loads(json.dumps(d, allow_nan=False)) == d
