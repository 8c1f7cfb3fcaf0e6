"""What a retrospective run from a PACS asks and gets: the query, the matches, the plan.

``cxr-batch --from-pacs`` (DICOM C-FIND / C-GET / C-MOVE, :mod:`~cxr_pipeline.batch.pacs`)
and ``--from-dicomweb`` (QIDO-RS / WADO-RS, :mod:`~cxr_pipeline.batch.web_source`) are two
:class:`RemoteSource` implementations behind the same query keys. :func:`plan_run` walks
the archive study by study (STUDY, then SERIES, then IMAGE level), keeps the series of
accepted modalities only (so the run never fetches its own SR / SC results, which are
Modality SR / OT, nor any other non-image series) and leaves out every SOP Instance UID
an earlier run already reported: a rerun fetches only what is missing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cxr_pipeline.dicom.codes import ANALYSABLE_SOP_CLASSES
from cxr_pipeline.errors import ConfigError, QueryError, Reason

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DATE_FORMAT = "%Y%m%d"

RETRYABLE_REASONS: frozenset[str] = frozenset(
    {Reason.QUERY_FAILED.value, Reason.RETRIEVE_FAILED.value, Reason.SEND_FAILED.value}
)
"""Failed rows a rerun of a PACS run does again without ``--retry-failed``: the PACS (or
the destination) was unreachable or incomplete, not the image broken."""


def parse_study_date(text: str) -> str:
    """Check a ``--study-date`` value: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``.

    Either end of a range may be left open (``20200301-``, ``-20200310``), as DICOM range
    matching allows (PS3.4 C.2.2.2.5).

    Parameters
    ----------
    text
        The value given.

    Returns
    -------
    str
        The value for the StudyDate matching key.

    Raises
    ------
    ConfigError
        Not a date or a range of dates, or a range that ends before it starts.
    """
    first, dash, last = text.strip().partition("-")
    ends = [first, last] if dash else [first]
    dates: list[datetime.date] = []
    for end in ends:
        if not end and dash:
            continue
        try:
            if len(end) != 8:
                raise ValueError
            dates.append(datetime.datetime.strptime(end, DATE_FORMAT).date())
        except ValueError:
            raise ConfigError(
                f"--study-date wants YYYYMMDD or YYYYMMDD-YYYYMMDD, got {text!r}"
            ) from None
    if not dates:
        raise ConfigError(f"--study-date {text!r}: give at least one end of the range")
    if len(dates) == 2 and dates[1] < dates[0]:
        raise ConfigError(f"--study-date {text!r}: the range ends before it starts")
    return text.strip()


@dataclass(frozen=True)
class RemoteQuery:
    """The query keys of a PACS run.

    Attributes
    ----------
    study_date
        StudyDate matching value (a date or a range); None: any date.
    modalities
        Series modalities analysed (default CR, DX); other series are never retrieved.
    accession
        AccessionNumber matching value; None: any.
    max_studies
        Most studies (with a series of an accepted modality) to take, oldest first.
    """

    study_date: str | None = None
    modalities: tuple[str, ...] = ("CR", "DX")
    accession: str | None = None
    max_studies: int | None = None


@dataclass(frozen=True)
class StudyMatch:
    """A study the study-level query returned."""

    study_uid: str
    study_date: str = ""
    modalities: tuple[str, ...] = ()
    """ModalitiesInStudy where the archive returns it (empty: unknown)."""


@dataclass(frozen=True)
class SeriesMatch:
    """A series the series-level query returned."""

    study_uid: str
    series_uid: str
    modality: str
    announced: int | None = None
    """NumberOfSeriesRelatedInstances where the archive returns it."""


@dataclass(frozen=True)
class InstanceMatch:
    """An instance the image-level query returned."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""


