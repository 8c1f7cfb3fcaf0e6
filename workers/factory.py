"""Build the listener's job queue from the settings (the top of the ``workers`` modules).

Nothing in ``workers/`` imports this module, so the lazy imports below close no circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxr_pipeline.service.ledger import Ledger
    from cxr_pipeline.service.spool import Spool
    from cxr_pipeline.settings import Settings
    from workers.queue import JobQueue


def make_queue(settings: Settings, ledger: Ledger, spool: Spool) -> JobQueue:
    """Build the queue the settings ask for.

    Parameters
    ----------
    settings
        ``worker.broker_url`` None: embedded :class:`~workers.local.LocalWorkerPool`
        (loads the model in this process); else Celery on that broker.
    ledger, spool
        The service's ledger and spool.

    Returns
    -------
    JobQueue
        A started queue; call ``close()`` at shutdown.
    """
    if settings.worker.broker_url is None:
        from workers.local import LocalWorkerPool

        return LocalWorkerPool(settings, ledger, spool)
    # Imported only here: the embedded mode needs no Celery.
    from workers.publisher import CeleryJobQueue

    queue: JobQueue = CeleryJobQueue(settings, ledger, spool)
    return queue
