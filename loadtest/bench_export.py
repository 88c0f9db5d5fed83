"""ONNX Runtime vs PyTorch eager latency of the explained decoder (decoder + SAE + attribution).

One run sweeps both tokenizers (``patch``, ``poyo``), 64-2,048 cells, batch sizes 1-64, with the
attribution outputs ON (the bundle's graph: units, activations, logits, probs, attributions,
unexplained) and OFF (`ExplainedDecoder(..., attributions=False)`: units, activations, logits,
probs). For every (tokenizer, attributions) the ONNX graph is exported ONCE (dynamic batch and
token dimensions; export time printed) and reused for every cell count and batch size.

Engines, per config interleaved in blocks of ``--block`` runs (default 10: each engine runs warm,
as it would in its own serving process, while load that drifts during a config reaches every
engine; the order rotates every block): ONNX Runtime on the exported
graph; PyTorch eager on the trained modules as they are (`ExplainedDecoder(..., folded=False)`,
the torch_brain attention blocks: the baseline of the speed-up); and PyTorch eager on the
exported graph's own arithmetic (`models.decoder.folded`: rotary embeddings and every constant
folded into the weights), so the table separates what the rewrite gains from what ONNX Runtime
gains. Per engine p50/p90/p99 in milliseconds per batch; the speed-up eager_p50 / ort_p50 and the
median of the per-run ratios (more robust to load that changes during a config).
Both engines use ``--threads`` intra-op threads (default 1). Windows are ``--window`` s at
``--fs`` Hz (poyo: frames x cells tokens); configs above ``--max-tokens`` tokens per batch are
skipped and listed, and the sweep is bounded by ``--max-seconds`` (exports included): configs run
in two phases: first every config, cheapest first, gets its warm-up and ``--min-repeats`` timed
runs, or as many as fit in 1 s (configs that no longer fit are listed as skipped), then the
time left tops the configs up towards ``--repeats`` timed runs, cheapest first, each a fair
share of what is left.

The model is the default `DecoderConfig` (the architecture `cortexlens train` builds) with the
Park tasks, and a TopK SAE of the `interpret` default size (8 x dim units, k = 16), all with
UNTRAINED random weights: latency does not depend on the weights.

    .venv/bin/python -m loadtest.bench_export                     # full sweep, <= ~10 min
    .venv/bin/python -m loadtest.bench_export --quick             # CI: a few configs, < 1 min
    .venv/bin/python -m loadtest.bench_export --cells 512 --batches 1 --tokenizers patch \\
        --top-m 16 --repeats 200 --json out.json --markdown out.md

Absolute times mean little on a shared CPU box; the ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.decoder.config import DecoderConfig
from models.decoder.model import Decoder
from models.decoder.tokenizers import tokenizer_for
from models.export import (
    INPUT_NAMES,
    ExplainedDecoder,
    export_onnx,
    ort_session,
    parity,
    simulated_batch,
)
from models.sae import SAEConfig, build_sae

TASKS = {"direction": 8, "temporal_frequency": 5, "genetic": 2}  # what Park data trains
SPEEDUP_TARGET = 3.0  # issue 5: ORT >= 3x faster than eager for `patch` on CPU
BUDGET_MS = 3.3  # issue 5: a 512-cell `patch` window with 16 attributions, batch 1, median
BUDGET_CONFIG = {"tokenizer": "patch", "cells": 512, "batch": 1, "attributions": True}
PHASE1_S = 1.0  # seconds of timed rounds a cheap config gets in phase 1
QUICK = {  # CI: the `patch` graphs (both headline checks), a few configs; exports ~10 s each
    "tokenizers": "patch",
    "cells": "64,512",
    "batches": "1,4",
    "repeats": 20,
    "min_repeats": 3,
    "warmup": 2,
    "max_seconds": 55.0,
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def _onoff(s: str) -> list[bool]:
    out = []
    for x in str(s).split(","):
        x = x.strip().lower()
        if x in ("on", "true", "1", "yes"):
            out.append(True)
        elif x in ("off", "false", "0", "no"):
            out.append(False)
        elif x:
            raise SystemExit(f"--attributions: expected on/off, got {x!r}")
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    out = {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 90, 99)}
    out["mean"] = round(float(a.mean()), 4)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default="patch,poyo")
    ap.add_argument("--cells", default="64,128,256,512,1024,2048")
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes")
    ap.add_argument("--attributions", default="on,off", help="on, off or on,off")
    ap.add_argument("--top-m", type=int, default=16, help="SAE units attributed")
    ap.add_argument("--fs", type=float, default=30.0, help="frame rate (Hz) of the windows")
    ap.add_argument("--window", type=float, default=1.0, help="window (s)")
    ap.add_argument("--repeats", type=int, default=100, help="max timed runs per engine")
    ap.add_argument("--min-repeats", type=int, default=5, help="min timed runs per engine")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per engine")
    ap.add_argument(
        "--block",
        type=int,
        default=10,
        help="timed runs of one engine in a row before the next engine runs (1 = alternate "
        "every run: each engine then starts with caches the others filled)",
    )
    ap.add_argument("--max-tokens", type=int, default=300_000, help="per batch; above: skipped")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="whole run, exports too")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, ORT and torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="CI: " + json.dumps(QUICK))
    ap.add_argument("--json", type=Path, default=None, help="write every config here")
    ap.add_argument("--markdown", type=Path, default=None, help="write a summary here")
    g = ap.add_argument_group("model (defaults: DecoderConfig / interpret defaults)")
    g.add_argument("--dim", type=int, default=None)
    g.add_argument("--dim-head", type=int, default=None)
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--num-latents", type=int, default=None)
    g.add_argument("--sae-units", type=int, default=None, help="default 8 x dim")
    g.add_argument("--sae-k", type=int, default=16)
    args = ap.parse_args(argv)
    if args.quick:  # quick values unless the flag was given explicitly
        raw = sys.argv[1:] if argv is None else argv
        given = {a.split("=")[0] for a in raw if a.startswith("--")}
        for k, v in QUICK.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.min_repeats = max(1, min(args.min_repeats, args.repeats))
    return args


@dataclass
class Variant:
    tokenizer: str
    attributions: bool
    model: ExplainedDecoder  # what is exported: the decoder's arithmetic with constants folded
    eager: ExplainedDecoder  # the eager baseline: the trained modules as they are
    session: Any
    export_s: float
    onnx_mb: float
    parity: dict[str, float]


def build_decoder(tokenizer: str, n_units: int, args: argparse.Namespace) -> Decoder:
    over = {
        k: getattr(args, k)
        for k in ("dim", "dim_head", "depth", "num_latents")
        if getattr(args, k) is not None
    }
    cfg = DecoderConfig(
        tokenizer=tokenizer,
        window_s=args.window,
        n_units=n_units,
        n_sessions=1,
        tasks=TASKS,
        dropout=0.0,
        **over,
    )
    torch.manual_seed(args.seed)
    return Decoder(cfg).eval()


@contextlib.contextmanager
def _quiet_export():
    """The dynamo exporter's warnings (torchvision ops, axis renames) are noise here."""
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


