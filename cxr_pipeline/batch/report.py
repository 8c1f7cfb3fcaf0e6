"""The batch report: one row per input file, in CSV and JSON Lines, safe to interrupt.

Rows are appended and flushed one at a time, so whatever a run wrote before it stopped
(Ctrl-C, kill, power loss) stays a valid report. The JSON Lines file is the record a
resumed run reads; the CSV is rebuilt from it when a run opens the folder, so the two
always agree.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from cxr_pipeline.batch.walker import InputFile

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"


class Status(StrEnum):
    """Outcome of one input file."""

    DONE = "done"
    """Classified (and results written / sent where asked)."""
    SKIPPED = "skipped"
    """Not an input this pipeline analyses (not DICOM, DICOMDIR, not a chest radiograph...)."""
    FAILED = "failed"
    """Meant to be analysed but something went wrong (corrupt pixel data, send failure...)."""


@dataclass
class Row:
    """One line of the report.

    Attributes
    ----------
    path, size, mtime_ns
        The input file and the identity used to resume.
    kind
        ``dicom``, ``dicomdir``, ``picture`` or ``other``.
    status, reason, detail
        Outcome, stable reason code (:class:`cxr_pipeline.errors.Reason`) and a
        human-readable detail without patient data.
    sop_instance_uid, study_instance_uid, series_instance_uid
        Of the source image, where it has them.
    probability, positive, threshold
        Calibrated COVID-19 probability, the decision, and the threshold it was compared
        with (on the same calibrated scale).
    score
        The model's raw score (softmax of the COVID class), before calibration: what a
        site profile is fitted on.
    decided_by
        What set the calibration and threshold: ``model card NAME VERSION`` or
        ``site profile SITE``.
    model_name, model_version
        From the model card.
    decode_ms, infer_ms, explain_ms, encode_ms, send_ms
        Stage timings; ``infer_ms`` is the image's share of its batch.
    outputs
        Files written for this input (SR, SC, heatmap PNG).
    """

    path: str
    size: int
    mtime_ns: int
    kind: str = ""
    status: str = Status.FAILED.value
    reason: str = ""
    detail: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    probability: float | None = None
    positive: bool | None = None
    threshold: float | None = None
    score: float | None = None
    decided_by: str = ""
    model_name: str = ""
    model_version: str = ""
    decode_ms: float | None = None
    infer_ms: float | None = None
    explain_ms: float | None = None
    encode_ms: float | None = None
    send_ms: float | None = None
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def for_file(cls, item: InputFile, **values: Any) -> Row:
        """Start a row for a walked file (a retrieved one is named by where it came from)."""
        path = item.source or str(item.path)
        return cls(path=path, size=item.size, mtime_ns=item.mtime_ns, **values)

    @property
    def key(self) -> tuple[str, int, int]:
        """Same key as :attr:`InputFile.key`."""
        return (self.path, self.size, self.mtime_ns)

    def to_json(self) -> str:
        """One JSON Lines record."""
        return json.dumps(asdict(self), separators=(",", ":"))

    def to_csv(self) -> list[str]:
        """CSV cells in :data:`COLUMNS` order (lists joined with ``;``, None empty)."""
        cells: list[str] = []
        for name in COLUMNS:
            value = getattr(self, name)
            if value is None:
                cells.append("")
            elif isinstance(value, list):
                cells.append(";".join(value))
            elif isinstance(value, float):
                cells.append(f"{value:.6g}")
            else:
                cells.append(str(value))
        return cells

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Row:
        """Rebuild a row from a JSON Lines record (unknown keys are ignored).

        Raises
        ------
        TypeError, ValueError
            The record is not a row.
        """
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        row = cls(**values)
        if not isinstance(row.path, str) or row.status not in set(Status):
            raise ValueError("not a report row")
        return row


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Row))
"""Report columns, in order."""


def read_rows(path: Path) -> list[Row]:
    """Read the valid rows of a JSON Lines report; a torn or unreadable line is dropped.

    Parameters
    ----------
    path
        ``results.jsonl``; a missing file gives no rows.

    Returns
    -------
    list of Row
        In file order.
    """
    if not path.is_file():
        return []
    rows: list[Row] = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn last line of an interrupted write
            try:
                rows.append(Row.from_mapping(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                continue
    return rows


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ReportWriter:
    """Appends rows to ``results.jsonl`` and ``results.csv`` in an output folder.

    Use :meth:`open`; it reads what an earlier run left, keeps the rows that are still
    valid and tells which files are finished.
    """

    def __init__(self, out_dir: Path, kept: list[Row]) -> None:
        self.out_dir = out_dir
        self.kept_rows = kept
        self._jsonl: TextIO = (out_dir / JSONL_NAME).open("a", encoding="utf-8")
        self._csv_handle: TextIO = (out_dir / CSV_NAME).open("a", encoding="utf-8", newline="")
        self._csv = csv.writer(self._csv_handle)

    @classmethod
    def open(
        cls,
        out_dir: Path,
        current: Iterable[InputFile] = (),
        *,
        retry_failed: bool = False,
        redo: Callable[[Row], bool] | None = None,
        keep: Callable[[Row], bool] | None = None,
    ) -> ReportWriter:
        """Open (or create) the report of an output folder, ready to resume.

        An earlier row is kept when its file is unchanged (same size and mtime) or no
        longer among the inputs; rows of changed files, duplicates (the last one wins) and,
        with ``retry_failed``, failed rows are dropped so their files are done again and
        the report keeps one row per file. Both files are rewritten atomically from the
        kept rows before appending starts.

        Parameters
        ----------
        out_dir
            Output folder (created if needed).
        current
            The files of this run.
        retry_failed
            Do failed files again.
        redo
            Also drop the earlier rows it says yes to (a PACS run: failed retrieves of the
            studies it matches again).
        keep
            Rows for which it returns False are dropped too (e.g. classified by another
            model or operating point than this run's), so their files are done again.

        Returns
        -------
        ReportWriter
            With :attr:`kept_rows` (rows from earlier runs kept) and :attr:`finished`.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        current_keys = {str(item.path): item.key for item in current}
        by_path: dict[str, Row] = {}
        for row in read_rows(out_dir / JSONL_NAME):
            by_path.pop(row.path, None)
            by_path[row.path] = row
        kept: list[Row] = []
        for row in by_path.values():
            now = current_keys.get(row.path)
            if now is not None and now != row.key:
                continue
            if retry_failed and row.status == Status.FAILED:
                continue
            if redo is not None and redo(row):
                continue
            if keep is not None and not keep(row):
                continue
            kept.append(row)

        def write_jsonl(handle: TextIO) -> None:
            handle.writelines(row.to_json() + "\n" for row in kept)

        def write_csv(handle: TextIO) -> None:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(row.to_csv() for row in kept)

        _atomic_write(out_dir / JSONL_NAME, write_jsonl)
        _atomic_write(out_dir / CSV_NAME, write_csv)
        return cls(out_dir, kept)

    @property
    def finished(self) -> set[tuple[str, int, int]]:
        """Keys of the files an earlier run finished (nothing to do for them)."""
        return {row.key for row in self.kept_rows}

    def write(self, row: Row) -> None:
        """Append one row to both files and flush them to the OS."""
        self._csv.writerow(row.to_csv())
        self._csv_handle.flush()
        self._jsonl.write(row.to_json() + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flush to disk and close both files."""
        for handle in (self._csv_handle, self._jsonl):
            if not handle.closed:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Summary:
    """What a run did.

    Attributes
    ----------
    counts
        Rows written by this run, by status.
    positives
        Rows of this run classified COVID-positive.
    already_done
        Files an earlier run had finished (not done again).
    wall_s
        Seconds from start to end of the run (model load included).
    process_s
        Seconds from the first decode submitted to the last row written.
    interrupted
        The run was stopped (Ctrl-C) before every file had a row.
    decoder_restarts
        Times the decode processes were restarted after one of them died.
    """

    counts: Counter[str] = field(default_factory=Counter)
    positives: int = 0
    already_done: int = 0
    wall_s: float = 0.0
    process_s: float = 0.0
    interrupted: bool = False
    decoder_restarts: int = 0
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        """Count one row of this run."""
        self.counts[row.status] += 1
        if row.positive:
            self.positives += 1
        self.rows.append(row)

    @property
    def classified(self) -> int:
        """Rows of this run with a probability."""
        return sum(1 for row in self.rows if row.probability is not None)

    @property
    def images_per_s(self) -> float:
        """Classified images per second of processing."""
        return self.classified / self.process_s if self.process_s > 0 else 0.0
