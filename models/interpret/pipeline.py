"""End-to-end interpretation of a decoder checkpoint: SAE, metrics, labels, ablations, attributions.

:func:`run_interpret` (what ``cortexlens interpret CHECKPOINT DATA... --out DIR`` runs):

1. **Data.** The recordings whose sessions the checkpoint knows (others are skipped and listed),
   with the checkpoint's own trial splits (``splits.json``; else re-derived with its training
   seed). Every decoded window of every labelled trial (windows ending at each frame from onset
   + ``decode_from_s`` to the trial end: the windows ``predict_trials`` pools) is encoded once
   by the trained decoder and by a **randomly initialised decoder of the same architecture**
   (``config.decoder``, a different seed, the same per-unit input normalisation). Latents are
   the stream after the processor, ``[windows, L, D]``.
2. **SAEs.** ``n_seeds`` SAEs (default 2: seeds ``seed`` and ``seed + 1``) on the trained
   decoder's latents of the *training* trials, and one (seed ``seed``) on the random decoder's.
   Each is trained on reconstruction (``steps``) and then fine-tuned end to end
   (``e2e_steps``, :func:`models.sae.finetune_sae_e2e`) on KL(decoder outputs || outputs with
   the SAE spliced in) + FVU through its own frozen decoder's readout, so that the spliced
   decoder keeps the plain decoder's predictions, not only its latents' variance.
3. **Metrics** on the *test* trials' latents: L0, FVU, dead and dense fractions (also on the
   training latents), and trial-level accuracy per task of the plain decoder, the decoder with
   the SAE spliced in (reconstruction, no error term), and with the latent stream mean-ablated
   (per-position mean over the training latents); fraction of accuracy recovered. Pooling is
   ``predict_trials``'s (mean per-window log-probability over a trial's windows).
4. **Labels** (:func:`models.interpret.labels.run_labelling`) of each SAE unit for direction,
   temporal frequency (where present) and genetic background (per-session: session-level
   permutations), from per-trial activations (mean over a trial's windows and latent tokens) on
   the ``label_trials`` (default ``"fit"``: training + validation trials, so that test trials
   are untouched by any selection), with BH-FDR and the two controls (the random decoder's SAE
   units; shuffled labels). Seed 2's labels mark seed 1's labels ``reproduced_across_seeds``.
5. **Ablations** (:func:`models.interpret.ablation.ablation_experiment`) on the test trials:
   zero the units labelled for each variable and measure every task's accuracy, against
   ``ablation_draws`` random sets of as many units.
6. **Attribution agreement** on ``attribution_examples`` test windows: activation x gradient and
   integrated gradients against exact ablation for the ``attribution_m`` most active units
   (:func:`models.interpret.attribution.compare_methods`), and the additivity check (units +
   SAE error + biases = the logit).

The genetic task of a checkpoint trained on these sessions is a lookup of the session embedding
(see DESIGN.md): its accuracy here is a within-session upper bound and is flagged as such.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from models.config import Config, ConfigError
from models.data.recording import Recording
from models.decoder.checkpoint import Checkpoint
from models.decoder.model import Decoder
from models.decoder.predict import decode_from_s
from models.decoder.windows import SessionData
from models.interpret.ablation import (
    SparseActs,
    WindowSet,
    ablation_experiment,
    encode_windows,
    pooled_log_probs,
    trial_accuracy,
)
from models.interpret.attribution import attribute, compare_methods, tile_rows
from models.interpret.labels import (
    LabelConfig,
    LabellingResult,
    Variable,
    mark_reproduced,
    run_labelling,
    trial_activations,
    write_units_json,
)
from models.sae import SAEConfig, SAEMetrics, SAETrainConfig, sae_metrics, train_sae
from models.sae.base import SparseAutoencoder
from models.sae.metrics import latent_mean
from models.splits import TrialSplit, split_trials
from models.tasks import UNKNOWN_GENETIC

Log = Callable[[str], None]


class InterpretConfig(Config):
    """Settings of :func:`run_interpret` (defaults: a CPU-friendly run)."""

    seed: int = 0
    architecture: Literal["topk", "batchtopk", "relu"] = "topk"
    sae_units: int | None = Field(None, ge=1, description="dictionary size (default 8 x dim)")
    k: int = Field(
        32,
        ge=1,
        description="active units per latent token (topk, batchtopk); 32 = the L0 bound of "
        "the splicing criterion, where the spliced decoder agrees best with the plain one",
    )
    steps: int = Field(3000, ge=1, description="SAE optimiser steps")
    sae_batch_size: int = Field(1024, ge=1, description="latent tokens per SAE step")
    lr: float = Field(1e-3, gt=0)
    e2e_steps: int = Field(
        1000,
        ge=0,
        description="end-to-end fine-tune steps of each SAE through its frozen decoder "
        "(KL of the task outputs + FVU; models.sae.finetune_sae_e2e), 0: none; on the "
        "simulated corpus 300 -> 1000 steps took validation agreement of spliced and plain "
        "direction predictions from 0.974 to 1.0 (test KL 0.0106 -> 0.0086)",
    )
    e2e_lr: float = Field(1e-3, gt=0, description="peak learning rate of the e2e fine-tune")
    e2e_kl_coeff: float = Field(
        1.0, ge=0, description="KL weight relative to FVU at the start of the e2e fine-tune"
    )
    n_seeds: int = Field(2, ge=1, le=2, description="SAE seeds (2: labels marked reproduced)")
    alpha: float = Field(0.01, gt=0, lt=1, description="BH-FDR level of a label")
    n_perm: int = Field(1000, ge=10, description="permutations per variable")
    control_quantile: float = Field(0.99, gt=0, lt=1)
    label_trials: Literal["fit", "all", "test"] = Field(
        "fit", description="trials the labels are computed on (fit = train + val)"
    )
    ablation_draws: int = Field(100, ge=1, description="random unit sets per ablated variable")
    ablation_top: int = Field(
        32, ge=0, description="also ablate only the N most selective units per variable (0: no)"
    )
    attribution_m: int = Field(8, ge=1, description="most active units attributed")
    attribution_examples: int = Field(64, ge=1, description="test windows for the comparison")
    ig_steps: int = Field(32, ge=1)
    window_stride: int = Field(1, ge=1, description="keep every n-th decoded window of a trial")
    random_init_seed: int = Field(7919, description="added to seed for the random decoder")
    encode_batch_size: int = Field(256, ge=1)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class TrialTable:
    """Every trial the pipeline uses, one row each (all sessions)."""

    session_id: np.ndarray  # [T] str
    trial: np.ndarray  # [T] trial index within its recording
    split: np.ndarray  # [T] "train" | "val" | "test"
    direction: np.ndarray  # [T] degrees (NaN = none)
    temporal_frequency: np.ndarray  # [T] Hz (NaN = none)
    genetic: np.ndarray  # [T] str (the recording's genetic background)
    targets: dict[str, np.ndarray]  # task -> class index per trial (-1 = none)

    def __len__(self) -> int:
        return int(self.trial.size)

    def subset(self, mask: np.ndarray) -> TrialTable:
        return TrialTable(
            self.session_id[mask],
            self.trial[mask],
            self.split[mask],
            self.direction[mask],
            self.temporal_frequency[mask],
            self.genetic[mask],
            {k: v[mask] for k, v in self.targets.items()},
        )

    def to_dict(self) -> dict:
        return {
            "session_id": self.session_id.tolist(),
            "trial": self.trial.tolist(),
            "split": self.split.tolist(),
        }


def checkpoint_splits(ckpt: Checkpoint, rec: Recording) -> TrialSplit:
    """The checkpoint's split of ``rec`` (re-derived with its training seed if not stored)."""
    sp = ckpt.splits.get(rec.session_id)
    if sp is not None:
        return sp
    tc = ckpt.config.training
    return split_trials(
        rec,
        seed=tc.seed if tc else 0,
        val_fraction=tc.val_fraction if tc else 0.1,
        test_fraction=tc.test_fraction if tc else 0.2,
    )


