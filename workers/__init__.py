"""Executors of pipeline jobs: the embedded thread pool and Celery workers.

:class:`workers.queue.JobQueue` is the interface the listener uses; see
:func:`workers.factory.make_queue`.
"""
