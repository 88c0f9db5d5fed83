"""Forward latency of the decoder, `patch` vs `poyo` tokens, 64-2,048 cells, PyTorch eager.

Everything is measured side by side in one run (same process, same machine state), one window
at a time (batch 1, the closed-loop case): the window of the last ``--window`` seconds at
``--fs`` Hz is tokenized (numpy) and decoded (torch, no grad). Reports p50/p90/p99 of the
tokenizer, the forward pass, and both together, in milliseconds, plus ratios poyo/patch.

    .venv/bin/python -m loadtest.bench_decoder                 # defaults: 64,256,1024,2048 cells
    .venv/bin/python -m loadtest.bench_decoder --cells 64,512 --repeats 30 --json out.json

Absolute times mean little on a shared CPU box; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from models.decoder.config import DecoderConfig
from models.decoder.model import Decoder
from models.decoder.tokenizers import collate, get_tokenizer


def percentiles(x: list[float]) -> dict[str, float]:
    a = np.asarray(x) * 1e3
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def bench_one(
    tokenizer: str, n_cells: int, *, fs: float, window_s: float, repeats: int, warmup: int
) -> dict:
    cfg = DecoderConfig(
        tokenizer=tokenizer,
        window_s=window_s,
        n_units=n_cells,
        n_sessions=1,
        tasks={"direction": 8, "temporal_frequency": 5, "genetic": 2},
    )
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    tok = get_tokenizer(tokenizer, window_s=window_s, patch_samples=cfg.patch_samples)
    rng = np.random.default_rng(0)
    n_frames = int(round(window_s * fs)) + 2
    units = np.arange(n_cells)
    t_tok, t_fwd, t_all = [], [], []
    n_tokens = 0
    with torch.inference_mode():
        for i in range(warmup + repeats):
            window = rng.normal(size=(n_frames, n_cells)).astype(np.float32)
            times = 100.0 + np.arange(n_frames) / fs
            t0 = time.perf_counter()
            b = collate([tok.tokenize(window, times, times[-1], units)], [0])
            batch = {k: torch.from_numpy(v) for k, v in b.items()}
            t1 = time.perf_counter()
            out = model.forward_batch(batch)
            _ = {k: v.numpy() for k, v in out.items()}
            t2 = time.perf_counter()
            if i >= warmup:
                t_tok.append(t1 - t0)
                t_fwd.append(t2 - t1)
                t_all.append(t2 - t0)
            n_tokens = int(b["mask"].sum())
    return {
        "tokenizer": tokenizer,
        "cells": n_cells,
        "tokens": n_tokens,
        "tokenize_ms": percentiles(t_tok),
        "forward_ms": percentiles(t_fwd),
        "total_ms": percentiles(t_all),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="64,256,1024,2048")
    ap.add_argument("--tokenizers", default="patch,poyo")
    ap.add_argument("--fs", type=float, default=30.0, help="frame rate (Hz)")
    ap.add_argument("--window", type=float, default=1.0, help="window (s)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells = [int(c) for c in args.cells.split(",")]
    toks = [t.strip() for t in args.tokenizers.split(",")]
    rows = []
    for n in cells:  # interleave tokenizers per cell count: same machine state for the pair
        for t in toks:
            rows.append(
                bench_one(
                    t,
                    n,
                    fs=args.fs,
                    window_s=args.window,
                    repeats=args.repeats,
                    warmup=args.warmup,
                )  # fmt: skip
            )
    print(
        f"decoder forward latency, PyTorch eager, batch 1, {args.window:g} s window at "
        f"{args.fs:g} Hz, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    hdr = f"{'tokenizer':>9} {'cells':>6} {'tokens':>7} | {'tokenize p50':>12} | "
    hdr += f"{'forward p50':>11} {'p90':>8} {'p99':>8} | {'total p50':>9} {'p99':>8}"
    print(hdr)
    for r in rows:
        f, tk, tt = r["forward_ms"], r["tokenize_ms"], r["total_ms"]
        print(
            f"{r['tokenizer']:>9} {r['cells']:>6} {r['tokens']:>7} | {tk['p50']:>12.3f} | "
            f"{f['p50']:>11.3f} {f['p90']:>8.3f} {f['p99']:>8.3f} | {tt['p50']:>9.3f} "
            f"{tt['p99']:>8.3f}"
        )
    ratios = {}
    if {"patch", "poyo"} <= set(toks):
        print("ratio poyo / patch (total p50):")
        for n in cells:
            a = next(r for r in rows if r["cells"] == n and r["tokenizer"] == "patch")
            b = next(r for r in rows if r["cells"] == n and r["tokenizer"] == "poyo")
            ratios[n] = b["total_ms"]["p50"] / a["total_ms"]["p50"]
            print(f"  {n:>6} cells: {ratios[n]:.1f}x")
    result = {"config": vars(args), "torch": torch.__version__, "rows": rows, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
