"""The decode side of a batch run: what each decode process does with one file.

A decode process reads a file, applies the listener's chest-radiograph policy
(:func:`cxr_pipeline.dicom.ingest.check_chest_radiograph`, inside ``load_radiograph``),
decodes the pixel data (at reduced resolution where the codec allows) and runs the
model's eval preprocessing, so only a ``(3, crop, crop)`` float32 array crosses back to
the main process, which runs the model. :func:`decode_file` never raises: every failure
becomes a :class:`Decoded` with a status and a reason, so one broken file cannot stop a
batch.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from cxr_pipeline.batch.report import Status
from cxr_pipeline.batch.walker import FileKind, InputFile, detect_kind
from cxr_pipeline.dicom.codes import JPEG2000_TRANSFER_SYNTAXES
from cxr_pipeline.dicom.decode import transfer_syntax_of
from cxr_pipeline.dicom.ingest import load_picture, load_radiograph, read_dataset
from cxr_pipeline.errors import CxrError, NotDicom, Reason
from cxr_pipeline.model.card import PreprocessingSpec
from cxr_pipeline.model.preprocess import preprocess
from cxr_pipeline.settings import IngestSettings

SKIP_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.NOT_DICOM,
        Reason.NOT_IMAGE,
        Reason.NOT_CHEST_RADIOGRAPH,
        Reason.MULTI_FRAME,
        Reason.IMAGE_TOO_SMALL,
        Reason.IMAGE_TOO_LARGE,
    }
)
"""Reasons that mean "not an input we analyse" (status skipped). Every other reason on a
file that was meant to be analysed is a failure."""


@dataclass(frozen=True)
class DecodeJob:
    """Everything a decode process needs for one file (picklable).

    Attributes
    ----------
    item
        The file.
    ingest
        The chest-radiograph policy (same as the listener's).
    spec
        The model's preprocessing parameters (from its card).
    max_side
        Longest side to decode to; None = full resolution.
    fit_model
        Decode each image at the largest integer reduction whose shorter side still
        covers ``spec.resize`` (see :func:`model_max_side`); wins over ``max_side``.
    keep_image
        Send the decoded pixels back too (for heatmaps and Secondary Captures).
    keep_header
        Send the header back too (for Structured Reports).
    """

    item: InputFile
    ingest: IngestSettings
    spec: PreprocessingSpec
    max_side: int | None = None
    fit_model: bool = False
    keep_image: bool = False
    keep_header: bool = False


@dataclass
class Decoded:
    """What a decode process sends back for one file.

    Attributes
    ----------
    item, kind
        The file and what it turned out to be.
    tensor
        Preprocessed model input ``(3, crop, crop)`` float32; None when not analysable.
    status, reason, detail
        Set when ``tensor`` is None (skipped or failed).
    sop_instance_uid, study_instance_uid, series_instance_uid
        Of a DICOM source, where readable.
    header, pixels
        Source header and display-ready pixels when the job asked for them.
    decode_ms
        Read + decode + preprocess time in the decode process.
    """

    item: InputFile
    kind: FileKind
    tensor: np.ndarray | None = None
    status: Status | None = None
    reason: str = ""
    detail: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    header: Dataset | None = None
    pixels: np.ndarray | None = None
    decode_ms: float = 0.0


def init_decode_process() -> None:
    """Set up a decode process (the pool's initializer).

    Ctrl-C is the main process's to handle (it cancels queued work and closes the
    report); a decode process keeps one intra-op thread so decoders do not fight the
    model for cores.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _dicom_source(item: InputFile) -> Dataset:
    """Read a DICOM file; a preamble-less raw dataset is read with ``force``."""
    try:
        return read_dataset(item.path)
    except NotDicom:
        ds = pydicom.dcmread(item.path, force=True)
        if "SOPClassUID" not in ds:
            raise
        return ds


def _model_input(pixels: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """Preprocess to the float32 array that crosses back to the main process."""
    if not pixels.flags.writeable:  # torch refuses to wrap read-only memory safely
        pixels = pixels.copy()
    tensor = preprocess(pixels, spec)
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


def model_max_side(
    rows: int, columns: int, resize: int, *, exact_reduction: bool = True
) -> int | None:
    """Longest side to decode at, for an image the model resizes to ``resize`` (shorter side).

    The reduction is a power of two (what JPEG 2000 resolution levels and exact block
    averages give) and stops where it would change what the model sees: the decoded
    shorter side is either exactly ``resize`` (a block average is then the same as the
    area resize the preprocessing does) or at least ``2 * resize`` (the final resize still
    averages several pixels into one). It is never smaller than ``resize``: the model input
    is never upsampled.

    Parameters
    ----------
    rows, columns
        Stored image size.
    resize
        The model's shorter-side resize (``PreprocessingSpec.resize``).
    exact_reduction
        Whether the decoder's reduction is a block average. False for JPEG 2000, whose
        resolution levels are wavelet low-passes: decoding those straight to the model
        size moved the COVID probability by 0.05 on average (0.11 at most) on NIH images,
        so they keep the ``2 * resize`` margin (0.012 on average).

    Returns
    -------
    int or None
        ``ceil(max(rows, columns) / f)`` for the largest such power of two ``f >= 2``;
        None (full resolution) when there is none.
    """
    shorter, resize = min(rows, columns), max(1, resize)
    best = 1
    factor = 2
    while shorter // factor >= resize:
        exact = exact_reduction and shorter % factor == 0 and shorter // factor == resize
        if exact or shorter // factor >= 2 * resize:
            best = factor
        factor *= 2
    if best < 2:
        return None
    return -(-max(rows, columns) // best)


def _decode_dicom(job: DecodeJob, out: Decoded) -> None:
    ds = _dicom_source(job.item)
    out.sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    out.study_instance_uid = str(ds.get("StudyInstanceUID", ""))
    out.series_instance_uid = str(ds.get("SeriesInstanceUID", ""))
    max_side = job.max_side
    if job.fit_model and "Rows" in ds and "Columns" in ds:
        max_side = model_max_side(
            int(ds.Rows),
            int(ds.Columns),
            job.spec.resize,
            exact_reduction=transfer_syntax_of(ds) not in JPEG2000_TRANSFER_SYNTAXES,
        )
    image = load_radiograph(ds, job.ingest, max_side=max_side)
    out.tensor = _model_input(image.pixels, job.spec)
    if job.keep_image:
        out.pixels = image.pixels
    if job.keep_header or job.keep_image:
        out.header = image.header


def _decode_picture(job: DecodeJob, out: Decoded) -> None:
    pixels = load_picture(job.item.path)
    out.tensor = _model_input(pixels, job.spec)
    if job.keep_image:
        out.pixels = pixels


def decode_file(job: DecodeJob) -> Decoded:
    """Detect, check, decode and preprocess one file; never raises.

    Parameters
    ----------
    job
        The file and the parameters of the run.

    Returns
    -------
    Decoded
        A model-ready tensor, or a status (skipped / failed) with the reason.
    """
    start = time.perf_counter()
    out = Decoded(item=job.item, kind=FileKind.OTHER)
    try:
        out.kind = detect_kind(job.item.path)
        if out.kind is FileKind.OTHER:
            out.status, out.reason = Status.SKIPPED, Reason.NOT_DICOM.value
            out.detail = "no DICOM preamble or readable dataset, not a picture"
        elif out.kind is FileKind.DICOMDIR:
            out.status, out.reason = Status.SKIPPED, Reason.NOT_IMAGE.value
            out.detail = "DICOMDIR (media storage directory), not an image"
        elif out.kind is FileKind.PICTURE:
            _decode_picture(job, out)
        else:
            _decode_dicom(job, out)
    except CxrError as exc:
        out.tensor = out.pixels = out.header = None
        # A file that looked like DICOM but cannot be read is broken, not "other".
        skip = exc.reason in SKIP_REASONS and not (
            exc.reason is Reason.NOT_DICOM and out.kind is FileKind.DICOM
        )
        out.status = Status.SKIPPED if skip else Status.FAILED
        out.reason, out.detail = exc.reason.value, exc.detail
    except Exception as exc:  # a broken file must never stop the batch
        out.tensor = out.pixels = out.header = None
        out.status, out.reason = Status.FAILED, Reason.INTERNAL.value
        out.detail = f"{type(exc).__name__}: {str(exc)[:200]}"
    out.decode_ms = (time.perf_counter() - start) * 1000.0
    return out
