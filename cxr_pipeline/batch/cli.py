"""``cxr-batch``: classify folders of DICOM radiographs (or pictures) retrospectively.

Example::

    cxr-batch /data/archive --out runs/2020-06 --write-sr --write-sc --workers 2

writes ``runs/2020-06/results.csv`` and ``results.jsonl`` (one row per file) and the SR and
heatmap SC of each chest radiograph under ``runs/2020-06/<study>/<series>/``. Running the
same command again does only what is missing.

Straight from a PACS (C-FIND, then C-GET or C-MOVE) or a DICOMweb archive (QIDO/WADO-RS)::

    cxr-batch --from-pacs PACS@10.0.0.5:104 --study-date 20200301-20200331 \
        --out runs/2020-03 --send PACS@10.0.0.5:104
    cxr-batch --from-dicomweb https://pacs/dicom-web --study-date 20200301 \
        --out runs/2020-03-01 --send-stow https://pacs/dicom-web

analyses the CR/DX series of the matching studies and writes (and sends) an SR and an SC
per image. A rerun queries again and does only the instances not yet reported, plus those
an earlier run could not retrieve or send.

Exit status: 0 done, 1 the PACS could not be queried, 2 bad options or settings, 3 some
images could not be retrieved or their results sent (run again to pick them up), 130
interrupted (Ctrl-C; the report stays valid).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from cxr_pipeline.errors import ConfigError, CxrError, QueryError
from cxr_pipeline.settings import Settings, load_settings, parse_destination, parse_dicomweb_url

if TYPE_CHECKING:
    from cxr_pipeline.batch.runner import BatchOptions

EXIT_OK = 0
EXIT_QUERY_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ``cxr-batch``."""
    parser = argparse.ArgumentParser(
        prog="cxr-batch",
        description="Classify every chest radiograph under the given files and folders, or "
        "every one a PACS query matches (--from-pacs, --from-dicomweb).",
    )
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    remote = parser.add_argument_group(
        "retrospective run from a PACS (instead of INPUT; writes an SR and a heatmap SC per "
        "image, as the listener does, unless --write-sr or --write-sc names what to write)"
    )
    remote.add_argument("--from-pacs", metavar="AE@HOST:PORT", help="query/retrieve over DICOM")
    remote.add_argument("--from-dicomweb", metavar="URL", help="QIDO-RS / WADO-RS base URL")
    remote.add_argument("--study-date", metavar="YYYYMMDD[-YYYYMMDD]", help="study date(s)")
    remote.add_argument(
        "--modality", nargs="+", metavar="MOD", help="series modalities (default: CR DX)"
    )
    remote.add_argument("--accession", help="accession number")
    remote.add_argument("--max-studies", type=int, help="most studies, oldest first")
    remote.add_argument(
        "--retrieve", choices=("get", "move"), help="C-GET (default) or C-MOVE to --move-dest"
    )
    remote.add_argument("--move-dest", metavar="AE", help="our C-MOVE destination AE title")
    remote.add_argument("--move-port", type=int, help="its port (default: batch.move_port)")
    remote.add_argument(
        "--max-concurrent-retrievals", type=int, metavar="N", help="series at once (default 1)"
    )
    remote.add_argument("--images-per-minute", type=float, metavar="R", help="retrieval limit")
    remote.add_argument(
        "--keep-retrieved", action="store_true", help="keep retrieved images in OUT/retrieved"
    )
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
    parser.add_argument("--send-stow", metavar="URL", help="STOW-RS written objects here")
    parser.add_argument("--workers", type=int, help="decode processes (default: CPU cores)")
    parser.add_argument("--batch-size", type=int, help="images per model forward pass")
    parser.add_argument("--retry-failed", action="store_true", help="redo files that failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


class _RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate (the task's ``unit``, default img)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "img")
        return Text(f"-- {unit}/s" if speed is None else f"{speed:.1f} {unit}/s", style="cyan")


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
    for option, key in (
        ("retrieve", "retrieve"),
        ("move_dest", "move_ae_title"),
        ("move_port", "move_port"),
        ("max_concurrent_retrievals", "max_concurrent_retrievals"),
        ("images_per_minute", "images_per_minute"),
    ):
        value = getattr(args, option)
        if value is not None:
            batch[key] = value
    if args.move_dest is not None and args.retrieve is None:
        batch["retrieve"] = "move"
    if args.keep_retrieved:
        batch["keep_retrieved"] = True
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


QUERY_KEYS = ("study_date", "modality", "accession", "max_studies")
REMOTE_ONLY = (
    *QUERY_KEYS,
    "retrieve",
    "move_dest",
    "move_port",
    "max_concurrent_retrievals",
    "images_per_minute",
)


def _check_args(args: argparse.Namespace) -> bool:
    """Check option combinations; return whether this is a PACS run."""
    remote = args.from_pacs is not None or args.from_dicomweb is not None
    if args.from_pacs is not None and args.from_dicomweb is not None:
        raise ConfigError("give --from-pacs or --from-dicomweb, not both")
    if remote and args.inputs:
        raise ConfigError("give INPUT files/folders or --from-pacs / --from-dicomweb, not both")
    if not remote and not args.inputs:
        raise ConfigError("give INPUT files/folders, --from-pacs or --from-dicomweb")
    if not remote:
        for name in REMOTE_ONLY:
            if getattr(args, name) is not None:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{option} needs --from-pacs or --from-dicomweb")
    if args.from_dicomweb is not None and (args.retrieve or args.move_dest):
        raise ConfigError("--retrieve / --move-dest are for --from-pacs (DICOM)")
    if args.send is not None and args.send_stow is not None:
        raise ConfigError("give --send or --send-stow, not both")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.max_studies is not None and args.max_studies < 1:
        raise ConfigError("--max-studies must be >= 1")
    for path in args.inputs:
        if not path.exists():
            raise ConfigError(f"input {path} is neither a file nor a folder")
    if remote and not (args.write_sr or args.write_sc):
        # Results are what a PACS run is for: the listener's SR + heatmap SC by default
        # (explain.method = "none" leaves the heatmap out).
        args.write_sr = args.write_sc = args.heatmaps = True
    return remote


def _progress(err: Console, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]cxr-batch {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=disable,
    )


def _folder_run(
    args: argparse.Namespace, settings: Settings, options: BatchOptions, err: Console
) -> Summary:
    from cxr_pipeline.batch.runner import run_batch

    progress = _progress(err, args.no_progress)
    task = progress.add_task("files", total=None)

    def on_start(todo: int, already: int) -> None:
        progress.update(task, total=todo)
        if already:
            err.print(f"resuming: {already} files already done, {todo} to do")

    def on_row(row: Row) -> None:
        progress.advance(task)

    with progress:
        return run_batch(args.inputs, args.out, settings, options, on_start=on_start, on_row=on_row)


def _remote_run(
    args: argparse.Namespace, settings: Settings, options: BatchOptions, err: Console
) -> Summary:
    from cxr_pipeline.batch.remote import RemoteQuery, RemoteSource, RunPlan, parse_study_date
    from cxr_pipeline.batch.remote_run import run_remote

    query = RemoteQuery(
        study_date=parse_study_date(args.study_date) if args.study_date else None,
        modalities=tuple(m.upper() for m in args.modality or settings.ingest.accepted_modalities),
        accession=args.accession,
        max_studies=args.max_studies,
    )
    source: RemoteSource
    if args.from_pacs is not None:
        from cxr_pipeline.batch.pacs import DimseSource

        peer = parse_destination(args.from_pacs, option="--from-pacs")
        try:
            source = DimseSource(peer, settings.send, settings.batch)
        except OSError as exc:
            raise ConfigError(f"cannot start the C-MOVE storage SCP: {exc.strerror}") from exc
    else:
        from cxr_pipeline.batch.web_source import DicomwebSource

        service = parse_dicomweb_url(args.from_dicomweb, option="--from-dicomweb")
        source = DicomwebSource(service, settings.send)
    progress = _progress(err, args.no_progress)
    studies = progress.add_task("studies", total=None, unit="studies")
    images = progress.add_task("images", total=None, visible=False)
    outstanding: dict[str, int] = {}

    def on_studies(count: int) -> None:
        progress.update(studies, total=count, description="querying studies")
        err.print(f"{source.label}: {count} matching studies")

    def on_plan(plan: RunPlan) -> None:
        outstanding.update(plan.outstanding())
        finished = sum(1 for count in outstanding.values() if count == 0)
        todo = plan.images + len(plan.not_analysable) + len(plan.unreachable)
        progress.reset(studies, total=len(outstanding), completed=finished, description="studies")
        progress.update(images, total=todo, visible=True)
        if plan.already_done:
            err.print(f"resuming: {plan.already_done} images already done, {plan.images} to do")

    def on_row(row: Row) -> None:
        progress.advance(images)
        left = outstanding.get(row.study_instance_uid)
        if left is not None:
            outstanding[row.study_instance_uid] = left - 1
            if left == 1:
                progress.advance(studies)

    try:
        with progress:
            return run_remote(
                source,
                query,
                args.out,
                settings,
                options,
                on_studies=on_studies,
                on_study=lambda study: progress.advance(studies),
                on_plan=on_plan,
                on_row=on_row,
            )
    finally:
        source.close()


def incomplete_line(summary: Summary) -> str | None:
    """Say what a PACS run could not do and that a rerun picks it up (None: nothing)."""
    from cxr_pipeline.batch.remote import RETRYABLE_REASONS

    missing = [
        r for r in summary.rows if r.status == Status.FAILED and r.reason in RETRYABLE_REASONS
    ]
    if not missing:
        return None
    by_reason: dict[str, int] = {}
    for row in missing:
        by_reason[row.reason] = by_reason.get(row.reason, 0) + 1
    counts = ", ".join(f"{count} {reason}" for reason, count in sorted(by_reason.items()))
    return (
        f"incomplete: {counts} (first: {missing[0].detail}); "
        "run the same command again to pick them up"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-batch``; returns the exit status."""
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    remote = False
    try:
        remote = _check_args(args)
        settings = load_settings(args.config, **_overrides(args))
        start_fork_server(settings.batch.start_method)
        from cxr_pipeline.batch.runner import BatchOptions

        send = None
        if args.send is not None:
            send = parse_destination(args.send)
        elif args.send_stow is not None:
            send = parse_dicomweb_url(args.send_stow)
        options = BatchOptions(
            write_sr=args.write_sr, write_sc=args.write_sc, heatmaps=args.heatmaps, send=send
        )
        if options.send is not None and not (options.write_sr or options.write_sc):
            raise ConfigError("--send needs --write-sr and/or --write-sc")
        if remote:
            summary = _remote_run(args, settings, options, err)
        else:
            summary = _folder_run(args, settings, options, err)
    except QueryError as exc:
        err.print(
            f"cxr-batch: the PACS could not be queried, nothing was retrieved: {exc.detail}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        return EXIT_QUERY_FAILED
    except CxrError as exc:
        err.print(f"cxr-batch: {exc}", soft_wrap=True, highlight=False, markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run loop started: nothing half-written
        err.print("cxr-batch: interrupted")
        return EXIT_INTERRUPTED
    Console().print(summary_table(summary))
    if summary.interrupted:
        return EXIT_INTERRUPTED
    line = incomplete_line(summary) if remote else None
    if line is not None:
        err.print(f"cxr-batch: {line}", soft_wrap=True, highlight=False, markup=False)
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
