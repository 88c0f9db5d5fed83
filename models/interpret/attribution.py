"""Per-prediction attribution of decoder logits to SAE units.

Setting: the decoder's latent stream ``x`` [B, L, D] goes through the SAE spliced *with its
error term*, so the readout sees exactly ``x``:

    x = bias + sum_u c_u + error,   c_u[b, l] = acts[b, l, u] * unit_directions[u]

(``bias = sae.bias_vector()``, ``error = x - x_hat``; see :mod:`models.sae.base`), and
``readout(z) -> {task: logits}`` maps latents to logits. The ``M`` most active units of an
example are the units with the largest activation summed over its latent tokens; ablating unit
``u`` removes ``c_u`` from every token of that example.

Methods and what "the pieces add up to the logit" means for each (``terms`` always sum to the
logit exactly, up to float rounding, by construction; the question is what each term means):

- ``ablation`` (default, exact): ``attr_u = f(x) - f(x - c_u)``, the logit change when the unit
  is ablated, for all M units in ONE readout call on a stacked batch of M + 3 variants
  (``x``, ``x_hat``, ``bias``, and ``x - c_u`` per unit; M + 1 without ``terms``). Terms:
  ``error = f(x) - f(x_hat)``, ``bias = f(bias)`` (every unit off, no error; includes the
  readout's own bias), ``rest = f(x_hat) - f(bias) - sum_M attr_u`` (units outside the top M
  *and* the non-additivity of a non-linear readout: ablation effects of a non-linear readout
  do not sum to the joint effect). For an affine readout ``rest`` is exactly the contribution
  of the units outside the top M (zero when M covers every active unit).
- ``grad`` (activation x gradient; a linearisation at x): ``attr_u = <grad f(x), c_u>``.
  Terms: ``rest`` (same for the other units), ``error = <g, error>``, ``bias = <g, bias>``,
  ``offset = f(x) - <g, x>`` (the readout's intercept for an affine readout; for a non-linear
  one it also absorbs the curvature). Equals ``ablation`` for an affine readout.
- ``ig`` (integrated gradients of the unit activations, baseline = all units off with bias
  and error kept, midpoint rule with ``n_steps``): terms ``rest`` (other units' IG),
  ``error = f(bias + error) - f(bias)``, ``bias = f(bias)``, ``residual`` = integration error
  (``f(x) - f(bias + error) - sum_all IG``, -> 0 as ``n_steps`` grows).

The readout must treat batch rows independently (no train-mode batch norm) and accept a batch
``k`` times larger whose rows are the original batch tiled ``k`` times (``Tensor.repeat``
order: rows ``r*B ... r*B + B - 1`` are variant ``r``); bind per-example context with
:func:`tile_rows` (e.g. ``lambda z: model.readout(z, tile_batch(batch, z.shape[0] // B))``).
The ``ablation`` path has no data-dependent Python control flow (topk, gather, einsum, one
readout call), so it can be traced into an ONNX graph with ``torch.onnx.export(dynamo=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from models.sae.base import SparseAutoencoder

Readout = Callable[[Tensor], Tensor | Mapping[str, Tensor]]


class Attribution(NamedTuple):
    method: str
    units: Tensor  # [B, M] unit ids, most active first
    activations: Tensor  # [B, M] activation summed over latent tokens
    logits: dict[str, Tensor]  # [B, C] readout of x (SAE spliced with error)
    attributions: dict[str, Tensor]  # [B, M, C]
    terms: dict[str, dict[str, Tensor]]  # {task: {term: [B, C]}}; see module docstring

    def total(self, task: str) -> Tensor:
        """sum of attributions and terms, [B, C]; equals ``logits[task]`` up to rounding."""
        t = self.attributions[task].sum(1)
        for v in self.terms[task].values():
            t = t + v
        return t


def tile_rows(t: Tensor, k: int) -> Tensor:
    """Tile a per-example tensor [B, ...] to [k*B, ...] (variant-major)."""
    return t.repeat(k, *([1] * (t.dim() - 1)))


def _as_dict(out: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(out) if isinstance(out, Mapping) else {"logits": out}


def top_units(sae: SparseAutoencoder, x: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(acts [B, L, n], unit ids [B, M], summed activation [B, M]) of the M most active units."""
    acts = sae.encode(x)
    total = acts.sum(1)
    vals, idx = torch.topk(total, m, dim=-1)
    return acts, idx, vals


def unit_contributions(sae: SparseAutoencoder, acts: Tensor, idx: Tensor) -> Tensor:
    """c_u for the selected units: [B, M, L, D]."""
    a = torch.gather(acts, 2, idx[:, None, :].expand(-1, acts.shape[1], -1))  # [B, L, M]
    dirs = sae.unit_directions()[idx]  # [B, M, D]
    return a.transpose(1, 2).unsqueeze(-1) * dirs.unsqueeze(2)  # [B, M, L, 1] * [B, M, 1, D]


