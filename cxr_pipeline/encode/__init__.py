"""DICOM result objects: the TID 1500 SR, the heatmap Secondary Capture, SR read-back.

Everything is built with highdicom; UIDs come from :mod:`cxr_pipeline.uids`, codes from
:mod:`cxr_pipeline.codes`.
"""

from cxr_pipeline.encode.reading import ReadBack, read_structured_report
from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report

__all__ = [
    "ReadBack",
    "build_secondary_capture",
    "build_structured_report",
    "read_structured_report",
]
