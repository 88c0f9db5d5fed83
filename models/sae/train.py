"""Train an SAE on a frozen model's latent stream.

Practice (Gao et al. 2024; Bussmann et al. 2024; EleutherAI sparsify; SAELens):
mean-centred, norm-scaled inputs (:meth:`SparseAutoencoder.fit_normalizer`); decoder bias
initialised to the data mean; tied encoder initialisation; decoder rows re-normalised to unit
norm after every step and the gradient component parallel to each row projected out before it;
AuxK loss on units dead for ``dead_after_tokens`` tokens; linear learning-rate warm-up and final
linear decay; L1 warm-up for the ReLU architecture; BatchTopK threshold by EMA and calibration.

Reconstruction alone does not guarantee that the host model keeps its behaviour when the SAE's
output replaces its latents: small reconstruction errors along the directions the host reads
cost more than large ones elsewhere. :func:`finetune_sae_e2e` is the remedy of the end-to-end
SAE literature (Braun et al. 2024, e2e/"e2e+ds" SAEs; Karvonen et al. 2025, KL+MSE fine-tuning
of a reconstruction-trained SAE): a short fine-tune of the SAE, the host frozen, on
``KL(host outputs || outputs with the SAE spliced in) + FVU``, the reconstruction term kept so
that the units stay a decomposition of the latents rather than of the task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    kl: list[float] = field(default_factory=list)  # e2e fine-tune only
    kl_weight: list[float] = field(default_factory=list)  # e2e fine-tune only

    def add(self, step: int, rec: Mapping[str, float]) -> None:
        """Log one step's record (keys: the fields above)."""
        self.step.append(step)
        for key, v in rec.items():
            getattr(self, key).append(v)

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


