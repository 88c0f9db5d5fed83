"""Train an SAE on a frozen model's latent stream.

Practice (Gao et al. 2024; Bussmann et al. 2024; EleutherAI sparsify; SAELens):
mean-centred, norm-scaled inputs (:meth:`SparseAutoencoder.fit_normalizer`); decoder bias
initialised to the data mean; tied encoder initialisation; decoder rows re-normalised to unit
norm after every step and the gradient component parallel to each row projected out before it;
AuxK loss on units dead for ``dead_after_tokens`` tokens; linear learning-rate warm-up and final
linear decay; L1 warm-up for the ReLU architecture; BatchTopK threshold by EMA and calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.sae.base import SparseAutoencoder
from models.sae.batchtopk import BatchTopKSAE, calibrate_threshold
from models.sae.config import SAEConfig, SAETrainConfig
from models.sae.registry import build_sae


@dataclass
class TrainHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    auxk_fvu: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return dict(self.__dict__)


def lr_factor(step: int, cfg: SAETrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, constant, linear decay over the last fraction."""
    f = 1.0
    if cfg.warmup_steps > 0:
        f = min(f, (step + 1) / cfg.warmup_steps)
    decay_steps = int(cfg.decay_fraction * cfg.steps)
    if decay_steps > 0:
        f = min(f, max(cfg.steps - step, 0) / decay_steps)
    return f


def collect_latents(
    encode: Callable[[object], Tensor], batches: Iterable[object], max_tokens: int | None = None
) -> Tensor:
    """Run ``encode(batch) -> [B, L, D]`` (e.g. a frozen decoder's ``encode``) over ``batches``
    without gradients and return the latent tokens flattened to [N, D] on the CPU."""
    out, n = [], 0
    with torch.no_grad():
        for b in batches:
            z = encode(b).detach()
            z = z.reshape(-1, z.shape[-1]).float().cpu()
            out.append(z)
            n += z.shape[0]
            if max_tokens is not None and n >= max_tokens:
                break
    if not out:
        raise ValueError("no batches to collect latents from")
    z = torch.cat(out)
    return z[:max_tokens] if max_tokens is not None else z


def train_sae(
    data: Tensor,
    cfg: SAEConfig,
    train_cfg: SAETrainConfig | None = None,
    *,
    init: SparseAutoencoder | None = None,
    fit_normalizer: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
) -> tuple[SparseAutoencoder, TrainHistory]:
    """Train an SAE of ``cfg.architecture`` on latent tokens ``data`` [..., d_in].

    Returns the trained SAE in eval mode (its ``cfg.train`` records ``train_cfg``) and the
    history. Deterministic given ``cfg.seed`` and ``train_cfg.seed`` on one device.

    ``init``: start from this SAE (trained in place; e.g. a refit, or a custom initialisation)
    instead of a fresh one; ``fit_normalizer=False`` keeps its normaliser and ``b_dec``.
    """
    tc = train_cfg or cfg.train or SAETrainConfig()
    cfg = cfg.model_copy(update={"train": tc})
    x_all = data.reshape(-1, cfg.d_in).float()
    n_tok = x_all.shape[0]
    if n_tok == 0:
        raise ValueError("no training tokens")
    dev = torch.device(tc.device)
    if init is not None:
        if init.cfg.model_copy(update={"train": None}) != cfg.model_copy(update={"train": None}):
            raise ValueError("init SAE's config differs from cfg")
        sae = init.to(dev)
        sae.cfg = cfg
    else:
        sae = build_sae(cfg).to(dev)
    if fit_normalizer:
        sae.fit_normalizer(x_all)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=tc.lr, betas=tc.betas)
    gen = torch.Generator().manual_seed(tc.seed)
    since_fired = torch.zeros(cfg.n_units, dtype=torch.long, device=dev)
    hist = TrainHistory()
    bs = min(tc.batch_size, n_tok)
    perm, pos = torch.randperm(n_tok, generator=gen), 0
    for step in range(tc.steps):
        if pos + bs > n_tok:
            perm, pos = torch.randperm(n_tok, generator=gen), 0
        xb = x_all[perm[pos : pos + bs]].to(dev)
        pos += bs
        x_n = sae.normalize(xb)
        dead = since_fired >= tc.dead_after_tokens
        l1c = cfg.l1_coeff
        if tc.l1_warmup_steps > 0:
            l1c *= min(1.0, (step + 1) / tc.l1_warmup_steps)
        out = sae.training_step(x_n, dead_mask=dead, l1_coeff=l1c)
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(step, tc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), tc.grad_clip)
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = (out.acts > 0).any(0)
            since_fired += bs
            since_fired[fired] = 0
            if isinstance(sae, BatchTopKSAE):
                sae.update_threshold(out.acts, tc.threshold_momentum)
        if step % log_every == 0 or step == tc.steps - 1:
            rec = {
                "loss": out.loss.item(),
                "fvu": out.fvu.item(),
                "auxk_fvu": out.auxk_fvu.item(),
                "l0": out.l0.item(),
                "dead_fraction": dead.float().mean().item(),
                "lr": opt.param_groups[0]["lr"],
            }
            hist.step.append(step)
            for key, v in rec.items():
                getattr(hist, key).append(v)
            if callback is not None:
                callback(step, rec)
    sae.eval()
    if isinstance(sae, BatchTopKSAE) and tc.calibrate_threshold:
        calibrate_threshold(sae, x_all, batch_size=bs)
    return sae, hist
