"""Synthetic data with a planted sparse dictionary."""

import torch


def planted_data(d=32, n_atoms=128, k=4, n=20000, seed=1):
    """Tokens made of k atoms of a random unit-norm dictionary, plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(n_atoms, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :k]
    coef = torch.zeros(n, n_atoms).scatter(1, idx, torch.rand(n, k, generator=g) * 1.5 + 0.5)
    return dic, coef @ dic + 0.3 * torch.randn(d, generator=g)
