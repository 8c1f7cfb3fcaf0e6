"""The whole job for one radiograph, wired in one place.

``ingest -> preprocess -> infer -> explain -> encode (SR, SC)``: :func:`analyse` reads
top to bottom as the data flow. Listeners, workers and ``cxr-batch`` all call it; the
:class:`Engine` (model loaded once) is built once per process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

from cxr_pipeline.dicom.ingest import Radiograph, load_radiograph
from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.explain.heatmap import heatmap_for_image
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.results import Analysis
from cxr_pipeline.settings import Settings


@dataclass
class Engine:
    """A loaded model plus the settings of every stage; one per worker process.

    Build it after a worker process has started (CUDA is initialised here, never
    before a fork).
    """

    settings: Settings
    predictor: Predictor

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the configured (or default) checkpoint onto the configured device."""
        return cls(settings=settings, predictor=Predictor.from_settings(settings.model))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - start) * 1000.0


def analyse(source: Path | str | BinaryIO | Dataset, engine: Engine) -> Analysis:
    """Analyse one received DICOM object and build its result objects.

    Parameters
    ----------
    source
        A DICOM file path, binary stream or dataset (as received by the listener).
    engine
        Loaded model and settings.

    Returns
    -------
    Analysis
        Probability, decision, the SR and the heatmap SC.

    Raises
    ------
    cxr_pipeline.errors.RejectedInput
        Not a chest radiograph, or pixel data we cannot use (the reason says which).
    cxr_pipeline.errors.CxrError
        Any other failure, with its reason.
    """
    timings: dict[str, float] = {}
    with _timed(timings, "ingest"):
        image: Radiograph = load_radiograph(source, engine.settings.ingest)
    return analyse_radiograph(image, engine, timings)


def analyse_radiograph(
    image: Radiograph, engine: Engine, timings: dict[str, float] | None = None
) -> Analysis:
    """Run the stages after ingest on an already decoded radiograph.

    Parameters
    ----------
    image
        Output of :func:`cxr_pipeline.dicom.ingest.load_radiograph`.
    engine
        Loaded model and settings.
    timings
        Stage timings gathered so far (added to).

    Returns
    -------
    Analysis
        Probability, decision, the SR and the heatmap SC.
    """
    timings = {} if timings is None else timings
    settings = engine.settings
    card = engine.predictor.card
    with _timed(timings, "infer"):
        probability = float(engine.predictor.predict_images([image.pixels])[0])
    finding = engine.predictor.finding(probability)
    with _timed(timings, "explain"):
        heatmap = heatmap_for_image(engine.predictor, image.pixels, settings.explain)
    with _timed(timings, "encode"):
        sr = build_structured_report(
            image.header, finding, card, settings.output, heatmap=heatmap
        )
        sc = build_secondary_capture(
            image.header, image.pixels, heatmap, finding, card, settings.output
        )
    return Analysis(
        sop_instance_uid=image.sop_instance_uid,
        study_instance_uid=image.study_instance_uid,
        finding=finding,
        structured_report=sr,
        secondary_capture=sc,
        heatmap_method=settings.explain.method if heatmap is not None else "none",
        timings_ms=timings,
    )


def write_results(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Write the SR and SC of one analysis as DICOM Part 10 files.

    Files are named ``<SOPInstanceUID>.dcm`` under
    ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/``.

    Parameters
    ----------
    analysis
        Result of :func:`analyse`.
    out_dir
        Root folder.

    Returns
    -------
    list of Path
        The written files: SR first, then SC.
    """
    paths: list[Path] = []
    for dataset in analysis.result_datasets:
        folder = out_dir / str(dataset.StudyInstanceUID) / str(dataset.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
