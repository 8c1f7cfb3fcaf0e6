"""Site profiles and local validation: the file, who may load it, the threshold rule, the
intervals and the labels file."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.model.architectures import load_checkpoint
from cxr_pipeline.model.calibration import Calibration, expected_calibration_error
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.model.site_profile import (
    SiteProfile,
    check_configured_profile,
    load_site_profile,
    save_site_profile,
)
from cxr_pipeline.settings import ModelSettings
from training.datasets import Sample
from training.finetune import split_local
from training.validate.analysis import Collected, Image, validate
from training.validate.labels import FileRef, LabelsError, match_labels, read_labels
from training.validate.profile import (
    ProfileError,
    choose_threshold,
    cross_fit,
    design_effect,
    fit_site_profile,
    tolerance_rank,
)
from training.validate.stats import decision, effective_count, wilson_interval


def _profile(card_name: str, version: str, device_uid: str = "") -> SiteProfile:
    return SiteProfile(
        site="unit-site", model_name=card_name, model_version=version, device_uid=device_uid,
        calibration=Calibration(method="platt", slope=0.8, intercept=0.5), threshold=0.3,
        target_sensitivity=0.95, threshold_confidence=0.8, created="2024-01-01T00:00:00+00:00",
        data={"n": 10, "n_covid": 5, "n_non_covid": 5, "n_patients": 10},
        figures={"sensitivity": 0.96, "sensitivity_ci_low": 0.8, "ece": float("nan")},
    )


def test_profile_round_trips_through_toml(tmp_path: Path) -> None:
    profile = _profile("m", "1.0.0", "1.2.3")
    path = save_site_profile(profile, tmp_path / "site.toml")
    text = path.read_text()
    assert "[model]" in text and 'version = "1.0.0"' in text and "cross-fitted" in text
    again = load_site_profile(path)
    assert again.calibration == profile.calibration and again.threshold == 0.3
    assert again.figures == {"sensitivity": 0.96, "sensitivity_ci_low": 0.8}  # NaN left out
    point = again.operating_point()
    assert point.source == "site profile" and point.name == "unit-site"
    assert point.target_sensitivity == 0.95


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not [toml", "cannot read"),
        ("[profile]\nsite = 'x'\n", "lacks"),
        ("[profile]\nsite='x'\ntarget_sensitivity=0.9\nthreshold=2.0\n[model]\nname='m'\n"
         "version='1'\n[calibration]\nmethod='identity'\n", "threshold"),
        ("[profile]\nsite='x'\ntarget_sensitivity=0.9\nthreshold=0.2\n[model]\nname='m'\n"
         "version='1'\n[calibration]\nmethod='magic'\n", "calibration"),
    ],
)
def test_a_broken_profile_is_a_clear_config_error(tmp_path: Path, text: str, message: str
                                                 ) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_site_profile(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_profile(tmp_path / "missing.toml")


def test_predictor_takes_the_profile_of_its_own_model_only(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    _, card = load_checkpoint(tiny_checkpoint)
    good = save_site_profile(_profile(card.name, card.version, card.device_uid),
                             tmp_path / "good.toml")
    settings = ModelSettings(checkpoint=tiny_checkpoint, device="cpu", site_profile=good)
    predictor = Predictor.from_settings(settings)
    finding = predictor.finding(0.2)
    assert finding.decided_by == "site profile unit-site" and finding.threshold == 0.3
    assert finding.probability == pytest.approx(
        Calibration(method="platt", slope=0.8, intercept=0.5).apply_one(0.2))
    assert check_configured_profile(settings) is not None

    for name, version, uid, words in [
        (card.name, "9.9.9", card.device_uid, "fitted for model"),
        ("another-model", card.version, card.device_uid, "fitted for model"),
        (card.name, card.version, "2.25.1", "other weights"),
    ]:
        bad = save_site_profile(_profile(name, version, uid), tmp_path / "bad.toml")
        wrong = settings.model_copy(update={"site_profile": bad})
        with pytest.raises(ConfigError, match=words):
            Predictor.from_settings(wrong)
        with pytest.raises(ConfigError, match=words):  # what cxr-worker runs at start-up
            check_configured_profile(wrong)


def test_cxr_worker_refuses_a_profile_for_another_model_at_start_up(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.celery_app import main

    _, card = load_checkpoint(tiny_checkpoint)
    bad = save_site_profile(_profile(card.name, "0.0.0-other"), tmp_path / "bad.toml")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\ncheckpoint = "{tiny_checkpoint}"\nsite_profile = "{bad}"\n')
    assert main(["--config", str(config), "--broker", "redis://127.0.0.1:9/0"]) == 2
    assert "fitted for model" in capsys.readouterr().out


def test_tolerance_rank_is_the_beta_bound() -> None:
    from scipy.stats import beta

    k, assured = tolerance_rank(75, 0.95, 0.8)
    assert assured and k >= 1
    assert beta.cdf(0.05, k, 76 - k) >= 0.8 > beta.cdf(0.05, k + 1, 75 - k)
    assert tolerance_rank(10, 0.95, 0.8) == (1, False)  # 10 images cannot assure 95 %
    assert tolerance_rank(75, 0.95, 0.5)[0] > k  # less confidence, a higher threshold


def test_threshold_rule_reaches_the_target_on_new_images_as_often_as_it_says() -> None:
    """Many simulated sites: the share whose true sensitivity reaches the target is at least
    the confidence (the distribution-free bound holds for any score distribution)."""
    rng = np.random.default_rng(0)
    target, confidence, reached = 0.9, 0.8, 0
    population = np.sort(rng.beta(5, 2, 200_000))  # COVID-19 scores of the site's population
    sites = 300
    for _ in range(sites):
        scores = rng.choice(population, 60)
        threshold, _ = choose_threshold(scores, np.ones(60), target, confidence)
        true_sensitivity = 1.0 - np.searchsorted(population, threshold) / population.size
        reached += true_sensitivity >= target
    # binomial noise of 300 sites: 3 standard errors below 0.8 is 0.73
    assert reached / sites >= 0.73


def test_design_effect_and_effective_count() -> None:
    singles = [str(i) for i in range(20)]
    values = np.linspace(0, 1, 20)
    assert design_effect(values, singles) == 1.0
    clustered = [str(i // 4) for i in range(20)]  # 5 patients of 4 identical images
    same = np.repeat(np.linspace(0, 1, 5), 4)
    assert design_effect(same, clustered) == pytest.approx(4.0)
    hits = np.array([True] * 16 + [False] * 4)
    # Whole patients hit or miss: worth one image each (4 = 5 patients with the usual
    # C / (C - 1) small-sample factor of the clustered variance).
    assert effective_count(hits, clustered) == pytest.approx(4.0)
    mixed = np.array([True, False] * 10)
    assert effective_count(mixed, clustered) == pytest.approx(20.0)  # no clustering at all
    assert effective_count(np.ones(20, bool), clustered) == 5.0


def test_wilson_interval_matches_scipy_on_integer_counts() -> None:
    for k, n in [(0, 10), (7, 10), (95, 100), (100, 100)]:
        ours = wilson_interval(k / n, n)
        ref = binomtest(k, n).proportion_ci(method="wilson")
        assert ours == pytest.approx((ref.low, ref.high), abs=1e-9)
    d = decision([True, True, False, False], [1, 1, 0, 1], ["a", "b", "c", "d"])
    assert (d.tp, d.fn, d.tn, d.fp) == (2, 1, 1, 0)
    assert d.sensitivity == pytest.approx(2 / 3) and d.specificity == 1.0


def _site(seed: int, n_patients: int = 120) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Under-confident scores of a site, 1-3 images per patient."""
    rng = np.random.default_rng(seed)
    scores, labels, groups = [], [], []
    for p in range(n_patients):
        y = int(p % 2 == 0)
        level = rng.normal(1.2 if y else -1.2, 1.0)
        for _ in range(rng.integers(1, 4)):
            z = level + rng.normal(0, 0.5)
            scores.append(1 / (1 + math.exp(-3.0 * z)))  # over-spread logits
            labels.append(y)
            groups.append(f"p{seed}-{p}")
    return np.array(scores), np.array(labels), groups


