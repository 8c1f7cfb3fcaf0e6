"""Real radiographs filed as studies of two dates, for PACS (query/retrieve) tests.

The shared real chest DICOMs and pydicom-data's real CRs are copied into a temporary
folder with new Study / Series / SOP Instance UIDs, study dates and accession numbers, so
each test loads a fresh archive: only the identifiers and dates are rewritten, never the
pixels. Layout (:func:`build_dated_archive`)::

    DATE_A (20200305)  study A1  CR series: 2 chest radiographs (JPEG baseline, SC class)
                                 CT series: 1 CT slice            (never retrieved)
                       study A2  DX series: 1 chest radiograph   (implicit VR, SC class)
    DATE_B (20200320)  study B1  CR series: 2 chest radiographs (16-bit CR class; the
                                            mislabelled MONOCHROME1 SIIM file)
                       study B2  CR series: 1 tibia CR           (skipped: not chest)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

DATE_A = "20200305"
DATE_B = "20200320"
RANGE_A = "20200301-20200310"
RANGE_B = "20200311-20200331"


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"{name} not installed (pip install pydicom-data)")
    return Path(str(found))


@dataclass(frozen=True)
class ArchivedImage:
    """One rewritten file and the identifiers it now has."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str
    study_date: str
    chest: bool


@dataclass
class DatedArchive:
    """The files of :func:`build_dated_archive`."""

    images: list[ArchivedImage] = field(default_factory=list)

    def of_date(self, date: str, *, chest: bool | None = None) -> list[ArchivedImage]:
        """Images of one study date (only chest or non-chest ones when asked)."""
        return [
            i for i in self.images if i.study_date == date and (chest is None or i.chest is chest)
        ]

    def radiographs(self, date: str) -> list[ArchivedImage]:
        """CR/DX images of one date (what a query for CR DX considers)."""
        return [i for i in self.of_date(date) if i.modality in ("CR", "DX")]


def _rewrite(
    source: Path,
    target: Path,
    *,
    study_uid: str,
    series_uid: str,
    modality: str,
    date: str,
    accession: str,
    number: int,
) -> str:
    ds = pydicom.dcmread(source)
    sop = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AccessionNumber = accession
    # One patient per study, as in a real archive (Orthanc files a study under each
    # patient it meets, so mixed patients would split it).
    ds.PatientID = f"CXR-{accession}"
    ds.PatientName = f"TEST^{accession}"
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.save_as(target)
    return sop


def build_dated_archive(folder: Path, shared_dicom_dir: Path) -> DatedArchive:
    """Write the archive's files under ``folder`` (see the module notes).

    Parameters
    ----------
    folder
        Empty folder.
    shared_dicom_dir
        The shared real DICOM folder (``shared/data/cxr/dicom``).

    Returns
    -------
    DatedArchive
        Every file with its new identifiers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shared = shared_dicom_dir
    layout = [
        # (date, study key, series modality, [(file, chest)])
        (
            DATE_A,
            "A1",
            "CR",
            [
                (shared / "siim_cr_pa_jpeg_baseline.dcm", True),
                (shared / "rsna_cr_ap_jpeg_baseline.dcm", True),
            ],
        ),
        (DATE_A, "A1", "CT", [(_testdata("CT_small.dcm"), False)]),
        (DATE_A, "A2", "DX", [(shared / "nih_dx_secondary_capture.dcm", True)]),
        (
            DATE_B,
            "B1",
            "CR",
            [
                (_testdata("RG1_UNCR.dcm"), True),
                (shared / "siim_cr_pa_fake_monochrome1.dcm", True),
            ],
        ),
        (DATE_B, "B2", "CR", [(_testdata("RG3_UNCR.dcm"), False)]),
    ]
    studies: dict[str, str] = {}
    archive = DatedArchive()
    for date, key, modality, files in layout:
        study_uid = studies.setdefault(key, generate_uid())
        series_uid = generate_uid()
        for number, (source, chest) in enumerate(files, start=1):
            target = folder / f"{key}-{modality}-{number}.dcm"
            sop = _rewrite(
                source,
                target,
                study_uid=study_uid,
                series_uid=series_uid,
                modality=modality,
                date=date,
                accession=f"ACC-{key}",
                number=number,
            )
            archive.images.append(
                ArchivedImage(target, study_uid, series_uid, sop, modality, date, chest)
            )
    return archive
