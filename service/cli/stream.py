"""`cortexlens stream`: replay a recording into a running server as a live session.

Prints one line per prediction (frame, time, latency, each task's prediction with probability and
its top SAE units), the stream's events as they come, and a summary table at the end.

Exit status: 0 on success; 1 on a gRPC error (one ``error: CODE: details`` line on stderr);
2 for user errors (a file that cannot be read, bad options); 130 when interrupted (Ctrl-C stops
the stream cleanly and still prints the summary).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from models.data.recording import Recording
    from service.client import StreamItem, StreamStats


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def _pick_recording(path: str, session_id: str | None) -> tuple[Recording, str]:
    """The recording to stream and the session id to open it under."""
    from models.data.io import load_recordings

    recs = load_recordings([path])
    if len(recs) == 1:
        return recs[0], session_id or recs[0].session_id
    if session_id is None:
        ids = ", ".join(r.session_id for r in recs)
        _fail(f"{path} holds {len(recs)} recordings ({ids}); choose one with --session-id", 2)
    for r in recs:
        if r.session_id == session_id:
            return r, session_id
    _fail(f"{path}: no recording with session id '{session_id}'", 2)
    raise AssertionError("unreachable")


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def prediction_line(item: StreamItem, n_units: int) -> str:
    """``frame 123 t=7.688s 12.3 ms | direction=90° p=0.71 | u12 +1.32 ... || genetic=...``."""
    from service.client import explanation_text

    p = item.message
    tasks = "  ||  ".join(explanation_text(t, n=n_units) for t in p.tasks) or "(no tasks)"
    extra = f"  masked {p.masked_fraction:.0%}" if p.masked_fraction > 0 else ""
    return (
        f"frame {p.frame_index:>6} t={p.timestamp:9.3f}s {_fmt_ms(item.latency_ms):>8} ms  "
        f"{tasks}{extra}"
    )


def event_line(item: StreamItem) -> str:
    from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb

    ev = item.message
    kinds = pb.StreamEvent.Kind
    name = kinds.Name(ev.kind) if ev.kind in kinds.values() else str(ev.kind)
    a, b = int(ev.first_frame_index), int(ev.last_frame_index)
    frames = f" frame {a}" if a == b else f" frames {a}-{b}"
    if ev.kind == pb.StreamEvent.NOT_DECODED:
        frames = ""  # about the session, not about frames
    msg = f": {ev.message}" if ev.message else ""
    return f"event {name}{frames}{msg}"


def accepted_line(item: StreamItem, n_cells: int) -> str:
    a = item.message
    model = f"{a.model.name} {a.model.version}".strip() or "?"
    emb = "" if a.session_known else f", session embedding from {a.session_embedding_from or '?'}"
    return (
        f"accepted session {a.session_id}: model {model}, decode stride {a.decode_stride}, "
        f"window {a.window_frames} frames, cells known {a.n_cells_known}/{n_cells}, "
        f"decoding {'yes' if a.decoding else 'NO'}{emb}, from frame {a.next_frame_index}"
    )


def print_summary(stats: StreamStats) -> None:
    from rich.console import Console
    from rich.table import Table

    d = stats.to_dict()
    table = Table(title=f"stream {stats.session_id}", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value")
    table.add_row("model version", " -> ".join(stats.model_versions) or "?")
    table.add_row("frames sent", str(stats.frames_sent))
    table.add_row("predictions", str(stats.predictions))
    events = ", ".join(f"{k} {v}" for k, v in d["events"].items()) or "none"
    table.add_row("events", events)
    lat = d["latency_ms"]
    table.add_row(
        "latency ms",
        "  ".join(f"{k} {_fmt_ms(lat[k])}" for k in ("p50", "p90", "p99", "p999", "max")),
    )
    rate = d["frames_per_s"]
    table.add_row("elapsed", f"{stats.elapsed_s:.2f} s" + (f" ({rate:g} frames/s)" if rate else ""))
    if "closed" in d:
        c = d["closed"]
        table.add_row(
            "server",
            f"{c['state']}: received {c['frames_received']}, decoded {c['frames_decoded']}, "
            f"missing {c['frames_missing']}, duplicates {c['duplicates_dropped']}, "
            f"late {c['late_dropped']}, coalesced {c['decodes_coalesced']}",
        )
    if stats.error:
        table.add_row("error", stats.error)
    Console(width=max(Console().width, 100)).print(table)


def stream_cmd(
    recording: Annotated[
        str, typer.Argument(help="A recording file (.mat, .nwb, .h5) any loader reads.")
    ],
    target: Annotated[str, typer.Option(help="Server HOST:PORT.")] = "127.0.0.1:9000",
    speed: Annotated[float, typer.Option(help="Replay speed (2 = twice real time).")] = 1.0,
    fast: Annotated[
        bool, typer.Option("--fast", help="Send as fast as the server takes frames.")
    ] = False,
    block_frames: Annotated[int, typer.Option(min=1, help="Frames per message.")] = 1,
    start_frame: Annotated[int, typer.Option(min=0, help="First frame to send.")] = 0,
    max_frames: Annotated[int | None, typer.Option(min=1, help="Frames to send (all).")] = None,
    session_id: Annotated[
        str | None,
        typer.Option(
            help="Which recording of the file (if it holds several); with one recording, the "
            "session id to open it under."
        ),
    ] = None,
    decode_stride: Annotated[
        int, typer.Option(min=0, help="Decode every k-th frame (0: server default).")
    ] = 0,
    top_m: Annotated[int, typer.Option(min=0, help="SAE units per task (0: server default).")] = 0,
    model: Annotated[str, typer.Option(help="Model name (default: the served one).")] = "",
    every: Annotated[int, typer.Option(min=1, help="Print every N-th prediction.")] = 1,
    units: Annotated[int, typer.Option(min=0, help="Units shown per task on a line.")] = 3,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted session.")] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary and per-frame latencies.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CORTEXLENS_TOKEN", help="Bearer token.")
    ] = None,
    tls_root_cert: Annotated[
        Path | None, typer.Option(help="PEM root certificate: connect with TLS.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.")] = 10.0,
) -> None:
    """Stream RECORDING to a server as a live session; print predictions and explanations."""
    from service.client import Client, CortexlensError

    rec, sid = _pick_recording(recording, session_id)
    n_cells = rec.n_units
    shown = 0
    stats = None
    interrupted = False
    error: CortexlensError | None = None
    try:
        with Client(
            target, token=token, root_certificates=tls_root_cert, timeout_s=timeout
        ) as client:
            s = client.stream(
                rec,
                session_id=sid,
                realtime=not fast,
                speed=speed,
                block_frames=block_frames,
                start_frame=start_frame,
                max_frames=max_frames,
                decode_stride=decode_stride,
                top_m=top_m,
                model=model,
                resume=resume,
                metadata={"client": "cortexlens stream", "source": str(recording)},
            )
            with s:
                try:
                    for item in s:
                        if item.kind == "prediction":
                            if shown % every == 0:
                                typer.echo(prediction_line(item, units))
                            shown += 1
                        elif item.kind == "event":
                            typer.echo(event_line(item))
                        elif item.kind == "accepted":
                            typer.echo(accepted_line(item, n_cells))
                except KeyboardInterrupt:
                    interrupted = True
                except CortexlensError as e:
                    error = e
            stats = s.stats()
    except ValueError as e:  # options the client refuses (e.g. start frame beyond the end)
        _fail(str(e), 2)
    if stats is not None and (stats.frames_sent or error is None):
        print_summary(stats)
    if json_out is not None and stats is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        out = stats.to_dict(include_latencies=True)
        out["recording"] = str(recording)
        out["target"] = target
        json_out.write_text(json.dumps(out, indent=2))
    if error is not None:
        _fail(f"{error.code.name}: {error.details} (server {target})", 1)
    if interrupted:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def register(app: typer.Typer) -> None:
    """Called by `service.cli` to add the `stream` command."""
    app.command("stream")(stream_cmd)
