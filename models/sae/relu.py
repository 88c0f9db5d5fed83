"""ReLU SAE with an L1 penalty (the classic dictionary-learning SAE; an option, not the default).

Decoder rows are kept at unit norm, so the L1 on activations equals the decoder-norm-weighted
L1 of Anthropic's April 2024 update.
"""

from __future__ import annotations

from torch import Tensor

from models.sae.base import SparseAutoencoder
from models.sae.registry import register_sae


@register_sae("relu")
class ReLUSAE(SparseAutoencoder):
    def sparsify(self, pre: Tensor) -> Tensor:
        return pre  # pre-activations are already relu'd
