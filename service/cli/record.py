"""`cortexlens record ...`: inspect and export the durable records of streamed sessions.

Every frame a live session receives is appended to ``<home>/sessions/<session_id>`` (CRC-checked,
fsync'd chunks). These commands read a record without disturbing a live writer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.cli.errors import exits_on

record_app = typer.Typer(help="Durable records of streamed sessions.", no_args_is_help=True)


def _resolve(record: str, home: Path | None) -> Path:
    p = Path(record)
    if (p / "meta.json").is_file():
        return p
    from service.home import sessions_dir

    q = sessions_dir(home) / record
    if (q / "meta.json").is_file():
        return q
    typer.secho(
        f"error: {record}: no session record there or in {sessions_dir(home)}",
        fg=typer.colors.RED,
        err=True,
    )
    sys.exit(2)


_ingest_errors = exits_on("service.ingest:IngestError", message=lambda e: f"{e.code}: {e.message}")


@record_app.command("status")
@_ingest_errors
def status_cmd(
    record: Annotated[str, typer.Argument(help="Record directory or session id.")],
    home: Annotated[Path | None, typer.Option(help="Home (default: .cortexlens).")] = None,
) -> None:
    """State (LIVE, CLOSED, INTERRUPTED), frames recorded and missing, last frame index."""
    from service.ingest import record_status

    typer.echo(json.dumps(record_status(_resolve(record, home)), indent=2))


@record_app.command("list")
def list_cmd(
    home: Annotated[Path | None, typer.Option(help="Home (default: .cortexlens).")] = None,
) -> None:
    """Every recorded session under the home, one line each."""
    from service.home import sessions_dir
    from service.ingest import IngestError, record_status

    root = sessions_dir(home)
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (d / "meta.json").is_file():
            continue
        try:
            s = record_status(d)
        except IngestError as e:
            typer.echo(f"{d.name:40s} unreadable: {e.message}")
            continue
        typer.echo(
            f"{d.name:40s} {s['state']:12s} frames {s['frames_recorded']:>8} "
            f"missing {s['frames_missing']:>6} cells {s['n_cells']:>5}"
        )


@record_app.command("export")
@_ingest_errors
def export_cmd(
    record: Annotated[str, typer.Argument(help="Record directory or session id.")],
    out: Annotated[Path, typer.Argument(help="Output file (.nwb, or .h5 for brainsets).")],
    home: Annotated[Path | None, typer.Option(help="Home (default: .cortexlens).")] = None,
) -> None:
    """Export the received frames (gaps listed, not filled) to NWB or brainsets HDF5."""
    from service.ingest import FrameRecord

    fmt = "brainsets" if out.suffix in (".h5", ".hdf5") else "nwb"
    rec = FrameRecord.open(_resolve(record, home), readonly=True)
    path = rec.export(out, fmt=fmt)
    typer.echo(f"wrote {path} ({rec.n_frames} frames, {rec.header.n_cells} cells, {fmt})")


def register(app: typer.Typer) -> None:
    app.add_typer(record_app, name="record")
