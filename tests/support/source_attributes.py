"""Constants shared by the encoder tests: what results copy from their source."""

from __future__ import annotations

PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Patient and study attributes a result object must carry over from its source."""

SHARED_DICOMS: tuple[str, ...] = (
    "nih_dx_secondary_capture.dcm",
    "rsna_cr_ap_jpeg_baseline.dcm",
    "siim_cr_pa_fake_monochrome1.dcm",
    "siim_cr_pa_jpeg_baseline.dcm",
)
"""The real chest radiograph DICOM files in ``shared/data/cxr/dicom``."""
