"""A "site" of real labelled chest radiographs as DICOM, for cxr-validate and site profiles.

The pixels are real radiographs from the shared data folder: by default the ieee8023
collection's (both classes), or any manifest rows given (e.g. a model's test split from its
``split.csv``, ``--split-file docs/model/split.csv --split test``); each is written as
DICOM by :mod:`tests.support.dicom_factory` with headers varied the way a hospital's
archive varies them: several manufacturers and institutions (fixed per patient, as a
patient is imaged at one place), CR and DX, PA and AP views, MONOCHROME1 and MONOCHROME2.
Patient IDs come from the manifest, so patient-grouped figures see the collection's real
clustering (some patients have several images).
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from pydicom import uid

from tests.support import dicom_factory as factory

MANUFACTURERS = ("Acme Radiography", "Borealis Medical", "Cobalt Imaging")
INSTITUTIONS = ("North General Hospital", "South Valley Clinic")


@dataclass(frozen=True)
class SiteImage:
    """One written image and what its labels row says."""

    path: str
    """Relative to the site folder."""
    sop_instance_uid: str
    label: str
    patient_id: str
    manufacturer: str
    modality: str
    photometric: str
    view: str
    institution: str


def _pick(options: tuple[str, ...], key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return options[digest[0] % len(options)]


def choose_images(manifest: Path, n_per_class: int, seed: int = 0) -> list[dict[str, str]]:
    """Choose about ``n_per_class`` ieee8023 images of each class, whole patients at a time."""
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["path"].startswith("images/ieee8023")]
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    chosen: list[dict[str, str]] = []
    count = {"covid": 0, "non_covid": 0}
    for patient in patients:
        images = by_patient[patient]
        labels = {r["label"] for r in images}
        if len(labels) > 1 or count[images[0]["label"]] >= n_per_class:
            continue  # a patient with both classes would blur the per-patient checks
        chosen.extend(images)
        count[images[0]["label"]] += len(images)
        if min(count.values()) >= n_per_class:
            break
    return chosen


def build_site(root: Path, data_dir: Path, *, n_per_class: int = 80, size: int = 384,
               seed: int = 0, rows: list[dict[str, str]] | None = None) -> list[SiteImage]:
    """Write the site's DICOM files under ``root`` and return what each one is.

    Parameters
    ----------
    root
        Empty folder.
    data_dir
        The shared data folder (``manifest.csv`` and ``images/``).
    n_per_class
        About this many images of each class (whole patients).
    size
        Longest side of the written images.
    seed
        Choice of patients.
    rows
        Manifest rows to write instead of :func:`choose_images`' choice.

    Returns
    -------
    list of SiteImage
        In writing order.
    """
    written: list[SiteImage] = []
    if rows is None:
        rows = choose_images(data_dir / "manifest.csv", n_per_class, seed)
    for i, row in enumerate(rows):
        patient = row["patient_id"]
        manufacturer = _pick(MANUFACTURERS, "m" + patient)
        institution = _pick(INSTITUTIONS, "i" + patient)
        modality = ("CR", "DX")[i % 2]
        photometric = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME2")[i % 3]
        view = "PA" if row["view"] == "PA" else "AP"
        pixels = factory.load_png(data_dir / row["path"], size=size)
        ds = factory.make_dicom(
            pixels, modality=modality, photometric=photometric, view=view,
            transfer_syntax=uid.ExplicitVRLittleEndian if i % 4 else uid.RLELossless,
            Manufacturer=manufacturer, InstitutionName=institution,
            PatientID=f"SITE-{patient}", PatientName=f"Site^{patient}",
        )
        rel = f"{institution.split()[0].lower()}/{modality.lower()}/img{i:04d}.dcm"
        factory.write(ds, root / rel)
        written.append(SiteImage(
            path=rel, sop_instance_uid=str(ds.SOPInstanceUID), label=row["label"],
            patient_id=patient, manufacturer=manufacturer, modality=modality,
            photometric=photometric, view=view, institution=institution,
        ))
    return written


def write_labels(images: list[SiteImage], path: Path, *, by: str = "path",
                 patient_ids: bool = True) -> Path:
    """Write a LABELS.csv naming the images by ``path`` or ``sop_instance_uid``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", by, *(["patient_id"] if patient_ids else [])])
        for image in images:
            key = image.path if by == "path" else image.sop_instance_uid
            writer.writerow([image.label, key, *([image.patient_id] if patient_ids else [])])
    return path


def split_by_patient(images: list[SiteImage], seed: int = 0
                     ) -> tuple[list[SiteImage], list[SiteImage]]:
    """Two halves with no patient in both, each holding about half of each class."""
    halves: tuple[list[SiteImage], list[SiteImage]] = ([], [])
    for label in ("covid", "non_covid"):
        patients = sorted({i.patient_id for i in images if i.label == label})
        random.Random(seed).shuffle(patients)
        first = set(patients[: len(patients) // 2])
        for image in images:
            if image.label == label:
                halves[0 if image.patient_id in first else 1].append(image)
    return halves


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.site OUT``: write a site (``OUT/site``, ``OUT/labels.csv``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.support.site")
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-file", type=Path,
                        help="a split.csv (manifest columns plus split): write its rows instead")
    parser.add_argument("--split", default="test", help="which split of --split-file")
    args = parser.parse_args(argv)
    rows = None
    if args.split_file is not None:
        with args.split_file.open(newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == args.split]
    images = build_site(args.out / "site", args.data, n_per_class=args.per_class, seed=args.seed,
                        rows=rows)
    write_labels(images, args.out / "labels.csv")
    print(f"{len(images)} images under {args.out / 'site'}, labels in {args.out / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
