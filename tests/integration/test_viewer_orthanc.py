"""The viewer's Orthanc: DICOMweb through the same-origin proxy, local-only DICOM, SC preview."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings
from tests.support.orthanc import free_port
from viewer.orthanc import RunningOrthanc, dicomweb_plugin, start_orthanc
from viewer.server import Upstream, ViewerServer

pytestmark = [pytest.mark.integration]

RSNA = "rsna_cr_ap_jpeg_baseline.dcm"


def _require_orthanc() -> None:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    try:
        dicomweb_plugin()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[RunningOrthanc]:
    _require_orthanc()
    running = start_orthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"storescu": ("STORESCU", "127.0.0.1", 104)},
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def results(shared_dicom_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The RSNA CR and an SR and heatmap SC built for it."""
    source_path = shared_dicom_dir / RSNA
    source = dcmread(source_path)
    pixels = source.pixel_array.astype(np.float32) / 255.0
    heat = np.zeros_like(pixels)
    heat[300:500, 550:750] = 1.0
    del source.PixelData
    card = ModelCard(name="m", version="1", architecture="squeezenet1_1", device_uid="2.25.9")
    # Flagged at a high-sensitivity operating point with a probability below 50 %.
    finding = Finding(0.23, 0.12, target_sensitivity=0.98, decided_by="model card m 1",
                      calibration_method="platt")
    sr = build_structured_report(source, finding, card, OutputSettings(), heatmap=heat)
    sc = build_secondary_capture(source, pixels, heat, finding, card, OutputSettings())
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    return source_path, sr_path, sc_path


def _json(url: str) -> object:
    request = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def test_dicomweb_through_the_viewer_proxy(
    orthanc: RunningOrthanc, results: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    source_path, sr_path, _sc_path = results
    for path in results:
        orthanc.upload(path)
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html></html>")
    server = ViewerServer(dist, Upstream("127.0.0.1", orthanc.http_port)).start()
    try:
        study_uid = str(dcmread(source_path, stop_before_pixels=True).StudyInstanceUID)
        studies = _json(f"{server.url}/dicom-web/studies")
        assert isinstance(studies, list)
        assert [s["0020000D"]["Value"][0] for s in studies] == [study_uid]
        series = _json(f"{server.url}/dicom-web/studies/{study_uid}/series?includefield=00080021")
        assert isinstance(series, list)
        by_modality = {s["00080060"]["Value"][0]: s for s in series}
        assert set(by_modality) == {"CR", "SR", "OT"}
        # Series Date reaches the browser (Orthanc Explorer and OHIF file results by it).
        for modality in ("SR", "OT"):
            assert by_modality[modality]["00080021"]["Value"][0], modality
        sr = dcmread(sr_path, stop_before_pixels=True)
        metadata = _json(
            f"{server.url}/dicom-web/studies/{study_uid}/series/{sr.SeriesInstanceUID}/metadata"
        )
        assert isinstance(metadata, list)
        assert metadata[0]["00080018"]["Value"][0] == sr.SOPInstanceUID
        assert "0040A730" in metadata[0]  # the SR content tree is in the metadata
        # What OHIF reads from it: the decision beside its operating point, never "Present".
        tree = json.dumps(metadata[0]["0040A730"])
        assert "COVID-19 suspected, probability" in tree
        assert "above the 98 %-sensitivity point" in tree
        assert "Present" not in tree and "415684004" in tree
    finally:
        server.stop()


def test_sc_preview_in_orthanc_is_the_coloured_heatmap(
    orthanc: RunningOrthanc, results: tuple[Path, Path, Path]
) -> None:
    _, _, sc_path = results
    instance = orthanc.upload(sc_path)["ID"]
    with urllib.request.urlopen(f"{orthanc.rest_url}/instances/{instance}/preview") as answer:
        preview = np.asarray(Image.open(io.BytesIO(answer.read())).convert("RGB"), dtype=float)
    assert preview.mean() > 40  # not black
    # The heatmap's colour survives Orthanc's rendering (no window applied to RGB).
    spread = preview.max(axis=2) - preview.min(axis=2)
    assert (spread > 48).mean() > 0.01


def test_dicom_port_takes_only_known_local_ae_titles(
    orthanc: RunningOrthanc, results: tuple[Path, Path, Path]
) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("DCMTK is not installed (Debian package dcmtk)")
    assert orthanc.dicom_port is not None
    sc_path = results[2]  # uncompressed, and a class storescu proposes by default

    def send(calling: str) -> int:
        run = subprocess.run(
            [
                storescu,
                "-aet",
                calling,
                "-aec",
                "CXR_VIEWER",
                "127.0.0.1",
                str(orthanc.dicom_port),
                str(sc_path),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return run.returncode

    assert send("INTRUDER") != 0
    with urllib.request.urlopen(f"{orthanc.rest_url}/instances") as answer:
        assert json.load(answer) == []
    assert send("STORESCU") == 0
    with urllib.request.urlopen(f"{orthanc.rest_url}/instances") as answer:
        assert len(json.load(answer)) == 1


def test_orthanc_config_keeps_it_local(orthanc: RunningOrthanc, tmp_path: Path) -> None:
    # Orthanc 1.10 binds every interface; these keys are what keeps it local (a non-local
    # client cannot be simulated from the loopback-only test machine).
    config = json.loads((tmp_path / "orthanc" / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False
    assert config["DicomAlwaysAllowStore"] is False
    assert config["DicomAlwaysAllowEcho"] is False
    assert config["DicomCheckModalityHost"] is True
    assert {peer[1] for peer in config["DicomModalities"].values()} == {"127.0.0.1"}
