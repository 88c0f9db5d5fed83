"""Train the decoder on any mix of recordings (Park sessions, simulated corpora, NWB, brainsets).

Recipe (CPU-friendly defaults, see `TrainConfig`):
- held-out splits by trial (`models.splits.split_all`, stratified by condition); the test trials
  are never seen in training or model selection;
- one training sample = a causal window ending at a random frame between ``onset +
  train_from_s`` and ``trial end + train_post_s`` of a training trial, labelled with the trial's
  direction / temporal frequency, and the session's genetic background;
- augmentations: unit dropout (a random fraction of the cells hidden per window) and gaussian
  noise (in units of each cell's robust scale);
- AdamW, linear warm-up then cosine decay, label smoothing;
- optional tuning initialisation (``tuning_init``): each unit's gain embedding starts as its
  tuning on the training trials (per-class mean response, `tuning_vectors`) through one fixed
  random projection shared by every session, so the shared weights learn one reading of tuning
  and a unit starts where its own trials put it (new-session adaptation does the same from its
  labelled trials);
- after each epoch, trial-level validation accuracy (log-probabilities averaged over the windows
  ending from ``onset + decode_from_s`` to the trial end); early stopping and model selection on
  the validation direction accuracy (ties broken by validation loss) or, with
  ``select_on="nll"``, on the validation NLL of the trial tasks, keeping the best weights;
- optional second stage (``finetune_epochs``): only the unit and session embeddings are fitted,
  shared weights frozen, kept where validation improves (`finetune_embeddings`);
- the checkpoint directory gets config.json, decoder.safetensors, vocab.json, splits.json,
  train_log.jsonl (one line per epoch, then the test metrics) and learning_curve.png.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.data.recording import Recording
from models.decoder.checkpoint import CURVE_FILE, LOG_FILE, Checkpoint
from models.decoder.config import CheckpointConfig, DecoderConfig, TrainConfig
from models.decoder.model import Decoder, batch_to_torch
from models.decoder.tokenizers import collate, tokenizer_for
from models.decoder.vocab import Vocab
from models.decoder.windows import SessionData, pooled_logits, trial_windows
from models.splits import TrialSplit, split_all
from models.tasks import TEMPORAL_FREQUENCIES_HZ, genetic_classes, trial_labels


def robust_stats(traces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell location (median) and scale (1.4826 MAD, floored) of ``[T, N]`` traces."""
    med = np.median(traces, axis=0)
    mad = 1.4826 * np.median(np.abs(traces - med), axis=0)
    std = traces.std(axis=0)
    scale = np.maximum(mad, np.maximum(0.1 * std, 1e-3))
    return med.astype(np.float32), scale.astype(np.float32)


@torch.no_grad()
def set_unit_stats(model: Decoder, vocab: Vocab, rec: Recording) -> None:
    """Store a recording's per-unit normalisation in the model (label-free: uses all frames)."""
    loc, scale = robust_stats(rec.traces)
    idx = vocab.unit_index(rec.unit_ids)
    ok = idx >= 0
    model.unit_loc[torch.as_tensor(idx[ok])] = torch.as_tensor(loc[ok])
    model.unit_scale[torch.as_tensor(idx[ok])] = torch.as_tensor(scale[ok])


TUNING_SEED = 0x7E57  # the fixed projection of tuning vectors into the gain embedding


def tuning_vectors(rec: Recording, trials: np.ndarray) -> np.ndarray:
    """Per cell, its tuning on the given (labelled) trials: ``[n_units, 8 + 5]``.

    The response of a cell to a trial is its mean dF/F over the trial (the baselines' feature),
    robust-z-scored like the decoder's inputs; per task, the class means minus their average,
    over the cell's within-class s.d. (classes without trials: 0; temporal frequency: 0 where
    the data has none)."""
    from models.baselines import trial_features

    trials = np.asarray(trials, dtype=np.int64)
    loc, scale = robust_stats(rec.traces)
    out = np.zeros((rec.n_units, 8 + len(TEMPORAL_FREQUENCIES_HZ)), dtype=np.float32)
    if trials.size == 0:
        return out
    z = (trial_features(rec, trials) - loc) / scale  # [n_trials, n_units]
    col = 0
    for task, k in (("direction", 8), ("temporal_frequency", len(TEMPORAL_FREQUENCIES_HZ))):
        y = trial_labels(rec).get(task)
        if y is not None:
            y = y[trials]
            means = np.zeros((k, rec.n_units))
            present = np.zeros(k, dtype=bool)
            resid = []
            for c in range(k):
                m = y == c
                if m.any():
                    means[c] = z[m].mean(0)
                    present[c] = True
                    resid.append(z[m] - means[c])
            if present.sum() >= 2:
                sd = np.concatenate(resid).std(0) + 0.1
                centred = (means - means[present].mean(0)) * present[:, None]
                out[:, col : col + k] = (centred / sd).T
        col += k
    return out


