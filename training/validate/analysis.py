"""From batch rows and labels to the validation's figures and report blocks.

Input: the ``cxr-batch`` rows of every file (raw score of each analysed image), the site's
labels, and the DICOM headers of the analysed files (Manufacturer, Modality, View Position,
Photometric Interpretation, Institution Name, Patient ID). Output: :class:`Validation`, which
holds the figures, ``report.json``'s content and the report's blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from cxr_pipeline.batch.report import Row, Status
from cxr_pipeline.model.calibration import OperatingPoint
from cxr_pipeline.model.card import ModelCard
from cxr_pipeline.model.site_profile import SiteProfile
from training.validate.labels import FileRef, LabelRow, match_labels
from training.validate.profile import CrossFit
from training.validate.stats import (
    CalibrationFigures,
    Decision,
    auc,
    calibration_figures,
    decision,
    patient_bootstrap_auc,
)

GROUP_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("Manufacturer", "Manufacturer"),
    ("Modality", "Modality"),
    ("ViewPosition", "View Position"),
    ("PhotometricInterpretation", "Photometric Interpretation"),
    ("InstitutionName", "Institution"),
)
"""DICOM keywords the results are broken down by, and their names in the report."""
NOT_GIVEN = "(not given)"
NO_LABEL = "no_label"
DUPLICATE = "duplicate_image"


class ValidationError(ValueError):
    """The run's results cannot be validated (the message says why)."""


@dataclass
class Image:
    """One analysed, labelled image."""

    path: str
    sop_instance_uid: str
    label: str
    target: int
    score: float
    patient: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Unanalysed:
    """A file that is not in the figures, and why."""

    path: str
    status: str
    reason: str
    detail: str = ""
    label: str = ""


@dataclass
class Collected:
    """Images in the figures, files left out, labels matching nothing."""

    images: list[Image]
    not_analysed: list[Unanalysed]
    unmatched: list[LabelRow]
    patients_from: str


def _header(path: str) -> dict[str, str]:
    keywords = [k for k, _ in GROUP_ATTRIBUTES] + ["PatientID"]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=keywords)
    except Exception:  # the file was decoded by the batch run; a vanished file has no header
        return {}
    return {k: str(ds.get(k, "") or "").strip() for k in keywords}


def collect(rows: Sequence[Row], labels: Sequence[LabelRow], inputs: Sequence[Path]
            ) -> Collected:
    """Join batch rows, labels and headers into the images the figures are computed on.

    Parameters
    ----------
    rows
        One batch row per file of the run.
    labels
        The site's labels.
    inputs
        The INPUT files and folders (relative label paths are under them).

    Returns
    -------
    Collected
        Analysed images, files not analysed (with their reason) and unmatched label rows.

    Raises
    ------
    ValidationError
        A file named by two label rows with different labels.
    """
    refs = [FileRef(Path(r.path), r.sop_instance_uid) for r in rows]
    matching = match_labels(labels, refs, inputs)
    if matching.conflicts:
        raise ValidationError(
            "the same image has two different labels: " + "; ".join(matching.conflicts[:5])
        )
    images: list[Image] = []
    left_out: list[Unanalysed] = []
    seen_uids: dict[str, str] = {}
    by_label_patient = 0
    for row in rows:
        label = matching.by_file.get(Path(row.path).resolve())
        name = label.label if label is not None else ""
        if row.status != Status.DONE or row.score is None:
            left_out.append(Unanalysed(row.path, row.status, row.reason, row.detail, name))
            continue
        if label is None:
            left_out.append(Unanalysed(row.path, "skipped", NO_LABEL,
                                       "classified, but no row of the labels file names it"))
            continue
        if row.sop_instance_uid and row.sop_instance_uid in seen_uids:
            left_out.append(Unanalysed(
                row.path, "skipped", DUPLICATE,
                f"same SOP Instance UID as {seen_uids[row.sop_instance_uid]}", name))
            continue
        if row.sop_instance_uid:
            seen_uids[row.sop_instance_uid] = row.path
        header = _header(row.path) if row.kind == "dicom" else {}
        if label.patient_id:
            patient = f"label:{label.patient_id}"
            by_label_patient += 1
        elif header.get("PatientID"):
            patient = f"dicom:{header['PatientID']}"
        else:
            patient = f"file:{row.path}"
        images.append(Image(
            path=row.path,
            sop_instance_uid=row.sop_instance_uid,
            label=label.label,
            target=label.target,
            score=float(row.score),
            patient=patient,
            attributes={k: header.get(k) or NOT_GIVEN for k, _ in GROUP_ATTRIBUTES},
        ))
    if by_label_patient == len(images):
        source = "the labels file's patient_id column"
    elif by_label_patient:
        source = "the labels file's patient_id where given, else the DICOM Patient ID"
    else:
        source = "the DICOM Patient ID (each image its own patient where absent)"
    return Collected(images, left_out, list(matching.unmatched), source)


