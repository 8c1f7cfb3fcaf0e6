"""Local validation on a site's own labelled DICOM (``cxr-validate``) and its site profile.

``labels`` reads and checks the site's ``LABELS.csv`` and matches it to files; ``stats``
computes the figures (AUC with a patient bootstrap interval, sensitivity and specificity
with Wilson intervals, calibration); ``profile`` fits a site profile (local calibration map
and a threshold for a target sensitivity) and estimates what it does on new patients by
cross-fitting; ``plots`` and ``report`` write the person-readable report and
``report.json``; ``cli`` is the command, which classifies through ``cxr-batch``'s runner.
"""
