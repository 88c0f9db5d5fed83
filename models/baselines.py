"""Baselines scored beside the decoder, on the same trial-level splits, in the same run.

Features (``trial_features``): each cell's mean dF/F over a window after stimulus onset, one row
per trial. By default the window is the trial's own ``[start, end)`` (0-2 s after onset for Park);
``window=(t0, t1)`` takes frames with ``start + t0 <= t < start + t1`` instead.

Models:
- ``logistic``: standardise, then ``LogisticRegression(C=0.1)`` (the README's reference recipe).
- ``mlp``: standardise, then a one-hidden-layer MLP (64 ReLU units, Adam, strong L2
  ``alpha=1.0``, 500 epochs, seeded). With ~100 training trials per session the L2 term is what
  keeps it from memorising; the settings are fixed a priori, not tuned per session.

Protocols:
- trial tasks (direction, temporal frequency): per session, fit on the split's train+val trials,
  predict its test trials;
- genetic background (a per-session label): leave-one-session-out. Cells differ between sessions,
  so per-cell features cannot be pooled; the across-session baselines read permutation-invariant
  population summaries of the same window (``population_features``: mean, spread and quantiles
  over cells of the per-cell mean response, and of the per-cell temporal s.d.). Each held-out
  session is predicted by a model fitted on the other sessions' train+val trials, with classes
  balanced (a within-session fit would be a lookup of session identity).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from models.data.recording import DataError, Recording
from models.splits import TrialSplit
from models.tasks import genetic_label, trial_labels

BASELINE_MODELS: tuple[str, ...] = ("logistic", "mlp")
Window = tuple[float, float] | None


def _window_frames(rec: Recording, trial_index, window: Window) -> list[np.ndarray]:
    t = rec.trials
    idx = np.arange(len(t)) if trial_index is None else np.asarray(trial_index, dtype=np.int64)
    if window is None:
        lo, hi = t.start[idx], t.end[idx]
    else:
        t0, t1 = float(window[0]), float(window[1])
        if not t1 > t0:
            raise DataError(f"window ({t0:g}, {t1:g}) s must have end > start", field="window")
        lo, hi = t.start[idx] + t0, t.start[idx] + t1
    eps = 1e-6 / rec.sampling_rate
    a = np.searchsorted(rec.timestamps, lo - eps, side="left")
    b = np.searchsorted(rec.timestamps, hi - eps, side="left")
    empty = b <= a
    if empty.any():
        k = int(np.argmax(empty))
        raise DataError(
            f"trial {int(idx[k])}: no frames in the feature window [{lo[k]:.6g}, {hi[k]:.6g}) s",
            source=rec.source_path or rec.session_id,
            field="trials",
        )
    return [rec.traces[i:j] for i, j in zip(a.tolist(), b.tolist(), strict=True)]


def trial_features(rec: Recording, trial_index=None, *, window: Window = None) -> np.ndarray:
    """Each cell's mean dF/F in the window after onset: ``[n_trials, n_units]`` float64."""
    frames = _window_frames(rec, trial_index, window)
    return np.stack([f.mean(axis=0) for f in frames]).astype(np.float64)


_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def population_features(rec: Recording, trial_index=None, *, window: Window = None) -> np.ndarray:
    """Permutation-invariant summaries over cells (comparable across sessions): ``[n, 12]``."""
    frames = _window_frames(rec, trial_index, window)
    m = np.stack([f.mean(axis=0) for f in frames]).astype(np.float64)
    sd = np.stack([f.std(axis=0) for f in frames]).astype(np.float64)
    return np.column_stack(
        [
            m.mean(axis=1),
            m.std(axis=1),
            np.quantile(m, _QUANTILES, axis=1).T,
            sd.mean(axis=1),
            sd.std(axis=1),
            np.quantile(sd, (0.5, 0.9), axis=1).T,
            (m > 0).mean(axis=1),
        ]
    )


