"""Sparse autoencoders on the decoder's latent stream: TopK, BatchTopK, ReLU+L1.

Typical use::

    cfg = SAEConfig(architecture="topk", d_in=64, n_units=512, k=16)
    sae, history = train_sae(latents, cfg, SAETrainConfig(steps=5000))
    sae.save("out/sae")                 # cfg.json + sae.safetensors
    sae = load_sae("out/sae")
    report = sae_metrics(sae, latents)  # L0, FVU, dead/dense fractions
    # end-to-end fine-tune through a frozen host: KL(host || host with the SAE spliced) + FVU
    sae, _ = finetune_sae_e2e(sae, windows, readout, SAETrainConfig(e2e_steps=300))
"""

from models.sae.base import SAEOutput, SparseAutoencoder, TrainStep
from models.sae.batchtopk import BatchTopKSAE, calibrate_threshold
from models.sae.config import SAEConfig, SAETrainConfig
from models.sae.metrics import SAEMetrics, SplicedEval, sae_metrics
from models.sae.registry import (
    available_architectures,
    build_sae,
    get_sae_class,
    load_sae,
    register_sae,
)
from models.sae.relu import ReLUSAE
from models.sae.topk import TopKSAE
from models.sae.train import (
    HostReadout,
    TrainHistory,
    collect_latents,
    finetune_sae_e2e,
    output_kl,
    train_sae,
)

__all__ = [
    "BatchTopKSAE",
    "HostReadout",
    "ReLUSAE",
    "SAEConfig",
    "SAEMetrics",
    "SAEOutput",
    "SAETrainConfig",
    "SparseAutoencoder",
    "SplicedEval",
    "TopKSAE",
    "TrainHistory",
    "TrainStep",
    "available_architectures",
    "build_sae",
    "calibrate_threshold",
    "collect_latents",
    "finetune_sae_e2e",
    "get_sae_class",
    "load_sae",
    "output_kl",
    "register_sae",
    "sae_metrics",
    "train_sae",
]
