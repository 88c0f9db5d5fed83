"""Classification metrics with bootstrap confidence intervals, shared by every evaluation.

- ``accuracy``: fraction of test trials predicted correctly.
- ``balanced_accuracy``: mean over the classes present in ``y_true`` of the per-class recall
  (any constant predictor scores 1/K on it, whatever the class balance).
- ``bootstrap_ci``: percentile bootstrap over test trials (seeded; 2000 resamples by default).
- ``hierarchical_bootstrap_ci``: for a mean over sessions: resample sessions with replacement,
  then trials within each drawn session, and average the per-session metric. It carries both
  sources of variance (which animals, which trials), which matters when sessions are few.
- ``pooled_bootstrap_ci``: the same two-level resampling for a metric on all sessions' trials
  pooled (used for balanced accuracy of the across-session genetic task).
- ``chance_interval``: the central 95% range of the accuracy of a uniform random guesser over
  K classes on n trials (binomial), i.e. how far from 1/K chance alone can move a score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]

N_BOOTSTRAP = 2000


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if y_true.size == 0:
        return float("nan")
    return float(np.mean(y_true == y_pred))


def balanced_accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if y_true.size == 0:
        return float("nan")
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


METRICS: dict[str, Metric] = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy}


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [a, 1.0 - a])
    return (float(lo), float(hi))


def _balanced_accuracy_rows(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each row of resampling indices ``idx`` [n_boot, n] at once."""
    classes, cls = np.unique(y_true, return_inverse=True)
    k = classes.size
    correct = (y_true == y_pred).astype(np.float64)
    rows = np.arange(idx.shape[0])[:, None] * k
    flat = (rows + cls[idx]).ravel()
    total = np.bincount(flat, minlength=idx.shape[0] * k).reshape(-1, k)
    hits = np.bincount(flat, weights=correct[idx].ravel(), minlength=idx.shape[0] * k)
    hits = hits.reshape(-1, k)
    present = total > 0
    recall = np.where(present, hits / np.maximum(total, 1), 0.0)
    return recall.sum(axis=1) / present.sum(axis=1)


def bootstrap_ci(
    y_true,
    y_pred,
    metric: Metric = accuracy,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` over trials resampled with replacement."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = y_true.size
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if metric is accuracy:  # vectorised fast paths
        vals = (y_true[idx] == y_pred[idx]).mean(axis=1)
    elif metric is balanced_accuracy:
        vals = _balanced_accuracy_rows(y_true, y_pred, idx)
    else:
        vals = np.array([metric(y_true[i], y_pred[i]) for i in idx])
    return _percentile_ci(vals, level)


def hierarchical_bootstrap_ci(
    per_session: Sequence[tuple[np.ndarray, np.ndarray]],
    metric: Metric = accuracy,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Interval of the mean over sessions of ``metric``: resample sessions, then their trials."""
    sessions = [(np.asarray(t), np.asarray(p)) for t, p in per_session if np.asarray(t).size]
    if not sessions:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    s = len(sessions)
    vals = np.empty(n_boot)
    correct = [t == p for t, p in sessions]
    for b in range(n_boot):
        drawn = rng.integers(0, s, size=s)
        scores = []
        for k in drawn:
            t, p = sessions[k]
            i = rng.integers(0, t.size, size=t.size)
            scores.append(correct[k][i].mean() if metric is accuracy else metric(t[i], p[i]))
        vals[b] = np.mean(scores)
    return _percentile_ci(vals, level)


def pooled_bootstrap_ci(
    per_session: Sequence[tuple[np.ndarray, np.ndarray]],
    metric: Metric = balanced_accuracy,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Interval of ``metric`` on the trials of all sessions pooled: resample sessions (within
    groups of sessions sharing their most common true label, so every class stays represented),
    then trials within each drawn session, pool them and score. For a per-session label (genetic
    background) scored across sessions, pooled balanced accuracy is what a constant guess
    cannot inflate."""
    sessions = [(np.asarray(t), np.asarray(p)) for t, p in per_session if np.asarray(t).size]
    if not sessions:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    modes = [np.unique(t, return_counts=True) for t, _ in sessions]
    modes = np.array([v[np.argmax(c)] for v, c in modes])
    groups = [np.flatnonzero(modes == m) for m in np.unique(modes)]
    vals = np.empty(n_boot)
    for b in range(n_boot):
        ts, ps = [], []
        drawn = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        for k in drawn:
            t, p = sessions[k]
            i = rng.integers(0, t.size, size=t.size)
            ts.append(t[i])
            ps.append(p[i])
        vals[b] = metric(np.concatenate(ts), np.concatenate(ps))
    return _percentile_ci(vals, level)


def chance_interval(n_classes: int, n_trials: int, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` range of a uniform random guesser's accuracy on ``n_trials`` trials."""
    from scipy.stats import binom

    if n_trials <= 0 or n_classes <= 0:
        return (float("nan"), float("nan"))
    a = (1.0 - level) / 2.0
    p = 1.0 / n_classes
    lo, hi = binom.ppf([a, 1.0 - a], n_trials, p)
    return (float(lo / n_trials), float(hi / n_trials))


def score(
    y_true,
    y_pred,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, object]:
    """Accuracy and balanced accuracy with bootstrap 95% intervals, and the test-set size."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "ci95": list(bootstrap_ci(y_true, y_pred, accuracy, n_boot=n_boot, seed=seed)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "balanced_accuracy_ci95": list(
            bootstrap_ci(y_true, y_pred, balanced_accuracy, n_boot=n_boot, seed=seed)
        ),
        "n_test": int(y_true.size),
    }
