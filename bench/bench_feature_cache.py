"""Frozen-backbone training: naive loop versus head training on cached features.

Trains the paper's recipe (frozen backbone, last layer only, SGD + StepLR, no per-epoch
augmentation) twice on the same real images, once running the backbone every step and
once on features computed once, checks that both give the same weights, and prints the
median wall time of each and the speed-up, measured in this one run.

    .venv/bin/python bench/bench_feature_cache.py --architecture resnet18 --images 32 \
        --epochs 10 --repeats 3

Needs the shared data (``CXR_DATASET_DIR`` or ``../shared/data/cxr``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.datasets import COVID, NON_COVID, read_manifest
from training.train import TrainConfig, run_training


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--architecture", default="squeezenet1_1")
    p.add_argument("--images", type=int, default=32, help="training images (half COVID)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    data = Path(
        os.environ.get(
            "CXR_DATASET_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
        )
    )
    pool = read_manifest(data / "manifest.csv")
    half = args.images // 2
    covid = [s for s in pool if s.label == COVID][:half]
    non = [s for s in pool if s.label == NON_COVID][:half]
    train = [replace(s, split="train") for s in covid[:-2] + non[:-2]]
    val = [replace(s, split="val") for s in covid[-2:] + non[-2:]]
    cfg = TrainConfig(
        architecture=args.architecture,
        weights=None,
        freeze_backbone=True,
        augment=False,
        epochs=args.epochs,
        crop=args.crop,
        resize=round(args.crop * 256 / 224),
        threads=args.threads,
    )
    times: dict[bool, list[float]] = {False: [], True: []}
    states = {}
    for _ in range(args.repeats):
        for cached in (False, True):
            start = time.perf_counter()
            result = run_training(
                train, val, data, replace(cfg, feature_cache=cached), progress=False
            )
            times[cached].append(time.perf_counter() - start)
            states[cached] = result.model.state_dict()
    same = all(
        torch.allclose(states[False][k].float(), states[True][k].float(), atol=1e-5)
        for k in states[False]
    )
    naive, cached_t = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{args.architecture}, {len(train)} train + {len(val)} val images, "
        f"{args.epochs} epochs, {args.crop} px, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats (wall time includes decoding the images)"
    )
    print(f"naive loop      median {naive:8.2f} s  {[round(t, 2) for t in times[False]]}")
    print(f"feature cache   median {cached_t:8.2f} s  {[round(t, 2) for t in times[True]]}")
    print(f"speed-up {naive / cached_t:.2f}x; same weights (atol 1e-5): {same}")


if __name__ == "__main__":
    main()
