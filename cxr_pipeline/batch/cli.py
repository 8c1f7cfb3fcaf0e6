"""``cxr-batch``: classify folders of DICOM radiographs (or pictures) retrospectively.

Example::

    cxr-batch /data/archive --out runs/2020-06 --write-sr --write-sc --workers 2

writes ``runs/2020-06/results.csv`` and ``results.jsonl`` (one row per file) and the SR and
heatmap SC of each chest radiograph under ``runs/2020-06/<study>/<series>/``. Running the
same command again does only what is missing. Exit status: 0 done, 2 bad options or
settings, 130 interrupted (Ctrl-C; the report stays valid).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cxr_pipeline.batch import FORK_SERVER_PRELOAD
from cxr_pipeline.batch.report import Row, Status, Summary
from cxr_pipeline.errors import ConfigError, CxrError
from cxr_pipeline.settings import load_settings, parse_destination

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ``cxr-batch``."""
    parser = argparse.ArgumentParser(
        prog="cxr-batch",
        description="Classify every chest radiograph under the given files and folders.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    parser.add_argument("--config", type=Path, help="TOML settings file (default $CXR_CONFIG)")
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (default: packaged)")
    parser.add_argument(
        "--site-profile",
        type=Path,
        metavar="FILE",
        help="site profile TOML (cxr-validate --fit-site-profile): its calibration and "
        "threshold decide instead of the model card's",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        help="forward-pass compute type (bfloat16: about 2x faster on CPUs with AVX-512 BF16)",
    )
    parser.add_argument("--write-sr", action="store_true", help="write a TID 1500 SR per image")
    parser.add_argument("--write-sc", action="store_true", help="write a heatmap SC per image")
    parser.add_argument("--heatmaps", action="store_true", help="compute heatmaps")
    parser.add_argument("--send", metavar="AE@HOST:PORT", help="C-STORE written objects here")
    parser.add_argument("--workers", type=int, help="decode processes (default: CPU cores)")
    parser.add_argument("--batch-size", type=int, help="images per model forward pass")
    parser.add_argument("--retry-failed", action="store_true", help="redo files that failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


class _RateColumn(ProgressColumn):
    """Images per second, from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="cyan")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if args.checkpoint is not None:
        model["checkpoint"] = str(args.checkpoint)
    if args.precision is not None:
        model["precision"] = args.precision
    if args.site_profile is not None:
        model["site_profile"] = str(args.site_profile)
    if model:
        overrides["model"] = model
    batch: dict[str, Any] = {}
    if args.workers is not None:
        batch["decode_workers"] = args.workers
    if args.batch_size is not None:
        batch["batch_size"] = args.batch_size
    if args.retry_failed:
        batch["retry_failed"] = True
    if batch:
        overrides["batch"] = batch
    return overrides


def summary_table(summary: Summary) -> Table:
    """Render the end-of-run summary as a rich table."""
    table = Table(title="cxr-batch summary", show_header=False)
    for status in Status:
        table.add_row(status.value, str(summary.counts.get(status.value, 0)))
    table.add_row("positives", str(summary.positives))
    table.add_row("already done (resumed)", str(summary.already_done))
    table.add_row("images/s", f"{summary.images_per_s:.2f}")
    table.add_row("wall time", f"{summary.wall_s:.1f} s")
    if summary.decoder_restarts:
        table.add_row("decoder restarts", str(summary.decoder_restarts))
    if summary.interrupted:
        table.add_row("interrupted", "yes: run again to resume")
    return table


def start_fork_server(start_method: str) -> None:
    """Start the decode processes' fork server now, so its imports overlap with ours."""
    if start_method != "forkserver":
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    forkserver.ensure_running()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-batch``; returns the exit status."""
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        if args.workers is not None and args.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        for path in args.inputs:
            if not path.exists():
                raise ConfigError(f"input {path} is neither a file nor a folder")
        settings = load_settings(args.config, **_overrides(args))
        start_fork_server(settings.batch.start_method)
        from cxr_pipeline.batch.runner import BatchOptions, run_batch

        options = BatchOptions(
            write_sr=args.write_sr,
            write_sc=args.write_sc,
            heatmaps=args.heatmaps,
            send=parse_destination(args.send) if args.send else None,
        )
        if options.send is not None and not (options.write_sr or options.write_sc):
            raise ConfigError("--send needs --write-sr and/or --write-sc")
        progress = Progress(
            TextColumn("[bold]cxr-batch"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            disable=args.no_progress,
        )
        task = progress.add_task("files", total=None)

        def on_start(todo: int, already: int) -> None:
            progress.update(task, total=todo)
            if already:
                err.print(f"resuming: {already} files already done, {todo} to do")

        def on_row(row: Row) -> None:
            progress.advance(task)

        with progress:
            summary = run_batch(
                args.inputs, args.out, settings, options, on_start=on_start, on_row=on_row
            )
    except CxrError as exc:
        err.print(f"cxr-batch: {exc}", soft_wrap=True, highlight=False, markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run loop started: nothing half-written
        err.print("cxr-batch: interrupted")
        return EXIT_INTERRUPTED
    Console().print(summary_table(summary))
    return EXIT_INTERRUPTED if summary.interrupted else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
