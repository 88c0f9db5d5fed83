"""Sparse-autoencoder base class: input normalisation, encode/decode, splice, save/load.

All architectures share the parameterisation (``W_enc`` [d_in, n], ``b_enc`` [n],
``W_dec`` [n, d_in] with unit-norm rows, ``b_dec`` [d_in]) and an input normaliser stored as
buffers (``input_mean`` [d_in], ``input_scale`` scalar) that are part of the saved weights:

    x_n   = (x - input_mean) * input_scale              # mean-centred, E||x_n||^2 = d_in
    pre   = relu((x_n - b_dec) @ W_enc + b_enc)
    acts  = sparsify(pre)                               # TopK / BatchTopK / ReLU
    x_hat = (acts @ W_dec + b_dec) / input_scale + input_mean

so, in the caller's (un-normalised) space,

    x = bias + sum_u acts[u] * unit_directions[u] + error,
    bias = input_mean + b_dec / input_scale,  unit_directions = W_dec / input_scale,
    error = x - x_hat.

Subclasses implement :meth:`sparsify` (and, for training, :meth:`sparsify_train`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.sae.config import SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class SAEOutput(NamedTuple):
    """Result of :meth:`SparseAutoencoder.forward` (all in the caller's space unless noted)."""

    recon: Tensor  # [..., d_in] reconstruction x_hat
    acts: Tensor  # [..., n_units] sparse unit activations
    pre_acts: Tensor  # [..., n_units] relu'd encoder pre-activations (normalised space)
    error: Tensor  # [..., d_in] x - x_hat


class TrainStep(NamedTuple):
    """Losses of one training forward pass (normalised space)."""

    loss: Tensor
    fvu: Tensor
    auxk_fvu: Tensor
    l1: Tensor
    acts: Tensor  # [N, n_units]
    l0: Tensor


class SparseAutoencoder(nn.Module):
    """Base class; see the module docstring for the parameterisation."""

    architecture: str = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_units
        g = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.t().clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_mean", torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))

    # ---- normalisation -------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalizer(self, x: Tensor, max_tokens: int = 1_000_000) -> None:
        """Estimate mean and scale from data ``x`` [..., d_in]; initialise ``b_dec``.

        With ``center_input`` the mean is subtracted; with ``scale_input`` one scalar makes
        E||x_n||^2 = d_in. ``b_dec`` is initialised to the data mean in normalised space (zero
        when centring, the scaled mean otherwise).
        """
        x = x.reshape(-1, self.cfg.d_in)
        if x.shape[0] > max_tokens:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
            x = x[idx[:max_tokens]]
        x = x.to(torch.float64)
        mean = x.mean(0) if self.cfg.center_input else torch.zeros(x.shape[1], dtype=x.dtype)
        xc = x - mean
        if self.cfg.scale_input:
            ms = xc.pow(2).sum(-1).mean().clamp_min(1e-12)
            scale = math.sqrt(self.cfg.d_in / ms.item())
        else:
            scale = 1.0
        dev = self.W_dec.device
        self.input_mean.copy_(mean.to(dev, torch.float32))
        self.input_scale.fill_(scale)
        self.b_dec.copy_((xc.mean(0) * scale).to(dev, torch.float32))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) * self.input_scale

    def denormalize(self, x_n: Tensor) -> Tensor:
        return x_n / self.input_scale + self.input_mean

    # ---- core ----------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """Relu'd encoder pre-activations [..., n_units] for raw input ``x``."""
        return torch.relu((self.normalize(x) - self.b_dec) @ self.W_enc + self.b_enc)

    def sparsify(self, pre: Tensor) -> Tensor:
        """Inference sparsity map (no data-dependent Python control flow: ONNX-exportable)."""
        raise NotImplementedError

    def sparsify_train(self, pre: Tensor) -> Tensor:
        """Training sparsity map on a flat [N, n_units] batch (default: as at inference)."""
        return self.sparsify(pre)

    def encode(self, x: Tensor) -> Tensor:
        """Sparse unit activations [..., n_units]."""
        return self.sparsify(self.pre_activations(x))

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction x_hat [..., d_in] in the caller's space."""
        return self.denormalize(acts @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        acts = self.sparsify(pre)
        recon = self.decode(acts)
        return SAEOutput(recon, acts, pre, x - recon)

    def splice(self, x: Tensor, with_error: bool = False) -> Tensor:
        """Replacement for ``x`` in the host model: x_hat, or x_hat + (x - x_hat) = x.

        ``with_error=True`` reproduces ``x`` (up to float rounding) while keeping the SAE in the
        graph, so that downstream attributions can be split into units, biases and error. The
        error is detached: gradients reach ``x`` through the SAE's units only.
        """
        recon = self.decode(self.encode(x))
        if with_error:
            return recon + (x - recon).detach()
        return recon

    # ---- decomposition helpers (caller's space) -------------------------------------------
    def unit_directions(self) -> Tensor:
        """[n_units, d_in]: contribution of one unit of activation to x_hat."""
        return self.W_dec / self.input_scale

    def bias_vector(self) -> Tensor:
        """[d_in]: x_hat when every unit is off."""
        return self.input_mean + self.b_dec / self.input_scale

    # ---- training support -----------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        g.sub_((g * w).sum(1, keepdim=True) * w)

    def training_step(
        self, x_n: Tensor, dead_mask: Tensor | None = None, l1_coeff: float | None = None
    ) -> TrainStep:
        """Losses on a flat batch of *normalised* inputs ``x_n`` [N, d_in].

        ``loss = fvu + aux_coeff * auxk_fvu + l1_coeff * l1``, where fvu is the batch fraction
        of variance unexplained, auxk_fvu the AuxK term (the top ``aux_k`` dead units'
        reconstruction of the residual, scaled by min(n_dead / aux_k, 1), OpenAI 2024) and l1 the
        mean per-token L1 norm of activations (ReLU architecture only).
        """
        pre = torch.relu((x_n - self.b_dec) @ self.W_enc + self.b_enc)
        acts = self.sparsify_train(pre)
        x_hat = acts @ self.W_dec + self.b_dec
        total_var = (x_n - x_n.mean(0)).pow(2).sum().clamp_min(1e-12)
        resid = x_n - x_hat
        fvu = resid.pow(2).sum() / total_var
        zero = fvu.new_zeros(())
        auxk = zero
        if dead_mask is not None and self.cfg.aux_coeff > 0 and self.architecture != "relu":
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                k_aux = min(self.cfg.effective_aux_k, n_dead)
                scale = min(n_dead / k_aux, 1.0)
                masked = pre.masked_fill(~dead_mask, -1.0)
                vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
                aux_acts = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
                e_hat = aux_acts @ self.W_dec
                auxk = scale * (e_hat - resid.detach()).pow(2).sum() / total_var
        l1 = acts.sum(-1).mean() if self.architecture == "relu" else zero
        l1c = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
        loss = fvu + self.cfg.aux_coeff * auxk + l1c * l1
        l0 = (acts > 0).float().sum(-1).mean()
        return TrainStep(loss, fvu, auxk, l1, acts, l0)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae.safetensors`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.cfg.save(d / CFG_FILE)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(d / WEIGHTS_FILE), metadata={"architecture": self.architecture})
        return d

    def load_weights(self, path: str | Path, strict: bool = True) -> None:
        self.load_state_dict(load_file(str(path)), strict=strict)

    def extra_repr(self) -> str:
        return f"d_in={self.cfg.d_in}, n_units={self.cfg.n_units}, k={self.cfg.k}"
