"""What the listener and Celery workers exchange through Redis, and nothing else.

A worker needs only the broker URL and its model settings: it never opens the listener's
spool or ledger. Per job (SOP Instance UID):

``cxr:payload:<uid>`` (string) and ``cxr:payload_sizes`` (hash uid -> bytes)
    The received instance, put by the listener when it publishes the task and deleted by
    the worker once the job reached an outcome (TTL backstop: :func:`keys_ttl_s`). The
    hash is the listener's payload budget (``worker.payload_budget_bytes``): above it,
    images wait in the listener's durable spool and are published as room frees.
``cxr:result:<uid>`` (hash result SOP Instance UID -> DICOM bytes)
    The SR and SC a worker built; the listener moves them into its outbox, sends them and
    deletes the key.
``cxr:events`` (stream, consumer group ``listeners``)
    Every state change a worker reports (:class:`Event`); the listener records each one in
    its ledger and acknowledges the entry only then, so a listener killed mid-way reads its
    pending entries again on start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from cxr_pipeline.settings import Settings
from workers.lease import RESULT_PREFIX as RESULT_PREFIX  # the sweep checks it too
from workers.lease import marker_ttl_s

log = logging.getLogger(__name__)

PAYLOAD_PREFIX = "cxr:payload:"
PAYLOAD_SIZES = "cxr:payload_sizes"
EVENTS = "cxr:events"
EVENTS_GROUP = "listeners"
EVENTS_MAXLEN = 100_000
"""Approximate cap of the events stream (entries are also deleted once recorded)."""


class Outcome(StrEnum):
    """What a worker reports about one job."""

    PROCESSING = "processing"
    """A worker took the job (under its lease)."""
    ANALYSED = "analysed"
    """Results are in ``cxr:result:<uid>``."""
    SKIPPED = "skipped"
    """Not a chest radiograph or unusable input; ``reason`` says why."""
    FAILED = "failed"
    """Analysis failed; ``reason`` says why."""
    NO_PAYLOAD = "no_payload"
    """The instance bytes were not in Redis (finished already, or lost with Redis)."""


@dataclass(frozen=True)
class Event:
    """One entry of the events stream."""

    uid: str
    outcome: Outcome
    reason: str = ""
    entry_id: str = ""

    def fields(self) -> dict[str, str]:
        """Return the stream entry's fields."""
        return {"uid": self.uid, "outcome": self.outcome.value, "reason": self.reason}

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: Mapping[Any, Any]) -> Event:
        """Build an event from a raw stream entry."""
        values = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            uid=values["uid"],
            outcome=Outcome(values["outcome"]),
            reason=values.get("reason", ""),
            entry_id=_text(entry_id),
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def keys_ttl_s(settings: Settings) -> int:
    """TTL of payload and result keys: a backstop, as long as a publish marker's."""
    return marker_ttl_s(settings)


def put_payload(client: redis.Redis, uid: str, data: bytes, ttl_s: int) -> None:
    """Store the instance bytes of ``uid`` and count them against the budget."""
    pipe = client.pipeline(transaction=True)
    pipe.set(PAYLOAD_PREFIX + uid, data, ex=ttl_s)
    pipe.hset(PAYLOAD_SIZES, uid, len(data))
    pipe.execute()


def get_payload(client: redis.Redis, uid: str) -> bytes | None:
    """Return the instance bytes of ``uid``, None when Redis does not have them."""
    data: Any = client.get(PAYLOAD_PREFIX + uid)
    return None if data is None else bytes(data)


def drop_payload(client: redis.Redis, uid: str) -> None:
    """Delete the instance bytes of ``uid`` and free their share of the budget."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(PAYLOAD_PREFIX + uid)
    pipe.hdel(PAYLOAD_SIZES, uid)
    pipe.execute()


def payload_bytes(client: redis.Redis, *, prune: bool = False) -> int:
    """Payload bytes Redis holds now (the budget in use).

    Parameters
    ----------
    client
        Redis.
    prune
        Also forget sizes whose payload key expired (its TTL backstop fired).
    """
    raw: Any = client.hgetall(PAYLOAD_SIZES)
    sizes = {_text(k): int(v) for k, v in raw.items()}
    if prune and sizes:
        pipe = client.pipeline(transaction=False)
        for uid in sizes:
            pipe.exists(PAYLOAD_PREFIX + uid)
        gone = [uid for uid, alive in zip(sizes, pipe.execute(), strict=True) if not alive]
        if gone:
            client.hdel(PAYLOAD_SIZES, *gone)
            for uid in gone:
                del sizes[uid]
    return sum(sizes.values())


def put_results(client: redis.Redis, uid: str, results: Mapping[str, bytes], ttl_s: int) -> None:
    """Store the result objects of ``uid`` (result SOP Instance UID -> Part 10 bytes)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(RESULT_PREFIX + uid)
    mapping: dict[Any, Any] = dict(results)
    pipe.hset(RESULT_PREFIX + uid, mapping=mapping)
    pipe.expire(RESULT_PREFIX + uid, ttl_s)
    pipe.execute()


def get_results(client: redis.Redis, uid: str) -> dict[str, bytes]:
    """Return the result objects of ``uid`` (empty when Redis does not have them)."""
    raw: Any = client.hgetall(RESULT_PREFIX + uid)
    return {_text(k): bytes(v) for k, v in raw.items()}


def drop_results(client: redis.Redis, uid: str) -> None:
    """Delete the result objects of ``uid``."""
    client.delete(RESULT_PREFIX + uid)


def emit(client: redis.Redis, event: Event) -> None:
    """Append one event to the stream the listener consumes."""
    fields: dict[Any, Any] = event.fields()
    client.xadd(EVENTS, fields, maxlen=EVENTS_MAXLEN, approximate=True)


def ensure_group(client: redis.Redis) -> None:
    """Create the listeners' consumer group (and the stream) if missing."""
    try:
        client.xgroup_create(EVENTS, EVENTS_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_events(
    client: redis.Redis, consumer: str, *, pending: bool, count: int = 64, block_ms: int = 1000
) -> list[Event]:
    """Read events for ``consumer``: its unacknowledged ones (``pending``) or new ones."""
    answer: Any = client.xreadgroup(
        EVENTS_GROUP,
        consumer,
        {EVENTS: "0" if pending else ">"},
        count=count,
        block=None if pending else block_ms,
    )
    events: list[Event] = []
    for _stream, entries in answer or []:
        for entry_id, fields in entries:
            if fields:  # a pending entry trimmed away reads back empty
                events.append(Event.parse(entry_id, fields))
            else:
                client.xack(EVENTS, EVENTS_GROUP, entry_id)
    return events


def ack_event(client: redis.Redis, event: Event) -> None:
    """Acknowledge and delete the entry of ``event`` (the listener recorded it)."""
    pipe = client.pipeline(transaction=False)
    pipe.xack(EVENTS, EVENTS_GROUP, event.entry_id)
    pipe.xdel(EVENTS, event.entry_id)
    pipe.execute()
