"""Latent windows of a frozen decoder, trial-level pooling, and unit-ablation experiments.

Everything here works on the latent stream that :meth:`Decoder.encode` returns (after the
processor), stored once per window, so that the readout half can be re-run cheaply under any
intervention: SAE splice, mean ablation, or zeroing a set of SAE units.

- :func:`encode_windows`: latents ``[N, L, D]`` of every decoded window of the given trials (the
  windows :func:`models.decoder.predict.predict_trials` pools), for one or several models at once
  (tokenised once).
- :func:`pooled_log_probs`: trial-level pooling exactly as ``predict_trials`` does it (mean of
  the per-window log-probabilities over a trial's windows), for any latent transform.
- :class:`SparseActs`: the SAE activations of a window set stored sparsely (nonzeros only), so that
  "zero the units in S" is ``z - sum_{u in S} acts_u * unit_direction_u`` without re-encoding.
- :func:`ablation_experiment`: zero the units labelled for each variable (the SAE is spliced with
  its error term, so "nothing ablated" is exactly the plain decoder), measure every task's
  trial-level accuracy, and compare with zeroing as many random units (many draws, among units
  that fire on the data and carry no label of that variable): drop, random-drop distribution
  (mean and 2.5/97.5 percentiles), a one-sided p-value, and a paired bootstrap interval of the
  drop over trials.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.decoder.model import batch_to_torch
from models.decoder.tokenizers import collate
from models.decoder.windows import SessionData, trial_windows
from models.sae.base import SparseAutoencoder

Transform = Callable[[Tensor, slice], Tensor]
"""Maps a batch of latents [b, L, D] (rows ``sl`` of the window set) to new latents."""


@dataclass
class WindowSet:
    """Decoded windows of a set of trials (possibly several sessions).

    ``latents`` [N, L, D] per model (list, same windows); ``session_index`` [N] the model's
    session index of each window; ``owner`` [N] the position of the window's trial in the
    trial list it was built from; ``t_rel`` [N] window end time relative to its trial's onset.
    """

    latents: list[Tensor]
    session_index: Tensor
    owner: np.ndarray
    t_rel: np.ndarray
    n_trials: int

    def __len__(self) -> int:
        return int(self.owner.size)

    def select(self, trial_mask: np.ndarray) -> WindowSet:
        """The windows of the trials where ``trial_mask`` [n_trials] is True (renumbered)."""
        trial_mask = np.asarray(trial_mask, dtype=bool)
        new_pos = np.cumsum(trial_mask) - 1
        keep = trial_mask[self.owner]
        kt = torch.as_tensor(keep)
        return WindowSet(
            latents=[z[kt] for z in self.latents],
            session_index=self.session_index[kt],
            owner=new_pos[self.owner[keep]],
            t_rel=self.t_rel[keep],
            n_trials=int(trial_mask.sum()),
        )


@torch.no_grad()
def encode_windows(
    models: Sequence[torch.nn.Module],
    tokenizer,
    sessions: Sequence[SessionData],
    trials: Sequence[np.ndarray],
    *,
    from_s: float = 1.0,
    batch_size: int = 256,
    stride: int = 1,
) -> WindowSet:
    """Latents of every decoded window of ``trials[i]`` of ``sessions[i]``, for each model.

    Windows are those of :func:`models.decoder.windows.trial_windows` (every frame from onset +
    ``from_s`` to the trial's end; ``stride`` > 1 keeps every stride-th of a trial's windows, at
    least one). Trial positions (``owner``) run over the concatenation of ``trials``.
    """
    lat: list[list[Tensor]] = [[] for _ in models]
    sess, owners, t_rel = [], [], []
    offset = 0
    for sd, tr in zip(sessions, trials, strict=True):
        tr = np.asarray(tr, dtype=np.int64)
        own, frames = trial_windows(sd, tr, from_s)
        own_a = np.asarray(own, dtype=np.int64)
        fr_a = np.asarray(frames, dtype=np.int64)
        if stride > 1 and own_a.size:
            rank = np.arange(own_a.size) - np.searchsorted(own_a, own_a, side="left")
            keep = rank % stride == 0
            own_a, fr_a = own_a[keep], fr_a[keep]
        for s in range(0, own_a.size, batch_size):
            fr = fr_a[s : s + batch_size]
            ow = own_a[s : s + batch_size]
            samples = [
                sd.tokenize(tokenizer, int(f), sd.lower[tr[o]]) for f, o in zip(fr, ow, strict=True)
            ]
            batch = batch_to_torch(collate(samples, np.full(len(samples), sd.session_index)))
            for i, m in enumerate(models):
                lat[i].append(m.encode(batch).float())
        rec = sd.rec
        sess.append(np.full(own_a.size, sd.session_index, dtype=np.int64))
        owners.append(own_a + offset)
        t_rel.append(rec.timestamps[fr_a] - rec.trials.start[tr[own_a]])
        offset += tr.size
    d = models[0].config.dim if hasattr(models[0], "config") else None
    empty = torch.zeros(0, getattr(models[0].config, "num_latents", 1), d or 1)
    return WindowSet(
        latents=[torch.cat(x) if x else empty for x in lat],
        session_index=torch.as_tensor(np.concatenate(sess) if sess else np.zeros(0, np.int64)),
        owner=np.concatenate(owners) if owners else np.zeros(0, np.int64),
        t_rel=np.concatenate(t_rel) if t_rel else np.zeros(0),
        n_trials=offset,
    )


def readout_fn(model) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """``f(latents, session_index) -> {task: logits}``: the decoder's readout half."""

    def f(z: Tensor, session_index: Tensor) -> dict[str, Tensor]:
        return model.readout(z, {"session_index": session_index})

    return f


