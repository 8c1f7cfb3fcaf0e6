"""``cxr-listen``: the C-STORE SCP that receives chest radiographs from a PACS.

With ``--dicomweb-port`` (``listener.dicomweb.port``) it also takes STOW-RS
(:mod:`listeners.stow`), through the same admission as C-STORE.

Accepts Verification and every storage SOP class (chest radiographs are analysed;
anything else auto-routed here is acknowledged and recorded as skipped) in the
transfer syntaxes we decode. Calling AE allow-list, optional Called AE check, association
slots by address (:mod:`listeners.admission`), timeouts and TLS come from ``[listener]``
settings. Without a broker the jobs run
in this process (:class:`workers.local.LocalWorkerPool`); with ``--broker`` they go to
Celery workers. On start, every unfinished job in the ledger is queued again.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from cxr_pipeline.dicom.codes import (
    ANALYSABLE_SOP_CLASSES,
    COMPRESSED_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    SopClass,
)
from cxr_pipeline.errors import CxrError
from cxr_pipeline.logs import configure_logging
from cxr_pipeline.service.audit import trail_for
from cxr_pipeline.service.ledger import Ledger
from cxr_pipeline.service.metrics import LedgerCollector, MetricsServer, start_metrics_server
from cxr_pipeline.service.send import describe_routing
from cxr_pipeline.service.spool import Spool
from cxr_pipeline.settings import Settings, load_settings, parse_destination
from listeners.admission import Admission, AdmissionPolicy
from listeners.handlers import StoreHandler, handle_echo
from listeners.security import EdgeGuard
from listeners.server import pdu_inspector, start_guarded_server
from listeners.stow import StowServer, start_stow_server
from listeners.tls import server_context
from workers.factory import make_queue
from workers.queue import JobQueue, ledger_path, spool_root

log = logging.getLogger("listeners.storescp")

ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    COMPRESSED_TRANSFER_SYNTAXES + UNCOMPRESSED_TRANSFER_SYNTAXES
)
"""Transfer syntaxes in the order we prefer them when a sender proposes several in one
context (pynetdicom accepts the first of ours the sender proposed). Compressed first, so
a compressed image arrives as stored, untouched: many senders (DCMTK storescu among
them) cannot decompress JPEG 2000 and would fail if we picked Explicit VR Little Endian,
and any transcoding by the sender risks a lossy re-encode. Senders propose a lossy
syntax only for data already lossy, unless configured to compress."""


PYNETDICOM_ASSOCIATION_CEILING = 1024
"""pynetdicom's own ``maximum_associations``, set out of the way: it counts every acceptor
thread, including those winding down after their socket was closed, and checks only once a
request was read. :mod:`listeners.admission` counts connections by address from accept
(``listener.max_associations`` and the per-address cap); this stays as a last bound."""


def build_ae(settings: Settings) -> AE:
    """Build the pynetdicom AE with our contexts and association policy.

    Parameters
    ----------
    settings
        ``[listener]``: AE title, allowed calling AEs, called-AE check, timeouts (the
        association limits are :mod:`listeners.admission`'s).

    Returns
    -------
    pynetdicom.AE
        Not yet listening.
    """
    listener = settings.listener
    ae = AE(ae_title=listener.ae_title)
    ae.add_supported_context(SopClass.VERIFICATION)
    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    # Analysable classes first so they are present even if pynetdicom's list changes.
    for sop_class in sorted(ANALYSABLE_SOP_CLASSES) + sorted(storage - ANALYSABLE_SOP_CLASSES):
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    if listener.allowed_calling_aes:
        # pynetdicom rejects others with result "rejected-permanent", source "service-user",
        # reason 3 "calling AE title not recognised" (PS3.8 9.3.4).
        ae.require_calling_aet = list(listener.allowed_calling_aes)
    ae.require_called_aet = listener.require_called_ae
    ae.maximum_associations = PYNETDICOM_ASSOCIATION_CEILING
    # ARTIM (a connection's wait for its A-ASSOCIATE-RQ; pynetdicom's default is 30 s) and
    # the wait for an A-RELEASE-RP. A PACS sends its request at once after connecting.
    ae.acse_timeout = listener.association_request_timeout_s
    # pynetdicom's idle limit counts whole PDUs: it would abort a slow link in the middle of
    # one. The admission watchdog measures idleness byte by byte instead.
    ae.network_timeout = None
    return ae


@dataclass
class Service:
    """A running listener: the server, its queue, ledger and spool."""

    settings: Settings
    server: ThreadedAssociationServer
    queue: JobQueue
    ledger: Ledger
    spool: Spool
    metrics: MetricsServer | None = None
    guard: EdgeGuard | None = None
    watchdog: threading.Event | None = None
    stow: StowServer | None = None
    admission: Admission | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        return int(self.server.server_address[1])

    def health(self) -> dict[str, bool]:
        """Run the checks behind ``/healthz``: listening, ledger readable, spool space."""
        sock = self.server.socket
        serving = sock is not None and sock.fileno() >= 0
        try:
            self.ledger.counts()
            ledger_ok = True
        except Exception:  # any database error makes the listener unhealthy
            ledger_ok = False
        space = self.spool.free_bytes() >= self.settings.listener.min_free_bytes
        return {"listening": serving, "ledger": ledger_ok, "spool_space": space}

    def stop(self) -> None:
        """Stop accepting associations, then let the queue finish and close."""
        if self.watchdog is not None:
            self.watchdog.set()
        if self.stow is not None:
            self.stow.stop()
        self.server.shutdown()
        self.queue.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.guard is not None:
            self.guard.application(started=False)


def start_service(settings: Settings, *, queue: JobQueue | None = None) -> Service:
    """Open spool and ledger, start the queue, re-queue unfinished work and listen.

    Parameters
    ----------
    settings
        All settings.
    queue
        The queue to use; None builds the one the settings ask for (may load the model).

    Returns
    -------
    Service
        Listening in background threads; call :meth:`Service.stop`.

    Raises
    ------
    ConfigError
        Bad TLS files or other invalid settings.
    OSError
        The port cannot be bound.
    """
    spool = Spool(spool_root(settings))
    partial = spool.remove_partial_files()
    if partial:
        log.info("removed %d half-written spool files of an interrupted run", len(partial))
    ledger = Ledger(ledger_path(settings))
    queue = queue if queue is not None else make_queue(settings, ledger, spool)
    unfinished = ledger.unfinished()
    for record in unfinished:
        queue.enqueue(record.sop_instance_uid)
    if unfinished:
        log.info("queued %d unfinished jobs again", len(unfinished))
    ae = build_ae(settings)
    listener = settings.listener
    # Issue 14: peers by address, audit trail, reasoned refusals (listeners/security.py).
    guard = EdgeGuard(settings, trail_for(settings), ledger)
    store = StoreHandler(settings, spool, ledger, queue)
    # Issue 21: slots by address, a reserve for known peers, short leashes.
    admission = Admission(AdmissionPolicy.from_settings(settings), guard.admission_acted)
    try:
        # pynetdicom's server with socket timeouts, admission and a PDU length bound
        # (listeners/server.py; hostile clients at the socket, issues 14 and 21).
        server, watchdog = start_guarded_server(
            ae,
            (listener.host, listener.port),
            evt_handlers=[
                (evt.EVT_C_STORE, guard.wrap_store(store)),
                (evt.EVT_C_ECHO, handle_echo),
                *guard.handlers(),
            ],
            ssl_context=server_context(
                listener.tls,
                on_error=guard.tls_error,
                inspector=pdu_inspector(guard.connection_refused, admission.touch),
            ),
            admission=admission,
            on_refused=guard.connection_refused,
        )
    except BaseException:
        queue.close()
        raise
    service = Service(settings=settings, server=server, queue=queue, ledger=ledger, spool=spool)
    service.guard, service.watchdog, service.admission = guard, watchdog, admission
    guard.application(started=True)
    try:
        # STOW-RS in (issue 20): the same admission as C-STORE, off unless configured.
        service.stow = start_stow_server(
            settings, store, on_refused=guard.connection_refused, on_tls_error=guard.tls_error
        )
    except BaseException:
        service.stop()
        raise
    endpoint = settings.metrics
    if endpoint.port is not None:
        try:
            service.metrics = start_metrics_server(
                endpoint.host,
                endpoint.port,
                service.health,
                collectors=[LedgerCollector(ledger, spool.free_bytes)],
            )
        except BaseException:
            service.stop()
            raise
        log.info("metrics on http://%s:%d/metrics", endpoint.host, service.metrics.port)
    log.info(
        "listening as %s on %s:%d (tls=%s, queue=%s)",
        listener.ae_title,
        listener.host,
        service.port,
        listener.tls.enabled,
        type(queue).__name__,
    )
    log.info("%s", describe_routing(settings.send, spool.kept))
    return service


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cxr-listen", description="Receive chest radiographs over DICOM and analyse them."
    )
    parser.add_argument("--port", type=int, help="TCP port (default: listener.port)")
    parser.add_argument("--ae-title", help="our AE title (default: listener.ae_title)")
    parser.add_argument("--host", help="address to bind (default: listener.host)")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $CXR_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="spool, ledger and outbox root")
    parser.add_argument("--broker", help="Celery broker URL (default: embedded workers)")
    parser.add_argument(
        "--send-to",
        action="append",
        metavar="AE@HOST:PORT",
        help="send results here (repeatable; replaces send.destinations). "
        "Default: send.destinations, else back to a known sending peer, else kept locally",
    )
    parser.add_argument("--log-level", help="logging level (default: log_level)")
    parser.add_argument(
        "--dicomweb-port",
        type=int,
        help="take STOW-RS (POST /studies) on this port (default: listener.dicomweb.port, off)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics and /healthz on this port (default: metrics.port)",
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load settings with the command-line options on top.

    Parameters
    ----------
    args
        Parsed ``cxr-listen`` options.

    Returns
    -------
    Settings
        The merged settings.
    """
    listener: dict[str, Any] = {}
    for option, key in (("port", "port"), ("ae_title", "ae_title"), ("host", "host")):
        value = getattr(args, option)
        if value is not None:
            listener[key] = value
    if args.dicomweb_port is not None:
        listener["dicomweb"] = {"port": args.dicomweb_port}
    overrides: dict[str, Any] = {}
    if listener:
        overrides["listener"] = listener
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.broker is not None:
        overrides["worker"] = {"broker_url": args.broker}
    if args.send_to:
        destinations = [parse_destination(t, option="--send-to") for t in args.send_to]
        overrides["send"] = {"destinations": [d.model_dump() for d in destinations]}
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.metrics_port is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    return load_settings(args.config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cxr-listen`` until SIGINT or SIGTERM.

    Returns
    -------
    int
        0 after a clean shutdown, 2 for invalid settings, 1 if the port cannot be bound.
    """
    args = _parse_args(argv)
    try:
        settings = settings_from_args(args)
    except CxrError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("%s", exc)
        return 2
    # Our INFO lines only: highdicom (about 20 lines per result object) and pynetdicom
    # (every PDU) are demoted to WARNING.
    configure_logging(settings.log_level)
    try:
        service = start_service(settings)
    except CxrError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.listener.host, settings.listener.port, exc)
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Machines and tests parse this line to know the listener is ready.
    print(f"cxr-listen ready on port {service.port}", flush=True)
    print(f"cxr-listen: {describe_routing(settings.send, service.spool.kept)}", flush=True)
    if service.stow is not None:
        scheme = "https" if service.stow.tls else "http"
        print(f"cxr-listen: STOW-RS on {scheme}://<host>:{service.stow.port}/studies", flush=True)
    if service.metrics is not None:
        where = f"http://{settings.metrics.host}:{service.metrics.port}"
        print(f"cxr-listen: metrics on {where}/metrics, health on {where}/healthz", flush=True)
    stop.wait()
    log.info("shutting down")
    service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
