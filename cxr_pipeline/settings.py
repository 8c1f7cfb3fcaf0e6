"""One typed settings object: TOML file + ``CXR_*`` environment overrides.

Precedence, highest first: keyword arguments given to :func:`load_settings`, environment
variables (``CXR_`` prefix, ``__`` between nested names, e.g. ``CXR_LISTENER__PORT=11112``,
lists and tables as JSON), the TOML file, then the defaults below. Unknown keys in any
source are an error at start-up (``extra="forbid"``), so a typo never passes silently.

Each section belongs to one stage of the pipeline; add a field to the section that owns it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cxr_pipeline.errors import ConfigError

CONFIG_ENV_VAR = "CXR_CONFIG"
"""Environment variable naming the TOML settings file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(_Section):
    """Which objects count as chest radiographs and what pixel data is accepted."""

    accepted_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    """Modalities analysed when the SOP class is a radiography class (CR, DX)."""
    accept_secondary_capture: bool = True
    """Also analyse Secondary Capture / other 2D X-ray objects whose headers say chest."""
    secondary_capture_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "RG"])
    """Modalities that mark a Secondary Capture as an X-ray image. Such an SC is analysed
    when its geometry is a radiograph's and no header names another body part."""
    chest_body_parts: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG"])
    """Body Part Examined values (upper-cased) that mean chest."""
    require_body_part: bool = False
    """Reject CR/DX images without Body Part Examined. When False, a missing body part is
    decided by view position and geometry."""
    chest_view_positions: list[str] = Field(
        default_factory=lambda: ["PA", "AP", "LL", "RL", "LATERAL", "AP SUPINE", ""]
    )
    """View Position values compatible with a chest radiograph ("" = absent)."""
    non_chest_terms: list[str] = Field(
        default_factory=lambda: [
            "SKULL",
            "HEAD",
            "NECK",
            "CSPINE",
            "TSPINE",
            "LSPINE",
            "SPINE",
            "ABDOMEN",
            "PELVIS",
            "HIP",
            "SHOULDER",
            "CLAVICLE",
            "HUMERUS",
            "ELBOW",
            "FOREARM",
            "WRIST",
            "HAND",
            "FINGER",
            "FEMUR",
            "KNEE",
            "TIBIA",
            "ANKLE",
            "FOOT",
            "EXTREMITY",
            "BREAST",
            "MAMMOGRAM",
            "DENTAL",
            "JAW",
        ]
    )
    """Words that, found in Study/Series Description or Protocol Name of an image without
    Body Part Examined, show it is not a chest radiograph."""
    min_size: int = 128
    """Smallest accepted Rows and Columns."""
    max_size: int = 8192
    """Largest accepted Rows and Columns (absurd sizes are rejected before decoding)."""
    max_aspect_ratio: float = 2.0
    """Longest side / shortest side above which an image is not a chest radiograph."""


class ModelSettings(_Section):
    """Which checkpoint to run and where."""

    checkpoint: Path | None = None
    """Checkpoint file (state dict + model card). None: the packaged default model."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    batch_size: int = 16
    """Largest inference micro-batch."""
    channels_last: bool = True
    """Use the channels-last memory format for convolution speed."""
    fold_batch_norm: bool = True
    """Run the forward pass on a copy with each convolution's batch norm folded into its
    weights (1.02-1.14x faster on CPU; probabilities move by < 1e-5)."""
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute type of the classifier's forward pass (``torch.autocast``). ``bfloat16`` about
    halves CPU time on processors with AVX-512 BF16 or AMX; with the default model on the 448
    shared pictures it moved probabilities by 0.0017 on average (0.011 at most) and flipped
    2 decisions at the threshold. ``float16`` is for GPUs. Heatmaps always run in float32."""
    site_profile: Path | None = None
    """Site profile TOML (from ``cxr-validate --fit-site-profile``): the site's own
    calibration map and threshold decide instead of the model card's. It must belong to the
    loaded model (name, version, Device UID), or start-up fails. None: the card decides."""


class ExplainSettings(_Section):
    """Heatmap method and its parameters."""

    method: Literal["gradcam", "occlusion", "none"] = "gradcam"
    occlusion_patch: int = 32
    """Occluding square side, in pixels of the 224 px model input."""
    occlusion_stride: int = 16
    """Step between occlusion positions, in model-input pixels."""
    occlusion_batch: int = 64
    """Occluded copies evaluated per forward pass."""


