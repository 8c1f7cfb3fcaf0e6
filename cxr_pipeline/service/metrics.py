"""Prometheus metrics and a health check for the listener and the workers.

The instruments are module-level, as ``prometheus_client`` intends: each process (the
listener, each worker) counts what it does and serves its own ``/metrics``. Counters and
histograms are updated where the work happens (the C-STORE handler,
:mod:`cxr_pipeline.service.jobs`);
the ledger's view (jobs by state, queue depth) and the spool's free space are read at scrape
time by :class:`LedgerCollector`, so they are never stale and cost nothing between scrapes.

:func:`start_metrics_server` serves ``/metrics`` (Prometheus text format) and ``/healthz``
(JSON, HTTP 200 when healthy, 503 otherwise) from a daemon thread. prometheus_client's own
``start_http_server`` answers every path with the metrics, so it cannot also serve a health
check; this is the same ``wsgiref`` server it uses, with a small router in front.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from cxr_pipeline.results import Finding

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("ingest", "infer", "explain", "encode", "send")
"""Stages whose latency is observed in ``cxr_stage_seconds`` (the first four are the keys of
:attr:`cxr_pipeline.results.Analysis.timings_ms`)."""

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RECEIVED = Counter(
    "cxr_instances_received",
    "C-STORE requests that reached the handler (every outcome).",
)
ACCEPTED = Counter(
    "cxr_instances_accepted",
    "Chest radiographs answered Success, spooled and queued for analysis.",
)
SKIPPED = Counter(
    "cxr_instances_skipped",
    "Instances acknowledged or processed but not analysed, by reason code.",
    ["reason"],
)
REFUSED = Counter(
    "cxr_instances_refused",
    "C-STORE requests answered with a failure status, by status code.",
    ["status"],
)
JOBS_DONE = Counter(
    "cxr_jobs_done",
    "Jobs finished, by where the results went (sent, kept locally).",
    ["outcome"],
)
JOBS_FAILED = Counter(
    "cxr_jobs_failed",
    "Jobs recorded FAILED, by reason code.",
    ["reason"],
)
SEND_RETRIES = Counter(
    "cxr_send_retries",
    "C-STORE attempts of results that failed and were tried again.",
)
ASSOCIATIONS_REFUSED = Counter(
    "cxr_associations_refused",
    "Connections the listener refused or ended, by reason: address_cap, listener_full, "
    "known_peer_reserve (refused on arrival), request_timeout (no association in time), "
    "idle_timeout (an idle association released), calling_ae, called_ae, pdu_too_large.",
    ["reason"],
)
ASSOCIATIONS_ACTIVE = Gauge(
    "cxr_associations_active",
    "Connections holding one of the listener's association slots (association requested "
    "or established), by peer kind: known (a send.known_peers address) or unknown.",
    ["peer_kind"],
)
STAGE_SECONDS = Histogram(
    "cxr_stage_seconds",
    "Latency of one image per stage.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)


PROBABILITY_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Buckets of ``cxr_covid_probability`` (the calibrated probability, not the raw score)."""

PROBABILITY = Histogram(
    "cxr_covid_probability",
    "Calibrated COVID-19 probability of each analysed image (the number the SR and SC show).",
    buckets=PROBABILITY_BUCKETS,
)
FINDINGS = Counter(
    "cxr_findings",
    "Analysed images by decision at the operating point (suspected / not_suspected).",
    ["decision"],
)
OPERATING_THRESHOLD = Gauge(
    "cxr_operating_threshold",
    "Decision threshold on the calibrated probability scale, by what set it (model card or "
    "site profile) and the sensitivity it was chosen for (empty when not recorded).",
    ["decided_by", "target_sensitivity"],
)


def observe_finding(finding: Finding) -> None:
    """Record one image's calibrated probability, its decision and the operating point.

    Parameters
    ----------
    finding
        The reported finding (:meth:`cxr_pipeline.model.inference.Predictor.finding`).
    """
    PROBABILITY.observe(finding.probability)
    FINDINGS.labels(decision="suspected" if finding.positive else "not_suspected").inc()
    target = "" if finding.target_sensitivity is None else f"{finding.target_sensitivity:g}"
    OPERATING_THRESHOLD.labels(decided_by=finding.decided_by,
                               target_sensitivity=target).set(finding.threshold)


