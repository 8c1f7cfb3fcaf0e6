"""What the validation report says: its blocks (for Markdown and HTML) and ``report.json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from training.validate.analysis import GROUP_ATTRIBUTES, PointFigures, Validation
from training.validate.report import Block, Image, Table, interval, num, pct
from training.validate.stats import clean

REPORT_FORMAT_VERSION = 1
TOOL = "cxr-validate"


def _point_rows(point: PointFigures) -> list[Sequence[str]]:
    d, c = point.decision, point.calibration
    return [
        ["sensitivity", pct(d.sensitivity), interval(*d.sensitivity_ci),
         f"{d.tp} of {d.tp + d.fn}"],
        ["specificity", pct(d.specificity), interval(*d.specificity_ci),
         f"{d.tn} of {d.tn + d.fp}"],
        ["expected calibration error", num(c.ece), "", "10 equal-width bins"],
        ["Brier score", num(c.brier), "", ""],
        ["log loss", num(c.log_loss), "", ""],
    ]


def blocks(v: Validation, plots: dict[str, str], inputs: list[str]) -> tuple[str, list[Block]]:
    """Build the report's title and blocks."""
    card, col = v.card, v.collected
    n_covid = int(v.labels.sum())
    out: list[Block] = []
    out.append(("p", (
        f"Model {card.name} {card.version} (Device UID {card.device_uid}), run {v.created} "
        f"through the cxr-batch path (the listener's chest check, decode, preprocessing and "
        f"model) on {', '.join(inputs)}. Research use only; the figures describe these images."
    )))
    out.append(("h2", "Headline"))
    d = v.card_point.decision
    headline = Table(["figure", "value", "95 % interval", "note"], [
        ["images analysed", str(v.labels.size),
         "", f"{n_covid} COVID-19, {v.labels.size - n_covid} non-COVID, "
             f"{v.n_patients} patients"],
        ["files not analysed", str(len(col.not_analysed)), "", "listed below with the reason"],
        ["label rows matching no file", str(len(col.unmatched)), "", "listed below"],
        ["AUC", num(v.auc), interval(*v.auc_ci, as_pct=False),
         "raw scores; patient bootstrap, 2000 resamples"],
        ["sensitivity (model card point)", pct(d.sensitivity), interval(*d.sensitivity_ci),
         f"threshold {v.card_point.threshold:.4g} on the {v.card_point.calibration_method} scale"],
        ["specificity (model card point)", pct(d.specificity), interval(*d.specificity_ci), ""],
        ["ECE (model card probability)", num(v.card_point.calibration.ece), "",
         f"raw score: {num(v.raw.ece)}"],
    ])
    out.append(("table", headline))
    out.append(("p", (
        "Intervals: AUC by patient bootstrap; sensitivity and specificity Wilson intervals "
        f"on the effective number of images (a patient's images count as correlated). "
        f"Patients from {col.patients_from}."
    )))
    out.append(("image", Image(plots["summary"], "ROC, reliability diagram, probabilities")))
    out.append(("h2", f"At the model card's operating point ({v.card_point.name})"))
    out.append(("table", Table(["figure", "value", "95 % interval", "counts"],
                               _point_rows(v.card_point))))
    if v.site_point is not None and v.site_profile is not None:
        sp = v.site_profile
        out.append(("h2", f"At the site profile's operating point ({sp.site})"))
        out.append(("p", (
            f"Profile fitted {sp.created} on {sp.data.get('n', '?')} images for "
            f"{sp.model}; threshold {sp.threshold:.4g} ({sp.calibration.method} map), "
            f"target sensitivity {pct(sp.target_sensitivity)}."
        )))
        out.append(("table", Table(["figure", "value", "95 % interval", "counts"],
                                   _point_rows(v.site_point))))
    if v.fitted is not None and v.crossed is not None:
        f, cf = v.fitted, v.crossed
        out.append(("h2", f"Site profile fitted: {f.site} -> {v.fitted_path}"))
        assured = (
            "" if f.figures.get("threshold_assured", 1.0) else
            " Too few COVID-19 images to assure the target at that confidence: the "
            "threshold is the lowest COVID-19 image's probability."
        )
        out.append(("p", (
            f"Calibration map: {f.calibration.method} (lowest patient-grouped out-of-fold "
            f"log loss), fitted on the raw scores of {f.data['n']} images. Threshold "
            f"{f.threshold:.4g} on the calibrated scale, chosen so that the sensitivity on "
            f"new patients reaches {pct(f.target_sensitivity)} with "
            f"{pct(f.threshold_confidence)} confidence.{assured} The figures below are "
            f"cross-fitted by patient ({cf.folds} folds): each image's probability and "
            f"decision come from a profile fitted without its patient."
        )))
        rows = _point_rows(PointFigures(
            name=f.site, threshold=f.threshold, calibration_method=f.calibration.method,
            probabilities=cf.probabilities, decision=cf.decision, calibration=cf.calibration,
        ))
        rows.append(["AUC (cross-fitted probabilities)", num(cf.auc), "", ""])
        rows.append(["sensitivity / specificity on the fitting images", pct(
            f.figures.get("apparent_sensitivity")) + " / " + pct(
            f.figures.get("apparent_specificity")), "", "optimistic: not an estimate"])
        out.append(("table", Table(["figure (cross-fitted)", "value", "95 % interval", "counts"],
                                   rows)))
    out.append(("h2", "By acquisition (model card's operating point)"))
    names = dict(GROUP_ATTRIBUTES)
    out.append(("table", Table(
        ["attribute", "value", "images", "COVID-19", "non-COVID", "AUC", "sensitivity",
         "specificity", "ECE"],
        [[names[g.attribute], g.value, str(g.n), str(g.n_covid), str(g.n_non_covid),
          num(g.auc), pct(g.sensitivity), pct(g.specificity), num(g.ece)]
         for g in v.groups_table],
    )))
    out.append(("h2", "Figures"))
    for key, alt in (("roc", "ROC curve"), ("reliability", "Reliability diagram"),
                     ("probabilities", "Probabilities by class")):
        out.append(("image", Image(plots[key], alt)))
    out.append(("h2", f"Files not analysed ({len(col.not_analysed)})"))
    if col.not_analysed:
        out.append(("table", Table(
            ["file", "status", "reason", "detail", "label"],
            [[u.path, u.status, u.reason, u.detail, u.label] for u in col.not_analysed],
        )))
    else:
        out.append(("p", "None: every file was analysed."))
    out.append(("h2", f"Label rows matching no file ({len(col.unmatched)})"))
    if col.unmatched:
        out.append(("table", Table(
            ["line", "path", "SOP Instance UID", "label"],
            [[str(r.line), r.path, r.sop_instance_uid, r.label] for r in col.unmatched],
        )))
    else:
        out.append(("p", "None: every labels row named a file of the run."))
    return f"Local validation of {card.name} {card.version}", out


