"""Read a result SR back with highdicom: what a PACS-side consumer would see.

Used by the tests (write-then-read round trip) and by tools that audit stored results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxr_pipeline.dicom.codes import (
    CERTAINTY_OF_FINDING,
    COVID19,
    DISPLAY_CODING_SCHEME,
    PRESENT,
    SUSPECTED,
    UCUM_PERCENT,
    SopClass,
)
from cxr_pipeline.errors import EncodeError


@dataclass(frozen=True)
class ReadBack:
    """The content of a result SR, as read back from DICOM.

    Attributes
    ----------
    probability
        The calibrated COVID-19 probability in [0, 1] (NUM "Certainty of Finding", below
        the coded decision; at the group's top in SRs written before issue 19).
    positive
        True when the COVID-19 evaluation is Suspected (Present in older SRs).
    finding
        The Finding code of the measurement group (COVID-19).
    evaluation
        The coded decision (Present or Absent).
    source_sop_instance_uid, source_sop_class_uid
        The image the measurement group references.
    device_uid
        Device UID of the algorithm's Contributing Equipment item.
    observer_device_uid
        Device Observer UID of the observation context (same model).
    algorithm_name, algorithm_version
        From the Algorithm Identification (TID 4019).
    algorithm_parameters
        Its parameters, e.g. ``("threshold=0.5", "architecture=resnet18")``.
    tracking_uid
        Tracking Unique Identifier of the measurement group.
    sop_instance_uid, series_instance_uid, study_instance_uid
        Of the SR itself.
    verification_flag
        ``"UNVERIFIED"`` for every result this pipeline writes.
    region_points
        (column, row) points of the salient-area ELLIPSE of the planar ROI group with
        the same Tracking UID, on the source image; empty when the SR has none.
    display
        What OHIF prints for the planar group, one ``"meaning: value unit"`` line per NUM,
        e.g. ``("COVID-19 suspected, probability: 42.39 %", "above the 98 %-sensitivity
        point: 27.00 %")``; empty when the SR has none.
    """

    probability: float
    positive: bool
    finding: hd.sr.CodedConcept
    evaluation: hd.sr.CodedConcept
    source_sop_instance_uid: str
    source_sop_class_uid: str
    device_uid: str
    observer_device_uid: str
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: tuple[str, ...]
    tracking_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    verification_flag: str
    region_points: tuple[tuple[float, float], ...] = ()
    display: tuple[str, ...] = ()

    def parameter(self, name: str) -> str | None:
        """Return the value of the algorithm parameter ``name=value`` (None: absent)."""
        for text in self.algorithm_parameters:
            key, sep, value = text.partition("=")
            if sep and key == name:
                return value
        return None

    @property
    def threshold(self) -> float | None:
        """The decision threshold recorded in the algorithm parameters."""
        value = self.parameter("threshold")
        return None if value is None else float(value)


def _display(report: hd.sr.MeasurementReport, tracking_uid: str) -> tuple[str, ...]:
    lines = []
    for group in report.get_planar_roi_measurement_groups(tracking_uid=tracking_uid):
        for item in group:
            for child in item.get("ContentSequence", []):
                name = child.get("ConceptNameCodeSequence", [None])[0]
                if child.get("ValueType") != "NUM" or name is None:
                    continue
                if name.CodingSchemeDesignator != DISPLAY_CODING_SCHEME:
                    continue
                measured = child.MeasuredValueSequence[0]
                unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
                # OHIF v3's format: two decimals and the unit's code value.
                lines.append(f"{name.CodeMeaning}: {float(measured.NumericValue):.2f} {unit}")
    return tuple(lines)


def _certainty(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[float]:
    """Certainty of Finding values in [0, 1]: below the decision, or at the group's top."""
    # highdicom rebuilds a qualitative evaluation from its name and value only, so the
    # NUM below it is looked up in the group's own content tree.
    found = [
        num
        for item in group[0].ContentSequence
        if item.ValueType == "CODE"
        and hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]) == COVID19
        for num in item.get("ContentSequence", [])
        if num.ValueType == "NUM"
        and hd.sr.CodedConcept.from_dataset(num.ConceptNameCodeSequence[0])
        == CERTAINTY_OF_FINDING
    ]
    values = []
    for item in found:
        measured = item.MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
        scale = 100.0 if unit == UCUM_PERCENT.value else 1.0
        values.append(float(measured.NumericValue) / scale)
    if not values:  # SRs written before issue 19: a top-level NUM in UCUM "1"
        values = [float(m.value) for m in group.get_measurements(name=CERTAINTY_OF_FINDING)]
    return values


