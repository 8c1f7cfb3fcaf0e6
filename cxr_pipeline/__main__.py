"""``python -m cxr_pipeline FILE.dcm --out DIR``: analyse one DICOM file.

Writes the SR and the heatmap Secondary Capture under ``DIR/<study>/<series>/`` and prints
the result as JSON: ``covid_probability`` is the calibrated probability, ``threshold`` the
operating point on the same scale, ``raw_score`` the model's uncalibrated score,
``statement`` the sentence the SR and SC show, ``decided_by`` what set the operating point.
Exit status: 0 analysed, 2 rejected input (reason printed), 1 any other error.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_pipeline.errors import CxrError, RejectedInput
from cxr_pipeline.settings import load_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REJECTED = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline",
        description="Analyse one chest radiograph DICOM file and write its SR and heatmap SC.",
    )
    parser.add_argument("file", type=Path, help="DICOM file of a chest radiograph")
    parser.add_argument("--out", type=Path, required=True, help="folder for the result objects")
    parser.add_argument("--config", type=Path, help="settings TOML file (default: $CXR_CONFIG)")
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (default: packaged)")
    parser.add_argument(
        "--site-profile", type=Path, metavar="FILE",
        help="site profile TOML: its calibration and threshold decide (cxr-validate)",
    )
    parser.add_argument(
        "--heatmap", choices=("gradcam", "occlusion", "none"), help="heatmap method"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if args.checkpoint is not None:
        model["checkpoint"] = args.checkpoint
    if args.site_profile is not None:
        model["site_profile"] = args.site_profile
    if model:
        overrides["model"] = model
    if args.heatmap is not None:
        overrides["explain"] = {"method": args.heatmap}
    try:
        settings = load_settings(args.config, **overrides)
        # Imported here so that --help and settings errors answer without loading torch.
        from cxr_pipeline.pipeline import Engine, analyse, write_results

        engine = Engine.from_settings(settings)
        analysis = analyse(args.file, engine)
        paths = write_results(analysis, args.out)
    except RejectedInput as exc:
        print(json.dumps({"file": str(args.file), "status": "rejected", "reason": exc.reason,
                          "detail": exc.detail}))
        return EXIT_REJECTED
    except CxrError as exc:
        print(json.dumps({"file": str(args.file), "status": "failed", "reason": exc.reason,
                          "detail": exc.detail}))
        return EXIT_ERROR
    card = engine.predictor.card
    finding = analysis.finding
    print(
        json.dumps(
            {
                "file": str(args.file),
                "status": "done",
                "sop_instance_uid": analysis.sop_instance_uid,
                "study_instance_uid": analysis.study_instance_uid,
                "covid_probability": round(finding.probability, 6),
                "covid_positive": finding.positive,
                "decision": "suspected" if finding.positive else "not suspected",
                "statement": finding.statement(),
                "threshold": round(finding.threshold, 6),
                "threshold_scale": (
                    f"calibrated probability ({finding.calibration_method})"
                    if finding.calibrated
                    else "raw score"
                ),
                "target_sensitivity": finding.target_sensitivity,
                "decided_by": finding.decided_by,
                "raw_score": None if finding.score is None else round(finding.score, 6),
                "model": f"{card.name} {card.version}",
                "heatmap": analysis.heatmap_method,
                "structured_report": str(paths[0]),
                "secondary_capture": str(paths[1]),
                "timings_ms": {k: round(v, 1) for k, v in analysis.timings_ms.items()},
            },
            indent=2,
        )
    )
    return EXIT_OK


def _run_once() -> int:
    """Run :func:`main` as a one-shot process, without the cyclic collector's start-up cost.

    Importing torch, pydicom and highdicom allocates a few hundred thousand objects, and the
    cyclic garbage collector walks all of them again and again during the imports and once
    more while the interpreter shuts down (together about 1 s of a 3 s run on a 2-core
    machine). One image leaves few reference cycles behind, so the collector is switched off
    for the run and everything is frozen (``gc.freeze``: no later collection visits it) before
    exit; reference counting still frees memory as usual, and exit handlers still run.
    """
    gc.disable()
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(_run_once())