def export_variants(args: argparse.Namespace, tmp: Path, log: Callable[[str], None]) -> list:
    toks = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
    n_units = max(_ints(args.cells))
    out = []
    for tok in toks:
        dec = build_decoder(tok, n_units, args)
        d = dec.config.dim
        n_sae = args.sae_units or 8 * d
        sae = build_sae(SAEConfig(d_in=d, n_units=n_sae, k=min(args.sae_k, n_sae), seed=0)).eval()
        check = [simulated_batch(dec, 2, 7, seed=3, fs=args.fs)]
        for attr in _onoff(args.attributions):
            model = ExplainedDecoder(dec, sae, args.top_m, attributions=attr).eval()
            eager = ExplainedDecoder(dec, sae, args.top_m, attributions=attr, folded=False)
            path = tmp / f"{tok}_{'on' if attr else 'off'}.onnx"
            t0 = time.perf_counter()
            with _quiet_export():
                export_onnx(model, path, simulated_batch(dec, 2, 8, seed=0, fs=args.fs))
            export_s = time.perf_counter() - t0
            sess = ort_session(path, threads=args.threads)
            par = parity(model, sess, check)
            v = Variant(
                tok, attr, model, eager.eval(), sess, export_s, path.stat().st_size / 2**20, par
            )  # fmt: skip
            log(
                f"exported {tok:>5} attributions {'on ' if attr else 'off'}: {export_s:6.1f} s, "
                f"{v.onnx_mb:.2f} MB, parity max|logits| {par['logits']:.1e}"
            )
            out.append(v)
    return out