@dataclass
class PointFigures:
    """An operating point's decisions and calibration on the images."""

    name: str
    threshold: float
    calibration_method: str
    probabilities: np.ndarray
    decision: Decision
    calibration: CalibrationFigures

    def to_dict(self) -> dict[str, Any]:
        """JSON form (without the per-image probabilities)."""
        return {
            "name": self.name,
            "threshold": self.threshold,
            "calibration_method": self.calibration_method,
            "decision": self.decision.to_dict(),
            "calibration": self.calibration.to_dict(),
        }


def point_figures(name: str, point: OperatingPoint, scores: np.ndarray, labels: np.ndarray,
                  groups: Sequence[str]) -> PointFigures:
    """Probabilities, decisions and calibration of one operating point."""
    probabilities = point.calibration.apply(scores)
    flagged = probabilities >= point.threshold
    return PointFigures(
        name=name,
        threshold=point.threshold,
        calibration_method=point.calibration.method,
        probabilities=probabilities,
        decision=decision(flagged, labels, groups, point.threshold),
        calibration=calibration_figures(probabilities, labels),
    )


@dataclass
class GroupRow:
    """Figures of the images sharing one header value."""

    attribute: str
    value: str
    n: int
    n_covid: int
    n_non_covid: int
    auc: float
    sensitivity: float
    specificity: float
    ece: float


def by_attribute(images: Sequence[Image], card_point: PointFigures) -> list[GroupRow]:
    """Break the model card's figures down by each header attribute's values."""
    y = np.array([i.target for i in images])
    s = np.array([i.score for i in images])
    p = card_point.probabilities
    flagged = p >= card_point.threshold
    out: list[GroupRow] = []
    for keyword, _ in GROUP_ATTRIBUTES:
        values = np.array([i.attributes[keyword] for i in images], dtype=object)
        for value in sorted(set(values.tolist())):
            m = values == value
            d = decision(flagged[m], y[m])
            out.append(GroupRow(
                attribute=keyword, value=str(value), n=int(m.sum()),
                n_covid=int(y[m].sum()), n_non_covid=int(m.sum() - y[m].sum()),
                auc=auc(s[m], y[m]), sensitivity=d.sensitivity, specificity=d.specificity,
                ece=calibration_figures(p[m], y[m]).ece,
            ))
    return out


@dataclass
class Validation:
    """Everything the report says."""

    created: str
    card: ModelCard
    collected: Collected
    scores: np.ndarray
    labels: np.ndarray
    groups: list[str]
    auc: float
    auc_ci: tuple[float, float]
    card_point: PointFigures
    raw: CalibrationFigures
    groups_table: list[GroupRow]
    site_point: PointFigures | None = None
    site_profile: SiteProfile | None = None
    fitted: SiteProfile | None = None
    fitted_path: str = ""
    crossed: CrossFit | None = None

    @property
    def n_patients(self) -> int:
        """Distinct patients among the analysed images."""
        return len(set(self.groups))


def validate(collected: Collected, card: ModelCard, *, site_profile: SiteProfile | None = None,
             seed: int = 0) -> Validation:
    """Compute the figures of the analysed images.

    Parameters
    ----------
    collected
        From :func:`collect`.
    card
        The model whose raw scores these are.
    site_profile
        An existing profile to evaluate as well (already checked against ``card``).
    seed
        Bootstrap seed.

    Returns
    -------
    Validation
        The figures (the site profile fit, if asked for, is added by the caller).

    Raises
    ------
    ValidationError
        No analysed image, or only one class among them.
    """
    images = collected.images
    y = np.array([i.target for i in images], dtype=np.int64)
    if y.size == 0:
        raise ValidationError("no labelled image could be analysed (see the reasons above)")
    if len(np.unique(y)) < 2:
        only = "COVID-19" if y[0] == 1 else "non-COVID"
        raise ValidationError(
            f"every analysed labelled image is {only}: validation needs both classes "
            f"({len(collected.not_analysed)} file(s) not analysed)"
        )
    s = np.array([i.score for i in images], dtype=np.float64)
    groups = [i.patient for i in images]
    card_point = point_figures(f"model card {card.name} {card.version}",
                               card.operating_point(), s, y, groups)
    site_point = None
    if site_profile is not None:
        site_point = point_figures(f"site profile {site_profile.site}",
                                   site_profile.operating_point(), s, y, groups)
    return Validation(
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
        card=card,
        collected=collected,
        scores=s,
        labels=y,
        groups=groups,
        auc=auc(s, y),
        auc_ci=patient_bootstrap_auc(s, y, groups, seed=seed),
        card_point=card_point,
        raw=calibration_figures(s, y),
        groups_table=by_attribute(images, card_point),
        site_point=site_point,
        site_profile=site_profile,
    )


def is_nan(value: float) -> bool:
    """NaN test that accepts any float."""
    return isinstance(value, float) and math.isnan(value)