@torch.no_grad()
def pooled_log_probs(
    model,
    ws: WindowSet,
    *,
    latents: Tensor | None = None,
    transform: Transform | None = None,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Per task: the mean over each trial's windows of the log-probabilities ``[n_trials, C]``
    (the pooling of ``predict_trials``), with ``transform`` applied to the latents first."""
    z_all = ws.latents[0] if latents is None else latents
    model.eval()
    sums: dict[str, np.ndarray] = {}
    for s in range(0, len(ws), batch_size):
        sl = slice(s, min(s + batch_size, len(ws)))
        z = z_all[sl]
        if transform is not None:
            z = transform(z, sl)
        out = model.readout(z, {"session_index": ws.session_index[sl]})
        own = ws.owner[sl]
        for task, lg in out.items():
            lp = torch.log_softmax(lg.float(), -1).numpy().astype(np.float64)
            if task not in sums:
                sums[task] = np.zeros((ws.n_trials, lp.shape[1]))
            np.add.at(sums[task], own, lp)
    counts = np.bincount(ws.owner, minlength=ws.n_trials)[:, None]
    return {t: v / np.maximum(counts, 1) for t, v in sums.items()}


def trial_accuracy(
    log_probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per task: accuracy and NLL of pooled log-probabilities against class targets (-1 = none).

    The NLL is that of the renormalised pooled distribution (softmax of the mean log-prob)."""
    out = {}
    for task, lp in log_probs.items():
        y = targets.get(task)
        if y is None:
            continue
        ok = y >= 0
        if not ok.any():
            continue
        p = lp[ok] - np.logaddexp.reduce(lp[ok], axis=1, keepdims=True)
        out[task] = {
            "accuracy": float((lp[ok].argmax(1) == y[ok]).mean()),
            "nll": float(-p[np.arange(ok.sum()), y[ok]].mean()),
            "n": int(ok.sum()),
        }
    return out


def correct_matrix(
    log_probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per task: bool [n_trials] correctness (only trials with a target)."""
    return {
        t: lp[targets[t] >= 0].argmax(1) == targets[t][targets[t] >= 0]
        for t, lp in log_probs.items()
        if t in targets and (targets[t] >= 0).any()
    }


@dataclass
class SparseActs:
    """SAE activations of a window set, nonzeros only: token row (window * L + latent), unit,
    value; plus the SAE's unit directions (caller's space) to turn them into contributions."""

    rows: Tensor  # [nnz] int64
    units: Tensor  # [nnz] int64
    values: Tensor  # [nnz] float32
    n_windows: int
    n_latents: int
    directions: Tensor  # [U, D]

    @classmethod
    @torch.no_grad()
    def compute(cls, sae: SparseAutoencoder, latents: Tensor, batch_size: int = 1024) -> SparseActs:
        sae.eval()
        n, n_lat = latents.shape[0], latents.shape[1]
        rows, units, values = [], [], []
        for s in range(0, n, batch_size):
            a = sae.encode(latents[s : s + batch_size].float())
            a = a.reshape(-1, a.shape[-1])
            r, u = torch.nonzero(a > 0, as_tuple=True)
            rows.append(r + s * n_lat)
            units.append(u)
            values.append(a[r, u])
        cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
        return cls(
            cat(rows, torch.long),
            cat(units, torch.long),
            cat(values, torch.float32),
            n,
            n_lat,
            sae.unit_directions().detach().float(),
        )

    @property
    def n_units(self) -> int:
        return int(self.directions.shape[0])

    def firing_rate(self) -> np.ndarray:
        """Fraction of latent tokens on which each unit fires."""
        c = torch.bincount(self.units, minlength=self.n_units).double()
        return (c / max(self.n_windows * self.n_latents, 1)).numpy()

    def window_mean(self) -> np.ndarray:
        """[N, U] activations averaged over each window's latent tokens (dense)."""
        out = torch.zeros(self.n_windows, self.n_units, dtype=torch.float64)
        out.index_put_(
            (self.rows // self.n_latents, self.units), self.values.double(), accumulate=True
        )
        return (out / self.n_latents).numpy()

    def contribution(self, unit_mask: Tensor, sl: slice) -> Tensor:
        """sum over the masked units of acts * direction, for windows ``sl``: [b, L, D]."""
        lo, hi = sl.start * self.n_latents, sl.stop * self.n_latents
        # rows are sorted (nonzero is row-major, batches in order)
        i0 = int(torch.searchsorted(self.rows, torch.tensor(lo)))
        i1 = int(torch.searchsorted(self.rows, torch.tensor(hi)))
        r, u, v = self.rows[i0:i1], self.units[i0:i1], self.values[i0:i1]
        m = unit_mask[u]
        out = torch.zeros(hi - lo, self.directions.shape[1])
        out.index_add_(0, r[m] - lo, v[m, None] * self.directions[u[m]])
        return out.reshape(sl.stop - sl.start, self.n_latents, -1)

    def ablate(self, units: np.ndarray | Sequence[int]) -> Transform:
        """Latent transform that zeroes ``units`` (SAE spliced with its error term)."""
        mask = torch.zeros(self.n_units, dtype=torch.bool)
        mask[torch.as_tensor(np.asarray(units, dtype=np.int64))] = True

        def f(z: Tensor, sl: slice) -> Tensor:
            return z - self.contribution(mask, sl).to(z)

        return f


def _bootstrap_drop(
    base: np.ndarray, abl: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Paired bootstrap (over trials) 95% interval of mean(base) - mean(abl)."""
    n = base.size
    if n == 0:
        return (float("nan"), float("nan"))
    idx = rng.integers(0, n, size=(n_boot, n))
    d = base[idx].mean(1) - abl[idx].mean(1)
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def ablation_experiment(
    model,
    ws: WindowSet,
    acts: SparseActs,
    unit_sets: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    *,
    n_draws: int = 100,
    candidates: np.ndarray | None = None,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict:
    """Zero each variable's units; compare every task's accuracy drop with random unit sets.

    ``unit_sets[V]``: unit ids labelled for V. Random sets of the same size are drawn from
    ``candidates`` (default: units that fire on these windows) minus V's units. Returns
    ``{"baseline": {task: acc}, "matrix": {V: {task: {...}}}}`` where each cell has ``drop``
    (baseline accuracy - accuracy with V's units zeroed), ``drop_ci`` (paired bootstrap over
    trials), ``random_drop`` (mean over draws), ``random_drop_ci`` (2.5/97.5 percentiles of the
    draws), ``p`` (one-sided: fraction of draws dropping at least as much, add-one), and
    ``ablated_accuracy``, ``excess_drop`` (drop - random_drop), ``relative_drop`` (drop /
    (baseline - chance): the share of the above-chance accuracy lost), ``n_units``,
    ``n_draws`` and ``random_pool`` (when fewer than twice as many unlabelled active units
    exist as are ablated, random sets are drawn from all active units, so that draws differ).
    """
    rng = np.random.default_rng(seed)
    base_lp = pooled_log_probs(model, ws)
    base_ok = correct_matrix(base_lp, targets)
    baseline = {t: float(v.mean()) for t, v in base_ok.items()}
    chance = {t: 1.0 / base_lp[t].shape[1] for t in base_ok}
    if candidates is None:
        candidates = np.flatnonzero(acts.firing_rate() > 0)
    out: dict = {"baseline": baseline, "matrix": {}}
    for var, units in unit_sets.items():
        units = np.asarray(units, dtype=np.int64)
        if units.size == 0:
            continue
        abl_ok = correct_matrix(pooled_log_probs(model, ws, transform=acts.ablate(units)), targets)
        pool = np.setdiff1d(candidates, units)
        pool_kind = "active units without this label"
        if pool.size < 2 * units.size:  # too few to draw distinct sets: draw from all active
            pool = np.asarray(candidates, dtype=np.int64)
            pool_kind = "all active units (too few unlabelled ones)"
        k = min(units.size, pool.size)
        rand = {t: [] for t in base_ok}
        for _ in range(n_draws if k > 0 else 0):
            pick = rng.choice(pool, size=k, replace=False)
            r_ok = correct_matrix(pooled_log_probs(model, ws, transform=acts.ablate(pick)), targets)
            for t in rand:
                rand[t].append(baseline[t] - float(r_ok[t].mean()))
        cells = {}
        for t in base_ok:
            drop = baseline[t] - float(abl_ok[t].mean())
            rd = np.asarray(rand[t])
            lo, hi = _bootstrap_drop(base_ok[t].astype(float), abl_ok[t].astype(float), n_boot, rng)
            cells[t] = {
                "drop": drop,
                "drop_ci": [lo, hi],
                "ablated_accuracy": float(abl_ok[t].mean()),
                "random_drop": float(rd.mean()) if rd.size else None,
                "random_drop_ci": (
                    [float(np.quantile(rd, 0.025)), float(np.quantile(rd, 0.975))]
                    if rd.size
                    else None
                ),
                "p": float((1 + (rd >= drop - 1e-12).sum()) / (1 + rd.size)) if rd.size else None,
                "excess_drop": drop - float(rd.mean()) if rd.size else None,
                "relative_drop": (
                    drop / (baseline[t] - chance[t]) if baseline[t] - chance[t] > 1e-9 else None
                ),
                "n_units": int(units.size),
                "random_pool": pool_kind,
                "n_random_units": int(k),
                "n_draws": int(rd.size),
            }
        out["matrix"][var] = cells
    return out
