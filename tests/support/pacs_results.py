"""What a run left in a real Orthanc: result objects by the source image they describe."""

from __future__ import annotations

import io
from collections import Counter

import pydicom

from cxr_pipeline.dicom.codes import SopClass
from cxr_pipeline.encode.reading import read_structured_report
from tests.support.orthanc import OrthancServer


def results_by_source(pacs: OrthancServer) -> dict[str, Counter[str]]:
    """Source SOP Instance UID -> counts of "SR" and "SC" results referencing it.

    Every SR and heatmap SC in Orthanc is read; results are also checked to sit in their
    source's study (a result filed elsewhere counts under ``"<uid> elsewhere"``).
    """
    found: dict[str, Counter[str]] = {}
    studies: dict[str, str] = {}
    results: list[tuple[str, str, str]] = []
    for instance_id in pacs.instances():
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance_id)))
        sop_class = str(ds.SOPClassUID)
        studies[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
        if sop_class == SopClass.COMPREHENSIVE_3D_SR:
            source = read_structured_report(ds).source_sop_instance_uid
            results.append((source, "SR", str(ds.StudyInstanceUID)))
        elif ds.get("Modality") == "OT" and "SourceImageSequence" in ds:
            source = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            results.append((source, "SC", str(ds.StudyInstanceUID)))
    for source, kind, study in results:
        key = source if studies.get(source) == study else f"{source} elsewhere"
        found.setdefault(key, Counter())[kind] += 1
    return found
