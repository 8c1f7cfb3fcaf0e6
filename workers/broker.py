"""Celery on Redis, shared by both sides: the app factory, the task name, the collector.

Messages carry SOP Instance UIDs only; the instance bytes wait in a payload key beside them
and results come back through Redis (:mod:`workers.transfer`): workers share nothing with
the listener but Redis. Delivery is at least once:
``task_acks_late`` + ``task_reject_on_worker_lost`` redeliver a task whose worker died,
``worker_prefetch_multiplier=1`` keeps waiting work in Redis (where other workers and the
micro-batch collector can take it) and the Redis visibility timeout redelivers a task that
was taken but never acknowledged. Redelivery is deduplicated (:mod:`workers.lease`): a
worker runs a job only under that UID's lease in Redis, drops a copy of a job another live
worker holds, and keeps its own messages from being redelivered while it is alive; the
sweep publishes a row again only when neither a lease nor its publish marker says the job
is still in Redis. Workers are also idempotent through the ledger, so a copy that arrives
after the job finished is skipped and sends nothing new.

The modules of ``workers/`` import each other in one direction only: :mod:`workers.queue`
and :mod:`workers.lease` import no other worker module; this one imports ``lease``;
:mod:`workers.publisher` (the listener side) and :mod:`workers.tasks` (the worker side)
import this one; :mod:`workers.factory` and :mod:`workers.celery_app` (``cxr-worker``) sit
on top.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.settings import Settings
from workers.lease import KOMBU_UNACKED_INDEX

TASK_ANALYSE = "cxr.analyse_instance"
"""Name of the task that analyses one instance (args: uid; its payload is in Redis)."""

SETTINGS_CONF_KEY = "cxr_settings_json"
"""Key of ``app.conf`` carrying the full settings to worker processes."""


WORKER_PROC_ALIVE_TIMEOUT_S = 300.0
"""Seconds a new prefork child may take to load its model and warm up before Celery kills it."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from the settings.

    Parameters
    ----------
    settings
        ``settings.worker.broker_url`` must be set.

    Returns
    -------
    dict
        Keys of Celery's configuration (``app.conf``).

    Raises
    ------
    ConfigError
        No broker URL is configured.
    """
    worker = settings.worker
    if not worker.broker_url:
        raise ConfigError("worker.broker_url is not set (e.g. redis://127.0.0.1:6379/0)")
    return {
        "broker_url": worker.broker_url,
        "broker_transport_options": {
            "visibility_timeout": worker.visibility_timeout_s,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        # The listener must fail fast when Redis is down (its sweep publishes later); a
        # worker keeps retrying its broker connection for ever.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": worker.queue_name,
        "task_routes": {TASK_ANALYSE: {"queue": worker.queue_name}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A prefork child loads and warms up the model in worker_process_init before it
        # reports UP; Celery's 4 s default killed children in a loop on a 2-core machine
        # (model load + an occlusion warm-up that imports MONAI in the child).
        "worker_proc_alive_timeout": WORKER_PROC_ALIVE_TIMEOUT_S,
        "task_time_limit": worker.task_time_limit_s,
        "task_soft_time_limit": max(1, worker.task_time_limit_s - 30),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
        SETTINGS_CONF_KEY: settings.model_dump_json(),
    }


def create_app(settings: Settings) -> Celery:
    """Build a Celery app configured from ``settings`` (no tasks registered).

    The listener uses it as is (it publishes tasks by name); :func:`workers.celery_app.main`
    registers the worker tasks with :func:`workers.tasks.register_tasks`.
    """
    app = Celery("cxr_pipeline", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def unacked_index_key(app: Celery) -> str:
    """Name kombu's sorted set of unacknowledged messages for this app (with key prefix)."""
    options = dict(app.conf.broker_transport_options or {})
    prefix = str(options.get("global_keyprefix", ""))
    return prefix + str(options.get("unacked_index_key", KOMBU_UNACKED_INDEX))


def settings_from_app(app: Celery) -> Settings:
    """Return the settings a worker process was started with (carried in ``app.conf``)."""
    return Settings.model_validate_json(str(app.conf[SETTINGS_CONF_KEY]))


@dataclass
class Collected:
    """A task message taken from the queue by the collector, not yet acknowledged."""

    uid: str
    message: Any


@contextmanager
def collect_waiting(app: Celery, settings: Settings, limit: int) -> Iterator[list[Collected]]:
    """Take up to ``limit`` waiting analysis messages from the worker's queue.

    Messages are taken unacknowledged on a dedicated broker connection and acknowledged
    when the ``with`` block ends normally; if it raises they are put back on the queue.
    An item the block removes from the yielded list is the block's to acknowledge or
    reject.
    A message that is not an analysis task is put back at once.

    Parameters
    ----------
    app
        The worker's Celery app.
    settings
        ``worker.queue_name`` and ``worker.micro_batch_wait_s``.
    limit
        Most messages to take (0 takes none and opens no connection).

    Yields
    ------
    list of Collected
        The collected UIDs with their messages.
    """
    collected: list[Collected] = []
    if limit <= 0:
        yield collected
        return
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        deadline = time.monotonic() + settings.worker.micro_batch_wait_s
        while len(collected) < limit:
            message = channel.basic_get(settings.worker.queue_name, no_ack=False)
            if message is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
                continue
            uid = _analysis_uid(message)
            if uid is None:
                message.reject(requeue=True)
                break
            collected.append(Collected(uid=uid, message=message))
        try:
            yield collected
        except BaseException:
            for item in collected:
                item.message.reject(requeue=True)
            raise
        for item in collected:
            item.message.ack()


def _analysis_uid(message: Any) -> str | None:
    """Return the UID of a Celery (protocol 2) analysis message, None for anything else."""
    headers = getattr(message, "headers", None) or {}
    if headers.get("task") != TASK_ANALYSE or headers.get("eta"):
        return None
    body = message.decode()
    if not (isinstance(body, list | tuple) and body and body[0]):
        return None
    uid = body[0][0]
    return uid if isinstance(uid, str) else None