def plan(args: argparse.Namespace, variants: list[Variant]) -> tuple[list[dict], list[dict]]:
    """All configs, cheapest first; those above ``--max-tokens`` go straight to skipped."""
    n_frames = max(int(args.window * args.fs), 2)
    todo, skipped = [], []
    for v in variants:
        tok = tokenizer_for(v.model.decoder.config)
        for cells in _ints(args.cells):
            for b in _ints(args.batches):
                tokens = b * tok.n_tokens(n_frames, cells)
                c = {
                    "tokenizer": v.tokenizer,
                    "cells": cells,
                    "batch": b,
                    "attributions": v.attributions,
                    "tokens": tokens,
                }
                if tokens > args.max_tokens:
                    skipped.append(
                        c | {"reason": f"{tokens:,} tokens per batch > --max-tokens "
                             f"{args.max_tokens:,}"}
                    )  # fmt: skip
                else:
                    todo.append(c | {"_v": v})
    # cheapest first; the two attribution variants of one window next to each other
    todo.sort(key=lambda c: (c["tokens"], c["tokenizer"], c["cells"], not c["attributions"]))
    return todo, skipped


ENGINES = ("ort", "eager", "eager_folded")


def measure(
    v: Variant, batch: dict[str, torch.Tensor], n: int, warmup: int, block: int = 1
) -> tuple[dict[str, list[float]], float]:
    """Interleaved timings per engine (`ENGINES`: ORT, eager of the trained modules, eager of the
    folded graph that is exported), seconds per batch, the order rotating every repeat; and the
    max |logits| difference ORT vs the trained modules."""
    feeds = {k: batch[k].numpy() for k in INPUT_NAMES}
    inputs = tuple(batch[k] for k in INPUT_NAMES)
    sess = v.session

    def run_ort():
        return sess.run(None, feeds)

    def eager(model):
        def run():
            with torch.inference_mode():
                return model(*inputs)

        return run

    fns = {"ort": run_ort, "eager": eager(v.eager), "eager_folded": eager(v.model)}
    names = v.model.output_names
    got = dict(zip(names, run_ort(), strict=True))
    ref = dict(zip(names, fns["eager"](), strict=True))
    diff = max(
        float(np.abs(got[f"{t}.logits"] - ref[f"{t}.logits"].numpy()).max())
        for t in v.model.task_names
    )
    for _ in range(max(warmup - 1, 0)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in ENGINES}
    gc.collect()
    gc.disable()
    try:
        for j, start in enumerate(range(0, n, block)):
            order = ENGINES[j % 3 :] + ENGINES[: j % 3]
            for k in order:
                for _ in range(min(block, n - start)):
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times, diff


def _round(times: dict[str, list[float]]) -> list[float]:
    """Seconds of one round (every engine once), per repeat."""
    return list(np.sum([times[k] for k in ENGINES], axis=0))


