"""cxr-batch throughput against a per-image loop and against its own parts, in one run.

On the same files and the same model (untrained resnet18 by default, weights=None: speed
does not depend on the weights):

(a) cxr-batch: ``run_batch`` (decode processes + batched inference in the main process),
    timed on a warm process pool (a cold start is printed too);
(b) a per-image loop in the style of the Deep-COVID authors' ``Inference.py``: read,
    decode at full resolution, transform, forward one image at a time;
(c) bare eager forward on pre-decoded tensors at the same batch size (all cores);
(d) decode + preprocess alone with the same number of processes;
e = 1 / (1/c + 1/d): what a perfect serial split of the machine between (c) and (d) gives.
With ``--precision bfloat16``, (c') and e' repeat (c) and e with the forward pass in
bfloat16 too, so a/e' compares cxr-batch with the bound of its own compute type.

Inputs: (1) full-size DICOM radiographs in a realistic mix of transfer syntaxes (real RG1
16-bit CR uncompressed and JPEG 2000, NIH 1024 px images wrapped as 12-16 bit native,
JPEG 2000, JPEG-LS and 8-bit JPEG baseline), generated into a temporary folder; (2) the
shared NIH 1024 px PNGs. Prints images/s and the ratios a/b and a/e for each.

Usage::

    .venv/bin/python bench/bench_batch.py [--arch resnet18] [--images 48] [--workers 2]
        [--precision bfloat16] [--rounds 3]

The machine may be shared with other work: run it when it is quiet, and read the
figures as a snapshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a script run from anywhere; the tests never do this
    sys.path.insert(0, str(REPO))

from cxr_pipeline.batch.decode import DecodeJob, decode_file  # noqa: E402
from cxr_pipeline.batch.runner import (  # noqa: E402
    BatchOptions,
    decode_pool,
    model_threads,
    run_batch,
)
from cxr_pipeline.batch.walker import InputFile, walk  # noqa: E402
from cxr_pipeline.dicom.ingest import load_picture, load_radiograph  # noqa: E402
from cxr_pipeline.model.architectures import build_model  # noqa: E402
from cxr_pipeline.model.card import ModelCard  # noqa: E402
from cxr_pipeline.model.inference import Predictor  # noqa: E402
from cxr_pipeline.model.preprocess import preprocess  # noqa: E402
from cxr_pipeline.settings import Settings, load_settings  # noqa: E402


def _data_dir() -> Path:
    env = os.environ.get("CXR_DATASET_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "cxr"


def make_dicom_mix(folder: Path, count: int) -> None:
    """Write ``count`` full-size DICOM radiographs in a mix of transfer syntaxes."""
    from pydicom import uid
    from pydicom.data import get_testdata_file

    from tests.support import dicom_factory as factory

    rg1 = [get_testdata_file(n, download=False) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    nih = sorted((_data_dir() / "images" / "nih").glob("*.png"))
    mixes: list[tuple[str, int, str]] = [
        (uid.ExplicitVRLittleEndian, 12, "MONOCHROME2"),
        (uid.JPEG2000Lossless, 16, "MONOCHROME1"),
        (uid.JPEGLSLossless, 12, "MONOCHROME2"),
        (uid.JPEGBaseline8Bit, 8, "MONOCHROME2"),
    ]
    written = 0
    # One real RG1 (1955x1841, 16-bit) in every 8 files, alternating native / J2K.
    for index in range(count):
        target = folder / f"img{index:04d}.dcm"
        if index % 8 == 7 and all(rg1):
            shutil.copyfile(str(rg1[(index // 8) % 2]), target)
        else:
            syntax, bits, photometric = mixes[index % len(mixes)]
            pixels = factory.load_png(nih[index % len(nih)], size=None)
            ds = factory.make_dicom(
                pixels,
                modality="DX" if index % 2 else "CR",
                photometric=photometric,  # type: ignore[arg-type]
                bits_stored=bits,
                transfer_syntax=syntax,
            )
            factory.write(ds, target)
        written += 1
    megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"  wrote {written} DICOM files ({megabytes:.0f} MB)")


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_batch(files: Path, settings: Settings, predictor: Predictor, out: Path) -> float:
    """(a): images/s of one run_batch into a fresh output folder."""
    start = time.perf_counter()
    summary = run_batch([files], out, settings, BatchOptions(), predictor=predictor)
    seconds = time.perf_counter() - start
    bad = {k: v for k, v in summary.counts.items() if k != "done"}
    if bad:
        raise SystemExit(f"benchmark files not all classified: {bad} {summary.rows[:2]}")
    return rate(summary.classified, seconds)


def bench_loop(
    items: list[InputFile], predictor: Predictor, settings: Settings, picture: bool
) -> float:
    """(b): one image at a time, full-resolution decode, batch of one."""
    spec = predictor.card.preprocessing
    start = time.perf_counter()
    for item in items:
        if picture:
            pixels = load_picture(item.path)
        else:
            pixels = load_radiograph(item.path, settings.ingest).pixels
        tensor = preprocess(pixels, spec).unsqueeze(0)
        predictor.predict_tensors(tensor)
    return rate(len(items), time.perf_counter() - start)


def bench_forward(
    tensors: torch.Tensor, predictor: Predictor, batch_size: int, repeat: int = 3
) -> float:
    """(c): forward passes only, on pre-decoded tensors, at the batch size (median)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for first in range(0, len(tensors), batch_size):
            predictor.predict_tensors(tensors[first : first + batch_size])
        times.append(time.perf_counter() - start)
    return rate(len(tensors), statistics.median(times))


