"""Celery on Redis: the app factory, the listener's job queue and the ``cxr-worker`` command.

Messages carry SOP Instance UIDs (and the spool path as a hint), never pixel data: the
listener and the workers share ``data_dir`` (spool + ledger). Delivery is at least once:
``task_acks_late`` + ``task_reject_on_worker_lost`` redeliver a task whose worker died,
``worker_prefetch_multiplier=1`` keeps waiting work in Redis (where other workers and the
micro-batch collector can take it) and the Redis visibility timeout redelivers a task that
was taken but never acknowledged. Redelivery is deduplicated (:mod:`workers.lease`): a
worker runs a job only under that UID's lease in Redis, drops a copy of a job another live
worker holds, and keeps its own messages from being redelivered while it is alive; the
sweep publishes a row again only when neither a lease nor its publish marker says the job
is still in Redis. Workers are also idempotent through the ledger, so a copy that arrives
after the job finished is skipped and sends nothing new.

The listener side (:class:`CeleryJobQueue`) imports no model code and never loses an
image when Redis is down: a failed publish leaves the ledger row RECEIVED and a sweep
thread publishes it again once Redis is back.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from cxr_pipeline.errors import ConfigError
from cxr_pipeline.ledger import JobRecord, JobState, Ledger
from cxr_pipeline.settings import Settings, load_settings
from workers.lease import KOMBU_UNACKED_INDEX, PublishMarks
from workers.queue import ledger_path

log = logging.getLogger(__name__)

TASK_ANALYSE = "cxr.analyse_instance"
"""Name of the task that analyses one spooled instance (args: uid; kwargs: spool_path)."""

SETTINGS_CONF_KEY = "cxr_settings_json"
"""Key of ``app.conf`` carrying the full settings to worker processes."""


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
        "task_time_limit": worker.task_time_limit_s,
        "task_soft_time_limit": max(1, worker.task_time_limit_s - 30),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
        SETTINGS_CONF_KEY: settings.model_dump_json(),
    }


def create_app(settings: Settings) -> Celery:
    """Build a Celery app configured from ``settings`` (no tasks registered).

    The listener uses it as is (it publishes tasks by name); :func:`main` registers the
    worker tasks with :func:`workers.tasks.register_tasks`.
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


