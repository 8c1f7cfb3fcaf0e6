"""Listener benchmark: C-STORE receive rate of cxr-listen vs DCMTK storescp, and end-to-end latency.

Run from the repository root::

    .venv/bin/python -m bench.bench_listener            # 50 images x 2 rounds; e2e 10 + 30
    .venv/bin/python -m bench.bench_listener --count 20 --rounds 1 --e2e-single 5 --e2e-burst 10

1. Builds ``rounds x count`` distinct DICOM files (12-bit CR, Explicit VR LE) from real
   1024x1024 NIH ChestX-ray8 PNGs of the shared data folder (``$CXR_DATASET_DIR`` or
   ``../shared/data/cxr``), each with its own UIDs.
2. Receive rate: in each round, ``storescu`` sends the round's files in one association to
   DCMTK ``storescp`` (writes files, no fsync) and to ``cxr-listen --broker`` (durable spool
   with fsync + SQLite ledger row + Redis publish; no worker running, so nothing else
   competes for the CPU). Prints images/s for both, the median over rounds and the ratio.
3. End to end: a real Orthanc, ``cxr-listen --broker``, one ``cxr-worker`` process and
   Redis. Latency = from the start of the ``storescu`` call that sends an image to the
   moment its SR is stored in Orthanc (Orthanc ``/changes`` polled every 50 ms).
   ``single``: one image at a time (the next is sent after the previous SR arrived).
   ``burst``: images sent back to back (queueing and micro-batching included), run once
   per ``--batch-sizes`` value (default 1 and 16) with a fresh worker, Orthanc and ledger,
   and the throughput ratio of the last to the first printed.

Everything runs on this machine; note how many cores it has and what else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from tests.support.dicom_factory import load_png, make_dicom, write
from tests.support.orthanc import OrthancServer, free_port, running_orthanc
from tests.support.redis_server import start_redis
from tests.support.services import running_listener, running_worker, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("CXR_DATASET_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cxr"


def make_files(out: Path, total: int) -> list[Path]:
    pngs = sorted((shared_data_dir() / "images" / "nih").glob("*.png"))
    if not pngs:
        raise SystemExit(f"no NIH PNGs under {shared_data_dir()} (set CXR_DATASET_DIR)")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(total):
        pixels = load_png(pngs[i % len(pngs)], size=None)
        ds = make_dicom(pixels, modality="CR", bits_stored=12, PatientID=f"BENCH{i:04d}")
        files.append(write(ds, out / f"img{i:04d}.dcm"))
    return files


def storescu(port: int, files: list[Path], ae: str = "ANY", *, aet: str = "BENCH") -> float:
    start = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aet", aet, "-aec", ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
    return elapsed


def tiny_checkpoint(folder: Path) -> Path:
    import torch

    from cxr_pipeline.model.architectures import build_model, save_checkpoint
    from cxr_pipeline.model.card import ModelCard

    torch.manual_seed(0)
    model = build_model("squeezenet1_1", weights=None)
    card = ModelCard(
        name="bench-squeezenet1_1",
        version="0.0.1-bench",
        architecture="squeezenet1_1",
        device_uid="2.25.271828182845904523536028747135266249775",
        threshold=0.5,
        training_data="untrained, seeded weights for benchmarks",
    )
    path = folder / "bench.pt"
    save_checkpoint(path, model, card)
    return path


def pick_checkpoint(arg: Path | None, folder: Path) -> Path:
    if arg is not None:
        return arg
    from cxr_pipeline.model.architectures import default_checkpoint_path

    default = default_checkpoint_path()
    return default if default.is_file() else tiny_checkpoint(folder)


class SrWatcher:
    """Polls Orthanc's change log; records when an SR of each study is stored."""

    def __init__(self, pacs: OrthancServer) -> None:
        self.pacs = pacs
        self.seen: dict[str, float] = {}
        self._since = int(pacs.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            changes = self.pacs.get(f"/changes?since={self._since}&limit=1000")
            now = time.perf_counter()
            for change in changes["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    tags = self.pacs.get_instance_tags(change["ID"])
                    if tags.get("Modality") == "SR":
                        self.seen.setdefault(str(tags["StudyInstanceUID"]), now)
            self._since = int(changes["Last"])
            if changes.get("Done", True):
                self._stop.wait(0.05)

    def wait(self, study: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while study not in self.seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SR for study {study} after {timeout_s} s")
            time.sleep(0.02)
        return self.seen[study]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def study_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def bench_receive(
    args: argparse.Namespace, work: Path, files: list[Path], broker: str
) -> dict[str, Any]:
    listener_rates: list[float] = []
    storescp_rates: list[float] = []
    data_dir = work / "recv-data"
    listen_port = free_port()
    config = write_config(
        work / "recv.toml",
        {"data_dir": data_dir, "log_level": "WARNING"},
        {
            "listener": {"host": "127.0.0.1", "port": listen_port, "min_free_bytes": 0},
            "worker": {"broker_url": broker, "requeue_after_s": 3600.0},
        },
    )
    scp_port = free_port()
    scp_dir = work / "storescp"
    scp_dir.mkdir()
    scp = subprocess.Popen(
        ["storescp", "-od", str(scp_dir), str(scp_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        with running_listener(config, listen_port, work / "recv-listener.log", broker=broker):
            for r in range(args.rounds):
                batch = files[r * args.count : (r + 1) * args.count]
                t_scp = storescu(scp_port, batch)
                t_cxr = storescu(listen_port, batch, "CXR_PIPELINE")
                storescp_rates.append(len(batch) / t_scp)
                listener_rates.append(len(batch) / t_cxr)
                print(
                    f"  round {r + 1}: storescp {len(batch) / t_scp:7.1f} img/s   "
                    f"cxr-listen {len(batch) / t_cxr:7.1f} img/s"
                )
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    queued = redis.Redis.from_url(broker).llen("cxr")
    return {
        "storescp_img_s": statistics.median(storescp_rates),
        "listener_img_s": statistics.median(listener_rates),
        "ratio": statistics.median(listener_rates) / statistics.median(storescp_rates),
        "queued": int(queued),
        "mb_per_image": files[0].stat().st_size / 1e6,
    }


def bench_e2e(
    args: argparse.Namespace,
    work: Path,
    files: list[Path],
    broker: str,
    checkpoint: Path,
    *,
    batch_size: int,
    n_single: int,
) -> dict[str, Any]:
    redis.Redis.from_url(broker).flushdb()
    listen_port = free_port()
    results: dict[str, Any] = {}
    work = work / f"e2e-batch{batch_size}"
    work.mkdir()
    with running_orthanc(work / "orthanc") as pacs:
        config = write_config(
            work / "e2e.toml",
            {"data_dir": work / "e2e-data", "log_level": "INFO"},
            {
                "model": {
                    "checkpoint": checkpoint,
                    "device": args.device,
                    "batch_size": batch_size,
                },
                "explain": {"method": args.explain},
                "listener": {"host": "127.0.0.1", "port": listen_port, "min_free_bytes": 0},
                "worker": {"broker_url": broker},
                "send.destinations": [
                    {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
                ],
            },
        )
        watcher = SrWatcher(pacs)
        try:
            with (
                running_listener(config, listen_port, work / "e2e-listener.log", broker=broker),
                running_worker(config, work / "e2e-worker.log"),
            ):
                single = files[:n_single]
                burst = files[args.e2e_single : args.e2e_single + args.e2e_burst]
                if single:
                    storescu(listen_port, single[:1], "CXR_PIPELINE")  # warm-up, not counted
                    watcher.wait(study_of(single[0]), 300)
                    latencies = []
                    for path in single[1:]:
                        study = study_of(path)
                        start = time.perf_counter()
                        storescu(listen_port, [path], "CXR_PIPELINE")
                        latencies.append(watcher.wait(study, 300) - start)
                    results["single"] = latencies
                if burst:
                    starts: dict[str, float] = {}
                    for path in burst:
                        study = study_of(path)
                        starts[study] = time.perf_counter()
                        storescu(listen_port, [path], "CXR_PIPELINE")
                    latencies = [watcher.wait(s, 1200) - t for s, t in starts.items()]
                    span = max(watcher.seen[s] for s in starts) - min(starts.values())
                    results["burst"] = latencies
                    results["burst_throughput_img_s"] = len(burst) / span
        finally:
            watcher.stop()
    worker_log = (work / "e2e-worker.log").read_text(errors="replace")
    results["micro_batches"] = worker_log.count("micro-batch of")
    return results


def report_e2e(e2e: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in ("single", "burst"):
        values = e2e.get(mode)
        if values:
            summary[mode] = {
                "n": len(values),
                "median_s": statistics.median(values),
                "p95_s": percentile(values, 95),
            }
            print(
                f"  {mode:6s}: n={len(values):3d}  send->SR in Orthanc median "
                f"{summary[mode]['median_s']:.2f} s, p95 {summary[mode]['p95_s']:.2f} s"
            )
    if "burst_throughput_img_s" in e2e:
        summary["burst_throughput_img_s"] = e2e["burst_throughput_img_s"]
        summary["micro_batches"] = e2e["micro_batches"]
        print(
            f"  burst throughput {e2e['burst_throughput_img_s']:.2f} img/s, "
            f"{e2e['micro_batches']} micro-batches formed by the worker"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="images per receive round")
    parser.add_argument("--rounds", type=int, default=2, help="receive rounds (median taken)")
    parser.add_argument("--e2e-single", type=int, default=10, help="images sent one at a time")
    parser.add_argument("--e2e-burst", type=int, default=30, help="images sent back to back")
    parser.add_argument("--checkpoint", type=Path, help="default: packaged model, else tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 16],
        help="model.batch_size values compared on the burst (comma-separated)",
    )
    parser.add_argument("--explain", default="gradcam", choices=["gradcam", "occlusion", "none"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "redis-server", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not installed")

    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        work = Path(tmp)
        total = max(args.count * args.rounds, args.e2e_single + args.e2e_burst)
        t0 = time.perf_counter()
        files = make_files(work / "files", total)
        print(
            f"{total} DICOM files ({files[0].stat().st_size / 1e6:.1f} MB each, 1024x1024 "
            f"12-bit CR from NIH PNGs) in {time.perf_counter() - t0:.1f} s; "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        )
        server = start_redis(work / "redis")
        try:
            print(
                f"\n== receive rate: storescu -> storescp vs cxr-listen --broker "
                f"({args.count} images x {args.rounds})"
            )
            recv = bench_receive(args, work, files, server.url)
            print(
                f"  median: storescp {recv['storescp_img_s']:.1f} img/s, "
                f"cxr-listen {recv['listener_img_s']:.1f} img/s, "
                f"ratio cxr-listen/storescp = {recv['ratio']:.2f} "
                f"({recv['queued']} UIDs queued in Redis)"
            )
            checkpoint = pick_checkpoint(args.checkpoint, work)
            runs: dict[int, dict[str, Any]] = {}
            for i, size in enumerate(args.batch_sizes):
                print(
                    f"\n== end to end: storescu -> cxr-listen -> Redis -> cxr-worker (1 process, "
                    f"{args.device}, explain={args.explain}, model.batch_size={size}, "
                    f"checkpoint {checkpoint.name}) -> Orthanc"
                )
                n_single = args.e2e_single if i == 0 else 0
                e2e = bench_e2e(
                    args, work, files, server.url, checkpoint, batch_size=size, n_single=n_single
                )
                runs[size] = report_e2e(e2e)
        finally:
            server.stop()
    figures: dict[str, Any] = {"receive": recv, "e2e": runs}
    if len(runs) > 1:
        first, last = args.batch_sizes[0], args.batch_sizes[-1]
        ratio = runs[last]["burst_throughput_img_s"] / runs[first]["burst_throughput_img_s"]
        figures["burst_throughput_ratio"] = ratio
        print(
            f"\nburst throughput ratio batch_size {last} / batch_size {first} = {ratio:.2f} "
            "(same run, same machine)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
