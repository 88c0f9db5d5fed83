"""Synthetic unit responses with planted tuning."""

import numpy as np


def tuned_population(
    n_tuned=8, n_untuned=24, reps=20, kappa=2.0, noise=0.3, seed=0, orientation_units=0
):
    """Trials x units activations: von Mises direction-tuned units (preferred directions on the
    45-degree grid), optional orientation-tuned units (two opposite peaks), and untuned units.
    Returns (acts [T, U], directions [T], preferred [n_tuned])."""
    rng = np.random.default_rng(seed)
    dirs = np.repeat(np.arange(0, 360, 45.0), reps)
    rng.shuffle(dirs)
    th = np.deg2rad(dirs)[:, None]
    pref = np.arange(n_tuned) * 45.0 % 360
    tuned = np.exp(kappa * (np.cos(th - np.deg2rad(pref)) - 1))
    ori = np.exp(kappa * (np.cos(2 * (th - np.deg2rad(pref[:orientation_units]))) - 1))
    base = rng.gamma(0.5, 0.5, size=(dirs.size, n_untuned))
    acts = np.concatenate([tuned, ori], 1) + noise * rng.standard_normal(
        (dirs.size, n_tuned + orientation_units)
    )
    acts = np.concatenate([np.maximum(acts, 0), base], 1)
    return acts, dirs, pref