def make_model(name: str, *, seed: int = 0, balanced: bool = False):
    """A fresh, unfitted sklearn pipeline for baseline ``name``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logistic":
        clf = LogisticRegression(
            C=0.1, max_iter=10_000, class_weight="balanced" if balanced else None
        )
    elif name == "mlp":
        clf = MLPClassifier(
            hidden_layer_sizes=(64,),
            alpha=1.0,
            learning_rate_init=1e-3,
            max_iter=500,
            random_state=seed,
        )
    else:
        raise KeyError(f"unknown baseline '{name}' (known: {', '.join(BASELINE_MODELS)})")
    return make_pipeline(StandardScaler(), clf)


def _balance(y: np.ndarray, seed: int) -> np.ndarray:
    """Indices that repeat each class's rows up to the largest class's count (deterministic)."""
    classes, counts = np.unique(y, return_counts=True)
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        extra = rng.choice(idx, size=counts.max() - idx.size, replace=True)
        out.append(np.concatenate([idx, extra]))
    return np.sort(np.concatenate(out))


def fit_predict(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    seed: int = 0,
    balanced: bool = False,
) -> np.ndarray:
    """Fit baseline ``name`` on the training rows and predict class labels for the test rows."""
    y_train = np.asarray(y_train)
    classes = np.unique(y_train)
    if classes.size == 0:
        raise ValueError("no training trials")
    if classes.size == 1:  # one class seen: any fitted model predicts it
        return np.full(len(x_test), classes[0])
    if balanced and name == "mlp":  # MLPClassifier has no class_weight: resample instead
        keep = _balance(y_train, seed)
        x_train, y_train = x_train[keep], y_train[keep]
    from threadpoolctl import threadpool_limits

    model = make_model(name, seed=seed, balanced=balanced)
    # one BLAS thread: these fits are tiny, and BLAS thread pools oversubscribe a shared CPU
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")  # ConvergenceWarning at the fixed epoch budget
        model.fit(x_train, y_train)
        return model.predict(x_test)


def trial_task_baselines(
    rec: Recording,
    split: TrialSplit,
    *,
    window: Window = None,
    seed: int = 0,
    models: Sequence[str] = BASELINE_MODELS,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per trial task: ``{model: (y_true, y_pred)}`` on the split's labelled test trials."""
    labels = trial_labels(rec)
    fit_idx = np.concatenate([split.train, split.val])
    x_all = trial_features(rec, window=window)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for task, y in labels.items():
        tr = fit_idx[y[fit_idx] >= 0]
        te = split.test[y[split.test] >= 0]
        if tr.size == 0 or te.size == 0:
            continue
        out[task] = {
            m: (y[te], fit_predict(m, x_all[tr], y[tr], x_all[te], seed=seed)) for m in models
        }
    return out


def genetic_baselines(
    recordings: Sequence[Recording],
    splits: dict[str, TrialSplit],
    classes: Sequence[str],
    *,
    window: Window = None,
    seed: int = 0,
    models: Sequence[str] = BASELINE_MODELS,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Leave-one-session-out genetic background: ``{session: {model: (y_true, y_pred)}}``.

    Only sessions with a known label among ``classes`` take part (as training or test sessions).
    """
    feats, fit_rows, test_rows, label = {}, {}, {}, {}
    for rec in recordings:
        g = genetic_label(rec, classes)
        if g < 0:
            continue
        sp = splits[rec.session_id]
        feats[rec.session_id] = population_features(rec, window=window)
        fit_rows[rec.session_id] = np.concatenate([sp.train, sp.val])
        test_rows[rec.session_id] = sp.test
        label[rec.session_id] = g
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for held in feats:
        others = [s for s in feats if s != held]
        if not others or test_rows[held].size == 0:
            continue
        x_tr = np.concatenate([feats[s][fit_rows[s]] for s in others])
        y_tr = np.concatenate([np.full(fit_rows[s].size, label[s]) for s in others])
        x_te = feats[held][test_rows[held]]
        y_te = np.full(x_te.shape[0], label[held])
        out[held] = {
            m: (y_te, fit_predict(m, x_tr, y_tr, x_te, seed=seed, balanced=True)) for m in models
        }
    return out


def cross_validated_accuracy(
    rec: Recording,
    model: str = "logistic",
    *,
    folds: int = 5,
    seed: int = 0,
    window: Window = None,
) -> float:
    """Stratified k-fold CV direction accuracy of a baseline on one session (a data check)."""
    from sklearn.model_selection import StratifiedKFold

    y = trial_labels(rec)["direction"]
    ok = np.flatnonzero(y >= 0)
    x, y = trial_features(rec, ok, window=window), y[ok]
    scores = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        scores.append(np.mean(fit_predict(model, x[tr], y[tr], x[te], seed=seed) == y[te]))
    return float(np.mean(scores))
