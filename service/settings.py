"""Settings of the online service: one typed config (`ServiceSettings`), carried as the Serve
application's ``args`` in the Serve config file (`deploy/serve/cortexlens.yaml`), so the local
server and a KubeRay RayService run from the same file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from models.config import Config

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve" / "cortexlens.yaml"
APP_NAME = "cortexlens"
NAMESPACE = "cortexlens"


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
    # `token_env` names an environment variable to read it from instead
    token: str = ""
    token_env: str = ""
    ingest: IngestSettings = Field(default_factory=IngestSettings)

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
            return os.environ.get(self.token_env, "")
        return self.token