def build_trials(
    ckpt: Checkpoint, recordings: Sequence[Recording]
) -> tuple[list[SessionData], list[np.ndarray], TrialTable, list[str]]:
    """Sessions known to the checkpoint, their trials (train + val + test, sorted) and the table."""
    sessions, trials, skipped = [], [], []
    rows: dict[str, list] = {k: [] for k in ("sid", "tr", "split", "dir", "tf", "gen")}
    targets: dict[str, list] = {t: [] for t in ckpt.tasks}
    for rec in recordings:
        if not ckpt.vocab.has_session(rec.session_id):
            skipped.append(rec.session_id)
            continue
        sd = SessionData.build(rec, ckpt.vocab)
        sp = checkpoint_splits(ckpt, rec)
        tr = np.concatenate([sp.train, sp.val, sp.test]).astype(np.int64)
        split = np.array(
            ["train"] * len(sp.train) + ["val"] * len(sp.val) + ["test"] * len(sp.test)
        )
        order = np.argsort(tr, kind="stable")
        tr, split = tr[order], split[order]
        sessions.append(sd)
        trials.append(tr)
        rows["sid"].append(np.full(tr.size, rec.session_id, dtype=object))
        rows["tr"].append(tr)
        rows["split"].append(split)
        rows["dir"].append(np.asarray(rec.trials.direction, dtype=np.float64)[tr])
        rows["tf"].append(np.asarray(rec.trials.temporal_frequency, dtype=np.float64)[tr])
        rows["gen"].append(np.full(tr.size, rec.genetic_background, dtype=object))
        for t in targets:
            lab = sd.labels.get(t)
            targets[t].append(lab[tr] if lab is not None else np.full(tr.size, -1, np.int64))
    if not sessions:
        raise ConfigError(
            "none of the recordings' sessions is in the checkpoint's vocabulary "
            f"(recordings: {', '.join(r.session_id for r in recordings)}); "
            "adapt the checkpoint to them first (cortexlens adapt)"
        )
    cat = np.concatenate
    table = TrialTable(
        cat(rows["sid"]),
        cat(rows["tr"]),
        cat(rows["split"]),
        cat(rows["dir"]),
        cat(rows["tf"]),
        cat(rows["gen"]),
        {t: cat(v).astype(np.int64) for t, v in targets.items()},
    )
    return sessions, trials, table, skipped


