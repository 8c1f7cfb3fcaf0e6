"""One error hierarchy for the whole pipeline.

Every failure carries a :class:`Reason` (a stable, machine-readable code written to the
ledger and to batch reports) and a human-readable detail without patient data.
:class:`PermanentError` means "reject and record, never retry";
:class:`RetryableError` means "a dependency failed, try again later".
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable reason codes recorded for skipped, rejected or failed instances."""

    NOT_DICOM = "not_dicom"
    MISSING_ATTRIBUTE = "missing_attribute"
    NOT_IMAGE = "not_image"
    NOT_CHEST_RADIOGRAPH = "not_chest_radiograph"
    MULTI_FRAME = "multi_frame"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNSUPPORTED_PIXEL_DATA = "unsupported_pixel_data"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    MODEL_ERROR = "model_error"
    CHECKPOINT_ERROR = "checkpoint_error"
    ENCODE_ERROR = "encode_error"
    SEND_FAILED = "send_failed"
    QUERY_FAILED = "query_failed"
    RETRIEVE_FAILED = "retrieve_failed"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    CONFIG_ERROR = "config_error"
    INVALID_UID = "invalid_uid"
    INTERNAL = "internal_error"


class CxrError(Exception):
    """Base class of every error the pipeline raises on purpose.

    Parameters
    ----------
    detail
        What went wrong, for people. Must not contain patient data (UIDs are fine).
    reason
        Overrides the class's default reason code.
    """

    reason: Reason = Reason.INTERNAL
    retryable: bool = False

    def __init__(self, detail: str, *, reason: Reason | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class PermanentError(CxrError):
    """The input or configuration is wrong; retrying cannot help."""


class RetryableError(CxrError):
    """A dependency (PACS, broker, disk) failed; the same job may succeed later."""

    retryable = True


class RejectedInput(PermanentError):
    """The received object is not something this pipeline analyses."""


class NotDicom(RejectedInput):
    """The file is not a readable DICOM Part 10 file or dataset."""

    reason = Reason.NOT_DICOM


class MissingAttribute(RejectedInput):
    """A required attribute is absent or empty."""

    reason = Reason.MISSING_ATTRIBUTE


class NotAnImage(RejectedInput):
    """The SOP class carries no pixel data (SR, presentation state, ...)."""

    reason = Reason.NOT_IMAGE


class NotChestRadiograph(RejectedInput):
    """An image, but not a chest radiograph under the configured policy."""

    reason = Reason.NOT_CHEST_RADIOGRAPH


class MultiFrameImage(RejectedInput):
    """More than one frame; a chest radiograph is a single frame."""

    reason = Reason.MULTI_FRAME


class ImageTooLarge(RejectedInput):
    """Rows/Columns beyond the configured limit."""

    reason = Reason.IMAGE_TOO_LARGE


class ImageTooSmall(RejectedInput):
    """Rows/Columns below the configured minimum."""

    reason = Reason.IMAGE_TOO_SMALL


class UnsupportedTransferSyntax(RejectedInput):
    """No installed pixel handler decodes this transfer syntax."""

    reason = Reason.UNSUPPORTED_TRANSFER_SYNTAX


class UnsupportedPixelData(RejectedInput):
    """Pixel data in a form we do not analyse (bits, photometric interpretation, ...)."""

    reason = Reason.UNSUPPORTED_PIXEL_DATA


class CorruptPixelData(RejectedInput):
    """Pixel data that cannot be decoded or does not match the header."""

    reason = Reason.CORRUPT_PIXEL_DATA


class InvalidUid(RejectedInput):
    """A UID that is not a valid DICOM UID (refused before it names any file)."""

    reason = Reason.INVALID_UID


class CheckpointError(PermanentError):
    """A checkpoint or model card that cannot be loaded safely."""

    reason = Reason.CHECKPOINT_ERROR


class ModelError(PermanentError):
    """The model cannot run on this input (wrong tensor shape, non-finite values)."""

    reason = Reason.MODEL_ERROR


class ConfigError(PermanentError):
    """Invalid settings."""

    reason = Reason.CONFIG_ERROR


class EncodeError(PermanentError):
    """A result object could not be encoded as valid DICOM."""

    reason = Reason.ENCODE_ERROR


class SendError(RetryableError):
    """A C-STORE to a destination failed (association refused, timeout, failure status)."""

    reason = Reason.SEND_FAILED


class QueryError(RetryableError):
    """A C-FIND or QIDO-RS query to the PACS failed (unreachable, refused, aborted)."""

    reason = Reason.QUERY_FAILED


class RetrieveError(RetryableError):
    """A C-GET / C-MOVE / WADO-RS retrieve failed or returned fewer instances than asked."""

    reason = Reason.RETRIEVE_FAILED


class QueueUnavailable(RetryableError):
    """The task broker could not be reached."""

    reason = Reason.QUEUE_UNAVAILABLE