class OutputSettings(_Section):
    """How result objects (SR, SC) are written."""

    sr_series_number: int = 9901
    sc_series_number: int = 9902
    manufacturer: str = "cxr-pipeline"
    institution_name: str | None = None
    heatmap_alpha: float = Field(default=0.4, ge=0.0, le=1.0)
    """Opacity of the heatmap blended into the Secondary Capture where the map is 1
    (opacity scales with the map value, so cold regions keep the plain radiograph)."""
    heatmap_colormap: str = "jet"
    """Matplotlib colormap name used to colour the heatmap."""
    sc_max_size: int = Field(default=2048, ge=256, le=8192)
    """Longest side of the Secondary Capture (larger radiographs are downsampled)."""


class TlsSettings(_Section):
    """DICOM TLS for the listener."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    """CA bundle used to verify client certificates."""
    require_client_certificate: bool = False


class PeerTlsSettings(_Section):
    """DICOM TLS towards one peer (we are the TLS client): see :mod:`cxr_pipeline.service.tls`."""

    enabled: bool = False
    ca_certificates: Path | None = None
    """PEM CA bundle (or the peer's self-signed certificate) that signs the peer's
    certificate. None: the system's trust store."""
    certificate: Path | None = None
    """Our PEM client certificate, for peers that require one."""
    private_key: Path | None = None
    """Private key of ``certificate`` (None: the key is in the certificate file)."""
    verify: bool = True
    """Verify the peer's certificate chain and name. Off only for a lab peer."""
    server_name: str | None = None
    """Name expected in the peer's certificate (and sent as SNI). None: the peer's host."""


class DicomwebListenerSettings(_Section):
    """STOW-RS in: ``cxr-listen`` takes ``POST /studies`` (multipart/related) over HTTP(S).

    Each instance goes through the C-STORE path's checks, spool and ledger; HTTPS uses
    ``listener.tls`` (its certificate, key and client-certificate policy).
    """

    port: int | None = Field(default=None, ge=0, le=65535)
    """TCP port of the STOW-RS endpoint; None (default): off. 0 lets the system pick one."""
    host: str | None = None
    """Address to bind; None: ``listener.host``."""
    tokens_file: Path | None = None
    """File of accepted bearer tokens, one per line (``#`` comments and blank lines
    ignored). Read at start; never put tokens on the command line."""
    tokens_env: str | None = None
    """Name of an environment variable holding accepted bearer tokens (whitespace or comma
    separated), e.g. ``CXR_STOW_TOKENS``."""
    allow_anonymous: bool = False
    """Accept requests without a token. Only for a lab: with no token source configured the
    endpoint refuses to start unless this is true."""
    max_body_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    """Largest request body (Content-Length); larger requests get 413 before any byte of the
    body is read."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Longest time a request may take to arrive (headers and body), and the idle timeout of
    each read; a slower client gets 408 and nothing it sent is stored."""


class ListenerSettings(_Section):
    """The C-STORE SCP (``cxr-listen``)."""

    ae_title: str = Field(default="CXR_PIPELINE", min_length=1, max_length=16)
    """Our AE title (1-16 characters, PS3.5 AE)."""
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    """TCP port; 0 lets the system pick one (tests)."""
    allowed_calling_aes: list[str] = Field(default_factory=list)
    """Calling AE titles allowed to associate; empty = any."""
    require_called_ae: bool = False
    """Reject associations whose Called AE Title is not ours."""
    max_associations: int = Field(default=10, ge=1)
    """Connections that may hold an association at once (being requested or established):
    the listener's slots (``listeners/admission.py``)."""
    max_associations_per_address: int = Field(default=4, ge=1)
    """Slots one IP address may hold at once (known peers too). One more connection from
    that address is refused: A-ASSOCIATE-RJ (rejected-transient, local limit exceeded), or
    closed before its request is read when the address is already being refused twice."""
    reserved_for_known_peers: int = Field(default=4, ge=0)
    """Slots of ``max_associations`` only known peers may take (an address in
    ``send.known_peers[].addresses``, or a known peer's ``host`` written as an IP address),
    so a PACS always has room whatever unknown addresses hold. Applies only when some known
    peer has such an address (otherwise nobody could use the reserve). The default, the
    per-address cap, fits one PACS feeding the listener."""
    association_request_timeout_s: float = Field(default=5.0, gt=0.0)
    """A connection must have its association requested (TLS handshake and a complete
    A-ASSOCIATE-RQ) this many seconds after it was accepted, however it trickles bytes; then
    it is closed. Also pynetdicom's ARTIM and how long a release waits for its answer."""
    idle_timeout_s: float = Field(default=10.0, gt=0.0)
    """An established association of an unknown address that received nothing for this long
    (no P-DATA, no request being answered) is released (A-RELEASE-RQ), and aborted if the
    peer does not answer. A transfer whose bytes keep arriving is never cut."""
    known_peer_idle_timeout_s: float = Field(default=60.0, gt=0.0)
    """``idle_timeout_s`` for known peers (a PACS may keep an association open between
    studies)."""
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)
    """Free-space watermark of the spool's file system (bytes).

    Below it, C-STORE answers Out of Resources."""
    keep_received_files: bool = False
    """Keep spooled received files after their job is done or skipped (audit, debugging)."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    dicomweb: DicomwebListenerSettings = Field(default_factory=DicomwebListenerSettings)
    """STOW-RS in (``POST /studies``): off unless ``port`` is set."""


class WorkerSettings(_Section):
    """Where work is queued and how it is executed."""

    broker_url: str | None = None
    """None: embedded in-process worker pool. ``redis://host:port/db``: Celery on Redis."""
    concurrency: int = 1
    """Worker threads (embedded) or processes (Celery) per host."""
    micro_batch_wait_s: float = 0.05
    """How long a worker waits to gather more images into one GPU batch."""
    queue_name: str = "cxr"
    """Celery queue the listener publishes to and workers consume."""
    visibility_timeout_s: int = 3600
    """Redis transport: an unacknowledged task is redelivered this many seconds after its
    worker was last seen alive (a live worker refreshes its messages while it renews its
    leases, so this need not exceed the longest job)."""
    requeue_after_s: float = 60.0
    """Listener side: ledger rows still RECEIVED after this many seconds are enqueued again
    (covers a broker that was down when the image arrived)."""
    requeue_interval_s: float = 10.0
    """Listener side: how often the re-enqueue sweep runs."""
    task_time_limit_s: int = 1800
    """Hard time limit of one Celery task (the worker process is replaced after it)."""
    payload_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """Celery: most instance bytes the listener keeps in Redis for workers at once. Above
    it, received images wait in the listener's durable spool (still acknowledged to the
    modality) and are published as room frees: backpressure, not refusal. An image larger
    than the whole budget is published alone."""
    send_threads: int = Field(default=2, ge=1)
    """Celery: listener threads that C-STORE the results workers return through Redis."""
    lease_ttl_s: float = Field(default=15.0, gt=0.0)
    """Celery: a worker holds a per-UID lease in Redis while it runs a job, renewed every
    third of this (at most half of ``visibility_timeout_s``); a redelivered copy of a job
    another live worker holds is dropped (a copy waits up to two TTLs to tell a live holder
    from a dead one), and the listener's sweep leaves that row alone."""