def test_fit_site_profile_cross_fits_and_lowers_ece_on_new_patients(tiny_checkpoint: Path
                                                                    ) -> None:
    _, card = load_checkpoint(tiny_checkpoint)
    s, y, g = _site(1)
    profile, crossed = fit_site_profile(s, y, g, card, site="sim", target=0.95)
    assert profile.model_name == card.name and profile.device_uid == card.device_uid
    assert profile.data["n"] == s.size and profile.data["n_patients"] == 120
    assert crossed.folds == 5 and len(crossed.fold_thresholds) == 5
    assert profile.figures["sensitivity"] == pytest.approx(crossed.decision.sensitivity)
    new_s, new_y, _ = _site(2)
    probabilities = profile.calibration.apply(new_s)
    assert expected_calibration_error(probabilities, new_y) < expected_calibration_error(
        new_s, new_y)
    sensitivity = float(np.mean(probabilities[new_y == 1] >= profile.threshold))
    assert sensitivity >= profile.figures["sensitivity_ci_low"]
    with pytest.raises(ProfileError, match="patients"):
        cross_fit(s[:6], y[:6], g[:6])


def test_validate_reports_an_existing_profile(tiny_checkpoint: Path) -> None:
    _, card = load_checkpoint(tiny_checkpoint)
    s, y, g = _site(3, 40)
    images = [Image(f"/x/{i}.dcm", f"1.2.{i}", "covid" if t else "non_covid", int(t),
                    float(v), p, {k: "A" for k in ("Manufacturer", "Modality", "ViewPosition",
                                                   "PhotometricInterpretation",
                                                   "InstitutionName")})
              for i, (v, t, p) in enumerate(zip(s, y, g, strict=True))]
    profile = _profile(card.name, card.version)
    v = validate(Collected(images, [], [], "labels"), card, site_profile=profile)
    assert v.site_point is not None
    assert v.site_point.threshold == 0.3
    np.testing.assert_allclose(v.site_point.probabilities, profile.calibration.apply(s))
    assert v.n_patients == 40 and len(v.groups_table) == 5


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "none.csv")
    cases = {
        "path,patient_id\na.dcm,1\n": "no 'label' column",
        "label,patient_id\ncovid,1\n": "'path' or a 'sop_instance_uid'",
        "label,path\ncovid,a.dcm\nmaybe,b.dcm\n": "unknown label",
        "label,sop_instance_uid\ncovid,1.2.3\nnon_covid,1.2.3\nnon_covid,1.2.4\n": "two different",
        "label,path\ncovid,a.dcm\ncovid,b.dcm\n": "only covid",
        "label,path\ncovid,\nnon_covid,b.dcm\n": "neither path nor UID",
        "label,path\n": "no rows",
    }
    for i, (text, message) in enumerate(cases.items()):
        with pytest.raises(LabelsError, match=message):
            read_labels(_write(tmp_path / f"l{i}.csv", text))


