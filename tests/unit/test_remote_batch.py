"""The parts of a PACS run that need no peer: query keys, the plan, the feed, the rate
limit, DICOMweb destinations and credentials, the STOW-RS multipart splitter."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from cxr_pipeline.batch.remote import (
    InstanceMatch,
    RemoteQuery,
    Retrieved,
    SeriesMatch,
    StudyMatch,
    match_studies,
    parse_study_date,
    plan_run,
)
from cxr_pipeline.batch.report import ReportWriter, Row
from cxr_pipeline.batch.retrieval import Feed, RateLimiter
from cxr_pipeline.batch.walker import InputFile
from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.errors import ConfigError, QueryError
from cxr_pipeline.service.dicomweb import read_secret, session_for
from cxr_pipeline.service.send import configured_peer
from cxr_pipeline.settings import (
    Destination,
    SendSettings,
    load_settings,
    parse_dicomweb_url,
)
from listeners.stow import MultipartError, load_tokens, parse_media_type, split_multipart

CR = str(SopClass.COMPUTED_RADIOGRAPHY)
SR = str(SopClass.COMPREHENSIVE_3D_SR)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("20200301", True),
        ("20200301-20200310", True),
        ("20200301-", True),
        ("-20200310", True),
        ("2020031", False),
        ("20200230", False),  # no 30 February
        ("20200310-20200301", False),  # ends before it starts
        ("-", False),
        ("March", False),
    ],
)
def test_study_date_is_a_date_or_a_range(text: str, ok: bool) -> None:
    if ok:
        assert parse_study_date(text) == text
    else:
        with pytest.raises(ConfigError, match="study-date"):
            parse_study_date(text)


class _Archive:
    """An archive's answers held in memory: the plan logic is what is tested here."""

    label = "TEST@127.0.0.1:1"

    def __init__(self) -> None:
        self.studies: list[StudyMatch] = []
        self.series: dict[str, list[SeriesMatch]] = {}
        self.instances: dict[str, list[InstanceMatch]] = {}
        self.broken: set[str] = set()
        self.series_queries = 0

    def find_studies(self, query: RemoteQuery) -> list[StudyMatch]:
        return list(self.studies)

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        self.series_queries += 1
        if study.study_uid in self.broken:
            raise QueryError("association aborted")
        return list(self.series.get(study.study_uid, []))

    def find_instances(self, series: SeriesMatch) -> list[InstanceMatch]:
        return list(self.instances.get(series.series_uid, []))

    def retrieve(
        self, series: SeriesMatch, instances: Sequence[InstanceMatch], folder: Path
    ) -> Retrieved:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def _archive() -> _Archive:
    archive = _Archive()
    archive.studies = [
        StudyMatch("1.2.2", "20200305", ("CR", "SR", "OT")),
        StudyMatch("1.2.1", "20200301", ()),  # ModalitiesInStudy not returned
        StudyMatch("1.2.3", "20200302", ("CT",)),
        StudyMatch("1.2.1", "20200301", ()),  # listed twice (Orthanc: two patients)
    ]
    archive.series = {
        "1.2.2": [
            SeriesMatch("1.2.2", "1.2.2.1", "CR", 2),
            SeriesMatch("1.2.2", "1.2.2.9", "SR", 1),  # our own SR: never retrieved
            SeriesMatch("1.2.2", "1.2.2.8", "OT", 1),  # our own SC
            SeriesMatch("1.2.2", "1.2.2.1", "CR", 2),  # listed twice
        ],
        "1.2.1": [SeriesMatch("1.2.1", "1.2.1.1", "dx", 2)],
    }
    archive.instances = {
        "1.2.2.1": [
            InstanceMatch("1.2.2", "1.2.2.1", "1.2.2.1.1", CR),
            InstanceMatch("1.2.2", "1.2.2.1", "1.2.2.1.2", ""),  # class not returned
        ],
        "1.2.2.9": [InstanceMatch("1.2.2", "1.2.2.9", "1.2.2.9.1", SR)],
        "1.2.1.1": [
            InstanceMatch("1.2.1", "1.2.1.1", "1.2.1.1.1", CR),
            InstanceMatch("1.2.1", "1.2.1.1", "1.2.1.1.2", SR),  # a report in an image series
        ],
    }
    return archive


