"""Pay the one-time costs of a worker when it starts, not on its first image.

The first analysis in a process is slower than the rest: highdicom parses its tables of
the standard's modules (about 0.5 s) the first time it builds an object, and the first
forward and backward passes allocate their buffers. :func:`warm_up` runs the whole
pipeline once on a generated radiograph (no patient, no file, nothing sent) so that a
worker's first real image costs what every other one does.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.pipeline import Engine, analyse

log = logging.getLogger(__name__)

_SIDE = 256


def synthetic_radiograph(side: int = _SIDE) -> Dataset:
    """Build a small CR chest PA radiograph with smooth generated pixels and new UIDs.

    Parameters
    ----------
    side
        Rows and columns (at least the ingest policy's ``min_size``, 128 by default).

    Returns
    -------
    pydicom.dataset.Dataset
        A complete CR image that passes the default chest-radiograph policy. It carries no
        patient data (Patient's Name ``WARM^UP``).
    """
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pixels = (1000.0 + 2000.0 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) * 6.0)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(SopClass.COMPUTED_RADIOGRAPHY)
    ds.SOPClassUID = SopClass.COMPUTED_RADIOGRAPHY
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "WARM^UP"
    ds.PatientID = "WARMUP"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def warm_up(engine: Engine) -> float:
    """Analyse one generated radiograph with ``engine`` and throw the results away.

    Parameters
    ----------
    engine
        The worker's loaded engine.

    Returns
    -------
    float
        Seconds it took (logged at DEBUG).
    """
    start = time.perf_counter()
    analyse(synthetic_radiograph(), engine)
    seconds = time.perf_counter() - start
    log.debug("warm-up analysis took %.2f s", seconds)
    return seconds
