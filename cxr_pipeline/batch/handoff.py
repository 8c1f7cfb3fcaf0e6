"""Hand a decode process's result to the main process through shared memory.

Why not return the :class:`~cxr_pipeline.batch.decode.Decoded` from the pool task
directly: ``concurrent.futures.ProcessPoolExecutor`` sends each result through one pipe
shared by all its processes. A result of several hundred kilobytes (a model input is
``3 x 224 x 224`` float32, 602 KB; with ``keep_image`` the full-size pixels too) takes
many ``write`` calls, and a decode process killed between them (the OOM killer, a
crashing native decoder on another thread) leaves half a message in that pipe. The
executor's manager thread then waits forever for the rest of it, so it never notices the
dead process, no future ever completes and ``shutdown`` never returns: the whole batch
hangs (reproduced on CPython 3.11.7 with a SIGKILL during a 12 MB result; the same kill
raises ``BrokenProcessPool`` as documented when the result is small).

So the decode process pickles its result into a :class:`SharedMemory` block and returns
only a :class:`Handoff` (the block's name and size). That message is a few hundred bytes,
below ``PIPE_BUF`` (4096 on Linux), so the pipe write is atomic: a kill lands before or
after it, never inside, and the executor reports the dead process as a broken pool,
which the runner recovers from. The main process copies the bytes out and unlinks the
block. A block whose handle never arrives (its process died first) is left to
multiprocessing's resource tracker, which unlinks it when the run's process exits.

Shared memory lives in ``/dev/shm`` (64 MB by default in a Docker container: give
``cxr-batch`` more with ``--shm-size``). Writing past a full ``/dev/shm`` would kill the
process with SIGBUS, so :func:`put` checks the room first and, when there is too little,
hands over a failed result for that file instead (reason and remedy in its detail; the
file is redone by ``--retry-failed``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

from cxr_pipeline.batch.decode import Decoded, DecodeJob, decode_file
from cxr_pipeline.batch.report import Status
from cxr_pipeline.errors import Reason

ATOMIC_MESSAGE_BYTES = 4096
"""POSIX ``PIPE_BUF`` on Linux: a pipe write of at most this many bytes is atomic. A
pickled :class:`Handoff` with the executor's envelope stays far below it."""


SHM_DIR = Path("/dev/shm")
"""Where POSIX shared memory is backed on Linux."""

SHM_HEADROOM_BYTES = 4 << 20
"""Room left free in :data:`SHM_DIR` beyond the block itself (other decode processes
write theirs at the same time)."""


def shm_free_bytes() -> int | None:
    """Return the bytes free in :data:`SHM_DIR`, or None where it cannot be measured."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@dataclass(frozen=True)
class Handoff:
    """Where a decode result waits in shared memory.

    Attributes
    ----------
    name
        Name of the :class:`SharedMemory` block.
    size
        Bytes of pickled :class:`~cxr_pipeline.batch.decode.Decoded` in it (the block
        may be rounded up to a page).
    """

    name: str
    size: int


def put(decoded: Decoded) -> Handoff:
    """Pickle a result into a new shared-memory block (in the decode process).

    Parameters
    ----------
    decoded
        The result to hand over.

    Returns
    -------
    Handoff
        The block's name and the pickle's size; the block stays until :func:`take`.
        Where :data:`SHM_DIR` lacks the room, the block holds the same file's result
        marked failed, with the reason, instead.
    """
    data = pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)
    free = shm_free_bytes()
    if free is not None and free < len(data) + SHM_HEADROOM_BYTES:
        decoded = replace(
            decoded,
            tensor=None,
            header=None,
            pixels=None,
            status=Status.FAILED,
            reason=Reason.INTERNAL.value,
            detail=(
                f"no room in {SHM_DIR} to hand the decoded image to the main process "
                f"({len(data)} bytes needed, {free} free); give it more space (Docker: "
                "--shm-size) or lower batch.max_in_flight"
            ),
        )
        data = pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)
    block = SharedMemory(create=True, size=max(1, len(data)))
    try:
        _view(block)[: len(data)] = data
    except BaseException:
        block.close()
        block.unlink()
        raise
    block.close()
    return Handoff(block.name, len(data))


def take(handoff: Handoff) -> Decoded:
    """Read a result out of its block and free the block (in the main process).

    Parameters
    ----------
    handoff
        What :func:`put` returned.

    Returns
    -------
    Decoded
        The decode process's result.
    """
    block = SharedMemory(name=handoff.name)
    try:
        data = bytes(_view(block)[: handoff.size])
    finally:
        block.close()
        block.unlink()
    # Only our own decode processes write these blocks (same trust as the pool pipe).
    decoded = pickle.loads(data)
    if not isinstance(decoded, Decoded):
        raise TypeError(f"shared-memory block {handoff.name} holds {type(decoded).__name__}")
    return decoded


def _view(block: SharedMemory) -> memoryview:
    """Return the block's memory (typeshed allows None, which an open block never has)."""
    if block.buf is None:
        raise RuntimeError(f"shared-memory block {block.name} is closed")
    return block.buf


def decode_to_shared_memory(job: DecodeJob) -> Handoff:
    """Decode one file and hand the result over through shared memory (the pool task).

    Parameters
    ----------
    job
        The file and how to decode it.

    Returns
    -------
    Handoff
        Pass it to :func:`take` in the main process.
    """
    return put(decode_file(job))