def _row(m: dict) -> dict:
    c, t = m["c"], m["t"]
    t_o, t_e = t["ort"], t["eager"]
    ort, eager, folded = percentiles(t_o), percentiles(t_e), percentiles(t["eager_folded"])
    return c | {
        "repeats": len(t_o),
        "ort_ms": ort,
        "eager_ms": eager,
        "eager_folded_ms": folded,
        "speedup_p50": round(eager["p50"] / ort["p50"], 3),
        "speedup_paired_median": round(float(np.median(np.divide(t_e, t_o))), 3),
        "speedup_vs_folded_eager_p50": round(folded["p50"] / ort["p50"], 3),
        "ort_p50_per_window_ms": round(ort["p50"] / c["batch"], 4),
        "max_abs_diff_logits": m["diff"],
    }


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Phase 1: every config (cheapest first) gets its warm-up and ``--min-repeats`` timed
    pairs, while time is left; phase 2: the time left tops configs up towards ``--repeats``
    (cheapest first, each a fair share of what is left)."""
    t_start = time.perf_counter()
    load_start = _loadavg()
    deadline = t_start + args.max_seconds
    torch.set_num_threads(args.threads)
    measured: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        variants = export_variants(args, Path(tmp), log)
        todo, skipped = plan(args, variants)
        cost_per_token: dict[tuple[str, bool], float] = {}  # s per token, every engine once
        cache: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}

        def batch_for(c: dict, v: Variant) -> dict[str, torch.Tensor]:
            key = (c["tokenizer"], c["cells"], c["batch"])
            if key not in cache:
                cache.clear()  # one window batch alive at a time (on and off share it)
                cache[key] = simulated_batch(
                    v.model.decoder, c["batch"], c["cells"], seed=args.seed, fs=args.fs
                )
            return cache[key]

        log(
            f"phase 1: warm-up {args.warmup} + {args.min_repeats} timed rounds per config "
            f"(up to {PHASE1_S:g} s of them, at most {args.repeats})"
        )
        per_config = args.warmup + args.min_repeats
        for c in todo:
            v: Variant = c.pop("_v")
            key = (c["tokenizer"], c["attributions"])
            left = deadline - time.perf_counter()
            # the latest (largest) config of the same graph, per token
            est = cost_per_token.get(key, 0.0) * c["tokens"]
            if left <= 0 or est * per_config > left:
                why = f"~{est * 1e3:.0f} ms per round of the engines, " if est else ""
                skipped.append(
                    c | {"reason": f"time budget (--max-seconds {args.max_seconds:g}): "
                         f"{why}{max(left, 0):.0f} s left"}
                )  # fmt: skip
                continue
            batch = batch_for(c, v)
            t, diff = measure(v, batch, 1, args.warmup)
            # cheap configs get up to PHASE1_S of timed rounds already (more samples for p99
            # even when little time is left for phase 2)
            n1 = int(np.clip(PHASE1_S / max(_round(t)[0], 1e-6), args.min_repeats, args.repeats))
            more, _ = measure(v, batch, n1 - 1, 0, args.block)
            t = {k: t[k] + more[k] for k in ENGINES}
            cost_per_token[key] = float(np.median(_round(t))) / c["tokens"]
            m = {"c": c, "v": v, "t": t, "diff": diff}
            measured.append(m)
            log(_row_line(_row(m)))
        cache.clear()
        todo_2 = [m for m in measured if len(m["t"]["ort"]) < args.repeats]
        log(f"phase 2: {deadline - time.perf_counter():.0f} s left for {len(todo_2)} configs")
        for j, m in enumerate(todo_2):
            one = float(np.median(_round(m["t"])))
            share = (deadline - time.perf_counter()) / (len(todo_2) - j)
            extra = min(args.repeats - len(m["t"]["ort"]), int(share / max(one, 1e-6)) - 1)
            if extra < 1:
                continue
            t, _ = measure(m["v"], batch_for(m["c"], m["v"]), extra, 1, args.block)
            for k in ENGINES:
                m["t"][k] += t[k]
        cache.clear()
    rows = [_row(m) for m in measured]
    rows.sort(key=_order)
    skipped.sort(key=_order)
    wall = time.perf_counter() - t_start
    return {
        "what": "explained decoder latency, ONNX Runtime vs PyTorch eager, ms per batch",
        "weights": "untrained (random); latency does not depend on the weights",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "threads": args.threads,
        "eager_mode": "torch.inference_mode()",
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("json", "markdown")
        },
        "decoder": {
            k: getattr(variants[0].model.decoder.config, k)
            for k in (
                "dim",
                "dim_head",
                "depth",
                "num_latents",
                "cross_heads",
                "self_heads",
                "ffn_mult",
                "patch_samples",
                "window_s",
                "tasks",
            )
        }
        if variants
        else {},
        "sae": (
            json.loads(
                variants[0].model.sae.cfg.model_dump_json(
                    include={"architecture", "d_in", "n_units", "k"}
                )
            )
            if variants
            else {}
        ),
        "top_m": variants[0].model.top_m if variants else args.top_m,
        "exports": [
            {
                "tokenizer": v.tokenizer,
                "attributions": v.attributions,
                "export_s": round(v.export_s, 2),
                "onnx_mb": round(v.onnx_mb, 2),
                "outputs": v.model.output_names,
                "parity": v.parity,
            }
            for v in variants
        ],
        "rows": rows,
        "skipped": skipped,
        "checks": checks(rows, variants[0].model.top_m if variants else args.top_m),
        "wall_s": round(wall, 1),
        "loadavg_1min": {"start": load_start, "end": _loadavg(), "cpus": os.cpu_count()},
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _order(r: dict) -> tuple:
    return (r["tokenizer"], not r["attributions"], r["cells"], r["batch"])


def checks(rows: list[dict], top_m: int) -> dict:
    """The issue's two headline checks."""
    patch = [r for r in rows if r["tokenizer"] == "patch"]
    meets = [r for r in patch if r["speedup_p50"] >= SPEEDUP_TARGET]
    fails = [r for r in patch if r["speedup_p50"] < SPEEDUP_TARGET]

    def key(r):
        return {k: r[k] for k in ("cells", "batch", "attributions")} | {"x": r["speedup_p50"]}

    sp = {
        "target": SPEEDUP_TARGET,
        "measured_configs": len(patch),
        "meets": [key(r) for r in meets],
        "fails": [key(r) for r in fails],
        "all_meet": bool(patch) and not fails,
        "meets_by_paired_median": sum(r["speedup_paired_median"] >= SPEEDUP_TARGET for r in patch),
        "median_speedup": round(float(np.median([r["speedup_p50"] for r in patch])), 3)
        if patch
        else None,
    }
    b = next((r for r in rows if all(r[k] == v for k, v in BUDGET_CONFIG.items())), None)
    budget = BUDGET_CONFIG | {"top_m": top_m, "budget_ms": BUDGET_MS, "measured": b is not None}
    if b is not None:
        budget |= {
            "ort_p50_ms": b["ort_ms"]["p50"],
            "ort_p99_ms": b["ort_ms"]["p99"],
            "eager_p50_ms": b["eager_ms"]["p50"],
            "ort_within_budget": b["ort_ms"]["p50"] <= BUDGET_MS,
            "eager_within_budget": b["eager_ms"]["p50"] <= BUDGET_MS,
        }
    return {"patch_speedup": sp, "patch_512_budget": budget}


