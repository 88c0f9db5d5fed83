"""Evaluate a decoder checkpoint beside baselines, on the same trial-level splits, in one run.

Per session and task: accuracy and balanced accuracy of the decoder, a logistic regression and a
small MLP on each cell's mean response after onset (`models.baselines`), and chance, each with a
bootstrap 95% interval over the session's test trials (`models.metrics`).

Splits: sessions the checkpoint was trained on are scored on the checkpoint's own test trials
(``splits.json``); other sessions are split with `models.splits.split_trials` using the
checkpoint's training seed and fractions. Baselines are fitted on each split's train+val trials.

Decoder on sessions it was not trained on: a fresh copy is adapted to the session
(`adapt_session`: only that session's unit/session embeddings are fitted, from the direction /
temporal-frequency labels of its train+val trials), then scored on its test trials.

Genetic background (a per-session label) is scored across sessions only:
- ``decoder``: sessions the checkpoint was NOT trained on, after adaptation from direction labels
  only (the honest figure); with ``loso_retrain=True`` also each training session, by retraining
  the decoder (same configs and splits) without it and adapting the result to it (strict
  leave-one-session-out);
- ``decoder`` also on a session the checkpoint already knows through adaptation (its vocabulary
  records that the embedding was fitted without the genotype label);
- ``decoder_within_session_upper_bound``: training sessions with their own embeddings. The model
  saw these sessions with their genetic labels in training (with the session embedding in the
  genetic query, unless the task is identity-blind), so this is an upper bound, never the result;
- ``decoder_reembedded``: training sessions with fresh unit and session embeddings refitted from
  direction labels only (ids renamed so nothing is looked up). The shared weights did see the
  session with its genotype label in training, so this is optimistic; kept apart from ``decoder``;
- ``logistic``/``mlp``: leave-one-session-out on population summaries (`genetic_baselines`).

Chance: the expected accuracy of a uniform random guess, 1/K for K classes (K = 8 directions,
5 temporal frequencies, or the number of genetic classes in the data); its ``ci95`` is the
central 95% range of such a guesser's accuracy on the same number of test trials (binomial).
Any constant predictor also scores 1/K balanced accuracy. ``majority`` (extra) is the accuracy of
always predicting the most frequent class of the fitting trials (for genetic: of the other
sessions' trials).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.baselines import BASELINE_MODELS, Window, genetic_baselines, trial_task_baselines
from models.data.recording import DataError, Recording
from models.metrics import (
    N_BOOTSTRAP,
    accuracy,
    balanced_accuracy,
    chance_interval,
    hierarchical_bootstrap_ci,
    pooled_bootstrap_ci,
    score,
)
from models.splits import TrialSplit, split_trials
from models.tasks import (
    TEMPORAL_FREQUENCIES_HZ,
    genetic_classes,
    genetic_label,
    trial_labels,
)

DECODER = "decoder"
UPPER_BOUND = "decoder_within_session_upper_bound"
REEMBEDDED = "decoder_reembedded"
MODEL_ORDER = (DECODER, "logistic", "mlp", "chance", "majority", REEMBEDDED, UPPER_BOUND)

CHANCE_DEFINITION = (
    "uniform random guess: accuracy 1/K for K classes; ci95 = central 95% range of a uniform "
    "guesser's accuracy on the same number of test trials (binomial). 'majority' = always "
    "predicting the most frequent class of the fitting trials."
)
CI_METHOD = (
    "percentile bootstrap over the session's test trials ({n} resamples, seeded); 'mean_ci95' is a "
    "hierarchical bootstrap of the mean over sessions (sessions resampled, then trials within)."
)
GENETIC_PROTOCOL = (
    "across sessions only. decoder: sessions whose embeddings were fitted without genotype labels "
    "(adapted from direction labels only; sessions not in the checkpoint, or every session with "
    "leave-one-session-out retraining). decoder_within_session_upper_bound: training sessions "
    "with their own embeddings (a lookup of session identity; upper bound only). "
    "decoder_reembedded: training sessions re-embedded from direction labels (shared weights saw "
    "the session's genotype; optimistic). logistic/mlp: leave-one-session-out on per-trial "
    "population summaries of the response window."
)
N_CLASSES = {"direction": 8, "temporal_frequency": len(TEMPORAL_FREQUENCIES_HZ)}


def _majority(y_fit: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    vals, counts = np.unique(y_fit, return_counts=True)
    return np.full(y_test.shape, vals[np.argmax(counts)])


def _fresh_identity(rec: Recording, tag: str = "reembed") -> Recording:
    """The same data under new session and unit ids (so a model must embed it from scratch)."""
    return rec.replace(
        session_id=f"{rec.session_id}#{tag}",
        unit_ids=[f"{u}#{tag}" for u in rec.unit_ids],
    )


class _Results:
    """Collects (y_true, y_pred) per task, session and model, and turns them into the JSON."""

    def __init__(self, n_boot: int, seed: int):
        self.n_boot, self.seed = n_boot, seed
        self.pairs: dict[str, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
        self.extra: dict[str, dict[str, dict[str, dict]]] = {}
        self.n_classes: dict[str, int] = {}

    def add(self, task: str, session: str, model: str, y_true, y_pred, **extra) -> None:
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        if y_true.size == 0:
            return
        self.pairs.setdefault(task, {}).setdefault(session, {})[model] = (y_true, y_pred)
        if extra:
            self.extra.setdefault(task, {}).setdefault(session, {})[model] = extra

    def to_dict(self) -> dict:
        tasks: dict[str, dict] = {}
        for task, sessions in self.pairs.items():
            k = self.n_classes[task]
            per_session: dict[str, dict] = {}
            for sid, models in sessions.items():
                entry: dict[str, dict] = {}
                n_test = 0
                for model, (yt, yp) in models.items():
                    entry[model] = score(yt, yp, n_boot=self.n_boot, seed=self.seed)
                    entry[model].update(self.extra.get(task, {}).get(sid, {}).get(model, {}))
                    n_test = max(n_test, yt.size)
                lo, hi = chance_interval(k, n_test)
                entry["chance"] = {
                    "accuracy": 1.0 / k,
                    "ci95": [lo, hi],
                    "balanced_accuracy": 1.0 / k,
                    "balanced_accuracy_ci95": [lo, hi],
                    "n_test": n_test,
                }
                per_session[sid] = {m: entry[m] for m in _ordered(entry)}
            mean, mean_bal, mean_ci, n_sess = {}, {}, {}, {}
            for model in _ordered({m for e in per_session.values() for m in e}):
                have = [s for s in per_session if model in per_session[s]]
                mean[model] = float(np.mean([per_session[s][model]["accuracy"] for s in have]))
                mean_bal[model] = float(
                    np.mean([per_session[s][model]["balanced_accuracy"] for s in have])
                )
                n_sess[model] = len(have)
                if model == "chance":
                    continue
                mean_ci[model] = list(
                    hierarchical_bootstrap_ci(
                        [sessions[s][model] for s in have], n_boot=self.n_boot, seed=self.seed
                    )
                )
            # every model's mean over the sessions the decoder was scored on (genetic: the
            # sessions it was not trained on), the like-for-like comparison when those differ
            dec_sessions = [s for s in per_session if DECODER in per_session[s]]
            same = {}
            if dec_sessions and len(dec_sessions) < len(per_session):
                for model in mean:
                    have = [s for s in dec_sessions if model in per_session[s]]
                    if len(have) == len(dec_sessions):
                        same[model] = float(
                            np.mean([per_session[s][model]["accuracy"] for s in have])
                        )
            pooled = {}
            for model in mean:
                have = [s for s in per_session if model in per_session[s] and s in sessions]
                if model == "chance" or not have:
                    continue
                pairs = [sessions[s][model] for s in have]
                yt = np.concatenate([t for t, _ in pairs])
                yp = np.concatenate([p for _, p in pairs])
                pooled[model] = {
                    "accuracy": accuracy(yt, yp),
                    "balanced_accuracy": balanced_accuracy(yt, yp),
                    "balanced_accuracy_ci95": list(
                        pooled_bootstrap_ci(pairs, n_boot=self.n_boot, seed=self.seed)
                    ),
                    "n_test": int(yt.size),
                    "n_sessions": len(have),
                }
            tasks[task] = {
                "n_classes": k,
                "mean": mean,
                "mean_balanced_accuracy": mean_bal,
                "mean_ci95": mean_ci,
                "mean_n_sessions": n_sess,
                **({"mean_on_decoder_sessions": same} if same else {}),
                "per_session": per_session,
                "pooled": pooled,
            }
        return {t: tasks[t] for t in ("direction", "temporal_frequency", "genetic") if t in tasks}


def _ordered(models) -> list[str]:
    models = set(models)
    return [m for m in MODEL_ORDER if m in models] + sorted(models - set(MODEL_ORDER))


def evaluate(
    checkpoint_path: str | Path,
    recordings: Sequence[Recording],
    *,
    seed: int = 0,
    n_boot: int = N_BOOTSTRAP,
    window: Window = None,
    adapt_steps: int = 300,
    reembed: bool = True,
    loso_retrain: bool = False,
    baselines: Sequence[str] = BASELINE_MODELS,
    progress: bool = False,
) -> dict:
    """Score a checkpoint and the baselines per session and task; returns the JSON-able report.

    ``seed`` drives the bootstrap, the MLP and the adaptation; splits of sessions the checkpoint
    was not trained on use the checkpoint's training seed (reported as ``split_seed``).
    """
    from models.decoder.checkpoint import Checkpoint

    ckpt = Checkpoint.load(checkpoint_path)
    return evaluate_checkpoint(
        ckpt,
        recordings,
        seed=seed,
        n_boot=n_boot,
        window=window,
        adapt_steps=adapt_steps,
        reembed=reembed,
        loso_retrain=loso_retrain,
        baselines=baselines,
        progress=progress,
        checkpoint_name=str(checkpoint_path),
    )


def _embedded_without_genotype(ckpt, session_id: str) -> bool:
    """True when the checkpoint's embedding of the session was fitted without its genotype
    label (an adapted session: ``vocab.session_genetic`` is empty for it)."""
    info = getattr(ckpt.vocab, "session_info", {}).get(session_id, {})
    used = getattr(ckpt.vocab, "session_genetic", {}).get(session_id)
    return used == "" and str(info.get("embedding_fit", "")).startswith("adapted")


def _check_recordings(recordings: Sequence[Recording]) -> None:
    if not recordings:
        raise DataError("no recordings to evaluate on")
    ids = [r.session_id for r in recordings]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise DataError(f"duplicate session ids: {', '.join(dup)}", field="session_id")


def evaluate_checkpoint(
    ckpt,
    recordings: Sequence[Recording],
    *,
    seed: int = 0,
    n_boot: int = N_BOOTSTRAP,
    window: Window = None,
    adapt_steps: int = 300,
    reembed: bool = True,
    loso_retrain: bool = False,
    baselines: Sequence[str] = BASELINE_MODELS,
    progress: bool = False,
    checkpoint_name: str | None = None,
) -> dict:
    """`evaluate` on an already loaded checkpoint (``.model``, ``.config``, ``.vocab``,
    ``.splits``); ``ckpt=None`` scores the baselines alone (splits from ``seed``)."""
    from models.decoder.adapt import adapt_session
    from models.decoder.predict import predict_trials

    _check_recordings(recordings)
    tcfg = ckpt.config.training if ckpt is not None else None
    split_seed = tcfg.seed if tcfg is not None else seed
    fractions = (
        {"val_fraction": tcfg.val_fraction, "test_fraction": tcfg.test_fraction}
        if tcfg is not None
        else {}
    )
    trained = {
        r.session_id
        for r in recordings
        if ckpt is not None and ckpt.vocab.has_session(r.session_id)
    }
    splits: dict[str, TrialSplit] = {}
    for r in recordings:
        if r.session_id in trained and r.session_id in ckpt.splits:
            splits[r.session_id] = ckpt.splits[r.session_id]
        else:
            splits[r.session_id] = split_trials(r, seed=split_seed, **fractions)

    res = _Results(n_boot, seed)
    res.n_classes.update(N_CLASSES)
    data_classes = genetic_classes(recordings)
    model_classes = list(ckpt.vocab.genetic_classes) if ckpt is not None else []
    model_tasks = dict(ckpt.config.decoder.tasks) if ckpt is not None else {}
    do_genetic = len(data_classes) >= 2
    if do_genetic:
        res.n_classes["genetic"] = len(data_classes)
    sessions_info: dict[str, dict] = {}

    def say(msg: str) -> None:
        if progress:
            import sys

            print(msg, file=sys.stderr, flush=True)

    def score_decoder(
        task_probs, rec, test, model_name, protocol, trial_tasks=True, gen=True, classes=None
    ):
        classes = model_classes if classes is None else list(classes)
        labels = trial_labels(rec)
        if trial_tasks:
            for task, y in labels.items():
                if task not in task_probs:
                    continue
                ok = y[test] >= 0
                yp = task_probs[task].argmax(1)[ok]
                res.add(task, rec.session_id, model_name, y[test][ok], yp, protocol=protocol)
        if gen and do_genetic and "genetic" in task_probs:
            g = genetic_label(rec, classes)
            if g < 0 or classes[g] not in data_classes:
                return
            probs = task_probs["genetic"]
            # map the model's class indices to the data's class indices for scoring
            g_data = data_classes.index(classes[g])
            pred_names = [classes[i] for i in probs.argmax(1)]
            yp = np.array([data_classes.index(n) if n in data_classes else -1 for n in pred_names])
            res.add(
                "genetic",
                rec.session_id,
                model_name,
                np.full(test.size, g_data),
                yp,
                protocol=protocol,
                mean_prob_true=float(probs[:, g].mean()),
                session_vote_correct=bool(np.log(probs + 1e-12).mean(0).argmax() == g),
            )

    for rec in recordings:
        sid = rec.session_id
        sp = splits[sid]
        fit = np.concatenate([sp.train, sp.val])
        info = {
            "trained_on": sid in trained,
            "genetic_background": rec.genetic_background,
            "n_units": rec.n_units,
            "n_train": int(sp.train.size),
            "n_val": int(sp.val.size),
            "n_test": int(sp.test.size),
            "split": "checkpoint" if sid in trained and sid in ckpt.splits else "split_trials",
        }
        sessions_info[sid] = info
        if sp.test.size == 0:
            info["note"] = "no test trials (too few trials per condition for the split)"
            continue
        # --- decoder
        if ckpt is None:
            pass
        elif sid in trained:
            say(f"[{sid}] decoder (trained session)")
            probs = predict_trials(ckpt, rec, sp.test)
            score_decoder(probs, rec, sp.test, DECODER, "trained session", gen=False)
            if _embedded_without_genotype(ckpt, sid):  # e.g. a checkpoint adapted to it
                score_decoder(
                    probs,
                    rec,
                    sp.test,
                    DECODER,
                    "own embedding, fitted without genotype labels",
                    trial_tasks=False,
                )
                continue_reembed = False
            else:
                score_decoder(probs, rec, sp.test, UPPER_BOUND, "own embedding", trial_tasks=False)
                continue_reembed = True
            if continue_reembed and reembed and do_genetic and "genetic" in model_tasks:
                say(f"[{sid}] decoder re-embedded from direction labels ({adapt_steps} steps)")
                fresh = _fresh_identity(rec)
                ad = adapt_session(ckpt, fresh, fit, steps=adapt_steps, seed=seed)
                probs = predict_trials(ad, fresh, sp.test)
                score_decoder(
                    probs,
                    rec,
                    sp.test,
                    REEMBEDDED,
                    "re-embedded from direction labels",
                    trial_tasks=False,
                )
        else:
            say(f"[{sid}] decoder adapted to new session ({adapt_steps} steps)")
            ad = adapt_session(ckpt, rec, fit, steps=adapt_steps, seed=seed)
            probs = predict_trials(ad, rec, sp.test)
            score_decoder(probs, rec, sp.test, DECODER, "adapted from direction labels")
            info["adapted_from_trials"] = int(fit.size)
        # --- baselines for trial tasks
        say(f"[{sid}] baselines")
        bl = trial_task_baselines(rec, sp, window=window, seed=seed, models=baselines)
        labels = trial_labels(rec)
        for task, models in bl.items():
            for name, (yt, yp) in models.items():
                res.add(task, sid, name, yt, yp)
            y = labels[task]
            fit_y = y[fit][y[fit] >= 0]
            yt = next(iter(models.values()))[0]
            res.add(task, sid, "majority", yt, _majority(fit_y, yt))

    if do_genetic:
        say("genetic baselines (leave-one-session-out)")
        gb = genetic_baselines(
            recordings, splits, data_classes, window=window, seed=seed, models=baselines
        )
        fit_counts = {
            r.session_id: (
                genetic_label(r, data_classes),
                splits[r.session_id].train.size + splits[r.session_id].val.size,
            )
            for r in recordings
            if genetic_label(r, data_classes) >= 0
        }
        for sid, models in gb.items():
            for name, (yt, yp) in models.items():
                res.add("genetic", sid, name, yt, yp, protocol="leave-one-session-out")
            others = np.concatenate([np.full(n, g) for s, (g, n) in fit_counts.items() if s != sid])
            yt = next(iter(models.values()))[0]
            res.add("genetic", sid, "majority", yt, _majority(others, yt))
        if loso_retrain and "genetic" in model_tasks:
            _loso_retrain(
                ckpt, recordings, splits, trained, res, score_decoder, adapt_steps, seed, say
            )

    tasks = res.to_dict()
    if "genetic" in tasks:
        tasks["genetic"]["protocol"] = GENETIC_PROTOCOL
        tasks["genetic"]["classes"] = data_classes
        if ckpt is not None and DECODER not in tasks["genetic"]["mean"]:
            tasks["genetic"]["note"] = (
                "no honest decoder figure: every session was in the checkpoint's training set. "
                "Add sessions it was not trained on, or use leave-one-session-out retraining."
            )
    return {
        "checkpoint": checkpoint_name
        or (str(ckpt.path) if ckpt is not None and ckpt.path else None),
        "seed": seed,
        "split_seed": split_seed,
        "n_bootstrap": n_boot,
        "feature_window_s": list(window) if window is not None else "trial [start, end)",
        "adapt_steps": adapt_steps,
        "chance_definition": CHANCE_DEFINITION,
        "ci_method": CI_METHOD.format(n=n_boot),
        "sessions": sessions_info,
        "tasks": tasks,
    }


def _loso_retrain(
    ckpt, recordings, splits, trained, res, score_decoder, adapt_steps, seed, say=print
):
    """Strict leave-one-session-out for the genetic task: retrain without each training session
    (same configs and splits), adapt the result to it from direction labels, score genetic."""
    from models.decoder.adapt import adapt_session
    from models.decoder.predict import predict_trials
    from models.train import train

    pool = [r for r in recordings if r.session_id in trained]
    if len(pool) < 2:
        return
    for held in pool:
        rest = [r for r in pool if r is not held]
        if len(genetic_classes(rest)) < 2:
            say(f"[{held.session_id}] leave-one-out: the rest has one genetic class; skipped")
            continue  # the retrained model would have no genetic head
        say(f"[{held.session_id}] retraining without it, then adapting ({adapt_steps} steps)")
        sub, _ = train(
            rest,
            None,
            decoder_config=ckpt.config.decoder,
            train_config=ckpt.config.training,
            splits={r.session_id: splits[r.session_id] for r in rest},
            progress=False,
        )
        sp = splits[held.session_id]
        ad = adapt_session(
            sub, held, np.concatenate([sp.train, sp.val]), steps=adapt_steps, seed=seed
        )
        probs = predict_trials(ad, held, sp.test)
        score_decoder(  # the retrained model's own genetic classes (they may differ)
            probs,
            held,
            sp.test,
            DECODER,
            "leave-one-session-out retrain + adaptation from direction labels",
            trial_tasks=False,
            classes=sub.vocab.genetic_classes,
        )


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
