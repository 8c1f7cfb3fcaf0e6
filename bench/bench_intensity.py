"""Window/level and bit-depth robustness: the same real radiographs as differently stored DICOM.

For N real test-split images (default 50, both sources, taken in split order) every variant of
``tests.support.intensity_variants`` (full range, 1-99 % window, 5-95 % window, gamma 0.7,
gamma 1.4, 12- vs 16-bit storage; plus 10-90 % and 20-80 % windows, harsher than any of
those, to show where the invariance ends) is written as a real DICOM file, read back through
the real ingest path (decode, modality/VOI LUT) and scored by the model. The table gives, per
variant, the median and largest |delta p| against the full-range 16-bit reference, and how many
decisions at the card's threshold flip. Pass several checkpoints to compare them on the very
same files.

    PYTHONPATH=. .venv/bin/python bench/bench_intensity.py --images 50 \\
        --checkpoint cxr_pipeline/model/packaged/default.pt --checkpoint old.pt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a script run from anywhere; tests never do this
    sys.path.insert(0, str(REPO_ROOT))

from cxr_pipeline.dicom.ingest import load_picture  # noqa: E402
from cxr_pipeline.model.architectures import default_checkpoint_path  # noqa: E402
from cxr_pipeline.model.inference import Predictor  # noqa: E402
from tests.support.intensity_variants import (  # noqa: E402
    BEYOND_CLIP,
    REFERENCE,
    VARIANTS,
    ingest_variants,
)
from training.datasets import read_manifest, resolve  # noqa: E402


def _pick(split: Path, n: int) -> list[Path]:
    data = Path(os.environ.get("CXR_DATASET_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr"))
    test = [s for s in read_manifest(split) if s.split == "test"]
    by_source: dict[str, list[Path]] = {}
    for s in test:
        by_source.setdefault(s.source, []).append(resolve(s, data))
    picked: list[Path] = []
    while len(picked) < n and any(by_source.values()):  # alternate the sources
        for paths in by_source.values():
            if paths and len(picked) < n:
                picked.append(paths.pop(0))
    return picked


def main() -> int:
    """Run the benchmark and print one table per checkpoint."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--split", type=Path, default=REPO_ROOT / "docs" / "model" / "split.csv")
    p.add_argument("--checkpoint", type=Path, action="append")
    p.add_argument("--max-side", type=int, default=1024,
                   help="area-downsample larger pictures first (keeps files small)")
    args = p.parse_args()
    checkpoints = args.checkpoint or [default_checkpoint_path()]
    predictors = [Predictor.from_checkpoint(c, device="cpu") for c in checkpoints]
    paths = _pick(args.split, args.images)
    console = Console()
    names = [*VARIANTS, *BEYOND_CLIP]
    scores: list[dict[str, list[float]]] = [{v: [] for v in names} for _ in predictors]
    start = time.perf_counter()
    for path in paths:
        pixels = load_picture(path)
        if max(pixels.shape) > args.max_side:
            from cxr_pipeline.dicom.decode import area_downsample

            pixels = area_downsample(pixels, args.max_side)
        variants = ingest_variants(pixels, beyond_clip=True)
        for k, pred in enumerate(predictors):
            probs = pred.predict_images([variants[v] for v in names])
            for v, prob in zip(names, probs, strict=True):
                scores[k][v].append(float(prob))
    seconds = time.perf_counter() - start
    for pred, table_scores, path in zip(predictors, scores, checkpoints, strict=True):
        card = pred.card
        ref = np.array(table_scores[REFERENCE])
        table = Table(title=f"{card.name} {card.version} ({path.name}), "
                            f"intensity step '{card.preprocessing.intensity}', "
                            f"{len(paths)} real images")
        for col in ("variant", "median |dp|", "max |dp|", "decisions flipped"):
            table.add_column(col, justify="right" if col != "variant" else "left")
        worst = 0.0
        for v in names:
            if v == REFERENCE:
                continue
            dp = np.abs(np.array(table_scores[v]) - ref)
            flips = int(np.sum((np.array(table_scores[v]) >= card.threshold)
                               != (ref >= card.threshold)))
            if v in VARIANTS:
                worst = max(worst, float(dp.max()))
            label = v if v in VARIANTS else f"{v} (beyond the issue's set)"
            table.add_row(label, f"{statistics.median(dp):.2g}", f"{dp.max():.2g}",
                          f"{flips}/{len(paths)}")
        console.print(table)
        console.print(f"max |dp| over the issue's variants: {worst:.2g} "
                      f"({'meets' if worst <= 0.05 else 'misses'} the 0.05 target)")
    console.print(f"{len(paths)} images x {len(VARIANTS)} DICOM variants x "
                  f"{len(predictors)} model(s) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
