"""Export: the decoder with its SAE spliced in, and exact ablation attribution, as ONE ONNX graph.

`ExplainedDecoder(decoder, sae, top_m)` wraps the pieces that already exist:

    latents = decoder.encode(batch)                          [B, L, D]   (processor output)
    ablation_attribution(sae, latents, readout, M)           (models.interpret.attribution)

What is exported runs the decoder's arithmetic with its constants folded
(`models.decoder.folded.FoldedDecoder`: per-unit tables, rotary embeddings folded into the
weights, the encoder's constant queries precomputed): the same function, about half the graph
nodes (~215 instead of ~435 for the default model) and half the ONNX Runtime time.
``folded=False`` runs the trained modules as they are; `parity` always compares ONNX Runtime
with that (`ExplainedDecoder.reference`), so every export checks the folding too.

The SAE acts on every latent token and is spliced in *with its error term*, so the readout sees
exactly the decoder's latents: the logits equal the plain decoder's (the explanation never
changes the prediction). A window's unit activation is the unit's activation summed over its L
latent tokens; the M most active units (by that sum) are attributed; ablating unit ``u`` removes
its contribution from every latent token of the window. ``attributions[b, m, c]`` is the change
of logit ``c`` when unit ``units[b, m]`` is zeroed (all classes, so a client can rank units for
the predicted class, or any other); ``unexplained[b, c]`` = SAE error term + SAE bias (all units
off, includes the readout's bias) + units outside the top M and the non-additivity of the
non-linear readout, so that ``attributions.sum(1) + unexplained == logits`` exactly (up to float
rounding). The M + 1 readout rows per window (the latents, and the latents with each of the M
units removed) go through the readout in one batched call inside the graph.

Graph inputs (the `collate` batch keys; B and N dynamic; N = tokens, i.e. cells for the ``patch``
tokenizer, frames x cells for ``poyo``)::

    values        float32 [B, N, V]   raw dF/F (patch: V = frames per patch; poyo: V = 1)
    unit_index    int64   [B, N]      the vocabulary's unit indices
    timestamps    float32 [B, N]      token times, seconds, window-relative
    mask          bool    [B, N]      False = padding
    session_index int64   [B]

Graph outputs (``T`` = each task name, sorted; C = the task's classes, M = ``top_m``)::

    units            int64   [B, M]     SAE unit ids, most active first
    activations      float32 [B, M]     their activations summed over the latent tokens
    <T>.logits       float32 [B, C]
    <T>.probs        float32 [B, C]     softmax of the logits
    <T>.attributions float32 [B, M, C]  logit change when the unit is ablated
    <T>.unexplained  float32 [B, C]     logit - sum of the M attributions

``ExplainedDecoder(..., attributions=False)`` is the attribution-off variant (for latency
comparisons, and clients that only need the prediction and which units were active): the same
inputs, and only ``units``, ``activations``, ``<T>.logits`` and ``<T>.probs`` (the SAE encoder
still runs, the M ablated readout rows do not; the logits are the readout of the decoder's
latents, which is what the SAE spliced with its error term gives). `export_onnx` exports
either; bundles (`export_bundle`) always hold the default attribution-on graph.

`export_bundle` writes the bundle (`models.bundle.write_bundle`): model.onnx,
decoder.safetensors, sae.safetensors, config.json, units.json, metrics.json, vocab.json.
This module never imports the service layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.decoder.checkpoint import LOG_FILE, Checkpoint
from models.decoder.checkpoint import WEIGHTS_FILE as DECODER_FILE
from models.decoder.folded import FoldedDecoder
from models.decoder.model import BATCH_KEYS, Decoder
from models.interpret.attribution import ablation_attribution, tile_rows, top_units
from models.runtime import FixedShapeRunner, ort_session
from models.sae.base import CFG_FILE as SAE_CFG_FILE
from models.sae.base import WEIGHTS_FILE as SAE_FILE
from models.sae.base import SparseAutoencoder

INPUT_NAMES: tuple[str, ...] = BATCH_KEYS
METHOD = "ablation"
PARITY_TOL = 1e-4


def output_names(task_names: Sequence[str], attributions: bool = True) -> list[str]:
    names = ["units", "activations"]
    for t in task_names:
        names += [f"{t}.logits", f"{t}.probs"]
        if attributions:
            names += [f"{t}.attributions", f"{t}.unexplained"]
    return names


class ExplainedDecoder(nn.Module):
    """Decoder + spliced SAE (with error) + exact ablation attribution of the top-M units.

    ``attributions=False``: no ablation (outputs: units, activations, logits, probs)."""

    def __init__(
        self,
        decoder: Decoder,
        sae: SparseAutoencoder,
        top_m: int = 16,
        *,
        attributions: bool = True,
        folded: bool = True,
    ):
        super().__init__()
        if sae.cfg.d_in != decoder.config.dim:
            raise ValueError(f"SAE d_in {sae.cfg.d_in} != decoder dim {decoder.config.dim}")
        self.decoder = decoder.eval()
        self.folded = bool(folded)
        # what runs: the decoder's inference arithmetic with its constants folded, or as trained
        self.core: FoldedDecoder | Decoder = FoldedDecoder(decoder) if folded else self.decoder
        self.sae = sae.eval()
        self.top_m = int(min(top_m, sae.cfg.n_units))
        if self.top_m < 1:
            raise ValueError("top_m must be >= 1")
        self.task_names: tuple[str, ...] = decoder.task_names
        self.attributions = bool(attributions)

    @property
    def output_names(self) -> list[str]:
        return output_names(self.task_names, self.attributions)

    def reference(self) -> ExplainedDecoder:
        """The same decoder and SAE with the trained modules as they are (``folded=False``): what
        the exported, folded graph must reproduce."""
        if not self.folded:
            return self
        return ExplainedDecoder(
            self.decoder, self.sae, self.top_m, attributions=self.attributions, folded=False
        )

    def forward(
        self,
        values: Tensor,
        unit_index: Tensor,
        timestamps: Tensor,
        mask: Tensor,
        session_index: Tensor,
    ) -> tuple[Tensor, ...]:
        batch = {
            "values": values,
            "unit_index": unit_index,
            "timestamps": timestamps,
            "mask": mask,
            "session_index": session_index,
        }
        x = self.core.encode(batch)
        m = self.top_m
        b = x.shape[0]
        if not self.attributions:
            _, idx, vals = top_units(self.sae, x, m)
            logits = self.core.readout(x, {"session_index": session_index})
            plain: list[Tensor] = [idx, vals]
            for t in self.task_names:
                plain += [logits[t], torch.softmax(logits[t], dim=-1)]
            return tuple(plain)

        def readout(z: Tensor) -> dict[str, Tensor]:
            if self.folded:  # tiles its per-window queries itself
                return self.core.readout(z, {"session_index": session_index})
            k = z.shape[0] // b
            return self.core.readout(z, {"session_index": tile_rows(session_index, k)})

        r = ablation_attribution(self.sae, x, readout, m, terms=False)  # outputs: no terms
        outs: list[Tensor] = [r.units, r.activations]
        for t in self.task_names:
            lg = r.logits[t]
            attr = r.attributions[t]
            outs += [lg, torch.softmax(lg, dim=-1), attr, lg - attr.sum(1)]
        return tuple(outs)

    def run_dict(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Eager run on a batch dict, outputs by name."""
        with torch.no_grad():
            out = self(*(batch[k] for k in INPUT_NAMES))
        return dict(zip(self.output_names, out, strict=True))