class HttpAuthSettings(_Section):
    """Credentials of a DICOMweb peer.

    Read from a file or the environment when used, never from the command line or from
    the settings file itself.
    """

    bearer_token_file: Path | None = None
    """File holding the bearer token (its first line)."""
    bearer_token_env: str | None = None
    """Environment variable holding the bearer token."""
    username: str | None = None
    """User name for HTTP basic authentication (with ``password_file`` / ``password_env``)."""
    password_file: Path | None = None
    """File holding the basic-authentication password (its first line)."""
    password_env: str | None = None
    """Environment variable holding the basic-authentication password."""

    @model_validator(mode="after")
    def _one_scheme(self) -> HttpAuthSettings:
        token = self.bearer_token_file is not None or self.bearer_token_env is not None
        password = self.password_file is not None or self.password_env is not None
        if token and (password or self.username):
            raise ValueError("auth: a bearer token or basic authentication, not both")
        if password != (self.username is not None):
            raise ValueError("auth: basic authentication needs username and a password source")
        return self


DestinationKind = Literal["dimse", "dicomweb"]
"""How results reach a destination: DICOM C-STORE or DICOMweb STOW-RS."""


class Destination(_Section):
    """A peer results are sent to: a DICOM AE (C-STORE) or a DICOMweb service (STOW-RS)."""

    kind: DestinationKind = "dimse"
    """``dimse`` (ae_title, host, port) or ``dicomweb`` (url, auth)."""
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    url: str | None = None
    """DICOMweb base URL (``kind = "dicomweb"``), e.g. ``https://pacs/dicom-web``; STOW-RS
    posts to ``<url>/studies``. No credentials in it: use ``auth``."""
    auth: HttpAuthSettings = Field(default_factory=HttpAuthSettings)
    """DICOMweb credentials (bearer token or basic authentication); none by default."""
    tls: PeerTlsSettings = Field(default_factory=PeerTlsSettings)
    """DICOM TLS when sending to this peer (off by default). For ``dicomweb`` only its
    ``ca_certificates``, ``certificate``/``private_key`` and ``verify`` apply, to an
    ``https`` URL, whose certificate is verified unless ``verify = false``."""
    addresses: list[str] = Field(default_factory=list)
    """Known peers: host addresses or networks (``10.1.2.3``, ``10.1.0.0/16``, ``::1``) this
    AE title may call from. Empty: any address (storescp's default). Otherwise the listener
    rejects an association with this calling AE title from anywhere else (A-ASSOCIATE-RJ,
    calling AE title not recognised) and records a Security Alert. For admission, these
    addresses (and ``host`` when it is an IP address) are a known peer's: see
    ``listener.reserved_for_known_peers``."""

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP address or network: {text!r}") from exc
        return value

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "dicomweb":
            if self.url is None:
                raise ValueError("a dicomweb destination needs url")
            check_dicomweb_url(self.url)
        elif not (self.ae_title and self.host and self.port):
            raise ValueError("a dimse destination needs ae_title, host and port (1-65535)")
        elif len(self.ae_title) > 16:
            raise ValueError(f"AE title {self.ae_title!r} is longer than 16 characters")
        return self

    @property
    def label(self) -> str:
        """The peer for people and logs: ``AE@host:port`` or the URL (no credentials)."""
        if self.kind == "dicomweb":
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_dicomweb_url(url: str) -> str:
    """Check a DICOMweb base URL: http(s), a host, no credentials, query or fragment.

    Parameters
    ----------
    url
        For example ``http://127.0.0.1:8042/dicom-web``.

    Returns
    -------
    str
        The URL without a trailing ``/``.

    Raises
    ------
    ValueError
        Not such a URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in a URL are refused: use the destination's auth table")
    if parts.query or parts.fragment:
        raise ValueError(f"a DICOMweb base URL has no query or fragment: {url!r}")
    return url.rstrip("/")


def parse_destination(text: str, *, option: str = "--send") -> Destination:
    """Parse ``AE@host:port`` (a command-line destination) into a :class:`Destination`.

    Parameters
    ----------
    text
        For example ``ORTHANC@127.0.0.1:4242``.
    option
        The option's name, quoted in the error message.

    Returns
    -------
    Destination
        The peer.

    Raises
    ------
    ConfigError
        Not of that form, the port is not a number in 1..65535, or the AE title is longer
        than 16 characters.
    """
    ae_title, at, address = text.partition("@")
    host, colon, port_text = address.rpartition(":")
    if not (at and colon and ae_title and host and port_text.isdigit()):
        raise ConfigError(f"{option} wants AE@host:port, got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536 or len(ae_title) > 16:
        raise ConfigError(f"{option} {text!r}: port must be 1-65535 and AE title <= 16 chars")
    return Destination(ae_title=ae_title, host=host, port=port)


def parse_dicomweb_url(text: str, *, option: str = "--send-stow") -> Destination:
    """Parse a DICOMweb base URL given on the command line into a ``dicomweb`` destination.

    Parameters
    ----------
    text
        For example ``http://127.0.0.1:8042/dicom-web``.
    option
        The option's name, quoted in the error message.

    Returns
    -------
    Destination
        ``kind = "dicomweb"``, no credentials (a configured destination with the same URL
        lends its ``auth`` and ``tls``: :func:`cxr_pipeline.service.send.configured_peer`).

    Raises
    ------
    ConfigError
        Not an http(s) URL with a host, or it carries credentials.
    """
    try:
        return Destination(kind="dicomweb", url=check_dicomweb_url(text))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{option}: {exc}") from exc


class SendSettings(_Section):
    """C-STORE SCU of results."""

    calling_ae_title: str = Field(default="CXR_PIPELINE", min_length=1, max_length=16)
    destinations: list[Destination] = Field(default_factory=list)
    """Fixed destinations. Empty: reply to the sender, looked up in ``known_peers``."""
    known_peers: list[Destination] = Field(default_factory=list)
    """Peers by AE title, used to send results back to the AE that sent the image, and
    (with ``addresses``) to hold an AE title to the hosts it may call from."""
    max_attempts: int = Field(default=8, ge=1)
    """C-STORE attempts per destination before the job is FAILED."""
    backoff_initial_s: float = Field(default=2.0, ge=0.0)
    """Wait after the first failed attempt; doubles after each further one."""
    backoff_max_s: float = Field(default=300.0, ge=0.0)
    """Longest wait between attempts."""
    timeout_s: float = Field(default=30.0, gt=0.0)
    """Association, DIMSE and network timeout of each attempt."""

    @model_validator(mode="after")
    def _peers_are_dimse(self) -> SendSettings:
        if any(peer.kind != "dimse" for peer in self.known_peers):
            raise ValueError(
                "send.known_peers are DICOM AEs (kind dimse); DICOMweb "
                "services go in send.destinations"
            )
        return self

    def known_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Where known peers call from: their ``addresses``, and each ``host`` that is an IP.

        Returns
        -------
        list
            Networks (a single address is a /32 or /128); empty when no known peer names
            an address (host names are not resolved).
        """
        networks = []
        for peer in self.known_peers:
            texts = list(peer.addresses)
            try:
                ipaddress.ip_address(peer.host)
            except ValueError:
                pass
            else:
                texts.append(peer.host)
            networks += [ipaddress.ip_network(text, strict=False) for text in texts]
        return networks


