"""The job ledger: one SQLite row per received instance, with an explicit state.

The ledger is the single source of truth for "what happened to this image": the
listener records a row before it acknowledges a C-STORE, workers move it through
:class:`JobState`, and ``cxr-status`` reads it. SQLite in WAL mode lets one writer and
many readers work at once across threads and processes; each thread gets its own
connection (sqlite3 connections must not be shared between threads).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cxr_pipeline.service.spool import validate_uid


class JobState(StrEnum):
    """Life cycle of one received instance."""

    RECEIVED = "received"
    """Spooled and recorded; not yet handed to a worker."""
    QUEUED = "queued"
    """Handed to the queue."""
    PROCESSING = "processing"
    """A worker is analysing or sending it."""
    DONE = "done"
    """Results were sent."""
    SKIPPED = "skipped"
    """Not analysed on purpose (not a chest radiograph, ...); the reason says why."""
    FAILED = "failed"
    """Gave up (send failures after all attempts, internal error); the reason says why."""


UNFINISHED_STATES: tuple[JobState, ...] = (
    JobState.RECEIVED,
    JobState.QUEUED,
    JobState.PROCESSING,
)
"""States a restarted service picks up again."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    spool_path TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    result_uids TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
"""

_COLUMNS = (
    "sop_instance_uid, study_instance_uid, calling_ae, spool_path, state, reason, "
    "result_uids, attempts, received_at, updated_at"
)


@dataclass(frozen=True)
class JobRecord:
    """One ledger row.

    Attributes
    ----------
    sop_instance_uid, study_instance_uid
        Of the received object.
    calling_ae
        AE title that sent it (results are sent back there when no destination is set).
    spool_path
        Where the received file is spooled.
    state
        Current :class:`JobState`.
    reason
        Why it was skipped or failed (a :class:`cxr_pipeline.errors.Reason` code and detail).
    result_uids
        SOP Instance UIDs of the result objects (SR, SC) once done.
    attempts
        Processing attempts so far.
    received_at, updated_at
        Unix timestamps (seconds).
    """

    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    spool_path: Path
    state: JobState
    reason: str | None
    result_uids: tuple[str, ...]
    attempts: int
    received_at: float
    updated_at: float


def _record(row: sqlite3.Row) -> JobRecord:
    results = str(row["result_uids"])
    return JobRecord(
        sop_instance_uid=str(row["sop_instance_uid"]),
        study_instance_uid=str(row["study_instance_uid"]),
        calling_ae=str(row["calling_ae"]),
        spool_path=Path(str(row["spool_path"])),
        state=JobState(row["state"]),
        reason=None if row["reason"] is None else str(row["reason"]),
        result_uids=tuple(results.split("\\")) if results else (),
        attempts=int(row["attempts"]),
        received_at=float(row["received_at"]),
        updated_at=float(row["updated_at"]),
    )


class Ledger:
    """SQLite job ledger, safe to use from many threads and processes.

    Parameters
    ----------
    path
        Database file (its folder is created), usually ``settings.data_dir / "ledger.sqlite3"``.
    timeout_s
        How long a writer waits for another process's write lock.
    """

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout_s = timeout_s
        # One connection per thread, held only by thread-local storage: when a thread
        # ends (pynetdicom runs each association in its own thread) its connection is
        # dropped and closed, so connections do not pile up.
        self._local = threading.local()
        # executescript manages its own transaction; the statements are idempotent.
        self._connection().executescript(_SCHEMA)

    # -- connections -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout_s, isolation_level=None, check_same_thread=True
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across application crashes in WAL mode; a power cut may
            # lose the last transactions, which the spool files let us rebuild.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close the calling thread's connection (other threads' close when they end)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writes ------------------------------------------------------------------------

    def record_received(
        self, uid: str, *, study_uid: str, calling_ae: str, spool_path: Path
    ) -> bool:
        """Record a newly received instance in state RECEIVED.

        Parameters
        ----------
        uid
            SOP Instance UID (validated).
        study_uid
            Study Instance UID.
        calling_ae
            The sender's AE title.
        spool_path
            The spooled file.

        Returns
        -------
        bool
            True if the row is new; False if the UID was already known (an idempotent
            re-send: the row keeps its state).
        """
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jobs (sop_instance_uid, study_instance_uid, calling_ae, "
                "spool_path, state, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    validate_uid(uid),
                    study_uid,
                    calling_ae.strip(),
                    str(spool_path),
                    JobState.RECEIVED.value,
                    now,
                    now,
                ),
            )
            return cursor.rowcount == 1

    def mark(
        self,
        uid: str,
        state: JobState,
        *,
        reason: str | None = None,
        result_uids: Sequence[str] = (),
    ) -> None:
        """Move an instance to ``state``.

        Parameters
        ----------
        uid
            SOP Instance UID of a recorded instance.
        state
            The new state.
        reason
            Why (for SKIPPED/FAILED); None clears a previous reason.
        result_uids
            Result SOP Instance UIDs; kept unchanged when empty.

        Raises
        ------
        KeyError
            The UID is not in the ledger.
        """
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, "
                "result_uids = CASE WHEN ? = '' THEN result_uids ELSE ? END "
                "WHERE sop_instance_uid = ?",
                (
                    JobState(state).value,
                    reason,
                    time.time(),
                    "\\".join(result_uids),
                    "\\".join(result_uids),
                    uid,
                ),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"unknown SOP Instance UID {uid}")

    def increment_attempts(self, uid: str) -> int:
        """Count one more processing attempt and return the new count.

        Raises
        ------
        KeyError
            The UID is not in the ledger.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET attempts = attempts + 1, updated_at = ? "
                "WHERE sop_instance_uid = ? RETURNING attempts",
                (time.time(), uid),
            ).fetchone()
            if row is None:
                raise KeyError(f"unknown SOP Instance UID {uid}")
            return int(row[0])

    def touch(self, uid: str, state: JobState) -> bool:
        """Refresh ``updated_at`` of a row only if it is still in ``state``.

        A re-enqueue sweep uses it after publishing a stale row again, so the row is not
        re-published on every sweep, without overwriting a state a worker set meanwhile.

        Returns
        -------
        bool
            True if the row was in ``state`` (and was touched).
        """
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET updated_at = ? WHERE sop_instance_uid = ? AND state = ?",
                (time.time(), uid, JobState(state).value),
            )
            return cursor.rowcount == 1

    def requeue_failed(self) -> list[str]:
        """Move every FAILED instance back to RECEIVED (attempts reset).

        Returns
        -------
        list of str
            Their SOP Instance UIDs, for the caller to enqueue.
        """
        with self._transaction() as conn:
            rows = conn.execute(
                "UPDATE jobs SET state = ?, reason = NULL, attempts = 0, updated_at = ? "
                "WHERE state = ? RETURNING sop_instance_uid",
                (JobState.RECEIVED.value, time.time(), JobState.FAILED.value),
            ).fetchall()
        return sorted(str(r[0]) for r in rows)

    # -- reads -------------------------------------------------------------------------

    def get(self, uid: str) -> JobRecord | None:
        """Return the row of one instance, or None if unknown."""
        row = (
            self._connection()
            .execute(f"SELECT {_COLUMNS} FROM jobs WHERE sop_instance_uid = ?", (uid,))
            .fetchone()
        )
        return None if row is None else _record(row)

    def unfinished(self) -> list[JobRecord]:
        """Rows in RECEIVED, QUEUED or PROCESSING, oldest first (to queue again on start)."""
        marks = ", ".join("?" for _ in UNFINISHED_STATES)
        rows = (
            self._connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY received_at",
                tuple(s.value for s in UNFINISHED_STATES),
            )
            .fetchall()
        )
        return [_record(r) for r in rows]

    def counts(self) -> dict[JobState, int]:
        """Count the rows in each state (every state present, zero where none)."""
        counts = dict.fromkeys(JobState, 0)
        for state, count in self._connection().execute(
            "SELECT state, COUNT(*) FROM jobs GROUP BY state"
        ):
            counts[JobState(state)] = int(count)
        return counts

    def recent(self, limit: int = 20) -> list[JobRecord]:
        """Return the ``limit`` most recently updated rows, newest first."""
        rows = (
            self._connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY updated_at DESC, rowid DESC LIMIT ?",
                (int(limit),),
            )
            .fetchall()
        )
        return [_record(r) for r in rows]
