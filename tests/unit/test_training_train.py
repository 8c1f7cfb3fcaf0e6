"""cxr-train and cxr-eval end to end on a tiny real subset; feature cache == naive loop."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_pipeline.model.calibration import FIT_METHODS, expected_calibration_error
from tests.support.pool import one_image_per_patient
from training.datasets import COVID, NON_COVID, read_manifest, write_manifest
from training.evaluate import evaluate_scores
from training.evaluate import main as eval_main
from training.features import split_backbone_head
from training.metrics import operating_point, roc
from training.split import SplitRecipe, make_split
from training.train import TrainConfig, class_source_weights, run_training, weights_device_uid
from training.train import main as train_main

TINY = TrainConfig(architecture="squeezenet1_1", weights=None, epochs=2, batch_size=4,
                   lr=1e-3, optimizer="adam", scheduler="none", resize=72, crop=64, seed=0,
                   threads=1, target_sensitivity=0.98)


@pytest.fixture(scope="module")
def tiny_split(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 24 real images (one per patient), split patient-disjointly."""
    picked = one_image_per_patient(read_manifest(shared_data_dir / "manifest.csv"),
                                   ((COVID, "ieee", 10), (NON_COVID, "ieee", 5),
                                    (NON_COVID, "NIH", 9)))
    recipe = SplitRecipe(train_covid=6, train_non_covid=8, test_covid=4, test_non_covid=6,
                         covid_copies=2, val_fraction=0.34)
    result = make_split(picked, recipe, seed=0, scale=False)
    path = tmp_path_factory.mktemp("split") / "split.csv"
    write_manifest(result.samples, path)
    return path


@pytest.mark.parametrize("architecture", ["squeezenet1_1", "resnet18", "densenet121"])
def test_backbone_then_head_equals_the_model(architecture: str) -> None:
    from cxr_pipeline.model.architectures import build_model

    torch.manual_seed(0)
    model = build_model(architecture)
    backbone, head = split_backbone_head(model, architecture)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(head(backbone(x)), model(x), atol=1e-5)


def test_feature_cache_training_equals_the_naive_loop(tiny_split: Path,
                                                      shared_data_dir: Path) -> None:
    samples = read_manifest(tiny_split)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    # The paper's recipe: frozen backbone, last layer only, SGD + StepLR; no per-epoch
    # augmentation so both loops see identical inputs. SqueezeNet's head has dropout:
    # both loops must draw the same dropout masks too.
    cfg = replace(TINY, freeze_backbone=True, augment=False, optimizer="sgd", lr=0.01,
                  scheduler="step", step_size=1, epochs=3, balance="sampler")
    naive = run_training(train, val, shared_data_dir, replace(cfg, feature_cache=False),
                         progress=False)
    cached = run_training(train, val, shared_data_dir, replace(cfg, feature_cache=True),
                          progress=False)
    a, b = naive.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    # Frozen backbone really unchanged; the head really trained.
    from cxr_pipeline.model.architectures import build_model

    torch.manual_seed(cfg.seed)
    init = build_model("squeezenet1_1").state_dict()
    assert torch.equal(init["features.0.weight"], a["features.0.weight"])
    assert not torch.equal(init["classifier.1.weight"], a["classifier.1.weight"])
    for h1, h2 in zip(naive.history, cached.history, strict=True):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-4)
    assert naive.card.threshold == pytest.approx(cached.card.threshold, abs=1e-5)


def test_class_source_weights_give_every_class_and_source_its_share() -> None:
    from training.datasets import DatasetError, Sample

    items = ([Sample("c", COVID, "p1", "ieee")] * 50 + [Sample("h", NON_COVID, "p2", "ieee")] * 5
             + [Sample("n", NON_COVID, "p3", "NIH")] * 45)
    w = class_source_weights(items)
    assert w.shape == (100,) and float(w.mean()) == pytest.approx(1.0)
    by = {key: float(w[[i for i, s in enumerate(items) if (s.label, s.source) == key]].sum())
          for key in ((COVID, "ieee"), (NON_COVID, "ieee"), (NON_COVID, "NIH"))}
    # COVID half; non-COVID half, split evenly between its two sources.
    assert by[(COVID, "ieee")] == pytest.approx(50.0)
    assert by[(NON_COVID, "ieee")] == pytest.approx(25.0)
    assert by[(NON_COVID, "NIH")] == pytest.approx(25.0)
    with pytest.raises(DatasetError, match="lacks a class"):
        class_source_weights(items[:50])


def test_class_source_weighted_training_runs(tiny_split: Path, shared_data_dir: Path) -> None:
    samples = read_manifest(tiny_split)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    result = run_training(train, val, shared_data_dir,
                          replace(TINY, balance="class_source_weights"), progress=False)
    assert len(result.history) == TINY.epochs
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"])
               for h in result.history)


