"""``cxr-batch``: retrospective classification of folders of radiographs.

:func:`cxr_pipeline.batch.runner.run_batch` walks files and folders
(:mod:`~cxr_pipeline.batch.walker`), decodes in worker processes
(:mod:`~cxr_pipeline.batch.decode`), classifies in batches and writes one report row per
file, resumably (:mod:`~cxr_pipeline.batch.report`); :mod:`~cxr_pipeline.batch.cli` is
the ``cxr-batch`` command. The package itself imports nothing heavy, so the walker and
the report can be used without loading torch.
"""