def test_plan_keeps_accepted_series_once_skips_done_and_non_images() -> None:
    archive = _archive()
    query = RemoteQuery(study_date="20200301-20200310")
    studies = match_studies(archive, query)
    # CT-only study dropped by ModalitiesInStudy, duplicates merged, oldest first.
    assert [s.study_uid for s in studies] == ["1.2.1", "1.2.2"]
    plan = plan_run(archive, query, studies, done={"1.2.2.1.1"})
    assert plan.already_done == 1
    assert [
        (w.series.series_uid, [i.sop_instance_uid for i in w.instances]) for w in plan.work
    ] == [
        ("1.2.1.1", ["1.2.1.1.1"]),
        ("1.2.2.1", ["1.2.2.1.2"]),
    ]
    assert [i.sop_instance_uid for i in plan.not_analysable] == ["1.2.1.1.2"]
    assert plan.images == 2
    assert plan.outstanding() == {"1.2.1": 2, "1.2.2": 1}
    assert match_studies(archive, RemoteQuery(max_studies=1))[0].study_uid == "1.2.1"


def test_unlisted_studies_are_recorded_and_a_dead_pacs_is_not_hammered() -> None:
    archive = _archive()
    archive.studies = [StudyMatch(f"1.3.{n}", "20200301", ("CR",)) for n in range(6)]
    archive.broken = {s.study_uid for s in archive.studies}
    plan = plan_run(archive, RemoteQuery(), archive.studies, set(), max_consecutive_failures=2)
    assert [u.study_uid for u in plan.unreachable] == [s.study_uid for s in archive.studies]
    assert archive.series_queries == 2  # the other four were not tried
    assert "not queried: 2 studies in a row failed" in plan.unreachable[-1].detail


def test_rate_limiter_spreads_images_over_the_minute() -> None:
    now = [100.0]
    limiter = RateLimiter(30.0, clock=lambda: now[0])  # one image every 2 s
    assert limiter.chunk() == 5
    assert limiter.delay(5) == 0.0  # the first chunk goes at once
    assert limiter.delay(5) == pytest.approx(10.0)  # the next waits for the first's share
    now[0] += 25.0
    assert limiter.delay(1) == 0.0
    assert RateLimiter(None).delay(1000) == 0.0


def test_feed_hands_over_in_order_and_holds_producers_at_its_room(tmp_path: Path) -> None:
    feed = Feed(room=2)
    files = [InputFile(tmp_path / f"{n}.dcm", 1, 1, source=f"x/{n}") for n in range(3)]
    feed.put(files[0])
    feed.put(files[1])
    released = threading.Event()

    def producer() -> None:
        feed.wait_for_room(1)  # two files staged: waits for a release
        released.set()
        feed.put(files[2])
        feed.close()

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.2)
    assert not released.is_set()
    assert feed.take() == files[0]
    feed.release()
    thread.join(timeout=10)
    assert released.is_set()
    assert [feed.take(), feed.take(), feed.take(None)] == [files[1], files[2], None]
    assert feed.finished


def test_report_redo_drops_only_the_rows_asked_for(tmp_path: Path) -> None:
    rows = [
        Row(path="p/1", size=0, mtime_ns=0, status="failed", reason="retrieve_failed"),
        Row(path="p/2", size=0, mtime_ns=0, status="failed", reason="corrupt_pixel_data"),
        Row(path="p/3", size=0, mtime_ns=0, status="done"),
    ]
    with ReportWriter.open(tmp_path) as report:
        for row in rows:
            report.write(row)
    with ReportWriter.open(tmp_path, redo=lambda r: r.reason == "retrieve_failed") as report:
        assert [r.path for r in report.kept_rows] == ["p/2", "p/3"]