class _Decomposition(NamedTuple):
    """x = bias + sum over all units + error; the top-M units' part of it."""

    idx: Tensor  # [B, M] unit ids of the M most active units
    vals: Tensor  # [B, M] their activations summed over latent tokens
    x_hat: Tensor  # [B, L, D] SAE reconstruction (bias + all units)
    contrib: Tensor  # [B, M, L, D] each top unit's contribution
    bias: Tensor  # [B, L, D] SAE bias vector, broadcast


def _decompose(sae: SparseAutoencoder, x: Tensor, m: int) -> _Decomposition:
    acts, idx, vals = top_units(sae, x, m)
    return _Decomposition(
        idx,
        vals,
        sae.decode(acts),
        unit_contributions(sae, acts, idx),
        sae.bias_vector().expand_as(x),
    )


def ablation_attribution(
    sae: SparseAutoencoder, x: Tensor, readout: Readout, m: int, *, terms: bool = True
) -> Attribution:
    """Exact ablation attribution for the M most active units, one batched readout call.

    ``terms=False`` leaves out the error / bias / rest decomposition (and the two readout rows per
    window, reconstruction and bias alone, that it needs): ``terms`` is then empty and the
    logits minus the attributions' sum is all that is left of the logit (what the exported graph
    returns as ``unexplained``)."""
    b, n_tok, d = x.shape
    idx, vals, x_hat, contrib, bias = _decompose(sae, x, m)
    ablated = (x[:, None] - contrib).transpose(0, 1).reshape(m * b, n_tok, d)  # variant-major
    rows = [x, x_hat, bias, ablated] if terms else [x, ablated]
    z = torch.cat(rows, dim=0)  # [(M + 3) B, L, D] or [(M + 1) B, L, D]
    out = _as_dict(readout(z))
    n_pre = len(rows) - 1
    logits, attributions, parts = {}, {}, {}
    for task, lg in out.items():
        lg = lg.reshape(m + n_pre, b, -1)
        f_x = lg[0]
        attr = (f_x[None] - lg[n_pre:]).transpose(0, 1)  # [B, M, C]
        logits[task] = f_x
        attributions[task] = attr
        if terms:
            f_hat, f_bias = lg[1], lg[2]
            parts[task] = {
                "error": f_x - f_hat,
                "bias": f_bias,
                "rest": f_hat - f_bias - attr.sum(1),
            }
    return Attribution("ablation", idx, vals, logits, attributions, parts)


def _grads(z: Tensor, out: dict[str, Tensor]) -> dict[str, Tensor]:
    """d logits[:, c] / dz for every task and class: {task: [C, *z.shape]}."""
    res = {}
    for task, lg in out.items():
        gs = []
        for c in range(lg.shape[-1]):
            (g,) = torch.autograd.grad(lg[:, c].sum(), z, retain_graph=True)
            gs.append(g)
        res[task] = torch.stack(gs)
    return res


def gradient_attribution(
    sae: SparseAutoencoder, x: Tensor, readout: Readout, m: int
) -> Attribution:
    """Activation x gradient (first-order estimate of the ablation effect) for all classes."""
    with torch.no_grad():
        idx, vals, x_hat, contrib, bias = _decompose(sae, x, m)
        all_units = x_hat - bias
    z = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = _as_dict(readout(z))
        grads = _grads(z, out)
    logits, attributions, terms = {}, {}, {}
    for task, g in grads.items():  # g [C, B, L, D]
        f_x = out[task].detach()
        attr = torch.einsum("cbld,bmld->bmc", g, contrib)
        dot = lambda v, g=g: torch.einsum("cbld,bld->bc", g, v)  # noqa: E731
        logits[task] = f_x
        attributions[task] = attr
        terms[task] = {
            "rest": dot(all_units) - attr.sum(1),
            "error": dot(x - x_hat),
            "bias": dot(bias),
            "offset": f_x - dot(x),
        }
    return Attribution("grad", idx, vals, logits, attributions, terms)