def text_value(ds: Dataset, keyword: str) -> str:
    """Read one attribute of a query answer as stripped text (``""`` when absent or empty).

    Parameters
    ----------
    ds
        A C-FIND or QIDO-RS answer.
    keyword
        DICOM keyword.

    Returns
    -------
    str
        The value.
    """
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def instance_matches(series: SeriesMatch, answers: Iterable[Dataset]) -> list[InstanceMatch]:
    """List the instances an image-level query (C-FIND or QIDO-RS) answered for one series.

    Parameters
    ----------
    series
        The series asked about.
    answers
        The query's answers; those without a SOP Instance UID are left out.

    Returns
    -------
    list of InstanceMatch
        One per answer with a SOP Instance UID.
    """
    return [
        InstanceMatch(
            series.study_uid,
            series.series_uid,
            text_value(ds, "SOPInstanceUID"),
            text_value(ds, "SOPClassUID"),
        )
        for ds in answers
        if text_value(ds, "SOPInstanceUID")
    ]


@dataclass
class Retrieved:
    """What one retrieve of a series brought in.

    Attributes
    ----------
    files
        SOP Instance UID -> the retrieved Part 10 file.
    detail
        Why instances asked for are missing (final status, failed sub-operations), when
        some are.
    """

    files: dict[str, Path] = field(default_factory=dict)
    detail: str = ""


class RemoteSource(Protocol):
    """A PACS to query and retrieve from (DIMSE or DICOMweb)."""

    @property
    def label(self) -> str:
        """The PACS for people and report rows (``AE@host:port`` or the base URL)."""
        ...

    def find_studies(self, query: RemoteQuery) -> list[StudyMatch]:
        """Study-level query; raises :class:`~cxr_pipeline.errors.QueryError`."""
        ...

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        """Series-level query in one study; raises QueryError."""
        ...

    def find_instances(self, series: SeriesMatch) -> list[InstanceMatch]:
        """Image-level query in one series; raises QueryError."""
        ...

    def retrieve(
        self, series: SeriesMatch, instances: Sequence[InstanceMatch], folder: Path
    ) -> Retrieved:
        """Fetch these instances of one series into ``folder`` as ``<SOP UID>.dcm``.

        Raises :class:`~cxr_pipeline.errors.RetrieveError` when nothing could be asked
        (unreachable, association refused); a partial answer is a :class:`Retrieved`
        without some files.
        """
        ...

    def close(self) -> None:
        """Release what the source holds (a C-MOVE storage SCP)."""
        ...


