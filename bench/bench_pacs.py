"""What retrieval costs: cxr-batch from a PACS against a folder run on the same images.

One run, same images, same model (loaded once and shared), same decode workers, SR + SC
written by both, nothing sent:

(a) folder run: ``run_batch`` on the files;
(b) ``--from-pacs``: ``run_remote`` with a real Orthanc (C-FIND STUDY/SERIES/IMAGE, then
    C-GET of each series), the files having been uploaded to it first;
(c) ``--from-dicomweb``: the same Orthanc through its DICOMweb plugin (QIDO-RS, WADO-RS).

Images are the shared real chest DICOMs and pydicom-data's RG1 CR, copied with new UIDs
into studies of one date (``--images`` in all, ``--per-study`` per study). Prints, per
mode, the median images/s over ``--rounds`` (wall time of the run, query included, and
processing time) and the ratios b/a and c/a.

Usage::

    .venv/bin/python bench/bench_pacs.py [--images 24] [--rounds 3] [--workers 2]
        [--checkpoint PATH]   # default: the packaged model

The machine may be shared with other work: read the figures as a snapshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a script run from anywhere; the tests never do this
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxr_pipeline.batch.pacs import DimseSource  # noqa: E402
from cxr_pipeline.batch.remote import RemoteQuery, RemoteSource  # noqa: E402
from cxr_pipeline.batch.remote_run import run_remote  # noqa: E402
from cxr_pipeline.batch.report import Summary  # noqa: E402
from cxr_pipeline.batch.runner import BatchOptions, run_batch  # noqa: E402
from cxr_pipeline.batch.web_source import DicomwebSource  # noqa: E402
from cxr_pipeline.model.inference import Predictor  # noqa: E402
from cxr_pipeline.settings import (  # noqa: E402
    Settings,
    load_settings,
    parse_destination,
    parse_dicomweb_url,
)
from tests.support.orthanc import running_orthanc  # noqa: E402

DATE = "20200305"


def _sources() -> list[Path]:
    env = os.environ.get("CXR_DATASET_DIR")
    shared = Path(env) if env else REPO.parent / "shared" / "data" / "cxr"
    files = [
        shared / "dicom" / name
        for name in (
            "siim_cr_pa_jpeg_baseline.dcm",
            "rsna_cr_ap_jpeg_baseline.dcm",
            "nih_dx_secondary_capture.dcm",
        )
    ]
    rg1 = get_testdata_file("RG1_UNCR.dcm", download=False)
    if rg1 is not None:
        files.append(Path(str(rg1)))
    return [f for f in files if f.is_file()]


def make_archive(folder: Path, images: int, per_study: int) -> None:
    """Copy real chest DICOMs with new UIDs into studies of one date."""
    sources = [pydicom.dcmread(p) for p in _sources()]
    folder.mkdir(parents=True)
    study = series = ""
    for number in range(images):
        if number % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds = sources[number % len(sources)].copy()
        ds.file_meta = sources[number % len(sources)].file_meta.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = DATE
        ds.PatientID = f"BENCH-{study[-8:]}"  # one patient per study, as in an archive
        ds.save_as(folder / f"{number:04d}.dcm")


def _timed(run: Callable[[Path], Summary], out: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run(out)
    wall = time.perf_counter() - start
    done = summary.classified
    return done / wall, summary.images_per_s, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--per-study", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()

    model: dict[str, object] = {"device": "cpu"}
    if args.checkpoint is not None:
        model["checkpoint"] = str(args.checkpoint)
    settings: Settings = load_settings(
        None,
        model=model,
        batch={"decode_workers": args.workers, "batch_size": args.batch_size},
    )
    predictor = Predictor.from_settings(settings.model)
    options = BatchOptions(write_sr=True, write_sc=True)
    query = RemoteQuery(study_date=DATE)
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    try:
        files = work / "files"
        make_archive(files, args.images, args.per_study)
        with running_orthanc(work / "orthanc") as pacs:
            for path in sorted(files.iterdir()):
                pacs.upload(path)

            def folder(out: Path) -> Summary:
                return run_batch([files], out, settings, options, predictor=predictor)

            def remote(make: Callable[[], RemoteSource]) -> Callable[[Path], Summary]:
                def run(out: Path) -> Summary:
                    source = make()
                    try:
                        return run_remote(
                            source, query, out, settings, options, predictor=predictor
                        )
                    finally:
                        source.close()

                return run

            modes = {
                "folder": folder,
                "pacs (C-FIND + C-GET)": remote(
                    lambda: DimseSource(
                        parse_destination(pacs.address), settings.send, settings.batch
                    )
                ),
                "dicomweb (QIDO + WADO)": remote(
                    lambda: DicomwebSource(parse_dicomweb_url(pacs.dicomweb_url), settings.send)
                ),
            }
            folder(work / "warm")  # warm caches and the fork server once
            results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for name, run in modes.items():
                    results[name].append(_timed(run, work / "out"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.images} images ({args.per_study} per study), {args.workers} decode workers, "
        f"batch {args.batch_size}, model {predictor.card.name}, SR + SC written, median of "
        f"{args.rounds} rounds"
    )
    wall = {m: statistics.median(r[0] for r in rows) for m, rows in results.items()}
    proc = {m: statistics.median(r[1] for r in rows) for m, rows in results.items()}
    for name in modes:
        done = {r[2] for r in results[name]}
        print(
            f"  {name:26s} {wall[name]:6.2f} img/s (wall, query included)  "
            f"{proc[name]:6.2f} img/s (processing)  images analysed {sorted(done)}"
        )
    base = wall["folder"]
    for name in list(modes)[1:]:
        print(f"  ratio {name} / folder: {wall[name] / base:.2f} (wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
