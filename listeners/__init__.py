"""The DICOM network side: ``cxr-listen`` (C-STORE SCP) and ``cxr-status``."""
