"""Find the input files of a batch run and tell what each one is.

Folders are walked recursively in a stable (sorted) order. What a file is comes from its
content, never from its name: DICOM by the ``DICM`` magic after the 128-byte preamble or,
for preamble-less files, by a successful header read that yields SOP Class and Instance
UIDs; PNG and JPEG by their magic numbers; only the ITK formats (NIfTI, MetaImage, NRRD),
which SimpleITK itself recognises by name, are taken by extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cxr_pipeline.dicom.codes import MEDIA_STORAGE_DIRECTORY
from cxr_pipeline.errors import ConfigError

DICOM_PREAMBLE_LENGTH = 128
DICOM_MAGIC = b"DICM"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ITK_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
"""Image formats read by SimpleITK (``ingest.load_picture``); recognised by name."""


class FileKind(StrEnum):
    """What an input file is, as far as the batch run cares."""

    DICOM = "dicom"
    DICOMDIR = "dicomdir"
    PICTURE = "picture"
    OTHER = "other"


@dataclass(frozen=True)
class InputFile:
    """One file found by :func:`walk`, with the identity used to resume a run.

    Attributes
    ----------
    path
        Absolute path.
    size
        Size in bytes when walked.
    mtime_ns
        Modification time in nanoseconds when walked.
    source
        Where a file retrieved from a PACS lives there (its report row's ``path``); empty
        for a walked file.
    """

    path: Path
    size: int
    mtime_ns: int
    source: str = ""

    @property
    def key(self) -> tuple[str, int, int]:
        """Resume key: a file is done when a row with the same path, size and mtime exists."""
        return (str(self.path), self.size, self.mtime_ns)


def _input_file(path: Path) -> InputFile | None:
    try:
        stat = path.stat()
    except OSError:  # vanished or unreadable between listing and stat: not an input
        return None
    return InputFile(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def walk(
    inputs: Iterable[Path | str], *, exclude: Iterable[Path | str] = ()
) -> Iterator[InputFile]:
    """Yield every regular file under the given files and folders, once, in sorted order.

    Parameters
    ----------
    inputs
        Files and folders. Folders are walked recursively (symbolic links to folders are
        not followed, so a link loop cannot hang the walk).
    exclude
        Folders to leave out, e.g. the run's own output folder when it lies inside an input.

    Yields
    ------
    InputFile
        Absolute path, size and modification time of each file.

    Raises
    ------
    ConfigError
        An input does not exist.
    """
    excluded = [Path(p).resolve() for p in exclude]
    seen: set[Path] = set()

    def keep(path: Path) -> bool:
        if path in seen or any(path.is_relative_to(ex) for ex in excluded):
            return False
        seen.add(path)
        return True

    for raw in inputs:
        root = Path(raw).resolve()
        if root.is_file():
            found = _input_file(root) if keep(root) else None
            if found is not None:
                yield found
            continue
        if not root.is_dir():
            raise ConfigError(f"input {raw} is neither a file nor a folder")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            folder_path = Path(folder)
            if any(folder_path.is_relative_to(ex) for ex in excluded):
                dirs.clear()
                continue
            for name in sorted(files):
                path = folder_path / name
                found = _input_file(path) if path.is_file() and keep(path) else None
                if found is not None:
                    yield found


def detect_kind(path: Path) -> FileKind:
    """Tell what a file is from its content.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    FileKind
        ``DICOMDIR`` for a Media Storage Directory, ``DICOM`` for any other DICOM file or
        raw dataset, ``PICTURE`` for PNG / JPEG / ITK images, else ``OTHER``.

    Raises
    ------
    OSError
        The file cannot be read.
    """
    with path.open("rb") as handle:
        head = handle.read(DICOM_PREAMBLE_LENGTH + len(DICOM_MAGIC))
    if head[DICOM_PREAMBLE_LENGTH:] == DICOM_MAGIC:
        return FileKind.DICOMDIR if _is_dicomdir(path) else FileKind.DICOM
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC):
        return FileKind.PICTURE
    if path.name.lower().endswith(ITK_SUFFIXES):
        return FileKind.PICTURE
    if _reads_as_raw_dataset(path):
        return FileKind.DICOM
    return FileKind.OTHER


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def _reads_as_raw_dataset(path: Path) -> bool:
    """Tell whether a file is a DICOM dataset without preamble and file meta.

    ``force=True`` parses almost anything into a few bogus elements, so the SOP Class and
    Instance UIDs, which every composite object has, must both come out as valid UIDs.
    """
    try:
        ds = pydicom.dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        sop_class = str(ds.get("SOPClassUID", ""))
        sop_instance = str(ds.get("SOPInstanceUID", ""))
    except Exception:  # any parse failure means "not a dataset"; nothing is raised on
        return False  # purpose by pydicom for garbage input, so the net is wide.
    return _looks_like_uid(sop_class) and _looks_like_uid(sop_instance)


def _looks_like_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value) and value[0] != "."
