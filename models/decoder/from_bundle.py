"""Rebuild the PyTorch pieces of a model bundle: the decoder `Checkpoint` and the SAE.

A bundle (``models.bundle``) keeps ``decoder.safetensors``, ``config.json`` (``checkpoint``: the
`CheckpointConfig`; ``sae``: the `SAEConfig`), ``vocab.json`` and ``sae.safetensors``. These
functions read them through the opened `Bundle` (every byte re-checked against the manifest's
sha256; safetensors only, never pickle) and return a checkpoint / SAE equal to what was exported.

Bundles do not carry ``splits.json``: the returned checkpoint has no stored splits, and
`models.interpret.pipeline.checkpoint_splits` re-derives them from the training seed and
fractions in its config (deterministic by session id and seed, as `train` made them).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load as load_safetensors_bytes

from models.config import ConfigError
from models.decoder.checkpoint import Checkpoint
from models.decoder.config import CheckpointConfig
from models.decoder.model import Decoder
from models.decoder.vocab import Vocab


def _open(bundle):
    from models.bundle import Bundle

    return bundle if isinstance(bundle, Bundle) else Bundle.open(Path(bundle))


def checkpoint_from_bundle(bundle) -> Checkpoint:
    """The decoder checkpoint inside ``bundle`` (a `Bundle` or a bundle directory), eval mode."""
    b = _open(bundle)
    config = b.read_json("config.json")
    if "checkpoint" not in config:
        raise ConfigError(f"{b.path}/config.json: no 'checkpoint' section (not an export bundle)")
    ckpt_cfg = CheckpointConfig.model_validate(config["checkpoint"])
    if not b.has("vocab.json"):
        raise ConfigError(f"{b.path}: no vocab.json; cannot map unit and session ids")
    vocab = Vocab.from_dict(json.loads(b.read_bytes("vocab.json")))
    model = Decoder(ckpt_cfg.decoder)
    state = load_safetensors_bytes(b.read_bytes("decoder.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{b.path}: decoder weights do not match config.json ({e})") from None
    model.eval()
    return Checkpoint(model=model, config=ckpt_cfg, vocab=vocab, splits={}, path=None)


def sae_from_bundle(bundle):
    """The SAE inside ``bundle`` (eval mode)."""
    from models.sae import SAEConfig
    from models.sae.registry import build_sae

    b = _open(bundle)
    config = b.read_json("config.json")
    if "sae" not in config:
        raise ConfigError(f"{b.path}/config.json: no 'sae' section")
    sae = build_sae(SAEConfig.model_validate(config["sae"]))
    sae.load_state_dict(load_safetensors_bytes(b.read_bytes("sae.safetensors")))
    return sae.eval()


__all__ = ["checkpoint_from_bundle", "sae_from_bundle"]
