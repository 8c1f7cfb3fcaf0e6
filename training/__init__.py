"""Training, evaluation and the packaged default model (``cxr-split``, ``cxr-train``, ``cxr-eval``).

Uses the library's own preprocessing (:mod:`cxr_pipeline.model.preprocess`) and model registry
(:mod:`cxr_pipeline.model.architectures`), so a trained checkpoint runs in the pipeline exactly
as it was trained. The library never imports this package.
"""