def json_data(v: Validation, plots: dict[str, str], inputs: list[str], labels_path: str
              ) -> dict[str, Any]:
    """``report.json``: every figure, every file not analysed, every unmatched label row."""
    card, col = v.card, v.collected
    data: dict[str, Any] = {
        "tool": TOOL,
        "format_version": REPORT_FORMAT_VERSION,
        "created": v.created,
        "model": {"name": card.name, "version": card.version, "device_uid": card.device_uid},
        "inputs": inputs,
        "labels": labels_path,
        "n_analysed": int(v.labels.size),
        "n_covid": int(v.labels.sum()),
        "n_non_covid": int(v.labels.size - v.labels.sum()),
        "n_patients": v.n_patients,
        "patients_from": col.patients_from,
        "auc": v.auc,
        "auc_ci": list(v.auc_ci),
        "auc_interval": "patient bootstrap percentile, 2000 resamples, 95 %",
        "model_card": v.card_point.to_dict(),
        "raw_score_calibration": v.raw.to_dict(),
        "by_attribute": [g.__dict__ for g in v.groups_table],
        "not_analysed": [u.__dict__ for u in col.not_analysed],
        "unmatched_labels": [
            {"line": r.line, "path": r.path, "sop_instance_uid": r.sop_instance_uid,
             "label": r.label} for r in col.unmatched
        ],
        "plots": plots,
        "images": [
            {"path": i.path, "sop_instance_uid": i.sop_instance_uid, "label": i.label,
             "score": i.score, "probability": float(p),
             "flagged": bool(p >= v.card_point.threshold),
             **{k: i.attributes[k] for k, _ in GROUP_ATTRIBUTES}}
            for i, p in zip(col.images, v.card_point.probabilities, strict=True)
        ],
    }
    if v.site_point is not None and v.site_profile is not None:
        data["site_profile"] = {"profile": v.site_profile.to_dict(), **v.site_point.to_dict()}
    if v.fitted is not None and v.crossed is not None:
        data["fitted_site_profile"] = {
            "path": v.fitted_path,
            "profile": v.fitted.to_dict(),
            "cross_fitted": {
                "decision": v.crossed.decision.to_dict(),
                "calibration": v.crossed.calibration.to_dict(),
                "auc": v.crossed.auc,
                "folds": v.crossed.folds,
                "fold_thresholds": v.crossed.fold_thresholds,
            },
        }
    return clean(data)  # type: ignore[no-any-return]
