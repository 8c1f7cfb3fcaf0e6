"""Every DICOM UID and coded concept the pipeline reads or writes, in one place.

Logic refers to these names, never to raw UID strings or code values. UIDs come from
pydicom's registry where it has them; coded concepts are highdicom ``Code`` objects.
"""

from __future__ import annotations

from enum import StrEnum

from pydicom import uid as _uid
from pydicom.sr.coding import Code
from pynetdicom import sop_class as _sop

# --------------------------------------------------------------------------------------
# SOP classes
# --------------------------------------------------------------------------------------


class SopClass(StrEnum):
    """Storage SOP classes the pipeline receives or writes."""

    VERIFICATION = _sop.Verification  # type: ignore[attr-defined]
    COMPUTED_RADIOGRAPHY = _uid.ComputedRadiographyImageStorage
    DX_FOR_PRESENTATION = _uid.DigitalXRayImageStorageForPresentation
    DX_FOR_PROCESSING = _uid.DigitalXRayImageStorageForProcessing
    SECONDARY_CAPTURE = _uid.SecondaryCaptureImageStorage
    SC_MULTIFRAME_GRAYSCALE_BYTE = _uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    SC_MULTIFRAME_GRAYSCALE_WORD = _uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    SC_MULTIFRAME_TRUE_COLOR = _uid.MultiFrameTrueColorSecondaryCaptureImageStorage
    COMPREHENSIVE_3D_SR = _uid.Comprehensive3DSRStorage
    COMPREHENSIVE_SR = _uid.ComprehensiveSRStorage
    ENHANCED_SR = _uid.EnhancedSRStorage
    BASIC_TEXT_SR = _uid.BasicTextSRStorage


RADIOGRAPHY_SOP_CLASSES: frozenset[str] = frozenset(
    {
        SopClass.COMPUTED_RADIOGRAPHY,
        SopClass.DX_FOR_PRESENTATION,
        SopClass.DX_FOR_PROCESSING,
    }
)
"""Projection radiography classes: analysed when Modality and geometry say chest."""

SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        SopClass.SECONDARY_CAPTURE,
        SopClass.SC_MULTIFRAME_GRAYSCALE_BYTE,
        SopClass.SC_MULTIFRAME_GRAYSCALE_WORD,
        SopClass.SC_MULTIFRAME_TRUE_COLOR,
    }
)
"""Secondary Capture classes: analysed only when the headers say chest X-ray."""

# Storage classes the listener accepts at association (results of other classes are
# accepted too where auto-routing sends them, and recorded as skipped).
ANALYSABLE_SOP_CLASSES: frozenset[str] = RADIOGRAPHY_SOP_CLASSES | SECONDARY_CAPTURE_SOP_CLASSES

# --------------------------------------------------------------------------------------
# Transfer syntaxes
# --------------------------------------------------------------------------------------

UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
)

COMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.RLELossless,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
)

SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    UNCOMPRESSED_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES
)
"""Transfer syntaxes we accept and decode (pydicom handlers: numpy, pylibjpeg, gdcm)."""


class Modality(StrEnum):
    """Modality (0008,0060) values the pipeline reads or writes."""

    CR = "CR"
    DX = "DX"
    SR = "SR"
    OT = "OT"


# --------------------------------------------------------------------------------------
# Coded concepts (SNOMED CT, LOINC, DCM, UCUM)
# --------------------------------------------------------------------------------------

COVID19 = Code("840539006", "SCT", "COVID-19")
"""SNOMED CT: Disease caused by severe acute respiratory syndrome coronavirus 2."""
PRESENT = Code("52101004", "SCT", "Present")
"""Decision value of SRs written before the wording of issue 19 (read back, not written)."""
SUSPECTED = Code("415684004", "SCT", "Suspected")
"""Decision value of a flagged image: at or above a screening (high-sensitivity) operating
point, whose probability may be well below 50 %, so not "Present"."""
ABSENT = Code("2667000", "SCT", "Absent")
"""Decision value of an image below the operating point."""
UCUM_UNITY = Code("1", "UCUM", "no units")
"""UCUM unity, the unit of a probability."""

# --------------------------------------------------------------------------------------
# cxr-batch: media storage objects the folder walker recognises
# --------------------------------------------------------------------------------------

