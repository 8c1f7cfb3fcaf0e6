"""OHIF v3 in a real browser: the SR's finding and probability visible, the heatmap rendered.

A real chest CR (the RSNA file, with its Patient's Age defect) is analysed by the real
pipeline with the packaged model; the source, the SR and the heatmap SC are stored in the
viewer's Orthanc (DICOMweb plugin), and ``web/ohif_check.mjs`` drives headless Chromium
through ``puppeteer-core``: open the study in OHIF v3, open the SR, read the text the SR
display tool draws, open the SC and measure its canvas. Screenshots are kept under
``var/test-artifacts/ohif/`` (git-ignored); the path is printed.

A second study is the case the wording is for: a real COVID-19 radiograph of the shared
collection (test split) whose calibrated probability lies between the operating point and
50 %, written as DICOM. OHIF must draw the statement in two lines, "COVID-19 suspected,
probability: P %" and "above the 98 %-sensitivity point: T %", with no "Present" and no
"Certainty of Finding" line.

Skips only where Chromium or Node.js are missing; a missing ``web/node_modules`` or
``web/ohif`` is a set-up failure (``scripts/setup`` installs both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from cxr_pipeline.pipeline import Engine, analyse, write_results
from cxr_pipeline.results import Analysis
from cxr_pipeline.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.support.orthanc import free_port
from training.datasets import Sample
from viewer.orthanc import dicomweb_plugin, start_orthanc
from viewer.server import Upstream, ViewerServer

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]

WEB = REPO_ROOT / "web"
CHECK_SCRIPT = WEB / "ohif_check.mjs"
OHIF_DIR = WEB / "ohif"
ARTIFACTS = REPO_ROOT / "var" / "test-artifacts" / "ohif"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
_NODE_TIMEOUT_S = 300


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (Debian package chromium; scripts/setup installs it)")


def _node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("Node.js is not installed (Debian package nodejs; scripts/setup installs it)")
    return found


def _require_setup() -> None:
    if not (WEB / "node_modules" / "puppeteer-core").is_dir():
        pytest.fail("web/node_modules/puppeteer-core is missing: run scripts/setup (npm ci)")
    if not (OHIF_DIR / "index.html").is_file():
        pytest.fail("web/ohif holds no OHIF v3 build: run scripts/setup (scripts/fetch-ohif)")
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    try:
        dicomweb_plugin()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _view_in_ohif(
    source_path: Path, out: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Analysis, dict[str, Any]]:
    """Analyse ``source_path``, store source + SR + SC in Orthanc, drive OHIF; its report."""
    chromium, node = _chromium(), _node()
    _require_setup()
    started = time.monotonic()
    engine = Engine.from_settings(load_settings())
    analysis = analyse(source_path, engine)
    sr_path, sc_path = write_results(analysis, work / "results")
    sr = dcmread(sr_path, stop_before_pixels=True)
    sc = dcmread(sc_path, stop_before_pixels=True)

    orthanc = start_orthanc(work / "orthanc", http_port=free_port(), dicom_port=None)
    server = None
    try:
        for path in (source_path, sr_path, sc_path):
            orthanc.upload(path)
        server = ViewerServer(OHIF_DIR, Upstream("127.0.0.1", orthanc.http_port)).start()
        shutil.rmtree(out, ignore_errors=True)
        browser_started = time.monotonic()
        run = subprocess.run(
            [
                node,
                str(CHECK_SCRIPT),
                "--url",
                server.url,
                "--study",
                str(sr.StudyInstanceUID),
                "--sr",
                str(sr.SeriesDescription),
                "--sc",
                str(sc.SeriesDescription),
                "--out",
                str(out),
                "--chromium",
                chromium,
                "--timeout",
                "90000",
            ],
            capture_output=True,
            text=True,
            timeout=_NODE_TIMEOUT_S,
            check=False,
            cwd=WEB,
        )
        browser_s = time.monotonic() - browser_started
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()
    with capsys.disabled():  # shown even when the test passes
        print(f"\nOHIF screenshots: {out} (study.png, sr.png, sc.png, result.json)")
        print(f"browser part {browser_s:.1f} s, whole test {time.monotonic() - started:.1f} s")
    lines = run.stdout.strip().splitlines()
    assert lines, f"ohif_check printed nothing (exit {run.returncode}):\n{run.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    (out / "result.json").write_text(json.dumps(result, indent=2))
    assert run.returncode == 0 and result["failure"] is None, (
        f"{result.get('failure')}\nconsole: {result['console'][-10:]}\n{run.stderr}"
    )
    return analysis, result


def _check_sr_text(analysis: Analysis, result: dict[str, Any]) -> list[str]:
    """The SR's region label reads as one statement with its operating point; the lines."""
    finding = analysis.finding
    # OHIF's SR display tool draws the merged measurement's NUM lines next to the region.
    # ohif_check reports each <text> and each of its <tspan> lines.
    drawn = [t for t in result["srText"]["svg"] if t.strip()]
    lines = [
        f"{finding.verdict}, probability: {100 * finding.probability:.2f} %",
        f"{finding.side()} {finding.point_name()}: {100 * finding.threshold:.2f} %",
    ]
    assert sorted(drawn) == sorted([*lines, "".join(lines)]), drawn
    # One statement: no third "Certainty of Finding: 0.96 1" line, never "Present".
    assert not [t for t in drawn if "Certainty of Finding" in t], drawn
    assert "Present" not in " ".join(drawn) + result["srText"]["body"]
    assert not result["errors"], result["errors"]
    assert not [line for line in result["console"] if "ReferencedSOPSequence" in line]
    return drawn


