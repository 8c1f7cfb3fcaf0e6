"""Durable spool of received DICOM files and their results waiting to be sent.

A file is acknowledged (C-STORE Success) only after it is on disk: written to a
temporary name in the same folder, flushed, ``fsync``-ed, renamed over the final name
with :func:`os.replace` (atomic on POSIX) and the directory ``fsync``-ed so the rename
itself survives a power cut (the pattern of mercure's folder states and MONAI
Informatics Gateway's "acknowledge after the local write").

Layout under ``root``::

    incoming/<SOPInstanceUID>.dcm        received objects
    outbox/<SOPInstanceUID>/*.dcm        result objects (SR, SC) until they are sent
    kept/<SOPInstanceUID>/*.dcm          results kept here because no destination is configured
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cxr_pipeline.errors import InvalidUid

# DICOM PS3.5 9.1: UID = components of digits separated by ".", at most 64 characters,
# no leading zero in a multi-digit component. Anything else (notably "/" or "..") is refused,
# so a UID can be used as a file name without path traversal.
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_MAX_UID_LENGTH = 64

INCOMING_DIR = "incoming"
OUTBOX_DIR = "outbox"
KEPT_DIR = "kept"
SUFFIX = ".dcm"
_TMP_PREFIX = ".tmp-"
_TMP_SUFFIX = ".part"


def validate_uid(uid: str) -> str:
    """Return ``uid`` if it is a syntactically valid DICOM UID.

    Parameters
    ----------
    uid
        A SOP Instance UID (or any UID) received from a peer.

    Returns
    -------
    str
        The same UID, stripped of the trailing NUL/space padding DICOM allows.

    Raises
    ------
    InvalidUid
        Empty, too long, or containing anything but digits and single dots.
    """
    if not isinstance(uid, str):
        raise InvalidUid(f"UID must be a string, got {type(uid).__name__}")
    cleaned = uid.rstrip("\x00 ")
    if not cleaned or len(cleaned) > _MAX_UID_LENGTH or not _UID_PATTERN.match(cleaned):
        # repr of a bounded prefix: a hostile value cannot flood the log.
        raise InvalidUid(f"not a valid DICOM UID: {cleaned[:80]!r}")
    return cleaned


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dicom_files(folder: Path) -> list[Path]:
    """List the ``.dcm`` files directly in ``folder``, sorted by name (none if it is absent)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file())


def write_durably(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically and durably.

    Parameters
    ----------
    path
        Final file name; its folder must exist.
    write
        Called with a binary file object opened on a temporary file in the same folder.

    Returns
    -------
    Path
        ``path``, now complete on disk.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


class Spool:
    """Received objects and pending results on local disk, keyed by SOP Instance UID.

    Parameters
    ----------
    root
        Spool folder (created if absent), usually ``settings.data_dir / "spool"``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.outbox = self.root / OUTBOX_DIR
        self.kept = self.root / KEPT_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)

    def path_for(self, sop_instance_uid: str) -> Path:
        """Path of the spooled object with this UID (which may not exist yet).

        Raises
        ------
        InvalidUid
            The UID is not a valid DICOM UID.
        """
        return self.incoming / f"{validate_uid(sop_instance_uid)}{SUFFIX}"

    def store(self, sop_instance_uid: str, write: Callable[[BinaryIO], object]) -> Path:
        """Durably store one received object.

        Parameters
        ----------
        sop_instance_uid
            Its SOP Instance UID: becomes the file name.
        write
            Writes the complete Part 10 file to the given binary stream.

        Returns
        -------
        Path
            The final file. Storing the same UID again replaces it atomically.

        Raises
        ------
        InvalidUid
            The UID is not a valid DICOM UID (e.g. contains ``/`` or ``..``).
        OSError
            The disk write failed; nothing is left under the final name.
        """
        return write_durably(self.path_for(sop_instance_uid), write)

    def exists(self, sop_instance_uid: str) -> bool:
        """Whether the object with this UID is spooled."""
        return self.path_for(sop_instance_uid).is_file()

    def outbox_dir(self, sop_instance_uid: str) -> Path:
        """Folder (created) where the result files of this source object wait until sent."""
        folder = self.outbox / validate_uid(sop_instance_uid)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def outbox_files(self, sop_instance_uid: str) -> list[Path]:
        """List the result files waiting in the outbox of this source object, sorted by name."""
        return _dicom_files(self.outbox / validate_uid(sop_instance_uid))

    def clear_outbox(self, sop_instance_uid: str) -> None:
        """Delete the outbox folder of this source object (after its results were sent)."""
        shutil.rmtree(self.outbox / validate_uid(sop_instance_uid), ignore_errors=True)

    def keep_results(self, sop_instance_uid: str) -> Path:
        """Move the outbox of this source object to ``kept/`` (no destination to send to).

        One ``rename`` of the folder, so the set is never half moved; a set kept earlier for
        the same UID (the same deterministic result UIDs) is replaced.

        Parameters
        ----------
        sop_instance_uid
            The source object's SOP Instance UID.

        Returns
        -------
        Path
            The folder now holding the result files.
        """
        uid = validate_uid(sop_instance_uid)
        self.kept.mkdir(parents=True, exist_ok=True)
        target = self.kept / uid
        if target.exists():
            shutil.rmtree(target)
        os.replace(self.outbox / uid, target)
        _fsync_directory(self.kept)
        _fsync_directory(self.outbox)
        return target

    def kept_files(self, sop_instance_uid: str) -> list[Path]:
        """List the result files kept for this source object, sorted by name."""
        return _dicom_files(self.kept / validate_uid(sop_instance_uid))

    def remove(self, sop_instance_uid: str) -> None:
        """Delete the spooled object and its outbox; missing files are ignored."""
        with contextlib.suppress(FileNotFoundError):
            self.path_for(sop_instance_uid).unlink()
        self.clear_outbox(sop_instance_uid)

    def remove_partial_files(self) -> list[Path]:
        """Delete temporary files a killed writer left in ``incoming/``.

        :func:`write_durably` writes ``.tmp-*.part`` files and renames them; a process
        killed in between (``kill -9``, power cut) leaves the temporary file behind, never
        acknowledged and never recorded. Call it when the (single) listener of this spool
        starts, before it accepts associations.

        Returns
        -------
        list of Path
            The files removed.
        """
        removed = []
        for path in self.incoming.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed

    def free_bytes(self) -> int:
        """Bytes available to unprivileged writers on the spool's file system."""
        return shutil.disk_usage(self.root).free
