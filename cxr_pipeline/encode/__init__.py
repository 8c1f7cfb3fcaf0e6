"""DICOM out: the TID 1500 SR, the heatmap Secondary Capture, and SR read-back.

Everything is built with highdicom; UIDs come from :mod:`cxr_pipeline.dicom.uids`, codes
from :mod:`cxr_pipeline.dicom.codes`. May import the shared top-level modules, ``dicom``
and ``model`` (the card); nothing of ``service`` or ``batch``.
"""
