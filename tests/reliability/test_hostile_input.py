"""Hostile and broken input sent over the network to one running ``cxr-listen``.

Every case of :func:`tests.reliability.corpus.build_corpus`, then byte-fuzzed copies of a
real C-STORE (hypothesis, bounded), go to the same listener subprocess. Each must get a
clear DIMSE status (refused: no ledger row, nothing spooled) or Success with a ledger row
that ends DONE (results in the PACS) or SKIPPED/FAILED with a reason. The listener must
keep serving (a valid image afterwards gets its results), nothing may appear outside the
spool, the listener's memory must stay bounded and its log must not name the patient.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.association import Association

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.service.spool import validate_uid
from tests.reliability.corpus import Case, build_corpus, fuzzed
from tests.reliability.harness import (
    FINISHED_STATES,
    REPORT_ROWS,
    Pacs,
    Tally,
    assert_no_phi,
    associate,
    body_bytes,
    chest_datasets,
    rss_kib,
    send_datasets,
    send_raw,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
)
from tests.support.orthanc import free_port
from tests.support.services import Service

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REFUSALS = {
    DimseStatus.OUT_OF_RESOURCES,
    DimseStatus.CANNOT_UNDERSTAND,
    DimseStatus.DATASET_DOES_NOT_MATCH,
}
"""Named failure statuses the listener may answer for a hostile C-STORE."""

EXPECTED: dict[str, tuple[int, str | None]] = {
    # case name: (C-STORE status, ledger state and reason code prefix or None)
    "command UID differs from data set UID": (DimseStatus.DATASET_DOES_NOT_MATCH, None),
    "command class differs from data set class": (DimseStatus.DATASET_DOES_NOT_MATCH, None),
    "UID with ../ traversal": (DimseStatus.CANNOT_UNDERSTAND, None),
    "UID that is an absolute path": (DimseStatus.CANNOT_UNDERSTAND, None),
    "UID '..'": (DimseStatus.CANNOT_UNDERSTAND, None),
    "deeply nested sequence (500 levels)": (DimseStatus.CANNOT_UNDERSTAND, None),
    "pixel data shorter than rows x columns": (DimseStatus.SUCCESS, "skipped: corrupt_pixel_data"),
    "absurd rows/columns 65535 x 65535": (DimseStatus.SUCCESS, "skipped: image_too_large"),
    "bits allocated 1": (DimseStatus.SUCCESS, "skipped: unsupported_pixel_data"),
    "bits allocated 32": (DimseStatus.SUCCESS, "skipped: unsupported_pixel_data"),
    "photometric nonsense": (DimseStatus.SUCCESS, "skipped: unsupported_pixel_data"),
    "multi-frame": (DimseStatus.SUCCESS, "skipped: multi_frame"),
    "real CT (non-chest)": (DimseStatus.SUCCESS, "skipped: not_chest_radiograph"),
    "encapsulated PDF (non-image)": (DimseStatus.SUCCESS, "skipped: not_image"),
}
"""Outcomes pinned for the cases where exactly one answer is right."""


@dataclass
class Bench:
    """The running listener and an association that is re-opened when the peer aborts."""

    listener: Service
    port: int
    data_dir: Path
    ledger: Ledger
    pacs: Pacs
    assoc: Association | None = None
    outcomes: dict[str, str] = field(default_factory=dict)

    def send(self, case: Case) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = associate(self.port)
        status = send_raw(self.assoc, case.sop_class, case.sop_instance, case.payload, case.syntax)
        if status is None and self.assoc.is_established:
            self.assoc.abort()
        return status

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


@pytest.fixture
def bench(tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path) -> Iterator[Bench]:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml",
        data_dir=data_dir,
        checkpoint=tiny_checkpoint,
        pacs=pacs,
        listen_port=port,
        log_level="DEBUG",  # tracebacks too must not carry patient data
        send={"max_attempts": 2},
    )
    listener = spawn_listener(config, port, tmp_path / "listener.log")
    bench = Bench(listener, port, data_dir, Ledger(data_dir / "ledger.sqlite3"), pacs)
    try:
        yield bench
    finally:
        bench.close()
        stop(listener)


def _is_valid_uid(uid: str) -> bool:
    try:
        validate_uid(uid)
    except Exception:
        return False
    return True


def _check_outcome(bench: Bench, case: Case, status: int | None) -> str:
    """Assert the contract for one case and describe its outcome."""
    assert bench.listener.process.poll() is None, f"listener died on {case.name!r}"
    if status == DimseStatus.SUCCESS:
        uid = validate_uid(case.sop_instance)
        row = bench.ledger.get(uid)
        assert row is not None, f"{case.name!r}: Success without a ledger row"
        return "success"
    assert status is None or status in REFUSALS, f"{case.name!r}: status 0x{status:04X}"
    if _is_valid_uid(case.sop_instance):
        row = bench.ledger.get(case.sop_instance)
        assert row is None, f"{case.name!r}: refused but recorded as {row}"
        assert not (bench.data_dir / "spool" / "incoming" / f"{case.sop_instance}.dcm").exists()
    return "refused" if status is not None else "aborted"


def test_hostile_corpus_then_valid_image(
    bench: Bench, tmp_path: Path, pacs: Pacs, pngs: list[Path]
) -> None:
    warm = chest_datasets(pngs, 1)
    base = chest_datasets(pngs, 1, PatientComments="hostile corpus base")[0]
    cases = build_corpus(base)
    assert len(cases) >= 30
    tally = Tally("hostile corpus (+1 valid before, +1 after)")

    # Warm the listener (first image loads lazy code paths), then measure memory.
    tally.sent(warm)
    tally.answered(send_datasets(bench.port, warm))
    wait_finished(bench.ledger, tally.acknowledged)
    rss_before, _ = rss_kib(bench.listener.process.pid)

    outcomes: dict[str, str] = {}
    statuses: dict[str, int | None] = {}
    for case in cases:
        status = bench.send(case)
        statuses[case.name] = status
        outcomes[case.name] = _check_outcome(bench, case, status)
        tally.studies[case.sop_instance] = case.study
        tally.statuses[case.sop_instance] = status
    bench.close()

    # Accepted cases finish with a reason (or with results).
    rows = wait_finished(bench.ledger, tally.acknowledged, timeout_s=180)
    for uid, row in rows.items():
        assert row is not None and row.state in FINISHED_STATES, (uid, row)
        if row.state is not JobState.DONE:
            assert row.reason, row

    # Still serving: a valid image afterwards is analysed and delivered.
    after = chest_datasets(pngs, 1)
    tally.sent(after)
    answered = send_datasets(bench.port, after)
    assert set(answered.values()) == {DimseStatus.SUCCESS}
    tally.answered(answered)
    wait_finished(bench.ledger, answered)
    rss_after, peak = rss_kib(bench.listener.process.pid)

    # No path traversal: nothing was written outside the data folder's spool.
    assert not list(tmp_path.rglob("escaped*"))
    assert not Path("/tmp/escaped.dcm").exists()
    incoming = bench.data_dir / "spool" / "incoming"
    assert all(_is_valid_uid(p.stem) for p in incoming.iterdir() if p.suffix == ".dcm")
    assert not [p for p in incoming.iterdir() if p.name.endswith(".part")]

    summary = {name: (outcomes[name], statuses[name]) for name in outcomes}
    print("hostile corpus outcomes:")
    for name, (outcome, status) in summary.items():
        row = bench.ledger.get(next(c.sop_instance for c in cases if c.name == name))
        found = f"{row.state.value}: {row.reason}" if row is not None else "-"
        code = "none" if status is None else f"0x{status:04X}"
        print(f"  {name:<45} {outcome:<8} {code:<7} {found[:90]}")
    for name, (status, state) in EXPECTED.items():
        outcome_status = summary[name][1]
        assert outcome_status == status, (name, outcome_status)
        if state is not None:
            case = next(c for c in cases if c.name == name)
            pinned = bench.ledger.get(case.sop_instance)
            assert pinned is not None, name
            assert f"{pinned.state.value}: {pinned.reason}".startswith(state), pinned
    growth_mib = (rss_after - rss_before) / 1024
    print(
        f"listener RSS before {rss_before / 1024:.0f} MiB, after {rss_after / 1024:.0f} MiB,"
        f" peak {peak / 1024:.0f} MiB"
    )
    assert growth_mib < 200, f"listener RSS grew by {growth_mib:.0f} MiB"

    table = tally.evaluate(bench.ledger, pacs)
    assert table["lost"] == 0 and table["duplicates"] == 0, table
    assert_no_phi(bench.listener.log_path)


FUZZ = Counter[str]()
"""Outcomes of the fuzzed examples, summed over hypothesis' runs (one table row)."""


