"""Deduplicated redelivery on Redis: per-UID leases and publish markers.

Celery on Redis delivers at least once, and every path that makes a copy of a task message
(the Redis visibility timeout, the listener's re-enqueue sweep, the republish after a broker
outage) used to turn into work or into a stream of "already done" copies whose number grew
with how long the jobs took. Two kinds of small keys make the number of copies independent
of machine speed:

``cxr:lease:<uid>`` (:class:`LeaseKeeper`, worker side)
    ``SET NX PX`` by the worker process that runs the job, value = that process's token,
    renewed every third of its TTL while the job runs and deleted when it ends. A copy
    delivered while another worker holds the lease waits up to two TTLs: if the lease is
    still renewed, its holder is alive and the copy is acknowledged and dropped, not
    executed; if it expires (the holder died, e.g. a prefork child killed, whose task
    Celery redelivers at once) the copy takes the job over. The TTL is at most half the
    visibility timeout, so a dead worker's lease has expired before Redis hands its
    unacknowledged message to another worker.
    While renewing, the keeper also refreshes the score of the messages it holds in kombu's
    ``unacked_index`` (the time kombu restores them after): the visibility timeout then
    measures how long ago the holder was last seen alive, not how long its job has run, so
    a live worker's message is never redelivered however slow the machine is.

``cxr:queued:<uid>`` (:class:`PublishMarks`, listener side)
    Set after each successful publish, with a TTL backstop, and deleted by the worker when
    the job reaches a final state. While it exists the message is known to be in Redis
    (waiting, or unacknowledged and restored by kombu if its holder dies), so the sweep does
    not publish that row again. A Redis that restarts empty loses the marker together with
    the messages, and the sweep publishes the row again.

Both sides fail open: when Redis cannot answer a lease or marker call the job runs (a
duplicate execution is harmless, result UIDs are deterministic) and the sweep treats the
row as busy until Redis answers (its publish would fail anyway).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from cxr_pipeline.settings import Settings

log = logging.getLogger(__name__)

LEASE_PREFIX = "cxr:lease:"
"""Key of the lease of one UID (value: the holding process's token)."""

QUEUED_PREFIX = "cxr:queued:"
"""Key saying that a task message for one UID was published and is still in Redis."""

RESULT_PREFIX = "cxr:result:"
"""Results a worker returned for one UID (see :mod:`workers.transfer`)."""

KOMBU_UNACKED_INDEX = "unacked_index"
"""kombu's Redis transport: sorted set of unacknowledged delivery tags scored by the time
they were delivered (``Channel.unacked_index_key``; overridable in transport options)."""

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def lease_ttl_s(settings: Settings) -> float:
    """TTL of a lease: ``worker.lease_ttl_s``, at most half the visibility timeout."""
    worker = settings.worker
    return max(0.3, min(worker.lease_ttl_s, worker.visibility_timeout_s / 2.0))


def marker_ttl_s(settings: Settings) -> int:
    """TTL of a publish marker: twice the longest a message may legitimately stay in Redis.

    A backstop only: the marker of a finished job is deleted by its worker.
    """
    worker = settings.worker
    return int(2 * max(worker.visibility_timeout_s, worker.task_time_limit_s))


def redis_client(url: str) -> redis.Redis:
    """Connect a redis-py client to ``url`` that fails fast (5 s) instead of hanging."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class PublishMarks:
    """The publish markers and the lease lookups of the listener's sweep.

    Parameters
    ----------
    settings
        ``worker.broker_url`` and the timings the TTLs derive from.
    client
        A redis-py client (tests); None connects to the broker URL.
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        if client is None:
            url = settings.worker.broker_url
            if url is None:
                raise ValueError("PublishMarks needs worker.broker_url")
            client = redis_client(url)
        self.client = client
        self.ttl_s = marker_ttl_s(settings)

    def published(self, uid: str) -> None:
        """Record that a task message for ``uid`` was just published (never raises)."""
        try:
            self.client.set(QUEUED_PREFIX + uid, b"1", ex=self.ttl_s)
        except redis.RedisError as exc:
            # Without the marker the sweep may publish one more copy: harmless.
            log.debug("%s: publish marker not set (%s)", uid, type(exc).__name__)

    def busy(self, uids: Iterable[str]) -> set[str]:
        """Find the UIDs Redis still has work of: a message, a live lease or results.

        Results count as well: they wait there for the listener to record them.

        Raises
        ------
        redis.RedisError
            Redis did not answer (the caller treats every UID as busy).
        """
        ordered = list(uids)
        if not ordered:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for uid in ordered:
            pipe.exists(LEASE_PREFIX + uid, QUEUED_PREFIX + uid, RESULT_PREFIX + uid)
        counts = pipe.execute()
        return {uid for uid, count in zip(ordered, counts, strict=True) if int(count) > 0}

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()


class LeaseKeeper:
    """The leases one worker process holds, renewed by a background thread.

    Parameters
    ----------
    settings
        ``worker.broker_url`` and the lease TTL (:func:`lease_ttl_s`).
    unacked_index_key
        kombu's sorted set of unacknowledged messages (with any global key prefix).
    client
        A redis-py client (tests); None connects to the broker URL.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        unacked_index_key: str = KOMBU_UNACKED_INDEX,
        client: redis.Redis | None = None,
    ) -> None:
        if client is None:
            url = settings.worker.broker_url
            if url is None:
                raise ValueError("LeaseKeeper needs worker.broker_url")
            client = redis_client(url)
        self.client = client
        self.ttl_ms = int(lease_ttl_s(settings) * 1000)
        self.unacked_index_key = unacked_index_key
        self.token = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._held: dict[str, set[Any]] = {}
        """UID -> delivery tags of the messages this process holds for it."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def acquire(self, uid: str, delivery_tag: Any = None, *, wait_s: float = 0.0) -> bool:
        """Take the lease of ``uid`` for this process.

        Parameters
        ----------
        uid
            SOP Instance UID of the job.
        delivery_tag
            Delivery tag of the message that brought it (its unacked score is refreshed
            while the lease is held); None when unknown.
        wait_s
            How long to wait for a held lease to be released or to expire. A copy that
            arrives at once after its holder died (a prefork child killed: Celery
            redelivers immediately) finds the dead holder's lease still there; waiting
            :meth:`takeover_wait_s` lets it take the job over instead of dropping it.

        Returns
        -------
        bool
            True when this process now holds the lease (or already did, or Redis could not
            answer: the job then runs, a duplicate being harmless); False when another
            worker kept renewing it for ``wait_s``: it is alive, the copy must be dropped.
        """
        with self._lock:
            if uid in self._held:
                if delivery_tag is not None:
                    self._held[uid].add(delivery_tag)
                return True
        deadline = time.monotonic() + wait_s
        poll_s = min(0.2, self.ttl_ms / 10000.0)
        while True:
            try:
                taken = bool(
                    self.client.set(LEASE_PREFIX + uid, self.token, nx=True, px=self.ttl_ms)
                )
            except redis.RedisError as exc:
                log.warning("%s: lease not taken (%s); running anyway", uid, type(exc).__name__)
                taken = True
            if taken or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        if not taken:
            return False
        with self._lock:
            self._held[uid] = set() if delivery_tag is None else {delivery_tag}
        self._ensure_thread()
        return True

    def takeover_wait_s(self) -> float:
        """How long a copy waits for a held lease: two TTLs (a dead holder's has expired)."""
        return 2.0 * self.ttl_ms / 1000.0

    def holds(self, uid: str) -> bool:
        """Whether this process holds the lease of ``uid``."""
        with self._lock:
            return uid in self._held

    def release(self, uid: str) -> None:
        """Give the lease of ``uid`` up (only if this process still holds it)."""
        with self._lock:
            if self._held.pop(uid, None) is None:
                return
        try:
            self._release(keys=[LEASE_PREFIX + uid], args=[self.token])
        except redis.RedisError as exc:
            log.debug("%s: lease not released (%s); it expires", uid, type(exc).__name__)

    def finished(self, uid: str) -> None:
        """Delete the publish marker of ``uid``, whose job reached a final state."""
        try:
            self.client.delete(QUEUED_PREFIX + uid)
        except redis.RedisError as exc:
            log.debug("%s: publish marker not deleted (%s)", uid, type(exc).__name__)

    def renew_once(self) -> None:
        """Extend every held lease and refresh the unacked score of its messages."""
        with self._lock:
            held = {uid: set(tags) for uid, tags in self._held.items()}
        if not held:
            return
        now = time.time()
        tags = {tag: now for uid_tags in held.values() for tag in uid_tags}
        try:
            for uid in held:
                # Expired (this process was stalled longer than the TTL): take it again if
                # nobody else did; if somebody did, finishing is still harmless.
                if not self._renew(
                    keys=[LEASE_PREFIX + uid], args=[self.token, self.ttl_ms]
                ) and not self.client.set(LEASE_PREFIX + uid, self.token, nx=True, px=self.ttl_ms):
                    log.warning("%s: lease lost to another worker while running", uid)
            if tags:
                # XX: only refresh messages still unacknowledged (never re-add acked ones).
                self.client.zadd(self.unacked_index_key, tags, xx=True)
        except redis.RedisError as exc:
            log.warning("lease renewal failed (%s)", type(exc).__name__)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="cxr-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._wake.wait(interval):
            self.renew_once()

    def close(self) -> None:
        """Stop renewing, release every held lease and the connection pool."""
        self._wake.set()
        with self._lock:
            uids = list(self._held)
        for uid in uids:
            self.release(uid)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()
