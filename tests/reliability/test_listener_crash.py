"""``kill -9`` of ``cxr-listen`` in the middle of a multi-image association.

A pynetdicom SCU sends a dozen chest radiographs over one association; a timer
SIGKILLs the listener while C-STOREs are in flight. The listener is started again on
the same data folder; the SCU re-sends what was never acknowledged, as a PACS retries a
failed transfer. Every acknowledged instance must end with its SR and SC in Orthanc,
once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.ledger import JobState, Ledger
from tests.reliability.harness import (
    Pacs,
    Tally,
    assert_no_phi,
    associate,
    chest_datasets,
    kill9,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
)
from tests.support.dicom_network import wait_until
from tests.support.orthanc import free_port

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_listener_killed_mid_association(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml", data_dir=data_dir, checkpoint=tiny_checkpoint, pacs=pacs,
        listen_port=port,
    )  # fmt: skip
    log = tmp_path / "listener.log"
    datasets = chest_datasets(pngs, 12)
    tally = Tally("kill -9 listener mid-association")
    tally.sent(datasets)

    listener = spawn_listener(config, port, log)
    killed = threading.Event()

    def kill_listener() -> None:
        kill9(listener)
        killed.set()

    try:
        assoc = associate(port)
        statuses: dict[str, int | None] = {}
        for i, ds in enumerate(datasets):
            if i == 4:  # SIGKILL lands while the next C-STOREs are in flight
                threading.Timer(0.05, kill_listener).start()
            if i == 8:
                # On a fast machine stores 4-7 may all finish within the timer's 50 ms:
                # the kill then lands here, still mid-association, and the last four
                # are never acknowledged whatever the machine's speed.
                assert killed.wait(30)
            if not assoc.is_established:
                statuses[str(ds.SOPInstanceUID)] = None
                continue
            status = assoc.send_c_store(ds)
            statuses[str(ds.SOPInstanceUID)] = int(status.Status) if "Status" in status else None
        assert killed.wait(30)
        if assoc.is_established:
            assoc.abort()
        tally.answered(statuses)
        acked_before = set(tally.acknowledged)
        assert 4 <= len(acked_before) < len(datasets), statuses

        # What a kill during a spool write leaves (the timer may or may not have hit
        # one): a temporary file that was never renamed, acknowledged or recorded.
        incoming = data_dir / "spool" / "incoming"
        (incoming / ".tmp-killed-mid-write.part").write_bytes(b"\0" * 1000)
        listener = spawn_listener(config, port, log)
        assert not list(incoming.glob("*.part"))
        # The PACS retries what it never got an answer for.
        retry = [ds for ds in datasets if str(ds.SOPInstanceUID) not in acked_before]
        assoc = associate(port)
        again = {str(ds.SOPInstanceUID): int(assoc.send_c_store(ds).Status) for ds in retry}
        assoc.release()
        assert set(again.values()) == {DimseStatus.SUCCESS}
        tally.answered(again)

        ledger = Ledger(data_dir / "ledger.sqlite3")
        rows = wait_finished(ledger, tally.acknowledged)
        assert all(r is not None and r.state is JobState.DONE for r in rows.values()), (
            {u: r and r.state for u, r in rows.items()},
            listener.log_tail(),
        )
        # Finished jobs leave nothing behind in the spool.
        assert wait_until(lambda: not any(incoming.iterdir()), timeout_s=30)
    finally:
        stop(listener)
    row = tally.evaluate(ledger, pacs)
    assert row["lost"] == 0 and row["duplicates"] == 0, row
    assert row["delivered"] == len(datasets)
    assert_no_phi(log)