@pytest.fixture(scope="module", autouse=True)
def _fuzz_row() -> Iterator[None]:
    yield
    if FUZZ["sent"]:
        REPORT_ROWS.append(
            {
                "scenario": "hypothesis-fuzzed byte streams",
                "sent": FUZZ["sent"],
                "acknowledged": FUZZ["acknowledged"],
                "delivered": FUZZ["delivered"],
                "failed_with_reason": FUZZ["failed_with_reason"],
                "lost": FUZZ["lost"],
                "duplicates": FUZZ["duplicates"],
            }
        )


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2000), st.integers(0, 255)),
        min_size=1,
        max_size=12,
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=140_000)),
)
def test_fuzzed_byte_streams(
    bench: Bench, pngs: list[Path], flips: list[tuple[int, int]], cut: int | None
) -> None:
    """Byte flips in the header region (and optional truncation) of a real C-STORE."""
    ds = chest_datasets(pngs, 1)[0]
    payload = fuzzed(body_bytes(ds), flips)
    if cut is not None:
        payload = payload[:cut]
    case = Case("fuzzed", str(ds.SOPClassUID), str(ds.SOPInstanceUID), payload)
    status = bench.send(case)
    FUZZ["sent"] += 1
    outcome = _check_outcome(bench, case, status)
    if outcome == "success":
        FUZZ["acknowledged"] += 1
        rows = wait_finished(bench.ledger, [case.sop_instance], timeout_s=60)
        row = rows[case.sop_instance]
        if row is None or row.state not in FINISHED_STATES:
            FUZZ["lost"] += 1
        assert row is not None and row.state in FINISHED_STATES, row
        if row.state is JobState.DONE:
            counts, stored = bench.pacs.results_by_study()
            study = counts.get(str(ds.StudyInstanceUID), Counter())
            FUZZ["duplicates"] += int(study["SR"] > 1 or study["SC"] > 1)
            assert len(row.result_uids) == 2 and set(row.result_uids) <= stored, row
            FUZZ["delivered"] += 1
        else:
            assert row.reason, row
            FUZZ["failed_with_reason"] += 1
    # Still serving after each example.
    assert send_datasets(bench.port, []) == {}
