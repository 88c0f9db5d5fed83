"""`run_job`: one retraining job from recorded sessions to a gated candidate in the registry.

Steps (each reported through ``progress(fraction, text)``; ``cancelled()`` is checked between
steps, and inside the training loops, and raises `JobCancelled`; nothing is promoted by a
cancelled job, and a job cancelled before its publish step leaves no version in the registry):

1. **serving**: the model's current version in ``<home>/registry`` (the parent); its decoder
   checkpoint and SAE are rebuilt from the bundle (`models.decoder.from_bundle`).
2. **data**: the job's sessions (`load_session`: durable frame record + ``trials.jsonl``), each
   split by trial (`models.splits.split_trials`, seed ``spec.seed``, 10 % validation, 20 % test,
   stratified; never frames of one trial on both sides). The test trials are held out of every
   fitting step (embeddings, decoder, SAE, labels) and are what the candidate and the serving
   version are compared on. For ``sae_refit`` and ``finetune`` also the serving model's own
   training sessions where they can be found (`original_recordings`), with the serving model's
   own splits (re-derived from its training seed), so their test trials stay held out too.
3. **train** (by kind):

   - ``adapt``: the POYO recipe (`models.decoder.adapt.adapt_session`): only the new sessions'
     unit and session embeddings are fitted, from the direction (and temporal-frequency) labels
     of their training + validation trials; every other weight is bit-for-bit the serving one.
     The serving SAE is kept: the latent stream of the sessions the model already knew is
     unchanged, so its units and their labels carry over to the candidate ("labels move with
     versions"). Its SAE metrics are measured again on the new sessions' held-out latents, and
     the units are re-labelled on the new sessions (with both controls) as a check that is
     reported, not used to replace the carried labels. Steps: ``100 x epochs`` (default 2).
     Sessions the model already knows are refused (use ``finetune``). Single worker, inline.
   - ``sae_refit``: the decoder is frozen (the serving weights; sessions it does not know first
     get their embeddings adapted as above, since the SAE needs their latents); a new SAE is
     trained on its latents of the training trials of every available session (the serving
     model's sources that can be found + the job's sessions) and the units are labelled with
     both controls (`models.interpret.pipeline.run_interpret`, cheap settings). SAE steps:
     ``300 x epochs`` (default 1). Inline.
   - ``finetune``: new sessions' embeddings are first adapted (a warm start for their fresh
     rows), then every decoder parameter is fine-tuned from the serving weights on the training
     trials of all available sessions (`service.retrain.distributed.finetune_decoder`: Ray Train
     TorchTrainer with ``spec.workers`` workers when > 1, else inline); then the SAE is refitted
     and the units relabelled as in ``sae_refit``. Epochs: ``epochs`` (default 3), at half the
     serving model's learning rate.
4. **evaluate**: trial-level accuracy (pooled windows, as ``predict_trials``) of the candidate
   and of the serving version on the held-out trials of the job's sessions, per task with
   labels. The serving version decodes a session as the service would: its own embedding if it
   knows the session, else the embedding of the known session sharing the most unit ids, with
   unknown cells masked; a session with no known cell cannot be decoded by it and each of its
   trials counts as wrong (``n_decoded`` says how many were decodable).
5. **gates** (`GateConfig`, printed in the result): per task in ``gates.tasks``, candidate >=
   serving + ``min_accuracy_delta``; SAE FVU <= ``max_fvu`` and dead fraction <=
   ``max_dead_fraction`` (held-out latents). ``decision`` states every rule with its numbers.
6. **export + publish**: the candidate checkpoint + SAE + units are exported
   (`models.export.export_bundle`: one ONNX graph, parity against PyTorch checked on simulated
   and real windows of the job's sessions) and published as the next version of ``spec.model``
   with ``parent`` = the serving version and provenance (``retrain``: job id, kind, sessions with
   the sha256 of each record, the original sources used and those unavailable, the gates and
   the decision) beside the exporter's provenance. ``metrics.json`` holds the job's evaluation.
7. **promote** (`Registry.promote`) only if every gate passed, ``spec.promote`` is true and the
   serving version is still the parent (a version promoted by someone else meanwhile is never
   overridden).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.retrain.data import load_session, original_recordings
from service.retrain.jobs import GateConfig, JobCancelled, JobSpec, JobStore

Progress = Callable[[float, str], None]

#: default ``epochs`` per kind (see the module docstring for what an epoch means per kind)
DEFAULT_EPOCHS = {"adapt": 2, "sae_refit": 1, "finetune": 3}
ADAPT_STEPS_PER_EPOCH = 100
SAE_STEPS_PER_EPOCH = 300
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2


def retrain_interpret_config(seed: int, steps: int):
    """Cheap interpret settings for a job (one SAE seed, 100 permutations, both controls)."""
    from service.home import cheap_interpret_config

    return cheap_interpret_config(seed, steps)


class _Steps:
    """Progress, cancellation and timing of the steps of a job."""

    def __init__(self, progress: Progress, cancelled: Callable[[], bool]):
        self.progress = progress
        self.cancelled = cancelled
        self.durations: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._name: str | None = None
        self._start = 0.0

    def check(self) -> None:
        if self.cancelled():
            raise JobCancelled(f"cancelled before step '{self._name or 'start'}' finished")

    def begin(self, name: str, fraction: float, text: str) -> None:
        self.end()
        self.check()
        self._name, self._start = name, time.perf_counter()
        self.progress(fraction, text)

    def end(self) -> None:
        if self._name is not None:
            self.durations[f"{self._name}_s"] = round(time.perf_counter() - self._start, 2)
            self._name = None

    def sub(self, lo: float, hi: float) -> Progress:
        """A progress callback mapping 0..1 of a sub-step onto lo..hi of the job."""
        return lambda f, text: self.progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), text)

    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 2)


# ---------------------------------------------------------------------------------------------
# evaluation


def _borrowed_session(vocab, rec) -> str | None:
    """The session embedding the service would use for ``rec`` (see `service.engine`)."""
    if vocab.has_session(rec.session_id):
        return rec.session_id
    idx = vocab.unit_index(rec.unit_ids)
    known = {u for u, i in zip(rec.unit_ids, idx, strict=True) if i >= 0}
    if not known:
        return None
    overlap = [len(known.intersection(vocab.session_units.get(s, ()))) for s in vocab.session_ids]
    return vocab.session_ids[int(np.argmax(overlap))]


def evaluate_on_trials(ckpt, rec, trials: np.ndarray, tasks: Sequence[str]) -> dict[str, dict]:
    """Per task: accuracy of ``ckpt`` on ``trials`` of ``rec`` decoded as the service would."""
    from models.decoder.predict import predict_trials
    from models.tasks import trial_labels

    labels = trial_labels(rec)
    sid = _borrowed_session(ckpt.vocab, rec)
    probs = predict_trials(ckpt, rec, trials, session_id=sid) if sid is not None else {}
    out = {}
    for task in tasks:
        if task not in labels:
            continue
        y = labels[task][trials]
        ok = y >= 0
        if not ok.any():
            continue
        n = int(ok.sum())
        if task in probs:
            correct = int((probs[task].argmax(1)[ok] == y[ok]).sum())
            n_dec = n
        else:
            correct, n_dec = 0, 0
        out[task] = {
            "accuracy": correct / n,
            "correct": correct,
            "n_trials": n,
            "n_decoded": n_dec,
            "embedding": "own" if sid == rec.session_id else (f"borrowed:{sid}" if sid else "none"),
        }
    return out


def compare(serving, candidate, recs, splits, tasks: Sequence[str]) -> dict[str, dict]:
    """Serving vs candidate accuracy on the held-out (test) trials of ``recs``, per task: the
    pooled figure over every session and the figure per session."""
    out: dict[str, dict] = {}
    for rec in recs:
        test = np.asarray(splits[rec.session_id].test, dtype=np.int64)
        if test.size == 0:
            continue
        s = evaluate_on_trials(serving, rec, test, tasks)
        c = evaluate_on_trials(candidate, rec, test, tasks)
        for task in c:
            e = out.setdefault(
                task,
                {
                    "serving": {"correct": 0, "n_decoded": 0},
                    "candidate": {"correct": 0},
                    "n_trials": 0,
                    "per_session": {},
                },
            )
            sv = s.get(task, {"correct": 0, "n_decoded": 0, "embedding": "none"})
            e["n_trials"] += c[task]["n_trials"]
            e["serving"]["correct"] += sv["correct"]
            e["serving"]["n_decoded"] += sv["n_decoded"]
            e["candidate"]["correct"] += c[task]["correct"]
            e["per_session"][rec.session_id] = {
                "n_trials": c[task]["n_trials"],
                "serving": sv["correct"] / c[task]["n_trials"],
                "serving_embedding": sv["embedding"],
                "candidate": c[task]["accuracy"],
            }
    for task, e in out.items():
        n = max(e["n_trials"], 1)
        e["chance"] = 1.0 / candidate.tasks[task]
        e["serving"]["accuracy"] = e["serving"]["correct"] / n
        e["candidate"]["accuracy"] = e["candidate"]["correct"] / n
        e["delta"] = e["candidate"]["accuracy"] - e["serving"]["accuracy"]
    return out


def apply_gates(gates: GateConfig, evaluation: dict, sae: dict) -> tuple[bool, list[dict], str]:
    """(passed, one entry per rule with its numbers, decision text)."""
    rules = []
    for task in gates.tasks:
        e = evaluation.get(task)
        if e is None:
            rules.append(
                {
                    "rule": f"{task} accuracy",
                    "passed": False,
                    "text": f"{task}: no labelled held-out trials to compare on",
                }
            )
            continue
        s, c = e["serving"]["accuracy"], e["candidate"]["accuracy"]
        need = s + gates.min_accuracy_delta
        ok = c >= need - 1e-12
        rules.append(
            {
                "rule": f"{task} accuracy",
                "passed": ok,
                "candidate": c,
                "serving": s,
                "required": need,
                "n_trials": e["n_trials"],
                "text": f"{task} accuracy on {e['n_trials']} held-out trials: candidate {c:.3f} "
                f"{'>=' if ok else '<'} serving {s:.3f} + {gates.min_accuracy_delta:+.3f} "
                f"= {need:.3f}",
            }
        )
        if gates.min_over_chance is not None:
            need = e["chance"] + gates.min_over_chance
            ok = c >= need - 1e-12
            rules.append(
                {
                    "rule": f"{task} over chance",
                    "passed": ok,
                    "candidate": c,
                    "chance": e["chance"],
                    "required": need,
                    "n_trials": e["n_trials"],
                    "text": f"{task} accuracy: candidate {c:.3f} {'>=' if ok else '<'} chance "
                    f"{e['chance']:.3f} + {gates.min_over_chance:+.3f} = {need:.3f}",
                }
            )
    fvu, dead = sae.get("fvu"), sae.get("dead_fraction")
    ok = fvu is not None and fvu <= gates.max_fvu
    rules.append(
        {
            "rule": "sae fvu",
            "passed": ok,
            "value": fvu,
            "max": gates.max_fvu,
            "text": f"SAE FVU {fvu:.3f} {'<=' if ok else '>'} {gates.max_fvu:.3f}",
        }
    )
    ok = dead is not None and dead <= gates.max_dead_fraction
    rules.append(
        {
            "rule": "sae dead fraction",
            "passed": ok,
            "value": dead,
            "max": gates.max_dead_fraction,
            "text": f"SAE dead units {dead:.3f} {'<=' if ok else '>'} "
            f"{gates.max_dead_fraction:.3f}",
        }
    )
    passed = all(r["passed"] for r in rules)
    failed = [r["text"] for r in rules if not r["passed"]]
    head = "PASS: every gate holds" if passed else f"REFUSED: {len(failed)} gate(s) failed"
    text = head + " | " + "; ".join(("ok  " if r["passed"] else "FAIL ") + r["text"] for r in rules)
    return passed, rules, text


# ---------------------------------------------------------------------------------------------
# kinds


def _adapt_new(ckpt, recs, splits, steps: int, seed: int, check: Callable[[], None], say):
    """Adapt the embeddings of every session of ``recs`` the checkpoint does not know."""
    from models.decoder.adapt import adapt_session

    out = dataclasses.replace(ckpt, splits=dict(ckpt.splits))
    adapted = []
    for i, rec in enumerate(recs):
        check()
        if out.vocab.has_session(rec.session_id):
            continue
        sp = splits[rec.session_id]
        fit = np.sort(np.concatenate([sp.train, sp.val]))
        say(i / max(len(recs), 1), f"adapting embeddings of {rec.session_id} ({fit.size} trials)")
        out = adapt_session(out, rec, fit, steps=steps, seed=seed + i)
        adapted.append(rec.session_id)
    out.splits.update({r.session_id: splits[r.session_id] for r in recs})
    return out, adapted


def _sae_summary(m) -> dict:
    return {
        "l0": float(m.l0),
        "fvu": float(m.fvu),
        "dead_fraction": float(m.dead_fraction),
        "dense_fraction": float(m.dense_fraction),
        "n_tokens": int(m.n_tokens),
    }


def relabel_with_sae(ckpt, recs, sae, icfg) -> dict:
    """SAE metrics (held-out latents) and unit labels with both controls of a *given* SAE on
    ``recs`` (an adapt job: the serving SAE, carried over, checked on the new sessions)."""
    from models.decoder.predict import decode_from_s
    from models.interpret.ablation import SparseActs, encode_windows
    from models.interpret.labels import LabelConfig, run_labelling, trial_activations
    from models.interpret.pipeline import (
        _train_one,
        build_trials,
        label_variables,
        random_init_decoder,
    )
    from models.sae import sae_metrics

    sessions, trials, table, _ = build_trials(ckpt, recs)
    rand = random_init_decoder(ckpt, icfg.seed + icfg.random_init_seed)
    ws = encode_windows(
        [ckpt.model, rand],
        ckpt.tokenizer,
        sessions,
        trials,
        from_s=decode_from_s(ckpt),
        batch_size=icfg.encode_batch_size,
        stride=icfg.window_stride,
    )
    split = table.split
    ws_test, ws_train = ws.select(split == "test"), ws.select(split == "train")
    fit = split != "test"
    ws_label = ws.select(fit)
    d_in = ws.latents[0].shape[-1]
    metrics = sae_metrics(sae, ws_test.latents[0].reshape(-1, d_in))
    control = _train_one(ws_train.latents[1], ws_test.latents[1], icfg, d_in, icfg.seed)

    def acts(model_sae, lat):
        wm = SparseActs.compute(model_sae, lat).window_mean()
        return trial_activations(wm, ws_label.owner, ws_label.n_trials)

    a = acts(sae, ws_label.latents[0])
    c = acts(control.sae, ws_label.latents[1])
    variables = label_variables(table.subset(fit), [t for t in ckpt.tasks if t != "genetic"])
    lcfg = LabelConfig(
        alpha=icfg.alpha, n_perm=icfg.n_perm, control_quantile=icfg.control_quantile, seed=icfg.seed
    )
    res = run_labelling(a, c, variables, lcfg)
    lab = res.summary()
    return {
        "sae": _sae_summary(metrics) | {"measured_on": "held-out trials of the job's sessions"},
        "labels": {v: d["n_labelled"] for v, d in lab.items()},
        "controls": {
            "random_init": {v: d["random_init_n_significant"] for v, d in lab.items()},
            "shuffled": {v: d["shuffled_n_significant"] for v, d in lab.items()},
        },
        "n_label_trials": int(fit.sum()),
        "firing_rate": metrics.firing_rate,
    }


def _interpret(ckpt, recs, icfg, out: Path) -> tuple[Path, dict]:
    """run_interpret + write_outputs; returns (interpret dir, summary for the job result)."""
    from models.interpret.pipeline import run_interpret, write_outputs

    res = run_interpret(ckpt, recs, icfg)
    write_outputs(res, out, report=False)
    s = res.summary
    return out, {
        "sae": {k: s["sae"][k] for k in ("l0", "fvu", "dead_fraction", "dense_fraction")}
        | {"n_units": s["sae"]["n_units"], "measured_on": s["sae"]["measured_on"]},
        "labels": s["labels"],
        "controls": {k: s["controls"][k] for k in ("random_init", "shuffled")},
        "accuracy_spliced": {
            t: {k: v.get(k) for k in ("decoder", "spliced", "recovered", "n_trials")}
            for t, v in s["accuracy"].items()
        },
        "sessions": s["data"]["sessions"],
        "n_label_trials": s["data"]["n_label_trials"],
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------------------------------
# the job


def run_job(
    spec: JobSpec,
    *,
    home: str | Path,
    job_id: str,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    cpus_per_worker: float = 0.5,
) -> dict:
    """Run one job (module docstring); returns the result dict (also what the job record's
    ``result`` holds; ``parent_version``, ``candidate_version``, ``promoted`` and ``decision``
    are in it too). Raises `JobCancelled` if ``cancelled()`` turns true before the promotion."""
    import torch

    from models.decoder.config import TrainConfig
    from models.decoder.from_bundle import checkpoint_from_bundle, sae_from_bundle
    from models.export import export_bundle
    from models.interpret.pipeline import checkpoint_splits
    from models.registry import Registry
    from models.splits import split_trials

    if not isinstance(spec, JobSpec):
        spec = JobSpec.model_validate(spec)
    home = Path(home)
    steps = _Steps(progress or (lambda f, m: None), cancelled or (lambda: False))
    epochs = spec.epochs or DEFAULT_EPOCHS[spec.kind]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}.", dir=_work_root(home)))
    try:
        # 1. serving ------------------------------------------------------------------------
        steps.begin("load_serving", 0.01, f"opening the serving version of '{spec.model}'")
        reg = Registry(home / "registry")
        parent = reg.current(spec.model)
        if parent is None:
            raise ValueError(f"model '{spec.model}' has no current version in {reg.root}")
        bundle = reg.open(spec.model, parent)
        serving = checkpoint_from_bundle(bundle)
        serving_sae = sae_from_bundle(bundle)

        # 2. data ---------------------------------------------------------------------------
        steps.begin("load_data", 0.04, f"loading {len(spec.session_ids)} recorded session(s)")
        if len(set(spec.session_ids)) != len(spec.session_ids):
            raise ValueError(f"duplicate session ids in the job: {spec.session_ids}")
        recs = [load_session(home, sid) for sid in spec.session_ids]
        splits = {
            r.session_id: split_trials(
                r, seed=spec.seed, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION
            )
            for r in recs
        }
        for r in recs:
            sp = splits[r.session_id]
            if len(sp.train) == 0 or len(sp.test) == 0:
                raise ValueError(
                    f"session {r.session_id!r} has too few labelled trials ({len(r.trials)}) "
                    "for a training and a held-out split"
                )
        originals, files_used, unavailable = [], [], []
        if spec.kind in ("sae_refit", "finetune"):
            job_ids = set(spec.session_ids)
            originals, files_used, unavailable = original_recordings(
                serving.config.sources, [s for s in serving.vocab.session_ids if s not in job_ids]
            )
        orig_splits = {r.session_id: checkpoint_splits(serving, r) for r in originals}
        data_info = {
            "job_sessions": {
                r.session_id: {
                    "frames": r.n_frames,
                    "cells": r.n_units,
                    "trials": len(r.trials),
                    "split": {
                        k: len(getattr(splits[r.session_id], k)) for k in ("train", "val", "test")
                    },
                    "record_sha256": r.metadata["retrain"]["record_sha256"],
                    "trials_outside_record": r.metadata["retrain"]["trials_outside_record"],
                    "known_to_serving": serving.vocab.has_session(r.session_id),
                }
                for r in recs
            },
            "original_sessions": [r.session_id for r in originals],
            "original_files": files_used,
            "original_sources_unavailable": unavailable,
        }

        # 3. train --------------------------------------------------------------------------
        icfg = retrain_interpret_config(spec.seed, SAE_STEPS_PER_EPOCH * epochs)
        train_info: dict[str, Any] = {"epochs": epochs}
        units_json: Path | None = None
        interpret_dir: Path | None = None
        if spec.kind == "adapt":
            known = [r.session_id for r in recs if serving.vocab.has_session(r.session_id)]
            if known:
                raise ValueError(
                    f"session(s) {known} are already known to {spec.model} {parent}; adaptation "
                    "fits new sessions only (use a finetune job to retrain on them)"
                )
            n_steps = ADAPT_STEPS_PER_EPOCH * epochs
            steps.begin("adapt", 0.08, f"adapting unit + session embeddings ({n_steps} steps)")
            candidate, adapted = _adapt_new(
                serving, recs, splits, n_steps, spec.seed, steps.check, steps.sub(0.08, 0.5)
            )
            train_info.update({"adapted_sessions": adapted, "steps_per_session": n_steps})
            steps.begin("sae_metrics_labels", 0.5, "serving SAE on the new sessions + labels")
            check = relabel_with_sae(candidate, recs, serving_sae, icfg)
            fr = check.pop("firing_rate")
            sae_report = {
                **check,
                "sae_source": f"carried over from {parent}",
                "labels_source": f"carried over from {parent} (same SAE units)",
                "relabel_on_job_sessions": {
                    k: check[k] for k in ("labels", "controls", "n_label_trials")
                },
            }
            sae_dir = serving_sae.save(work / "sae")
            units_json = work / "units.json"
            units = bundle.read_json("units.json")
            units["retrain_check"] = _jsonable(
                {
                    "job_id": job_id,
                    "parent": parent,
                    "firing_rate_on_job_sessions": fr,
                    **sae_report["relabel_on_job_sessions"],
                }
            )
            units_json.write_text(json.dumps(units, indent=1))
        else:
            frac = 0.08
            candidate = dataclasses.replace(serving, splits=dict(serving.splits))
            if spec.kind == "finetune" or any(
                not serving.vocab.has_session(r.session_id) for r in recs
            ):
                n_steps = ADAPT_STEPS_PER_EPOCH * DEFAULT_EPOCHS["adapt"]
                steps.begin("adapt", frac, "adapting embeddings of the new sessions")
                candidate, adapted = _adapt_new(
                    serving, recs, splits, n_steps, spec.seed, steps.check, steps.sub(0.08, 0.2)
                )
                train_info["adapted_sessions"] = adapted
                frac = 0.2
            candidate.splits.update({**orig_splits, **splits})
            if spec.kind == "finetune":
                from service.retrain.distributed import finetune_decoder

                base = serving.config.training or TrainConfig()
                tcfg = base.model_copy(
                    update={
                        "seed": spec.seed,
                        "epochs": epochs,
                        "patience": epochs,
                        "windows_per_trial": 2,
                        "warmup_epochs": 0,
                        "lr": base.lr * 0.5,
                        "threads": 1,
                        "max_minutes": None,
                    }
                )
                all_recs = [*originals, *recs]
                fit_splits = {r.session_id: candidate.splits[r.session_id] for r in all_recs}
                steps.begin(
                    "finetune",
                    frac,
                    f"fine-tuning the decoder on {len(all_recs)} "
                    f"session(s), {spec.workers} worker(s)",
                )
                candidate, ft = finetune_decoder(
                    candidate,
                    all_recs,
                    fit_splits,
                    tcfg,
                    workers=spec.workers,
                    cpus_per_worker=cpus_per_worker,
                    storage=work / "ray",
                    progress=steps.sub(frac, 0.6),
                    cancelled=steps.cancelled,
                )
                train_info.update(ft)
                frac = 0.6
            steps.begin(
                "sae_refit_labels",
                frac,
                f"refitting the SAE ({icfg.steps} steps) and labelling units with controls",
            )
            candidate.save(work / "checkpoint")  # run_interpret records the path
            interpret_dir, sae_report = _interpret(
                candidate, [*originals, *recs], icfg, work / "interpret"
            )
            sae_dir = interpret_dir / "sae"
            units_json = interpret_dir / "units.json"

        # 4. evaluate -----------------------------------------------------------------------
        steps.begin("evaluate", 0.75, "evaluating candidate vs serving on held-out trials")
        tasks = [t for t in ("direction", "temporal_frequency") if t in candidate.tasks]
        evaluation = compare(serving, candidate, recs, splits, tasks)

        # 5. gates --------------------------------------------------------------------------
        passed, rules, decision = apply_gates(spec.gates, evaluation, sae_report["sae"])

        # 6. export + publish ---------------------------------------------------------------
        steps.begin("export", 0.8, "exporting the candidate bundle (ONNX, parity check)")
        candidate.save(work / "checkpoint")
        summary = {
            "retrain": _jsonable(
                {
                    "job_id": job_id,
                    "kind": spec.kind,
                    "parent": parent,
                    "evaluation": evaluation,
                    "gates": spec.gates.to_dict(),
                    "rules": rules,
                    "decision": decision,
                    "sae": sae_report,
                }
            )
        }
        if interpret_dir is not None:
            summary["interpret"] = json.loads((interpret_dir / "summary.json").read_text())
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
        out = work / "bundle"
        exported = export_bundle(
            work / "checkpoint",
            sae_dir,
            units_json,
            out,
            recordings=recs,
            summary_json=work / "summary.json",
            name=spec.model,
            parent=parent,
            top_m=int(bundle.read_json("config.json")["export"]["top_m"]),
        )
        steps.check()
        steps.begin("publish", 0.92, "publishing the candidate to the registry")
        provenance = {
            **exported.provenance,
            "retrain": _jsonable(
                {
                    "job_id": job_id,
                    "kind": spec.kind,
                    "parent": parent,
                    "sessions": {
                        sid: {
                            "record_sha256": d["record_sha256"],
                            "record_dir": str(home / "sessions" / sid),
                        }
                        for sid, d in data_info["job_sessions"].items()
                    },
                    "original_sessions": data_info["original_sessions"],
                    "original_files": files_used,
                    "original_sources_unavailable": unavailable,
                    "seed": spec.seed,
                    "epochs": epochs,
                    "workers": spec.workers,
                    "gates": spec.gates.to_dict(),
                    "decision": decision,
                }
            ),
        }
        version = reg.publish(
            exported.path, spec.model, parent=parent, provenance=provenance, retrain_job=job_id
        )
        steps.end()

        # 7. promote ------------------------------------------------------------------------
        promoted = False
        promote_note = ""
        if cancelled is not None and cancelled():
            err = JobCancelled(f"cancelled after publishing {version} (not promoted)")
            err.parent_version, err.candidate_version = parent, version
            raise err
        if passed and spec.promote:
            now = reg.current(spec.model)
            if now != parent:
                promote_note = (
                    f"not promoted: the serving version moved from {parent} to {now} during the job"
                )
            else:
                steps.begin("promote", 0.97, f"promoting {version}")
                reg.promote(spec.model, version, reason=f"retrain job {job_id}: {decision}")
                promoted = True
                promote_note = f"promoted {version} (was {parent})"
        elif passed:
            promote_note = "gates passed; not promoted (promote=false)"
        else:
            promote_note = f"not promoted: {version} stays in the registry as a refused candidate"
        steps.end()
        steps.progress(1.0, promote_note)
        return _jsonable(
            {
                "job_id": job_id,
                "kind": spec.kind,
                "model": spec.model,
                "parent_version": parent,
                "candidate_version": version,
                "promoted": promoted,
                "decision": f"{decision} => {promote_note}",
                "gates": spec.gates.to_dict(),
                "rules": rules,
                "evaluation": evaluation,
                "sae": sae_report,
                "data": data_info,
                "training": train_info,
                "durations_s": {**steps.durations, "total_s": steps.total()},
            }
        )
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def execute_job(
    store: JobStore,
    job_id: str,
    *,
    home: str | Path,
    cancelled: Callable[[], bool] | None = None,
    min_interval_s: float = 0.5,
    cpus_per_worker: float = 0.5,
) -> dict:
    """Run the QUEUED job ``job_id`` of ``store`` with `run_job`, keeping its record current:
    RUNNING with progress and message (written at most every ``min_interval_s``), then
    SUCCEEDED (with parent/candidate version, promoted, decision and result), CANCELLED, or
    FAILED (message = the exception, ``error`` = its traceback tail). Never raises for a job
    failure; returns the final record. This is what the retraining actor calls per job."""
    record = store.get(job_id)
    if record["state"] != "QUEUED":
        raise ValueError(f"job {job_id} is {record['state']}, not QUEUED")
    spec = JobSpec.model_validate(record["spec"])
    is_cancelled = cancelled or (lambda: False)
    if is_cancelled():
        return store.update(job_id, state="CANCELLED", message="cancelled before it started")
    store.update(job_id, state="RUNNING", progress=0.0, message="starting")
    last = [0.0]

    def progress(fraction: float, text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= min_interval_s or fraction >= 1.0:
            last[0] = now
            store.update(job_id, progress=fraction, message=text)

    try:
        result = run_job(
            spec,
            home=home,
            job_id=job_id,
            progress=progress,
            cancelled=is_cancelled,
            cpus_per_worker=cpus_per_worker,
        )
    except JobCancelled as e:
        return store.update(
            job_id,
            state="CANCELLED",
            message=f"cancelled: {e}",
            parent_version=getattr(e, "parent_version", None),
            candidate_version=getattr(e, "candidate_version", None),
            promoted=False,
        )
    except Exception as e:  # noqa: BLE001  (a job failure is recorded, not raised)
        return store.update(
            job_id,
            state="FAILED",
            message=f"{type(e).__name__}: {e}",
            error=format_exception(e),
        )
    return store.update(
        job_id,
        state="SUCCEEDED",
        progress=1.0,
        message=result["decision"].rsplit(" => ", 1)[-1],
        parent_version=result["parent_version"],
        candidate_version=result["candidate_version"],
        promoted=result["promoted"],
        decision=result["decision"],
        result=result,
    )


def _work_root(home: Path) -> Path:
    root = home / "jobs" / ".work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def format_exception(e: BaseException, limit: int = 4000) -> str:
    """A failed job's error text: the exception line and the traceback tail."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return tb[-limit:]


__all__ = [
    "DEFAULT_EPOCHS",
    "apply_gates",
    "compare",
    "evaluate_on_trials",
    "execute_job",
    "format_exception",
    "relabel_with_sae",
    "retrain_interpret_config",
    "run_job",
]
