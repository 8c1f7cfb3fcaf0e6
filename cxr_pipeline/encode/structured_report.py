"""The result SR: a Comprehensive 3D SR, TID 1500 "Imaging Measurement Report".

Content tree (all via highdicom templates)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context: device observer = the model (Device UID, name)
      Procedure Reported = LOINC 36554-4 "XR Chest Single view"
      Imaging Measurements
        Measurement Group (TID 1410, planar ROI), Tracking UID (deterministic)
          Image Region = ELLIPSE around the heatmap's most salient area, on the radiograph
          Finding = SCT 840539006 COVID-19, Algorithm Identification
          NUM  "COVID-19 suspected, probability" (99CXRPL) = calibrated probability, "%"
          NUM  "above the 98 %-sensitivity point" (99CXRPL) = threshold, UCUM "%"
               [or "COVID-19 not suspected, probability" and "below the ..."]
        Measurement Group (TID 1501, image level), same Tracking UID
          Tracking Identifier + Tracking UID
          Finding = COVID-19
          Algorithm Identification (TID 4019): name, version, parameters: threshold,
            threshold scale, target sensitivity, what decided (model card or site
            profile), architecture
          Source = the analysed radiograph
          CODE COVID-19 = Suspected / Absent (calibrated probability >= threshold)
            HAS PROPERTIES NUM "Certainty of Finding" = calibrated probability, UCUM "%"

What a reader sees reads as one statement. OHIF v3 (cornerstone-dicom-sr) only displays
measurement groups with an image region, fails on the whole SR when a group has none, and
merges groups that share a Tracking UID into one measurement (both groups describe the same
tracked finding: PS3.16 TID 1501 / 1410, the Tracking UID identifies a finding, not a
group). It prints each NUM at the top of a merged group as "meaning: value unit" and
nothing else, so the planar group's two NUMs carry the statement in two short lines
("COVID-19 suspected, probability: 42.39 %" / "above the 98 %-sensitivity point: 27.00 %";
one long line ran off the viewport beside a region on the right). The standard Certainty of
Finding sits below the coded decision (HAS PROPERTIES, the CAD SR idiom of TID 4006 / 4104),
where every SR consumer finds it and OHIF does not print it a second time ("Certainty of
Finding: 0.96 1" read as noise beside the statement). The decision is "Suspected", not
"Present": the operating point is a screening one (high sensitivity), so a flagged image's
probability can be well below 50 %.

Every container has SEPARATE continuity, so that renderers (DCMTK ``dsr2html``) print a
concept name beside each value. The document is UNVERIFIED and PRELIMINARY, joins the
source study in a new series, and carries a Contributing Equipment item for the
algorithm (IHE AI Results).
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxr_pipeline.dicom.codes import (
    ABSENT,
    AT_OR_ABOVE_OPERATING_POINT,
    BELOW_OPERATING_POINT,
    CERTAINTY_OF_FINDING,
    CHEST_XRAY_PROCEDURE,
    CODE_MEANING_MAX,
    COVID19,
    COVID19_NOT_SUSPECTED_DISPLAY,
    COVID19_SUSPECTED_DISPLAY,
    DISPLAY_CODING_SCHEME,
    DISPLAY_CODING_SCHEME_NAME,
    SUSPECTED,
    UCUM_PERCENT,
)
from cxr_pipeline.dicom.uids import ResultUid, instance_uid, series_uid
from cxr_pipeline.encode._common import (
    evidence_dataset,
    processing_equipment,
    series_date_time,
    series_description,
    source_reference,
    without_person_names,
)
from cxr_pipeline.encode.region import salient_ellipse
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings

TRACKING_IDENTIFIER = "COVID-19 chest radiograph classification"
"""Human-readable Tracking Identifier of the image-level measurement group."""


def algorithm_parameters(card: ModelCard, finding: Finding | None = None) -> list[str]:
    """List the TID 4019 Algorithm Parameters of one result, as ``name=value`` texts.

    Parameters
    ----------
    card
        The model card (architecture; the threshold when no finding is given).
    finding
        The reported finding: its threshold, the threshold's scale, the target
        sensitivity and what set the operating point (model card or site profile).

    Returns
    -------
    list of str
        ``threshold=<t>``, ``threshold_scale=calibrated probability (<method>)`` or
        ``raw score``, ``target_sensitivity=<s>`` (when known), ``decided_by=<who>`` (when
        known), ``architecture=<name>``.
    """
    if finding is None:
        return [f"threshold={card.threshold:.6g}", f"architecture={card.architecture}"]
    scale = (f"calibrated probability ({finding.calibration_method})" if finding.calibrated
             else "raw score")
    params = [f"threshold={finding.threshold:.6g}", f"threshold_scale={scale}"]
    if finding.target_sensitivity is not None:
        params.append(f"target_sensitivity={finding.target_sensitivity:.6g}")
    if finding.decided_by:
        params.append(f"decided_by={finding.decided_by}")
    params.append(f"architecture={card.architecture}")
    return params


def algorithm_identification(
    card: ModelCard, settings: OutputSettings, finding: Finding | None = None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model: name, version and parameters.

    Parameters
    ----------
    card
        The model card.
    settings
        Output settings (manufacturer).
    finding
        The reported finding, whose operating point the parameters record
        (:func:`algorithm_parameters`).

    Returns
    -------
    highdicom.sr.AlgorithmIdentification
        With the parameters of :func:`algorithm_parameters`.
    """
    return hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        parameters=algorithm_parameters(card, finding),
        manufacturer=settings.manufacturer,
    )