def integrated_gradients(
    sae: SparseAutoencoder, x: Tensor, readout: Readout, m: int, n_steps: int = 32
) -> Attribution:
    """Integrated gradients of the unit activations (all units scaled together from 0 to 1,
    bias and error kept); the n_steps path points go through the readout in one call."""
    b, n_tok, d = x.shape
    with torch.no_grad():
        idx, vals, x_hat, contrib, bias = _decompose(sae, x, m)
        all_units = x_hat - bias
        base = x - all_units  # bias + error
        alphas = (torch.arange(n_steps, dtype=x.dtype, device=x.device) + 0.5) / n_steps
        path = base[None] + alphas[:, None, None, None] * all_units[None]  # [S, B, L, D]
        ends = torch.cat([x, base, bias], 0)
        f_ends = {k: v.reshape(3, b, -1) for k, v in _as_dict(readout(ends)).items()}
    z = path.reshape(n_steps * b, n_tok, d).clone().requires_grad_(True)
    with torch.enable_grad():
        out = _as_dict(readout(z))
        grads = _grads(z, out)
    logits, attributions, terms = {}, {}, {}
    for task, g in grads.items():
        gm = g.reshape(g.shape[0], n_steps, b, n_tok, d).mean(1)  # [C, B, L, D]
        attr = torch.einsum("cbld,bmld->bmc", gm, contrib)
        ig_all = torch.einsum("cbld,bld->bc", gm, all_units)
        f_x, f_base, f_bias = f_ends[task]
        logits[task] = f_x
        attributions[task] = attr
        terms[task] = {
            "rest": ig_all - attr.sum(1),
            "error": f_base - f_bias,
            "bias": f_bias,
            "residual": f_x - f_base - ig_all,
        }
    return Attribution("ig", idx, vals, logits, attributions, terms)


METHODS = {
    "ablation": ablation_attribution,
    "grad": gradient_attribution,
    "ig": integrated_gradients,
}


def attribute(
    sae: SparseAutoencoder, x: Tensor, readout: Readout, m: int, method: str = "ablation", **kw
) -> Attribution:
    try:
        fn = METHODS[method]
    except KeyError:
        raise KeyError(
            f"unknown attribution method '{method}' (known: {sorted(METHODS)})"
        ) from None
    if method == "ablation":
        with torch.no_grad():
            return fn(sae, x, readout, m, **kw)
    return fn(sae, x, readout, m, **kw)


def _rank(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def agreement(exact: Tensor, approx: Tensor) -> dict[str, float]:
    """How well cheap attributions ``approx`` [B, M] agree with the exact ones [B, M].

    pearson: pooled correlation; spearman: mean per-example rank correlation (examples with
    constant attributions skipped); top1: same unit with the largest |attribution|; sign:
    fraction of entries with the same sign (entries where exact is ~0 skipped); rel_error:
    ||approx - exact|| / ||exact||.
    """
    e = exact.detach().double().cpu().numpy()
    a = approx.detach().double().cpu().numpy()
    ef, af = e.ravel(), a.ravel()
    pear = float(np.corrcoef(ef, af)[0, 1]) if ef.std() > 0 and af.std() > 0 else float("nan")
    sp = []
    if e.shape[1] > 1:
        re, ra = _rank(e), _rank(a)
        for i in range(e.shape[0]):
            if re[i].std() > 0 and ra[i].std() > 0:
                sp.append(np.corrcoef(re[i], ra[i])[0, 1])
    nz = np.abs(ef) > 1e-8 * max(np.abs(ef).max(), 1e-30)
    return {
        "pearson": pear,
        "spearman": float(np.mean(sp)) if sp else float("nan"),
        "top1": float((np.abs(e).argmax(1) == np.abs(a).argmax(1)).mean()),
        "sign": float((np.sign(ef[nz]) == np.sign(af[nz])).mean()) if nz.any() else float("nan"),
        "rel_error": float(np.linalg.norm(af - ef) / max(np.linalg.norm(ef), 1e-30)),
    }


def compare_methods(
    sae: SparseAutoencoder,
    x: Tensor,
    readout: Readout,
    m: int,
    n_steps: int = 32,
    target: str = "predicted",
) -> dict[str, dict[str, dict[str, float]]]:
    """Agreement of ``grad`` and ``ig`` with exact ablation, per task, on the target class
    (``"predicted"``: each example's argmax logit; ``"all"``: every class pooled)."""
    ex = attribute(sae, x, readout, m, "ablation")
    res: dict[str, dict[str, dict[str, float]]] = {}
    for meth in ("grad", "ig"):
        kw = {"n_steps": n_steps} if meth == "ig" else {}
        ap = attribute(sae, x, readout, m, meth, **kw)
        for task, e in ex.attributions.items():
            a = ap.attributions[task]
            if target == "predicted":
                cls = ex.logits[task].argmax(-1)  # [B]
                sel = cls[:, None, None].expand(-1, e.shape[1], 1)
                e2, a2 = e.gather(2, sel)[..., 0], a.gather(2, sel)[..., 0]
            else:
                e2 = e.transpose(1, 2).reshape(-1, e.shape[1])
                a2 = a.transpose(1, 2).reshape(-1, a.shape[1])
            res.setdefault(task, {})[meth] = agreement(e2, a2)
    return res
