"""cxr-validate, site profiles and local fine-tuning on a "site" of real radiographs as DICOM.

The site is the shared ieee8023 images (both classes) written as DICOM with varied headers
(:mod:`tests.support.site`), split by patient into two halves as a hospital would: half A
is validated and a site profile fitted on it (``cxr-validate --fit-site-profile``), half B
plays the site's next patients (``cxr-batch --site-profile``). Everything runs the real
commands in-process, through the real decode processes and the packaged model.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_pipeline.batch.report import JSONL_NAME, read_rows
from cxr_pipeline.model.architectures import default_checkpoint_path, load_checkpoint
from cxr_pipeline.model.calibration import expected_calibration_error, log_loss
from cxr_pipeline.model.site_profile import load_site_profile, save_site_profile
from tests.conftest import testdata
from tests.support import dicom_factory as factory
from tests.support.site import SiteImage, build_site, split_by_patient, write_labels
from training.validate.profile import cross_fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITE = "test-site"
WORKERS = "2"


@dataclass
class Site:
    root: Path
    a: list[SiteImage]
    b: list[SiteImage]
    labels_a: Path
    labels_b: Path
    extras: dict[str, str]
    """Extra files in half A: relative path -> expected reason."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Site:
    root = tmp_path_factory.mktemp("site")
    images = build_site(root / "all", shared_data_dir, n_per_class=80, size=384)
    a, b = split_by_patient(images, seed=0)
    for name, half in (("A", a), ("B", b)):
        for image in half:
            target = root / name / image.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / "all" / image.path, target)
    # Half A also holds what a real export holds: a non-chest radiograph with a label, a
    # chest image nobody labelled, and the labels name a file that is not there.
    extras = {"extra/tibia.dcm": "not_chest_radiograph", "extra/unlabelled.dcm": "no_label"}
    (root / "A" / "extra").mkdir()
    shutil.copyfile(testdata("RG3_UNCR.dcm"), root / "A" / "extra" / "tibia.dcm")
    nih = sorted((shared_data_dir / "images" / "nih").glob("*.png"))[0]
    factory.write(factory.make_dicom(factory.load_png(nih, size=384)),
                  root / "A" / "extra" / "unlabelled.dcm")
    labels_a = write_labels(a, root / "labels_a.csv")
    with labels_a.open("a", newline="") as handle:
        csv.writer(handle).writerows([["non_covid", "extra/tibia.dcm", "tibia-patient"],
                                      ["covid", "gone/missing.dcm", "nobody"]])
    labels_b = write_labels(b, root / "labels_b.csv", by="sop_instance_uid")
    return Site(root, a, b, labels_a, labels_b, extras)


@pytest.fixture(scope="module")
def validated(site: Site) -> tuple[Path, Path]:
    from training.validate.cli import main

    out, profile = site.root / "report_a", site.root / "site.toml"
    code = main([str(site.root / "A"), "--labels", str(site.labels_a), "--out", str(out),
                 "--fit-site-profile", str(profile), "--target-sensitivity", "0.95",
                 "--site", SITE, "--workers", WORKERS, "--no-progress"])
    assert code == 0
    return out, profile


@pytest.fixture(scope="module")
def next_patients(site: Site, validated: tuple[Path, Path]) -> Path:
    from cxr_pipeline.batch.cli import main

    out = site.root / "batch_b"
    code = main([str(site.root / "B"), "--out", str(out), "--site-profile", str(validated[1]),
                 "--workers", WORKERS, "--no-progress"])
    assert code == 0
    return out


def _report(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "report.json").read_text())


