"""Settings of the online service: one typed config (`ServiceSettings`), carried as the Serve
application's ``args`` in the Serve config file (`deploy/serve/cortexlens.yaml`), so the local
server and a KubeRay RayService run from the same file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from models.config import Config

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve" / "cortexlens.yaml"
APP_NAME = "cortexlens"
NAMESPACE = "cortexlens"


#: gRPC messages larger than this are refused with RESOURCE_EXHAUSTED (bytes): by Serve's proxy
#: (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, set by `service.server`) and by the TLS front.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class IngestSettings(Config):
    """Per-session ingestion (see `service.ingest.IngestConfig`)."""

    decode_stride: int = Field(1, ge=1)
    reorder_frames: int = Field(3, ge=0)
    max_gap_frames: int = Field(300, ge=1)
    max_pending_decodes: int = Field(4, ge=1)
    backpressure: str = Field("coalesce", pattern="^(coalesce|refuse)$")
    max_block_frames: int = Field(1024, ge=1)
    # fdatasync every block before it is acknowledged (False: the OS flushes; faster, less safe)
    record_sync: bool = True


class TLSSettings(Config):
    """The TLS front (`service.tls_front`): a TLS port in front of Serve's plaintext gRPC proxy,
    started and stopped with the server by `service.server.start` / `stop` (not by a KubeRay
    RayService: there, terminate TLS at the ingress or run the front as a sidecar). On when
    ``cert`` and ``key`` are set."""

    # PEM certificate chain and private key (paths on the machine that runs `cortexlens serve`)
    cert: str = ""
    key: str = ""
    # PEM CA bundle: when set, clients must present a certificate signed by it (mutual TLS)
    client_ca: str = ""
    # where the TLS port listens (loopback by default: set 0.0.0.0 to serve the lab network)
    host: str = "127.0.0.1"
    port: int = Field(9443, ge=0, le=65535)  # 0 = any free port
    # the plaintext Serve gRPC proxy to forward to ("" = 127.0.0.1:<grpc_options.port>)
    upstream: str = ""

    @model_validator(mode="after")
    def _both(self) -> TLSSettings:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls: give both cert and key (PEM files), or neither")
        if self.client_ca and not self.cert:
            raise ValueError("tls: client_ca (mutual TLS) needs cert and key too")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


class QuotaSettings(Config):
    """Per-session limits of a stream, checked in the ingress (no extra Ray call per frame); a
    stream past one ends with RESOURCE_EXHAUSTED (its session stays resumable) and the refusal
    is counted in ``cortexlens_quota_refusals_total{quota}``. 0 turns a limit off."""

    # frame-rate ceiling relative to the rate the session declared (SessionOpen.frame_rate_hz):
    # over any interval of t seconds a stream may send at most
    # max_rate_factor * frame_rate_hz * (t + rate_burst_s) frames (a token bucket). The default
    # lets a recording be replayed up to 100x faster than real time (`--fast`) and refuses only
    # a runaway client
    max_rate_factor: float = Field(100.0, ge=0.0)
    rate_burst_s: float = Field(10.0, gt=0.0)
    # durable record per session: frames x cells x 4 bytes of dF/F (4 GiB: ~9 h of 1,000 cells
    # at 30 Hz); a resumed session counts what it already holds
    max_record_bytes: int = Field(4 * 1024**3, ge=0)
    # stimulus trials per session (Trials messages; trials.jsonl)
    max_trials: int = Field(100_000, ge=0)


class ServiceSettings(Config):
    """Everything the Serve application needs; unknown keys are refused."""

    # where the registry and the session records live ("" = $CORTEXLENS_HOME or <repo>/.cortexlens)
    home: str = ""
    # the model served: a registry model name (its current version unless `version` is set) ...
    model: str = "default"
    version: str = ""
    # ... or an explicit bundle directory (overrides the registry)
    bundle: str = ""
    # while serving the registry's current version, check it every this many seconds and swap
    # to a newly promoted (or rolled back) version in place (0 = off)
    follow_current_s: float = Field(1.0, ge=0.0)
    # where session records go ("" = <home>/sessions)
    records: str = ""
    threads: int = Field(1, ge=1)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    # TensorRT provider (when listed and available): fp16 engines, and where built engines are
    # cached ("" = <home>/trt-cache); the CUDA and CPU providers take no options
    trt_fp16: bool = False
    trt_cache_dir: str = ""
    # ONNX Runtime I/O binding (outputs on the provider's device); None = on for CUDA/TensorRT
    io_binding: bool | None = None
    # run batches that fit one of the bundle's fixed-shape graphs (`cortexlens export
    # --fixed-shape BxT`) through it, padded, with CUDA graphs on the CUDA provider
    fixed_shapes: bool = False
    max_batch_size: int = Field(16, ge=1)
    # 0: a batch is whatever queued while the previous one ran (batches form under load only)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    top_m: int = Field(8, ge=1)
    max_sessions: int = Field(64, ge=1)
    max_cells: int = Field(8192, ge=1)
    max_window_frames: int = Field(4096, ge=1)
    # Prometheus metrics are served on this port by each ingress replica (0 = off); a replica
    # that finds it taken uses the next free one of the following 16
    metrics_port: int = Field(9100, ge=0)
    metrics_host: str = "127.0.0.1"
    # bearer token every RPC must carry (metadata "authorization: Bearer <token>"; "" = none);
    # `token_env` names an environment variable to read it from instead (in the ingress
    # replica's environment; unset or empty there is an error, never "no token"). Health
    # (grpc.health.v1) and server reflection stay open: probes carry no token (docs/operations.md)
    token: str = ""
    token_env: str = ""
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    def resolved_trt_cache(self) -> Path:
        if self.trt_cache_dir:
            return Path(self.trt_cache_dir)
        return self.resolved_home() / "trt-cache"

    def resolved_home(self) -> Path:
        if self.home:
            return Path(self.home)
        from service.home import home_dir

        return home_dir()

    def records_dir(self) -> Path:
        return Path(self.records) if self.records else self.resolved_home() / "sessions"

    def registry_dir(self) -> Path:
        return self.resolved_home() / "registry"

    def bearer_token(self) -> str:
        import os

        if self.token_env:
            tok = os.environ.get(self.token_env, "")
            if not tok:
                raise ValueError(
                    f"token_env names ${self.token_env}, which is unset or empty in this "
                    "process; set it (the server refuses to run without the token it was told "
                    "to require)"
                )
            return tok
        return self.token