def _region_points(
    report: hd.sr.MeasurementReport, tracking_uid: str
) -> tuple[tuple[float, float], ...]:
    planar = report.get_planar_roi_measurement_groups(tracking_uid=tracking_uid)
    for group in planar:
        region = group.roi
        if isinstance(region, hd.sr.ImageRegion):
            data = region.value
            return tuple((float(col), float(row)) for col, row in data)
    return ()


def _text_values(item: Dataset, name: Code) -> list[str]:
    found = hd.sr.utils.find_content_items(item, name=name, value_type="TEXT")
    return [str(match.TextValue) for match in found]


def _processing_device_uid(ds: Dataset) -> str:
    for equipment in ds.get("ContributingEquipmentSequence", []):
        purposes = equipment.get("PurposeOfReferenceCodeSequence", [])
        processing = any(p.CodeValue == codes.DCM.ProcessingEquipment.value for p in purposes)
        if processing and equipment.get("DeviceUID"):
            return str(equipment.DeviceUID)
    raise EncodeError("SR has no processing Contributing Equipment item with a Device UID")


def read_structured_report(source: Dataset | Path | str) -> ReadBack:
    """Parse a result SR with highdicom and extract the finding and its references.

    Parameters
    ----------
    source
        The SR as a dataset or a DICOM file path.

    Returns
    -------
    ReadBack
        Probability, decision, finding, references and algorithm identity.

    Raises
    ------
    EncodeError
        Not a Comprehensive 3D SR, or not one with the content this pipeline writes
        (no COVID-19 measurement group, no probability, no source image, ...).
    """
    try:
        ds = dcmread(source) if isinstance(source, Path | str) else source
    except (OSError, InvalidDicomError) as exc:
        raise EncodeError(f"cannot read SR file: {exc}") from exc
    if str(ds.get("SOPClassUID", "")) != SopClass.COMPREHENSIVE_3D_SR:
        raise EncodeError(f"not a Comprehensive 3D SR: SOP class {ds.get('SOPClassUID')}")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        groups = report.get_image_measurement_groups(finding_type=COVID19)
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"SR {ds.get('SOPInstanceUID')} is not TID 1500: {exc}") from exc
    if len(groups) != 1:
        raise EncodeError(f"expected one COVID-19 measurement group, found {len(groups)}")
    group = groups[0]
    evaluations = group.get_qualitative_evaluations(name=COVID19)
    sources = group.source_images
    if len(evaluations) != 1 or len(sources) != 1:
        raise EncodeError("measurement group needs one evaluation and one source image")
    probabilities = _certainty(group)
    if len(probabilities) != 1:
        raise EncodeError("measurement group needs one Certainty of Finding")
    observers = report.get_observer_contexts(observer_type=codes.DCM.Device)
    if not observers:
        raise EncodeError("SR has no device observer context")
    observer = observers[0].observer_identifying_attributes
    if not isinstance(observer, hd.sr.DeviceObserverIdentifyingAttributes):
        raise EncodeError("SR observer context is not a device")
    root = group[0]
    names = _text_values(root, codes.DCM.AlgorithmName)
    versions = _text_values(root, codes.DCM.AlgorithmVersion)
    if len(names) != 1 or len(versions) != 1:
        raise EncodeError("measurement group lacks its Algorithm Identification")
    evaluation = evaluations[0][0].value  # the CODE item's coded value
    finding_type = group.finding_type
    if finding_type is None or group.tracking_uid is None:
        raise EncodeError("measurement group lacks a finding or a tracking UID")
    return ReadBack(
        probability=probabilities[0],
        positive=evaluation in (SUSPECTED, PRESENT),
        finding=finding_type,
        evaluation=evaluation,
        source_sop_instance_uid=str(sources[0].referenced_sop_instance_uid),
        source_sop_class_uid=str(sources[0].referenced_sop_class_uid),
        device_uid=_processing_device_uid(ds),
        observer_device_uid=str(observer.uid),
        algorithm_name=names[0],
        algorithm_version=versions[0],
        algorithm_parameters=tuple(_text_values(root, codes.DCM.AlgorithmParameters)),
        tracking_uid=str(group.tracking_uid),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        verification_flag=str(ds.get("VerificationFlag", "")),
        region_points=_region_points(report, str(group.tracking_uid)),
        display=_display(report, str(group.tracking_uid)),
    )