def test_dicomweb_destinations_need_a_clean_url_and_one_auth_scheme(tmp_path: Path) -> None:
    assert parse_dicomweb_url("http://127.0.0.1:8042/dicom-web/").url == (
        "http://127.0.0.1:8042/dicom-web"
    )
    for bad in (
        "ftp://pacs/dicom-web",
        "http://user:secret@pacs/dicom-web",
        "pacs",
        "http://x/?a=1",
    ):
        with pytest.raises(ConfigError):
            parse_dicomweb_url(bad)
    with pytest.raises(ConfigError, match="dicomweb destination needs url"):
        load_settings(None, send={"destinations": [{"kind": "dicomweb"}]})
    with pytest.raises(ConfigError, match="not both"):
        load_settings(
            None,
            send={
                "destinations": [
                    {
                        "kind": "dicomweb",
                        "url": "https://pacs/dicom-web",
                        "auth": {"bearer_token_env": "T", "username": "u", "password_env": "P"},
                    }
                ]
            },
        )
    with pytest.raises(ConfigError, match="known_peers"):
        load_settings(
            None, send={"known_peers": [{"kind": "dicomweb", "url": "https://pacs/dicom-web"}]}
        )
    with pytest.raises(ConfigError, match="ae_title, host and port"):
        load_settings(None, send={"destinations": [{"ae_title": "PACS"}]})


def test_a_url_from_the_command_line_takes_auth_and_tls_of_the_configured_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    configured = Destination(
        kind="dicomweb",
        url="https://pacs.example/dicom-web",
        auth={"bearer_token_file": token_file},  # type: ignore[arg-type]
        tls={"verify": True, "ca_certificates": token_file},  # type: ignore[arg-type]
    )
    settings = SendSettings(destinations=[configured])
    given = parse_dicomweb_url("https://pacs.example/dicom-web/")
    peer = configured_peer(given, settings)
    assert peer.auth == configured.auth and peer.tls == configured.tls
    session = session_for(peer)
    assert session.headers["Authorization"] == "Bearer s3cret"
    assert session.verify == str(token_file)
    other = configured_peer(parse_dicomweb_url("https://other/dicom-web"), settings)
    assert session_for(other).headers.get("Authorization") is None
    assert session_for(other).verify is True  # verification on by default

    monkeypatch.setenv("CXR_TEST_PASSWORD", "pw")
    basic = Destination(
        kind="dicomweb",
        url="https://pacs.example/dicom-web",
        auth={"username": "cxr", "password_env": "CXR_TEST_PASSWORD"},  # type: ignore[arg-type]
    )
    assert session_for(basic).auth == ("cxr", "pw")
    monkeypatch.delenv("CXR_TEST_PASSWORD")
    with pytest.raises(ConfigError, match="CXR_TEST_PASSWORD"):
        session_for(basic)
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(tmp_path / "missing", None, "bearer token")


BOUNDARY = "b0undary"


def _multipart(*parts: bytes, close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        body += part + b"\r\n"
    if close:
        body += b"--" + BOUNDARY.encode() + b"--\r\n"
    return body


def test_multipart_parts_come_back_byte_for_byte_and_truncation_is_caught() -> None:
    binary = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n"
    parts = split_multipart(b"preamble\r\n" + _multipart(binary, b"second"), BOUNDARY)
    assert [content for _, content in parts] == [binary, b"second"]
    assert parts[0][0] == {"content-type": "application/dicom"}
    whole = _multipart(binary, b"second")
    for cut in (len(whole) - 5, len(whole) // 2, 10):
        with pytest.raises(MultipartError, match="truncated"):
            split_multipart(whole[:cut], BOUNDARY)
    with pytest.raises(MultipartError, match="no multipart boundary"):
        split_multipart(b"just bytes", BOUNDARY)
    media, params = parse_media_type(
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
    )
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": BOUNDARY}


def test_stow_tokens_come_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# senders\nalpha\n\n beta \n")
    monkeypatch.setenv("CXR_TEST_TOKENS", "gamma, delta")
    settings = load_settings(
        None,
        listener={"dicomweb": {"port": 0, "tokens_file": tokens, "tokens_env": "CXR_TEST_TOKENS"}},
    )
    assert load_tokens(settings.listener.dicomweb) == {"alpha", "beta", "gamma", "delta"}
    with pytest.raises(ConfigError, match="no bearer token"):
        load_tokens(load_settings(None, listener={"dicomweb": {"port": 0}}).listener.dicomweb)
    anonymous = load_settings(None, listener={"dicomweb": {"port": 0, "allow_anonymous": True}})
    assert load_tokens(anonymous.listener.dicomweb) == frozenset()
