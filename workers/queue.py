"""The job queue interface between the listener and whatever executes the jobs.

The listener only ever calls :meth:`JobQueue.enqueue` with a SOP Instance UID that is
already spooled and recorded in the ledger, and :meth:`JobQueue.close` at shutdown.
Implementations: :class:`workers.local.LocalWorkerPool` (embedded threads, no broker)
and :class:`workers.publisher.CeleryJobQueue` (Celery on Redis); :func:`workers.factory.make_queue`
builds the one the settings ask for. This module imports no other worker module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from cxr_pipeline.settings import Settings

LEDGER_FILE = "ledger.sqlite3"
SPOOL_DIR = "spool"


@runtime_checkable
class JobQueue(Protocol):
    """Where the listener hands over received instances."""

    def enqueue(self, uid: str) -> None:
        """Queue the job of one spooled, recorded instance; must not block for long."""

    def close(self) -> None:
        """Stop accepting work and release resources (threads, broker connections)."""


def ledger_path(settings: Settings) -> Path:
    """Return the ledger file under ``data_dir`` (the listener's; workers never open it)."""
    return settings.data_dir / LEDGER_FILE


def spool_root(settings: Settings) -> Path:
    """Return the spool folder under ``data_dir`` (the listener's; workers never open it)."""
    return settings.data_dir / SPOOL_DIR