@torch.no_grad()
def init_units_from_tuning(
    model: Decoder, vocab: Vocab, rec: Recording, trials: np.ndarray, scale: float
) -> None:
    """Set the gain half of ``rec``'s unit embeddings to ``scale`` x its tuning vectors
    (`tuning_vectors`) through a fixed random projection (the same for every session, so the
    shared weights learn one reading of it)."""
    d = model.config.dim
    r = torch.as_tensor(tuning_vectors(rec, trials))
    q = torch.randn(r.shape[1], d, generator=torch.Generator().manual_seed(TUNING_SEED))
    idx = vocab.unit_index(rec.unit_ids)
    ok = idx >= 0
    rows = torch.as_tensor(idx[ok])
    model.unit_emb.weight[rows, d:] = scale * (r[torch.as_tensor(np.flatnonzero(ok))] @ q)


def task_sizes(recordings: Sequence[Recording], gen_classes: Sequence[str]) -> dict[str, int]:
    tasks = {"direction": 8}
    if any(r.trials.has_temporal_frequency for r in recordings):
        tasks["temporal_frequency"] = len(TEMPORAL_FREQUENCIES_HZ)
    if len(gen_classes) >= 2:
        tasks["genetic"] = len(gen_classes)
    return tasks


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def sample_training_windows(
    sessions: Sequence[SessionData],
    trials: Sequence[np.ndarray],
    tcfg: TrainConfig,
    rng: np.random.Generator,
) -> list[tuple[int, int, int]]:
    """(session, trial, end frame) items for one epoch, shuffled."""
    items = []
    for s, (sd, tr) in enumerate(zip(sessions, trials, strict=True)):
        for t in tr:
            rec = sd.rec
            lo = rec.trials.start[t] + tcfg.train_from_s
            hi = rec.trials.end[t] + tcfg.train_post_s
            seg_end = rec.trials.extra.get("segment_end")
            if seg_end is not None and rec.pseudo_continuous:
                hi = min(hi, float(seg_end[t]))
            i0 = int(np.searchsorted(rec.timestamps, lo - 1e-9, side="left"))
            i1 = int(np.searchsorted(rec.timestamps, hi - 1e-9, side="left"))
            if i1 <= i0:
                i1 = i0 + 1
            i1 = min(i1, rec.n_frames)
            i0 = min(i0, i1 - 1)
            for f in rng.integers(i0, i1, size=tcfg.windows_per_trial):
                items.append((s, int(t), int(f)))
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def make_train_batch(
    items, sessions: Sequence[SessionData], tokenizer, tcfg: TrainConfig, rng, scales
) -> tuple[dict, dict[str, torch.Tensor]]:
    samples, sess, labels = [], [], {t: [] for t in sessions[0].labels}
    for s, t, f in items:
        sd = sessions[s]
        n = sd.cells.size
        keep = np.ones(n, dtype=bool)
        if tcfg.unit_dropout > 0 and n > 1:
            keep = rng.random(n) >= tcfg.unit_dropout
            if not keep.any():
                keep[rng.integers(n)] = True
        tok = sd.tokenize(tokenizer, f, sd.lower[t])
        if tcfg.noise_std > 0:
            v = tok["values"]
            scale = scales[s][tok["unit_index"]][:, None]
            tok["values"] = (v + rng.standard_normal(v.shape) * tcfg.noise_std * scale).astype(
                np.float32
            )
        if not keep.all():
            k = np.isin(tok["unit_index"], sd.unit_index[keep])
            tok = {key: v[k] for key, v in tok.items()}
        samples.append(tok)
        sess.append(sd.session_index)
        for task in labels:
            labels[task].append(sd.labels[task][t] if task in sd.labels else -1)
    batch = batch_to_torch(collate(samples, sess))
    return batch, {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in labels.items()}


