"""Third-party INFO noise is demoted: building one image's results logs nothing of theirs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.logs import NOISY_LIBRARIES, quiet_third_party
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def root_at_info() -> Iterator[_Collect]:
    root = logging.getLogger()
    handler = _Collect()
    saved_root = root.level
    saved = {name: logging.getLogger(name).level for name in NOISY_LIBRARIES}
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _build_results(shared_dicom_dir: Path) -> None:
    source = dcmread(shared_dicom_dir / "rsna_cr_ap_jpeg_baseline.dcm")
    pixels = source.pixel_array.astype(np.float32) / 255.0
    heat = np.zeros_like(pixels)
    heat[200:400, 500:700] = 1.0
    card = ModelCard(name="m", version="1", architecture="squeezenet1_1", device_uid="2.25.7")
    del source.PixelData
    finding = Finding(0.3, 0.5)
    build_structured_report(source, finding, card, OutputSettings(), heatmap=heat)
    build_secondary_capture(source, pixels, heat, finding, card, OutputSettings())


def _third_party(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name.split(".")[0] in NOISY_LIBRARIES]


def test_highdicom_info_lines_are_dropped(root_at_info: _Collect, shared_dicom_dir: Path) -> None:
    _build_results(shared_dicom_dir)
    noisy = _third_party(root_at_info.records)
    # What an INFO-level service log received per image before the demotion.
    assert len([r for r in noisy if r.name.startswith("highdicom")]) > 5

    root_at_info.records.clear()
    quiet_third_party()
    _build_results(shared_dicom_dir)
    assert [r for r in _third_party(root_at_info.records) if r.levelno < logging.WARNING] == []