MEDIA_STORAGE_DIRECTORY = _uid.MediaStorageDirectoryStorage
"""Media Storage Directory (DICOMDIR): an index of a file set, not an image."""

# --------------------------------------------------------------------------------------
# SR/SC coded concepts (helper "encode": cxr_pipeline/encode/)
# --------------------------------------------------------------------------------------

CHEST_XRAY_PROCEDURE = Code("36554-4", "LN", "XR Chest Single view")
"""Procedure Reported of the TID 1500 SR: LOINC "XR Chest Single view".

Each SR reports on one radiograph, so the single-view LOINC code fits even where the
study holds more views (the IHE Imaging Diagnostic Report examples use the same code
for a one-image chest X-ray)."""

CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
"""Concept name of the numeric COVID-19 probability (UCUM "%", range 0-100).

PS3.16 defines it as "the likelihood that the finding detected is in fact the type of
finding identified" (CID 6048, the CAD operating-point axis labels). The SR carries the
calibrated probability under it, as the CAD SR templates do (TID 4006 / 4104: a NUM in
percent, HAS PROPERTIES of the coded finding). Alternatives rejected: DCM 111047
"Probability of cancer" (cancer only) and DCM 122157 "Probability" (no finding semantics,
in no CID)."""

FINDING = Code("121071", "DCM", "Finding")
"""Concept name of the TID 1501 Finding row (value: :data:`COVID19`)."""

PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
"""Purpose of Reference of the Contributing Equipment item describing the algorithm
(IHE AI Results: the AI model is processing equipment, its weights have the Device UID)."""

UCUM_PERCENT = Code("%", "UCUM", "percent")
"""UCUM percent: the probability as the viewers' text line shows it (two decimals)."""

DISPLAY_CODING_SCHEME = "99CXRPL"
"""Private coding scheme (PS3.16 8.2: "99" prefix) of the concepts below, declared in
every SR's Coding Scheme Identification Sequence."""
DISPLAY_CODING_SCHEME_NAME = "cxr-pipeline result display concepts"

COVID19_SUSPECTED_DISPLAY = Code(
    "CXRPL003", DISPLAY_CODING_SCHEME, "COVID-19 suspected, probability"
)
"""First NUM of the salient-region group of a flagged image: the calibrated probability in %.

OHIF v3 prints the NUMs at the top of a measurement group as "concept meaning: value unit"
lines and nothing else of the group, so the decision and its operating point travel in two
NUMs whose lines read as one statement::

    COVID-19 suspected, probability: 42.39 %
    above the 98 %-sensitivity point: 27.00 %

Two short lines, not one long one: OHIF places the text beside the region, and a single line
with the whole statement ran off the viewport in the screenshot at 1600 x 1000."""
COVID19_NOT_SUSPECTED_DISPLAY = Code(
    "CXRPL004", DISPLAY_CODING_SCHEME, "COVID-19 not suspected, probability"
)
"""First NUM of the salient-region group of an image below the operating point."""
AT_OR_ABOVE_OPERATING_POINT = Code(
    "CXRPL005", DISPLAY_CODING_SCHEME, "at or above the operating point"
)
"""Second NUM of a flagged image's salient-region group: the threshold in %, on the
probability's scale. Its meaning in each SR names the point, e.g. "above the 98 %-sensitivity
point" (or "at ..." when the probability equals it)."""
BELOW_OPERATING_POINT = Code("CXRPL006", DISPLAY_CODING_SCHEME, "below the operating point")
"""Second NUM of the salient-region group of an image below the operating point."""
CODE_MEANING_MAX = 64
"""Code Meaning is LO: at most 64 characters."""

SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
"""Purpose of Reference (CID 7202) of the Secondary Capture's Source Image Sequence item."""

BODY_PART_CHEST = "CHEST"
"""Body Part Examined (defined term) of the Secondary Capture when the source has none."""

# --------------------------------------------------------------------------------------
# DIMSE status codes (PS3.4 Annex B / PS3.7 Annex C), used by the listener and sender
# (section owned by the PACS service: listeners/, cxr_pipeline/service/send.py)
# --------------------------------------------------------------------------------------