def evaluate_split(
    model: Decoder,
    tokenizer,
    sessions: Sequence[SessionData],
    trials,
    from_s: float,
    stride: int = 1,
) -> dict:
    """Trial-level accuracy and NLL per task (pooled windows), per session and overall."""
    model.eval()
    per_session, correct, nll, count = {}, {}, {}, {}
    for sd, tr in zip(sessions, trials, strict=True):
        if len(tr) == 0:
            continue
        lp = pooled_logits(model, tokenizer, sd, tr, from_s=from_s, stride=stride)
        res = {}
        for task, logp in lp.items():
            y = sd.labels[task][tr] if task in sd.labels else np.full(len(tr), -1)
            ok = y >= 0
            if not ok.any():
                continue
            p = logp[ok] - np.logaddexp.reduce(logp[ok], axis=1, keepdims=True)
            acc = float((logp[ok].argmax(1) == y[ok]).mean())
            res[task] = acc
            correct[task] = correct.get(task, 0) + float((logp[ok].argmax(1) == y[ok]).sum())
            nll[task] = nll.get(task, 0) - float(p[np.arange(ok.sum()), y[ok]].sum())
            count[task] = count.get(task, 0) + int(ok.sum())
        per_session[sd.rec.session_id] = res
    return {
        "acc": {t: correct[t] / count[t] for t in count},
        "nll": {t: nll[t] / count[t] for t in count},
        "session_acc": per_session,
        "n_trials": count,
    }


def _validate_and_log(model, tokenizer, sessions, val_trials, tcfg, head: dict, lr: float, t0,
                      log: list, log_file) -> tuple[dict, dict | None]:  # fmt: skip
    """Validate (when there are validation trials), append the epoch's row to the log (and
    the jsonl file); returns (row, validation result or None)."""
    val = (
        evaluate_split(model, tokenizer, sessions, val_trials, tcfg.decode_from_s, tcfg.val_stride)
        if val_trials is not None
        else None
    )
    row = {
        **head,
        "val_acc": val["acc"] if val else {},
        "val_nll": val["nll"] if val else {},
        "lr": lr,
        "elapsed_s": round(time.time() - t0, 2),
    }
    log.append(row)
    if log_file is not None:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
    return row, val


def selection_key(val: dict | None, train_loss: float, tcfg: TrainConfig) -> tuple:
    """What model selection maximises: validation direction accuracy (ties broken by its NLL),
    or minus the validation NLL summed over the trial tasks (``select_on="nll"``; less noisy
    than the accuracy of a few validation trials per session). No validation: minus the
    training loss."""
    if not val or not val["nll"]:
        return (0.0, -train_loss)
    if tcfg.select_on == "nll":
        nll = [v for t, v in val["nll"].items() if t != "genetic"] or list(val["nll"].values())
        return (-float(sum(nll)), val["acc"].get("direction", 0.0))
    return (val["acc"].get("direction", 0.0), -val["nll"].get("direction", 0.0))


def plot_learning_curve(log: list[dict], path: Path, best_epoch: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in log]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [r["train_loss"] for r in log], label="train loss")
    a1.plot(ep, [sum(r["val_nll"].values()) for r in log], label="val NLL (sum of tasks)")
    a1.set_xlabel("epoch")
    a1.legend()
    for task in log[0]["val_acc"]:
        a2.plot(ep, [r["val_acc"].get(task, np.nan) for r in log], label=f"val {task}")
    a2.set_xlabel("epoch")
    a2.set_ylabel("trial-level accuracy")
    a2.set_ylim(0, 1.02)
    if best_epoch is not None and best_epoch > 0:
        for ax in (a1, a2):
            ax.axvline(best_epoch, color="grey", ls=":", lw=1)
        a2.text(best_epoch, 0.02, " kept", color="grey")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def multitask_loss(
    out_logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    weights: dict[str, float],
    tcfg: TrainConfig,
    *,
    every_head_in_graph: bool = False,
) -> torch.Tensor:
    """Weighted cross-entropy summed over the tasks with labels in the batch (-1 = none).

    ``every_head_in_graph`` keeps heads without labels in the graph with a zero term, so every
    data-parallel worker builds the same graph (DDP needs it)."""
    loss = torch.zeros(())
    for task, logits in out_logits.items():
        y = labels.get(task)
        if y is None or not bool((y >= 0).any()):
            if every_head_in_graph:
                loss = loss + 0.0 * logits.sum()
            continue
        loss = loss + weights.get(task, 1.0) * F.cross_entropy(
            logits, y, ignore_index=-1, label_smoothing=tcfg.label_smoothing
        )
    return loss