def test_train_and_eval_end_to_end(tiny_split: Path, shared_data_dir: Path,
                                   tmp_path: Path) -> None:
    from cxr_pipeline.model.architectures import load_checkpoint

    ckpt = tmp_path / "model.pt"
    rc = train_main(["--split", str(tiny_split), "--data-dir", str(shared_data_dir),
                     "--out", str(ckpt), "--architecture", "squeezenet1_1", "--weights", "none",
                     "--no-freeze", "--optimizer", "adam", "--lr", "1e-3", "--scheduler", "none",
                     "--epochs", "2", "--batch-size", "4", "--resize", "72", "--crop", "64",
                     "--threads", "1", "--no-progress"])
    assert rc == 0
    model, card = load_checkpoint(ckpt)
    record = json.loads(ckpt.with_suffix(".train.json").read_text())
    assert len(record["history"]) == 2
    assert card.architecture == "squeezenet1_1"
    assert card.preprocessing.crop == 64 and card.preprocessing.resize == 72
    assert card.class_names == ("non_covid", "covid")
    assert card.device_uid.startswith("2.25.") and card.device_uid == weights_device_uid(model)
    assert "not for diagnostic use" in card.intended_use
    assert "different sources" in card.intended_use
    assert 1 <= card.metrics["best_epoch"] <= 2
    assert "patient-disjoint" in card.training_data
    # The threshold reaches the target sensitivity on the validation split (rule p >= t);
    # it is one of the validation COVID scores.
    assert 0.0 <= card.threshold <= 1.0

    out = tmp_path / "report"
    assert eval_main(["--checkpoint", str(ckpt), "--split", str(tiny_split), "--data-dir",
                      str(shared_data_dir), "--out", str(out), "--bootstrap", "200",
                      "--update-card", "--fit-calibration"]) == 0
    for name in ("scores.csv", "table.csv", "per_source.csv", "evaluation.md",
                 "evaluation.json", "roc.png", "pr.png", "histogram.png", "confusion.png",
                 "calibration.csv", "calibration.json", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [s for s in read_manifest(tiny_split) if s.split == "test"]
    assert [r["path"] for r in rows] == [s.path for s in test]
    scores = np.array([float(r["covid_probability"]) for r in rows])
    calibrated = np.array([float(r["calibrated_probability"]) for r in rows])
    labels = np.array([s.target for s in test])
    report = json.loads((out / "evaluation.json").read_text())
    assert report["auc"] == pytest.approx(roc(scores, labels)[1], abs=1e-5)
    at = operating_point(scores, labels, card.threshold)
    assert report["at_threshold"]["tp"] == at.tp and report["at_threshold"]["tn"] == at.tn
    assert "| 0.1 |" in (out / "evaluation.md").read_text()
    sources = {row["source"] for row in report["per_source"]}
    assert sources == {s.source for s in test}
    # --update-card: test figures in the card, weights (and Device UID) unchanged.
    model2, card2 = load_checkpoint(ckpt)
    assert card2.metrics["test_auc"] == pytest.approx(report["auc"])
    assert card2.device_uid == card.device_uid == weights_device_uid(model2)
    on_disk = json.loads(ckpt.with_suffix(".card.json").read_text())
    assert on_disk["metrics"]["test_auc"] == pytest.approx(report["auc"])
    # --fit-calibration: a map fitted on the validation split, stored in the card, and the
    # report's "after" figures are those of the card's map on the test scores.
    chosen = json.loads((out / "calibration.json").read_text())
    assert card2.calibration.method == chosen["chosen"]["method"] in FIT_METHODS
    assert set(chosen["out_of_fold_log_loss"]) == set(FIT_METHODS)
    val = [s for s in read_manifest(tiny_split) if s.split == "val"]
    assert card2.calibration.n == len(val)
    assert card2.calibration.fitted_on.startswith("validation split of split.csv")
    assert on_disk["calibration"] == card2.calibration.to_dict()
    # The CSV's raw scores have 6 decimals; a map fitted on 5 validation images can be steep
    # enough to magnify that rounding to a few 1e-4.
    np.testing.assert_allclose(calibrated, card2.calibration.apply(scores), atol=2e-3)
    overall = report["calibration_figures"][0]
    assert overall["scope"] == "all" and overall["n"] == len(test)
    assert overall["ece_before"] == pytest.approx(expected_calibration_error(scores, labels),
                                                  abs=1e-5)
    assert overall["ece_after"] == pytest.approx(
        expected_calibration_error(calibrated, labels), abs=1e-5)
    assert {r["scope"] for r in report["calibration_figures"][1:]} == sources
    assert report["calibrated_threshold"] == pytest.approx(
        card2.operating_point().threshold)
    assert card2.metrics["test_ece"] == pytest.approx(overall["ece_after"])
    assert "## Calibration" in (out / "evaluation.md").read_text()


def test_calibration_split_must_not_overlap_the_test_split(
        tiny_split: Path, shared_data_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert eval_main(["--checkpoint", str(tiny_checkpoint), "--split", str(tiny_split),
                      "--data-dir", str(shared_data_dir), "--out", str(tmp_path / "r"),
                      "--fit-calibration", "--calibrate-on", "test"]) == 2
    assert not (tmp_path / "r").exists()


def test_evaluate_scores_per_source() -> None:
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.6])
    labels = np.array([1, 1, 0, 0, 0, 0])
    sources = ["a", "a", "a", "b", "b", "b"]
    r = evaluate_scores(scores, labels, threshold=0.5, sources=sources, n_bootstrap=100)
    assert r.auc == pytest.approx(1.0)
    by = {s.source: s for s in r.per_source}
    assert by["a"].point.sensitivity == 1.0 and by["a"].point.specificity == 1.0
    assert np.isnan(by["b"].point.sensitivity) and by["b"].point.specificity == pytest.approx(2 / 3)
    assert np.isnan(by["b"].auc)
    with pytest.raises(ValueError):
        evaluate_scores(scores[:2], labels[:2], threshold=0.5)


