"""Ingest speed per transfer syntax: read + header checks + decode + Modality/VOI + polarity.

For each input and transfer syntax, times :func:`cxr_pipeline.dicom.ingest.load_radiograph` on
the encoded bytes held in memory (so disk speed does not count), at full resolution and
with ``max_side`` (default 512, the fast path for inference), and prints the medians and
their ratio in one table, all measured in the same run.

Inputs (real pixels, re-encoded with tests/support/dicom_factory.py):

* ``RG1``: pydicom-data's 1955x1841 15-bit MONOCHROME1 chest CR, the original files
  (``RG1_UNCR``, ``RG1_J2KR``, ``RG1_J2KI``) plus re-encodings in the other lossless
  syntaxes (JPEG Baseline/Extended cannot hold 15 bits);
* ``NIH``: a 1024x1024 NIH ChestX-ray8 PNG as 8-bit DICOM in every syntax the factory
  makes (needs the shared data folder, ``$CXR_DATASET_DIR``).

Usage::

    .venv/bin/python bench/bench_decode.py [--repeats 5] [--max-side 512] [--quick]

The machine may be shared with other work: the figures are a snapshot; compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a script run from anywhere; tests never do this
    sys.path.insert(0, str(REPO_ROOT))

from cxr_pipeline.dicom.ingest import load_radiograph  # noqa: E402
from cxr_pipeline.settings import IngestSettings  # noqa: E402
from tests.support.dicom_factory import (  # noqa: E402
    ALL_TRANSFER_SYNTAXES,
    DCMTK_TRANSFER_SYNTAXES,
    dcmtk_available,
    encode,
    load_png,
    make_dicom,
    to_bytes,
)

QUICK_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEGBaseline8Bit,
)


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: imports, plugin discovery, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _inputs(quick: bool) -> list[tuple[str, str, bytes]]:
    """(image name, transfer syntax, Part 10 bytes) for every benchmark row."""
    from pydicom.data import get_testdata_file

    syntaxes = QUICK_SYNTAXES if quick else ALL_TRANSFER_SYNTAXES
    if not dcmtk_available():
        syntaxes = tuple(s for s in syntaxes if s not in DCMTK_TRANSFER_SYNTAXES)
    rows: list[tuple[str, str, bytes]] = []

    rg1_path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if rg1_path is not None:
        rg1 = pydicom.dcmread(rg1_path)
        originals = {
            uid.ExplicitVRLittleEndian: "RG1_UNCR.dcm",
            uid.JPEG2000Lossless: "RG1_J2KR.dcm",
            uid.JPEG2000: "RG1_J2KI.dcm",
        }
        for syntax in syntaxes:
            if syntax in originals:
                found = get_testdata_file(originals[syntax], download=False)
                if found is not None:
                    rows.append(("RG1 1955x1841 15-bit", syntax, Path(str(found)).read_bytes()))
                continue
            if syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
                continue  # 15-bit data does not fit these processes
            rows.append(("RG1 1955x1841 15-bit", syntax, to_bytes(encode(rg1, syntax))))
    else:
        print("pydicom-data not installed: RG1 rows skipped")

    data_dir = Path(os.environ.get("CXR_DATASET_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr"))
    pngs = sorted((data_dir / "images" / "nih").glob("*.png"))
    if pngs:
        pixels = load_png(pngs[0], size=None)
        stored = np.rint(pixels * 255).astype(np.uint8)
        for syntax in syntaxes:
            ds = make_dicom(stored, bits_stored=8, transfer_syntax=syntax)
            rows.append(("NIH 1024x1024 8-bit", syntax, to_bytes(ds)))
    else:
        print(f"no NIH PNGs under {data_dir}: NIH rows skipped")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a few syntaxes, 3 repeats")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    policy = IngestSettings()

    table = Table(title=f"load_radiograph median of {repeats} (ms), in-memory Part 10 bytes")
    columns = ("image", "transfer syntax", "MiB", "full", f"max_side={args.max_side}")
    for column in (*columns, "full/fast", "out shape (fast)"):
        left = column in ("image", "transfer syntax")
        table.add_column(column, justify="left" if left else "right")
    for name, syntax, data in _inputs(args.quick):
        full = _median_ms(lambda d=data: load_radiograph(io.BytesIO(d), policy), repeats)
        fast_image = load_radiograph(io.BytesIO(data), policy, max_side=args.max_side)
        fast = _median_ms(
            lambda d=data: load_radiograph(io.BytesIO(d), policy, max_side=args.max_side),
            repeats,
        )
        table.add_row(
            name,
            uid.UID(syntax).keyword,
            f"{len(data) / 2**20:.2f}",
            f"{full:.1f}",
            f"{fast:.1f}",
            f"{full / fast:.2f}",
            "x".join(str(n) for n in fast_image.pixels.shape),
        )
    Console(width=160).print(table)
    print(f"CPU cores: {os.cpu_count()}; the machine may be shared, compare ratios in one run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
