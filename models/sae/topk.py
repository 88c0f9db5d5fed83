"""TopK SAE (Gao et al. 2024): keep the k largest relu'd pre-activations per token."""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SparseAutoencoder
from models.sae.registry import register_sae


def topk_sparsify(pre: Tensor, k: int) -> Tensor:
    """Zero all but the ``k`` largest entries of the last axis (torch.topk + scatter)."""
    vals, idx = torch.topk(pre, k, dim=-1, sorted=False)  # scattered back: order is moot
    return torch.zeros_like(pre).scatter(-1, idx, vals)


@register_sae("topk")
class TopKSAE(SparseAutoencoder):
    """Exactly ``k`` (or fewer, if fewer pre-activations are positive) units per token."""

    def sparsify(self, pre: Tensor) -> Tensor:
        return topk_sparsify(pre, self.cfg.k)
