"""`cortexlens interpret CHECKPOINT DATA... --out DIR`: SAE, labels, ablations, report.

Writes into DIR: ``report.html`` (self-contained: PNG figures embedded as base64; copies in
``figures/``), ``summary.json`` (for other tools), ``units.json`` (labels and statistics per
unit, the bundle's format) and the SAEs (``sae/``, ``sae_seed2/``, ``sae_random_init/``).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Architecture(StrEnum):
    topk = "topk"
    batchtopk = "batchtopk"
    relu = "relu"


class LabelTrials(StrEnum):
    fit = "fit"
    all = "all"
    test = "test"


def interpret_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Decoder checkpoint directory.")],
    data: Annotated[
        list[str],
        typer.Argument(help="Recordings of the checkpoint's sessions (files, dirs, globs)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory (report, summary, units).")],
    seed: Annotated[int, typer.Option(help="Seed of the SAEs (seed, seed+1) and statistics.")] = 0,
    sae_units: Annotated[
        int | None, typer.Option("--sae-units", help="SAE dictionary size (default 8 x dim).")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Active SAE units per latent token.")] = 32,
    steps: Annotated[int, typer.Option(help="SAE training steps.")] = 3000,
    e2e_steps: Annotated[
        int,
        typer.Option(
            "--e2e-steps",
            help="End-to-end fine-tune steps of each SAE through the frozen decoder (KL + FVU).",
        ),
    ] = 1000,
    architecture: Annotated[
        Architecture, typer.Option(help="SAE architecture.")
    ] = Architecture.topk,
    n_perm: Annotated[int, typer.Option("--n-perm", help="Permutations per variable.")] = 1000,
    alpha: Annotated[float, typer.Option(help="BH-FDR level of a label.")] = 0.01,
    ablation_draws: Annotated[
        int, typer.Option("--ablation-draws", help="Random unit sets per ablated variable.")
    ] = 100,
    label_trials: Annotated[
        LabelTrials,
        typer.Option("--label-trials", help="Trials labels are computed on (fit = train + val)."),
    ] = LabelTrials.fit,
    window_stride: Annotated[
        int, typer.Option("--window-stride", help="Keep every n-th decoded window of a trial.")
    ] = 1,
    max_unit_figures: Annotated[
        int,
        typer.Option(
            "--max-unit-figures",
            help="Dashboards with a figure (most selective first; every labelled unit gets a "
            "dashboard). Negative: all.",
        ),
    ] = 150,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
) -> None:
    """Train SAEs on a checkpoint's latent stream, label units against two controls, ablate them,
    compare attribution methods, and write an HTML report with summary.json and units.json."""
    import torch

    from models.data.io import load_recordings
    from models.decoder.checkpoint import Checkpoint
    from models.interpret.pipeline import (
        InterpretConfig,
        ground_truth_recovery,
        run_interpret,
        write_outputs,
    )
    from models.interpret.report import write_report

    torch.set_num_threads(threads)
    ckpt = Checkpoint.load(checkpoint)  # before reading data: a bad checkpoint fails fast
    recs = load_recordings(data)
    cfg = InterpretConfig(
        seed=seed,
        sae_units=sae_units,
        k=k,
        steps=steps,
        e2e_steps=e2e_steps,
        architecture=architecture.value,
        n_perm=n_perm,
        alpha=alpha,
        ablation_draws=ablation_draws,
        label_trials=label_trials.value,
        window_stride=window_stride,
    )

    def log(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    res = run_interpret(ckpt, recs, cfg, log=log)
    truths = _load_truths(data)
    if truths:  # simulated corpus: compare the labels with what was planted
        res.summary["ground_truth"] = ground_truth_recovery(res, truths)
    paths = write_outputs(res, out, report=False)
    paths["report"] = write_report(
        res, out, max_unit_figures=None if max_unit_figures < 0 else max_unit_figures
    )
    s = res.summary
    short = {
        "out": str(out),
        "report": str(paths["report"]),
        "sae": {k2: s["sae"][k2] for k2 in ("l0", "fvu", "dead_fraction")},
        "accuracy": {
            t: {c: r[c] for c in ("decoder", "spliced", "mean_ablation")}
            for t, r in s["accuracy"].items()
        },
        "labels": s["labels"],
        "controls": {c: s["controls"][c] for c in ("random_init", "shuffled")},
        "runtime_s": s["runtime_s"].get("total_s"),
    }
    if "ground_truth" in s:
        short["ground_truth"] = s["ground_truth"]
    typer.echo(json.dumps(short, indent=2))
    sys.stdout.flush()


def _load_truths(data: list[str]) -> list:
    """Simulator ground truth (``<recording>.truth.json``) beside the recordings, if any."""
    from models.data.io import expand_paths
    from models.data.simulate import load_truth, truth_path

    out = []
    for f in expand_paths(data):
        if truth_path(f).is_file():
            out.append(load_truth(f))
    return out


def register(app: typer.Typer) -> None:
    """Add `interpret` to the cortexlens app."""
    app.command("interpret")(interpret_cmd)
