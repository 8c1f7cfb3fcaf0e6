"""A retrospective run straight from a PACS: query, retrieve, analyse, report, resumably.

:func:`run_remote` asks the archive (:mod:`~cxr_pipeline.batch.remote`), retrieves in the
background (:mod:`~cxr_pipeline.batch.retrieval`) and analyses what arrives with the same
decode processes, model, SR / SC writing and sending as a folder run
(:func:`~cxr_pipeline.batch.runner.process_feed`). The report names each instance by where
it lives in the archive; a rerun on the same output folder queries again and skips every
SOP Instance UID already reported, so it retrieves, analyses and sends nothing twice,
while the instances an earlier run could not fetch or send are done again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cxr_pipeline.batch.remote import (
    RETRYABLE_REASONS,
    RemoteQuery,
    RemoteSource,
    RunPlan,
    StudyMatch,
    match_studies,
    plan_run,
)
from cxr_pipeline.batch.report import ReportWriter, Row, Status, Summary
from cxr_pipeline.batch.retrieval import Feed, Retriever, plan_rows
from cxr_pipeline.batch.runner import (
    BatchOptions,
    RowHook,
    RunContext,
    decode_pool,
    decode_workers,
    process_feed,
)
from cxr_pipeline.batch.walker import InputFile
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.settings import Settings

log = logging.getLogger(__name__)

RETRIEVED_DIR = "retrieved"
"""Where retrieved images wait under the output folder until their row is written."""

PlanHook = Callable[[RunPlan], None]
"""Called once with the plan, before anything is retrieved."""
StudyHook = Callable[[StudyMatch], None]
"""Called after each study is listed (series and instances queried)."""


def _clear_staging(folder: Path) -> None:
    """Delete retrieved files an interrupted run left (they are fetched again if needed)."""
    for path in folder.iterdir():
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def run_remote(
    source: RemoteSource,
    query: RemoteQuery,
    out_dir: Path | str,
    settings: Settings,
    options: BatchOptions | None = None,
    *,
    predictor: Predictor | None = None,
    on_studies: Callable[[int], None] | None = None,
    on_study: StudyHook | None = None,
    on_plan: PlanHook | None = None,
    on_row: RowHook | None = None,
) -> Summary:
    """Analyse the images a PACS query matches and report one row per instance.

    Parameters
    ----------
    source
        The PACS (:class:`~cxr_pipeline.batch.pacs.DimseSource` or
        :class:`~cxr_pipeline.batch.web_source.DicomwebSource`); not closed here.
    query
        Study date, modalities, accession number, most studies.
    out_dir
        Output folder: report, SR / SC files; ``retrieved/`` while the run goes on.
    settings
        ``settings.batch`` (retrieval limits, decode workers...), ``model``, ``ingest``,
        ``output``, ``send``.
    options
        SR / SC / heatmaps / where to send results.
    predictor
        A loaded model; None loads ``settings.model`` (only if something is retrieved).
    on_studies, on_study, on_plan, on_row
        Progress hooks: studies matched, each study listed, the plan, each row.

    Returns
    -------
    Summary
        As a folder run's; instances the PACS could not deliver are failed rows with
        reason ``retrieve_failed`` (or ``query_failed`` for a study that could not be
        listed), which the next run retries.

    Raises
    ------
    QueryError
        The study-level query failed: the PACS is down or refuses us (nothing written).
    """
    options = options or BatchOptions()
    wall_start = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / RETRIEVED_DIR
    staging.mkdir(exist_ok=True)
    if not settings.batch.keep_retrieved:
        _clear_staging(staging)
    studies = match_studies(source, query)
    if on_studies is not None:
        on_studies(len(studies))
    matched = {s.study_uid for s in studies}

    def redo(row: Row) -> bool:
        # Failed because the PACS or the destination was unavailable (or, with
        # --retry-failed, for any reason) in a study this query matches again.
        again = settings.batch.retry_failed or row.reason in RETRYABLE_REASONS
        return row.status == Status.FAILED and again and row.study_instance_uid in matched

    summary = Summary()
    with ReportWriter.open(out, redo=redo) as report:
        done = {row.sop_instance_uid for row in report.kept_rows if row.sop_instance_uid}
        plan = plan_run(
            source,
            query,
            studies,
            done,
            max_consecutive_failures=settings.batch.max_consecutive_failures,
            on_study=on_study,
        )
        summary.already_done = plan.already_done
        if on_plan is not None:
            on_plan(plan)
        workers = decode_workers(settings)
        room = 2 * (settings.batch.batch_size + workers)
        feed = Feed(room=room)
        for row in plan_rows(plan, source.label):
            feed.put(row)
        retriever = Retriever(source, plan.work, feed, staging, settings.batch)

        def item_done(item: InputFile) -> None:
            if not settings.batch.keep_retrieved:
                with contextlib.suppress(FileNotFoundError):
                    item.path.unlink()
            feed.release()

        try:
            if plan.work:
                retriever.start()
                threads = torch.get_num_threads()
                executor = decode_pool(settings, workers)
                try:
                    predictor = predictor or Predictor.from_settings(settings.model)
                    run = RunContext(
                        settings, options, report, predictor, summary, on_row, item_done
                    )
                    process_feed(run, feed, executor)
                finally:
                    executor.shutdown(wait=True, cancel_futures=True)
                    torch.set_num_threads(threads)
            else:
                feed.close()
                while (item := feed.take()) is not None:
                    if isinstance(item, Row):
                        report.write(item)
                        summary.add(item)
                        if on_row is not None:
                            on_row(item)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            feed.cancel()
            if plan.work:
                retriever.join(timeout=max(60.0, 2 * settings.send.timeout_s))
    summary.wall_s = time.perf_counter() - wall_start
    return summary