class DimseStatus:
    """C-STORE / C-ECHO status values as named constants (no bare hex in logic)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: Out of Resources (spool below the free-space watermark)."""
    DATASET_DOES_NOT_MATCH = 0xA900
    """Error: Data Set does not match SOP Class (also used when the data set's SOP Class or
    Instance UID differs from the C-STORE command's Affected SOP Class/Instance UID)."""
    CANNOT_UNDERSTAND = 0xC210
    """Error: Cannot understand (the 0xCxxx class): an unexpected failure while storing."""
    NOT_AUTHORIZED = 0x0124
    """Refused: Not Authorized (PS3.7 C.4): an instance a retrieve of ours did not ask for,
    arriving at cxr-batch's C-GET / C-MOVE storage handler."""
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_MISMATCH = 0xB007


class AssociateReject:
    """A-ASSOCIATE-RJ Result, Source and Reason/Diag. values (PS3.8 9.3.4, Table 9-21)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02
    """Transient: the requestor may try again later (a PACS retries)."""
    SOURCE_SERVICE_USER = 0x01
    SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
    """DICOM UL service-provider (presentation related function)."""
    CALLING_AE_NOT_RECOGNISED = 0x03
    """Reason of source 1 (service user)."""
    CALLED_AE_NOT_RECOGNISED = 0x07
    """Reason of source 1 (service user)."""
    LOCAL_LIMIT_EXCEEDED = 0x02
    """Reason of source 3 (presentation related): what pynetdicom answers at its association
    limit, and what the listener answers when an address or the listener is at its cap."""


STORE_SUCCESS_STATUSES: frozenset[int] = frozenset(
    {
        DimseStatus.SUCCESS,
        DimseStatus.WARNING_COERCION,
        DimseStatus.WARNING_ELEMENTS_DISCARDED,
        DimseStatus.WARNING_DATASET_MISMATCH,
    }
)
"""C-STORE statuses meaning the peer stored the object (success or warning)."""

# --------------------------------------------------------------------------------------
# Ingest: transfer syntaxes with a reduced-resolution decode (helper "ingest": decode.py)
# --------------------------------------------------------------------------------------

JPEG2000_TRANSFER_SYNTAXES: frozenset[str] = frozenset({_uid.JPEG2000Lossless, _uid.JPEG2000})
"""JPEG 2000: decoded at a lower wavelet resolution level when a smaller image is asked for."""

DCT_JPEG_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit}
)
"""DCT JPEG: 8-bit data decoded with libjpeg's 1/2, 1/4, 1/8 scaling when asked for."""

# --------------------------------------------------------------------------------------
# Audit trail: DICOM PS3.15 Annex A.5 audit messages (CID 400-406, PS3.16), written by
# cxr_pipeline/service/audit.py (section owned by the PACS service: listeners/, send, audit)
# --------------------------------------------------------------------------------------

AUDIT_APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
"""EventID (A.5.3.1): the application started or stopped."""
AUDIT_BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
"""EventID (A.5.3.3): an association that will carry instances has started."""
AUDIT_INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
"""EventID (A.5.3.5): instances were received or sent (one message per association)."""
AUDIT_SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
"""EventID (A.5.3.11): a rejected association, a failed TLS handshake, a refused command."""

AUDIT_APPLICATION_START = Code("110120", "DCM", "Application Start")
"""EventTypeCode of Application Activity (CID 401)."""
AUDIT_APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
"""EventTypeCode of Application Activity (CID 401)."""
AUDIT_NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
"""Security Alert type (CID 403): a peer node failed authentication (TLS certificate,
AE title or address not allowed)."""
AUDIT_USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
"""Security Alert type (CID 403): a peer sent what the node refuses to process (a
malformed command the association is aborted for)."""

AUDIT_ROLE_APPLICATION = Code("110150", "DCM", "Application")
"""RoleIDCode (CID 402) of the application itself in Application Activity."""
AUDIT_ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
"""RoleIDCode (CID 402): the process that sent the data."""
AUDIT_ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
"""RoleIDCode (CID 402): the process that received the data."""

AUDIT_ID_STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
"""ParticipantObjectIDTypeCode (CID 404) of a study."""
AUDIT_ID_NODE = Code("110182", "DCM", "Node ID")
"""ParticipantObjectIDTypeCode (CID 404) of a network node (Security Alert subject)."""