def random_init_decoder(ckpt: Checkpoint, seed: int) -> Decoder:
    """A decoder of the checkpoint's architecture with fresh random weights (``seed``) and the
    checkpoint's per-unit input normalisation (not learned: computed from the data)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Decoder(ckpt.config.decoder)
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        model.unit_loc.copy_(ckpt.model.unit_loc)
        model.unit_scale.copy_(ckpt.model.unit_scale)
    return model.eval()


def label_variables(table: TrialTable, tasks: Sequence[str]) -> list[Variable]:
    """Direction, temporal frequency (if any trial has one) and genetic background (if at least
    two known classes; per-session: permutations move whole sessions)."""
    out = [Variable("direction", "direction", table.direction)]
    if np.isfinite(table.temporal_frequency).any():
        out.append(Variable("temporal_frequency", "categorical", table.temporal_frequency))
    gen = np.array([g if g != UNKNOWN_GENETIC else None for g in table.genetic], dtype=object)
    if len({g for g in gen if g is not None}) >= 2:
        out.append(Variable("genetic", "categorical", gen, groups=table.session_id.astype(str)))
    return out


# ---------------------------------------------------------------------------------------------
# result


@dataclass
class SAERun:
    sae: SparseAutoencoder
    history: dict
    metrics_test: SAEMetrics
    metrics_train: SAEMetrics
    seed: int


@dataclass
class InterpretResult:
    config: InterpretConfig
    checkpoint: str | None
    tasks: dict[str, int]
    genetic_classes: list[str]
    table: TrialTable  # every trial used
    label_mask: np.ndarray  # [T] trials the labels were computed on
    saes: list[SAERun]  # trained decoder, one per seed
    control_sae: SAERun  # random-init decoder's SAE
    accuracy: dict  # task -> {plain/spliced/mean_ablation: {...}, recovered}
    accuracy_by_session: dict
    labelling: LabellingResult  # seed 1 (reproduced marked with seed 2)
    labelling_seed2: LabellingResult | None
    trial_acts: np.ndarray  # [T_label, U] seed-1 unit activations per labelling trial
    control_trial_acts: np.ndarray  # [T_label, U'] random-init SAE
    time_course: dict  # {"t": [bins], "acts": [bins, U]} mean activation by time in trial
    ablation: dict
    ablation_top: dict  # the same with the ablation_top most selective units per variable
    heldout: dict  # labels re-tested on the test trials (label_trials="fit" only)
    attribution: dict
    attribution_example: dict
    skipped_sessions: list[str]
    n_windows: dict[str, int]
    runtime_s: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def label_table(self) -> TrialTable:
        return self.table.subset(self.label_mask)


# ---------------------------------------------------------------------------------------------
# steps


def _train_one(
    latents: torch.Tensor,
    test_latents: torch.Tensor,
    cfg: InterpretConfig,
    d_in: int,
    seed: int,
    model: Decoder | None = None,
    session_index: torch.Tensor | None = None,
) -> SAERun:
    """One SAE on ``latents`` [N, L, D]; with ``cfg.e2e_steps`` fine-tuned end to end through
    ``model``'s readout (frozen; ``session_index`` [N] binds each window's session)."""
    n_units = cfg.sae_units or 8 * d_in
    scfg = SAEConfig(
        architecture=cfg.architecture,
        d_in=d_in,
        n_units=n_units,
        k=min(cfg.k, n_units),
        seed=seed,
    )
    x = latents.reshape(-1, d_in)
    tcfg = SAETrainConfig(
        steps=cfg.steps,
        batch_size=min(cfg.sae_batch_size, x.shape[0]),
        lr=cfg.lr,
        seed=seed,
        warmup_steps=min(100, max(cfg.steps // 10, 0)),
        e2e_steps=cfg.e2e_steps if model is not None else 0,
        e2e_lr=cfg.e2e_lr,
        e2e_kl_coeff=cfg.e2e_kl_coeff,
    )
    readout, frozen = None, []
    if tcfg.e2e_steps > 0:
        assert model is not None and session_index is not None
        model.eval()
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

        def readout(z: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
            return model.readout(z, {"session_index": session_index[idx]})

    try:
        sae, hist = train_sae(
            latents, scfg, tcfg, log_every=max(cfg.steps // 100, 1), readout=readout
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    mt = sae_metrics(sae, test_latents.reshape(-1, d_in))
    mtr = sae_metrics(sae, x)
    return SAERun(sae, hist.to_dict(), mt, mtr, seed)


def spliced_accuracy(
    model, ws: WindowSet, sae: SparseAutoencoder, mean: torch.Tensor, targets: dict
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Trial-level accuracy per task under plain / spliced / mean-ablation latents."""
    sae.eval()
    conds = {
        "plain": None,
        "spliced": lambda z, sl: sae.splice(z, with_error=False),
        "mean_ablation": lambda z, sl: mean.to(z).expand_as(z).clone(),
    }
    lps, res = {}, {}
    for name, tf in conds.items():
        with torch.no_grad():
            lps[name] = pooled_log_probs(model, ws, transform=tf)
        for task, r in trial_accuracy(lps[name], targets).items():
            res.setdefault(task, {})[name] = r
    for task, r in res.items():
        ok = targets[task] >= 0
        pred = {c: lps[c][task][ok].argmax(1) for c in ("plain", "spliced")}
        # fraction of test trials whose spliced prediction is the plain decoder's: the accuracy
        # gap is bounded by 1 - agreement, and agreement does not depend on the labels' noise
        r["spliced_agreement"] = float((pred["plain"] == pred["spliced"]).mean())
        p, s, a = (r.get(c, {}).get("accuracy") for c in ("plain", "spliced", "mean_ablation"))
        r["accuracy_recovered"] = (s - a) / (p - a) if None not in (p, s, a) and p != a else None
        pn, sn, an = (r.get(c, {}).get("nll") for c in ("plain", "spliced", "mean_ablation"))
        r["nll_recovered"] = (
            (sn - an) / (pn - an) if None not in (pn, sn, an) and pn != an else None
        )
    return res, lps


