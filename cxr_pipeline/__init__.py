"""cxr-pipeline: Deep-COVID chest X-ray classifiers for a hospital imaging network.

The library holds every stage of the job (ingest, preprocess, models, inference,
explain, DICOM encoders, sending); ``listeners``, ``workers`` and ``training`` use it,
and it imports none of them.
"""

__version__ = "0.1.0"