def test_efficientnet_lite0_splits_equal_the_model() -> None:
    from cxr_pipeline.model.architectures import build_model
    from training.features import split_for_finetune

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0")
    x = torch.randn(2, 3, 64, 64)
    backbone, head = split_backbone_head(model, "efficientnet_lite0")
    prefix, suffix = split_for_finetune(model, "efficientnet_lite0", 3)
    with torch.inference_mode():
        assert torch.allclose(head(backbone(x)), model(x), atol=1e-5)
        assert torch.allclose(suffix(prefix(x)), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="blocks"):
        split_for_finetune(model, "efficientnet_lite0", 17)
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        split_for_finetune(build_model("resnet18"), "resnet18", 1)


def test_efficientnet_recipes_from_the_packaged_imagenet_weights(
        tiny_split: Path, shared_data_dir: Path) -> None:
    from cxr_pipeline.model.architectures import build_model

    samples = read_manifest(tiny_split)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    lite = replace(TINY, architecture="efficientnet_lite0", weights="IMAGENET1K", epochs=3,
                   resize=72, crop=64)
    imagenet = build_model("efficientnet_lite0", weights="IMAGENET1K").state_dict()

    head = run_training(train, val, shared_data_dir, lite, progress=False)
    state = head.model.state_dict()
    assert torch.equal(state["_conv_stem.weight"], imagenet["_conv_stem.weight"])
    assert torch.equal(state["_blocks.15._project_conv.weight"],
                       imagenet["_blocks.15._project_conv.weight"])
    assert head.card.preprocessing.intensity == "rank"
    assert head.card.preprocessing.mean == (0.5, 0.5, 0.5)
    # The best epoch is the one with the best validation AUC (ties: lower loss).
    best = max(head.history, key=lambda h: (h["val_auc"], -h["val_loss"]))
    assert head.best_epoch == best["epoch"]

    tuned = run_training(train, val, shared_data_dir, replace(lite, finetune_blocks=2,
                         augment_copies=2), progress=False)
    state = tuned.model.state_dict()
    # Frozen prefix (blocks 0-13) unchanged, including batch-norm statistics; the last two
    # blocks and the head convolution trained; their running statistics kept.
    assert torch.equal(state["_blocks.13._project_conv.weight"],
                       imagenet["_blocks.13._project_conv.weight"])
    assert not torch.equal(state["_blocks.14._project_conv.weight"],
                           imagenet["_blocks.14._project_conv.weight"])
    assert not torch.equal(state["_conv_head.weight"], imagenet["_conv_head.weight"])
    assert torch.equal(state["_bn1.running_mean"], imagenet["_bn1.running_mean"])
    assert len(tuned.history) == 3 and 1 <= tuned.best_epoch <= 3


def test_report_states_the_within_source_auc_with_its_interval(tmp_path: Path) -> None:
    from training.datasets import Sample
    from training.evaluate import write_report

    rng = np.random.default_rng(0)
    # Source A: NIH-like, non-COVID only, low scores; source B holds both classes and its
    # scores barely separate them.
    labels = np.array([0] * 40 + [1] * 30 + [0] * 30)
    sources = ["A"] * 40 + ["B"] * 60
    scores = np.concatenate([rng.uniform(0.0, 0.2, 40), rng.uniform(0.3, 1.0, 30),
                             rng.uniform(0.25, 0.95, 30)])
    report = evaluate_scores(scores, labels, threshold=0.5, sources=sources, n_bootstrap=300)
    (within,) = report.within_source
    assert within.source == "B"
    b = np.array(sources) == "B"
    assert within.auc == pytest.approx(roc(scores[b], labels[b])[1])
    assert within.auc_ci[0] < within.auc < within.auc_ci[1]
    metrics = report.card_metrics()
    assert metrics["test_within_source_auc"] == pytest.approx(within.auc)
    assert metrics["test_within_source_auc_ci_low"] == pytest.approx(within.auc_ci[0])
    samples = [Sample(path=f"{i}.png", label=[NON_COVID, COVID][y], patient_id=str(i),
                      source=s) for i, (y, s) in enumerate(zip(labels, sources, strict=True))]
    write_report(report, samples, scores, tmp_path)
    text = (tmp_path / "evaluation.md").read_text()
    assert f"Within-source AUC (B: COVID-19 against the same source's other findings, " \
           f"30 vs 30 images): {within.auc:.3f} (95% CI {within.auc_ci[0]:.3f}-" in text