def _time_course(acts_w: np.ndarray, t_rel: np.ndarray, bin_s: float) -> dict:
    """Mean unit activation [bins, U] by window end time relative to onset."""
    b = np.floor(t_rel / bin_s + 1e-9).astype(np.int64)
    b -= b.min() if b.size else 0
    nb = int(b.max()) + 1 if b.size else 0
    sums = np.zeros((nb, acts_w.shape[1]))
    np.add.at(sums, b, acts_w)
    cnt = np.bincount(b, minlength=nb)[:, None]
    t0 = np.floor(t_rel.min() / bin_s + 1e-9) * bin_s if b.size else 0.0
    return {
        "t": (t0 + (np.arange(nb) + 0.5) * bin_s).tolist(),
        "acts": (sums / np.maximum(cnt, 1)).astype(np.float32),
    }


def _attribution_agreement(
    model, ws: WindowSet, sae: SparseAutoencoder, cfg: InterpretConfig
) -> tuple[dict, dict]:
    n = len(ws)
    if n == 0:
        return {}, {}
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(n, size=min(cfg.attribution_examples, n), replace=False))
    ti = torch.as_tensor(idx)
    x = ws.latents[0][ti].float()
    sess = ws.session_index[ti]
    b = x.shape[0]
    m = min(cfg.attribution_m, sae.cfg.n_units)

    def readout(z):
        return model.readout(z, {"session_index": tile_rows(sess, z.shape[0] // b)})

    model.eval()
    sae.eval()
    t0 = time.perf_counter()
    comp = compare_methods(sae, x, readout, m, n_steps=cfg.ig_steps)
    ex = attribute(sae, x, readout, m, "ablation")
    cheap = {
        "grad": attribute(sae, x, readout, m, "grad"),
        "ig": attribute(sae, x, readout, m, "ig", n_steps=cfg.ig_steps),
    }
    scatter = {}
    for task, e in ex.attributions.items():
        cls = ex.logits[task].argmax(-1)[:, None, None].expand(-1, e.shape[1], 1)
        scatter[task] = {"ablation": e.gather(2, cls)[..., 0].flatten().tolist()}
        for name, a in cheap.items():
            scatter[task][name] = (
                a.attributions[task].detach().gather(2, cls)[..., 0].flatten().tolist()
            )
    with torch.no_grad():
        plain = model.readout(x, {"session_index": sess})
    add = {}
    for task, lg in ex.logits.items():
        add[task] = {
            "max_abs_error_vs_spliced_logits": float((ex.total(task) - lg).abs().max()),
            "max_abs_error_vs_plain_decoder": float((ex.total(task) - plain[task]).abs().max()),
            "logit_scale": float(lg.abs().max()),
            "unit_share": float(
                ex.attributions[task].sum(1).abs().mean() / lg.abs().mean().clamp_min(1e-12)
            ),
        }
    out = {
        "methods": comp,
        "additivity": add,
        "scatter": scatter,
        "n_examples": int(b),
        "m": int(m),
        "ig_steps": cfg.ig_steps,
        "target": "predicted class",
        "time_s": round(time.perf_counter() - t0, 3),
    }
    first = {
        "units": ex.units[0].tolist(),
        "activations": ex.activations[0].tolist(),
        "logits": {t: v[0].tolist() for t, v in ex.logits.items()},
        "attributions": {t: v[0].tolist() for t, v in ex.attributions.items()},
        "terms": {t: {k: v[0].tolist() for k, v in d.items()} for t, d in ex.terms.items()},
    }
    return out, first


def confirm_on_heldout(
    res: LabellingResult,
    test_acts: np.ndarray,
    test_table: TrialTable,
    lcfg: LabelConfig,
    alpha: float = 0.05,
) -> dict:
    """Do units labelled on the fit trials keep their selectivity on the held-out test trials?

    Per variable: the labelled units' primary statistic on the test trials, its permutation
    p-value (same scheme as labelling) and BH q over the labelled units of that variable;
    ``n_confirmed`` counts q < ``alpha`` (and, for direction, the same preferred direction
    within ``match_direction_tol_deg``). Shows how much of the labelling reflects the decoder's
    fit to its training trials rather than a property that generalises.
    """
    from models.interpret.labels import analyse_selectivity
    from models.interpret.stats import bh_fdr

    out = {}
    for var in label_variables(test_table, []):
        if var.name not in res.labelled:
            continue
        units = np.flatnonzero(res.labelled[var.name])
        entry = {"n_labelled": int(units.size), "n_confirmed": 0, "alpha": alpha, "units": {}}
        if units.size:
            tab = analyse_selectivity(test_acts[:, units], [var], lcfg, seed_offset=3)
            vr = tab.variables[var.name]
            q = bh_fdr(vr.p[vr.primary])
            ok = q < alpha
            if var.kind == "direction":
                fit_pref = res.real.variables[var.name].stats["pref_dir"][units]
                diff = np.abs((vr.stats["pref_dir"] - fit_pref + 180.0) % 360.0 - 180.0)
                ok &= diff <= lcfg.match_direction_tol_deg
            entry["n_confirmed"] = int(ok.sum())
            entry["fraction_confirmed"] = float(ok.mean())
            entry["median_statistic_test"] = float(np.nanmedian(vr.primary_stat))
            entry["median_statistic_fit"] = float(
                np.nanmedian(res.real.variables[var.name].primary_stat[units])
            )
            entry["units"] = {
                int(u): {"statistic": float(vr.primary_stat[i]), "q": float(q[i]),
                         "confirmed": bool(ok[i])}
                for i, u in enumerate(units)
            }  # fmt: skip
        out[var.name] = entry
    return out


def _label_acts(sae: SparseAutoencoder, ws: WindowSet) -> tuple[SparseActs, np.ndarray, np.ndarray]:
    sa = SparseActs.compute(sae, ws.latents[0])
    wm = sa.window_mean()
    return sa, wm, trial_activations(wm, ws.owner, ws.n_trials)


# ---------------------------------------------------------------------------------------------
# main entry


def run_interpret(
    checkpoint: str | Path | Checkpoint,
    recordings: Sequence[Recording],
    cfg: InterpretConfig | None = None,
    *,
    log: Log | None = None,
) -> InterpretResult:
    """Run the whole pipeline (module docstring); see :func:`write_outputs` for the files."""
    cfg = cfg or InterpretConfig()
    say = log or (lambda s: None)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    model = ckpt.model.eval()
    tasks = dict(ckpt.tasks)

    # 1. data and latents ------------------------------------------------------------------------
    t0 = time.perf_counter()
    sessions, trials, table, skipped = build_trials(ckpt, recordings)
    if skipped:
        say(f"skipped {len(skipped)} session(s) not in the checkpoint: {', '.join(skipped)}")
    rand = random_init_decoder(ckpt, cfg.seed + cfg.random_init_seed)
    ws_all = encode_windows(
        [model, rand],
        ckpt.tokenizer,
        sessions,
        trials,
        from_s=decode_from_s(ckpt),
        batch_size=cfg.encode_batch_size,
        stride=cfg.window_stride,
    )
    split = table.split
    ws = {
        "train": ws_all.select(split == "train"),
        "test": ws_all.select(split == "test"),
    }
    label_mask = {
        "fit": split != "test",
        "all": np.ones(len(table), dtype=bool),
        "test": split == "test",
    }[cfg.label_trials]
    ws_label = ws_all.select(label_mask)
    n_windows = {k: len(v) for k, v in ws.items()} | {"label": len(ws_label), "all": len(ws_all)}
    times["encode_s"] = time.perf_counter() - t0
    say(
        f"{len(sessions)} session(s), {len(table)} trials, {len(ws_all)} windows "
        f"(train {n_windows['train']}, test {n_windows['test']}) encoded in "
        f"{times['encode_s']:.1f}s"
    )
    if n_windows["train"] == 0 or n_windows["test"] == 0:
        raise ConfigError("need training and test trials with decoded windows")
    d_in = ws_all.latents[0].shape[-1]

    # 2. SAEs ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    saes = []
    for i in range(cfg.n_seeds):
        saes.append(
            _train_one(
                ws["train"].latents[0], ws["test"].latents[0], cfg, d_in, cfg.seed + i,
                model, ws["train"].session_index,
            )
        )  # fmt: skip
        m = saes[-1].metrics_test
        say(f"SAE seed {cfg.seed + i}: L0 {m.l0:.1f}, FVU {m.fvu:.3f}, dead {m.dead_fraction:.3f}")
    # the control goes through the same recipe, e2e fine-tune included, on its own decoder
    control = _train_one(
        ws["train"].latents[1], ws["test"].latents[1], cfg, d_in, cfg.seed,
        rand, ws["train"].session_index,
    )  # fmt: skip
    times["sae_s"] = time.perf_counter() - t0

    # 3. spliced accuracy -------------------------------------------------------------------------
    t0 = time.perf_counter()
    test_table = table.subset(split == "test")
    mean = latent_mean(ws["train"].latents[0])
    acc, lps = spliced_accuracy(model, ws["test"], saes[0].sae, mean, test_table.targets)
    by_session = {}
    for sid in np.unique(test_table.session_id):
        msk = test_table.session_id == sid
        by_session[str(sid)] = {
            cond: {
                t: r["accuracy"]
                for t, r in trial_accuracy(
                    {t: v[msk] for t, v in lp.items()},
                    {t: v[msk] for t, v in test_table.targets.items()},
                ).items()
            }
            for cond, lp in lps.items()
        }
    times["accuracy_s"] = time.perf_counter() - t0
    say(
        "accuracy (plain / spliced / mean-ablation): "
        + "; ".join(
            f"{t} {r['plain']['accuracy']:.3f} / {r['spliced']['accuracy']:.3f} / "
            f"{r['mean_ablation']['accuracy']:.3f}"
            for t, r in acc.items()
        )
    )

    # 4. labels ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    lcfg = LabelConfig(
        alpha=cfg.alpha, n_perm=cfg.n_perm, control_quantile=cfg.control_quantile, seed=cfg.seed
    )
    lab_table = table.subset(label_mask)
    variables = label_variables(lab_table, list(tasks))
    ws_label_ctrl = WindowSet([ws_label.latents[1]], ws_label.session_index, ws_label.owner,
                              ws_label.t_rel, ws_label.n_trials)  # fmt: skip
    _, wm_a, acts_a = _label_acts(saes[0].sae, ws_label)
    _, _, acts_c = _label_acts(control.sae, ws_label_ctrl)
    res = run_labelling(acts_a, acts_c, variables, lcfg)
    res_b = None
    if len(saes) > 1:
        _, _, acts_b = _label_acts(saes[1].sae, ws_label)
        res_b = run_labelling(acts_b, acts_c, variables, lcfg)
        mark_reproduced(
            res, res_b, saes[0].sae.W_dec.detach().numpy(), saes[1].sae.W_dec.detach().numpy()
        )
    bin_s = 1.0 / max(float(sessions[0].rec.sampling_rate), 1e-6)
    tc = _time_course(wm_a, ws_label.t_rel, max(bin_s, 1 / 16))
    times["labels_s"] = time.perf_counter() - t0
    say("labels: " + ", ".join(f"{k} {int(v.sum())}" for k, v in res.labelled.items()))

    # 5. ablations -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    sa_test = SparseActs.compute(saes[0].sae, ws["test"].latents[0])
    unit_sets = {v: np.flatnonzero(m) for v, m in res.labelled.items()}
    abl = ablation_experiment(
        model,
        ws["test"],
        sa_test,
        unit_sets,
        test_table.targets,
        n_draws=cfg.ablation_draws,
        seed=cfg.seed,
    )
    abl_top = {}
    if cfg.ablation_top > 0:  # the most selective units only: a sharper, size-matched test
        top_sets = {}
        for v, units in unit_sets.items():
            stat = res.real.variables[v].primary_stat[units]
            top_sets[v] = units[np.argsort(-stat)][: cfg.ablation_top]
        if any(len(u) < len(unit_sets[v]) for v, u in top_sets.items()):
            abl_top = ablation_experiment(
                model, ws["test"], sa_test, top_sets, test_table.targets,
                n_draws=cfg.ablation_draws, seed=cfg.seed + 1,
            )  # fmt: skip
    confirm = {}
    if cfg.label_trials == "fit":
        test_acts = trial_activations(sa_test.window_mean(), ws["test"].owner, ws["test"].n_trials)
        confirm = confirm_on_heldout(res, test_acts, test_table, lcfg)
    times["ablation_s"] = time.perf_counter() - t0

    # 6. attribution -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    attr, attr_ex = _attribution_agreement(model, ws["test"], saes[0].sae, cfg)
    times["attribution_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all

    out = InterpretResult(
        config=cfg,
        checkpoint=str(ckpt.path) if ckpt.path is not None else None,
        tasks=tasks,
        genetic_classes=list(ckpt.vocab.genetic_classes),
        table=table,
        label_mask=label_mask,
        saes=saes,
        control_sae=control,
        accuracy=acc,
        accuracy_by_session=by_session,
        labelling=res,
        labelling_seed2=res_b,
        trial_acts=acts_a,
        control_trial_acts=acts_c,
        time_course=tc,
        ablation=abl,
        ablation_top=abl_top,
        heldout=confirm,
        attribution=attr,
        attribution_example=attr_ex,
        skipped_sessions=skipped,
        n_windows=n_windows,
        runtime_s={k: round(v, 2) for k, v in times.items()},
    )
    out.summary = build_summary(out, ckpt)
    return out


# ---------------------------------------------------------------------------------------------
# summary


def _f(x):
    if isinstance(x, str | bool | int | np.integer):
        return x.item() if isinstance(x, np.integer) else x
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else float(x)


def genetic_is_lookup(ckpt: Checkpoint, session_ids) -> bool:
    """True when every session's embedding was fitted with its genetic label (a lookup)."""
    sg = ckpt.vocab.session_genetic
    return all(bool(sg.get(str(s), "")) for s in session_ids)


def support_notes(res: InterpretResult) -> list[str]:
    """Plain statements of what the numbers do and do not support at this data size."""
    notes = []
    s = res.summary
    lab = res.labelling.summary()
    for var, d in lab.items():
        if d["permutation_level"] == "session" and d["min_attainable_p"] >= res.config.alpha:
            n_sess = len(set(res.label_table.session_id.tolist()))
            notes.append(
                f"'{var}' is a per-session label over {n_sess} sessions: the smallest attainable "
                f"session-level permutation p-value is {d['min_attainable_p']:.3g} >= alpha "
                f"{res.config.alpha:g}, so no unit can be labelled for it at this data size, "
                "whatever its statistic (group and animal are confounded)."
            )
    for var, d in lab.items():
        n_lab = d["n_labelled"]
        rnd = d["random_init_n_significant"]
        if n_lab and rnd >= d["n_significant"]:
            notes.append(
                f"'{var}': the random-init decoder's SAE has as many significant units "
                f"({rnd}) as the trained one ({d['n_significant']}): selectivity for "
                f"'{var}' is largely inherited from the input, not learned."
            )
        rnd_w = d["random_init_n_significant_within_variable"]
        real_w = d["n_significant_within_variable"]
        if rnd_w and rnd_w >= real_w and rnd < d["n_significant"]:
            notes.append(
                f"'{var}': with the FDR controlled over the units x variables family the "
                f"trained decoder has {d['n_significant']} significant units and the random-init "
                f"control {rnd}, but over '{var}' alone the control has {rnd_w} and the trained "
                f"decoder {real_w}: the pooled count rests on the trained decoder's other "
                f"variables, not on '{var}'. Do not read it as '{var}' selectivity learned."
            )
        thr = d.get("threshold_random_init")
        if thr is not None and np.isfinite(thr) and thr >= 1.0 - 1e-9:
            notes.append(
                f"'{var}': the random-init decoder's SAE units reach the ceiling of the primary "
                f"statistic ({thr:.3f} at the control quantile): '{var}' is readable from an "
                "untrained decoder's latent stream (the input carries it), so no unit of the "
                f"trained decoder can beat that control ({d['n_significant']} pass the FDR test "
                "of the pooled units x variables family)."
            )
    n_test = int((res.table.split == "test").sum())
    for var, d in res.heldout.items():
        if d["n_labelled"]:
            extra = ", same preferred direction" if var == "direction" else ""
            notes.append(
                f"'{var}': {d['n_confirmed']} of the {d['n_labelled']} units labelled on the "
                f"training/validation trials keep significant selectivity (BH q<{d['alpha']:g} "
                f"over those units{extra}) on the {n_test} held-out test trials."
            )
    acc = s.get("accuracy", {})
    for task, r in acc.items():
        gap = r.get("decoder", 0) - r.get("spliced", 0)
        if abs(gap) > 0.01:
            notes.append(
                f"{task}: spliced accuracy differs from the plain decoder by {gap * 100:+.1f} "
                f"points (on {r.get('n_trials')} test trials; one trial = "
                f"{100 / max(r.get('n_trials', 1), 1):.1f} points)."
            )
        if r.get("within_session_upper_bound"):
            notes.append(
                f"{task}: the checkpoint was trained on these sessions with their genetic labels, "
                "so this accuracy is a within-session upper bound: it may rest on what identifies "
                "these sessions rather than on a rule that carries to a new animal "
                "(mean-ablating the latents gives "
                f"{r.get('mean_ablation', float('nan')):.3f})."
            )
    for key, what in (("ablation", "all"), ("ablation_top", "the most selective")):
        for var, cells in s.get(key, {}).items():
            parts = []
            for task, c in cells.items():
                if c.get("random_drop") is None:
                    continue
                parts.append(
                    f"{task} {c['drop']:+.3f} (random {c['random_drop']:+.3f}, p={c['p']:.2f})"
                )
            if parts:
                n = next(iter(cells.values()))["n_units"]
                notes.append(
                    f"Zeroing {what} {n} '{var}' units changes test accuracy by: "
                    + "; ".join(parts)
                    + " (drop = accuracy lost; random = mean over as many random units)."
                )
    notes.append(
        f"Test set: {n_test} trials; a 95% interval on an accuracy near 0.5 is about "
        f"+/-{100 * 1.96 * np.sqrt(0.25 / max(n_test, 1)):.0f} points."
    )
    return notes


def build_summary(res: InterpretResult, ckpt: Checkpoint | None = None) -> dict:
    """``summary.json``: the shape other tools read (see the CLI) plus details."""
    m = res.saes[0].metrics_test
    sae_cfg = res.saes[0].sae.cfg
    lab = res.labelling.summary()
    lookup = genetic_is_lookup(ckpt, np.unique(res.table.session_id)) if ckpt is not None else True
    accuracy = {}
    for task, r in res.accuracy.items():
        accuracy[task] = {
            "decoder": r["plain"]["accuracy"],
            "spliced": r["spliced"]["accuracy"],
            "mean_ablation": r["mean_ablation"]["accuracy"],
            "recovered": _f(r["accuracy_recovered"]),
            "spliced_agreement": _f(r.get("spliced_agreement")),
            "nll": {c: r[c]["nll"] for c in ("plain", "spliced", "mean_ablation")},
            "nll_recovered": _f(r["nll_recovered"]),
            "n_trials": r["plain"]["n"],
        }
        if task == "genetic":
            accuracy[task]["within_session_upper_bound"] = bool(lookup)
    ablation = {}
    for var, cells in res.ablation.get("matrix", {}).items():
        ablation[var] = {
            t: {k: (_f(v) if not isinstance(v, list) else [_f(x) for x in v]) for k, v in c.items()}
            for t, c in cells.items()
        }
    ablation_top = {
        var: {t: {k: _f(v) if not isinstance(v, list) else [_f(x) for x in v]
                  for k, v in c.items()} for t, c in cells.items()}
        for var, cells in res.ablation_top.get("matrix", {}).items()
    }  # fmt: skip
    seeds = []
    for run in res.saes + [res.control_sae]:
        seeds.append(
            {
                "seed": run.seed,
                "decoder": "random_init" if run is res.control_sae else "trained",
                "test": {k: v for k, v in run.metrics_test.to_dict().items()},
                "train": {k: v for k, v in run.metrics_train.to_dict().items()},
            }
        )
    criteria = {
        "l0_le_32": m.l0 <= 32,
        "fvu_le_0.15": m.fvu <= 0.15,
        "dead_lt_0.10": m.dead_fraction < 0.10,
    }
    for task, r in accuracy.items():
        criteria[f"{task}_spliced_within_1pt"] = abs(r["spliced"] - r["decoder"]) <= 0.01 + 1e-12
    summary = {
        "criteria": criteria,
        "sae": {
            "l0": m.l0,
            "fvu": m.fvu,
            "dead_fraction": m.dead_fraction,
            "dense_fraction": m.dense_fraction,
            "architecture": sae_cfg.architecture,
            "n_units": sae_cfg.n_units,
            "k": sae_cfg.k,
            "d_in": sae_cfg.d_in,
            "steps": sae_cfg.train.steps if sae_cfg.train else None,
            "measured_on": "test-trial latents",
            "runs": seeds,
        },
        "accuracy": accuracy,
        "accuracy_by_session": res.accuracy_by_session,
        "labels": {v: d["n_labelled"] for v, d in lab.items()},
        "labels_significant": {v: d["n_significant"] for v, d in lab.items()},
        "labels_reproduced": {v: d.get("n_reproduced") for v, d in lab.items()},
        "controls": {
            "random_init": {v: d["random_init_n_significant"] for v, d in lab.items()},
            "shuffled": {v: d["shuffled_n_significant"] for v, d in lab.items()},
            "thresholds": {
                v: {"random_init": d["threshold_random_init"], "shuffled": d["threshold_shuffled"]}
                for v, d in lab.items()
            },
            "meaning": (
                "units significant at BH q < alpha under the same pipeline: on a randomly "
                "initialised decoder of the same architecture (its own SAE) and on the real units "
                "with shuffled labels"
            ),
        },
        "label_details": lab,
        "labels_confirmed_on_test": {
            v: {k: d[k] for k in d if k != "units"} for v, d in res.heldout.items()
        },
        "ablation": ablation,
        "ablation_baseline": res.ablation.get("baseline", {}),
        "ablation_top": ablation_top,
        "attribution": {k: v for k, v in res.attribution.items() if k != "scatter"},
        "data": {
            "checkpoint": res.checkpoint,
            "sessions": sorted(set(res.table.session_id.tolist())),
            "skipped_sessions": res.skipped_sessions,
            "trials": {s: int((res.table.split == s).sum()) for s in ("train", "val", "test")},
            "label_trials": res.config.label_trials,
            "n_label_trials": int(res.label_mask.sum()),
            "windows": res.n_windows,
            "tasks": res.tasks,
        },
        "config": res.config.to_dict(),
        "runtime_s": res.runtime_s,
    }
    res.summary = summary
    summary["notes"] = support_notes(res)
    return _clean(summary)


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def ground_truth_recovery(res: InterpretResult, truths: Sequence) -> dict:
    """Compare labels with what a simulator planted (``GroundTruth`` per session).

    Direction: the planted preferred directions of responsive cells, binned to the 8 grating
    directions (45° bins); per direction, the number of planted cells, of labelled units of the
    trained decoder's SAE preferring it, of its significant units (q < alpha, before the control
    gate) and of the random-init decoder's significant units. ``covered`` counts the planted
    directions (with at least 5% of the responsive cells) that have at least one such unit.
    Genetic: per Cre line, the labelled / significant units whose best class it is, for the
    trained and the random-init decoder.
    """
    lab = res.labelling
    a = res.config.alpha
    sids = set(res.table.session_id.tolist())
    truths = [t for t in truths if t.session_id in sids]
    out: dict = {"sessions": len(truths)}
    if not truths:
        return out
    grid = np.arange(0.0, 360.0, 45.0)

    def to_bin(deg: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(deg, dtype=np.float64) % 360.0 / 45.0).astype(int) % 8

    planted = np.concatenate(
        [np.asarray(t.pref_direction)[np.asarray(t.responsive)] for t in truths]
    )
    n_planted = np.bincount(to_bin(planted), minlength=8)
    if "direction" in lab.real.variables:
        vr = lab.real.variables["direction"]
        vc = lab.random_init.variables["direction"]
        real_lab = np.bincount(to_bin(vr.stats["pref_dir"][lab.labelled["direction"]]), minlength=8)
        real_sig = np.bincount(to_bin(vr.stats["pref_dir"][vr.q < a]), minlength=8)
        ctrl_sig = np.bincount(to_bin(vc.stats["pref_dir"][vc.q < a]), minlength=8)
        main = n_planted >= 0.05 * max(n_planted.sum(), 1)
        out["direction"] = {
            "directions": grid.tolist(),
            "planted_cells": n_planted.tolist(),
            "labelled_units": real_lab.tolist(),
            "significant_units": real_sig.tolist(),
            "random_init_significant_units": ctrl_sig.tolist(),
            "planted_directions": int(main.sum()),
            "covered_labelled": int((main & (real_lab > 0)).sum()),
            "covered_significant": int((main & (real_sig > 0)).sum()),
            "covered_random_init": int((main & (ctrl_sig > 0)).sum()),
        }
    if "genetic" in lab.real.variables:
        vr = lab.real.variables["genetic"]
        vc = lab.random_init.variables["genetic"]
        lines = sorted({t.cre_line for t in truths})

        def per_class(v, mask):
            cls = np.asarray(v.stats["classes"], dtype=object)[v.stats["best_class"].astype(int)]
            return {ln: int(((cls == ln) & mask).sum()) for ln in lines}

        out["genetic"] = {
            "cre_lines": lines,
            "sessions_per_line": {ln: sum(t.cre_line == ln for t in truths) for ln in lines},
            "labelled_units": per_class(vr, lab.labelled["genetic"]),
            "significant_units": per_class(vr, vr.q < a),
            "random_init_significant_units": per_class(vc, vc.q < a),
        }
        g = out["genetic"]
        g["lines_with_labelled_units"] = sum(v > 0 for v in g["labelled_units"].values())
        g["lines_with_random_init_units"] = sum(
            v > 0 for v in g["random_init_significant_units"].values()
        )
    return out


def write_outputs(res: InterpretResult, out: str | Path, *, report: bool = True) -> dict[str, Path]:
    """Write ``summary.json``, ``units.json``, the SAEs (``sae/``, ``sae_seed2/``,
    ``sae_random_init/``: cfg.json + sae.safetensors) and, with ``report``, ``report.html`` and
    its PNG figures (see :mod:`models.interpret.report`)."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(_clean(res.summary), indent=1) + "\n")
    paths["units"] = write_units_json(
        out / "units.json",
        res.labelling,
        firing_rate=res.saes[0].metrics_test.firing_rate,
        extra={
            "sae": "sae/",
            "label_trials": res.config.label_trials,
            "firing_rate_measured_on": "test-trial latent tokens",
            "heldout_confirmation": res.heldout,
        },
    )
    paths["sae"] = res.saes[0].sae.save(out / "sae")
    if len(res.saes) > 1:
        paths["sae_seed2"] = res.saes[1].sae.save(out / "sae_seed2")
    paths["sae_random_init"] = res.control_sae.sae.save(out / "sae_random_init")
    if report:
        from models.interpret.report import write_report

        paths["report"] = write_report(res, out)
    return paths
