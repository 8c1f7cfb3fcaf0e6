"""Scale-out benchmark: one vs two isolated Celery workers on a burst of images.

Run from the repository root::

    .venv/bin/python -m bench.bench_scaleout                 # 60 images, gradcam, 3 rounds
    .venv/bin/python -m bench.bench_scaleout --images 60 --rounds 1 --explain none

Each round and configuration gets a fresh ``redis-server`` (so its peak memory is that
run's), a fresh data folder, a real Orthanc as the destination and ``cxr-listen --broker``;
``N`` ``cxr-worker`` processes (solo pool, one process, ``OMP_NUM_THREADS=1``: one thread
each) start first and load the model, then one association sends a burst of distinct 12-bit
CR chest DICOMs built from real NIH ChestX-ray8 PNGs (seeded untrained SqueezeNet 1.1, no
download). Throughput = images / (first C-STORE to last DONE in the listener's ledger, SR
and SC sent to Orthanc by the listener). Printed per configuration: median throughput over
the rounds, the ratio 2 workers / 1 worker, Redis ``used_memory_peak`` and the peak of the
payload bytes sampled every 0.1 s, and the listener's VmHWM (peak RSS).

Workers share nothing with the listener but Redis here, as in production. Everything runs
on this machine: its core count and load average are printed; a ratio measured on a
machine with fewer free cores than workers says little about scale-out (quote the load).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.bench_load import _checkpoint, _pngs
from cxr_pipeline.service.ledger import JobState, Ledger
from tests.reliability.harness import (
    Pacs,
    chest_datasets,
    rss_kib,
    send_datasets,
    service_config,
    spawn_listener,
    spawn_worker,
    stop,
)
from tests.support.orthanc import free_port
from tests.support.redis_server import start_redis
from workers.transfer import payload_bytes


@dataclass
class Run:
    """Figures of one round with one worker count."""

    workers: int
    images: int
    seconds: float
    done: int
    redis_peak_bytes: int
    payload_peak_bytes: int
    listener_hwm_kib: int

    @property
    def throughput(self) -> float:
        """DONE images per second."""
        return self.done / self.seconds


def _sample_redis(client: redis.Redis, stop_at: threading.Event, peak: list[int]) -> None:
    while not stop_at.wait(0.1):
        with contextlib.suppress(redis.RedisError):
            peak[0] = max(peak[0], payload_bytes(client))


def run_once(
    work: Path, pacs: Pacs, checkpoint: Path, workers: int, images: int, explain: str
) -> Run:
    """One burst through ``workers`` isolated workers; returns its figures."""
    folder = Path(tempfile.mkdtemp(prefix=f"w{workers}-", dir=work))
    server = start_redis(folder / "redis")
    port = free_port()
    data_dir = folder / "data"
    config = service_config(
        folder / "cxr.toml",
        data_dir=data_dir,
        checkpoint=checkpoint,
        pacs=pacs,
        listen_port=port,
        broker=server.url,
        explain=explain,
        worker={"micro_batch_wait_s": 0.05, "requeue_after_s": 60.0},
    )
    datasets = chest_datasets(_pngs(), images)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    started = []
    listener = None
    try:
        for n in range(workers):
            started.append(spawn_worker(config, folder / f"worker{n}.log", hostname=f"w{n}@%h"))
        listener = spawn_listener(config, port, folder / "listener.log", broker=server.url)
        client = redis.Redis(host="127.0.0.1", port=server.port)
        peak = [0]
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=_sample_redis, args=(client, stop_sampling, peak))
        sampler.start()
        ledger = Ledger(data_dir / "ledger.sqlite3")
        start = time.monotonic()
        statuses = send_datasets(port, datasets)
        accepted = [u for u, s in statuses.items() if s == 0]
        deadline = start + 1800
        while time.monotonic() < deadline:
            counts = ledger.counts()
            if counts[JobState.DONE] + counts[JobState.FAILED] + counts[JobState.SKIPPED] >= len(
                accepted
            ):
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
        stop_sampling.set()
        sampler.join()
        done = ledger.counts()[JobState.DONE]
        _, hwm = rss_kib(listener.process.pid)
        redis_peak = int(client.info("memory")["used_memory_peak"])
        client.close()
        return Run(workers, len(uids), seconds, done, redis_peak, peak[0], hwm)
    finally:
        for service in started:
            stop(service)
        if listener is not None:
            stop(listener)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="bench_scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--explain", choices=["none", "gradcam", "occlusion"], default="gradcam")
    parser.add_argument("--checkpoint", type=Path, help="default: seeded squeezenet1_1")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores,"
        f" load average {os.getloadavg()[0]:.1f} at start; python {sys.version.split()[0]}"
    )
    runs: dict[int, list[Run]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-scaleout-") as folder:
        work = Path(folder)
        checkpoint = args.checkpoint or _checkpoint(work)
        pacs = Pacs(work / "orthanc", {})
        pacs.start()
        try:
            for round_no in range(args.rounds):
                for workers in (1, 2):  # interleaved: a load change hits both alike
                    run = run_once(work, pacs, checkpoint, workers, args.images, args.explain)
                    runs[workers].append(run)
                    print(
                        f"round {round_no + 1} workers={workers}: {run.done}/{run.images} done"
                        f" in {run.seconds:.1f} s = {run.throughput:.2f} img/s;"
                        f" redis peak {run.redis_peak_bytes / 2**20:.1f} MiB,"
                        f" payload peak {run.payload_peak_bytes / 2**20:.2f} MiB;"
                        f" listener VmHWM {run.listener_hwm_kib / 1024:.0f} MiB;"
                        f" load {os.getloadavg()[0]:.1f}"
                    )
        finally:
            pacs.stop()
    med = {w: statistics.median(r.throughput for r in rs) for w, rs in runs.items()}
    print(f"\nexplain={args.explain}, {args.images} images per burst, {args.rounds} round(s)")
    for workers, rs in runs.items():
        print(
            f"workers={workers}: median {med[workers]:.2f} img/s;"
            f" redis used_memory_peak max {max(r.redis_peak_bytes for r in rs) / 2**20:.1f} MiB;"
            f" payload bytes peak max {max(r.payload_peak_bytes for r in rs) / 2**20:.2f} MiB;"
            f" listener VmHWM max {max(r.listener_hwm_kib for r in rs) / 1024:.0f} MiB"
        )
    print(f"throughput ratio 2 workers / 1 worker (medians): {med[2] / med[1]:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
