"""Start-up of ``python -m cxr_pipeline FILE``: wall time of whole runs, in one sitting.

Each run is a fresh process (as a user or a script calls it) on a 1024 px chest CR: import,
model load, ingest, inference, Grad-CAM, SR + SC encoding, writing, interpreter exit. With
``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/before <commit>``) the two
checkouts run alternately, A B A B ..., so both see the same machine load, and the ratio of
the medians is printed. ``import cxr_pipeline.pipeline`` is timed as well, inside a fresh
process of its own (the import alone, without interpreter start and exit).

Usage::

    .venv/bin/python bench/bench_startup.py [--runs 7] [--baseline /tmp/before]
        [--file path/to/chest.dcm]

The machine may be shared with other work: run it when it is quiet, read medians, and
compare the ratio rather than single figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = "dicom/rsna_cr_ap_jpeg_baseline.dcm"  # in the shared dataset folder
IMPORT_ONLY = (
    "import time; start = time.perf_counter(); import cxr_pipeline.pipeline; "
    "print(time.perf_counter() - start)"
)


def _data_dir() -> Path:
    env = os.environ.get("CXR_DATASET_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "cxr"


def _python(repo: Path) -> str:
    """The checkout's own interpreter, or this one when it has no .venv."""
    candidate = repo / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(repo))
    env.pop("CXR_CONFIG", None)  # the packaged defaults, as on a fresh install
    return env


def run_file(repo: Path, file: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of one ``python -m cxr_pipeline FILE --out TMP`` and its stage timings."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run(
            [_python(repo), "-m", "cxr_pipeline", str(file), "--out", out],
            cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{repo}: exit {done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}")
    stages = json.loads(done.stdout).get("timings_ms", {})
    return seconds, {k: float(v) for k, v in stages.items()}


def run_import(repo: Path) -> float:
    """Seconds ``import cxr_pipeline.pipeline`` takes in a fresh process (measured inside it)."""
    done = subprocess.run(
        [_python(repo), "-c", IMPORT_ONLY],
        cwd=repo, env=_env(repo), check=True, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def _summary(label: str, walls: list[float]) -> str:
    return (
        f"{label:<34} median {statistics.median(walls):5.2f} s   "
        f"min {min(walls):5.2f}   max {max(walls):5.2f}   (n={len(walls)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--file", type=Path, default=None, help="chest DICOM (default: RSNA CR)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    args = parser.parse_args()
    file = args.file or _data_dir() / DEFAULT_FILE
    repos = {"this checkout": REPO}
    if args.baseline is not None:
        repos["baseline " + str(args.baseline)] = args.baseline.resolve()
    print(f"python -m cxr_pipeline {file.name}: {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    walls: dict[str, list[float]] = {name: [] for name in repos}
    imports: dict[str, list[float]] = {name: [] for name in repos}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in repos}
    for repo in repos.values():  # one unmeasured run each: page cache, .pyc files
        run_file(repo, file)
    for _ in range(args.runs):
        for name, repo in repos.items():
            seconds, timing = run_file(repo, file)
            walls[name].append(seconds)
            stages[name].append(timing)
            imports[name].append(run_import(repo))
    for name in repos:
        print(_summary(f"{name}: whole run", walls[name]))
        print(_summary(f"{name}: import pipeline", imports[name]))
        keys = stages[name][0].keys()
        medians = {k: statistics.median(s[k] for s in stages[name]) for k in keys}
        print("    stage medians (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items()))
    if args.baseline is not None:
        this, base = (statistics.median(w) for w in walls.values())
        print(f"baseline / this checkout (median whole run): {base / this:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
