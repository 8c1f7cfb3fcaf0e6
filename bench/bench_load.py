"""Load benchmark: concurrent associations into one ``cxr-listen``, results to Orthanc.

Run from the repository root::

    .venv/bin/python -m bench.bench_load                       # 4 x 100, explain none
    .venv/bin/python -m bench.bench_load --explain gradcam --per-association 25

Builds ``associations x per_association`` distinct 12-bit CR chest DICOMs (Explicit VR
LE, longest side ``--size`` px) from real NIH ChestX-ray8 PNGs of the shared data
folder, with a seeded untrained SqueezeNet 1.1 checkpoint (no download). Starts a real
Orthanc and ``cxr-listen`` (embedded workers, ``worker.concurrency`` 2) as subprocesses;
each association is one pynetdicom SCU thread sending its images back to back. Waits
until every acknowledged image is DONE in the ledger with its SR and SC in Orthanc, then
prints: accepted / processed counts, throughput (DONE images per second from the first
send to the last DONE), send-to-DONE latency median / p95 / max, and the listener's RSS
at start, the peak sampled every 0.2 s during the run and the kernel's VmHWM.

Everything runs on this machine; note its core count and load in what you report.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from tests.reliability.harness import Pacs
from tests.reliability.load import run_load

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pngs() -> list[Path]:
    env = os.environ.get("CXR_DATASET_DIR")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cxr"
    pngs = sorted((root / "images" / "nih").glob("*.png"))[:8]
    if not pngs:
        raise SystemExit(f"no NIH PNGs under {root} (set CXR_DATASET_DIR)")
    return pngs


def _checkpoint(folder: Path) -> Path:
    import torch

    from cxr_pipeline.model.architectures import build_model, save_checkpoint
    from cxr_pipeline.model.card import ModelCard

    torch.manual_seed(0)
    card = ModelCard(
        name="bench-squeezenet1_1",
        version="0.0.1-bench",
        architecture="squeezenet1_1",
        device_uid="2.25.161803398874989484820458683436563811772",
        threshold=0.5,
        training_data="untrained, seeded weights for benchmarks",
    )
    path = folder / "bench.pt"
    save_checkpoint(path, build_model("squeezenet1_1", weights=None), card)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_load", description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--per-association", type=int, default=100)
    parser.add_argument("--size", type=int, default=384, help="longest side of each image")
    parser.add_argument("--explain", choices=["none", "gradcam"], default="none")
    parser.add_argument("--checkpoint", type=Path, help="default: seeded squeezenet1_1")
    args = parser.parse_args(argv)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores,"
        f" load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="cxr-bench-load-") as folder:
        work = Path(folder)
        checkpoint = args.checkpoint or _checkpoint(work)
        pacs = Pacs(work / "orthanc", {})
        pacs.start()
        try:
            result = run_load(
                work / "run",
                pacs=pacs,
                checkpoint=checkpoint,
                pngs=_pngs(),
                associations=args.associations,
                per_association=args.per_association,
                size=args.size,
                explain=args.explain,
                timeout_s=3600,
            )
        finally:
            pacs.stop()
    print(
        f"{args.associations} associations x {args.per_association} images,"
        f" {args.size} px, explain {args.explain}"
    )
    for line in result.lines():
        print(line)
    row = result.tally_row
    print(
        f"invariant: delivered {row['delivered']}, failed with reason"
        f" {row['failed_with_reason']}, lost {row['lost']}, duplicates {row['duplicates']}"
    )
    ok = result.accepted == result.sent == result.done and row["lost"] == 0
    return 0 if ok and row["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