# -- output ---------------------------------------------------------------------------------------
HEADER = (
    f"{'tok':>5} {'attr':>4} {'cells':>5} {'batch':>5} {'tokens':>7} {'n':>3} | "
    f"{'ORT p50':>8} {'p90':>8} {'p99':>8} | {'eager p50':>9} {'p90':>8} {'p99':>8} | "
    f"{'eager/ORT':>9} {'paired':>6} | {'folded eager p50':>16} {'/ORT':>6}"
)


def _row_line(r: dict) -> str:
    o, e, f = r["ort_ms"], r["eager_ms"], r["eager_folded_ms"]
    return (
        f"{r['tokenizer']:>5} {'on' if r['attributions'] else 'off':>4} {r['cells']:>5} "
        f"{r['batch']:>5} {r['tokens']:>7} {r['repeats']:>3} | {o['p50']:>8.2f} {o['p90']:>8.2f} "
        f"{o['p99']:>8.2f} | {e['p50']:>9.2f} {e['p90']:>8.2f} {e['p99']:>8.2f} | "
        f"{r['speedup_p50']:>8.2f}x {r['speedup_paired_median']:>5.2f}x | {f['p50']:>16.2f} "
        f"{r['speedup_vs_folded_eager_p50']:>5.2f}x"
    )


def check_lines(res: dict) -> list[str]:
    c = res["checks"]
    sp, bud = c["patch_speedup"], c["patch_512_budget"]
    out = [f"check 1: ORT speed-up >= {sp['target']:g}x over eager for `patch` on CPU (p50)"]
    if not sp["measured_configs"]:
        out.append("  no patch config measured")
    else:
        verdict = (
            "ALL MEET" if sp["all_meet"] else f"{len(sp['meets'])} MEET, {len(sp['fails'])} DO NOT"
        )
        out.append(
            f"  {verdict} of {sp['measured_configs']} patch configs "
            f"(median speed-up {sp['median_speedup']:.2f}x; by the median of per-pair ratios "
            f"{sp['meets_by_paired_median']} meet)"
        )
        for label, lst in (("meet", sp["meets"]), ("do not meet", sp["fails"])):
            if lst:
                items = ", ".join(
                    f"{r['cells']}c/b{r['batch']}/{'on' if r['attributions'] else 'off'} "
                    f"{r['x']:.2f}x"
                    for r in lst
                )
                out.append(f"  {label}: {items}")
    out.append(
        f"check 2: 512-cell `patch` window, {bud['top_m']} attributions, batch 1, median <= "
        f"{bud['budget_ms']:g} ms"
    )
    if not bud["measured"]:
        out.append("  not measured in this run")
    else:
        ok = "WITHIN" if bud["ort_within_budget"] else "OVER"
        eok = "within" if bud["eager_within_budget"] else "over"
        out.append(
            f"  ORT p50 {bud['ort_p50_ms']:.2f} ms ({ok} budget; p99 {bud['ort_p99_ms']:.2f} ms), "
            f"eager p50 {bud['eager_p50_ms']:.2f} ms ({eok})"
        )
    return out