def instance_label(source: str, instance: InstanceMatch) -> str:
    """Name a remote instance by where it lives, DICOMweb style (its report row's path)."""
    return (
        f"{source}/studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def study_label(source: str, study_uid: str) -> str:
    """Name a study whose series could not be queried (its report row's path)."""
    return f"{source}/studies/{study_uid}"


@dataclass
class SeriesWork:
    """One series to retrieve: the instances still to do."""

    series: SeriesMatch
    instances: list[InstanceMatch]


@dataclass
class Unreachable:
    """A study whose series or instances could not be listed (reason in ``detail``)."""

    study_uid: str
    detail: str


@dataclass
class RunPlan:
    """What a PACS run will do, from its queries and the earlier report.

    Attributes
    ----------
    studies
        Matching studies with an accepted modality, in query order.
    work
        Series with instances to retrieve.
    not_analysable
        Instances of accepted series whose SOP class we never analyse (reported skipped,
        not retrieved).
    unreachable
        Studies whose series or instances could not be listed.
    already_done
        Matching instances an earlier run reported (not fetched again).
    """

    studies: list[StudyMatch] = field(default_factory=list)
    work: list[SeriesWork] = field(default_factory=list)
    not_analysable: list[InstanceMatch] = field(default_factory=list)
    unreachable: list[Unreachable] = field(default_factory=list)
    already_done: int = 0

    @property
    def images(self) -> int:
        """Instances this run will retrieve."""
        return sum(len(w.instances) for w in self.work)

    def outstanding(self) -> dict[str, int]:
        """Rows still to write per study (the progress bar over studies)."""
        counts = {study.study_uid: 0 for study in self.studies}
        for work in self.work:
            counts[work.series.study_uid] = counts.get(work.series.study_uid, 0) + len(
                work.instances
            )
        for instance in self.not_analysable:
            counts[instance.study_uid] = counts.get(instance.study_uid, 0) + 1
        for study in self.unreachable:
            counts[study.study_uid] = counts.get(study.study_uid, 0) + 1
        return counts


def _wanted_study(study: StudyMatch, query: RemoteQuery) -> bool:
    """Whether a study may hold an accepted series (unknown ModalitiesInStudy: yes)."""
    if not study.modalities:
        return True
    return bool(set(study.modalities) & set(query.modalities))


def match_studies(source: RemoteSource, query: RemoteQuery) -> list[StudyMatch]:
    """Run the study-level query and keep the studies that may hold accepted series.

    Parameters
    ----------
    source
        The PACS.
    query
        Its keys; ``max_studies`` is applied here, after ModalitiesInStudy filtering.

    Returns
    -------
    list of StudyMatch
        Oldest first (StudyDate, then Study Instance UID), at most ``max_studies``.

    Raises
    ------
    QueryError
        The PACS cannot be queried at all.
    """
    found = [s for s in source.find_studies(query) if _wanted_study(s, query)]
    found.sort(key=lambda s: (s.study_date, s.study_uid))
    unique = list({s.study_uid: s for s in found}.values())
    if query.max_studies is not None:
        unique = unique[: query.max_studies]
    return unique


def plan_run(
    source: RemoteSource,
    query: RemoteQuery,
    studies: Iterable[StudyMatch],
    done: set[str],
    *,
    max_consecutive_failures: int = 3,
    on_study: Callable[[StudyMatch], None] | None = None,
) -> RunPlan:
    """List the series and instances of each study and leave out what is done.

    Parameters
    ----------
    source
        The PACS.
    query
        Its keys (the accepted modalities).
    studies
        From :func:`match_studies`.
    done
        SOP Instance UIDs an earlier run reported (done, skipped or failed for good).
    max_consecutive_failures
        After this many studies in a row could not be listed, the rest are not tried
        (recorded unreachable with the last reason): a PACS that went away is not
        hammered, nor waited for once per study.
    on_study
        Called after each study is listed (progress while querying).

    Returns
    -------
    RunPlan
        A study whose listing fails is recorded in ``unreachable`` and the plan goes on.
    """
    plan = RunPlan(studies=list(studies))
    accepted = {m.upper() for m in query.modalities}
    seen: set[str] = set()  # an archive may list a series or instance twice: fetch it once
    failures = 0
    for study in plan.studies:
        if failures >= max_consecutive_failures:
            detail = (
                f"not queried: {failures} studies in a row failed ({plan.unreachable[-1].detail})"
            )
            plan.unreachable.append(Unreachable(study.study_uid, detail))
            if on_study is not None:
                on_study(study)
            continue
        try:
            for series in source.find_series(study):
                if series.modality.upper() not in accepted or series.series_uid in seen:
                    continue  # our own SR / SC (Modality SR / OT), CT, ...: never retrieved
                seen.add(series.series_uid)
                todo: list[InstanceMatch] = []
                for instance in source.find_instances(series):
                    if instance.sop_instance_uid in seen:
                        continue
                    seen.add(instance.sop_instance_uid)
                    if instance.sop_instance_uid in done:
                        plan.already_done += 1
                    elif instance.sop_class_uid and (
                        instance.sop_class_uid not in ANALYSABLE_SOP_CLASSES
                    ):
                        plan.not_analysable.append(instance)
                    else:
                        todo.append(instance)
                if todo:
                    plan.work.append(SeriesWork(series, todo))
            failures = 0
        except QueryError as exc:
            log.warning("study %s not listed: %s", study.study_uid, exc.detail)
            plan.unreachable.append(Unreachable(study.study_uid, exc.detail))
            failures += 1
        if on_study is not None:
            on_study(study)
    return plan