def display_measurements(finding: Finding) -> list[hd.sr.Measurement]:
    """Build the planar group's NUMs: the statement as OHIF prints it, in two lines.

    Parameters
    ----------
    finding
        The reported finding.

    Returns
    -------
    list of highdicom.sr.Measurement
        "COVID-19 suspected, probability" (or "not suspected") = the probability in %, and
        "above the 98 %-sensitivity point" (or "at ...", "below ...", "... the operating
        point" without a target sensitivity) = the threshold in %.
    """
    verdict = COVID19_SUSPECTED_DISPLAY if finding.positive else COVID19_NOT_SUSPECTED_DISPLAY
    point = AT_OR_ABOVE_OPERATING_POINT if finding.positive else BELOW_OPERATING_POINT
    meaning = f"{finding.side()} {finding.point_name()}"
    if len(meaning) > CODE_MEANING_MAX:  # cannot happen for a target written as "98.5 %"
        meaning = point.meaning
    return [
        hd.sr.Measurement(
            name=verdict, value=round(100.0 * float(finding.probability), 4), unit=UCUM_PERCENT
        ),
        hd.sr.Measurement(
            name=Code(point.value, point.scheme_designator, meaning),
            value=round(100.0 * float(finding.threshold), 4),
            unit=UCUM_PERCENT,
        ),
    ]


def _check_finding(finding: Finding) -> None:
    for name, value in (("probability", finding.probability), ("threshold", finding.threshold)):
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
            raise EncodeError(f"finding {name} {value!r} is not a number in [0, 1]")


