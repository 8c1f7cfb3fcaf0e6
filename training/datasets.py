"""Labelled image pools: manifest CSVs, the COVID-Xray-5k folder layout, image loading.

Two input forms are read:

* a manifest CSV with at least ``path,label,patient_id`` (``source`` and any other
  columns are kept), paths relative to a data folder, as ``shared/data/cxr/manifest.csv``;
* the authors' COVID-Xray-5k layout ``train/covid``, ``train/non``, ``test/covid``,
  ``test/non`` (no patient identifiers there: each file is its own patient, and the
  authors' train/test assignment is kept in the ``split`` column).
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

COVID = "covid"
NON_COVID = "non_covid"
LABELS: tuple[str, str] = (NON_COVID, COVID)
"""Class order of every model trained here (index 1 is COVID, as the model card says)."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".mha",
                            ".mhd", ".nrrd", ".gz"})

_LABEL_ALIASES = {
    "covid": COVID,
    "covid-19": COVID,
    "covid19": COVID,
    "positive": COVID,
    "non_covid": NON_COVID,
    "non-covid": NON_COVID,
    "noncovid": NON_COVID,
    "non": NON_COVID,
    "negative": NON_COVID,
}


class DatasetError(ValueError):
    """A manifest, split file or image folder that cannot be used (message says why)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image of a pool.

    Attributes
    ----------
    path
        Image path relative to the data folder (or absolute).
    label
        ``"covid"`` or ``"non_covid"``.
    patient_id
        Grouping key: images of one patient always land in the same split.
    source
        Where the image comes from (per-source results).
    split
        ``""`` in a pool; ``train``/``val``/``test``/``unused`` after splitting.
    copies
        How many times the image enters one training epoch (the paper's 5x COVID
        augmentation: each copy gets its own random augmentation).
    """

    path: str
    label: str
    patient_id: str
    source: str = ""
    split: str = ""
    copies: int = 1
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def target(self) -> int:
        """Class index (0 non-COVID, 1 COVID)."""
        return LABELS.index(self.label)


def normalise_label(raw: str) -> str:
    """Map a label spelling (``COVID-19``, ``non``, ...) to ``covid`` / ``non_covid``.

    Raises
    ------
    DatasetError
        The label is not recognised.
    """
    key = raw.strip().lower()
    if key not in _LABEL_ALIASES:
        raise DatasetError(f"unknown label {raw!r}; expected one of {sorted(_LABEL_ALIASES)}")
    return _LABEL_ALIASES[key]


_CORE = ("path", "label", "patient_id", "source", "split", "copies")


