"""Calibration maps: fitting, choosing out of fold, ECE/Brier, the card and the predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_pipeline.errors import CheckpointError
from cxr_pipeline.model.calibration import (
    Calibration,
    OperatingPoint,
    brier_score,
    expected_calibration_error,
    fit_calibration,
    log_loss,
    out_of_fold,
    select_calibration,
)
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.model.inference import Predictor


def _under_confident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores squeezed towards 0 against labels drawn from a known true probability."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.02, 0.98, n)
    labels = (rng.uniform(size=n) < truth).astype(int)
    logit = np.log(truth / (1 - truth))
    scores = 1 / (1 + np.exp(-(0.4 * logit - 2.5)))  # under-confident and shifted low
    return scores, labels


def test_expected_calibration_error_by_hand() -> None:
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    y = np.array([0, 1, 1, 1, 0])
    # bins: [0,0.1): conf .05 acc .5 (n=2); [0.5,0.6): .55 vs 0 (n=1); [0.9,1]: .95 vs 1 (n=2)
    expected = (2 * 0.45 + 1 * 0.55 + 2 * 0.05) / 5
    assert expected_calibration_error(p, y) == pytest.approx(expected)
    assert expected_calibration_error(np.array([1.0]), np.array([1])) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_brier_and_log_loss_match_sklearn() -> None:
    from sklearn.metrics import brier_score_loss
    from sklearn.metrics import log_loss as sk_log_loss

    scores, labels = _under_confident(400, 1)
    assert brier_score(scores, labels) == pytest.approx(brier_score_loss(labels, scores))
    assert log_loss(scores, labels) == pytest.approx(sk_log_loss(labels, scores))


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_each_map_lowers_held_out_ece_and_keeps_the_order(method: str) -> None:
    fit_s, fit_y = _under_confident(2000, 2)
    test_s, test_y = _under_confident(2000, 3)
    cal = fit_calibration(fit_s, fit_y, method, fitted_on="synthetic")
    after = cal.apply(test_s)
    assert expected_calibration_error(after, test_y) < expected_calibration_error(test_s, test_y)
    assert np.all(np.diff(after[np.argsort(test_s)]) >= -1e-12)  # monotone
    if method != "isotonic":  # strictly increasing: AUC unchanged
        assert roc_auc_score(test_y, after) == pytest.approx(roc_auc_score(test_y, test_s))
    assert cal.n == 2000 and cal.fitted_on == "synthetic"


def test_select_chooses_by_out_of_fold_log_loss_and_refits() -> None:
    scores, labels = _under_confident(600, 4)
    groups = [f"p{i // 2}" for i in range(scores.size)]  # two images per patient
    chosen = select_calibration(scores, labels, groups=groups)
    assert set(chosen.out_of_fold_log_loss) == {"temperature", "platt", "isotonic"}
    best = min(chosen.out_of_fold_log_loss, key=chosen.out_of_fold_log_loss.__getitem__)
    assert chosen.calibration.method == best
    assert chosen.calibration.n == 600


def test_out_of_fold_keeps_a_patient_in_one_fold() -> None:
    scores, labels = _under_confident(200, 5)
    groups = [f"p{i % 40}" for i in range(200)]
    oof = out_of_fold(scores, labels, "platt", groups=groups, n_splits=5)
    assert oof.shape == scores.shape and np.all((oof > 0) & (oof < 1))


def test_bad_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([0.1, 0.2], [1, 1], "platt")
    with pytest.raises(ValueError, match="within"):
        fit_calibration([0.1, 1.2], [0, 1], "platt")
    with pytest.raises(ValueError, match="method"):
        fit_calibration([0.1, 0.9], [0, 1], "magic")
    with pytest.raises(ValueError, match="positive"):
        Calibration(method="platt", slope=-1.0)


def test_round_trip_and_invalid_dict() -> None:
    scores, labels = _under_confident(300, 6)
    for method in ("identity", "temperature", "platt", "isotonic"):
        cal = fit_calibration(scores, labels, method)
        again = Calibration.from_dict(cal.to_dict())
        assert again == cal
        np.testing.assert_array_equal(again.apply(scores), cal.apply(scores))
    with pytest.raises(CheckpointError):
        Calibration.from_dict({"method": "isotonic", "knots_x": [0.5]})
    with pytest.raises(CheckpointError):
        Calibration.from_dict({"method": "platt", "colour": "blue"})


def test_card_carries_calibration_and_its_operating_point() -> None:
    scores, labels = _under_confident(300, 7)
    cal = fit_calibration(scores, labels, "platt")
    card = ModelCard(
        name="m", version="1.0.0", architecture="resnet18", device_uid="1.2.3",
        threshold=0.05, calibration=cal,
    )
    again = ModelCard.from_dict(card.to_dict())
    assert again.calibration == cal
    point = again.operating_point()
    assert point.threshold == pytest.approx(cal.apply_one(0.05))
    assert point.source == "model card" and point.name == "m 1.0.0"
    # Monotone: the images the raw threshold flags are flagged on the calibrated scale.
    flagged_raw = scores >= 0.05
    flagged_cal = cal.apply(scores) >= point.threshold
    assert np.array_equal(flagged_raw, flagged_cal)
    # A card written before calibration existed reads as identity.
    old = card.to_dict()
    del old["calibration"]
    assert ModelCard.from_dict(old).operating_point().threshold == 0.05


def test_predictor_finding_uses_its_operating_point(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    raw = predictor.finding(0.3)
    assert raw.score == 0.3 and raw.decided_by.startswith("model card")
    site = OperatingPoint(
        calibration=Calibration(method="platt", slope=1.0, intercept=1.0),
        threshold=0.4, source="site profile", name="test-site", target_sensitivity=0.95,
    )
    predictor.use_operating_point(site)
    found = predictor.finding(0.3)
    assert found.probability == pytest.approx(1 / (1 + np.exp(-(np.log(0.3 / 0.7) + 1))))
    assert found.threshold == 0.4 and found.positive
    assert found.decided_by == "site profile test-site" and found.target_sensitivity == 0.95
