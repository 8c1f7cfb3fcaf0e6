"""The result as a Comprehensive 3D SR, TID 1500 "Imaging Measurement Report".

Content tree (all via highdicom templates)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context: device observer = the model (Device UID, name)
      Procedure Reported = LOINC 36554-4 "XR Chest Single view"
      Imaging Measurements
        Measurement Group (TID 1501, image level)
          Tracking Identifier + Tracking UID (deterministic)
          Finding = SCT 840539006 COVID-19
          Algorithm Identification (TID 4019): name, version, threshold, architecture
          Source = the analysed radiograph
          NUM  "Certainty of Finding" = COVID probability, UCUM "1"
          CODE COVID-19 = Present / Absent (probability >= threshold)

The document is UNVERIFIED and PRELIMINARY, joins the source study in a new series,
and carries a Contributing Equipment item for the algorithm (IHE AI Results).
"""

from __future__ import annotations

import math

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cxr_pipeline.codes import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    CHEST_XRAY_PROCEDURE,
    COVID19,
    PRESENT,
    UCUM_UNITY,
)
from cxr_pipeline.encode._common import (
    evidence_dataset,
    processing_equipment,
    series_description,
    source_reference,
    without_person_names,
)
from cxr_pipeline.errors import EncodeError
from cxr_pipeline.model_card import ModelCard
from cxr_pipeline.results import Finding
from cxr_pipeline.settings import OutputSettings
from cxr_pipeline.uids import ResultUid, instance_uid, series_uid

TRACKING_IDENTIFIER = "COVID-19 chest radiograph classification"
"""Human-readable Tracking Identifier of the image-level measurement group."""


def algorithm_identification(
    card: ModelCard, settings: OutputSettings
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model: name, version and parameters.

    Parameters
    ----------
    card
        The model card.
    settings
        Output settings (manufacturer).

    Returns
    -------
    highdicom.sr.AlgorithmIdentification
        With parameters ``threshold=<t>`` and ``architecture=<name>``.
    """
    return hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        parameters=[f"threshold={card.threshold:g}", f"architecture={card.architecture}"],
        manufacturer=settings.manufacturer,
    )


def _check_finding(finding: Finding) -> None:
    for name, value in (("probability", finding.probability), ("threshold", finding.threshold)):
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
            raise EncodeError(f"finding {name} {value!r} is not a number in [0, 1]")


def build_structured_report(
    source: Dataset, finding: Finding, card: ModelCard, settings: OutputSettings
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

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, ready to save or send. Its UIDs are deterministic functions of the
        source SOP Instance / Study Instance UID and ``card.device_uid``.

    Raises
    ------
    EncodeError
        The source lacks a required UID, the finding is not a probability, or
        highdicom rejects a value (e.g. a name too long for its VR).
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
        probability = hd.sr.Measurement(
            name=CERTAINTY_OF_FINDING,
            value=float(finding.probability),
            unit=UCUM_UNITY,
        )
        decision = hd.sr.QualitativeEvaluation(
            name=COVID19, value=PRESENT if finding.positive else ABSENT
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=COVID19,
            algorithm_id=algorithm_identification(card, settings),
            measurements=[probability],
            qualitative_evaluations=[decision],
            source_images=[source_image],
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
            imaging_measurements=[group],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[without_person_names(evidence)],
            content=report,
            series_instance_uid=series_uid(
                ResultUid.SR_SERIES, ref.study_instance_uid, card.device_uid
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
    return sr
