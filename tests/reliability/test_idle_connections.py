"""Silent TCP connections must not lock real senders out of ``cxr-listen`` for long.

A connection that never sends its A-ASSOCIATE-RQ holds one of ``max_associations``
slots until the admission watchdog closes it, ``listener.association_request_timeout_s``
after accept (pynetdicom's ARTIM default is 30 s): a PACS retrying after being refused
gets in soon, and its image is delivered.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.ledger import JobState, Ledger
from cxr_pipeline.settings import ListenerSettings
from tests.reliability.harness import (
    Pacs,
    Tally,
    chest_datasets,
    scu,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
)
from tests.support.orthanc import free_port

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ASSOCIATION_REQUEST_TIMEOUT_S = ListenerSettings().association_request_timeout_s


def test_idle_sockets_free_their_slots_after_artim(
    tmp_path: Path, pacs: Pacs, pngs: list[Path], tiny_checkpoint: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = service_config(
        tmp_path / "cxr.toml", data_dir=data_dir, checkpoint=tiny_checkpoint, pacs=pacs,
        listen_port=port, listener={"max_associations": 2},
    )  # fmt: skip
    datasets = chest_datasets(pngs, 1)
    tally = Tally("idle sockets hold every association slot")
    tally.sent(datasets)
    listener = spawn_listener(config, port, tmp_path / "listener.log")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.5)
        start = time.monotonic()
        refused = scu().associate("127.0.0.1", port, ae_title="CXR_PIPELINE")
        assert refused.is_rejected  # every slot is held by a silent socket
        # The PACS retries every second until it gets in.
        while True:
            assoc = scu().associate("127.0.0.1", port, ae_title="CXR_PIPELINE")
            if assoc.is_established:
                break
            assert time.monotonic() - start < 3 * ASSOCIATION_REQUEST_TIMEOUT_S
            time.sleep(1.0)
        waited = time.monotonic() - start
        print(f"real sender locked out by idle sockets for {waited:.1f} s")
        status = assoc.send_c_store(datasets[0])
        assoc.release()
        tally.answered({str(datasets[0].SOPInstanceUID): int(status.Status)})
        assert int(status.Status) == DimseStatus.SUCCESS
        # Closed at the request deadline, not held for pynetdicom's default 30 s.
        assert waited < 25, f"locked out for {waited:.1f} s"
        ledger = Ledger(data_dir / "ledger.sqlite3")
        rows = wait_finished(ledger, tally.acknowledged)
        assert {r.state for r in rows.values() if r} == {JobState.DONE}
    finally:
        for sock in idle:
            sock.close()
        stop(listener)
    row = tally.evaluate(ledger, pacs)
    assert row["delivered"] == 1 and row["lost"] == 0, row