class AuditSettings(_Section):
    """The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA).

    Written by :mod:`cxr_pipeline.service.audit`.
    """

    enabled: bool = True
    file: Path | None = None
    """Append-only JSON-lines file (one message per line, its XML in ``"xml"``).
    None: ``<data_dir>/audit/audit.jsonl``."""
    source_id: str | None = None
    """AuditSourceID of every message. None: ``listener.ae_title``."""
    enterprise_site_id: str | None = None
    """AuditEnterpriseSiteID (the hospital), when set."""
    syslog_host: str | None = None
    """Also send each message to this syslog collector / audit record repository
    (RFC 5424). None: file only."""
    syslog_port: int = Field(default=514, ge=1, le=65535)
    """514 for UDP/TCP, 6514 for TLS by convention."""
    syslog_transport: Literal["udp", "tcp", "tls"] = "udp"
    """UDP (RFC 5426), TCP with octet counting (RFC 6587) or TLS (RFC 5425)."""
    syslog_tls: PeerTlsSettings = Field(default_factory=lambda: PeerTlsSettings(enabled=True))
    """CA bundle, client certificate and key for the ``tls`` transport."""
    syslog_app_name: str = "cxr-pipeline"
    """APP-NAME of the syslog messages."""


class MetricsSettings(_Section):
    """Prometheus ``/metrics`` and ``/healthz`` of the listener and of each worker."""

    host: str = "127.0.0.1"
    """Address the metrics endpoint binds (loopback by default: expose it deliberately)."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """TCP port of the listener's endpoint; None: no endpoint. 0 lets the system pick one."""
    worker_port: int | None = Field(default=None, ge=0, le=65535)
    """TCP port of a ``cxr-worker``'s endpoint; None: no endpoint."""


