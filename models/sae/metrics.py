"""SAE metrics, reported every time an SAE is trained or evaluated.

- :func:`sae_metrics`: L0 (mean active units per token), fraction of variance unexplained (FVU,
  in the caller's space, against the data mean), MSE, dead fraction (units that never fire on
  the data) and dense fraction (units firing on more than ``dense_threshold`` of tokens).
- :class:`SplicedEval`: decoding performance with the SAE spliced into the latent stream, versus
  the plain model and versus mean-ablating the latent stream, and the fraction of performance
  recovered, ``(m_sae - m_ablated) / (m_plain - m_ablated)``, for cross-entropy and accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.sae.base import SparseAutoencoder


@dataclass
class SAEMetrics:
    n_tokens: int
    l0: float
    fvu: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    firing_rate: np.ndarray  # [n_units] fraction of tokens on which each unit fires

    def to_dict(self) -> dict:
        d = asdict(self)
        fr = d.pop("firing_rate")
        d["firing_rate_quantiles"] = {
            str(q): float(np.quantile(fr, q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)
        }
        return d


@torch.no_grad()
def sae_metrics(
    sae: SparseAutoencoder, x: Tensor, *, batch_size: int = 8192, dense_threshold: float = 0.1
) -> SAEMetrics:
    """Metrics of ``sae`` (eval mode, inference path) on latent tokens ``x`` [..., d_in]."""
    x = x.reshape(-1, sae.cfg.d_in)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no tokens")
    dev = sae.W_dec.device
    was_training = sae.training
    sae.eval()
    sse = 0.0
    s1 = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    s2 = 0.0
    l0 = 0.0
    fires = torch.zeros(sae.cfg.n_units, dtype=torch.float64)
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(dev).float()
        out = sae(xb)
        sse += out.error.double().pow(2).sum().item()
        xd = xb.double().cpu()
        s1 += xd.sum(0)
        s2 += xd.pow(2).sum().item()
        active = (out.acts > 0).double().cpu()
        l0 += active.sum().item()
        fires += active.sum(0)
    sae.train(was_training)
    total_var = s2 - (s1 @ s1).item() / n
    rate = (fires / n).numpy()
    return SAEMetrics(
        n_tokens=n,
        l0=l0 / n,
        fvu=sse / max(total_var, 1e-30),
        mse=sse / (n * sae.cfg.d_in),
        dead_fraction=float((rate == 0).mean()),
        dense_fraction=float((rate > dense_threshold).mean()),
        dense_threshold=dense_threshold,
        firing_rate=rate,
    )


def latent_mean(latents: Tensor, per_position: bool = True) -> Tensor:
    """Mean latent for mean-ablation: [L, D] per latent position (default) or [D]."""
    if per_position:
        return latents.reshape(-1, *latents.shape[-2:]).mean(0)
    return latents.reshape(-1, latents.shape[-1]).mean(0)


Readout = Callable[[Tensor], Mapping[str, Tensor]]


class SplicedEval:
    """Accumulates decoding performance over batches for three latent streams:

    ``plain`` (the decoder's own latents), ``sae`` (latents replaced by the SAE reconstruction,
    no error term) and ``mean_ablation`` (every latent replaced by ``mean_latent``, [D] or
    [L, D], e.g. from :func:`latent_mean` over the training data).

    ``update(latents, readout, targets)``: ``readout(z) -> {task: logits [B, C]}`` is the frozen
    decoder's head with this batch's context bound (e.g. ``lambda z: model.readout(z, batch)``);
    ``targets[task]`` holds class indices [B], -1 = no label (ignored).
    """

    CONDITIONS = ("plain", "sae", "mean_ablation")

    def __init__(self, sae: SparseAutoencoder, mean_latent: Tensor):
        self.sae = sae
        self.mean_latent = mean_latent
        self._acc: dict[str, dict[str, list[float]]] = {}

    @torch.no_grad()
    def update(self, latents: Tensor, readout: Readout, targets: Mapping[str, Tensor]) -> None:
        self.sae.eval()
        streams = {
            "plain": latents,
            "sae": self.sae.splice(latents, with_error=False),
            "mean_ablation": self.mean_latent.to(latents).expand_as(latents),
        }
        for cond, z in streams.items():
            logits = readout(z)
            for task, y in targets.items():
                if task not in logits:
                    continue
                y = y.to(logits[task].device).long()
                ok = y >= 0
                if not ok.any():
                    continue
                lg = logits[task][ok].float()
                yy = y[ok]
                acc = self._acc.setdefault(task, {})
                a = acc.setdefault(cond, [0.0, 0.0, 0.0])  # loss sum, correct, count
                a[0] += F.cross_entropy(lg, yy, reduction="sum").item()
                a[1] += (lg.argmax(-1) == yy).sum().item()
                a[2] += yy.numel()

    def result(self) -> dict[str, dict]:
        """Per task: loss and accuracy per condition, and the fractions recovered."""
        out: dict[str, dict] = {}
        for task, acc in self._acc.items():
            r: dict[str, dict | float | None] = {}
            for cond in self.CONDITIONS:
                if cond in acc:
                    s, c, n = acc[cond]
                    r[cond] = {"loss": s / n, "accuracy": c / n, "n": int(n)}
            for m in ("loss", "accuracy"):
                p, s, a = (r.get(c) for c in self.CONDITIONS)
                if p and s and a and abs(p[m] - a[m]) > 1e-12:
                    r[f"{m}_recovered"] = (s[m] - a[m]) / (p[m] - a[m])
                else:
                    r[f"{m}_recovered"] = None
            out[task] = r
        return out
