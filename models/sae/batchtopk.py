"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the ``k * N`` largest relu'd pre-activations over a whole batch of ``N`` tokens,
so the number of active units varies per token and averages ``k``. Inference must not depend
on the batch, so it uses a single threshold (a JumpReLU): ``acts = pre * (pre > threshold)``.
The threshold is estimated as in the paper, the expectation over batches of the smallest
activation kept by the batch top-k: an exponential moving average during training, then
(optionally) re-estimated on the training data by :func:`calibrate_threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SparseAutoencoder
from models.sae.config import SAEConfig
from models.sae.registry import register_sae


def batch_topk_sparsify(pre: Tensor, k: int) -> Tensor:
    """Keep the ``k * N`` largest entries of a flat [N, n_units] batch."""
    flat = pre.reshape(-1)
    n_keep = min(k * pre.shape[0], flat.numel())
    vals, idx = torch.topk(flat, n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)


@register_sae("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self._threshold_set = False

    def sparsify(self, pre: Tensor) -> Tensor:
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def sparsify_train(self, pre: Tensor) -> Tensor:
        return batch_topk_sparsify(pre, self.cfg.k)

    @staticmethod
    def min_kept(acts: Tensor) -> Tensor:
        """Smallest positive activation of a batch-top-k output (nan if none)."""
        pos = acts[acts > 0]
        return pos.min() if pos.numel() else acts.new_tensor(float("nan"))

    @torch.no_grad()
    def update_threshold(self, acts: Tensor, momentum: float) -> None:
        m = self.min_kept(acts.detach())
        if torch.isnan(m):
            return
        if not self._threshold_set:
            self.threshold.copy_(m)
            self._threshold_set = True
        else:
            self.threshold.mul_(1 - momentum).add_(momentum * m)

    def load_weights(self, path, strict: bool = True) -> None:
        super().load_weights(path, strict)
        self._threshold_set = True


@torch.no_grad()
def calibrate_threshold(sae: BatchTopKSAE, x: Tensor, batch_size: int = 4096) -> float:
    """Set ``sae.threshold`` to the mean over batches of the smallest batch-top-k activation.

    ``x`` is raw (un-normalised) input [..., d_in]. Returns the new threshold.
    """
    x = x.reshape(-1, sae.cfg.d_in)
    dev = sae.W_dec.device
    mins = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(dev)
        if xb.shape[0] < max(batch_size // 4, 1) and mins:
            break  # a short trailing batch would bias the estimate
        m = sae.min_kept(batch_topk_sparsify(sae.pre_activations(xb), sae.cfg.k))
        if not torch.isnan(m):
            mins.append(m)
    if mins:
        sae.threshold.copy_(torch.stack(mins).mean())
        sae._threshold_set = True
    return float(sae.threshold)