def read_manifest(csv_path: Path | str) -> list[Sample]:
    """Read a manifest or split CSV.

    Parameters
    ----------
    csv_path
        CSV with a header containing at least ``path``, ``label`` and ``patient_id``.

    Returns
    -------
    list of Sample
        In file order.

    Raises
    ------
    DatasetError
        Missing file or column, unknown label, empty patient id or bad ``copies``.
    """
    path = Path(csv_path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            missing = {"path", "label", "patient_id"} - columns
            if missing:
                raise DatasetError(f"{path}: missing column(s) {sorted(missing)}")
            samples = []
            for line, row in enumerate(reader, start=2):
                patient = (row.get("patient_id") or "").strip()
                if not patient:
                    raise DatasetError(f"{path}:{line}: empty patient_id")
                try:
                    copies = int(row.get("copies") or 1)
                except ValueError as exc:
                    raise DatasetError(f"{path}:{line}: bad copies value") from exc
                if copies < 1:
                    raise DatasetError(f"{path}:{line}: copies must be >= 1")
                samples.append(
                    Sample(
                        path=row["path"],
                        label=normalise_label(row["label"]),
                        patient_id=patient,
                        source=row.get("source") or "",
                        split=row.get("split") or "",
                        copies=copies,
                        extra={k: v for k, v in row.items() if k not in _CORE and v is not None},
                    )
                )
    except OSError as exc:
        raise DatasetError(f"cannot read manifest {path}: {exc}") from exc
    if not samples:
        raise DatasetError(f"{path}: no rows")
    return samples


def write_manifest(samples: Sequence[Sample], csv_path: Path | str) -> Path:
    """Write samples as a split manifest CSV (core columns, then the extra columns).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_cols: list[str] = []
    for sample in samples:
        extra_cols.extend(k for k in sample.extra if k not in extra_cols)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*_CORE, *extra_cols])
        for s in samples:
            writer.writerow(
                [s.path, s.label, s.patient_id, s.source, s.split, s.copies,
                 *(s.extra.get(k, "") for k in extra_cols)]
            )
    return path


def scan_covid_xray_5k(root: Path | str, *, source: str = "covid-xray-5k") -> list[Sample]:
    """List the images of the authors' COVID-Xray-5k folder layout.

    Parameters
    ----------
    root
        Folder holding ``train/{covid,non}`` and ``test/{covid,non}`` (searched one and
        two levels down too, as archives often add a top folder).
    source
        Value of the ``source`` column.

    Returns
    -------
    list of Sample
        Paths relative to ``root``; ``split`` is the authors' (``train``/``test``); each
        file is its own patient (the set has no patient identifiers).

    Raises
    ------
    DatasetError
        No such layout under ``root``.
    """
    base = Path(root)
    candidates = [base, *sorted(p for p in base.glob("*") if p.is_dir()),
                  *sorted(p for p in base.glob("*/*") if p.is_dir())]
    top = next(
        (c for c in candidates if (c / "train").is_dir() and (c / "test").is_dir()), None
    )
    if top is None:
        raise DatasetError(f"no train/ and test/ folders under {base}")
    samples = []
    for split in ("train", "test"):
        for folder, label in (("covid", COVID), ("non", NON_COVID), ("non_covid", NON_COVID)):
            class_dir = top / split / folder
            if not class_dir.is_dir():
                continue
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    rel = file.relative_to(base).as_posix()
                    samples.append(
                        Sample(path=rel, label=label, patient_id=f"file-{rel}",
                               source=source, split=split)
                    )
    if not samples:
        raise DatasetError(f"no images in the train/test class folders under {top}")
    return samples


def load_image(path: Path | str) -> np.ndarray:
    """Read an image as float32 (rows, cols) in [0, 1], as the pipeline does.

    A DICOM file (recognised by content, as ``cxr-batch`` does) goes through the listener's
    path, :func:`cxr_pipeline.dicom.ingest.load_radiograph` with the default ingest policy
    (chest check, decode, Modality/VOI LUT, MONOCHROME1 inversion); a picture through
    :func:`cxr_pipeline.dicom.ingest.load_picture` (PIL for PNG/JPEG, SimpleITK for ITK
    formats) where it is installed, else PIL with the same semantics.

    Raises
    ------
    DatasetError
        The file cannot be read, or a DICOM file is not a chest radiograph we analyse.
    """
    from cxr_pipeline.errors import CxrError

    if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        from cxr_pipeline.batch.walker import FileKind, detect_kind

        if detect_kind(Path(path)) is FileKind.DICOM:
            from cxr_pipeline.dicom.ingest import load_radiograph
            from cxr_pipeline.settings import IngestSettings

            try:
                return load_radiograph(path, IngestSettings()).pixels
            except (CxrError, OSError) as exc:
                raise DatasetError(f"cannot use DICOM image {path}: {exc}") from exc
    reader: Callable[[Path | str], np.ndarray]
    try:
        reader = importlib.import_module("cxr_pipeline.dicom.ingest").load_picture
    except (ImportError, AttributeError):  # ingest stage absent: PIL, same semantics
        reader = _load_picture_pil
    try:
        return np.asarray(reader(path), dtype=np.float32)
    except (CxrError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _load_picture_pil(path: Path | str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            data = np.asarray(image, dtype=np.float32)
            scale = 65535.0 if data.max(initial=0) > 255 else 255.0
            return np.asarray(np.clip(data / scale, 0.0, 1.0), dtype=np.float32)
        grey = image.convert("L")  # RGB, palette, alpha -> luminance (ITU-R 601)
        return (np.asarray(grey, dtype=np.float32) / 255.0).astype(np.float32)


def resolve(sample: Sample, data_dir: Path) -> Path:
    """Absolute path of a sample's image."""
    path = Path(sample.path)
    return path if path.is_absolute() else data_dir / path


def with_split(samples: Iterable[Sample], split: str, copies: int = 1) -> list[Sample]:
    """Return copies of ``samples`` assigned to ``split`` with ``copies`` training copies."""
    return [replace(s, split=split, copies=copies) for s in samples]


def class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    """Count images per label (both labels always present as keys)."""
    counts = {label: 0 for label in LABELS}
    for s in samples:
        counts[s.label] += 1
    return counts
