"""Inference and heatmap cost per architecture, measured in one run.

(1) ms/image of ``Predictor.predict_tensors`` for each of the paper's four architectures,
    at batch 1 and batch 16, channels-last versus contiguous (NCHW) memory format;
    median of ``--repeats`` timed runs after one warm-up; ratio NCHW / channels-last.
(2) ms/image of the two heatmaps on one real NIH radiograph (squeezenet1_1 and resnet18 by
    default): Grad-CAM (one forward + backward on a cached model copy) versus occlusion
    (patch 32, stride 16 over 224 px: 169 occluded forwards, batched); ratio
    occlusion / Grad-CAM.

Untrained weights (``weights=None``): speed does not depend on the weight values, and
nothing is downloaded. Usage::

    .venv/bin/python bench/bench_inference.py [--device cpu] [--repeats 5]

The machine may be shared with other work: read the figures as a snapshot and compare
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a script run from anywhere; the tests never do this
    sys.path.insert(0, str(REPO))

from cxr_pipeline.explain.gradcam import gradcam  # noqa: E402
from cxr_pipeline.explain.occlusion import occlusion  # noqa: E402
from cxr_pipeline.model.architectures import ARCHITECTURES, build_model  # noqa: E402
from cxr_pipeline.model.card import ModelCard  # noqa: E402
from cxr_pipeline.model.inference import Predictor  # noqa: E402
from cxr_pipeline.model.preprocess import preprocess  # noqa: E402


def _median_s(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator, oneDNN/cuDNN algorithm choice, Grad-CAM model copy)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _card(architecture: str) -> ModelCard:
    return ModelCard(
        name=f"bench-{architecture}", version="0", architecture=architecture, device_uid="2.25.1"
    )


def _real_image() -> np.ndarray:
    data = Path(os.environ.get("CXR_DATASET_DIR", REPO.parent / "shared" / "data" / "cxr"))
    pngs = sorted((data / "images" / "nih").glob("*.png"))
    if pngs:
        from cxr_pipeline.dicom.ingest import load_picture

        return load_picture(pngs[0])
    print(f"(no NIH PNG under {data}: heatmaps timed on a random image)")
    return np.random.default_rng(0).random((1024, 1024), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--heatmap-archs", nargs="*", default=["squeezenet1_1", "resnet18"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # MONAI's deprecation chatter

    torch.manual_seed(0)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"bench_inference: device {device}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"median of {args.repeats} after a warm-up"
    )

    print("\n(1) forward pass, ms/image (224 px input): the default (channels-last, batch norms")
    print("    folded) against channels-last unfolded and plain NCHW eager")
    variants = {"default": (True, True), "CL unfolded": (True, False), "NCHW": (False, False)}
    header = (
        f"{'architecture':<14} {'batch':>5} "
        + " ".join(f"{name:>12}" for name in variants)
        + f" {'unfolded/def':>12} {'NCHW/def':>9}"
    )
    print(header)
    print("-" * len(header))
    for arch in args.archs:
        model = build_model(arch, weights=None)
        for batch_size in args.batch_sizes:
            batch = torch.randn(batch_size, 3, 224, 224)
            # One predictor per variant on its own copy of the weights, timed alternately
            # so that load from other processes affects every variant alike.
            predictors = {
                name: Predictor(
                    copy.deepcopy(model),
                    _card(arch),
                    device=str(device),
                    channels_last=layout,
                    fold_batch_norm=fold,
                    batch_size=batch_size,
                )
                for name, (layout, fold) in variants.items()
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for predictor in predictors.values():
                predictor.predict_tensors(batch)  # warm-up
            for _ in range(args.repeats):
                for name, predictor in predictors.items():
                    start = time.perf_counter()
                    predictor.predict_tensors(batch)
                    sync()
                    times[name].append(time.perf_counter() - start)
            per_image = {k: 1000.0 * statistics.median(v) / batch_size for k, v in times.items()}
            base = per_image["default"]
            print(
                f"{arch:<14} {batch_size:>5} "
                + " ".join(f"{per_image[name]:>12.1f}" for name in variants)
                + f" {per_image['CL unfolded'] / base:>12.2f} {per_image['NCHW'] / base:>9.2f}"
            )
        del model

    print("\n(2) heatmap, ms/image (one real NIH radiograph, 1024 px, preprocessed once)")
    header = f"{'architecture':<14} {'Grad-CAM':>10} {'occlusion':>10} {'occl/GC':>8}"
    print(header)
    print("-" * len(header))
    pixels = _real_image()
    for arch in args.heatmap_archs:
        predictor = Predictor(build_model(arch, weights=None), _card(arch), device=str(device))
        tensor = preprocess(pixels, predictor.card.preprocessing)
        cam_s = _median_s(lambda p=predictor, t=tensor: gradcam(p, t), args.repeats, sync)
        occ_s = _median_s(
            lambda p=predictor, t=tensor: occlusion(p, t, patch=32, stride=16, batch=64),
            max(1, args.repeats // 2),
            sync,
        )
        print(f"{arch:<14} {1000 * cam_s:>10.0f} {1000 * occ_s:>10.0f} {occ_s / cam_s:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
