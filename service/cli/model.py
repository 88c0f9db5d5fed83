"""`cortexlens train` and `cortexlens adapt`: train the decoder, adapt it to a new session."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class TokenizerChoice(StrEnum):
    patch = "patch"
    poyo = "poyo"


def train_cmd(
    data: Annotated[
        list[str], typer.Argument(help="Recordings: files, directories or globs (any mix).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    tokenizer: Annotated[
        TokenizerChoice | None,
        typer.Option(help="Input tokens: patch (real-time default) or poyo."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum epochs, early stopping on val [80].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of splits, initialisation and sampling.")] = 0,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without val improvement to stop [20].")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per step [64].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate, AdamW [2e-3].")] = None,
    dim: Annotated[int | None, typer.Option(help="Model width [64].")] = None,
    depth: Annotated[int | None, typer.Option(help="Self-attention layers [2].")] = None,
    latents: Annotated[int | None, typer.Option(help="Latent tokens along the window [8].")] = None,
    window: Annotated[float | None, typer.Option(help="Context window in seconds [1.0].")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads [1].")] = None,
    direct_path: Annotated[
        bool | None,
        typer.Option(
            "--direct-path/--no-direct-path",
            help="Add a linear per-cell path into the latents [on].",
        ),
    ] = None,
    unit_init_scale: Annotated[
        float | None, typer.Option(help="Init std of the unit embedding rows [0.1].")
    ] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(help="Moving average of the weights, validated and kept (0 = off) [0]."),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop after this many minutes of training.")
    ] = None,
    select_on: Annotated[
        str | None,
        typer.Option(help="Keep the epoch with the best validation 'accuracy' or 'nll' [nll]."),
    ] = None,
    finetune_epochs: Annotated[
        int | None,
        typer.Option(help="Then fit only unit/session embeddings this many epochs (0 = off) [10]."),
    ] = None,
    tuning_init: Annotated[
        float | None,
        typer.Option(
            help="Start unit gain embeddings from tuning on training trials (0 = off) [1]."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A config.json (CheckpointConfig) to start from; flags override it."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train the decoder on recordings; write a checkpoint directory with its training log."""
    from models.data.io import expand_paths, load_recordings
    from models.decoder.config import CheckpointConfig, DecoderConfig, TrainConfig
    from models.train import train

    files = expand_paths(data)
    recs = load_recordings(files)
    if config is not None:
        base = CheckpointConfig.load(config)
        dcfg, tcfg = base.decoder, base.training or TrainConfig()
    else:
        dcfg, tcfg = DecoderConfig(), TrainConfig()

    def given(**kw):
        return {k: (v.value if isinstance(v, TokenizerChoice) else v) for k, v in kw.items()
                if v is not None}  # fmt: skip

    dcfg = DecoderConfig.model_validate(
        {
            **dcfg.to_dict(),
            **given(
                tokenizer=tokenizer,
                dim=dim,
                depth=depth,
                num_latents=latents,
                window_s=window,
                direct_path=direct_path,
                unit_init_scale=unit_init_scale,
            ),  # fmt: skip
        }
    )
    tcfg = TrainConfig.model_validate(
        {
            **tcfg.to_dict(),
            "seed": seed,
            **given(
                epochs=epochs,
                patience=patience,
                batch_size=batch_size,
                lr=lr,
                threads=threads,
                max_minutes=max_minutes,
                ema_decay=ema_decay,
                select_on=select_on,
                finetune_epochs=finetune_epochs,
                tuning_init=tuning_init,
            ),  # fmt: skip
        }
    )
    typer.echo(
        f"training a {dcfg.tokenizer} decoder on {len(recs)} session(s) "
        f"({sum(r.n_units for r in recs)} cells) -> {out}",
        err=True,
    )
    _, summary = train(
        recs,
        out,
        decoder_config=dcfg,
        train_config=tcfg,
        sources=[str(f) for f in files],
        progress=not quiet,
    )
    typer.echo(json.dumps({"checkpoint": str(out), **summary}, indent=2))


def adapt_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Trained checkpoint directory.")],
    data: Annotated[list[str], typer.Argument(help="Recording(s) of sessions new to the model.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Adapted checkpoint to write (one session).")
    ] = None,
    trials: Annotated[
        int, typer.Option(help="Labelled trials used (class-balanced, from the train split).")
    ] = 32,
    curve: Annotated[
        str | None,
        typer.Option(help="Comma-separated trial counts: report accuracy vs labelled trials."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Repeats per point of the curve.")] = 1,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the split and the fit.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
) -> None:
    """Fit only a new session's unit and session embeddings from a few labelled trials.

    Trials come from the session's train split (models.splits, the checkpoint's seed); accuracy
    is reported on its test split. Genotype labels are never used.
    """
    import numpy as np
    import torch

    from models.data.io import load_recordings
    from models.decoder.adapt import adapt_session, adaptation_curve, balanced_subset
    from models.decoder.checkpoint import Checkpoint
    from models.decoder.predict import predict_trials
    from models.splits import split_trials
    from models.tasks import direction_labels, genetic_label

    torch.set_num_threads(threads)
    ckpt = Checkpoint.load(checkpoint)
    recs = load_recordings(data)
    if out is not None and len(recs) != 1:
        raise typer.BadParameter("--out needs exactly one recording")
    tc = ckpt.config.training
    results = []
    for rec in recs:
        sp = split_trials(
            rec,
            seed=seed,
            val_fraction=tc.val_fraction if tc else 0.1,
            test_fraction=tc.test_fraction if tc else 0.2,
        )
        pool = np.concatenate([sp.train, sp.val])
        entry = {"session_id": rec.session_id, "n_units": rec.n_units}
        if curve:
            counts = [int(c) for c in curve.split(",") if c.strip()]
            entry["curve"] = adaptation_curve(
                ckpt, rec, pool, sp.test, n_trials=counts, repeats=repeats, steps=steps, seed=seed
            )
        sub = balanced_subset(direction_labels(rec), pool, trials, seed)
        ad = adapt_session(ckpt, rec, sub, steps=steps, seed=seed, progress=True)
        probs = predict_trials(ad, rec, sp.test)
        y = direction_labels(rec)[sp.test]
        entry["n_trials"] = int(sub.size)
        entry["direction_acc"] = float((probs["direction"].argmax(1) == y).mean())
        g = genetic_label(rec, ad.vocab.genetic_classes)
        if "genetic" in probs and g >= 0:
            entry["genetic_acc"] = float((probs["genetic"].argmax(1) == g).mean())
        results.append(entry)
        if out is not None:
            ad.save(out)
    text = json.dumps(results, indent=2)
    typer.echo(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")


def register(app: typer.Typer) -> None:
    """Add `train` and `adapt` to the cortexlens app."""
    app.command("train")(train_cmd)
    app.command("adapt")(adapt_cmd)
