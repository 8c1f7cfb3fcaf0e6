"""``cxr-viewer`` (also ``scripts/viewer``): Orthanc + DICOMweb + OHIF v3 on loopback.

What listens where (defaults):

- ``http://127.0.0.1:8043``: the viewer (OHIF v3 files, ``/dicom-web`` proxied). The
  only address a browser needs; bound to 127.0.0.1 unless ``--host`` says otherwise.
- ``127.0.0.1:8044``: Orthanc's REST/DICOMweb (answers localhost only).
- DICOM port ``4243``, AE title ``CXR_VIEWER``: Orthanc's C-STORE SCP for
  ``cxr-listen`` to send results to; it accepts only the AE titles given with
  ``--allow-ae`` (default ``CXR_PIPELINE``, ``STORESCU``) from 127.0.0.1.
  ``--no-dicom`` turns it off.

``--orthanc-url http://orthanc:8042`` serves OHIF against an Orthanc that already runs
(with its DICOMweb plugin at ``/dicom-web``) instead of starting one: the compose file's
``ohif`` service does this.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from viewer.orthanc import RunningOrthanc, dicom_files, start_orthanc
from viewer.server import Upstream, ViewerServer

log = logging.getLogger("cxr_viewer")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OHIF_DIR = REPO_ROOT / "web" / "ohif"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-viewer",
        description="Look at cxr-pipeline results in OHIF v3, with a private Orthanc "
        "(DICOMweb) behind it, all on loopback.",
    )
    parser.add_argument("load", nargs="*", type=Path, help="DICOM files or folders to store")
    parser.add_argument("--host", default="127.0.0.1", help="viewer address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8043, help="viewer port (8043)")
    parser.add_argument("--orthanc-port", type=int, default=8044, help="Orthanc HTTP (8044)")
    parser.add_argument("--dicom-port", type=int, default=4243, help="Orthanc DICOM (4243)")
    parser.add_argument("--no-dicom", action="store_true", help="no DICOM server")
    parser.add_argument(
        "--allow-ae",
        action="append",
        default=None,
        help="AE title that may C-STORE from 127.0.0.1 (repeatable; CXR_PIPELINE, STORESCU)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("var/viewer"), help="Orthanc storage (var/viewer)"
    )
    parser.add_argument("--ohif-dir", type=Path, default=DEFAULT_OHIF_DIR, help="OHIF dist/")
    parser.add_argument(
        "--orthanc-url",
        help="use this running Orthanc (http://host:port, DICOMweb at /dicom-web) instead",
    )
    return parser


def _upstream(url: str) -> Upstream:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--orthanc-url must be http://host:port, got {url!r}")
    return Upstream(parts.hostname, parts.port or 80)


def _serve_external(args: argparse.Namespace) -> int:
    """Serve OHIF against an Orthanc someone else runs."""
    try:
        server = ViewerServer(args.ohif_dir, _upstream(args.orthanc_url), args.host, args.port)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"cxr-viewer: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"OHIF v3 viewer:  {server.url}/  (DICOMweb proxied to {args.orthanc_url}/dicom-web)")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop()
    return 0


def _load(orthanc: RunningOrthanc, paths: Sequence[Path]) -> list[str]:
    """Store files; return the Study Instance UIDs seen, in order."""
    studies: list[str] = []
    files = dicom_files(paths)
    for path in files:
        answer = orthanc.upload(path)
        study = _study_uid(orthanc, str(answer.get("ParentStudy", "")))
        if study and study not in studies:
            studies.append(study)
    log.info("stored %d DICOM files from %d paths", len(files), len(paths))
    return studies


def _study_uid(orthanc: RunningOrthanc, orthanc_id: str) -> str:
    if not orthanc_id:
        return ""
    with urllib.request.urlopen(f"{orthanc.rest_url}/studies/{orthanc_id}", timeout=30) as answer:
        tags = json.load(answer).get("MainDicomTags", {})
    return str(tags.get("StudyInstanceUID", ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the viewer until interrupted (Ctrl-C or SIGTERM)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.orthanc_url:
        if args.load:
            print("cxr-viewer: files load only into the Orthanc it starts", file=sys.stderr)
            return 2
        return _serve_external(args)
    missing = [str(p) for p in args.load if not p.exists()]
    if missing:
        print(f"cxr-viewer: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    allowed = args.allow_ae or ["CXR_PIPELINE", "STORESCU"]
    modalities = {ae.lower(): (ae, "127.0.0.1", 104) for ae in allowed}
    dicom_port = None if args.no_dicom else args.dicom_port
    args.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = ViewerServer(
            args.ohif_dir, Upstream("127.0.0.1", args.orthanc_port), args.host, args.port
        )
        orthanc = start_orthanc(
            args.data_dir.resolve(),
            http_port=args.orthanc_port,
            dicom_port=dicom_port,
            modalities=modalities,
        )
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"cxr-viewer: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        studies = _load(orthanc, args.load)
        server.start()
        print(f"OHIF v3 viewer:  {server.url}/  (DICOMweb at {server.url}/dicom-web)")
        print(f"Orthanc REST:    {orthanc.rest_url}/  (localhost only)")
        if dicom_port is not None:
            print(f"Orthanc DICOM:   port {dicom_port}, AE CXR_VIEWER, from 127.0.0.1 as {allowed}")
        for study in studies:
            print(f"Study:           {server.url}/viewer?{urlencode({'StudyInstanceUIDs': study})}")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        server.stop()
        orthanc.stop()
    return 0
