"""Typed settings for every modalmesh process, read from MODALMESH_* environment variables.

One class holds the whole stack's addresses and limits so that defaults live in one place:
each service reads the fields it needs, and `modalmesh up` passes its flags down as the same
variables. Example: MODALMESH_GATEWAY_HTTP_PORT=9000.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    """~/.cache/modalmesh, or $XDG_CACHE_HOME/modalmesh."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modalmesh"


class Settings(BaseSettings):
    """Addresses, limits and paths of a modalmesh deployment."""

    model_config = SettingsConfigDict(env_prefix="MODALMESH_", extra="ignore")

    # What to serve.
    preset: str = "tiny"
    presets_dir: Path | None = Field(
        default=None, description="Extra folder searched for <preset>.yaml before the shipped ones."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # Addresses. `host` is where services bind; *_address are where clients dial.
    host: str = "127.0.0.1"
    gateway_http_port: int = 8000
    gateway_grpc_port: int = 50051
    llm_port: int = 50052
    llm_metrics_port: int = Field(
        default=8120, ge=0, description="The LLM service's Prometheus /metrics; 0: off."
    )
    encoder_http_port: int = 8100
    encoder_grpc_port: int = 8101
    encoder_metrics_port: int = 8102
    decoder_http_port: int = 8110
    decoder_grpc_port: int = 8111
    decoder_metrics_port: int = 8112
    llm_address: str | None = None
    encoder_address: str | None = Field(
        default=None,
        description="The encoders' KServe v2 gRPC replicas: host:port, a comma-separated list of them, "
        "or dns:name:port (every address of the name); requests go round-robin, skipping a replica "
        "that is down. Empty: `host`:`encoder_grpc_port`.",
    )
    decoder_address: str | None = Field(
        default=None,
        description="The decoders' KServe v2 gRPC replicas, written as `encoder_address`. "
        "Empty: `host`:`decoder_grpc_port`.",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"

    # `modalmesh up`'s supervision (modalmesh/supervise.py).
    supervisor_port: int = Field(
        default=8130,
        ge=0,
        description="Port of `modalmesh up`'s own /metrics (restart and give-up counters) and /status; 0: off.",
    )
    supervisor_url: str | None = Field(
        default=None,
        description="Set by `modalmesh up` for the gateway: where its /health reads which services "
        "are restarting or given up on.",
    )
    restart_max: int = Field(
        default=5,
        ge=0,
        description="`modalmesh up`: restarts of one service allowed within `restart_window_s`; one more "
        "crash and it is given up on (0: never restart).",
    )
    restart_window_s: float = Field(default=300.0, gt=0, description="The window `restart_max` counts in.")
    restart_backoff_s: float = Field(
        default=0.5, ge=0, description="`modalmesh up`: delay before a restart; doubles per crash in a row."
    )
    restart_backoff_max_s: float = Field(default=30.0, ge=0, description="The largest restart delay.")

    # Transport.
    grpc_max_message_bytes: int = 512 * 1024 * 1024
    drain_seconds: float = 10.0

    # Gateway limits.
    max_body_bytes: int = 64 * 1024 * 1024
    media_max_bytes: int = 20 * 1024 * 1024
    image_fetch_timeout_s: float = 5.0
    encoder_timeout_s: float = 30.0
    decoder_timeout_s: float = Field(default=120.0, description="One media item's decode, queue included.")
    llm_timeout_s: float = 300.0
    feature_cache_ttl_s: int = 3600

    # Gateway security (REST and gRPC alike).
    api_keys: str = Field(
        default="",
        description="Comma-separated API keys clients must send (Authorization: Bearer <key>); "
        "with none here and no api_keys_file the gateway asks for no key.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="File of API keys, one per line ('#' starts a comment); adds to api_keys."
    )
    key_rate_limit_rpm: float = Field(
        default=0.0,
        ge=0,
        description="Requests per minute per API key (or per client address without keys); 0: off.",
    )
    key_rate_limit_burst: int = Field(
        default=0,
        ge=0,
        description="Requests a key may send at once above the rate; 0: one second's worth, at least 1.",
    )
    key_max_concurrent: int = Field(
        default=0, ge=0, description="Requests in flight per API key (or client address); 0: off."
    )
    cors_origins: str = Field(
        default="", description="Comma-separated origins CORS allows ('*': any); empty: CORS off."
    )
    media_max_items: int = Field(
        default=16, ge=1, description="Media parts in one request, all turns together."
    )

    # Media fetching (http(s) and file:// URLs in requests).
    fetch_allow: str = Field(
        default="",
        description="Comma-separated host names, IP addresses or CIDR blocks that may be fetched although "
        "they are loopback, private, link-local or metadata addresses (refused otherwise).",
    )
    fetch_file_roots: str = Field(
        default="", description="Comma-separated folders file:// URLs may read under; empty: file:// refused."
    )
    fetch_connect_timeout_s: float = Field(default=3.0, gt=0, description="Connecting to a media URL's host.")
    video_fetch_timeout_s: float = Field(default=30.0, gt=0, description="Fetching one video, all of it.")
    audio_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Fetching one audio clip, all of it."
    )
    event_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Fetching one event file, all of it."
    )
    fetch_max_redirects: int = Field(default=5, ge=0, description="Redirects followed per media URL.")

    # Encoder limits (per item; over a limit the item alone is refused).
    image_max_pixels: int = 64 * 1024 * 1024
    video_max_bytes: int = 64 * 1024 * 1024
    video_max_seconds: float = 600.0
    video_max_frames: int = Field(default=36_000, description="Frames in the file, before sampling.")
    video_max_pixels: int = Field(default=1920 * 1080, description="Width * height of one frame.")
    audio_max_bytes: int = 20 * 1024 * 1024
    audio_max_seconds: float = 300.0
    event_max_bytes: int = 64 * 1024 * 1024
    event_max_events: int = 2_000_000

    # Decoder service (any-to-any presets).
    decoder_batch_delay_us: int = Field(
        default=20_000,
        ge=0,
        description="How long Triton's dynamic batcher holds a decode request for compatible ones.",
    )

    # Trainer (Celery worker + DeepSpeed launcher).
    jobs_dir: Path | None = Field(
        default=None, description="Folder of training job folders; default <cache_dir>/jobs."
    )
    trainer_hardware: str = Field(
        default="cpu", description="Hardware class this worker serves (queue train.<class>)."
    )
    trainer_lease_s: float = Field(
        default=30.0, description="A running job's lease; expired = its worker is gone."
    )
    trainer_recover_interval_s: float = 10.0
    trainer_cancel_grace_s: float = 15.0

    # Adapters: the artifact store of published bundles, and how many versions a replica keeps.
    artifact_dir: Path | None = Field(
        default=None, description="Where published adapter bundles live; default <cache_dir>/adapters."
    )
    max_loaded_adapters: int = Field(
        default=4,
        ge=1,
        description="Adapter versions an LLM replica keeps loaded (current and in-use ones stay).",
    )
    redis_maxmemory_mb: int = Field(
        default=512,
        ge=1,
        description="Memory bound of the Redis `modalmesh up` starts itself (volatile-lru eviction: "
        "feature-cache entries go first, queue and registry keys never).",
    )
    llm_max_queued: int = Field(
        default=64,
        ge=1,
        description="Requests an LLM replica holds, queued or running; one more is refused with "
        "RESOURCE_EXHAUSTED (HTTP 429) at once instead of waiting.",
    )

    encoder_decode_workers: int = Field(
        default=0,
        ge=0,
        description="Threads per encoder model that decode and preprocess a batch's media files, "
        "off Triton's inference thread (0: min(4, CPU count); 1: inline).",
    )
    llm_max_batch_size: int = Field(
        default=32,
        ge=1,
        description="Requests an LLM replica decodes together (continuous batching); more wait "
        "for a row to free.",
    )
    llm_max_prefill_tokens: int = Field(
        default=4096,
        ge=1,
        description="Prompt tokens an LLM replica prefills between two decode steps (at least one "
        "request's): bounds how long new requests pause the running ones.",
    )
    default_max_tokens: int = Field(
        default=256,
        gt=0,
        description="Read by the LLM service: `max_tokens` of a request that sets none, where the preset's "
        "`generation.max_tokens` is unset too.",
    )

    # Logging.
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("encoder_address", "decoder_address", mode="after")
    @classmethod
    def _replicas(cls, v: str | None, info: ValidationInfo) -> str | None:
        from services.common.replicas import validate_setting

        flag = {"encoder_address": " (--encoder-address)"}.get(str(info.field_name), "")
        name = f"MODALMESH_{str(info.field_name).upper()}{flag}"
        return validate_setting(v, setting=name)

    @field_validator("cache_dir", "presets_dir", "jobs_dir", "artifact_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    def jobs_root(self) -> Path:
        """Where training job folders live (checkpoints, progress, logs, exported bundles)."""
        return self.jobs_dir or self.cache_dir / "jobs"

    def artifact_root(self) -> Path:
        """The artifact store: published bundles live in <root>/<adapter name>/<version>."""
        return self.artifact_dir or self.cache_dir / "adapters"

    def llm_target(self) -> str:
        """host:port the gateway dials for the LLM service."""
        return self.llm_address or f"{self.host}:{self.llm_port}"

    def encoder_target(self) -> str:
        """The encoder service's KServe v2 gRPC replicas (`services.common.replicas` syntax)."""
        return self.encoder_address or f"{self.host}:{self.encoder_grpc_port}"

    def decoder_target(self) -> str:
        """The decoder service's KServe v2 gRPC replicas (`services.common.replicas` syntax)."""
        return self.decoder_address or f"{self.host}:{self.decoder_grpc_port}"

    def client_channel_options(self) -> list[tuple[str, int]]:
        """`grpc_options()` plus a reconnect backoff capped at 1 s (gRPC's default grows to 120 s),
        so a client finds a restarted service within about a second of it serving again."""
        return [
            *self.grpc_options(),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options with the raised message limits; use on every server and channel."""
        return [
            ("grpc.max_send_message_length", self.grpc_max_message_bytes),
            ("grpc.max_receive_message_length", self.grpc_max_message_bytes),
        ]
