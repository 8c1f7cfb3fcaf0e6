"""``cxr-viewer``: look at results locally in OHIF v3 with Orthanc + DICOMweb behind it.

One process serves OHIF v3's built files and proxies ``/dicom-web`` to a private Orthanc
(same origin, so no CORS set-up), all on loopback by default.
"""
