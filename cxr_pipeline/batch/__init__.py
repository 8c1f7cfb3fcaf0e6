"""``cxr-batch``: retrospective classification of folders of radiographs.

:func:`cxr_pipeline.batch.runner.run_batch` walks files and folders
(:mod:`~cxr_pipeline.batch.walker`), decodes in worker processes
(:mod:`~cxr_pipeline.batch.decode`), classifies in batches and writes one report row per
file, resumably (:mod:`~cxr_pipeline.batch.report`); :mod:`~cxr_pipeline.batch.cli` is
the ``cxr-batch`` command. The package itself imports nothing heavy, so the walker and
the report can be used without loading torch. The top of the library: may import every
other subpackage (``service`` for sending results) and the shared modules.
"""

FORK_SERVER_PRELOAD: tuple[str, ...] = (
    "__main__",
    "cxr_pipeline.batch.decode",
    "cxr_pipeline.batch.handoff",
    "cxr_pipeline.batch.runner",
)
"""Modules the decode processes' fork server imports once, so each decode process starts
as a cheap fork of it. ``"__main__"`` too: a child whose main module is already imported
skips re-running it (multiprocessing's main-module fix-up), which otherwise cost each new
pool about 0.4 s of imports (highdicom, matplotlib, pynetdicom) on a 2-core machine.
Names only, so :mod:`cxr_pipeline.batch.cli` can start the server before it imports torch."""
