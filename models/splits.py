"""Held-out splits by trial (never by frame within a trial), stratified by condition.

Every model and baseline is trained and scored on the same splits. Splits are deterministic in
(session id, seed), so a recording gets the same split whatever else is in the corpus.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data.recording import Recording
from models.tasks import trial_labels


@dataclass(frozen=True)
class TrialSplit:
    """Trial indices of one session for training, validation (early stopping) and test."""

    session_id: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("train", "val", "test")}

    @classmethod
    def from_dict(cls, session_id: str, d: dict) -> TrialSplit:
        return cls(
            session_id, *(np.asarray(d[k], dtype=np.int64) for k in ("train", "val", "test"))
        )


def _session_seed(session_id: str, seed: int) -> int:
    h = hashlib.sha256(f"{session_id}:{seed}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def split_trials(
    rec: Recording, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> TrialSplit:
    """Stratified (by direction x temporal frequency) split of a session's labelled trials.

    Trials with no direction label (blank sweeps) are left out of every split.
    """
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= val_fraction, 0 < test_fraction and val + test < 1")
    labels = trial_labels(rec)
    strata = labels["direction"].copy()
    if "temporal_frequency" in labels:
        strata = strata * 16 + np.maximum(labels["temporal_frequency"], 0)
    usable = np.flatnonzero(labels["direction"] >= 0)
    rng = np.random.default_rng(_session_seed(rec.session_id, seed))
    # Each stratum is shuffled and its trials get evenly spaced keys in [0, 1) (with jitter);
    # sorting all trials by key and cutting at the global fractions keeps every stratum
    # represented in proportion, and gives validation trials even when strata are small
    # (5 trials per condition x 10% would round to none per stratum).
    key = np.empty(usable.size)
    for s in np.unique(strata[usable]):
        pos = np.flatnonzero(strata[usable] == s)
        pos = pos[rng.permutation(pos.size)]
        key[pos] = (np.arange(pos.size) + rng.random(pos.size)) / pos.size
    order = usable[np.argsort(key, kind="stable")]
    n_test = int(round(usable.size * test_fraction))
    n_val = int(round(usable.size * val_fraction))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return TrialSplit(rec.session_id, *(np.sort(x).astype(np.int64) for x in (train, val, test)))


def split_all(recordings, *, seed: int = 0, **kw) -> dict[str, TrialSplit]:
    return {r.session_id: split_trials(r, seed=seed, **kw) for r in recordings}


def save_splits(splits: dict[str, TrialSplit], path: str | Path) -> None:
    Path(path).write_text(json.dumps({k: v.to_dict() for k, v in splits.items()}, indent=1))


def load_splits(path: str | Path) -> dict[str, TrialSplit]:
    raw = json.loads(Path(path).read_text())
    return {k: TrialSplit.from_dict(k, v) for k, v in raw.items()}