def _check_sc(result: dict[str, Any], out: Path) -> None:
    canvas = result["scCanvas"]
    assert canvas is not None, "no Cornerstone canvas after opening the SC"
    assert canvas["litFraction"] > 0.3, canvas
    assert canvas["mean"] > 30, canvas
    assert canvas["colouredFraction"] > 0.001, canvas
    for name in ("study.png", "sr.png", "sc.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_ohif_shows_the_sr_finding_and_the_heatmap(
    shared_dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source_path = shared_dicom_dir / "rsna_cr_ap_jpeg_baseline.dcm"
    analysis, result = _view_in_ohif(source_path, ARTIFACTS, tmp_path, capsys)
    _check_sr_text(analysis, result)
    # The heatmap SC: rendered (not black) and in colour.
    _check_sc(result, ARTIFACTS)


def _suspected_below_half(shared_data_dir: Path, engine: Engine) -> Sample:
    """A test-split COVID-19 image of ``images/ieee8023/`` between the operating point and 50 %.

    Of those (the folder whose licences allow derivatives, as a screenshot is), the one whose
    calibrated probability is nearest the middle of that range, so that the DICOM round trip
    cannot move it out.
    """
    from training.datasets import load_image, read_manifest, resolve

    split = read_manifest(REPO_ROOT / "docs" / "model" / "split.csv")
    candidates = sorted(
        (s for s in split if s.split == "test" and s.label == "covid"
         and s.path.startswith("images/ieee8023/")),
        key=lambda s: s.path,
    )
    scores = engine.predictor.predict_images(
        [load_image(resolve(s, shared_data_dir)) for s in candidates]
    )
    findings = [engine.predictor.finding(float(score)) for score in scores]
    middle = (engine.predictor.operating_point.threshold + 0.5) / 2
    between = [(abs(f.probability - middle), s.path, s)
               for s, f in zip(candidates, findings, strict=True)
               if f.positive and f.probability < 0.5]
    if not between:
        pytest.fail("no test-split COVID-19 image lies between the operating point and 50 %")
    return min(between, key=lambda t: (t[0], t[1]))[2]


def test_ohif_words_a_suspected_finding_below_fifty_percent(
    shared_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.dicom_factory import load_png, make_dicom, write

    engine = Engine.from_settings(load_settings())
    sample = _suspected_below_half(shared_data_dir, engine)
    pixels = load_png(shared_data_dir / sample.path, size=None)
    source = write(
        make_dicom(pixels, modality="CR", view="AP", bits_stored=8, PatientID="SUSPECTED-1",
                   PatientName="Suspected^Example", StudyDescription="CXR suspected example"),
        tmp_path / "source.dcm",
    )
    out = ARTIFACTS / "suspected"
    analysis, result = _view_in_ohif(source, out, tmp_path, capsys)
    finding = analysis.finding
    assert finding.positive and finding.threshold <= finding.probability < 0.5, finding
    assert finding.target_sensitivity == pytest.approx(0.98)
    _check_sr_text(analysis, result)
    _check_sc(result, out)