class CeleryJobQueue:
    """The listener's :class:`workers.queue.JobQueue` on Celery + Redis.

    :meth:`enqueue` never raises for a broker outage: the image is already spooled and
    recorded RECEIVED, so it is kept in a retry set and a background sweep publishes it
    again every ``worker.requeue_interval_s``. The sweep also re-publishes ledger rows
    that stayed RECEIVED longer than ``worker.requeue_after_s`` (e.g. the listener was
    restarted during an outage) and rows QUEUED/PROCESSING for longer than the
    visibility timeout whose message is gone (a Redis without persistence restarted):
    rows whose UID has a live worker lease or a publish marker in Redis are left alone
    (see :mod:`workers.lease`), so a backlog waiting behind slow workers is not copied
    again and again. Once the broker answers again after an outage this queue saw, every
    QUEUED row without a marker is published again at once. A publish makes one connection
    attempt, and while a backlog waits for the sweep new UIDs join it without one, so
    C-STORE handlers are never held up by a dead broker.

    Parameters
    ----------
    settings
        Broker URL, queue name and sweep timings from ``settings.worker``.
    ledger
        The listener's ledger; None opens ``data_dir/ledger.sqlite3``.
    sweep
        Start the background sweep thread (tests call :meth:`sweep_once` instead).
    """

    def __init__(
        self, settings: Settings, ledger: Ledger | None = None, *, sweep: bool = True
    ) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # The listener publishes from C-STORE handler threads: with kombu's default a
        # publish to a dead broker retries connecting for about 6 s, per image, so a PACS
        # would see every C-STORE stall during an outage. One attempt, then the sweep.
        options = dict(self.app.conf.broker_transport_options or {})
        options["max_retries"] = 0
        self.app.conf.broker_transport_options = options
        self.ledger = ledger if ledger is not None else Ledger(ledger_path(settings))
        self.marks = PublishMarks(settings)
        self._retry: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outage_seen = False
        """A publish failed since the last full recovery: QUEUED messages may be gone."""
        self._thread: threading.Thread | None = None
        if sweep:
            self._thread = threading.Thread(
                target=self._sweep_loop, name="cxr-requeue", daemon=True
            )
            self._thread.start()

    # -- publishing --------------------------------------------------------------------

    def _publish(self, uid: str, spool_path: str | None) -> bool:
        try:
            self.app.send_task(
                TASK_ANALYSE,
                args=[uid],
                kwargs={"spool_path": spool_path},
                queue=self.settings.worker.queue_name,
                retry=False,
            )
        except Exception as exc:  # kombu raises OperationalError and friends
            log.warning("broker unavailable, %s stays RECEIVED for re-enqueue: %s", uid, exc)
            return False
        self.marks.published(uid)
        return True

    def enqueue(self, uid: str, spool_path: str | Path | None = None) -> None:
        """Publish one analysis task; on a broker outage keep it for the sweep.

        While earlier publishes are waiting for the sweep (the broker was down a moment
        ago), the UID joins them at once without a publish attempt: the C-STORE handler
        is not held up, and the sweep publishes the backlog in arrival order once the
        broker answers.

        Parameters
        ----------
        uid
            SOP Instance UID of a spooled, recorded instance.
        spool_path
            Where it is spooled (a hint; workers look the row up in the ledger).
        """
        with self._lock:
            if self._retry:
                self._retry.add(uid)
                return
        self._publish_recorded(uid, spool_path)

    def _publish_recorded(self, uid: str, spool_path: str | Path | None) -> bool:
        """Publish one task, keeping the ledger row consistent; False if the broker failed.

        The ledger row is marked QUEUED before publishing (so a fast worker's
        PROCESSING/DONE is never overwritten) and put back to RECEIVED if the publish
        fails.
        """
        hint = None if spool_path is None else str(spool_path)
        record = self.ledger.get(uid)
        if record is not None and record.state == JobState.RECEIVED:
            self.ledger.mark(uid, JobState.QUEUED)
        if self._publish(uid, hint):
            with self._lock:
                self._retry.discard(uid)
            return True
        if record is not None and record.state == JobState.RECEIVED:
            self.ledger.mark(uid, JobState.RECEIVED)
        with self._lock:
            self._retry.add(uid)
            self._outage_seen = True
        return False

    # -- the re-enqueue sweep ----------------------------------------------------------

    def _stale(self, record: JobRecord, now: float) -> bool:
        worker = self.settings.worker
        age = now - record.updated_at
        if record.state == JobState.RECEIVED:
            return age >= worker.requeue_after_s
        return age >= worker.visibility_timeout_s + worker.requeue_after_s

    def sweep_once(self) -> list[str]:
        """Publish what failed to publish and stale unfinished ledger rows.

        Returns
        -------
        list of str
            UIDs published by this sweep.
        """
        with self._lock:
            wanted = set(self._retry)
        now = time.time()
        records = {r.sop_instance_uid: r for r in self.ledger.unfinished()}
        wanted.update(uid for uid, r in records.items() if self._stale(r, now))
        wanted -= self._still_in_redis(
            uid
            for uid in wanted
            if uid in records and records[uid].state in (JobState.QUEUED, JobState.PROCESSING)
        )
        published: list[str] = []
        for uid in sorted(wanted, key=lambda u: records[u].received_at if u in records else 0):
            record = records.get(uid)
            if record is None:  # finished (or unknown) since its publish failed
                with self._lock:
                    self._retry.discard(uid)
                continue
            if not self._publish_recorded(uid, record.spool_path):
                break  # broker still down: try again next sweep
            if record.state in (JobState.QUEUED, JobState.PROCESSING):
                # A stale row published again: restart its clock (only if no worker moved
                # it meanwhile), or every sweep would publish it again until a worker
                # takes it, flooding the queue with duplicates.
                self.ledger.touch(uid, record.state)
            published.append(uid)
        with self._lock:
            recovered = self._outage_seen and not self._retry
        if recovered:
            published += self._republish_queued(set(published))
        if published:
            log.info("re-enqueued %d instance(s)", len(published))
        return published

    def _still_in_redis(self, uids: Iterable[str]) -> set[str]:
        """UIDs a live worker holds or whose message Redis still has (all, if it is down)."""
        candidates = set(uids)
        try:
            return self.marks.busy(candidates)
        except redis.RedisError:
            return candidates  # no answer: publishing would fail anyway

    def _republish_queued(self, skip: set[str]) -> list[str]:
        """After an outage, publish every QUEUED row again.

        A broker that went down may have lost the messages it held (Redis without
        persistence restarts empty); waiting for the stale-row rule would delay those
        images by the visibility timeout (an hour by default). Rows whose publish marker
        or lease survived (Redis kept its data) are left alone; extra copies would be
        harmless anyway: workers skip finished rows and result UIDs are deterministic.
        """
        published: list[str] = []
        queued = [
            r
            for r in self.ledger.unfinished()
            if r.state == JobState.QUEUED and r.sop_instance_uid not in skip
        ]
        busy = self._still_in_redis(r.sop_instance_uid for r in queued)
        for record in queued:
            uid = record.sop_instance_uid
            if uid in busy:
                continue
            if not self._publish_recorded(uid, record.spool_path):
                return published  # down again: the flag stays set, retried next sweep
            self.ledger.touch(uid, JobState.QUEUED)
            published.append(uid)
        with self._lock:
            if not self._retry:
                self._outage_seen = False
        return published

    def pending(self) -> set[str]:
        """UIDs whose last publish failed."""
        with self._lock:
            return set(self._retry)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.worker.requeue_interval_s):
            try:
                self.sweep_once()
            except Exception:  # the sweep must outlive a transient ledger error
                log.exception("re-enqueue sweep failed")

    def close(self) -> None:
        """Stop the sweep and release broker connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.app.close()
        self.marks.close()


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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cxr-worker",
        description="Celery worker analysing chest radiographs queued by cxr-listen --broker.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $CXR_CONFIG)")
    parser.add_argument("--broker", help="broker URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, help="worker processes")
    parser.add_argument("--data-dir", type=Path, help="shared data folder (spool, ledger)")
    parser.add_argument("--queues", help="comma-separated queues (default: worker.queue_name)")
    parser.add_argument(
        "--pool", default="prefork", choices=["prefork", "solo"], help="Celery pool"
    )
    parser.add_argument("--loglevel", default=None, help="log level (default: settings)")
    parser.add_argument("--hostname", default=None, help="Celery node name")
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
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    try:
        settings = load_settings(args.config, **overrides)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"cxr-worker: {exc}")
        return 2
    logging.basicConfig(
        level=(args.loglevel or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # highdicom logs every copied module and pynetdicom every PDU at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Imported here: the listener imports this module and must not load torch.
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
