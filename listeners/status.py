"""``cxr-status``: what the service has received and what became of it.

Reads the ledger under ``data_dir``: counts per state and the most recent rows (UIDs,
states, reasons; never patient data). With a broker configured it also shows the backlog:
images accepted into the spool but not yet published (Redis down, or the payload budget
full), and what Redis holds (payload bytes against the budget, tasks waiting and taken,
events the listener has not recorded yet). ``--requeue-failed`` moves FAILED rows back to
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
from cxr_pipeline.service.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.settings import Settings, load_settings
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


def backlog(settings: Settings, counts: dict[JobState, int]) -> dict[str, Any] | None:
    """Measure the Celery backlog: spool rows waiting to be published, what Redis holds.

    Parameters
    ----------
    settings
        ``worker.broker_url`` (None: embedded mode, no backlog to show).
    counts
        Ledger rows per state.

    Returns
    -------
    dict or None
        ``waiting_in_spool`` (RECEIVED rows), ``payload_bytes`` / ``payload_budget_bytes``,
        ``tasks_waiting``, ``tasks_taken``, ``events_unrecorded``; the Redis figures are
        None with ``redis_error`` set when Redis does not answer.
    """
    worker = settings.worker
    if worker.broker_url is None:
        return None
    # Imported here: the embedded mode needs no Redis client.
    import redis

    from workers.lease import redis_client
    from workers.transfer import EVENTS, EVENTS_GROUP, payload_bytes

    out: dict[str, Any] = {
        "waiting_in_spool": counts[JobState.RECEIVED],
        "payload_budget_bytes": worker.payload_budget_bytes,
        "payload_bytes": None,
        "tasks_waiting": None,
        "tasks_taken": None,
        "events_unrecorded": None,
    }
    client = redis_client(worker.broker_url)
    try:
        out["payload_bytes"] = payload_bytes(client)
        out["tasks_waiting"] = int(client.llen(worker.queue_name))  # type: ignore[arg-type]
        out["tasks_taken"] = int(client.hlen("unacked"))  # type: ignore[arg-type]
        try:
            groups: Any = client.xinfo_groups(EVENTS)
            group = next(
                (g for g in groups if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode())), None
            )
            out["events_unrecorded"] = (
                0 if group is None else int(group.get("lag") or 0) + int(group["pending"])
            )
        except redis.ResponseError:  # no stream yet
            out["events_unrecorded"] = 0
    except redis.RedisError as exc:
        out["redis_error"] = type(exc).__name__
    finally:
        client.close()
    return out


def _time(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def _backlog_table(queued: dict[str, Any]) -> Table:
    table = Table(title="backlog (Celery on Redis)")
    table.add_column("what")
    table.add_column("value", justify="right")
    budget = queued["payload_budget_bytes"]
    used = queued["payload_bytes"]
    table.add_row("accepted, waiting in the spool to be published", str(queued["waiting_in_spool"]))
    table.add_row(
        "payload in Redis / budget (MiB)",
        "?" if used is None else f"{used / 2**20:.1f} / {budget / 2**20:.1f}",
    )
    for key, label in (
        ("tasks_waiting", "tasks waiting for a worker"),
        ("tasks_taken", "tasks taken, not yet acknowledged"),
        ("events_unrecorded", "worker events not yet recorded"),
    ):
        table.add_row(label, "?" if queued[key] is None else str(queued[key]))
    if "redis_error" in queued:
        table.add_row("Redis", f"[red]not answering ({queued['redis_error']})[/red]")
    return table


def tables(
    counts: dict[JobState, int],
    recent: Sequence[JobRecord],
    queued: dict[str, Any] | None = None,
) -> Group:
    """Build the counts table, the backlog table (Celery) and the recent-rows table.

    Parameters
    ----------
    counts
        Rows per state.
    recent
        Most recent rows.
    queued
        :func:`backlog` (None: embedded mode, no backlog table).

    Returns
    -------
    rich.console.Group
        The tables, ready to print or to show live.
    """
    totals = Table(title="jobs by state")
    totals.add_column("state")
    totals.add_column("count", justify="right")
    for state in JobState:
        totals.add_row(state.value, str(counts[state]))
    parts: list[Table] = [totals]
    if queued is not None:
        parts.append(_backlog_table(queued))
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
    parts.append(rows)
    return Group(*parts)


def render(
    counts: dict[JobState, int],
    recent: Sequence[JobRecord],
    requeued: Sequence[str] | None,
    console: Console,
    queued: dict[str, Any] | None = None,
) -> None:
    """Print counts, the backlog, recent rows and requeued UIDs as rich tables.

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
    queued
        :func:`backlog` (None: embedded mode).
    """
    console.print(tables(counts, recent, queued))
    if requeued is not None:
        console.print(f"requeued {len(requeued)} failed jobs")


def watch(
    ledger: Ledger, settings: Settings, limit: int, interval_s: float, console: Console
) -> None:
    """Show the tables live, refreshed from the ledger every ``interval_s``, until Ctrl-C.

    Parameters
    ----------
    ledger
        The listener's ledger (read only).
    settings
        For the Celery backlog (:func:`backlog`).
    limit
        Recent rows shown.
    interval_s
        Seconds between refreshes.
    console
        Where to draw.
    """
    def view() -> Group:
        counts = ledger.counts()
        return tables(counts, ledger.recent(limit), backlog(settings, counts))

    with Live(view(), console=console) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(view())
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
    queued = backlog(settings, counts)
    if args.watch is not None and not args.json:
        watch(ledger, settings, args.limit, max(args.watch, 0.2), console)
    elif args.json:
        print(
            json.dumps(
                {
                    "counts": {state.value: n for state, n in counts.items()},
                    "recent": [_row(r) for r in recent],
                    "requeued": requeued,
                    "backlog": queued,
                },
                indent=2,
            )
        )
    else:
        render(counts, recent, requeued, console, queued)
    ledger.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
