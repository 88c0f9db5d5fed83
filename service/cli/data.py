"""`cortexlens data ...`: inspect, convert and simulate recordings."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Inspect, convert and simulate recordings.", no_args_is_help=True)


class OutFormat(StrEnum):
    nwb = "nwb"
    brainsets = "brainsets"


@app.command("info")
def info(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or globs of recordings.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per session: source, neurons, frames, frame rate, trials per condition, genetic label."""
    from rich.console import Console
    from rich.table import Table

    from models.data.io import load_recordings

    recs = load_recordings(paths)
    summaries = [r.summary() for r in recs]
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    table = Table(title=f"{len(recs)} session(s)")
    table.add_column("session", no_wrap=True)
    for col in ("source", "neurons", "frames", "rate (Hz)", "trials", "genetic"):
        table.add_column(col, no_wrap=True)
    table.add_column("trials per condition", overflow="fold")
    for s in summaries:
        conds = s["trials_per_condition"]
        vals = set(conds.values())
        cond_txt = (
            f"{len(conds)} cond. x {vals.pop()}"
            if len(vals) == 1
            else ", ".join(f"{k}:{v}" for k, v in conds.items())
        )
        src = s["source"] + (" (concat.)" if s["pseudo_continuous"] else "")
        table.add_row(
            s["session_id"],
            src,
            str(s["neurons"]),
            str(s["frames"]),
            f"{s['frame_rate_hz']:g}",
            str(s["trials"]),
            s["genetic_background"],
            cond_txt,
        )
    Console(width=max(Console().width, 120)).print(table)


@app.command("convert")
def convert(
    src: Annotated[str, typer.Argument(help="A file, directory or glob of recordings.")],
    out: Annotated[Path, typer.Argument(help="Output file (one recording) or directory.")],
    to: Annotated[OutFormat, typer.Option("--to", help="Output format.")] = OutFormat.nwb,
) -> None:
    """Convert recordings to NWB (or brainsets HDF5)."""
    from models.data.io import load_recordings, write_recording

    recs = load_recordings([src])
    suffix = ".nwb" if to is OutFormat.nwb else ".h5"
    if len(recs) == 1 and out.suffix.lower() == suffix:
        targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = [out / f"{r.session_id}{suffix}" for r in recs]
    for rec, target in zip(recs, targets, strict=True):
        write_recording(rec, target, fmt=to.value)
        typer.echo(f"wrote {target} ({rec.n_units} units, {rec.n_frames} frames)")


@app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    sessions: Annotated[int, typer.Option(min=1, help="Number of sessions.")] = 1,
    cells: Annotated[int, typer.Option(min=1, help="Cells per session.")] = 200,
    minutes: Annotated[float, typer.Option(min=0.1, help="Minutes per session.")] = 10.0,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same corpus).")] = 0,
    cre_line: Annotated[
        str | None, typer.Option(help="Cre line for every session (default: drawn by seed).")
    ] = None,
    fmt: Annotated[OutFormat, typer.Option("--format", help="Output format.")] = OutFormat.nwb,
) -> None:
    """Simulate Allen Brain Observatory-like sessions (~30 Hz) with ground truth beside them."""
    from models.data.simulate import SimConfig, simulate_corpus

    paths = simulate_corpus(
        n_sessions=sessions,
        n_cells=cells,
        minutes=minutes,
        seed=seed,
        out_dir=out,
        fmt=fmt.value,
        config=SimConfig(cre_line=cre_line),  # n_cells and minutes are set by simulate_corpus
    )
    typer.echo(f"wrote {len(paths)} session(s) with ground truth to {out}")