class BatchSettings(_Section):
    """``cxr-batch`` retrospective runs."""

    decode_workers: int = 0
    """Decoding processes; 0 = number of CPU cores."""
    batch_size: int = 16
    """Images stacked into one model forward pass."""
    decode_max_side: int | None = Field(default=None, ge=0)
    """Longest side the decoders produce for classification (JPEG 2000 and 8-bit JPEG
    decode at reduced resolution, others are area-averaged in the decode process).
    None (default): per image, the largest integer reduction whose shorter side is still at
    least the model's resize size (``card.preprocessing.resize``), so the model never sees
    an upsampled image. 0 = full resolution. N = at most N px. Secondary Captures and
    heatmaps use ``output.sc_max_size`` instead."""
    torch_threads: int = 0
    """Intra-op threads of the model in the main process; 0 = CPU cores minus decoders
    (at least 1) while decoding goes on, every core once the decoders are idle."""
    max_in_flight: int = 0
    """Decode jobs queued ahead of the model; 0 = 2 x batch_size + decode workers."""
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    """How decode processes start (never plain fork: the main process holds the model)."""
    retry_failed: bool = False
    """On a resumed run, process again the files whose earlier row says failed."""
    max_concurrent_retrievals: int = Field(default=1, ge=1)
    """PACS runs (``--from-pacs``, ``--from-dicomweb``): series retrieved at the same time.
    One by default: a production PACS serves its users first."""
    images_per_minute: float | None = Field(default=None, gt=0.0)
    """PACS runs: most images retrieved per minute (None: as fast as the PACS sends)."""
    retrieve: Literal["get", "move"] = "get"
    """PACS runs: C-GET (needs nothing configured at the PACS beyond query/retrieve rights
    for our AE title) or C-MOVE to the storage SCP the run starts (the PACS must know
    ``move_ae_title`` at this host and ``move_port``)."""
    move_ae_title: str | None = Field(default=None, min_length=1, max_length=16)
    """C-MOVE destination AE title (our storage SCP for the run)."""
    move_host: str = "0.0.0.0"
    """Address the run's C-MOVE storage SCP binds."""
    move_port: int = Field(default=11113, ge=0, le=65535)
    """TCP port of the run's C-MOVE storage SCP (0: any free port, for tests)."""
    keep_retrieved: bool = False
    """PACS runs: keep the retrieved images under ``<out>/retrieved/`` (default: each is
    deleted once its row is written)."""
    max_consecutive_failures: int = Field(default=3, ge=1)
    """PACS runs: after this many retrieves in a row fail to reach the PACS, the rest of
    the run is not attempted (its images get failed rows; a rerun picks them up)."""