class AuditAction(StrEnum):
    """EventActionCode (PS3.15 A.5.1)."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(StrEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


class NetworkAccessPointType(StrEnum):
    """NetworkAccessPointTypeCode (PS3.15 A.5.1)."""

    MACHINE_NAME = "1"
    IP_ADDRESS = "2"


AUDIT_PARTICIPANT_SYSTEM_OBJECT = "2"
"""ParticipantObjectTypeCode: System Object (a study, a node)."""
AUDIT_PARTICIPANT_ROLE_REPORT = "3"
"""ParticipantObjectTypeCodeRole: Report (the study of the transferred instances)."""
AUDIT_PARTICIPANT_ROLE_SECURITY_RESOURCE = "13"
"""ParticipantObjectTypeCodeRole: Security Resource (the node of a Security Alert)."""
AUDIT_SOURCE_APPLICATION_SERVER = Code("4", "DCM", "Application Server")
"""AuditSourceTypeCode (RFC 3881 / PS3.15 A.5.1): an application server process."""

# --------------------------------------------------------------------------------------
# Query/Retrieve (PS3.4 Annex C): cxr-batch --from-pacs (cxr_pipeline/batch/pacs.py)
# --------------------------------------------------------------------------------------


class QueryRetrieveModel(StrEnum):
    """Study Root Query/Retrieve Information Model SOP classes (PS3.4 C.6.2)."""

    FIND = _sop.StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
    GET = _sop.StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
    MOVE = _sop.StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]


class QueryLevel(StrEnum):
    """Query/Retrieve Level (0008,0052) values of the Study Root model."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryRetrieveStatus:
    """C-FIND / C-GET / C-MOVE status values (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    """Pending, but optional keys were not supported for existence or matching."""
    CANCEL = 0xFE00
    SUB_OPERATIONS_WARNING = 0xB000
    """Sub-operations complete, one or more failures or warnings."""
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH = 0xA900


QUERY_PENDING_STATUSES: frozenset[int] = frozenset(
    {QueryRetrieveStatus.PENDING, QueryRetrieveStatus.PENDING_WARNING}
)
"""Statuses of a C-FIND / C-GET / C-MOVE response that more responses follow."""

# --------------------------------------------------------------------------------------
# DICOMweb (PS3.18): STOW-RS in (listeners/stow.py), STOW/QIDO/WADO-RS out
# (cxr_pipeline/service/dicomweb.py, cxr_pipeline/batch/web_source.py)
# --------------------------------------------------------------------------------------

MEDIA_TYPE_DICOM = "application/dicom"
"""Media type of one Part 10 instance (a part of a STOW-RS request)."""
MEDIA_TYPE_DICOM_JSON = "application/dicom+json"
"""Media type of the STOW-RS response (PS3.18 F.2)."""
MEDIA_TYPE_MULTIPART_RELATED = "multipart/related"
"""Media type of a STOW-RS request body (PS3.18 10.5.1)."""


class StowFailureReason:
    """Failure Reason (0008,1197) values of a STOW-RS FailedSOPSequence item.

    PS3.18 10.5.3 takes them from the C-STORE status codes of PS3.4 B.2.3.
    """

    PROCESSING_FAILURE = 0x0110
    """The instance could not be stored (e.g. an unexpected error while spooling)."""
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """Referenced SOP Class not supported: an object without pixel data (SR, presentation
    state...), recorded as skipped but never analysed."""
    OUT_OF_RESOURCES = 0xA700
    """The spool is below its free-space watermark."""
    DATASET_DOES_NOT_MATCH = 0xA900
    """The data set does not match its SOP class, or its study differs from the URL's."""
    CANNOT_UNDERSTAND = 0xC000
    """The part cannot be parsed as a DICOM data set."""
    NOT_ANALYSED = 0xC001
    """Recorded but not analysed: an image that is not a chest radiograph (the C-STORE
    path acknowledges these and records them as skipped). In the 0xCxxx "cannot
    understand" class, whose low bits PS3.4 leaves to the implementation; the reason in
    words goes in a ``Warning`` response header (PS3.18 8.3.5.1)."""


STOW_WARNING_CODE = 299
"""warn-code of the ``Warning`` header fields a STOW-RS response carries (PS3.18 8.3.5.1:
"299 <agent>: <text>", one per instance not stored or not analysed)."""
