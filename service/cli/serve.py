"""`cortexlens serve` (the Serve application on a local or existing Ray cluster) and the one-command
live demo behind `cortexlens demo`."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Annotated

import typer


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        try:
            s.bind(("::" if socket.has_ipv6 else "", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(
    *,
    config: Path | None,
    port: int | None,
    metrics_port: int | None,
    home: Path | None,
    bundle: Path | None,
    model: str | None,
    version: str | None,
    train: bool,
    tls: dict | None = None,
    token_env: str | None = None,
    log=typer.echo,
) -> dict:
    """The Serve config to run, with the default model built first if the registry lacks it.
    ``tls``: `service.settings.TLSSettings` fields to override (the TLS front)."""
    from service import server

    args: dict = {}
    if tls:
        args["tls"] = dict(tls)
    if token_env:
        args["token_env"] = token_env
    if home is not None:
        args["home"] = str(home)
    if bundle is not None:
        if not (bundle / "manifest.json").is_file():
            raise typer.BadParameter(f"{bundle}: not a bundle directory (no manifest.json)")
        args["bundle"] = str(bundle.resolve())
    if model:
        args["model"] = model
    if version:
        args["version"] = version
    if metrics_port is not None:
        args["metrics_port"] = metrics_port
    # a ValidationError (e.g. --tls-cert without --tls-key) is one line from the CLI's main
    cfg = server.load_config(config, grpc_port=port, args=args)
    s = server.settings_of(cfg)
    for what, f in (("--tls-cert", s.tls.cert), ("--tls-key", s.tls.key)):
        if f and not Path(f).expanduser().is_file():
            raise typer.BadParameter(f"{what} {f}: no such file")
    if s.tls.client_ca and not Path(s.tls.client_ca).expanduser().is_file():
        raise typer.BadParameter(f"--tls-client-ca {s.tls.client_ca}: no such file")
    if not s.bundle:
        from models.registry import Registry

        reg = Registry(s.registry_dir())
        if reg.current(s.model) is None:
            if s.model != "default" or not train:
                raise typer.BadParameter(
                    f"no current version of model {s.model!r} in {reg.root}; publish and promote "
                    "one (cortexlens registry publish/promote) or pass --bundle"
                )
            from service.home import ensure_default_model

            log(f"no default model in {s.resolved_home()} yet: training it from the shipped data")
            m = ensure_default_model(s.resolved_home(), log=log)
            log(f"default model {m.version} ready ({m.bundle_path})")
    return cfg


def serve_cmd(
    config: Annotated[
        Path | None, typer.Option(help="Serve config YAML (default: deploy/serve/cortexlens.yaml).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default: the config's).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus metrics port (0 = off).")
    ] = None,
    home: Annotated[
        Path | None, typer.Option(help="Home with the registry and session records.")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="Serve this bundle directory.")] = None,
    model: Annotated[str | None, typer.Option(help="Registry model name.")] = None,
    version: Annotated[str | None, typer.Option(help="Registry version (default: current).")] = (
        None
    ),
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")
    ] = None,
    train: Annotated[
        bool, typer.Option(help="Train the default model on first run if there is none.")
    ] = True,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate chain: serve TLS on --tls-port (a TLS front)."),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA bundle: require client certificates (mTLS).")
    ] = None,
    tls_port: Annotated[
        int | None, typer.Option(help="TLS port (default: the config's tls.port, 9443).")
    ] = None,
    tls_host: Annotated[
        str | None,
        typer.Option(help="TLS address (default 127.0.0.1; 0.0.0.0 for the lab network)."),
    ] = None,
    token_env: Annotated[
        str | None,
        typer.Option(help="Require the bearer token held in this environment variable."),
    ] = None,
) -> None:
    """Start the gRPC service (Ray Serve) and keep it running until Ctrl-C."""
    from service import server

    tls: dict = {}
    for k, v in (
        ("cert", tls_cert),
        ("key", tls_key),
        ("client_ca", tls_client_ca),
        ("port", tls_port),
        ("host", tls_host),
    ):
        if v is not None:
            tls[k] = str(v.expanduser().resolve()) if isinstance(v, Path) else v

    cfg = prepare(
        config=config,
        port=port,
        metrics_port=metrics_port,
        home=home,
        bundle=bundle,
        model=model,
        version=version,
        train=train,
        tls=tls,
        token_env=token_env,
    )
    gport = cfg["grpc_options"]["port"]
    if address is None and not _port_free(gport):
        raise typer.BadParameter(f"port {gport} is in use; choose another with --port")
    s = server.settings_of(cfg)
    if s.token_env and address is None:  # a local Ray's replicas inherit this environment
        try:
            s.bearer_token()
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    typer.echo(f"starting Ray and Serve (config {config or server.SERVE_CONFIG}) ...")
    t0 = time.monotonic()
    try:
        server.start(cfg, address=address)
    except OSError as e:
        if "TLS front" in str(e):
            raise typer.BadParameter(str(e)) from None
        raise
    typer.echo(
        f"cortexlens serving on 127.0.0.1:{gport} (gRPC: cortexlens.v1.Decoder, "
        f"grpc.health.v1.Health, reflection) in {time.monotonic() - t0:.0f} s"
    )
    front = server.tls_front()
    if front is not None:
        typer.echo(
            f"TLS on {front.address}{' (mutual TLS)' if front.mutual else ''} -> {front.upstream};"
            f" the plaintext port {gport} stays open: firewall it (docs/operations.md, Security)"
        )
    if s.token or s.token_env:
        typer.echo("bearer token required on every RPC (health and reflection stay open)")
    if s.metrics_port:
        typer.echo(f"metrics: http://127.0.0.1:{s.metrics_port}/metrics (or the next free port)")
    typer.echo(f"session records: {s.records_dir()}")
    if front is not None:
        typer.echo(
            f"try: cortexlens stream RECORDING --target {front.address} --tls-root-cert "
            f"{s.tls.cert}   (Ctrl-C stops)"
        )
    else:
        typer.echo(f"try: cortexlens stream RECORDING --target 127.0.0.1:{gport}   (Ctrl-C stops)")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    typer.echo("shutting down ...")
    server.stop()
    typer.echo("stopped")


def demo(
    data: Path | None = None,
    *,
    session: int = 0,
    seconds: float = 20.0,
    speed: float = 2.0,
    every: int = 8,
    home: Path | None = None,
) -> int:
    """The main job: default model (trained on first run), the service on a local Ray, one Park
    session streamed through it at ``speed`` x real time, live explanations printed, shut down."""
    from models.data.io import expand_paths
    from service import server
    from service.cli import default_data_dir
    from service.cli.stream import stream_cmd

    data = data or default_data_dir()
    files = expand_paths([str(data)])
    if not files:
        raise typer.BadParameter(f"no recordings in {data}")
    rec_file = files[session % len(files)]
    typer.echo("== 1/4 model")
    cfg = prepare(
        config=None,
        port=_free_port(),
        metrics_port=_free_port(),
        home=home,
        bundle=None,
        model=None,
        version=None,
        train=True,
    )
    s = server.settings_of(cfg)
    from models.registry import Registry

    reg = Registry(s.registry_dir())
    typer.echo(f"serving model default {reg.current('default')} from {reg.root}")
    typer.echo("== 2/4 service (local Ray + Serve, gRPC on loopback)")
    t0 = time.monotonic()
    server.start(cfg, log=None)
    target = f"127.0.0.1:{cfg['grpc_options']['port']}"
    typer.echo(f"serving on {target} after {time.monotonic() - t0:.0f} s")
    rc = 0
    sid = ""
    try:
        from models.data.io import load_recordings

        rec = load_recordings([rec_file])[0]
        n = int(min(rec.n_frames, round(seconds * rec.sampling_rate)))
        sid = f"demo-{rec.session_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        typer.echo(
            f"== 3/4 streaming {rec.session_id} ({rec.n_units} cells, {rec.sampling_rate:g} Hz): "
            f"{n} frames at {speed:g}x real time as session {sid}; every {every}th prediction "
            "is printed with its top SAE units (attribution to the predicted class, label)"
        )
        try:
            stream_cmd(
                str(rec_file),
                target=target,
                speed=speed,
                max_frames=n,
                session_id=sid,
                every=every,
                units=3,
            )
        except SystemExit as e:  # stream_cmd exits on errors
            rc = int(e.code or 0)
    finally:
        typer.echo("== 4/4 shutting down")
        server.stop()
    if sid:
        typer.echo(f"session record kept in {s.records_dir() / sid}")
    return rc


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