class Settings(BaseSettings):
    """All settings of cxr-pipeline.

    Build it with :func:`load_settings`, which reads the TOML file.
    """

    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path("var")
    """Root of spool, ledger, outbox and logs."""
    log_level: str = "INFO"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    explain: ExplainSettings = Field(default_factory=ExplainSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @model_validator(mode="after")
    def _reserve_leaves_room(self) -> Settings:
        listener = self.listener
        if self.send.known_networks() and (
            listener.reserved_for_known_peers >= listener.max_associations
        ):
            raise ValueError(
                "listener.reserved_for_known_peers must be below listener.max_associations "
                "when known peers have addresses (unknown addresses need at least one slot)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then values passed in (the TOML file and overrides)."""
        return (env_settings, init_settings)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from a TOML file, the environment and explicit overrides.

    Parameters
    ----------
    path
        TOML file. None: the file named by ``$CXR_CONFIG`` if set, else defaults only.
    **overrides
        Values that win over the file (nested sections as dicts), e.g. from command-line
        options. The environment still wins over the file but not over these.

    Returns
    -------
    Settings
        The validated, frozen settings.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or a key is unknown or has a wrong type.
    """
    if path is None and os.environ.get(CONFIG_ENV_VAR):
        path = os.environ[CONFIG_ENV_VAR]
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    try:
        settings = Settings(**data)
        if overrides:
            # Overrides beat the environment: apply them on top of the loaded values.
            # The environment was applied above; validate the merge without reading it again.
            settings = _ExplicitSettings(**_deep_merge(settings.model_dump(), overrides))
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    return settings


class _ExplicitSettings(Settings):
    """Settings validated from the values given alone (no environment source)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in."""
        return (init_settings,)
