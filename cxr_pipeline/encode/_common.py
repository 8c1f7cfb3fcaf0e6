"""What the SR and the SC builders share: source checks, equipment, wording."""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass

import highdicom as hd
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from cxr_pipeline.dicom.codes import PROCESSING_EQUIPMENT
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.settings import OutputSettings

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
"""Mark carried by every result object (series description, burned-in text)."""

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Type 2 attributes of the Patient and General Study modules. highdicom reads them as
# plain attributes from the source, so a source that omits one (allowed for a Secondary
# Capture from a cloud converter, for instance) gets it as an empty value: "unknown".
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
_UNCHECKED_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "UT", "UR"})


@dataclass(frozen=True)
class SourceRef:
    """The identifying UIDs of the analysed image."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def source_reference(source: Dataset) -> SourceRef:
    """Read the source image's UIDs.

    Raises
    ------
    EncodeError
        A UID the result objects must reference is missing or empty.
    """
    values: dict[str, str] = {}
    for keyword in _REQUIRED_UIDS:
        value = str(source.get(keyword, "") or "").strip()
        if not value:
            raise EncodeError(f"source dataset lacks {keyword}; cannot reference it")
        values[keyword] = value
    return SourceRef(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
    )


def evidence_dataset(source: Dataset) -> Dataset:
    """Copy the source header without pixel data, ready for highdicom to copy from.

    Type 2 patient/study attributes the source omits are added empty; a Patient's Sex
    outside the defined terms M, F, O is written empty (unknown) rather than invented.
    """
    header = Dataset()
    for element in source:
        if element.keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            continue
        # Copies, so that filling in empty values never changes the caller's dataset.
        header.add(copy.deepcopy(element))
    _drop_invalid_values(header)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    sex = str(header.PatientSex or "").strip().upper()
    header.PatientSex = sex if sex in _PATIENT_SEX_VALUES else None
    return header


def _drop_invalid_values(header: Dataset) -> None:
    """Remove root values invalid for their VR, so they are not copied into results.

    Real sources carry such values (e.g. Patient's Age "81" instead of "081Y"); copied
    verbatim they would make our objects invalid. Type 2 patient/study attributes
    become empty (unknown), others are dropped; nothing is guessed or repaired.
    """
    for element in list(header):
        if element.VR in _UNCHECKED_VRS or element.value is None:
            continue
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        try:
            for value in values:
                validate_value(element.VR, value, config.RAISE)
        except ValueError:
            if element.keyword in _TYPE2_PATIENT_STUDY:
                element.value = None
            elif element.keyword not in _REQUIRED_UIDS:
                del header[element.tag]


def without_person_names(evidence: Dataset) -> Dataset:
    """Copy ``evidence`` with its root person names emptied.

    highdicom warns about person names it finds unusual and puts the name in the
    warning text; patient data must not reach logs. The builders construct with this
    copy, then copy the real patient and study modules from ``evidence``.
    """
    blanked = copy.deepcopy(evidence)
    for element in blanked:
        if element.VR == "PN":
            element.value = None
    return blanked


def processing_equipment(
    card: ModelCard, settings: OutputSettings, description: str
) -> hd.ContributingEquipment:
    """Contributing Equipment item for the algorithm (IHE AI Results).

    Manufacturer from the settings, model name and software version from the model
    card, Device UID (0018,1002) = the card's Device UID, which changes with the weights.
    """
    try:
        item = hd.ContributingEquipment(
            manufacturer=settings.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=card.name,
            software_versions=card.version,
            institution_name=settings.institution_name,
            contribution_description=description,
        )
    except ValueError as exc:
        raise EncodeError(f"invalid contributing equipment: {exc}") from exc
    # highdicom's ContributingEquipment has no Device UID argument; the attribute is
    # part of the Contributing Equipment Sequence (PS3.3 C.12.1), so it is set here.
    item.DeviceUID = card.device_uid
    return item


def series_description(what: str) -> str:
    """Series Description (LO, 64 characters at most) with the research-use mark."""
    return f"{what} - {NOT_FOR_DIAGNOSTIC_USE}"[:64]


def series_date_time(result: Dataset) -> None:
    """Give a result object its Series Date/Time, equal to its Content Date/Time.

    highdicom writes Content Date/Time (the moment the object is made) but no Series
    Date/Time, and PACS browsers file a series without one under an unknown date. Where
    the builder left no Content Date/Time, the current local time is written to both.
    """
    if not result.get("ContentDate") or not result.get("ContentTime"):
        now = datetime.datetime.now()
        result.ContentDate = now.strftime("%Y%m%d")
        result.ContentTime = now.strftime("%H%M%S.%f")
    result.SeriesDate = result.ContentDate
    result.SeriesTime = result.ContentTime
