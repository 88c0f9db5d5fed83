"""Decoding tasks and their class vocabularies, shared by training, evaluation and serving.

- ``direction``: drifting-grating direction, 8 classes (0, 45, ..., 315 degrees), per trial.
- ``temporal_frequency``: 5 classes (1, 2, 4, 8, 15 Hz), per trial, only where the data has it.
- ``genetic``: genetic background (Cre line or genotype group), a per-session label; its classes
  are the labels seen in training, in sorted order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.data.recording import Recording

DIRECTIONS_DEG: tuple[float, ...] = tuple(float(d) for d in range(0, 360, 45))
TEMPORAL_FREQUENCIES_HZ: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0)
TASKS: tuple[str, ...] = ("direction", "temporal_frequency", "genetic")
TRIAL_TASKS: tuple[str, ...] = ("direction", "temporal_frequency")
UNKNOWN_GENETIC = "unknown"


def class_names(task: str, genetic_classes: Sequence[str] = ()) -> list[str]:
    if task == "direction":
        return [f"{d:g}deg" for d in DIRECTIONS_DEG]
    if task == "temporal_frequency":
        return [f"{f:g}Hz" for f in TEMPORAL_FREQUENCIES_HZ]
    if task == "genetic":
        return list(genetic_classes)
    raise KeyError(f"unknown task '{task}' (known: {', '.join(TASKS)})")


def _nearest(values: np.ndarray, grid: Sequence[float], tol: float) -> np.ndarray:
    """Index of the grid value each value matches within ``tol``; -1 for no match or NaN."""
    grid_a = np.asarray(grid, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, -1, dtype=np.int64)
    ok = np.isfinite(v)
    if ok.any():
        d = np.abs(v[ok, None] - grid_a[None, :])
        idx = d.argmin(axis=1)
        out[ok] = np.where(d[np.arange(idx.size), idx] <= tol, idx, -1)
    return out


def direction_labels(rec: Recording) -> np.ndarray:
    """Per-trial direction class (0..7); -1 for blank sweeps or off-grid directions."""
    d = np.mod(rec.trials.direction, 360.0)
    lab = _nearest(d, DIRECTIONS_DEG + (360.0,), tol=1.0)
    return np.where(lab == 8, 0, lab)


def temporal_frequency_labels(rec: Recording) -> np.ndarray:
    """Per-trial temporal-frequency class (0..4); -1 where the data has none."""
    return _nearest(rec.trials.temporal_frequency, TEMPORAL_FREQUENCIES_HZ, tol=0.05)


def trial_labels(rec: Recording) -> dict[str, np.ndarray]:
    """Per-trial class labels for the trial-level tasks this recording supports (-1 = none)."""
    out = {"direction": direction_labels(rec)}
    if rec.trials.has_temporal_frequency:
        out["temporal_frequency"] = temporal_frequency_labels(rec)
    return out


def genetic_classes(recordings: Sequence[Recording]) -> list[str]:
    """Sorted genetic-background labels across recordings (``unknown`` left out)."""
    return sorted({r.genetic_background for r in recordings} - {UNKNOWN_GENETIC})


def genetic_label(rec: Recording, classes: Sequence[str]) -> int:
    """Class index of a session's genetic background; -1 if unknown or not among ``classes``."""
    try:
        return list(classes).index(rec.genetic_background)
    except ValueError:
        return -1
