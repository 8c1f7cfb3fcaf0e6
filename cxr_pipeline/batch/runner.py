"""Run a retrospective batch: decode in worker processes, classify in batches, report.

The main process loads the model once and runs it; decode processes (forkserver or
spawn, never fork: the main process holds the model and its threads) read, check and
preprocess files ahead of it, so decoding and inference overlap. Every input file gets
exactly one report row; a run on the same output folder resumes where the last stopped.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import image as mpl_image
from pydicom.dataset import Dataset

from cxr_pipeline.batch import FORK_SERVER_PRELOAD
from cxr_pipeline.batch.decode import (
    Decoded,
    DecodeJob,
    init_decode_process,
)
from cxr_pipeline.batch.handoff import Handoff, decode_to_shared_memory, take
from cxr_pipeline.batch.report import ReportWriter, Row, Status, Summary
from cxr_pipeline.batch.retrieval import Feed
from cxr_pipeline.batch.walker import FileKind, InputFile, walk
from cxr_pipeline.encode.secondary_capture import build_secondary_capture
from cxr_pipeline.encode.structured_report import build_structured_report
from cxr_pipeline.errors import CxrError, Reason
from cxr_pipeline.explain.heatmap import heatmap_for_image
from cxr_pipeline.model.inference import Predictor
from cxr_pipeline.results import Finding
from cxr_pipeline.service.send import send_datasets
from cxr_pipeline.settings import Destination, Settings

MAX_DECODE_ATTEMPTS = 2
"""A file in flight when a decode process died this many times is reported as failed."""


@dataclass(frozen=True)
class BatchOptions:
    """What to produce besides the report.

    Attributes
    ----------
    write_sr, write_sc
        Write the TID 1500 SR / heatmap Secondary Capture of each DICOM input into the
        output folder, as ``<study>/<series>/<sop>.dcm``.
    heatmaps
        Compute heatmaps (``settings.explain``); blended into the SC when written,
        otherwise saved as ``heatmaps/<name>.png``.
    send
        C-STORE the written objects to this peer.
    """

    write_sr: bool = False
    write_sc: bool = False
    heatmaps: bool = False
    send: Destination | None = None

    @property
    def needs_image(self) -> bool:
        """Decoded pixels must come back from the decode processes."""
        return self.write_sc or self.heatmaps


StartHook = Callable[[int, int], None]
"""Called once with (files to do, files already done) before processing starts."""
RowHook = Callable[[Row], None]
"""Called after each row is written."""


def decode_workers(settings: Settings) -> int:
    """Return the number of decode processes: the setting, or the CPU count when 0."""
    return settings.batch.decode_workers or os.cpu_count() or 1


def model_threads(settings: Settings, workers: int, *, decoding: bool = True) -> int:
    """Return the model's intra-op threads.

    The setting when given; otherwise the cores the decode processes leave free while
    they are decoding (at least one), and every core once they are idle (end of a run).
    """
    if settings.batch.torch_threads > 0:
        return settings.batch.torch_threads
    cores = os.cpu_count() or 1
    return max(1, cores - workers) if decoding else cores


def decode_pool(settings: Settings, workers: int) -> ProcessPoolExecutor:
    """Start the decode processes (forkserver or spawn), each set up for decoding."""
    context = multiprocessing.get_context(settings.batch.start_method)
    if settings.batch.start_method == "forkserver":
        # Import torch and the decoders once in the fork server; each decode
        # process then starts as a cheap fork of it.
        context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=init_decode_process
    )
    # Start the processes now (they start on demand otherwise), so their imports overlap
    # with loading the model in the main process.
    for _ in range(workers):
        executor.submit(os.getpid)
    return executor


class RunContext:
    """State of one run: the report, the model, the options.

    Parameters
    ----------
    settings, options
        What to do.
    report, summary
        Where rows go.
    predictor
        The loaded model.
    on_row
        Called after each row is written.
    on_item_done
        Called with the input file of each row once it is written (a PACS run deletes the
        retrieved file and makes room for the next).
    """

    def __init__(
        self,
        settings: Settings,
        options: BatchOptions,
        report: ReportWriter,
        predictor: Predictor,
        summary: Summary,
        on_row: RowHook | None,
        on_item_done: Callable[[InputFile], None] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.report = report
        self.predictor = predictor
        self.summary = summary
        self.on_row = on_row
        self.on_item_done = on_item_done
        self.out_dir = report.out_dir

    def emit(self, row: Row, item: InputFile | None = None) -> None:
        """Write one row (and let go of its input file)."""
        self.report.write(row)
        self.summary.add(row)
        if item is not None and self.on_item_done is not None:
            self.on_item_done(item)
        if self.on_row is not None:
            self.on_row(row)

    def emit_unanalysed(self, decoded: Decoded) -> None:
        """Write the row of a file that was skipped or failed before the model."""
        self.emit(
            Row.for_file(
                decoded.item,
                kind=decoded.kind.value,
                status=(decoded.status or Status.FAILED).value,
                reason=decoded.reason,
                detail=decoded.detail,
                sop_instance_uid=decoded.sop_instance_uid,
                study_instance_uid=decoded.study_instance_uid,
                series_instance_uid=decoded.series_instance_uid,
                decode_ms=round(decoded.decode_ms, 3),
            ),
            decoded.item,
        )

    def classify(self, batch: list[Decoded]) -> None:
        """Run the model on a batch of decoded files and finish each one."""
        card = self.predictor.card
        start = time.perf_counter()
        try:
            stacked = torch.from_numpy(np.stack([d.tensor for d in batch if d.tensor is not None]))
            probabilities = self.predictor.predict_tensors(stacked)
        except Exception as exc:  # the batch's files get a row each, the run goes on
            for decoded in batch:
                decoded.status, decoded.reason = Status.FAILED, Reason.MODEL_ERROR.value
                decoded.detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.emit_unanalysed(decoded)
            return
        infer_ms = (time.perf_counter() - start) * 1000.0 / len(batch)
        for decoded, probability in zip(batch, probabilities, strict=True):
            finding = self.predictor.finding(float(probability))
            row = Row.for_file(
                decoded.item,
                kind=decoded.kind.value,
                status=Status.DONE.value,
                sop_instance_uid=decoded.sop_instance_uid,
                study_instance_uid=decoded.study_instance_uid,
                series_instance_uid=decoded.series_instance_uid,
                probability=round(finding.probability, 6),
                positive=finding.positive,
                threshold=finding.threshold,
                score=finding.score,
                decided_by=finding.decided_by,
                model_name=card.name,
                model_version=card.version,
                decode_ms=round(decoded.decode_ms, 3),
                infer_ms=round(infer_ms, 3),
            )
            try:
                self.finish(decoded, finding, row)
            except CxrError as exc:
                row.status, row.reason, row.detail = (
                    Status.FAILED.value,
                    exc.reason.value,
                    exc.detail,
                )
            except Exception as exc:  # an encoder bug must not stop the batch either
                row.status, row.reason = Status.FAILED.value, Reason.ENCODE_ERROR.value
                row.detail = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.emit(row, decoded.item)

    def finish(self, decoded: Decoded, finding: Finding, row: Row) -> None:
        """Heatmap, SR, SC, send for one classified file, as the options ask."""
        options, settings, card = self.options, self.settings, self.predictor.card
        heatmap: np.ndarray | None = None
        if options.heatmaps and decoded.pixels is not None:
            start = time.perf_counter()
            heatmap = heatmap_for_image(self.predictor, decoded.pixels, settings.explain)
            row.explain_ms = round((time.perf_counter() - start) * 1000.0, 3)
            if heatmap is not None and (decoded.header is None or not options.write_sc):
                row.outputs.append(self._save_heatmap(decoded, heatmap))
        if not (options.write_sr or options.write_sc):
            return
        if decoded.header is None:
            row.detail = "no DICOM header (picture input): no SR or SC written"
            return
        start = time.perf_counter()
        datasets: list[Dataset] = []
        if options.write_sr:
            datasets.append(
                build_structured_report(
                    decoded.header, finding, card, settings.output, heatmap=heatmap
                )
            )
        if options.write_sc and decoded.pixels is not None:
            datasets.append(
                build_secondary_capture(
                    decoded.header, decoded.pixels, heatmap, finding, card, settings.output
                )
            )
        row.outputs.extend(self._save_dataset(ds) for ds in datasets)
        row.encode_ms = round((time.perf_counter() - start) * 1000.0, 3)
        if options.send is not None:
            start = time.perf_counter()
            send_datasets(datasets, options.send, settings.send)
            row.send_ms = round((time.perf_counter() - start) * 1000.0, 3)

    def _save_dataset(self, ds: Dataset) -> str:
        # Same layout as pipeline.write_results, which writes an SR and an SC together;
        # here either may be asked for alone.
        relative = Path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        (self.out_dir / relative).mkdir(parents=True, exist_ok=True)
        target = relative / f"{ds.SOPInstanceUID}.dcm"
        tmp = self.out_dir / target.with_suffix(".dcm.tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, self.out_dir / target)
        return target.as_posix()

    def _save_heatmap(self, decoded: Decoded, heatmap: np.ndarray) -> str:
        if decoded.sop_instance_uid:
            name = decoded.sop_instance_uid
        else:
            digest = hashlib.sha256(str(decoded.item.path).encode()).hexdigest()[:10]
            name = f"{decoded.item.path.stem}-{digest}"
        target = Path("heatmaps", f"{name}.png")
        (self.out_dir / "heatmaps").mkdir(exist_ok=True)
        mpl_image.imsave(self.out_dir / target, heatmap, vmin=0.0, vmax=1.0, cmap="jet")
        return target.as_posix()


def run_batch(
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    settings: Settings,
    options: BatchOptions | None = None,
    *,
    predictor: Predictor | None = None,
    on_start: StartHook | None = None,
    on_row: RowHook | None = None,
) -> Summary:
    """Analyse every file under the inputs and report one row per file.

    Parameters
    ----------
    inputs
        Files and folders (walked recursively) of DICOM files and/or PNG/JPEG pictures.
    out_dir
        Output folder: ``results.csv``, ``results.jsonl`` and any SR / SC / heatmap files.
        Rows already there for unchanged files are kept and those files not redone.
    settings
        ``settings.batch`` (workers, batch size...), ``settings.model`` (checkpoint),
        ``settings.ingest`` (chest policy), ``explain``, ``output``, ``send``.
    options
        SR / SC / heatmaps / send.
    predictor
        A loaded model; None loads ``settings.model`` (with its site profile, if set).
        Earlier rows classified by another model or operating point are done again.
    on_start, on_row
        Progress hooks.

    Returns
    -------
    Summary
        Counts by status, positives, timings; ``interrupted`` after Ctrl-C (the rows
        written until then are complete and a later run resumes).
    """
    options = options or BatchOptions()
    wall_start = time.perf_counter()
    out = Path(out_dir).resolve()
    files = list(walk(inputs, exclude=[out]))
    summary = Summary()
    if not files:
        summary.wall_s = time.perf_counter() - wall_start
        return summary
    threads = torch.get_num_threads()
    # Started first, so the decode processes' imports overlap with loading the model.
    executor = decode_pool(settings, decode_workers(settings))
    try:
        # Loaded before the report is touched: a checkpoint or site profile that cannot be
        # used fails here, and the report's rows are checked against what decides now.
        predictor = predictor or Predictor.from_settings(settings.model)
        current = _decision_maker(predictor)
        with ReportWriter.open(
            out,
            files,
            retry_failed=settings.batch.retry_failed,
            keep=lambda row: row.status != Status.DONE or _decided_by(row) == current,
        ) as report:
            finished = report.finished
            todo = [item for item in files if item.key not in finished]
            summary.already_done = len(files) - len(todo)
            if on_start is not None:
                on_start(len(todo), summary.already_done)
            if todo:
                try:
                    run = RunContext(settings, options, report, predictor, summary, on_row)
                    process_feed(run, Feed.of(todo), executor)
                except KeyboardInterrupt:
                    summary.interrupted = True
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    summary.wall_s = time.perf_counter() - wall_start
    return summary


def _decision_maker(predictor: Predictor) -> tuple[str, str, str]:
    """Model name, version and what decides (card or site profile) for this run's rows."""
    card = predictor.card
    return (card.name, card.version, predictor.finding(0.5).decided_by)