def header_lines(res: dict) -> list[str]:
    d = res["decoder"]
    s = res["settings"]
    return [
        f"{res['what']}; {res['threads']} intra-op thread(s) each; torch {res['torch']}, "
        f"onnxruntime {res['onnxruntime']}, {res['machine']}",
        f"model: decoder dim {d.get('dim')}, depth {d.get('depth')}, {d.get('num_latents')} "
        f"latents, tasks {d.get('tasks')}; SAE {res['sae']}; top_m {res['top_m']}; "
        f"{res['weights']}",
        f"windows: {s['window']:g} s at {s['fs']:g} Hz (poyo: frames x cells tokens); "
        f"n = timed runs per engine, interleaved in blocks of {s.get('block', 1)} runs; times are "
        f"ms per batch; eager = the trained modules (torch_brain blocks) in PyTorch eager, "
        f"eager/ORT = eager p50 / ORT p50, "
        f"paired = median of the per-run ratios (run back to back); folded eager = the exported "
        f"graph's own arithmetic (constants folded, `models.decoder.folded`) in PyTorch eager, "
        f"/ORT = its p50 / ORT p50 (what ONNX Runtime adds over the rewrite)",
    ]


def print_report(res: dict, log: Callable[[str], None] = print) -> None:
    log("")
    for line in header_lines(res):
        log(line)
    for e in res["exports"]:
        log(
            f"  export {e['tokenizer']:>5} attributions {'on ' if e['attributions'] else 'off'}: "
            f"{e['export_s']:.1f} s, {e['onnx_mb']:.2f} MB"
        )
    log(HEADER)
    for r in res["rows"]:
        log(_row_line(r))
    if res["skipped"]:
        log(f"skipped ({len(res['skipped'])}):")
        for r in res["skipped"]:
            log(
                f"  {r['tokenizer']:>5} {'on' if r['attributions'] else 'off':>3} "
                f"{r['cells']:>5} cells batch {r['batch']:>2}: {r['reason']}"
            )
    for line in check_lines(res):
        log(line)
    la = res["loadavg_1min"]
    log(
        f"wall time {res['wall_s']:.0f} s; 1-min load average {la['start']} at the start, "
        f"{la['end']} at the end, on {la['cpus']} CPUs (other work on the box inflates times)"
    )


def markdown(res: dict) -> str:
    out = ["# Explained decoder: ONNX Runtime vs PyTorch eager", ""]
    out += [f"- {line}" for line in header_lines(res)]
    out += [
        "- exports (once per tokenizer x attributions, dynamic batch and tokens): "
        + ", ".join(
            f"{e['tokenizer']}/{'on' if e['attributions'] else 'off'} {e['export_s']:.1f} s"
            for e in res["exports"]
        ),
        f"- wall time {res['wall_s']:.0f} s; 1-min load average {res['loadavg_1min']['start']} "
        f"at the start, {res['loadavg_1min']['end']} at the end, on "
        f"{res['loadavg_1min']['cpus']} CPUs",
        "",
        "## Checks",
        "",
        "```",
        *check_lines(res),
        "```",
        "",
        "## Latency (ms per batch)",
        "",
        "| tokenizer | attributions | cells | batch | tokens | n | ORT p50 | ORT p90 | ORT p99 "
        "| eager p50 | eager p90 | eager p99 | eager/ORT p50 | paired | folded eager p50 "
        "| folded eager/ORT |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in res["rows"]:
        o, e, f = r["ort_ms"], r["eager_ms"], r["eager_folded_ms"]
        out.append(
            f"| {r['tokenizer']} | {'on' if r['attributions'] else 'off'} | {r['cells']} | "
            f"{r['batch']} | {r['tokens']} | {r['repeats']} | {o['p50']:.2f} | {o['p90']:.2f} | "
            f"{o['p99']:.2f} | {e['p50']:.2f} | {e['p90']:.2f} | {e['p99']:.2f} | "
            f"{r['speedup_p50']:.2f}x | {r['speedup_paired_median']:.2f}x | {f['p50']:.2f} | "
            f"{r['speedup_vs_folded_eager_p50']:.2f}x |"
        )
    if res["skipped"]:
        out += ["", "## Skipped", ""]
        for r in res["skipped"]:
            out.append(
                f"- {r['tokenizer']} attributions {'on' if r['attributions'] else 'off'}, "
                f"{r['cells']} cells, batch {r['batch']}: {r['reason']}"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print_report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
