"""Export time and latency of the explained decoder (decoder + SAE + ablation attribution).

One `patch` window of ``--cells`` cells (batch 1, the closed-loop case) with ``--top-m`` unit
attributions: ONNX Runtime CPU (1 intra-op thread, and ORT's default) vs PyTorch eager (1 thread,
and torch's default), p50/p99 in milliseconds; plus the plain decoder in PyTorch for reference.
The decoder uses the current `DecoderConfig` defaults (random weights: latency does not depend on
them); the SAE is a TopK SAE with 8 x dim units, k = 16.

    .venv/bin/python -m loadtest.bench_export
    .venv/bin/python -m loadtest.bench_export --cells 512 --top-m 16 --repeats 200 --json out.json

Absolute times mean little on a shared CPU box; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.decoder.config import DecoderConfig
from models.decoder.model import Decoder
from models.export import (
    ExplainedDecoder,
    export_onnx,
    ort_session,
    parity,
    run_ort,
    simulated_batch,
)
from models.sae import SAEConfig, build_sae


def percentiles(x: list[float]) -> dict[str, float]:
    a = np.asarray(x) * 1e3
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
    }


def timeit(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return percentiles(ts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--top-m", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    n_default = torch.get_num_threads()
    cfg = DecoderConfig(n_units=args.cells, n_sessions=1, dropout=0.0)
    dec = Decoder(cfg).eval()
    sae = build_sae(SAEConfig(d_in=cfg.dim, n_units=8 * cfg.dim, k=16)).eval()
    model = ExplainedDecoder(dec, sae, args.top_m).eval()
    batch = simulated_batch(dec, 1, args.cells, seed=0)
    feeds = {k: v for k, v in batch.items()}

    res: dict = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cells": args.cells,
        "tokens": int(batch["mask"].shape[1]),
        "top_m": model.top_m,
        "decoder": {k: getattr(cfg, k) for k in ("dim", "depth", "num_latents", "tokenizer")},
        "sae_units": sae.cfg.n_units,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path)
        res["export_s"] = round(time.perf_counter() - t0, 2)
        res["onnx_mb"] = round(path.stat().st_size / 2**20, 2)
        sessions = {"ort_1thread": ort_session(path, threads=1), "ort_default": ort_session(path)}
        res["parity"] = parity(model, sessions["ort_1thread"], [batch])
        lat = {}
        for name, sess in sessions.items():
            lat[name] = timeit(lambda s=sess: run_ort(s, feeds), args.repeats, args.warmup)
        for threads, label in ((1, "1thread"), (n_default, "default")):
            torch.set_num_threads(threads)
            lat[f"torch_explained_{label}"] = timeit(
                lambda: model.run_dict(batch), args.repeats, args.warmup
            )

            def plain():
                with torch.no_grad():
                    dec.forward_batch(batch)

            lat[f"torch_plain_decoder_{label}"] = timeit(plain, args.repeats, args.warmup)
        torch.set_num_threads(n_default)
    res["latency_ms"] = lat
    res["torch_default_threads"] = n_default
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
