"""Query and retrieve from a PACS over DICOM: Study Root C-FIND, then C-GET or C-MOVE.

The :class:`~cxr_pipeline.batch.remote.RemoteSource` behind ``cxr-batch --from-pacs``,
with pynetdicom. Every call opens one association as ``send.calling_ae_title`` (TLS as for
sending to the same peer) and closes it.

- **C-FIND** at STUDY, SERIES and IMAGE level (PS3.4 C.6.2). Only the Study Root model is
  used: every archive supports it.
- **C-GET** (default) at IMAGE level with the list of SOP Instance UIDs still to do: the
  instances come back on the same association (storage contexts proposed with the SCP
  role, PS3.4 C.4.3), so the PACS needs no address for us, only our AE title allowed to
  query and retrieve. One context per transfer syntax, so an archive sends each image in
  the syntax it is stored in instead of transcoding it.
- **C-MOVE** (``--retrieve move``) to a storage SCP this source runs for the length of the
  run, as ``batch.move_ae_title`` on ``batch.move_port``: the PACS must know that AE
  title at our address. Instances nobody asked for are refused.

What the PACS needs: our calling AE title allowed to C-FIND and C-GET (or C-MOVE). For
Orthanc: an entry for it in ``DicomModalities`` (which also gives the C-MOVE address), or
``DicomAlwaysAllowFind`` and ``DicomAlwaysAllowGet`` true. Orthanc accepts the
association from an unknown AE title and then aborts the request; that case gets a
message that says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from cxr_pipeline.batch.remote import (
    InstanceMatch,
    RemoteQuery,
    Retrieved,
    SeriesMatch,
    StudyMatch,
    instance_matches,
    text_value,
)
from cxr_pipeline.dicom.codes import (
    ANALYSABLE_SOP_CLASSES,
    QUERY_PENDING_STATUSES,
    SUPPORTED_TRANSFER_SYNTAXES,
    DimseStatus,
    QueryLevel,
    QueryRetrieveModel,
    QueryRetrieveStatus,
)
from cxr_pipeline.errors import ConfigError, InvalidUid, QueryError, RetrieveError
from cxr_pipeline.service.send import configured_peer
from cxr_pipeline.service.spool import validate_uid, write_durably
from cxr_pipeline.service.tls import peer_context
from cxr_pipeline.settings import BatchSettings, Destination, SendSettings

log = logging.getLogger(__name__)


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split("\\") if v.strip())
    return tuple(str(v).strip() for v in value if str(v).strip())


def _count(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def _identifier(level: QueryLevel, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


class _Stores:
    """The C-STORE handler of retrieved instances: files expected UIDs into their folder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: dict[str, Path] = {}
        self.landed: dict[str, Path] = {}

    def expect(self, uids: Sequence[str], folder: Path) -> None:
        with self._lock:
            for uid in uids:
                self._expected[uid] = folder

    def collect(self, uids: Sequence[str]) -> dict[str, Path]:
        """Forget these UIDs; return the files of those that arrived."""
        with self._lock:
            for uid in uids:
                self._expected.pop(uid, None)
            return {uid: self.landed.pop(uid) for uid in uids if uid in self.landed}

    def __call__(self, event: Event) -> int:
        try:
            uid = validate_uid(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        except InvalidUid:
            return DimseStatus.CANNOT_UNDERSTAND
        with self._lock:
            folder = self._expected.get(uid)
        if folder is None:
            log.warning("refused %s: no retrieve of this run asked for it", uid)
            return DimseStatus.NOT_AUTHORIZED
        encoded = event.encoded_dataset(include_meta=True)
        try:
            path = write_durably(folder / f"{uid}.dcm", lambda handle: handle.write(encoded))
        except OSError as exc:
            log.error("cannot write retrieved %s: %s", uid, exc.strerror)
            return DimseStatus.OUT_OF_RESOURCES
        with self._lock:
            self.landed[uid] = path
        return DimseStatus.SUCCESS


class DimseSource:
    """Query and retrieve over DICOM (see the module notes).

    Parameters
    ----------
    peer
        The PACS (AE title, host, port; TLS of a configured peer at the same address).
    send
        ``calling_ae_title`` (who we are) and ``timeout_s`` (association, DIMSE, network).
    batch
        ``retrieve`` (get / move) and the C-MOVE storage SCP's ``move_ae_title``,
        ``move_host``, ``move_port``.

    Raises
    ------
    ConfigError
        C-MOVE without a destination AE title, or TLS files that cannot be read.
    OSError
        The C-MOVE storage SCP's port cannot be bound.
    """

    def __init__(self, peer: Destination, send: SendSettings, batch: BatchSettings) -> None:
        self.peer = configured_peer(peer, send)
        self._send = send
        self._mode = batch.retrieve
        self._context = peer_context(self.peer.tls)
        self._move_scp: ThreadedAssociationServer | None = None
        self._move_stores = _Stores()
        self.move_port: int | None = None
        self._move_ae_title = batch.move_ae_title or ""
        if self._mode == "move":
            if not batch.move_ae_title:
                raise ConfigError("--retrieve move needs --move-dest AE (batch.move_ae_title)")
            scp = AE(ae_title=batch.move_ae_title)
            for sop_class in sorted(ANALYSABLE_SOP_CLASSES):
                scp.add_supported_context(sop_class, list(SUPPORTED_TRANSFER_SYNTAXES))
            scp.network_timeout = send.timeout_s
            server = scp.start_server(
                (batch.move_host, batch.move_port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._move_stores)],
            )
            if server is None:  # only a blocking server returns None
                raise RuntimeError("pynetdicom returned no C-MOVE storage server")
            self._move_scp = server
            self.move_port = int(server.server_address[1])
            log.info("C-MOVE storage SCP %s on port %d", batch.move_ae_title, self.move_port)

    @property
    def label(self) -> str:
        """``AE@host:port`` of the PACS."""
        return self.peer.label

    def close(self) -> None:
        """Stop the C-MOVE storage SCP, if any."""
        if self._move_scp is not None:
            self._move_scp.shutdown()
            self._move_scp = None

    # -- associations ------------------------------------------------------------------

    def _ae(self) -> AE:
        ae = AE(ae_title=self._send.calling_ae_title)
        for attribute in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, attribute, self._send.timeout_s)
        ae.connection_timeout = self._send.timeout_s
        return ae

    @contextmanager
    def _association(
        self, ae: AE, error: type[QueryError] | type[RetrieveError], **kwargs: Any
    ) -> Iterator[Association]:
        tls_args = None
        if self._context is not None:
            tls_args = (self._context, self.peer.tls.server_name or self.peer.host)
        assoc = ae.associate(
            self.peer.host,
            self.peer.port,
            ae_title=self.peer.ae_title,
            tls_args=tls_args,
            **kwargs,
        )
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            raise error(f"association with {self.label} {why} (PACS down or refusing us?)")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _refused_hint(self, what: str) -> str:
        option = "DicomAlwaysAllow" + what.removeprefix("C-").capitalize()
        return (
            f"{self.label} ended the association without answering the {what} (does it "
            f"allow AE title {self._send.calling_ae_title} to {what}? Orthanc: list it in "
            f"DicomModalities, or set {option})"
        )

    # -- C-FIND ------------------------------------------------------------------------

    def _find(self, identifier: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(QueryRetrieveModel.FIND)
        found: list[Dataset] = []
        with self._association(ae, QueryError) as assoc:
            for status, answer in assoc.send_c_find(identifier, QueryRetrieveModel.FIND):
                if "Status" not in status:
                    raise QueryError(self._refused_hint("C-FIND"))
                code = int(status.Status)
                if code in QUERY_PENDING_STATUSES:
                    if answer is not None:
                        found.append(answer)
                elif code == QueryRetrieveStatus.SUCCESS:
                    break
                else:
                    raise QueryError(f"{self.label} answered C-FIND with status 0x{code:04X}")
        return found

    def find_studies(self, query: RemoteQuery) -> list[StudyMatch]:
        """Study-level C-FIND on StudyDate and AccessionNumber; ModalitiesInStudy returned."""
        answers = self._find(
            _identifier(
                QueryLevel.STUDY,
                StudyInstanceUID="",
                StudyDate=query.study_date or "",
                AccessionNumber=query.accession or "",
                ModalitiesInStudy="",
                NumberOfStudyRelatedInstances="",
            )
        )
        studies = []
        for ds in answers:
            uid = text_value(ds, "StudyInstanceUID")
            if uid:
                studies.append(
                    StudyMatch(uid, text_value(ds, "StudyDate"), _multi(ds, "ModalitiesInStudy"))
                )
        return studies

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        """Series-level C-FIND in one study (Modality and instance count returned)."""
        answers = self._find(
            _identifier(
                QueryLevel.SERIES,
                StudyInstanceUID=study.study_uid,
                SeriesInstanceUID="",
                Modality="",
                NumberOfSeriesRelatedInstances="",
            )
        )
        return [
            SeriesMatch(
                study.study_uid,
                text_value(ds, "SeriesInstanceUID"),
                text_value(ds, "Modality"),
                _count(ds, "NumberOfSeriesRelatedInstances"),
            )
            for ds in answers
            if text_value(ds, "SeriesInstanceUID")
        ]

    def find_instances(self, series: SeriesMatch) -> list[InstanceMatch]:
        """Image-level C-FIND in one series (SOP Instance and Class UIDs returned)."""
        answers = self._find(
            _identifier(
                QueryLevel.IMAGE,
                StudyInstanceUID=series.study_uid,
                SeriesInstanceUID=series.series_uid,
                SOPInstanceUID="",
                SOPClassUID="",
            )
        )
        return instance_matches(series, answers)

    # -- C-GET / C-MOVE ----------------------------------------------------------------

    def retrieve(
        self, series: SeriesMatch, instances: Sequence[InstanceMatch], folder: Path
    ) -> Retrieved:
        """C-GET (or C-MOVE) these instances of one series into ``folder``.

        Raises
        ------
        RetrieveError
            No association (PACS down, refused); the answer to a partial retrieve is a
            :class:`Retrieved` without the missing files and with the reason.
        """
        uids = [i.sop_instance_uid for i in instances]
        identifier = _identifier(
            QueryLevel.IMAGE,
            StudyInstanceUID=series.study_uid,
            SeriesInstanceUID=series.series_uid,
            SOPInstanceUID=uids if len(uids) > 1 else uids[0],
        )
        if self._mode == "move":
            return self._move(identifier, uids, folder)
        return self._get(identifier, uids, instances, folder)

    def _get(
        self,
        identifier: Dataset,
        uids: list[str],
        instances: Sequence[InstanceMatch],
        folder: Path,
    ) -> Retrieved:
        ae = self._ae()
        ae.add_requested_context(QueryRetrieveModel.GET)
        classes = {i.sop_class_uid for i in instances}
        if "" in classes or not classes <= ANALYSABLE_SOP_CLASSES:
            classes = set(ANALYSABLE_SOP_CLASSES)
        roles = []
        for sop_class in sorted(classes):
            for syntax in SUPPORTED_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, [syntax])
            roles.append(build_role(sop_class, scp_role=True))
        stores = _Stores()
        stores.expect(uids, folder)
        with self._association(
            ae, RetrieveError, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, stores)]
        ) as assoc:
            final = self._final(assoc.send_c_get(identifier, QueryRetrieveModel.GET), "C-GET")
        return self._outcome(stores.collect(uids), uids, final)

    def _move(self, identifier: Dataset, uids: list[str], folder: Path) -> Retrieved:
        ae = self._ae()
        ae.add_requested_context(QueryRetrieveModel.MOVE)
        self._move_stores.expect(uids, folder)
        try:
            with self._association(ae, RetrieveError) as assoc:
                responses = assoc.send_c_move(
                    identifier, self._move_ae_title, QueryRetrieveModel.MOVE
                )
                final = self._final(responses, "C-MOVE")
        finally:
            landed = self._move_stores.collect(uids)
        return self._outcome(landed, uids, final)

    def _final(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> str:
        """Read a retrieve's responses; return "" on success, else why it fell short."""
        last: Dataset | None = None
        for status, _ in responses:
            if "Status" not in status:
                return self._refused_hint(what)
            last = status
            if int(status.Status) not in QUERY_PENDING_STATUSES:
                break
        if last is None:
            return f"no {what} response from {self.label}"
        code = int(last.Status)
        if code == QueryRetrieveStatus.SUCCESS:
            return ""
        failed = last.get("NumberOfFailedSuboperations")
        extra = f", {failed} failed sub-operations" if failed else ""
        if code == QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN:
            extra += f" (the PACS does not know AE title {self._move_ae_title})"
        return f"{what} final status 0x{code:04X}{extra}"

    def _outcome(self, landed: dict[str, Path], uids: list[str], final: str) -> Retrieved:
        missing = len(uids) - len(landed)
        if not missing:
            return Retrieved(files=landed)
        detail = f"{self.label} sent {len(landed)} of {len(uids)} instances asked for"
        if final:
            detail += f" ({final})"
        return Retrieved(files=landed, detail=detail)
