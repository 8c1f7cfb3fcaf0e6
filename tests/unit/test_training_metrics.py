"""Metrics against values computed by hand on a fixed score vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from training.metrics import (
    bootstrap_auc_ci,
    clopper_pearson,
    operating_point,
    precision_recall,
    roc,
    threshold_for_sensitivity,
)

# 5 COVID, 5 non-COVID.
SCORES = np.array([0.95, 0.80, 0.60, 0.35, 0.10, 0.70, 0.40, 0.30, 0.20, 0.05])
LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_counts_and_rates_at_cutoff_follow_the_papers_rule() -> None:
    p = operating_point(SCORES, LABELS, 0.35)
    # p >= 0.35: COVID 0.95 0.80 0.60 0.35 -> 4 TP, 1 FN; non-COVID 0.70 0.40 -> 2 FP, 3 TN.
    assert (p.tp, p.fn, p.tn, p.fp) == (4, 1, 3, 2)
    assert p.sensitivity == pytest.approx(0.8)
    assert p.specificity == pytest.approx(0.6)
    assert p.confusion.tolist() == [[3, 2], [1, 4]]
    # A score exactly at the cut-off counts as COVID.
    assert operating_point([0.5], [1], 0.5).tp == 1


def test_clopper_pearson_matches_beta_quantiles() -> None:
    lo, hi = clopper_pearson(4, 5)
    assert lo == pytest.approx(beta.ppf(0.025, 4, 2), abs=1e-9)
    assert hi == pytest.approx(beta.ppf(0.975, 5, 1), abs=1e-9)
    # Known closed forms: k = 0 -> [0, 1 - 0.025**(1/n)], k = n -> [0.025**(1/n), 1].
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    p = operating_point(SCORES, LABELS, 0.35)
    assert p.sensitivity_ci == pytest.approx(clopper_pearson(4, 5))
    assert p.specificity_ci == pytest.approx(clopper_pearson(3, 5))


def test_auc_is_the_fraction_of_correctly_ordered_pairs() -> None:
    pos, neg = SCORES[LABELS == 1], SCORES[LABELS == 0]
    # Hand count: pairs (COVID > non-COVID) over 25.
    # 0.95 > all 5; 0.80 > all 5; 0.60 > 0.40 0.30 0.20 0.05 (4); 0.35 > 0.30 0.20 0.05 (3);
    # 0.10 > 0.05 (1) -> 18 / 25.
    assert sum(int(p > n) for p in pos for n in neg) == 18
    _, auc = roc(SCORES, LABELS)
    assert auc == pytest.approx(18 / 25)
    curve, ap = precision_recall(SCORES, LABELS)
    assert 0.0 < ap <= 1.0 and curve.x[0] == pytest.approx(1.0)


def test_bootstrap_interval_contains_the_auc_and_is_seeded() -> None:
    lo, hi = bootstrap_auc_ci(SCORES, LABELS, n_resamples=500, seed=1)
    assert lo <= 18 / 25 <= hi
    assert (lo, hi) == bootstrap_auc_ci(SCORES, LABELS, n_resamples=500, seed=1)
    # Perfect separation: every resample has AUC 1.
    assert bootstrap_auc_ci([0.9, 0.8, 0.1], [1, 1, 0], n_resamples=50) == (1.0, 1.0)


def test_threshold_for_target_sensitivity() -> None:
    # 98% of 5 positives -> all 5 -> the lowest COVID score.
    assert threshold_for_sensitivity(SCORES, LABELS, 0.98) == pytest.approx(0.10)
    # 80% of 5 -> 4 -> fourth highest COVID score.
    t = threshold_for_sensitivity(SCORES, LABELS, 0.8)
    assert t == pytest.approx(0.35)
    assert operating_point(SCORES, LABELS, t).sensitivity >= 0.8
    assert operating_point(SCORES, LABELS, np.nextafter(t, 1.0)).sensitivity < 0.8
    with pytest.raises(ValueError):
        threshold_for_sensitivity(SCORES, np.zeros(10, dtype=int))


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError):
        operating_point([0.1, 0.2], [1], 0.5)
    with pytest.raises(ValueError):
        operating_point([0.1], [2], 0.5)
    with pytest.raises(ValueError):
        roc([float("nan"), 0.1], [1, 0])