def _step(sae: SparseAutoencoder, opt, loss: Tensor, lr: float, tc) -> None:
    """One optimiser step at ``lr`` keeping the decoder rows at unit norm (their gradient
    projected off the row direction, then renormalised), with the configured gradient clip."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.project_decoder_grad()
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), tc.grad_clip)
    opt.step()
    sae.normalize_decoder()


@torch.no_grad()
def _track_firing(sae: SparseAutoencoder, acts: Tensor, since_fired: Tensor, tc) -> None:
    """Tokens since each unit last fired (in place; AuxK's dead mask), BatchTopK's threshold."""
    since_fired += acts.shape[0]
    since_fired[(acts > 0).any(0)] = 0
    if isinstance(sae, BatchTopKSAE):
        sae.update_threshold(acts, tc.threshold_momentum)


def train_sae(
    data: Tensor,
    cfg: SAEConfig,
    train_cfg: SAETrainConfig | None = None,
    *,
    init: SparseAutoencoder | None = None,
    fit_normalizer: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
    readout: HostReadout | None = None,
) -> tuple[SparseAutoencoder, TrainHistory]:
    """Train an SAE of ``cfg.architecture`` on latent tokens ``data`` [..., d_in].

    Returns the trained SAE in eval mode (its ``cfg.train`` records ``train_cfg``) and the
    history. Deterministic given ``cfg.seed`` and ``train_cfg.seed`` on one device.

    ``init``: start from this SAE (trained in place; e.g. a refit, or a custom initialisation)
    instead of a fresh one; ``fit_normalizer=False`` keeps its normaliser and ``b_dec``.

    With ``train_cfg.e2e_steps > 0`` the reconstruction training is followed by
    :func:`finetune_sae_e2e` through ``readout`` (required then), ``data`` being the host's
    examples [N, L, d_in]; the returned history then holds both phases (e2e steps numbered on
    from ``steps``).
    """
    tc = train_cfg or cfg.train or SAETrainConfig()
    if tc.e2e_steps > 0 and (readout is None or data.dim() < 3):
        raise ValueError("e2e_steps > 0 needs a readout and data shaped [N, L, d_in]")
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
        _step(sae, opt, out.loss, tc.lr * lr_factor(step, tc), tc)
        _track_firing(sae, out.acts, since_fired, tc)
        if step % log_every == 0 or step == tc.steps - 1:
            rec = {
                "loss": out.loss.item(),
                "fvu": out.fvu.item(),
                "auxk_fvu": out.auxk_fvu.item(),
                "l0": out.l0.item(),
                "dead_fraction": dead.float().mean().item(),
                "lr": opt.param_groups[0]["lr"],
            }
            hist.add(step, rec)
            if callback is not None:
                callback(step, rec)
    sae.eval()
    if isinstance(sae, BatchTopKSAE) and tc.calibrate_threshold:
        calibrate_threshold(sae, x_all, batch_size=bs)
    if tc.e2e_steps > 0:
        assert readout is not None

        def shifted(step: int, rec: dict[str, float]) -> None:
            if callback is not None:
                callback(tc.steps + step, rec)

        _, h2 = finetune_sae_e2e(
            sae, data.float(), readout, tc, callback=shifted, log_every=log_every
        )
        pad = [float("nan")] * len(hist.step)
        hist.kl, hist.kl_weight = pad + h2.kl, pad + h2.kl_weight
        for key in ("loss", "fvu", "auxk_fvu", "l0", "dead_fraction", "lr"):
            getattr(hist, key).extend(getattr(h2, key))
        hist.step.extend(tc.steps + s for s in h2.step)
    return sae, hist


# ---- end-to-end fine-tune -----------------------------------------------------------------------

HostReadout = Callable[[Tensor, Tensor], Mapping[str, Tensor]]


def e2e_lr_factor(step: int, cfg: SAETrainConfig) -> float:
    """The schedule of :func:`lr_factor` over ``e2e_steps`` (warm-up at most a tenth of them)."""
    sched = cfg.model_copy(
        update={"steps": cfg.e2e_steps, "warmup_steps": min(cfg.warmup_steps, cfg.e2e_steps // 10)}
    )
    return lr_factor(step, sched)


def output_kl(target: Mapping[str, Tensor], logits: Mapping[str, Tensor]) -> Tensor:
    """Sum over tasks of the batch-mean KL(softmax(target) || softmax(logits)) (nats)."""
    total = None
    for task, t in target.items():
        if task not in logits:
            continue
        kl = F.kl_div(
            torch.log_softmax(logits[task].float(), -1),
            torch.log_softmax(t.float(), -1),
            log_target=True,
            reduction="batchmean",
        )
        total = kl if total is None else total + kl
    if total is None:
        raise ValueError("the readout returned none of the target's tasks")
    return total


def finetune_sae_e2e(
    sae: SparseAutoencoder,
    latents: Tensor,
    readout: HostReadout,
    train_cfg: SAETrainConfig | None = None,
    *,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
) -> tuple[SparseAutoencoder, TrainHistory]:
    """Fine-tune a trained SAE end to end through a frozen host (trained in place).

    ``latents`` [N, L, d_in]: one host example per row (e.g. a decoded window's latent tokens).
    ``readout(z, idx) -> {task: logits [B, C]}``: the frozen host's computation from latents
    ``z`` [B, L, d_in] of examples ``idx`` [B] (indices into ``latents``, to bind per-example
    context such as the session). Its parameters should not require gradients; the SAE's do.

    For ``train_cfg.e2e_steps`` steps (``train_cfg`` default: ``sae.cfg.train``) on batches of
    ``e2e_batch_size`` examples: ``loss = e2e_kl_coeff * KL(readout(z) || readout(splice(z)))
    + e2e_fvu_coeff * FVU + aux_coeff * AuxK (+ l1_coeff * L1 for relu)``, Adam at ``e2e_lr``
    with the warm-up/decay schedule of :func:`lr_factor`, the decoder-row constraint as in
    :func:`train_sae`; the training sparsity map (top-k / batch top-k) keeps L0 where it was.
    The normaliser is kept. BatchTopK's threshold is re-calibrated at the end. Returns the SAE
    in eval mode (``cfg.train`` records ``train_cfg``) and the history (``kl`` filled).
    """
    tc = train_cfg or sae.cfg.train or SAETrainConfig()
    cfg = sae.cfg.model_copy(update={"train": tc})
    sae.cfg = cfg
    hist = TrainHistory()
    if tc.e2e_steps == 0:
        sae.eval()
        return sae, hist
    z_all = latents.float()
    if z_all.dim() < 3 or z_all.shape[-1] != cfg.d_in:
        raise ValueError(f"latents must be [N, L, {cfg.d_in}], got {tuple(z_all.shape)}")
    n = z_all.shape[0]
    if n == 0:
        raise ValueError("no training examples")
    dev = sae.W_dec.device
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=tc.e2e_lr, betas=tc.betas)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    since_fired = torch.zeros(cfg.n_units, dtype=torch.long, device=dev)
    bs = min(tc.e2e_batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    kl_weight: float | None = None
    for step in range(tc.e2e_steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        z = z_all[idx].to(dev)
        with torch.no_grad():
            target = {t: v.detach() for t, v in readout(z, idx).items()}
        x_n = sae.normalize(z.reshape(-1, cfg.d_in))
        dead = since_fired >= tc.dead_after_tokens
        out = sae.training_step(x_n, dead_mask=dead)
        z_hat = sae.decode(out.acts).reshape(z.shape)
        kl = output_kl(target, readout(z_hat, idx))
        if kl_weight is None:
            kl_weight = tc.e2e_kl_coeff
            if tc.e2e_balance:
                kl_weight *= out.fvu.item() / max(kl.item(), 1e-6)
        rest = out.loss - out.fvu  # AuxK and L1 at their own weights
        loss = kl_weight * kl + tc.e2e_fvu_coeff * out.fvu + rest
        _step(sae, opt, loss, tc.e2e_lr * e2e_lr_factor(step, tc), tc)
        _track_firing(sae, out.acts, since_fired, tc)
        if step % log_every == 0 or step == tc.e2e_steps - 1:
            rec = {
                "loss": loss.item(),
                "fvu": out.fvu.item(),
                "auxk_fvu": out.auxk_fvu.item(),
                "l0": out.l0.item(),
                "dead_fraction": dead.float().mean().item(),
                "lr": opt.param_groups[0]["lr"],
                "kl": kl.item(),
                "kl_weight": kl_weight,
            }
            hist.add(step, rec)
            if callback is not None:
                callback(step, rec)
    sae.eval()
    if isinstance(sae, BatchTopKSAE) and tc.calibrate_threshold:
        calibrate_threshold(sae, z_all.reshape(-1, cfg.d_in), batch_size=min(tc.batch_size, n))
    return sae, hist
