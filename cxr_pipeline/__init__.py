"""cxr-pipeline: Deep-COVID chest X-ray classifiers for a hospital imaging network.

The library, in subpackages along the data's path (each ``__init__`` says what its folder
holds and what it may import)::

    dicom/    decode, chest policy (ingest), PNG/JPEG pictures, codes and UIDs
    model/    architectures, the model card, preprocessing, augmentation, inference
    explain/  heatmaps (Grad-CAM, occlusion)
    encode/   the DICOM results: TID 1500 SR, heatmap Secondary Capture, SR read-back
    service/  the running service: spool, ledger, jobs, delivery, DICOM send, TLS, audit
    batch/    cxr-batch, retrospective runs over folders

At the top sit only what every stage shares (``settings``, ``errors``, ``results``,
``logs``), the one-image ``pipeline`` that joins dicom -> model -> explain -> encode, and
``__main__``. Imports only go down that list (``tests/unit/test_layers.py`` checks it):
the shared modules import no subpackage, ``dicom`` nothing above it, ``model`` at most
``dicom``, and so on; ``service`` and ``batch`` may use everything below them. The library
imports none of ``listeners``, ``workers``, ``training`` or ``viewer``.
"""

__version__ = "0.1.0"