def _example(batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    return tuple(batch[k] for k in INPUT_NAMES)


def simulated_batch(
    decoder: Decoder,
    batch_size: int,
    n_cells: int,
    *,
    seed: int = 0,
    n_pad: int = 0,
    fs: float = 16.0,
) -> dict[str, Tensor]:
    """Random windows in the decoder's format: ``n_cells`` distinct known units per window
    (``poyo``: every frame of each cell, ``window_s * fs`` frames), dF/F ~ N(0, 1), the last
    ``n_pad`` tokens padding."""
    from models.decoder.tokenizers import collate, tokenizer_for

    c = decoder.config
    tok = tokenizer_for(c)
    rng = np.random.default_rng(seed)
    n_cells = min(n_cells, c.n_units)
    n_frames = max(int(c.window_s * fs), 2)
    ts = np.arange(n_frames) / fs
    samples = []
    for _ in range(batch_size):
        units = rng.choice(c.n_units, n_cells, replace=False).astype(np.int64)
        window = rng.normal(0, 1, (n_frames, n_cells)).astype(np.float32)
        samples.append(tok.tokenize(window, ts, float(ts[-1]), units))
    sess = rng.integers(0, c.n_sessions, batch_size)
    raw = collate(samples, sess)
    out = {k: torch.as_tensor(v) for k, v in raw.items()}
    if n_pad:
        n = out["mask"].shape[1]
        pad = {
            "values": torch.zeros(batch_size, n_pad, out["values"].shape[2]),
            "unit_index": torch.zeros(batch_size, n_pad, dtype=torch.int64),
            "timestamps": torch.zeros(batch_size, n_pad),
            "mask": torch.zeros(batch_size, n_pad, dtype=torch.bool),
        }
        for k, v in pad.items():
            out[k] = torch.cat([out[k], v], 1)
        assert out["mask"].shape[1] == n + n_pad
    return out


def export_onnx(
    model: ExplainedDecoder,
    path: str | Path,
    example: Mapping[str, Tensor] | None = None,
    *,
    opset: int | None = None,
    fixed: tuple[int, int] | None = None,
) -> Path:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch and token dimensions, or with
    ``fixed=(batch, tokens)`` a fixed-shape graph of that size (for CUDA graphs; run it through
    `models.runtime.FixedShapeRunner`, which pads smaller batches into it).

    The dynamic export's example must have batch >= 2 and tokens >= 2 (a size-1 example
    dimension would be specialised to 1); by default a simulated one is used. Weights are stored
    inside the file.
    """
    path = Path(path)
    ds: dict[str, dict[int, Any]] | None
    if fixed is not None:
        b, n = (int(x) for x in fixed)
        if b < 1 or n < 1:
            raise ValueError(f"a fixed shape needs batch >= 1 and tokens >= 1, got {b} x {n}")
        sim = simulated_batch(model.decoder, b, n, seed=0)  # >= n tokens, or all units
        example = pad_batch(_first_tokens(sim, n), b, n)
        ds = None
    else:
        if example is None:
            example = simulated_batch(model.decoder, 2, 8, seed=0)
        if example["mask"].shape[0] < 2 or example["mask"].shape[1] < 2:
            raise ValueError("the export example needs batch >= 2 and tokens >= 2")
        batch_dim, tok_dim = torch.export.Dim("batch"), torch.export.Dim("tokens")
        ds = {k: {0: batch_dim, 1: tok_dim} for k in INPUT_NAMES[:4]}
        ds["session_index"] = {0: batch_dim}
    kw: dict[str, Any] = {}
    if opset is not None:
        kw["opset_version"] = opset
    import logging
    import warnings

    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # the exporter's notes on optional torchvision ops are noise here
        lg.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(axis name|LeafSpec|TreeSpec).*")
        torch.onnx.export(
            model.eval(),
            _example(example),
            str(path),
            dynamo=True,
            dynamic_shapes=ds,
            input_names=list(INPUT_NAMES),
            output_names=model.output_names,
            external_data=False,
            verbose=False,
            **kw,
        )
    for lg, lvl in zip(quiet, levels, strict=True):
        lg.setLevel(lvl)
    return path


def run_ort(sess, batch: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Outputs by name of an ORT session, or of a `models.runtime.Runner` /
    `FixedShapeRunner` (anything with ``output_names`` and ``run(feeds)``)."""
    feeds = {k: batch[k].numpy() for k in INPUT_NAMES}
    if hasattr(sess, "output_names"):
        return dict(zip(sess.output_names, sess.run(feeds), strict=True))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def pad_batch(batch: Mapping[str, Tensor], size: int, tokens: int) -> dict[str, Tensor]:
    """``batch`` padded to ``size`` windows of ``tokens`` tokens the way
    `models.runtime.FixedShapeRunner` pads (zeros after the tokens, ``mask`` False; extra
    windows repeat the first)."""
    from models.runtime import pad_windows

    return {k: torch.from_numpy(pad_windows(v.numpy(), size, tokens)) for k, v in batch.items()}