def test_labels_match_by_relative_path_absolute_path_and_uid(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    files = [root / "sub" / "a.dcm", root / "b.dcm", root / "c.dcm"]
    for f in files:
        f.write_bytes(b"")
    labels = read_labels(_write(tmp_path / "l.csv", (
        "label,path,sop_instance_uid,patient_id\n"
        "covid,sub/a.dcm,,p1\n"
        f"non_covid,{files[1]},,p2\n"
        "non_covid,,1.2.3,p3\n"
        "covid,sub/a.dcm,,p1\n"          # a repeat with the same label: merged
        "covid,missing.dcm,,p4\n"
    )))
    assert len(labels) == 4
    refs = [FileRef(files[0], "9.9"), FileRef(files[1], ""), FileRef(files[2], "1.2.3")]
    matching = match_labels(labels, refs, [root])
    assert {p.name: r.label for p, r in matching.by_file.items()} == {
        "a.dcm": "covid", "b.dcm": "non_covid", "c.dcm": "non_covid"}
    assert [r.path for r in matching.unmatched] == ["missing.dcm"]


def test_local_split_is_patient_disjoint_and_holds_both_classes() -> None:
    samples = [Sample(path=f"{i}.dcm", label="covid" if i % 3 else "non_covid",
                      patient_id=f"p{i // 2}") for i in range(120)]
    train, val, test = split_local(samples, seed=0)
    assert len(train) + len(val) + len(test) == 120
    patients = [{s.patient_id for s in part} for part in (train, val, test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2]
                or patients[1] & patients[2])
    for part in (train, val, test):
        assert {s.label for s in part} == {"covid", "non_covid"}
    assert {s.split for s in test} == {"test"}
    assert replace(samples[0], split="x").split == "x"
