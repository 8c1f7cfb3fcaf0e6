"""Concurrent associations into one ``cxr-listen`` with Orthanc as the destination.

Shared by ``bench/bench_load.py`` (4 x 100 images, prints figures) and the reduced
reliability test (4 x 10, asserts everything accepted and processed, RSS bounded).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_pipeline.dicom.codes import DimseStatus
from cxr_pipeline.service.ledger import JobState, Ledger
from tests.reliability.harness import (
    Pacs,
    Tally,
    associate,
    chest_datasets,
    rss_kib,
    service_config,
    spawn_listener,
    stop,
    wait_finished,
)
from tests.support.orthanc import free_port


@dataclass
class LoadResult:
    """What a load run measured."""

    sent: int
    accepted: int
    done: int
    wall_s: float
    latencies_s: list[float]
    rss_start_kib: int
    rss_peak_sampled_kib: int
    rss_hwm_kib: int
    tally_row: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def lines(self) -> list[str]:
        return [
            f"sent {self.sent}, accepted {self.accepted}, processed (done) {self.done}",
            f"wall {self.wall_s:.1f} s, throughput {self.throughput:.2f} images/s",
            f"latency send->DONE median {statistics.median(self.latencies_s or [0]):.2f} s,"
            f" p95 {self.percentile(95):.2f} s, max {max(self.latencies_s or [0]):.2f} s",
            f"listener RSS at start {self.rss_start_kib / 1024:.0f} MiB, peak sampled"
            f" {self.rss_peak_sampled_kib / 1024:.0f} MiB, VmHWM {self.rss_hwm_kib / 1024:.0f} MiB",
        ]


def run_load(
    workdir: Path,
    *,
    pacs: Pacs,
    checkpoint: Path,
    pngs: list[Path],
    associations: int = 4,
    per_association: int = 10,
    size: int = 384,
    explain: str = "none",
    timeout_s: float = 600.0,
) -> LoadResult:
    """Send ``associations x per_association`` images concurrently and wait for them."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    config = service_config(
        workdir / "cxr.toml",
        data_dir=data_dir,
        checkpoint=checkpoint,
        pacs=pacs,
        listen_port=port,
        explain=explain,
        worker={"concurrency": 2},
        # All senders call from 127.0.0.1: room for each of them under the per-address cap.
        listener={
            "max_associations_per_address": max(associations, 4),
            "max_associations": max(associations, 10),
        },
    )
    batches = [chest_datasets(pngs, per_association, size=size) for _ in range(associations)]
    tally = Tally(f"load {associations} x {per_association} concurrent associations")
    for batch in batches:
        tally.sent(batch)
    sent_at: dict[str, float] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    listener = spawn_listener(config, port, workdir / "listener.log")
    try:
        pid = listener.process.pid
        rss_start, _ = rss_kib(pid)
        peak = [rss_start]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                try:
                    peak[0] = max(peak[0], rss_kib(pid)[0])
                except (OSError, KeyError):
                    return

        def send(batch: list[Any]) -> None:
            try:
                assoc = associate(port)
                statuses = {}
                for ds in batch:
                    uid = str(ds.SOPInstanceUID)
                    with lock:
                        sent_at[uid] = time.time()
                    status = assoc.send_c_store(ds)
                    statuses[uid] = int(status.Status) if "Status" in status else None
                assoc.release()
                with lock:
                    tally.answered(statuses)
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.time()
        senders = [threading.Thread(target=send, args=(b,)) for b in batches]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        if errors:
            raise errors[0]
        ledger = Ledger(data_dir / "ledger.sqlite3")
        rows = wait_finished(ledger, tally.acknowledged, timeout_s=timeout_s)
        sampling.set()
        sampler.join()
        _, hwm = rss_kib(pid)
    finally:
        stop(listener)
    done = {u: r for u, r in rows.items() if r is not None and r.state is JobState.DONE}
    end = max((r.updated_at for r in done.values()), default=start)
    return LoadResult(
        sent=len(tally.studies),
        accepted=sum(1 for s in tally.statuses.values() if s == DimseStatus.SUCCESS),
        done=len(done),
        wall_s=end - start,
        latencies_s=[r.updated_at - sent_at[u] for u, r in done.items()],
        rss_start_kib=rss_start,
        rss_peak_sampled_kib=peak[0],
        rss_hwm_kib=hwm,
        tally_row=tally.evaluate(ledger, pacs),
    )
