"""``cxr-status``: what the service has received and what became of it.

Reads the ledger under ``data_dir``: counts per state and the most recent rows (UIDs,
states, reasons; never patient data). ``--requeue-failed`` moves FAILED rows back to
RECEIVED; the running listener's re-enqueue sweep (or its next start) queues them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cxr_pipeline.errors import CxrError
from cxr_pipeline.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.settings import load_settings
from workers.queue import ledger_path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cxr-status", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $CXR_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="spool, ledger and outbox root")
    parser.add_argument("--limit", type=int, default=20, help="recent rows shown (default 20)")
    parser.add_argument(
        "--requeue-failed", action="store_true", help="move FAILED jobs back to RECEIVED"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="keep the tables on screen, refreshed every SECONDS (default 2) until Ctrl-C",
    )
    return parser.parse_args(argv)


def _row(record: JobRecord) -> dict[str, Any]:
    return {
        "sop_instance_uid": record.sop_instance_uid,
        "study_instance_uid": record.study_instance_uid,
        "calling_ae": record.calling_ae,
        "state": record.state.value,
        "reason": record.reason,
        "attempts": record.attempts,
        "result_uids": list(record.result_uids),
        "received_at": record.received_at,
        "updated_at": record.updated_at,
    }


def _time(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def tables(counts: dict[JobState, int], recent: Sequence[JobRecord]) -> Group:
    """Build the counts table and the recent-rows table.

    Parameters
    ----------
    counts
        Rows per state.
    recent
        Most recent rows.

    Returns
    -------
    rich.console.Group
        Both tables, ready to print or to show live.
    """
    totals = Table(title="jobs by state")
    totals.add_column("state")
    totals.add_column("count", justify="right")
    for state in JobState:
        totals.add_row(state.value, str(counts[state]))
    rows = Table(title=f"{len(recent)} most recent")
    for column in ("updated", "SOP Instance UID", "calling AE", "state", "tries", "reason"):
        rows.add_column(column, overflow="fold")
    for r in recent:
        rows.add_row(
            _time(r.updated_at),
            r.sop_instance_uid,
            r.calling_ae,
            r.state.value,
            str(r.attempts),
            r.reason or "",
        )
    return Group(totals, rows)


def render(
    counts: dict[JobState, int],
    recent: Sequence[JobRecord],
    requeued: Sequence[str] | None,
    console: Console,
) -> None:
    """Print counts, recent rows and requeued UIDs as rich tables.

    Parameters
    ----------
    counts
        Rows per state.
    recent
        Most recent rows.
    requeued
        UIDs moved back to RECEIVED, or None when not asked.
    console
        Where to print.
    """
    console.print(tables(counts, recent))
    if requeued is not None:
        console.print(f"requeued {len(requeued)} failed jobs")


def watch(ledger: Ledger, limit: int, interval_s: float, console: Console) -> None:
    """Show the tables live, refreshed from the ledger every ``interval_s``, until Ctrl-C.

    Parameters
    ----------
    ledger
        The listener's ledger (read only).
    limit
        Recent rows shown.
    interval_s
        Seconds between refreshes.
    console
        Where to draw.
    """
    with Live(tables(ledger.counts(), ledger.recent(limit)), console=console) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(tables(ledger.counts(), ledger.recent(limit)))
        except KeyboardInterrupt:
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cxr-status``.

    Returns
    -------
    int
        0, or 2 for invalid settings or a missing ledger.
    """
    args = _parse_args(argv)
    console = Console(width=200)
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    try:
        settings = load_settings(args.config, **overrides)
    except CxrError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    path = ledger_path(settings)
    if not path.is_file():
        console.print(f"[red]no ledger at {path}: has cxr-listen run with this data_dir?[/red]")
        return 2
    ledger = Ledger(path)
    requeued = ledger.requeue_failed() if args.requeue_failed else None
    counts = ledger.counts()
    recent = ledger.recent(args.limit)
    if args.watch is not None and not args.json:
        watch(ledger, args.limit, max(args.watch, 0.2), console)
    elif args.json:
        print(
            json.dumps(
                {
                    "counts": {state.value: n for state, n in counts.items()},
                    "recent": [_row(r) for r in recent],
                    "requeued": requeued,
                },
                indent=2,
            )
        )
    else:
        render(counts, recent, requeued, console)
    ledger.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
