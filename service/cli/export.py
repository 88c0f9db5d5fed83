"""`cortexlens export CHECKPOINT --out BUNDLE --sae DIR`: decoder + SAE + attribution -> bundle.

The SAE is required (``--sae``): an SAE directory (``cfg.json`` + ``sae.safetensors``) or an
`interpret` output directory, whose ``sae/``, ``units.json`` and ``summary.json`` are used. An
SAE is not trained here: its labels (units.json) come from `interpret`, and a bundle whose units
have no labels is of little use; run ``cortexlens interpret CHECKPOINT DATA --out DIR`` first.

Parity ONNX Runtime vs PyTorch is checked on simulated windows and, when ``--data`` is given
(default: the checkpoint's training sources that still exist), on real windows; a difference
above 1e-4 on logits or attributions fails the export. ``--fixed-shape BxT`` adds fixed-shape
graphs (for CUDA graphs, `models.runtime`), parity-checked the same way. Exit status 2 on user
errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer


def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Decoder checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")],
    sae: Annotated[
        Path | None,
        typer.Option(
            "--sae", help="SAE directory, or an `interpret` output directory (sae/, units.json)."
        ),
    ] = None,
    units: Annotated[
        Path | None, typer.Option("--units", help="units.json (default: beside the SAE).")
    ] = None,
    top_m: Annotated[
        int, typer.Option("--top-m", min=1, help="Units attributed per prediction.")
    ] = 16,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="Recordings for the real-window parity check (repeatable)."),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: exporter's).")] = None,
    name: Annotated[str | None, typer.Option(help="Bundle name (default: --out's name).")] = None,
    version: Annotated[str | None, typer.Option(help="Bundle version.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    fixed_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--fixed-shape",
            help="Also export a fixed-shape graph of BATCHxTOKENS (e.g. 1x512; repeatable), "
            "for CUDA graphs on GPU (serve settings: fixed_shapes).",
        ),
    ] = None,
) -> None:
    """Export the decoder with its SAE and ablation attribution to ONNX, as a verified bundle."""
    if sae is None:
        typer.secho(
            "error: --sae DIR is required (an SAE directory or the output of "
            "`cortexlens interpret CHECKPOINT DATA --out DIR`)",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)
    from models.bundle import BundleError
    from models.config import ConfigError
    from models.data.io import load_recordings
    from models.decoder.checkpoint import Checkpoint
    from models.export import export_bundle

    shapes = []
    for spec in fixed_shape or []:
        parts = spec.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            typer.secho(
                f"error: --fixed-shape {spec!r}: expected BATCHxTOKENS, e.g. 1x512",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(2)
        shapes.append((int(parts[0]), int(parts[1])))
    try:
        ckpt = Checkpoint.load(checkpoint)
        paths = list(data) if data else [s for s in ckpt.config.sources if Path(s).exists()]
        recs = [
            r
            for r in (load_recordings(paths) if paths else [])
            if ckpt.vocab.has_session(r.session_id)
        ]
        bundle = export_bundle(
            checkpoint,
            sae,
            units,
            out,
            top_m=top_m,
            opset=opset,
            recordings=recs,
            name=name,
            version=version,
            overwrite=overwrite,
            fixed_shapes=shapes,
        )
    except (ConfigError, BundleError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    metrics = bundle.read_json("metrics.json")
    par = metrics["parity"]
    typer.echo(f"bundle {out} ({bundle.content_sha256[:12]}) written and verified")
    typer.echo(f"export {metrics['export']['export_s']:.1f} s; parity (max abs diff):")
    for where, p in par.items():
        if isinstance(p, dict):
            keys = ("logits", "attributions", "additivity")
            typer.echo(f"  {where}: " + json.dumps({k: float(f"{p[k]:.2e}") for k in keys}))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
