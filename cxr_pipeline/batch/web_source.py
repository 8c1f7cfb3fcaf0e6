"""Query and retrieve from a DICOMweb archive: QIDO-RS search, WADO-RS retrieve.

The :class:`~cxr_pipeline.batch.remote.RemoteSource` behind ``cxr-batch --from-dicomweb
URL``, with the ``dicomweb-client`` library (credentials and TLS as for a ``dicomweb``
send destination with the same URL: :mod:`cxr_pipeline.service.dicomweb`). Searches ask
for the remaining results where the server pages them; each instance is retrieved on its
own (``application/dicom`` in any transfer syntax, so the archive sends it as stored), so
one that fails costs only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from cxr_pipeline.batch.remote import (
    InstanceMatch,
    RemoteQuery,
    Retrieved,
    SeriesMatch,
    StudyMatch,
    instance_matches,
    text_value,
)
from cxr_pipeline.dicom.codes import MEDIA_TYPE_DICOM
from cxr_pipeline.errors import QueryError, RetrieveError
from cxr_pipeline.service.dicomweb import describe_http_error, open_client
from cxr_pipeline.service.send import configured_peer
from cxr_pipeline.service.spool import write_durably
from cxr_pipeline.settings import Destination, SendSettings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ANY_TRANSFER_SYNTAX = "*"
"""WADO-RS transfer-syntax parameter meaning "as stored" (PS3.18 8.7.3.5.2)."""


def _datasets(found: list[dict[str, Any]]) -> list[Dataset]:
    return [Dataset.from_json(item) for item in found]


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(str(v).strip() for v in value if str(v).strip())


class DicomwebSource:
    """QIDO-RS / WADO-RS source (see the module notes).

    Parameters
    ----------
    service
        The archive's base URL as a ``dicomweb`` destination; the ``auth`` and ``tls`` of
        a configured destination with the same URL apply.
    send
        ``timeout_s`` of each HTTP request; ``destinations`` for credentials.
    """

    def __init__(self, service: Destination, send: SendSettings) -> None:
        self.service = configured_peer(service, send)
        self._timeout_s = send.timeout_s

    @property
    def label(self) -> str:
        """The base URL."""
        return str(self.service.url)

    def close(self) -> None:
        """Nothing is held between calls."""

    def _call(
        self,
        what: str,
        error: type[QueryError] | type[RetrieveError],
        call: Callable[[DICOMwebClient], _T],
    ) -> _T:
        try:
            with open_client(self.service, timeout_s=self._timeout_s) as client:
                return call(client)
        except requests.RequestException as exc:
            raise error(f"{what} at {self.label} failed: {describe_http_error(exc)}") from exc
        except (ValueError, KeyError, IndexError, OSError) as exc:  # unparsable answers
            raise error(f"{what} at {self.label} failed: {type(exc).__name__}: {exc}") from exc

    def find_studies(self, query: RemoteQuery) -> list[StudyMatch]:
        """QIDO-RS study search on StudyDate and AccessionNumber."""
        filters: dict[str, Any] = {}
        if query.study_date:
            filters["StudyDate"] = query.study_date
        if query.accession:
            filters["AccessionNumber"] = query.accession
        found = self._call(
            "QIDO-RS study search",
            QueryError,
            lambda client: client.search_for_studies(
                fields=["StudyDate", "ModalitiesInStudy"],
                search_filters=filters,
                get_remaining=True,
            ),
        )
        return [
            StudyMatch(
                text_value(ds, "StudyInstanceUID"),
                text_value(ds, "StudyDate"),
                _values(ds, "ModalitiesInStudy"),
            )
            for ds in _datasets(found)
            if text_value(ds, "StudyInstanceUID")
        ]

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        """QIDO-RS series search in one study."""
        found = self._call(
            "QIDO-RS series search",
            QueryError,
            lambda client: client.search_for_series(
                study.study_uid,
                fields=["Modality", "NumberOfSeriesRelatedInstances"],
                get_remaining=True,
            ),
        )
        series = []
        for ds in _datasets(found):
            uid = text_value(ds, "SeriesInstanceUID")
            if not uid:
                continue
            count = ds.get("NumberOfSeriesRelatedInstances")
            announced = int(count) if count not in (None, "") else None
            series.append(SeriesMatch(study.study_uid, uid, text_value(ds, "Modality"), announced))
        return series

    def find_instances(self, series: SeriesMatch) -> list[InstanceMatch]:
        """QIDO-RS instance search in one series."""
        found = self._call(
            "QIDO-RS instance search",
            QueryError,
            lambda client: client.search_for_instances(
                series.study_uid,
                series.series_uid,
                fields=["SOPClassUID"],
                get_remaining=True,
            ),
        )
        return instance_matches(series, _datasets(found))

    def retrieve(
        self, series: SeriesMatch, instances: Sequence[InstanceMatch], folder: Path
    ) -> Retrieved:
        """WADO-RS each instance into ``folder``.

        Raises
        ------
        RetrieveError
            Not one instance came back and the first failure was the connection itself.
        """
        result = Retrieved()
        failures: list[str] = []
        for instance in instances:
            try:
                ds = self._call("WADO-RS retrieve", RetrieveError, partial(_fetch, instance))
            except RetrieveError as exc:
                if not result.files and not failures and _unreachable(exc):
                    raise
                failures.append(exc.detail)
                continue
            path = folder / f"{instance.sop_instance_uid}.dcm"
            write_durably(path, partial(_save, ds))
            result.files[instance.sop_instance_uid] = path
        if failures:
            result.detail = (
                f"{self.label} sent {len(result.files)} of {len(instances)} instances asked "
                f"for ({failures[0]})"
            )
        return result


def _fetch(instance: InstanceMatch, client: DICOMwebClient) -> Dataset:
    """WADO-RS one instance, as stored."""
    ds: Dataset = client.retrieve_instance(
        instance.study_uid,
        instance.series_uid,
        instance.sop_instance_uid,
        media_types=((MEDIA_TYPE_DICOM, ANY_TRANSFER_SYNTAX),),
    )
    return ds


def _save(ds: Dataset, handle: BinaryIO) -> None:
    ds.save_as(handle, enforce_file_format=True)


def _unreachable(exc: RetrieveError) -> bool:
    """Whether a retrieve failed to reach the server at all (no HTTP status)."""
    cause = exc.__cause__
    return isinstance(cause, requests.RequestException) and cause.response is None
