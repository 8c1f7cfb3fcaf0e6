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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)
    """Free-space watermark of the spool's file system (bytes).

    Below it, C-STORE answers Out of Resources."""
    keep_received_files: bool = False
    """Keep spooled received files after their job is done or skipped (audit, debugging)."""
    tls: TlsSettings = Field(default_factory=TlsSettings)


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


class Destination(_Section):
    """A DICOM peer results are sent to."""

    ae_title: str
    host: str
    port: int
    tls: PeerTlsSettings = Field(default_factory=PeerTlsSettings)
    """DICOM TLS when sending to this peer (off by default)."""
    addresses: list[str] = Field(default_factory=list)
    """Known peers: host addresses or networks (``10.1.2.3``, ``10.1.0.0/16``, ``::1``) this
    AE title may call from. Empty: any address (storescp's default). Otherwise the listener
    rejects an association with this calling AE title from anywhere else (A-ASSOCIATE-RJ,
    calling AE title not recognised) and records a Security Alert."""

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP address or network: {text!r}") from exc
        return value


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
