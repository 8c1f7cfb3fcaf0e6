"""A site's ``LABELS.csv``: read, checked, and matched to the files it names.

Columns:

- ``label``: ``covid`` or ``non_covid`` (the spellings :func:`training.datasets.normalise_label`
  knows, such as ``COVID-19`` or ``negative``, are accepted too);
- ``path`` (relative to an INPUT folder, or absolute) and/or ``sop_instance_uid``: every
  row needs one of them; a row with a path is matched by path;
- ``patient_id`` (optional): groups a patient's images for intervals and folds; without
  it the DICOM Patient ID is used.

Everything that makes the file unusable is a :class:`LabelsError` naming the lines: no
file, no ``label`` column, an unknown label, a row naming no image, the same image given
two different labels, only one class.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training.datasets import COVID, LABELS, DatasetError, normalise_label


class LabelsError(ValueError):
    """A labels file that cannot be used; the message says which lines and why."""


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels file.

    Attributes
    ----------
    line
        Line number in the file (the header is line 1).
    label
        ``covid`` or ``non_covid``.
    path
        As written (may be relative), or ``""``.
    sop_instance_uid
        As written, or ``""``.
    patient_id
        As written, or ``""``.
    """

    line: int
    label: str
    path: str = ""
    sop_instance_uid: str = ""
    patient_id: str = ""

    @property
    def target(self) -> int:
        """1 for COVID-19, 0 otherwise."""
        return int(self.label == COVID)

    @property
    def key(self) -> str:
        """How the row names its image, for messages."""
        return f"path {self.path}" if self.path else f"SOP Instance UID {self.sop_instance_uid}"


def read_labels(path: Path | str) -> list[LabelRow]:
    """Read and check a labels file.

    Parameters
    ----------
    path
        The CSV file.

    Returns
    -------
    list of LabelRow
        One per image (rows repeating the same image with the same label are merged).

    Raises
    ------
    LabelsError
        Missing or unreadable file, missing columns, unknown labels, rows naming no image,
        one image with two labels, or only one class.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {c.strip() for c in reader.fieldnames or ()}
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from exc
    if "label" not in columns:
        raise LabelsError(f"{path}: no 'label' column (columns: {sorted(columns)})")
    if not columns & {"path", "sop_instance_uid"}:
        raise LabelsError(f"{path}: needs a 'path' or a 'sop_instance_uid' column")
    if not rows:
        raise LabelsError(f"{path}: no rows")
    unknown: list[str] = []
    unnamed: list[int] = []
    parsed: list[LabelRow] = []
    for line, row in enumerate(rows, start=2):
        try:
            label = normalise_label(row.get("label", ""))
        except DatasetError:
            unknown.append(f"line {line}: {row.get('label', '')!r}")
            continue
        item = LabelRow(
            line=line,
            label=label,
            path=row.get("path", ""),
            sop_instance_uid=row.get("sop_instance_uid", ""),
            patient_id=row.get("patient_id", ""),
        )
        if not item.path and not item.sop_instance_uid:
            unnamed.append(line)
            continue
        parsed.append(item)
    if unknown:
        raise LabelsError(
            f"{path}: unknown label value(s) ({', '.join(unknown[:10])}"
            f"{', ...' if len(unknown) > 10 else ''}); use covid or non_covid"
        )
    if unnamed:
        raise LabelsError(f"{path}: line(s) {_lines(unnamed)} give neither path nor UID")
    merged = _merge_duplicates(path, parsed)
    classes = {row.label for row in merged}
    if classes != set(LABELS):
        raise LabelsError(
            f"{path}: only {', '.join(sorted(classes))} images; validation needs both "
            f"covid and non_covid"
        )
    return merged


def _lines(lines: Iterable[int]) -> str:
    items = [str(n) for n in lines]
    return ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")


def _merge_duplicates(path: Path, rows: Sequence[LabelRow]) -> list[LabelRow]:
    """Merge repeats of one image; the same image with two labels is an error."""
    seen: dict[tuple[str, str], LabelRow] = {}
    conflicts: list[str] = []
    merged: list[LabelRow] = []
    for row in rows:
        key = ("path", row.path) if row.path else ("uid", row.sop_instance_uid)
        first = seen.get(key)
        if first is None:
            seen[key] = row
            merged.append(row)
        elif first.label != row.label:
            conflicts.append(f"{row.key} on lines {first.line} and {row.line}")
    # A UID given on a path row and on a UID row must agree too.
    by_uid: dict[str, LabelRow] = {}
    for row in merged:
        if row.sop_instance_uid:
            other = by_uid.setdefault(row.sop_instance_uid, row)
            if other.label != row.label:
                conflicts.append(
                    f"SOP Instance UID {row.sop_instance_uid} on lines {other.line} and {row.line}"
                )
    if conflicts:
        raise LabelsError(
            f"{path}: the same image has two different labels: {'; '.join(conflicts[:5])}"
        )
    return merged


@dataclass(frozen=True)
class FileRef:
    """A file of the run, as far as label matching cares."""

    path: Path
    sop_instance_uid: str = ""


@dataclass
class Matching:
    """Which label row belongs to which file.

    Attributes
    ----------
    by_file
        Resolved file path -> its label row.
    unmatched
        Label rows that name no file of the run.
    conflicts
        Files named by two label rows (by path and by UID) with different labels.
    """

    by_file: dict[Path, LabelRow] = field(default_factory=dict)
    unmatched: list[LabelRow] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def match_labels(
    labels: Sequence[LabelRow], files: Sequence[FileRef], inputs: Sequence[Path]
) -> Matching:
    """Match label rows to files: by path (relative to an INPUT folder, or absolute), else UID.

    Parameters
    ----------
    labels
        From :func:`read_labels`.
    files
        Every file of the run (with its SOP Instance UID where it has one).
    inputs
        The INPUT files and folders; relative label paths are tried under each folder (and
        beside each INPUT file).

    Returns
    -------
    Matching
        The matches, the rows that match no file, and conflicting labels.
    """
    by_path = {f.path.resolve(): f for f in files}
    by_uid: dict[str, list[FileRef]] = {}
    for f in files:
        if f.sop_instance_uid:
            by_uid.setdefault(f.sop_instance_uid, []).append(f)
    bases = [p.resolve() if p.is_dir() else p.resolve().parent for p in inputs]
    result = Matching()
    for row in labels:
        targets: list[Path] = []
        if row.path:
            candidates = (
                [Path(row.path)] if Path(row.path).is_absolute()
                else [base / row.path for base in bases]
            )
            targets = [c.resolve() for c in candidates if c.resolve() in by_path][:1]
        else:
            targets = [f.path.resolve() for f in by_uid.get(row.sop_instance_uid, [])]
        if not targets:
            result.unmatched.append(row)
            continue
        for target in targets:
            other = result.by_file.get(target)
            if other is not None and other.label != row.label:
                result.conflicts.append(
                    f"{target.name}: line {other.line} says {other.label}, "
                    f"line {row.line} says {row.label}"
                )
            result.by_file.setdefault(target, row)
    return result