def _decided_by(row: Row) -> tuple[str, str, str]:
    """Give the same triple for a row an earlier run wrote.

    A row of another model or operating point, or from before rows recorded what decided,
    is done again.
    """
    return (row.model_name, row.model_version, row.decided_by)


FEED_POLL_S = 0.2
"""How long the run loop waits for the decode processes before it looks at the feed again,
while retrieval may still bring files."""


def process_feed(run: RunContext, feed: Feed, executor: ProcessPoolExecutor) -> None:
    """Decode, classify and report every item of a feed until it is finished.

    Parameters
    ----------
    run
        The run's report, model and options.
    feed
        Files to analyse and rows to write as they are; a folder run's is closed and full
        from the start, a PACS run's fills as retrieval goes on.
    executor
        The decode processes (replaced if one of them dies).
    """
    settings, options = run.settings, run.options
    workers = decode_workers(settings)
    batch_size = max(1, settings.batch.batch_size)
    in_flight = settings.batch.max_in_flight or (
        batch_size + workers if options.needs_image else 2 * batch_size + workers
    )
    fit_model = False
    if options.needs_image:
        max_side = settings.output.sc_max_size or None
    else:
        max_side = settings.batch.decode_max_side or None
        fit_model = settings.batch.decode_max_side is None
    spec = run.predictor.card.preprocessing

    def job(item: InputFile) -> DecodeJob:
        return DecodeJob(
            item=item,
            ingest=settings.ingest,
            spec=spec,
            max_side=max_side,
            fit_model=fit_model,
            keep_image=options.needs_image,
            keep_header=options.write_sr,
        )

    retry: list[InputFile] = []  # files of a crashed pool, before anything new
    attempts: dict[InputFile, int] = {}
    ready: list[Decoded] = []
    start = time.perf_counter()
    pending: dict[Future[Handoff], InputFile] = {}

    def next_item(timeout: float | None) -> InputFile | None:
        while retry or not feed.finished:
            if retry:
                return retry.pop()
            item = feed.take(timeout)
            if item is None:
                return None
            if isinstance(item, Row):
                run.emit(item)
                continue
            return item
        return None

    try:
        while pending or ready or retry or not feed.finished:
            while len(pending) < in_flight:
                # Nothing decoding and nothing to classify: wait for retrieval.
                idle = not pending and not ready
                item = next_item(FEED_POLL_S if idle else 0.0)
                if item is None:
                    break
                pending[executor.submit(decode_to_shared_memory, job(item))] = item
            if pending:
                # Block only when the model has nothing to do and no file can arrive;
                # otherwise just collect, or look at the feed again soon.
                block = len(ready) < batch_size
                timeout = (None if feed.finished else FEED_POLL_S) if block else 0
                done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                broken: list[InputFile] = []
                for future in done:
                    item = pending.pop(future)
                    try:
                        decoded = take(future.result())
                    except BrokenProcessPool:
                        broken.append(item)
                        continue
                    if decoded.tensor is None:
                        run.emit_unanalysed(decoded)
                    else:
                        ready.append(decoded)
                if broken:
                    # A decoder crashed its process (e.g. a native decoder on a hostile
                    # file): every job of that pool is lost. Start a fresh pool and retry
                    # them; a file in flight during repeated crashes is reported failed.
                    broken.extend(pending.values())
                    pending.clear()
                    executor.shutdown(wait=True, cancel_futures=True)
                    executor = decode_pool(settings, workers)
                    run.summary.decoder_restarts += 1
                    for item in broken:
                        attempts[item] = attempts.get(item, 0) + 1
                        if attempts[item] >= MAX_DECODE_ATTEMPTS:
                            run.emit_unanalysed(_crashed(item))
                        else:
                            retry.append(item)
            # A partial batch runs as soon as nothing else is decoding or waiting.
            if len(ready) >= batch_size or (ready and not pending and not retry and feed.empty):
                decoding = bool(pending or retry or not feed.finished)
                torch.set_num_threads(model_threads(settings, workers, decoding=decoding))
                run.classify(ready[:batch_size])
                del ready[:batch_size]
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        run.summary.process_s = time.perf_counter() - start


def _crashed(item: InputFile) -> Decoded:
    return Decoded(
        item=item,
        kind=FileKind.OTHER,
        status=Status.FAILED,
        reason=Reason.INTERNAL.value,
        detail="the decode process died while reading this file",
    )
