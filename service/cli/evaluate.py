"""`cortexlens evaluate CHECKPOINT DATA... --json OUT`: decoder beside baselines, per session."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _parse_window(text: str | None) -> tuple[float, float] | None:
    from models.data.recording import DataError

    if text is None or text.strip().lower() in ("", "trial"):
        return None
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise DataError(
            f"'{text}' is not 'T0,T1' (seconds after onset, e.g. 0,2)", field="--window"
        ) from None
    if not b > a:
        raise DataError(f"'{text}': the end must come after the start", field="--window")
    return (a, b)


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"


SHORT_NAMES = {
    "decoder_reembedded": "dec. re-embedded*",
    "decoder_within_session_upper_bound": "dec. upper bound**",
}


def _pooled_cell(t: dict, model: str) -> str:
    if model == "chance":
        return f"{1 / t['n_classes']:.2f}"
    e = t["pooled"].get(model)
    if not e:
        return "-"
    lo, hi = e["balanced_accuracy_ci95"]
    return f"{e['balanced_accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"


def print_report(report: dict) -> None:
    """One rich table per task: sessions x models, accuracy [95% CI]; the means below."""
    from rich.console import Console
    from rich.table import Table

    from models.evaluate import MODEL_ORDER

    width = Console().width
    for task, t in report["tasks"].items():
        models = [m for m in MODEL_ORDER if m in t["mean"]]
        models += sorted(set(t["mean"]) - set(models))
        table = Table(
            title=f"{task} ({t['n_classes']} classes): accuracy \\[95% CI] on test trials",
            title_justify="left",
        )
        table.add_column("session", no_wrap=True)
        table.add_column("n", justify="right")
        for m in models:
            table.add_column(SHORT_NAMES.get(m, m.replace("_", " ")), no_wrap=True)
        for sid, row in t["per_session"].items():
            n = max(v.get("n_test", 0) for v in row.values())
            table.add_row(sid, str(n), *(_cell(row.get(m)) for m in models))
        means = []
        for m in models:
            ci = t["mean_ci95"].get(m)
            txt = f"{t['mean'][m]:.2f}"
            if ci:
                txt += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
            means.append(txt)
        table.add_row("mean", "", *means, style="bold")
        if len(set(t["mean_n_sessions"].values())) > 1:
            table.add_row(
                "sessions in mean", "", *(str(t["mean_n_sessions"][m]) for m in models), style="dim"
            )
        same = t.get("mean_on_decoder_sessions")
        if same:
            table.add_row(
                "mean, decoder's sessions",
                "",
                *(f"{same[m]:.2f}" if m in same else "-" for m in models),
                style="bold",
            )
        table.add_row(
            "mean bal. acc.",
            "",
            *(f"{t['mean_balanced_accuracy'][m]:.2f}" for m in models),
            style="dim",
        )
        if task == "genetic" and t.get("pooled"):
            table.add_row(
                "pooled bal. acc.",
                "",
                *(_pooled_cell(t, m) for m in models),
                style="dim",
            )
        console = Console(width=max(width, 32 + 21 * len(models)))
        console.print(table)
        if any(m in SHORT_NAMES for m in models):
            console.print(
                "[dim]* training sessions re-embedded from direction labels (optimistic: the "
                "shared weights saw their genotype)  ** own embedding: a lookup of session "
                "identity, upper bound only[/]"
            )
        if "note" in t:
            console.print(f"[yellow]note:[/] {t['note']}")
    console = Console(width=max(width, 120))
    console.print(f"[dim]chance: {report['chance_definition']}[/]")
    console.print(f"[dim]intervals: {report['ci_method']}[/]")
    if "genetic" in report["tasks"]:
        console.print(f"[dim]genetic: {report['tasks']['genetic']['protocol']}[/]")


def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Decoder checkpoint directory.")],
    data: Annotated[
        list[str], typer.Argument(help="Recordings: files, directories or globs (any mix).")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON here.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of bootstrap, MLP and adaptation.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    window: Annotated[
        str | None,
        typer.Option(help="Baseline feature window 'T0,T1' s after onset (default: the trial)."),
    ] = None,
    adapt_steps: Annotated[
        int, typer.Option(min=1, help="Steps of new-session adaptation (direction labels only).")
    ] = 300,
    reembed: Annotated[
        bool,
        typer.Option(help="Also re-embed training sessions for an (optimistic) genetic figure."),
    ] = True,
    loso_retrain: Annotated[
        bool,
        typer.Option(
            help="Strict genetic figure for training sessions: retrain without each (slow)."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines on stderr.")] = False,
) -> None:
    """Per session and task: decoder, logistic, MLP and chance accuracy with bootstrap 95% CIs.

    All models are scored on the same trial-level test splits (the checkpoint's own splits for
    sessions it was trained on). Genetic background is scored across sessions only; the
    within-session decoder figure is shown as a labelled upper bound.
    """
    import torch

    from models.data.io import load_recordings
    from models.decoder.checkpoint import Checkpoint
    from models.evaluate import evaluate_checkpoint, write_json

    win = _parse_window(window)
    ckpt = Checkpoint.load(checkpoint)  # ConfigError (one line, exit 2) if missing or broken
    recs = load_recordings(data)
    torch.set_num_threads(threads)
    report = evaluate_checkpoint(
        ckpt,
        recs,
        seed=seed,
        n_boot=bootstrap,
        window=win,
        adapt_steps=adapt_steps,
        reembed=reembed,
        loso_retrain=loso_retrain,
        progress=not quiet,
        checkpoint_name=str(checkpoint),
    )
    print_report(report)
    if json_out is not None:
        write_json(report, json_out)
        typer.echo(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    """Add `evaluate` to the cortexlens app."""
    app.command("evaluate")(evaluate_cmd)