def observe_timings(timings_ms: Mapping[str, float]) -> None:
    """Record the per-stage timings of one analysis (milliseconds) in ``cxr_stage_seconds``.

    Parameters
    ----------
    timings_ms
        Stage name -> milliseconds; names outside :data:`STAGES` are ignored.
    """
    for stage, ms in timings_ms.items():
        # A Celery micro-batch reports its per-image share of one forward pass.
        name = "infer" if stage == "batch_infer" and "infer" not in timings_ms else stage
        if name in STAGES:
            STAGE_SECONDS.labels(stage=name).observe(ms / 1000.0)


class _StateSource(Protocol):
    def counts(self) -> Mapping[Any, int]: ...


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by object
class LedgerCollector(Collector):
    """Gauges read at scrape time: jobs by state, queue depth, spool free bytes.

    Parameters
    ----------
    ledger
        Anything with ``counts() -> {JobState: int}`` (the listener's ledger).
    free_bytes
        Returns the spool's free bytes.
    waiting_states
        States that count as waiting in the queue (RECEIVED, QUEUED).
    """

    ledger: _StateSource
    free_bytes: Callable[[], int]
    waiting_states: tuple[str, ...] = ("received", "queued")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges (called by the registry on each scrape)."""
        jobs = GaugeMetricFamily("cxr_jobs", "Ledger rows by state.", labels=["state"])
        counts = {str(getattr(k, "value", k)): int(v) for k, v in self.ledger.counts().items()}
        for state, count in sorted(counts.items()):
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "cxr_queue_depth",
            "Jobs waiting for a worker (ledger rows received or queued).",
            value=sum(counts.get(s, 0) for s in self.waiting_states),
        )
        yield GaugeMetricFamily(
            "cxr_spool_free_bytes",
            "Free bytes on the spool's file system.",
            value=self.free_bytes(),
        )


HealthCheck = Callable[[], Mapping[str, bool]]
"""Returns named checks (``{"ledger": True, "spool_space": False, ...}``); healthy when all
are true."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


@dataclass
class MetricsServer:
    """A running ``/metrics`` + ``/healthz`` endpoint."""

    server: WSGIServer
    thread: threading.Thread
    registry: CollectorRegistry
    collectors: tuple[Collector, ...] = ()

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        for collector in self.collectors:
            self.registry.unregister(collector)


def _app(
    registry: CollectorRegistry, health: HealthCheck
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            try:
                checks = {name: bool(ok) for name, ok in health().items()}
            except Exception as exc:  # a broken check is an unhealthy answer, not a crash
                checks = {"check_raised_" + type(exc).__name__: False}
            healthy = all(checks.values())
            body = json.dumps({"status": "ok" if healthy else "unhealthy", "checks": checks})
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body.encode()]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


def start_metrics_server(
    host: str,
    port: int,
    health: HealthCheck,
    *,
    collectors: Iterable[Collector] = (),
    registry: CollectorRegistry = REGISTRY,
) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` in a daemon thread.

    Parameters
    ----------
    host, port
        Where to listen (port 0: any free port, see :attr:`MetricsServer.port`).
    health
        The checks behind ``/healthz``.
    collectors
        Extra collectors to register (e.g. a :class:`LedgerCollector`).
    registry
        The registry to expose (the default one holds this module's instruments).

    Returns
    -------
    MetricsServer
        Serving; call :meth:`MetricsServer.stop` at shutdown.

    Raises
    ------
    OSError
        The port cannot be bound.
    """
    server = make_server(
        host,
        port,
        _app(registry, health),
        server_class=_ThreadingServer,
        handler_class=_QuietHandler,
    )
    extra = tuple(collectors)
    for collector in extra:
        registry.register(collector)
    thread = threading.Thread(target=server.serve_forever, name="cxr-metrics", daemon=True)
    thread.start()
    return MetricsServer(server=server, thread=thread, registry=registry, collectors=extra)