def fixed_model_file(batch: int, tokens: int) -> str:
    """A bundle's fixed-shape graph of ``batch`` windows x ``tokens`` tokens."""
    return f"model.b{int(batch)}.t{int(tokens)}.onnx"


def parity(
    model: ExplainedDecoder, sess, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """Max abs differences ONNX Runtime vs PyTorch over ``batches``, and ONNX additivity.

    The reference is `ExplainedDecoder.reference` (the trained modules as they are), so the
    differences cover the folding (`models.decoder.folded`) and the export together; ``folded``
    is the max |logits| difference of the folded model run eagerly vs the reference.
    ``units`` are compared on the ids (``units_mismatch``: fraction of differing ids; near-ties
    in the summed activations may swap order, so attributions are compared only where the ids
    agree), ``additivity``: max |sum(attributions) + unexplained - logits| in the ONNX outputs.
    For an attribution-off model (``model.attributions`` False) the attribution keys stay 0.
    """
    res = {
        "logits": 0.0,
        "probs": 0.0,
        "activations": 0.0,
        "attributions": 0.0,
        "unexplained": 0.0,
        "additivity": 0.0,
        "units_mismatch": 0.0,
        "plain_decoder_logits": 0.0,
        "folded": 0.0,
    }
    n_ids = n_bad = 0
    reference = model.reference()
    for batch in batches:
        ref = {k: v.numpy() for k, v in reference.run_dict(batch).items()}
        folded = {k: v.numpy() for k, v in model.run_dict(batch).items()}
        got = run_ort(sess, batch)
        with torch.no_grad():
            plain = model.decoder.forward_batch(batch)
        same = got["units"] == ref["units"]  # [B, M]
        n_ids += same.size
        n_bad += int((~same).sum())
        res["activations"] = max(
            res["activations"], float(np.abs(got["activations"] - ref["activations"]).max())
        )
        for t in model.task_names:
            for kind in ("logits", "probs", "unexplained"):
                if f"{t}.{kind}" not in ref:
                    continue
                d = float(np.abs(got[f"{t}.{kind}"] - ref[f"{t}.{kind}"]).max())
                res[kind] = max(res[kind], d)
            dp = float(np.abs(ref[f"{t}.logits"] - plain[t].numpy()).max())
            res["plain_decoder_logits"] = max(res["plain_decoder_logits"], dp)
            df = float(np.abs(folded[f"{t}.logits"] - ref[f"{t}.logits"]).max())
            res["folded"] = max(res["folded"], df)
            if f"{t}.attributions" not in ref:
                continue
            da = np.abs(got[f"{t}.attributions"] - ref[f"{t}.attributions"])[same]
            res["attributions"] = max(res["attributions"], float(da.max()) if da.size else 0.0)
            total = got[f"{t}.attributions"].sum(1) + got[f"{t}.unexplained"]
            res["additivity"] = max(
                res["additivity"], float(np.abs(total - got[f"{t}.logits"]).max())
            )
    res["units_mismatch"] = n_bad / max(n_ids, 1)
    return res


def real_windows(
    ckpt: Checkpoint, recordings: Sequence, *, per_session: int = 3, seed: int = 0
) -> list[dict[str, Tensor]]:
    """One batch per recording: ``per_session`` windows ending inside its test (else any)
    trials, 1 s after onset. Different recordings have different cell counts."""
    from models.decoder.windows import build_batch, trial_lower_bounds

    rng = np.random.default_rng(seed)
    out = []
    for rec in recordings:
        if rec.session_id not in ckpt.vocab.session_ids:
            continue
        split = ckpt.splits.get(rec.session_id)
        trials = np.asarray(split.test if split is not None and len(split.test) else [])
        if trials.size == 0:
            trials = np.arange(len(rec.trials))
        pick = np.sort(rng.choice(trials, min(per_session, trials.size), replace=False))
        ends = rec.trials.start[pick] + 1.0
        lower = trial_lower_bounds(rec)[pick]
        out.append(build_batch(rec, ends, ckpt.tokenizer, ckpt.vocab, lower_times=lower))
    return out


def _final_log_line(ckpt_dir: Path) -> dict | None:
    p = ckpt_dir / LOG_FILE
    if not p.is_file():
        return None
    lines = [x for x in p.read_text().splitlines() if x.strip()]
    return json.loads(lines[-1]) if lines else None


def _resolve_sae_dir(sae_dir: Path) -> tuple[Path, Path | None, Path | None]:
    """An SAE directory (cfg.json + sae.safetensors), or an `interpret` output directory (its
    ``sae/``; ``units.json`` and ``summary.json`` beside it are picked up)."""
    sae_dir = Path(sae_dir)
    if (sae_dir / SAE_CFG_FILE).is_file():
        base = sae_dir.parent
        units = base / "units.json" if (base / "units.json").is_file() else None
        summ = base / "summary.json" if (base / "summary.json").is_file() else None
        return sae_dir, units, summ
    if (sae_dir / "sae" / SAE_CFG_FILE).is_file():
        units = sae_dir / "units.json"
        summ = sae_dir / "summary.json"
        return sae_dir / "sae", units if units.is_file() else None, summ if summ.is_file() else None
    from models.config import ConfigError

    raise ConfigError(
        f"{sae_dir}: neither an SAE directory ({SAE_CFG_FILE} + {SAE_FILE}) nor an interpret "
        "output directory (sae/); run `cortexlens interpret CHECKPOINT DATA --out DIR` first"
    )


def export_bundle(
    checkpoint_dir: str | Path,
    sae_dir: str | Path,
    units_json: str | Path | None,
    out: str | Path,
    *,
    top_m: int = 16,
    opset: int | None = None,
    recordings: Sequence | None = None,
    summary_json: str | Path | None = None,
    name: str | None = None,
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    fixed_shapes: Sequence[tuple[int, int]] = (),
):
    """Export ``checkpoint_dir`` + the SAE at ``sae_dir`` into a verified bundle at ``out``.

    ``sae_dir`` may be an `interpret` output directory (then its ``units.json`` and
    ``summary.json`` are used unless given). Parity (ORT vs PyTorch) is measured on simulated
    windows and, if ``recordings`` are given, on real windows of them; with ``check`` a logits
    or attributions difference above ``PARITY_TOL`` raises. ``fixed_shapes`` ((batch, tokens)
    pairs) adds a fixed-shape graph of each size (`fixed_model_file`, listed in config.json's
    ``export.fixed_shapes``), parity-checked the same way through the padding of
    `models.runtime.FixedShapeRunner`. Returns the opened `Bundle`.
    """
    import tempfile

    from models.bundle import content_sha256, file_provenance, sha256_file, write_bundle
    from models.config import ConfigError
    from models.sae.registry import load_sae

    ckpt_dir = Path(checkpoint_dir)
    ckpt = Checkpoint.load(ckpt_dir)
    sae_path, found_units, found_summary = _resolve_sae_dir(Path(sae_dir))
    units_json = Path(units_json) if units_json is not None else found_units
    summary_json = Path(summary_json) if summary_json is not None else found_summary
    sae = load_sae(sae_path)
    model = ExplainedDecoder(ckpt.model, sae, top_m).eval()

    with tempfile.TemporaryDirectory(prefix="cortexlens-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, onnx_path, opset=opset)
        export_s = time.perf_counter() - t0
        sess = ort_session(onnx_path)
        sim = [
            simulated_batch(ckpt.model, 1, 5, seed=1),
            simulated_batch(ckpt.model, 3, 11, seed=2, n_pad=3),
        ]
        par: dict[str, Any] = {"tolerance": PARITY_TOL, "simulated": parity(model, sess, sim)}
        real = real_windows(ckpt, recordings) if recordings else []
        if real:
            par["real"] = parity(model, sess, real)
        fixed_files: dict[str, Path] = {}
        fixed_doc = []
        for b, n in sorted({(int(b), int(n)) for b, n in fixed_shapes}):
            fname = fixed_model_file(b, n)
            path = export_onnx(model, Path(tmp) / fname, opset=opset, fixed=(b, n))
            runner = FixedShapeRunner(ort_session(path))
            # fewer windows and tokens than the graph holds, so that its padding is exercised
            small = simulated_batch(ckpt.model, max(b - 1, 1), 7, seed=3)
            fit = [_first_tokens(small, max(n - 1, 1))]
            fit += [_first_tokens(w, n) for w in real if _fits(w, b, n)]  # drops padding only
            par[f"fixed_{b}x{n}"] = parity(model, runner, fit)
            fixed_files[fname] = path
            fixed_doc.append({"batch": b, "tokens": n, "file": fname})
        if check:
            for where, p in par.items():
                if where == "tolerance" or not p:
                    continue
                if max(p["logits"], p["attributions"], p["additivity"]) > PARITY_TOL:
                    raise ConfigError(f"ONNX parity check failed on {where} windows: {p}")

        if units_json is not None:
            if not Path(units_json).is_file():
                raise ConfigError(f"{units_json}: units file not found")
            units_src: Path | bytes = Path(units_json)
        else:
            units_src = json.dumps(
                {"labels": "none", "n_units": sae.cfg.n_units, "units": []}, indent=2
            ).encode()
        summary = json.loads(Path(summary_json).read_text()) if summary_json else None
        metrics = {
            "export": {
                "export_s": round(export_s, 3),
                "opset": _onnx_opset(onnx_path),
                "torch": torch.__version__,
                "onnxruntime": __import__("onnxruntime").__version__,
            },
            "parity": par,
            "checkpoint": _final_log_line(ckpt_dir),
            "interpret": summary,
        }
        config = {
            "checkpoint": json.loads(ckpt.config.model_dump_json()),
            "sae": json.loads(sae.cfg.model_dump_json()),
            "export": {
                "method": METHOD,
                "top_m": model.top_m,
                "tasks": {t: ckpt.tasks[t] for t in model.task_names},
                "inputs": list(INPUT_NAMES),
                "outputs": model.output_names,
                "unit_activation": "sum over latent tokens",
                "unexplained": "SAE error + SAE bias + units outside the top M + non-additivity",
                "fixed_shapes": fixed_doc,
            },
        }
        ckpt_files = [ckpt_dir / f for f in ("config.json", DECODER_FILE, "vocab.json")]
        ckpt_sha = {p.name: sha256_file(p) for p in ckpt_files if p.is_file()}
        provenance = {
            "checkpoint": {
                "path": str(ckpt_dir.resolve()),
                "sha256": ckpt_sha,
                "content_sha256": content_sha256(ckpt_sha),
                "sources": list(ckpt.config.sources),
                "parent": ckpt.config.parent,
            },
            "sae": file_provenance([sae_path / SAE_CFG_FILE, sae_path / SAE_FILE]),
            "units": str(units_json) if units_json is not None else None,
            "parity_data": [
                {"session_id": r.session_id, "source": getattr(r, "source", None)}
                for r in recordings or []
            ],
        }
        files = {
            "model.onnx": onnx_path,
            "decoder.safetensors": ckpt_dir / DECODER_FILE,
            "sae.safetensors": sae_path / SAE_FILE,
            "config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
            "units.json": units_src,
            "metrics.json": json.dumps(metrics, indent=2, default=_jsonable).encode(),
            "vocab.json": ckpt_dir / "vocab.json",
            **fixed_files,
        }
        return write_bundle(
            files,
            out,
            name=name or Path(out).name,
            version=version,
            parent=parent,
            provenance=provenance,
            overwrite=overwrite,
        )


def _fits(batch: Mapping[str, Tensor], size: int, tokens: int) -> bool:
    return batch["mask"].shape[0] <= size and int(batch["mask"].sum(1).max()) <= tokens


def _first_tokens(batch: Mapping[str, Tensor], tokens: int) -> dict[str, Tensor]:
    """The first ``tokens`` token columns of every window of ``batch`` (all, when fewer)."""
    return {k: v[:, :tokens] if v.ndim >= 2 else v for k, v in batch.items()}


def _onnx_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
