"""New-session adaptation (the POYO recipe): fit only a new session's unit and session embeddings.

Everything else (attention, feed-forward, heads, task/latent embeddings, and the rows of units and
sessions the model already knows) stays frozen and bit-for-bit unchanged. The new rows are fitted
from the direction (and temporal-frequency, where present) labels of a few labelled trials; the
genetic label of the new session is never used, so the genetic head's output on an adapted
session is a reading of its activity through the frozen model, not a lookup of its identity.

The new units' normalisation (median / robust scale) is computed label-free from all frames of
the new recording.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.data.recording import Recording
from models.decoder.checkpoint import Checkpoint
from models.decoder.config import LEGACY_TRAINING, TrainConfig
from models.decoder.model import Decoder
from models.decoder.predict import predict_trials
from models.decoder.windows import SessionData
from models.tasks import direction_labels, genetic_label


def _row_mask_hook(rows: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * rows.to(grad.dtype).unsqueeze(-1)

    return hook


def adapt_session(
    ckpt: Checkpoint,
    rec: Recording,
    trial_index,
    *,
    steps: int = 300,
    seed: int = 0,
    lr: float = 1e-2,
    batch_size: int = 64,
    progress: bool = False,
) -> Checkpoint:
    """A new checkpoint that knows ``rec``'s session, fitted from the labels of ``trial_index``.

    Only the new unit embeddings and the new session embedding are trained; the returned
    checkpoint shares nothing mutable with ``ckpt``.
    """
    from models.train import init_units_from_tuning, make_train_batch, set_unit_stats

    if ckpt.vocab.has_session(rec.session_id):
        raise ValueError(
            f"session '{rec.session_id}' is already in the model's vocabulary; nothing to adapt"
        )
    trials = np.atleast_1d(np.asarray(trial_index, dtype=np.int64))
    trials = trials[direction_labels(rec)[trials] >= 0]
    if trials.size == 0:
        raise ValueError("adaptation needs at least one trial with a direction label")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tcfg = ckpt.config.training or TrainConfig(**LEGACY_TRAINING)

    vocab = ckpt.vocab.copy()
    n_units_old, n_sessions_old = vocab.n_units, vocab.n_sessions
    vocab.add_recording(
        rec, genetic="", how=f"adapted from direction labels of {trials.size} trials"
    )
    model = Decoder(ckpt.model.config)
    model.load_state_dict({k: v.clone() for k, v in ckpt.model.state_dict().items()})
    model.grow(vocab.n_units, vocab.n_sessions)
    # normalisation of the new units only (known units keep theirs)
    new_units = np.flatnonzero(vocab.unit_index(rec.unit_ids) >= n_units_old)
    if new_units.size:
        new = rec.replace(
            traces=rec.traces[:, new_units], unit_ids=[rec.unit_ids[i] for i in new_units]
        )
        set_unit_stats(model, vocab, new)
        if tcfg.tuning_init > 0:  # as in training: from the labelled trials given here
            init_units_from_tuning(model, vocab, new, trials, tcfg.tuning_init)
    model.eval()  # no dropout: the frozen network behaves as at inference
    for p in model.parameters():
        p.requires_grad_(False)
    unit_rows = torch.zeros(vocab.n_units, dtype=torch.bool)
    unit_rows[n_units_old:] = True
    sess_rows = torch.zeros(vocab.n_sessions, dtype=torch.bool)
    sess_rows[n_sessions_old:] = True
    old_unit = model.unit_emb.weight[:n_units_old].detach().clone()
    old_sess = model.session_emb.weight[:n_sessions_old].detach().clone()
    params = [model.session_emb.weight]
    if unit_rows.any():
        params.append(model.unit_emb.weight)
    for p in params:
        p.requires_grad_(True)
    handles = [model.session_emb.weight.register_hook(_row_mask_hook(sess_rows))]
    if unit_rows.any():
        handles.append(model.unit_emb.weight.register_hook(_row_mask_hook(unit_rows)))
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)

    sd = SessionData.build(rec, vocab)
    scales = np.ones(vocab.n_units, dtype=np.float32)
    scales[sd.unit_index] = model.unit_scale[torch.as_tensor(sd.unit_index)].numpy()
    tasks = [t for t in model.task_names if t != "genetic" and t in sd.labels]
    frames = []
    for t in trials:
        lo = rec.trials.start[t] + tcfg.train_from_s
        hi = rec.trials.end[t]
        seg_end = rec.trials.extra.get("segment_end")
        if seg_end is not None and rec.pseudo_continuous:
            hi = min(hi, float(seg_end[t]))
        i0 = int(np.searchsorted(rec.timestamps, lo - 1e-9))
        i1 = max(int(np.searchsorted(rec.timestamps, hi - 1e-9)), i0 + 1)
        frames.extend((int(t), f) for f in range(i0, min(i1, rec.n_frames)))
    frames_a = np.asarray(frames)
    for _ in tqdm(range(steps), desc="adapt", disable=not progress):
        pick = frames_a[rng.integers(len(frames_a), size=batch_size)]
        items = [(0, int(t), int(f)) for t, f in pick]
        batch, labels = make_train_batch(items, [sd], ckpt.tokenizer, tcfg, rng, [scales])
        out = model.forward_batch(batch)
        loss = torch.zeros(())
        for task in tasks:
            y = labels[task]
            if bool((y >= 0).any()):
                loss = loss + F.cross_entropy(out[task], y, ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    with torch.no_grad():  # belt and braces: known rows exactly as before
        model.unit_emb.weight[:n_units_old] = old_unit
        model.session_emb.weight[:n_sessions_old] = old_sess
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    config = ckpt.config.model_copy(
        update={
            "decoder": model.config,
            "parent": str(ckpt.path) if ckpt.path else ckpt.config.parent,
            "sources": [*ckpt.config.sources, str(rec.source_path or rec.session_id)],
        }
    )
    splits = dict(ckpt.splits)
    return Checkpoint(model=model, config=config, vocab=vocab, splits=splits)


def balanced_subset(labels: np.ndarray, candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` trials from ``candidates``, spread evenly over the label classes (round robin)."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for c in np.unique(labels[candidates]):
        idx = candidates[labels[candidates] == c]
        by_class[int(c)] = list(idx[rng.permutation(idx.size)])
    out: list[int] = []
    while len(out) < n and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(out) < n:
                out.append(int(by_class[c].pop()))
    return np.sort(np.asarray(out, dtype=np.int64))


def adaptation_curve(
    ckpt: Checkpoint,
    rec: Recording,
    train_trials: np.ndarray,
    test_trials: np.ndarray,
    *,
    n_trials: Sequence[int] = (8, 16, 32, 64),
    repeats: int = 1,
    steps: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Test accuracy after adapting to ``rec`` from n labelled trials, for each n.

    Labelled trials are drawn class-balanced from ``train_trials``; accuracy is measured on
    ``test_trials``. The genetic accuracy of an adapted session is the honest (not lookup)
    figure: its embeddings were fitted without genotype labels.
    """
    y_dir = direction_labels(rec)
    g = genetic_label(rec, ckpt.vocab.genetic_classes)
    rows = []
    for n in n_trials:
        n_eff = min(int(n), len(train_trials))
        for r in range(repeats):
            sub = balanced_subset(y_dir, np.asarray(train_trials), n_eff, seed + 1000 * r + n_eff)
            ad = adapt_session(ckpt, rec, sub, steps=steps, seed=seed + r, progress=progress)
            probs = predict_trials(ad, rec, test_trials)
            row = {"n_trials": n_eff, "repeat": r, "n_test": len(test_trials)}
            row["direction_acc"] = float(
                (probs["direction"].argmax(1) == y_dir[test_trials]).mean()
            )
            if "temporal_frequency" in probs:
                from models.tasks import temporal_frequency_labels

                y_tf = temporal_frequency_labels(rec)[test_trials]
                ok = y_tf >= 0
                row["temporal_frequency_acc"] = float(
                    (probs["temporal_frequency"].argmax(1)[ok] == y_tf[ok]).mean()
                )
            if "genetic" in probs and g >= 0:
                row["genetic_acc"] = float((probs["genetic"].argmax(1) == g).mean())
                row["genetic_prob_true"] = float(probs["genetic"][:, g].mean())
            rows.append(row)
            if n_eff < n:
                break
        if n_eff < n:
            break
    return rows
