"""Causal windows over recordings, and batches for the decoder.

A window ends at a decoded time ``t`` and holds the frames in ``(t - window_s, t]``, as in a live
stream. In pseudo-continuous recordings (Park et al. 2024: trial snippets concatenated) a window
never reaches back before the start of the trial's own snippet (``trials.extra["segment_start"]``):
earlier frames belong to another trial.

Trial-level decoding pools windows ending at every frame from ``onset + decode_from_s`` to the
trial's end (`decode_frames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.data.recording import Recording
from models.decoder.model import batch_to_torch
from models.decoder.tokenizers import Tokenizer, collate
from models.decoder.vocab import Vocab
from models.tasks import genetic_label, trial_labels


def trial_lower_bounds(rec: Recording) -> np.ndarray:
    """Earliest time a window of each trial may see (snippet start, or -inf)."""
    seg = rec.trials.extra.get("segment_start")
    if seg is not None and rec.pseudo_continuous:
        return np.asarray(seg, dtype=np.float64)
    return np.full(len(rec.trials), -np.inf)


def decode_frames(rec: Recording, trial: int, from_s: float, post_s: float = 0.0) -> np.ndarray:
    """Frames whose times are decoded for a trial: ``[start + from_s, end + post_s]``.

    Never empty: a trial too short for that gets the last frame at or before its end.
    """
    t = rec.trials
    lo = t.start[trial] + from_s
    hi = t.end[trial] + post_s
    seg_end = t.extra.get("segment_end")
    if seg_end is not None and rec.pseudo_continuous:
        hi = min(hi, float(seg_end[trial]))
    ts = rec.timestamps
    i0 = int(np.searchsorted(ts, lo - 1e-9, side="left"))
    i1 = int(np.searchsorted(ts, hi - 1e-9, side="left"))  # frames strictly before hi
    if i1 <= i0:
        return np.array([max(int(rec.frame_index(t.end[trial] - 1e-9)), 0)])
    return np.arange(i0, i1)


@dataclass
class SessionData:
    """A recording prepared for one decoder vocabulary."""

    rec: Recording
    cells: np.ndarray  # columns of rec.traces whose units the model knows
    unit_index: np.ndarray  # their unit indices
    session_index: int
    labels: dict[str, np.ndarray]  # task -> per-trial class (-1 = none), genetic included
    lower: np.ndarray  # per trial: earliest time a window may see

    @classmethod
    def build(
        cls,
        rec: Recording,
        vocab: Vocab,
        *,
        session_id: str | None = None,
        genetic_classes: Sequence[str] | None = None,
    ) -> SessionData:
        idx = vocab.unit_index(rec.unit_ids)
        cells = np.flatnonzero(idx >= 0)
        if cells.size == 0:
            raise KeyError(
                f"none of the {rec.n_units} units of session '{rec.session_id}' is in the "
                "model's vocabulary; adapt the model to this session first"
            )
        labels = dict(trial_labels(rec))
        classes = vocab.genetic_classes if genetic_classes is None else genetic_classes
        labels["genetic"] = np.full(len(rec.trials), genetic_label(rec, classes), dtype=np.int64)
        return cls(
            rec=rec,
            cells=cells,
            unit_index=idx[cells],
            session_index=vocab.session_index(session_id or rec.session_id),
            labels=labels,
            lower=trial_lower_bounds(rec),
        )

    def tokenize(self, tokenizer: Tokenizer, end_frame: int, lower: float, end_time=None) -> dict:
        """Tokens of the window ending at frame ``end_frame`` (or at ``end_time`` if given)."""
        rec = self.rec
        ts = rec.timestamps
        t_end = float(ts[end_frame]) if end_time is None else float(end_time)
        lo_t = max(t_end - tokenizer.window_s, lower)
        lo = int(np.searchsorted(ts, lo_t, side="left"))
        lo = min(lo, end_frame)
        window = rec.traces[lo : end_frame + 1][:, self.cells]
        return tokenizer.tokenize(window, ts[lo : end_frame + 1], t_end, self.unit_index)


def build_batch(
    rec: Recording,
    end_times: Sequence[float] | np.ndarray,
    tokenizer: Tokenizer,
    vocab: Vocab,
    *,
    session_id: str | None = None,
    lower_times: Sequence[float] | np.ndarray | None = None,
    as_torch: bool = True,
) -> dict:
    """Batch of windows of ``rec`` ending at ``end_times`` (each sees only frames up to then).

    ``lower_times`` optionally bounds how far back each window may look (e.g. snippet starts).
    Units the vocabulary does not know are left out. Returns torch tensors (or numpy arrays).
    """
    sd = SessionData.build(rec, vocab, session_id=session_id)
    end_times = np.asarray(end_times, dtype=np.float64).reshape(-1)
    lowers = (
        np.full(end_times.shape, -np.inf)
        if lower_times is None
        else np.asarray(lower_times, dtype=np.float64)
    )
    samples = []
    for t, lo in zip(end_times, lowers, strict=True):
        f = max(int(rec.frame_index(t)), 0)
        samples.append(sd.tokenize(tokenizer, f, lo, end_time=t))
    batch = collate(samples, np.full(len(samples), sd.session_index))
    return batch_to_torch(batch) if as_torch else batch


def trial_windows(
    sd: SessionData, trials: np.ndarray, from_s: float, stride: int = 1
) -> tuple[list, list]:
    """(trial position, end frame) of every decoded window of the given trials (with
    ``stride`` > 1: every stride-th, counted back from the last, which is always kept)."""
    owners, frames = [], []
    for k, tr in enumerate(np.asarray(trials)):
        fr = decode_frames(sd.rec, int(tr), from_s)
        if stride > 1:
            fr = fr[::-1][::stride][::-1]
        owners.extend([k] * fr.size)
        frames.extend(fr.tolist())
    return owners, frames


@torch.no_grad()
def pooled_logits(
    model,
    tokenizer: Tokenizer,
    sd: SessionData,
    trials: np.ndarray,
    *,
    from_s: float = 1.0,
    batch_size: int = 256,
    stride: int = 1,
) -> dict[str, np.ndarray]:
    """Per task: mean log-probabilities over each trial's decoded windows, ``[n_trials, C]``
    (``stride``: see `trial_windows`)."""
    trials = np.asarray(trials, dtype=np.int64)
    owners, frames = trial_windows(sd, trials, from_s, stride)
    owners_a = np.asarray(owners)
    sums: dict[str, np.ndarray] = {}
    for s in range(0, len(frames), batch_size):
        fr = frames[s : s + batch_size]
        own = owners_a[s : s + batch_size]
        samples = [
            sd.tokenize(tokenizer, f, sd.lower[trials[o]]) for f, o in zip(fr, own, strict=True)
        ]
        batch = batch_to_torch(collate(samples, np.full(len(samples), sd.session_index)))
        out = model.forward_batch(batch)
        for task, logits in out.items():
            lp = torch.log_softmax(logits.float(), dim=-1).numpy()
            if task not in sums:
                sums[task] = np.zeros((trials.size, lp.shape[1]))
            np.add.at(sums[task], own, lp)
    counts = np.bincount(owners_a, minlength=trials.size)[:, None]
    return {t: v / np.maximum(counts, 1) for t, v in sums.items()}