def _source_size(source: Dataset) -> tuple[int, int]:
    try:
        rows, cols = int(source.Rows), int(source.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError("source dataset lacks Rows/Columns; cannot place the region") from exc
    return rows, cols


def _salient_region_group(
    source: Dataset,
    heatmap: np.ndarray | None,
    finding: Finding,
    tracking: hd.sr.TrackingIdentifier,
    algorithm: hd.sr.AlgorithmIdentification,
    source_image: hd.sr.SourceImageForRegion,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group: the salient-area ellipse, labelled with the statement and probability."""
    rows, cols = _source_size(source)
    ellipse = salient_ellipse(heatmap, rows, cols)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=ellipse.graphic_data(),
        source_image=source_image,
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=COVID19,
        algorithm_id=algorithm,
        measurements=display_measurements(finding),
    )


def _separate_containers(item: Dataset) -> None:
    """Set SEPARATE continuity on ``item`` and every CONTAINER below it.

    highdicom's templates build CONTINUOUS containers (meant for running text); ours hold
    independent name-value pairs, and DCMTK only prints the names of SEPARATE content.
    """
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate_containers(child)


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = DISPLAY_CODING_SCHEME
    item.CodingSchemeName = DISPLAY_CODING_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "cxr-pipeline developers"
    return item


def build_structured_report(
    source: Dataset,
    finding: Finding,
    card: ModelCard,
    settings: OutputSettings,
    heatmap: np.ndarray | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for one analysed radiograph.

    Parameters
    ----------
    source
        Header of the analysed image (pixel data not needed): patient and study
        modules are copied, the image is referenced as the measurement source.
    finding
        The COVID probability and the threshold it was decided at.
    card
        The model card: algorithm name/version/architecture and Device UID.
    settings
        Output settings: series number, manufacturer, institution.
    heatmap
        The explanation map over the image (any resolution with its aspect), whose most
        salient area the planar group outlines; None outlines the whole image.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, ready to save or send. Its UIDs are deterministic functions of the
        source SOP Instance / Study Instance UID and ``card.device_uid``.

    Raises
    ------
    EncodeError
        The source lacks a required UID or its size, the finding is not a probability,
        or highdicom rejects a value (e.g. a name too long for its VR).
    """
    ref = source_reference(source)
    _check_finding(finding)
    evidence = evidence_dataset(source)
    try:
        source_image = hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=ref.sop_instance_uid,
        )
        tracking = hd.sr.TrackingIdentifier(
            uid=instance_uid(ResultUid.TRACKING, ref.sop_instance_uid, card.device_uid),
            identifier=TRACKING_IDENTIFIER,
        )
        algorithm = algorithm_identification(card, settings, finding)
        decision = hd.sr.QualitativeEvaluation(
            name=COVID19, value=SUSPECTED if finding.positive else ABSENT
        )
        # The probability as a property of the coded decision (see the module docstring).
        decision[0].ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    name=CERTAINTY_OF_FINDING,
                    value=round(100.0 * float(finding.probability), 6),
                    unit=UCUM_PERCENT,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
                )
            ]
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=COVID19,
            algorithm_id=algorithm,
            qualitative_evaluations=[decision],
            source_images=[source_image],
        )
        region_group = _salient_region_group(
            source,
            heatmap,
            finding,
            tracking,
            algorithm,
            hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ref.sop_class_uid,
                referenced_sop_instance_uid=ref.sop_instance_uid,
            ),
        )
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=card.device_uid,
                name=card.name,
                manufacturer_name=settings.manufacturer,
                model_name=card.architecture,
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=CHEST_XRAY_PROCEDURE,
            # The planar group first: OHIF takes the merged measurement's region and its
            # one printed line from it.
            imaging_measurements=[region_group, group],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[without_person_names(evidence)],
            content=report,
            series_instance_uid=series_uid(
                # One SR per series: OHIF v3 displays only the newest SR of a series.
                ResultUid.SR_SERIES, ref.sop_instance_uid, card.device_uid
            ),
            series_number=settings.sr_series_number,
            sop_instance_uid=instance_uid(
                ResultUid.SR_INSTANCE, ref.sop_instance_uid, card.device_uid
            ),
            instance_number=1,
            manufacturer=settings.manufacturer,
            institution_name=settings.institution_name,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=series_description("AI COVID-19 SR"),
            manufacturer_model_name=card.name,
            software_versions=card.version,
            contributing_equipment=[
                processing_equipment(
                    card,
                    settings,
                    f"COVID-19 classification of the referenced chest radiograph. "
                    f"{card.intended_use}",
                )
            ],
        )
        sr.copy_patient_and_study_information(evidence)
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"cannot build SR for {ref.sop_instance_uid}: {exc}") from exc
    _separate_containers(sr)
    series_date_time(sr)
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    return sr