def bench_decode(
    jobs: list[DecodeJob], settings: Settings, workers: int
) -> tuple[float, torch.Tensor]:
    """(d): decode + preprocess alone in ``workers`` warm processes; returns the tensors."""
    executor: ProcessPoolExecutor = decode_pool(settings, workers)
    try:
        list(executor.map(decode_file, jobs[: workers * 2]))  # warm the processes
        start = time.perf_counter()
        results = list(executor.map(decode_file, jobs, chunksize=1))
        seconds = time.perf_counter() - start
    finally:
        executor.shutdown()
    tensors = [r.tensor for r in results if r.tensor is not None]
    if len(tensors) != len(jobs):
        raise SystemExit("decode failed on benchmark files")
    return rate(len(jobs), seconds), torch.from_numpy(np.stack(tensors))


def run_input(
    label: str,
    files: Path,
    predictor: Predictor,
    reference: Predictor,
    settings: Settings,
    out: Path,
    picture: bool,
    rounds: int,
) -> dict[str, float]:
    """Measure (a) with ``predictor``; (b) and (c) with the float32 ``reference``.

    The first run of (a) is the cold start (a fresh fork server when none runs yet).
    Then ``rounds`` rounds each measure (a) on a warm fork server, (b), (d), (c) [and
    (c')] back to back; the figures printed are medians over the rounds, and each ratio
    is the median of its per-round values (numerator and denominator measured minutes
    apart would mostly measure the machine's drift).
    """
    items = list(walk([files]))
    workers = settings.batch.decode_workers
    max_side = settings.batch.decode_max_side or None
    spec = predictor.card.preprocessing
    fit_model = settings.batch.decode_max_side is None
    jobs = [
        DecodeJob(item=i, ingest=settings.ingest, spec=spec, max_side=max_side, fit_model=fit_model)
        for i in items
    ]
    default_threads = torch.get_num_threads()
    batch_size = settings.batch.batch_size
    own = predictor.precision != reference.precision

    a_cold = bench_batch(files, settings, predictor, out / label / "cold")
    per_round: list[dict[str, float]] = []
    for index in range(rounds):
        figures = {"a": bench_batch(files, settings, predictor, out / label / f"warm{index}")}
        torch.set_num_threads(default_threads)
        figures["b"] = bench_loop(items, reference, settings, picture)
        figures["d"], tensors = bench_decode(jobs, settings, workers)
        figures["c"] = bench_forward(tensors, reference, batch_size)
        figures["e"] = 1.0 / (1.0 / figures["c"] + 1.0 / figures["d"])
        if own:
            # The same bound with the forward pass in (a)'s own precision: the fairer a/e.
            figures["c_own"] = bench_forward(tensors, predictor, batch_size)
            figures["e_own"] = 1.0 / (1.0 / figures["c_own"] + 1.0 / figures["d"])
        figures["a/b"] = figures["a"] / figures["b"]
        figures["a/e"] = figures["a"] / figures["e"]
        if own:
            figures["a/e'"] = figures["a"] / figures["e_own"]
            figures["c'/c"] = figures["c_own"] / figures["c"]
        per_round.append(figures)
    medians = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    medians["a_cold"] = a_cold
    print(
        f"\n{label}: {len(items)} images, {workers} decode processes, batch {batch_size}, "
        f"model threads in (a) {model_threads(settings, workers)}, in (b, c) "
        f"{default_threads}; (a) computes in {predictor.precision}, (b, c) in "
        f"{reference.precision}; medians of {rounds} rounds"
    )
    for key, text in (
        ("a", "(a) cxr-batch, warm fork server"),
        ("a_cold", "    cxr-batch, cold start (first run)"),
        ("b", "(b) per-image loop (Inference.py style)"),
        ("c", "(c) forward only, batched"),
        ("d", "(d) decode + preprocess only"),
        ("e", "    e = 1/(1/c + 1/d)"),
        ("c_own", f"(c') forward only, {predictor.precision}"),
        ("e_own", "    e' = 1/(1/c' + 1/d)"),
    ):
        if key in medians:
            spread = ""
            if key != "a_cold" and rounds > 1:
                values = [r[key] for r in per_round]
                spread = f"   ({min(values):.1f}-{max(values):.1f})"
            print(f"  {text:<42} {medians[key]:8.2f} images/s{spread}")
    ratios = [k for k in ("a/b", "a/e", "a/e'", "c'/c") if k in medians]
    print("  " + "   ".join(f"{k} = {medians[k]:5.2f}" for k in ratios))
    print(
        "    per round: "
        + "; ".join(" ".join(f"{k} {r[k]:.2f}" for k in ratios) for r in per_round)
    )
    print(f"  cold a/b = {a_cold / medians['b']:5.2f}")
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=48, help="images per input kind")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decode-max-side", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds (medians)")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16"),
        help="forward-pass compute type of cxr-batch (a); (b) and (c) stay float32 eager",
    )
    args = parser.parse_args()

    nih = sorted((_data_dir() / "images" / "nih").glob("*.png"))
    if len(nih) < 8:
        print(f"shared NIH images not found under {_data_dir()} (set CXR_DATASET_DIR)")
        return 1
    batch: dict[str, object] = {
        "decode_workers": args.workers,
        "batch_size": args.batch_size,
        "torch_threads": args.torch_threads,
    }
    if args.decode_max_side is not None:
        batch["decode_max_side"] = args.decode_max_side
    settings = load_settings(None, batch=batch)
    torch.manual_seed(0)
    card = ModelCard(
        name=f"bench-{args.arch}",
        version="0",
        architecture=args.arch,
        device_uid="2.25.1",
    )
    model = build_model(args.arch, weights=None)
    # (b) and (c) run the model as the authors' code does: eager, float32, nothing folded.
    reference = Predictor(
        model, card, device="cpu", batch_size=args.batch_size, fold_batch_norm=False
    )
    predictor = Predictor(
        model, card, device="cpu", batch_size=args.batch_size, precision=args.precision
    )
    decode_size = settings.batch.decode_max_side
    print(
        f"cxr-batch benchmark: {args.arch}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, decode_max_side "
        f"{'auto (fit the model input)' if decode_size is None else decode_size}"
    )
    with tempfile.TemporaryDirectory(prefix="cxr-bench-batch-") as tmp:
        root = Path(tmp)
        dicom = root / "dicom"
        dicom.mkdir()
        make_dicom_mix(dicom, args.images)
        png = root / "png"
        png.mkdir()
        for path in nih[: args.images]:
            (png / path.name).symlink_to(path)
        for label, folder, picture in (
            ("DICOM mix", dicom, False),
            ("NIH PNG 1024 px", png, True),
        ):
            run_input(
                label, folder, predictor, reference, settings, root / "out", picture, args.rounds
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
