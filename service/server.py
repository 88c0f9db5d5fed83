"""Start, update and stop the Serve application from the Serve config file.

`cortexlens serve` and the integration tests use this; a KubeRay RayService applies the same file
(its ``serveConfigV2``). The config is deployed the way ``serve run CONFIG`` deploys it (the
controller builds the application from ``import_path`` and ``args``), so the local server and the
cluster run the same code path.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml

from service.settings import (
    APP_NAME,
    MAX_MESSAGE_BYTES,
    NAMESPACE,
    SERVE_CONFIG,
    ServiceSettings,
)

#: the TLS front started by `start` (``tls`` settings), stopped by `stop`
_front = None


def load_config(
    path: str | Path | None = None,
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    args: dict[str, Any] | None = None,
) -> dict:
    """The Serve config (YAML) as a dict, with optional port and application-args overrides.

    The application's ``args`` are validated as `ServiceSettings` here, so a typo fails before
    anything starts.
    """
    path = Path(path) if path else SERVE_CONFIG
    cfg = yaml.safe_load(path.read_text())
    cfg = copy.deepcopy(cfg)
    if grpc_port is not None:
        cfg.setdefault("grpc_options", {})["port"] = int(grpc_port)
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = int(http_port)
    app = app_config(cfg)
    merged = dict(app.get("args") or {})
    for k, v in (args or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    app["args"] = ServiceSettings.model_validate(merged).model_dump(mode="json")
    return cfg


def app_config(cfg: dict) -> dict:
    for app in cfg.get("applications", []):
        if app.get("name") == APP_NAME:
            return app
    raise ValueError(f"the Serve config has no application named {APP_NAME!r}")


def settings_of(cfg: dict) -> ServiceSettings:
    return ServiceSettings.model_validate(app_config(cfg).get("args") or {})


def tls_front():
    """The running TLS front (`service.tls_front.TLSFront`: ``.address``, ``.port``) or None."""
    return _front


def _make_tls_front(cfg: dict):
    """The TLS front of the config's ``tls`` settings, not started (None when they are off):
    reads the PEM files and checks that the port can be bound, so that mistakes surface before
    anything else starts."""
    t = settings_of(cfg).tls
    if not t.enabled:
        return None
    if _front is not None:
        raise RuntimeError("a TLS front is already running in this process; server.stop() first")
    import socket

    from service.tls_front import TLSFront

    upstream = t.upstream or f"127.0.0.1:{int((cfg.get('grpc_options') or {}).get('port', 9000))}"
    front = TLSFront(
        upstream,
        cert=t.cert,
        key=t.key,
        client_ca=t.client_ca or None,
        host=t.host,
        port=t.port,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    if t.port:
        fam = socket.AF_INET6 if ":" in t.host else socket.AF_INET
        with socket.socket(fam) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((t.host, t.port))
            except OSError as e:
                raise OSError(
                    f"cannot bind the TLS front on {t.host}:{t.port} ({e.strerror}); choose "
                    "another tls port/host"
                ) from None
    return front


def start_tls_front(cfg: dict):
    """Start the TLS front of the config's ``tls`` settings (None when they are off): TLS on
    ``tls.host:tls.port``, forwarded to the Serve gRPC proxy on loopback. `start` does this
    once the application is RUNNING."""
    return _launch(_make_tls_front(cfg))


def _launch(front):
    global _front
    if front is not None:
        front.start()
        _front = front
    return front


def stop_tls_front() -> None:
    global _front
    f, _front = _front, None
    if f is not None:
        f.stop()


def start(
    cfg: dict,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    timeout_s: float = 300.0,
    log=print,
) -> None:
    """Start Ray (local unless ``address``), Serve with the config's proxies, and deploy the app;
    returns when the application is RUNNING. With ``tls`` settings, the TLS front
    (`service.tls_front`) then starts in this process: its files and port are checked before
    Ray starts (mistakes fail fast), and it listens once the application is RUNNING (no gRPC
    threads in this process while Ray forks its daemons; no client sees a half-started server
    on the TLS port)."""
    front = _make_tls_front(cfg)
    _start(cfg, address=address, num_cpus=num_cpus, timeout_s=timeout_s, log=log)
    _launch(front)


def _start(cfg: dict, *, address, num_cpus, timeout_s, log) -> None:
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))
    if not ray.is_initialized():
        # "local": always a new local instance unless an address is given (never attach to
        # some other cluster a `ray start` left on this machine)
        kw: dict[str, Any] = {
            "namespace": NAMESPACE,
            "include_dashboard": False,
            "address": address or "local",
        }
        if not address and num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(**kw, log_to_driver=False)
    schema = ServeDeploySchema.model_validate(cfg)
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    deploy(cfg, timeout_s=timeout_s, log=log)


def deploy(cfg: dict, *, timeout_s: float = 300.0, log=print) -> None:
    """Apply the config to the running Serve instance (a change of the decoder's ``user_config``
    only reconfigures its replicas in place) and wait until the application is RUNNING."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    wait_running(timeout_s=timeout_s, log=log)


def wait_running(timeout_s: float = 300.0, log=print) -> None:
    from ray import serve

    t0 = time.monotonic()
    last = None
    while True:
        st = serve.status().applications.get(APP_NAME)
        status = getattr(st, "status", None)
        if status is not None and str(status).endswith("RUNNING"):
            return
        if status is not None and str(status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(f"cortexlens application {status}: {st.message}")
        if status != last:
            last = status
            if log and status is not None:
                log(f"  application {str(status).split('.')[-1].lower()}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"cortexlens application not RUNNING after {timeout_s:.0f} s")
        time.sleep(0.25)


def set_model(cfg: dict, *, model: str = "", version: str = "", bundle: str = "") -> dict:
    """A copy of ``cfg`` whose decoder serves another model version (hot swap via user_config)."""
    cfg = copy.deepcopy(cfg)
    for d in app_config(cfg).setdefault("deployments", []):
        if d.get("name") == "DecoderModel":
            d["user_config"] = {"model": model, "version": version, "bundle": bundle}
            return cfg
    app_config(cfg)["deployments"].append(
        {
            "name": "DecoderModel",
            "user_config": {"model": model, "version": version, "bundle": bundle},
        }
    )
    return cfg


def stop() -> None:
    """Stop the TLS front (if any), shut Serve down, end live session actors, and disconnect
    from Ray."""
    import ray
    from ray import serve

    stop_tls_front()
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