def test_report_counts_every_file_and_names_what_it_left_out(
    site: Site, validated: tuple[Path, Path]
) -> None:
    out, _ = validated
    report = _report(out)
    assert report["tool"] == "cxr-validate"
    assert report["n_analysed"] == len(site.a)
    assert report["n_covid"] == sum(i.label == "covid" for i in site.a)
    assert report["n_patients"] == len({i.patient_id for i in site.a})
    left = {Path(u["path"]).relative_to(site.root / "A").as_posix(): u["reason"]
            for u in report["not_analysed"]}
    assert left == site.extras
    assert [(u["line"], u["path"]) for u in report["unmatched_labels"]] == [
        (len(site.a) + 3, "gone/missing.dcm")]
    for name in ("report.md", "report.html", "roc.png", "reliability.png", "probabilities.png",
                 "summary.png", f"batch/{JSONL_NAME}"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    for heading in ("Headline", "By acquisition", "Files not analysed (2)",
                    "Label rows matching no file (1)", "Site profile fitted"):
        assert heading in md
    assert "gone/missing.dcm" in md and "not_chest_radiograph" in md
    # Per-acquisition figures from the DICOM headers.
    seen = {(g["attribute"], g["value"]): g["n"] for g in report["by_attribute"]}
    for attribute, field in (("Manufacturer", "manufacturer"), ("Modality", "modality"),
                             ("ViewPosition", "view"),
                             ("PhotometricInterpretation", "photometric"),
                             ("InstitutionName", "institution")):
        values = [getattr(i, field) for i in site.a]
        for value in set(values):
            assert seen[(attribute, value)] == values.count(value)
    assert not (site.root / ".report_a.cxr-validate-work").exists()  # the work folder is gone


def test_auc_is_scikit_learns_on_the_same_scores(site: Site, validated: tuple[Path, Path]
                                                 ) -> None:
    out, _ = validated
    report = _report(out)
    label_of = {(site.root / "A" / i.path).resolve(): int(i.label == "covid") for i in site.a}
    rows = [r for r in read_rows(out / "batch" / JSONL_NAME)
            if Path(r.path).resolve() in label_of]
    assert len(rows) == len(site.a) and all(r.status == "done" for r in rows)
    y = [label_of[Path(r.path).resolve()] for r in rows]
    scores = [r.score for r in rows]
    assert report["auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    low, high = report["auc_ci"]
    assert low <= report["auc"] <= high
    # The model card's point is what the report says it is.
    card = load_checkpoint(default_checkpoint_path())[1]
    point = card.operating_point()
    flagged = point.calibration.apply(np.array(scores)) >= point.threshold
    sensitivity = flagged[np.array(y) == 1].mean()
    assert report["model_card"]["decision"]["sensitivity"] == pytest.approx(sensitivity)


def test_profile_names_its_model_and_figures(site: Site, validated: tuple[Path, Path]) -> None:
    out, path = validated
    profile = load_site_profile(path)
    card = load_checkpoint(default_checkpoint_path())[1]
    assert (profile.model_name, profile.model_version, profile.device_uid) == (
        card.name, card.version, card.device_uid)
    assert profile.site == SITE and profile.created.startswith("20")
    assert profile.data["n"] == len(site.a)
    assert profile.target_sensitivity == 0.95 and 0.0 < profile.threshold < 1.0
    for key in ("sensitivity", "sensitivity_ci_low", "specificity", "ece", "brier"):
        assert key in profile.figures
    assert _report(out)["fitted_site_profile"]["profile"]["profile"]["site"] == SITE


def test_profile_holds_on_the_sites_next_patients(
    site: Site, validated: tuple[Path, Path], next_patients: Path
) -> None:
    profile = load_site_profile(validated[1])
    label_of = {i.sop_instance_uid: int(i.label == "covid") for i in site.b}
    rows = read_rows(next_patients / JSONL_NAME)
    assert len(rows) == len(site.b) and all(r.status == "done" for r in rows)
    # The report says which profile decided, with the raw score beside the probability.
    assert {r.decided_by for r in rows} == {f"site profile {SITE}"}
    assert {r.threshold for r in rows} == {profile.threshold}
    header = (next_patients / "results.csv").read_text().splitlines()[0].split(",")
    assert {"score", "probability", "threshold", "decided_by"} <= set(header)
    scores = np.array([r.score for r in rows])
    probabilities = np.array([r.probability for r in rows])
    np.testing.assert_allclose(probabilities, profile.calibration.apply(scores), atol=1e-6)
    y = np.array([label_of[r.sop_instance_uid] for r in rows])
    flagged = np.array([r.positive for r in rows])
    sensitivity = float(flagged[y == 1].mean())
    # The threshold reaches its target on patients it never saw, within what it reported.
    assert sensitivity >= profile.figures["sensitivity_ci_low"]
    assert sensitivity >= profile.target_sensitivity - 0.05
    # The site's map fits its next patients better than the model card's (log loss: the
    # proper score the map is fitted for; ECE on ~80 images is mostly noise, see below).
    card = load_checkpoint(default_checkpoint_path())[1]
    before = log_loss(card.operating_point().calibration.apply(scores), y)
    assert log_loss(probabilities, y) < before


def test_calibration_lowers_ece_on_held_back_patients(
    site: Site, validated: tuple[Path, Path], next_patients: Path
) -> None:
    """Over the whole site, every image's probability from a profile fitted without its
    patient (the cross-fitting cxr-validate reports), against the model card's.

    Both halves' raw scores come from the runs above (cxr-validate on A, cxr-batch on B).
    On one half of ~80 images, ECE's own sampling noise (about 0.1 here) is as large as
    what calibration changes, so the check uses every image of the site."""
    a = {Path(i["path"]).resolve(): i for i in _report(validated[0])["images"]}
    label_of = {i.sop_instance_uid: i for i in site.b}
    scores, labels, patients = [], [], []
    for image in site.a:
        row = a[(site.root / "A" / image.path).resolve()]
        scores.append(row["score"])
        labels.append(int(image.label == "covid"))
        patients.append(image.patient_id)
    for r in read_rows(next_patients / JSONL_NAME):
        scores.append(r.score)
        labels.append(int(label_of[r.sop_instance_uid].label == "covid"))
        patients.append(label_of[r.sop_instance_uid].patient_id)
    s, y = np.array(scores), np.array(labels)
    crossed = cross_fit(s, y, patients, target=0.95)
    card = load_checkpoint(default_checkpoint_path())[1]
    before = expected_calibration_error(card.operating_point().calibration.apply(s), y)
    assert crossed.calibration.ece < before
    # And what cxr-validate reported for half A is the same computation.
    report = _report(validated[0])
    cross_a = report["fitted_site_profile"]["cross_fitted"]["calibration"]["ece"]
    assert cross_a == pytest.approx(load_site_profile(validated[1]).figures["ece"])


def test_a_resumed_batch_redoes_only_rows_another_profile_decided(
    site: Site, validated: tuple[Path, Path], tmp_path: Path
) -> None:
    from cxr_pipeline.batch.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for image in site.b[:3]:
        shutil.copyfile(site.root / "B" / image.path, folder / Path(image.path).name)
    profile = load_site_profile(validated[1])
    other = save_site_profile(replace(profile, site="other-site"), tmp_path / "other.toml")
    out = tmp_path / "out"

    def run(profile_path: Path) -> set[str]:
        assert main([str(folder), "--out", str(out), "--site-profile", str(profile_path),
                     "--workers", "1", "--no-progress"]) == 0
        return {r.decided_by for r in read_rows(out / JSONL_NAME)}

    assert run(validated[1]) == {f"site profile {SITE}"}
    first = (out / JSONL_NAME).read_bytes()
    assert run(validated[1]) == {f"site profile {SITE}"}
    assert (out / JSONL_NAME).read_bytes() == first  # same profile: nothing redone
    assert run(other) == {"site profile other-site"}  # another profile: every row redone
    assert len(read_rows(out / JSONL_NAME)) == 3


def test_a_profile_for_another_model_version_is_refused_at_start(
    site: Site, validated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from cxr_pipeline.__main__ import main as analyse_main
    from cxr_pipeline.batch.cli import main as batch_main
    from training.validate.cli import main as validate_main

    profile = load_site_profile(validated[1])
    other = save_site_profile(replace(profile, model_version="0.9.9"), site.root / "v099.toml")
    out = site.root / "refused"
    assert batch_main([str(site.root / "B"), "--out", str(out), "--site-profile", str(other),
                       "--workers", "1", "--no-progress"]) == 2
    assert "fitted for model" in capsys.readouterr().err
    assert not out.exists()
    one = site.root / "B" / site.b[0].path
    assert analyse_main([str(one), "--out", str(out), "--site-profile", str(other)]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "config_error"
    assert validate_main([str(site.root / "B"), "--labels", str(site.labels_b), "--out",
                          str(out), "--site-profile", str(other), "--no-progress"]) == 2
    assert "0.9.9" in capsys.readouterr().err
    assert not out.exists()
    # The listener with its embedded workers loads the model at start-up, and stops there.
    from listeners.storescp import main as listen_main

    config = site.root / "listen.toml"
    config.write_text(f'[model]\nsite_profile = "{other}"\ndevice = "cpu"\n')
    assert listen_main(["--config", str(config), "--data-dir", str(site.root / "listen"),
                        "--port", "0"]) == 2


def _bad_labels(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


def test_bad_input_is_a_clear_error_and_writes_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.validate.cli import main

    first, second = site.b[0], site.b[1]
    uid_rows = f"covid,{first.sop_instance_uid}\nnon_covid,{first.sop_instance_uid}\n"
    cases = {
        "missing.csv": (None, "does not exist"),
        "unknown.csv": (f"label,path\ncovid,{first.path}\nprobably,{second.path}\n",
                        "unknown label"),
        "duplicate.csv": ("label,sop_instance_uid\n" + uid_rows, "two different labels"),
        "one_class.csv": (f"label,path\ncovid,{first.path}\ncovid,{second.path}\n",
                          "only covid"),
    }
    for name, (text, message) in cases.items():
        labels = tmp_path / name if text is None else _bad_labels(tmp_path, name, text)
        out = tmp_path / f"out-{name}"
        profile = tmp_path / f"{name}.toml"
        code = main([str(site.root / "B"), "--labels", str(labels), "--out", str(out),
                     "--fit-site-profile", str(profile), "--no-progress"])
        assert code == 2, name
        assert message in capsys.readouterr().err, name
        assert not out.exists() and not profile.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for n in cases if n != "missing.csv")  # only the labels files: no work, no output


def test_only_one_class_analysed_is_an_error_after_the_run(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Labels with both classes, but the only non-COVID file is not a chest radiograph."""
    from training.validate.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(site.root / "B" / site.b[0].path, folder / "one.dcm")
    shutil.copyfile(testdata("RG3_UNCR.dcm"), folder / "tibia.dcm")
    label = site.b[0].label
    other = "non_covid" if label == "covid" else "covid"
    labels = _bad_labels(tmp_path, "l.csv", f"label,path\n{label},one.dcm\n{other},tibia.dcm\n")
    out = tmp_path / "out"
    assert main([str(folder), "--labels", str(labels), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 2
    assert "needs both classes" in capsys.readouterr().err
    assert not out.exists()


def test_cxr_train_fine_tunes_the_packaged_head_on_dicom(site: Site, tmp_path: Path) -> None:
    from training.finetune import main

    checkpoint = tmp_path / "local.pt"
    code = main([str(site.root / "A"), "--labels", str(site.labels_a), "--init", "packaged",
                 "--out", str(checkpoint), "--epochs", "5", "--threads", "2", "--no-progress"])
    assert code == 0
    model, card = load_checkpoint(checkpoint)
    packaged_model, packaged = load_checkpoint(default_checkpoint_path())
    assert card.name == f"{packaged.name}-local" and card.version.startswith(packaged.version)
    assert card.preprocessing == packaged.preprocessing
    assert card.device_uid != packaged.device_uid
    # Only the head changed: the backbone's weights are the packaged ones.
    trained, original = model.state_dict(), packaged_model.state_dict()
    changed = {k for k in trained if not np.array_equal(trained[k].numpy(),
                                                        original[k].numpy())}
    assert changed and all(k.startswith("_fc") for k in changed)
    record = json.loads(checkpoint.with_suffix(".finetune.json").read_text())
    assert record["split"]["test"] > 0 and sum(record["split"].values()) == len(site.a)
    for when in ("before", "after"):
        assert record[when]["n"] == record["split"]["test"]
        assert 0.0 <= record[when]["auc"] <= 1.0
    assert record["before"]["model"] == f"{packaged.name} {packaged.version}"
    reasons = {Path(x["path"]).name: x["reason"] for x in record["left_out"]}
    assert reasons == {"tibia.dcm": "not_chest_radiograph", "unlabelled.dcm": "no_label"}
