"""Trial-level predictions of a decoder checkpoint.

Pooling (documented contract): for each trial, the decoder decodes a causal window ending at
every frame from ``onset + decode_from_s`` (1.0 s by default; the training config's value) to the
trial's end; each window sees only the ``window_s`` of frames up to its end (and, for
pseudo-continuous Park data, nothing before the trial's own snippet). The per-window
log-probabilities are averaged over the trial's windows and renormalised (softmax of the mean
log-probability) to give the trial's class probabilities.
"""

from __future__ import annotations

import numpy as np
import torch

from models.data.recording import Recording
from models.decoder.checkpoint import Checkpoint
from models.decoder.windows import SessionData, pooled_logits


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decode_from_s(ckpt: Checkpoint) -> float:
    return ckpt.config.training.decode_from_s if ckpt.config.training is not None else 1.0


def predict_trials(
    ckpt: Checkpoint,
    rec: Recording,
    trial_index,
    *,
    session_id: str | None = None,
) -> dict[str, np.ndarray]:
    """Per task, class probabilities ``[n_trials, n_classes]`` for the given trials of ``rec``.

    Tasks: ``direction`` always; ``temporal_frequency`` when the model has it and the recording
    has temporal frequencies; ``genetic`` when the model has it (classes: ``ckpt.vocab.
    genetic_classes``). ``session_id`` selects the session embedding (default: the recording's
    own); it must be in the checkpoint's vocabulary (use `adapt_session` for a new session).
    Units the model does not know are ignored.
    """
    trials = np.atleast_1d(np.asarray(trial_index, dtype=np.int64))
    sd = SessionData.build(rec, ckpt.vocab, session_id=session_id)
    model = ckpt.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            lp = pooled_logits(model, ckpt.tokenizer, sd, trials, from_s=decode_from_s(ckpt))
    finally:
        model.train(was_training)
    out = {}
    for task, v in lp.items():
        if task == "temporal_frequency" and not rec.trials.has_temporal_frequency:
            continue
        out[task] = _softmax(v)
    return out