def make_optimizer(model: Decoder, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the unit and session embeddings (the
    vocabularies) at ``lr * emb_lr_mult`` without decay."""
    decay, no_decay, vocab_emb = [], [], []
    for name, p in model.named_parameters():
        if name in ("unit_emb.weight", "session_emb.weight"):
            vocab_emb.append(p)
        else:
            (no_decay if p.ndim < 2 or "emb" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tcfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
            {"params": vocab_emb, "weight_decay": 0, "lr": tcfg.lr * tcfg.emb_lr_mult},
        ],
        lr=tcfg.lr,
    )


def finetune_embeddings(
    model: Decoder,
    sessions: Sequence[SessionData],
    train_tr,
    val_tr,
    tokenizer,
    tcfg: TrainConfig,
    rng: np.random.Generator,
    scales,
    weights: dict[str, float],
    log: list[dict],
    log_file,
    best_key: tuple | None,
    best_epoch: int,
    *,
    progress: bool = False,
) -> int:
    """Second stage: fit only the unit and session embeddings (the POYO recipe for a session,
    here on the training sessions), every shared weight frozen, no dropout. Augmentation as in
    training. Validated after each epoch with the same selection key; ``model`` ends with the
    best weights (the stage-one weights if no epoch improves). Returns the epoch kept."""
    emb = [model.unit_emb.weight, model.session_emb.weight]
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in emb:
        p.requires_grad_(True)
    opt = torch.optim.Adam(emb, lr=tcfg.finetune_lr)
    has_val = sum(len(v) for v in val_tr) > 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start, bad, t0 = len(log), 0, time.time()
    n_epochs = min(tcfg.finetune_epochs, tcfg.epochs)
    bar = tqdm(range(1, n_epochs + 1), desc="finetune", disable=not progress)
    for ep in bar:
        model.eval()  # frozen network as at inference (no dropout)
        items = sample_training_windows(sessions, train_tr, tcfg, rng)
        tot, n = 0.0, 0
        for s in range(0, len(items), tcfg.batch_size):
            batch, labels = make_train_batch(
                items[s : s + tcfg.batch_size], sessions, tokenizer, tcfg, rng, scales
            )
            # blind tasks: their loss may only reach the shared weights, frozen here, so it
            # has nothing to train; detached, it is the blind pass's value without a second pass
            out = model.forward_batch(batch)
            for t in model.config.identity_blind_tasks:
                if t in out:
                    out[t] = out[t].detach()
            loss = multitask_loss(out, labels, weights, tcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(batch["session_index"])
            n += len(batch["session_index"])
        head = {"epoch": start + ep, "stage": "finetune", "train_loss": tot / max(n, 1)}
        row, val = _validate_and_log(
            model, tokenizer, sessions, val_tr if has_val else None, tcfg, head,
            tcfg.finetune_lr, t0, log, log_file,
        )  # fmt: skip
        key = selection_key(val, row["train_loss"], tcfg)
        if best_key is None or key > best_key:
            best_key, best_epoch, bad = key, start + ep, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= tcfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    for name, p in model.named_parameters():
        p.requires_grad_(requires[name])
    return best_epoch


def build_vocab(recordings: Sequence[Recording]) -> Vocab:
    vocab = Vocab(genetic_classes=genetic_classes(recordings))
    for r in recordings:
        g = r.genetic_background if r.genetic_background in vocab.genetic_classes else ""
        vocab.add_recording(r, genetic=g, how="trained")
    return vocab


def train(
    recordings: Sequence[Recording],
    out: str | Path | None,
    *,
    decoder_config: DecoderConfig | None = None,
    train_config: TrainConfig | None = None,
    sources: Sequence[str] = (),
    splits: dict[str, TrialSplit] | None = None,
    progress: bool = True,
) -> tuple[Checkpoint, dict]:
    """Train a decoder; save the checkpoint to ``out`` (if given). Returns it and test metrics."""
    if not recordings:
        raise ValueError("no recordings to train on")
    ids = [r.session_id for r in recordings]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate session ids among the recordings: {ids}")
    tcfg = train_config or TrainConfig()
    torch.set_num_threads(tcfg.threads)
    rng = seed_everything(tcfg.seed)

    vocab = build_vocab(recordings)
    dcfg = (decoder_config or DecoderConfig()).model_copy(
        update={
            "n_units": max(vocab.n_units, 1),
            "n_sessions": max(vocab.n_sessions, 1),
            "tasks": task_sizes(recordings, vocab.genetic_classes),
        }
    )
    dcfg = DecoderConfig.model_validate(dcfg.to_dict())
    model = Decoder(dcfg)
    for r in recordings:
        set_unit_stats(model, vocab, r)
    tokenizer = tokenizer_for(dcfg)

    if splits is None:
        splits = split_all(
            recordings, seed=tcfg.seed, val_fraction=tcfg.val_fraction,
            test_fraction=tcfg.test_fraction,
        )  # fmt: skip
    if tcfg.tuning_init > 0:
        for r in recordings:
            init_units_from_tuning(model, vocab, r, splits[r.session_id].train, tcfg.tuning_init)
    sessions = [SessionData.build(r, vocab) for r in recordings]
    scales = []
    for sd in sessions:
        sc = np.ones(vocab.n_units, dtype=np.float32)
        sc[sd.unit_index] = model.unit_scale[torch.as_tensor(sd.unit_index)].numpy()
        scales.append(sc)
    train_tr = [splits[r.session_id].train for r in recordings]
    val_tr = [splits[r.session_id].val for r in recordings]
    test_tr = [splits[r.session_id].test for r in recordings]
    if sum(len(t) for t in train_tr) == 0:
        raise ValueError("no labelled training trials in the recordings")

    n_items = sum(len(t) for t in train_tr) * tcfg.windows_per_trial
    steps_per_epoch = max(1, math.ceil(n_items / tcfg.batch_size))
    total_steps = steps_per_epoch * tcfg.epochs
    opt = make_optimizer(model, tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, tcfg.warmup_epochs * steps_per_epoch)
    )
    weights = {"direction": 1.0, "temporal_frequency": 1.0, "genetic": tcfg.genetic_weight}

    log: list[dict] = []
    log_file = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_file = open(Path(out) / LOG_FILE, "w")  # noqa: SIM115  (closed below)
    best_key, best_state, best_epoch, bad = None, None, -1, 0
    has_val = sum(len(v) for v in val_tr) > 0
    t0 = time.time()
    n_params = sum(p.numel() for p in model.parameters())
    ema = (
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        if tcfg.ema_decay > 0
        else None
    )
    bar = tqdm(range(1, tcfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        items = sample_training_windows(sessions, train_tr, tcfg, rng)
        tot, n = 0.0, 0
        for s in range(0, len(items), tcfg.batch_size):
            batch, labels = make_train_batch(
                items[s : s + tcfg.batch_size], sessions, tokenizer, tcfg, rng, scales
            )
            out_logits = model.forward_batch(batch, blind=True)
            loss = multitask_loss(out_logits, labels, weights, tcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[k].lerp_(v, 1.0 - tcfg.ema_decay)
                        else:
                            ema[k].copy_(v)
            tot += float(loss.detach()) * len(batch["session_index"])
            n += len(batch["session_index"])
        if ema is not None:  # validate (and keep) the averaged weights
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema)
        head = {"epoch": epoch, "train_loss": tot / max(n, 1)}
        row, val = _validate_and_log(
            model, tokenizer, sessions, val_tr if has_val else None, tcfg, head,
            sched.get_last_lr()[0], t0, log, log_file,
        )  # fmt: skip
        key = selection_key(val, row["train_loss"], tcfg)
        if best_key is None or key > best_key:
            best_key, best_epoch, bad = key, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if ema is not None:
            model.load_state_dict(live)
        bar.set_postfix(
            loss=f"{row['train_loss']:.3f}",
            val_dir=f"{row['val_acc'].get('direction', float('nan')):.3f}",
            best=best_epoch,
        )
        if bad >= tcfg.patience:
            break
        if tcfg.max_minutes is not None and time.time() - t0 > 60 * tcfg.max_minutes:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if tcfg.finetune_epochs > 0:
        best_epoch = finetune_embeddings(
            model, sessions, train_tr, val_tr, tokenizer, tcfg, rng, scales, weights, log,
            log_file, best_key, best_epoch, progress=progress,
        )  # fmt: skip
    model.eval()
    test = evaluate_split(model, tokenizer, sessions, test_tr, tcfg.decode_from_s)
    summary = {
        "event": "done",
        "best_epoch": best_epoch,
        "epochs_run": sum(1 for r in log if r.get("stage") != "finetune"),
        "finetune_epochs_run": sum(1 for r in log if r.get("stage") == "finetune"),
        "train_time_s": round(time.time() - t0, 2),
        "n_parameters": n_params,
        "test_acc": test["acc"],
        "test_session_acc": test["session_acc"],
        "test_trials": test["n_trials"],
    }
    ckpt = Checkpoint(
        model=model,
        config=CheckpointConfig(decoder=dcfg, training=tcfg, sources=[str(s) for s in sources]),
        vocab=vocab,
        splits=splits,
    )
    if out is not None:
        out = Path(out)
        ckpt.save(out)
        log_file.write(json.dumps(summary) + "\n")
        log_file.close()
        plot_learning_curve(log, out / CURVE_FILE, best_epoch)
    return ckpt, summary


__all__ = ["train", "evaluate_split", "robust_stats", "set_unit_stats", "trial_windows"]
