"""Small synthetic recordings and models for the decoder tests."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.recording import Recording, Trials


def make_recording(
    session_id: str = "s0",
    n_cells: int = 12,
    n_trials: int = 16,
    fs: float = 16.0,
    genetic: str = "A",
    tf: bool = False,
    seed: int = 0,
) -> Recording:
    """Gratings: 2 s on + 1 s off per trial; cells tuned to direction (plus noise)."""
    rng = np.random.default_rng(seed)
    trial_s = 3.0
    n_frames = int(n_trials * trial_s * fs) + int(fs)
    t = np.arange(n_frames) / fs
    start = 0.5 + np.arange(n_trials) * trial_s
    end = start + 2.0
    direction = (np.arange(n_trials) % 8) * 45.0
    pref = rng.integers(0, 8, n_cells) * 45.0
    x = rng.normal(0, 0.3, (n_frames, n_cells))
    for s, e, d in zip(start, end, direction, strict=True):
        on = (t >= s) & (t < e)
        resp = np.exp(2 * (np.cos(np.deg2rad(d - pref)) - 1))
        x[on] += resp
    tfs = None
    if tf:
        tfs = np.array([1.0, 2.0, 4.0, 8.0, 15.0])[np.arange(n_trials) % 5]
    return Recording(
        traces=x.astype(np.float32),
        timestamps=t,
        unit_ids=[f"{session_id}/c{i}" for i in range(n_cells)],
        session_id=session_id,
        subject_id="m",
        genetic_background=genetic,
        sampling_rate=fs,
        trials=Trials.from_arrays(start, end, direction, tfs),
        source="test",
    )


@pytest.fixture
def small_recs():
    return [
        make_recording("s0", n_cells=10, genetic="A", seed=0),
        make_recording("s1", n_cells=7, genetic="B", fs=30.0, tf=True, seed=1),
    ]
