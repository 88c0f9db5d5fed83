"""Typed SAE configs; an SAE directory holds ``cfg.json`` (this config) and ``sae.safetensors``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.config import Config

Architecture = Literal["topk", "batchtopk", "relu"]


class SAETrainConfig(Config):
    """How an SAE was (or will be) trained. Stored inside :class:`SAEConfig` after training."""

    steps: int = Field(2000, ge=1, description="optimiser steps")
    batch_size: int = Field(4096, ge=1, description="latent tokens per step")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up")
    decay_fraction: float = Field(
        0.2, ge=0, lt=1, description="final fraction of steps with linear learning-rate decay to 0"
    )
    l1_warmup_steps: int = Field(
        0, ge=0, description="relu only: the L1 coefficient ramps linearly from 0 over these steps"
    )
    grad_clip: float | None = Field(1.0, gt=0)
    dead_after_tokens: int = Field(
        100_000, ge=1, description="a unit that has not fired for this many tokens counts as dead"
    )
    threshold_momentum: float = Field(
        0.01, gt=0, le=1, description="batchtopk: EMA momentum of the inference threshold"
    )
    calibrate_threshold: bool = Field(
        True, description="batchtopk: re-estimate the threshold on the training data at the end"
    )
    e2e_steps: int = Field(
        0,
        ge=0,
        description="end-to-end fine-tune steps after reconstruction training (0: none; "
        "see models.sae.train.finetune_sae_e2e)",
    )
    e2e_batch_size: int = Field(128, ge=1, description="e2e: host-model examples per step")
    e2e_lr: float = Field(3e-4, gt=0, description="e2e: peak learning rate")
    e2e_kl_coeff: float = Field(
        1.0, ge=0, description="e2e: weight of KL(host outputs || outputs with the SAE spliced)"
    )
    e2e_balance: bool = Field(
        True,
        description="e2e: scale the KL term so that, on the first batch, it equals the FVU "
        "term (the KL weight is then e2e_kl_coeff * FVU_0 / KL_0, fixed for the run)",
    )
    e2e_fvu_coeff: float = Field(
        1.0, ge=0, description="e2e: weight of the reconstruction (FVU) term kept beside the KL"
    )
    seed: int = 0
    device: str = "cpu"


class SAEConfig(Config):
    """Architecture and hyper-parameters of one sparse autoencoder.

    ``architecture`` selects the class in the registry (:mod:`models.sae.registry`).
    """

    architecture: Architecture = "topk"
    d_in: int = Field(ge=1, description="dimension of one latent token")
    n_units: int = Field(ge=1, description="dictionary size")
    k: int = Field(16, ge=1, description="topk/batchtopk: active units per token (mean for batch)")
    l1_coeff: float = Field(0.05, ge=0, description="relu: L1 penalty on activations")
    center_input: bool = Field(True, description="subtract the training-data mean")
    scale_input: bool = Field(True, description="scale inputs so that E||x||^2 = d_in")
    aux_k: int | None = Field(None, ge=1, description="AuxK units (default d_in // 2); topk types")
    aux_coeff: float = Field(1 / 32, ge=0, description="AuxK loss weight; 0 disables it")
    seed: int = 0
    train: SAETrainConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.architecture in ("topk", "batchtopk") and self.k > self.n_units:
            raise ValueError(f"k={self.k} exceeds n_units={self.n_units}")
        return self

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or max(self.d_in // 2, 1), self.n_units)
