"""The ``cxr-worker`` command: a Celery worker consuming the analysis queue.

A worker needs only the broker URL and its model settings: it shares nothing with the
listener but Redis (no data folder, no ledger, no spool; see :mod:`workers.transfer`).

The Celery configuration, task name and collector are in :mod:`workers.broker`; the task
itself in :mod:`workers.tasks`. The listener side is :mod:`workers.publisher`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_pipeline.errors import CxrError
from cxr_pipeline.settings import load_settings
from workers.broker import create_app


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cxr-worker",
        description="Celery worker analysing chest radiographs queued by cxr-listen --broker.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $CXR_CONFIG)")
    parser.add_argument("--broker", help="broker URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, help="worker processes")
    parser.add_argument("--queues", help="comma-separated queues (default: worker.queue_name)")
    parser.add_argument(
        "--pool", default="prefork", choices=["prefork", "solo"], help="Celery pool"
    )
    parser.add_argument("--loglevel", default=None, help="log level (default: settings)")
    parser.add_argument("--hostname", default=None, help="Celery node name")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics and /healthz of each worker process (prefork child i on "
        "PORT+i; default: metrics.worker_port)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-worker``: start a Celery worker on the configured broker.

    The model is loaded once per worker process after it starts (prefork children in
    ``worker_process_init``, the solo pool on its first task), so CUDA is initialised
    only after the fork.
    """
    args = _parse_args(argv)
    overrides: dict[str, Any] = {}
    worker: dict[str, Any] = {}
    if args.broker:
        worker["broker_url"] = args.broker
    if args.concurrency:
        worker["concurrency"] = args.concurrency
    if worker:
        overrides["worker"] = worker
    if args.metrics_port is not None:
        overrides["metrics"] = {"worker_port": args.metrics_port}
    try:
        settings = load_settings(args.config, **overrides)
        app = create_app(settings)
        # The model loads in each pool process on its first task: check a configured
        # site profile against it now, so a wrong one stops the worker at start-up.
        from cxr_pipeline.model.site_profile import check_configured_profile

        check_configured_profile(settings.model)
    except CxrError as exc:
        print(f"cxr-worker: {exc}")
        return 2
    logging.basicConfig(
        level=(args.loglevel or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # highdicom logs every copied module and pynetdicom every PDU at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Imported here: ``--help`` and a configuration error need no torch.
    from workers.tasks import register_tasks

    register_tasks(app)
    queues = args.queues or settings.worker.queue_name
    worker_argv = [
        "worker",
        f"--pool={args.pool}",
        f"--concurrency={settings.worker.concurrency}",
        f"--queues={queues}",
        f"--loglevel={(args.loglevel or settings.log_level).upper()}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        worker_argv.append(f"--hostname={args.hostname}")
    app.worker_main(worker_argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
