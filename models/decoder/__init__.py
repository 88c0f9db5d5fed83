"""Calcium POYO+-style decoder: tokenizers, model, checkpoints, prediction and adaptation.

Modules:
    config      typed configs (`DecoderConfig`, `TrainConfig`, `CheckpointConfig`)
    tokenizers  `patch` and `poyo` tokenizers (numpy core, shared with the service)
    model       the `Decoder` nn.Module (`encode` -> latents, `readout` -> logits per task)
    vocab       unit / session / genetic vocabularies (JSON)
    windows     causal windows over recordings and batch building
    checkpoint  `Checkpoint` directory (config.json, decoder.safetensors, vocab.json, ...)
    predict     trial-level class probabilities (`predict_trials`)
    adapt       new-session adaptation (`adapt_session`, `adaptation_curve`)
"""
