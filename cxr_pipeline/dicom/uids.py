"""Deterministic UIDs of the result objects.

A result UID is a ``2.25.<uuid>`` UID (PS3.5 B.2) whose name-based UUID (RFC 4122
version 5) is derived from what the result is about: the source image or study, the
model's Device UID and the kind of UID. Analysing the same image twice with the same
model therefore yields the same SR and SC UIDs, so a PACS stores the result once; a
new model (new Device UID) yields new UIDs. All heatmap SCs of one model in one study
share one SC series; each SR has a series of its own (OHIF v3 shows only the newest SR of
a series, so SRs of two images in one series would hide one of them).
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydicom.uid import UID

from cxr_pipeline.errors import EncodeError

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-pipeline:result-uid:v1")
"""RFC 4122 namespace of our name-based UUIDs: other applications hashing the same
source UIDs get different UUIDs. Never change it: stored results would be duplicated."""


class ResultUid(StrEnum):
    """The kinds of UID the pipeline derives; each kind gives a different UID."""

    SR_SERIES = "sr-series"
    """Series Instance UID of an SR's series (parts: source SOP Instance UID, device UID)."""
    SR_INSTANCE = "sr-instance"
    """SOP Instance UID of an SR (parts: source SOP Instance UID, device UID)."""
    SC_SERIES = "sc-series"
    """Series Instance UID of the SC series (parts: study UID, device UID)."""
    SC_INSTANCE = "sc-instance"
    """SOP Instance UID of an SC (parts: source SOP Instance UID, device UID)."""
    TRACKING = "tracking"
    """Tracking Unique Identifier of the SR measurement group (parts as SR_INSTANCE)."""


def result_uid(kind: ResultUid, *parts: str) -> str:
    """Derive a deterministic ``2.25`` UID from a kind and its parts.

    Parameters
    ----------
    kind
        What the UID identifies.
    *parts
        The identifying values, e.g. the source SOP Instance UID and the Device UID.
        Order matters.

    Returns
    -------
    str
        A valid DICOM UID of the form ``2.25.<decimal UUID>`` (at most 64 characters).

    Raises
    ------
    EncodeError
        No parts, or an empty part (a source without the UID it needs).
    """
    if not parts:
        raise EncodeError(f"result UID {kind.value}: no identifying parts given")
    for index, part in enumerate(parts):
        if not isinstance(part, str) or not part.strip():
            raise EncodeError(f"result UID {kind.value}: part {index} is empty")
    # Not pydicom's generate_uid: with prefix=None it ignores entropy_srcs and returns a
    # random uuid4 UID, and with a "2.25." prefix it appends a 512-bit hash that is not
    # a UUID. PS3.5 B.2 wants the UUID's integer, so we use the RFC 4122 name-based
    # UUID (uuid5). Each value is length-prefixed so different splits never collide.
    values = [ResultUid(kind).value, *(p.strip() for p in parts)]
    name = "|".join(f"{len(value)}:{value}" for value in values)
    return str(UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"))


def series_uid(kind: ResultUid, scope_uid: str, device_uid: str) -> str:
    """Series Instance UID of the results of one kind and model in one scope.

    Parameters
    ----------
    kind
        :attr:`ResultUid.SR_SERIES` or :attr:`ResultUid.SC_SERIES`.
    scope_uid
        What the series collects: the source image's SOP Instance UID for the SR series
        (one SR per series), its Study Instance UID for the SC series.
    device_uid
        The model card's Device UID.

    Returns
    -------
    str
        The series UID.

    Raises
    ------
    EncodeError
        ``kind`` is not a series kind, or a UID is empty.
    """
    if kind not in (ResultUid.SR_SERIES, ResultUid.SC_SERIES):
        raise EncodeError(f"{kind.value} is not a series UID kind")
    return result_uid(kind, scope_uid, device_uid)


def instance_uid(kind: ResultUid, source_sop_instance_uid: str, device_uid: str) -> str:
    """UID of one result derived from one source image.

    Parameters
    ----------
    kind
        :attr:`ResultUid.SR_INSTANCE`, :attr:`ResultUid.SC_INSTANCE` or
        :attr:`ResultUid.TRACKING`.
    source_sop_instance_uid
        SOP Instance UID of the analysed image.
    device_uid
        The model card's Device UID.

    Returns
    -------
    str
        The instance (or tracking) UID.

    Raises
    ------
    EncodeError
        ``kind`` is a series kind, or a UID is empty.
    """
    if kind in (ResultUid.SR_SERIES, ResultUid.SC_SERIES):
        raise EncodeError(f"{kind.value} is not an instance UID kind")
    return result_uid(kind, source_sop_instance_uid, device_uid)
