"""OHIF v3 in a real browser: the SR's finding and probability visible, the heatmap rendered.

A real chest CR (the RSNA file, with its Patient's Age defect) is analysed by the real
pipeline with the packaged model; the source, the SR and the heatmap SC are stored in the
viewer's Orthanc (DICOMweb plugin), and ``web/ohif_check.mjs`` drives headless Chromium
through ``puppeteer-core``: open the study in OHIF v3, open the SR, read the text the SR
display tool draws, open the SC and measure its canvas. Screenshots are kept under
``var/test-artifacts/ohif/`` (git-ignored); the path is printed.

Skips only where Chromium or Node.js are missing; a missing ``web/node_modules`` or
``web/ohif`` is a set-up failure (``scripts/setup`` installs both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from cxr_pipeline.pipeline import Engine, analyse, write_results
from cxr_pipeline.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.support.orthanc import free_port
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


def test_ohif_shows_the_sr_finding_and_the_heatmap(
    shared_dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chromium, node = _chromium(), _node()
    _require_setup()
    started = time.monotonic()

    source_path = shared_dicom_dir / "rsna_cr_ap_jpeg_baseline.dcm"
    engine = Engine.from_settings(load_settings())
    analysis = analyse(source_path, engine)
    sr_path, sc_path = write_results(analysis, tmp_path / "results")
    sr = dcmread(sr_path, stop_before_pixels=True)
    sc = dcmread(sc_path, stop_before_pixels=True)
    probability = analysis.finding.probability
    verdict = "Present" if analysis.finding.positive else "Absent"

    orthanc = start_orthanc(tmp_path / "orthanc", http_port=free_port(), dicom_port=None)
    server = None
    try:
        for path in (source_path, sr_path, sc_path):
            orthanc.upload(path)
        server = ViewerServer(OHIF_DIR, Upstream("127.0.0.1", orthanc.http_port)).start()
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
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
                str(ARTIFACTS),
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
        print(f"\nOHIF screenshots: {ARTIFACTS} (study.png, sr.png, sc.png, result.json)")
        print(f"browser part {browser_s:.1f} s, whole test {time.monotonic() - started:.1f} s")
    lines = run.stdout.strip().splitlines()
    assert lines, f"ohif_check printed nothing (exit {run.returncode}):\n{run.stderr}"
    result = json.loads(lines[-1])
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=2))
    assert run.returncode == 0 and result["failure"] is None, (
        f"{result.get('failure')}\nconsole: {result['console'][-10:]}\n{run.stderr}"
    )

    # The SR: OHIF's SR display tool draws the planar group's text lines next to the
    # region; the decision and the probability must be readable there as text.
    drawn = " | ".join(result["srText"]["svg"])
    assert f"COVID-19 {verdict}, probability: {100 * probability:.2f} %" in drawn, drawn
    assert f"Certainty of Finding: {probability:.2f} 1" in drawn, drawn
    assert not result["errors"], result["errors"]
    assert not [line for line in result["console"] if "ReferencedSOPSequence" in line]

    # The heatmap SC: rendered (not black) and in colour.
    canvas = result["scCanvas"]
    assert canvas is not None, "no Cornerstone canvas after opening the SC"
    assert canvas["litFraction"] > 0.3, canvas
    assert canvas["mean"] > 30, canvas
    assert canvas["colouredFraction"] > 0.001, canvas
    for name in ("study.png", "sr.png", "sc.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
