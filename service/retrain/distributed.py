"""Full fine-tuning of the decoder, on one process or across Ray Train workers.

`finetune_decoder` starts from a checkpoint (the serving weights, vocabulary already grown with
the job's sessions) and trains every parameter with the recipe of `models.train` (same window
sampling, augmentations, losses, AdamW with warm-up and cosine decay, trial-level validation,
keeping the best epoch by validation direction accuracy). With ``workers > 1`` it runs under Ray
Train's `TorchTrainer` (DDP over gloo, CPU workers of ``cpus_per_worker`` each); with one worker
it runs inline in the calling process (no Ray needed). The same loop runs in both.

Distributed details:

- the payload (initial weights as numpy, configs, vocabulary, recordings, splits) goes to the
  workers through the Ray object store (``ray.put``), so nothing has to be on a shared disk;
- every rank draws the same epoch of training windows (same seed), and rank ``r`` of ``w`` takes
  items ``r::w`` of each global batch of ``batch_size * w`` windows; gradients are averaged by
  DDP; augmentation noise differs per rank;
- rank 0 validates after each epoch and keeps the best weights; every rank calls
  ``ray.train.report`` once per epoch (metrics include ``world_size`` and ``rank``); the last
  report of rank 0 carries a checkpoint directory with ``decoder.safetensors`` (the best state),
  which the driver reads back from ``RunConfig.storage_path`` (``<job work dir>/ray``; on a
  multi-node cluster this must be storage every node can reach: a shared file system or a bucket);
- progress and cancellation go through a small named-less Ray actor (`_Channel`, ``num_cpus=0``):
  workers post each epoch's metrics to it and poll its cancel flag before every batch; the driver
  runs ``fit()`` in a thread and relays progress / the cancel request. A cancelled fit raises
  `JobCancelled` in the driver.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.retrain.jobs import JobCancelled

Progress = Callable[[float, str], None]


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# the training loop (one rank)


def _fit(
    payload: dict,
    rank: int,
    world: int,
    on_epoch: Callable[[dict], None],
    should_stop: Callable[[], bool],
    ddp_wrap: Callable | None = None,
) -> tuple[dict | None, list[dict]]:
    """Train; returns (best state dict as torch tensors on rank 0 else None, epoch log)."""
    import torch

    from models.decoder.config import DecoderConfig, TrainConfig
    from models.decoder.model import BATCH_KEYS, Decoder
    from models.decoder.tokenizers import tokenizer_for
    from models.decoder.vocab import Vocab
    from models.decoder.windows import SessionData
    from models.train import (
        evaluate_split,
        lr_factor,
        make_optimizer,
        make_train_batch,
        multitask_loss,
        sample_training_windows,
    )

    torch.set_num_threads(1)
    tcfg = TrainConfig.model_validate(payload["train"])
    dcfg = DecoderConfig.model_validate(payload["decoder"])
    torch.manual_seed(tcfg.seed)
    model = Decoder(dcfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in payload["state"].items()})
    vocab = Vocab.from_dict(payload["vocab"])
    recs = payload["recordings"]
    splits = payload["splits"]
    tokenizer = tokenizer_for(dcfg)
    sessions = [SessionData.build(r, vocab) for r in recs]
    scales = []
    for sd in sessions:
        sc = np.ones(vocab.n_units, dtype=np.float32)
        sc[sd.unit_index] = model.unit_scale[torch.as_tensor(sd.unit_index)].numpy()
        scales.append(sc)
    train_tr = [np.asarray(splits[r.session_id]["train"], dtype=np.int64) for r in recs]
    val_tr = [np.asarray(splits[r.session_id]["val"], dtype=np.int64) for r in recs]
    has_val = sum(len(v) for v in val_tr) > 0

    net = ddp_wrap(model) if ddp_wrap is not None and world > 1 else model
    opt = make_optimizer(model, tcfg)
    n_items = sum(len(t) for t in train_tr) * tcfg.windows_per_trial
    global_bs = tcfg.batch_size * world
    steps_per_epoch = max(1, math.ceil(n_items / global_bs))
    total = steps_per_epoch * tcfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, tcfg.warmup_epochs * steps_per_epoch)
    )
    weights = {"direction": 1.0, "temporal_frequency": 1.0, "genetic": tcfg.genetic_weight}
    rng = np.random.default_rng(tcfg.seed)  # identical on every rank: same windows
    aug = np.random.default_rng(tcfg.seed + 7919 * (rank + 1))
    best_key, best_state, log = None, None, []
    t0 = time.perf_counter()
    for epoch in range(1, tcfg.epochs + 1):
        net.train()
        items = sample_training_windows(sessions, train_tr, tcfg, rng)
        tot, n = 0.0, 0
        for b in range(steps_per_epoch):
            if should_stop():
                raise _Stop()
            chunk = items[b * global_bs : (b + 1) * global_bs][rank::world] or items[:1]
            batch, labels = make_train_batch(chunk, sessions, tokenizer, tcfg, aug, scales)
            out = net(*(batch[k] for k in BATCH_KEYS), blind=True)
            loss = multitask_loss(out, labels, weights, tcfg, every_head_in_graph=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(chunk)
            n += len(chunk)
        row: dict[str, Any] = {
            "epoch": epoch,
            "epochs": tcfg.epochs,
            "train_loss": tot / max(n, 1),
            "rank": rank,
            "world_size": world,
            "elapsed_s": round(time.perf_counter() - t0, 2),
        }
        if rank == 0:
            model.eval()
            if has_val:
                val = evaluate_split(model, tokenizer, sessions, val_tr, tcfg.decode_from_s)
                row["val_acc"] = val["acc"]
                key = (val["acc"].get("direction", 0.0), -val["nll"].get("direction", 0.0))
            else:
                key = (0.0, -row["train_loss"])
            if best_key is None or key > best_key:
                best_key = key
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                row["kept"] = True
        log.append(row)
        on_epoch(row)
    if rank != 0:
        return None, log
    return best_state, log


# ---------------------------------------------------------------------------------------------
# Ray Train


def _ray_channel_class():
    import ray

    @ray.remote(num_cpus=0)
    class _Channel:
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.cancel_flag = False

        def post(self, row: dict) -> None:
            self.rows.append(row)

        def rows_since(self, n: int) -> list[dict]:
            return self.rows[n:]

        def cancel(self) -> None:
            self.cancel_flag = True

        def cancelled(self) -> bool:
            return self.cancel_flag

    return _Channel


def _train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point on each worker."""
    import ray
    import ray.train
    import torch
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    payload = ray.get(config["payload"])
    channel = config["channel"]
    torch.set_num_threads(1)

    def on_epoch(row: dict) -> None:
        if rank == 0:
            ray.get(channel.post.remote(row))
        if row["epoch"] < row["epochs"]:
            ray.train.report({k: v for k, v in row.items() if k != "val_acc"})

    def should_stop() -> bool:
        return bool(ray.get(channel.cancelled.remote()))

    try:
        best, log = _fit(payload, rank, world, on_epoch, should_stop, DistributedDataParallel)
    except _Stop:
        raise RuntimeError("cancelled") from None
    last = {k: v for k, v in log[-1].items() if k != "val_acc"}
    if rank == 0 and best is not None:
        with tempfile.TemporaryDirectory(prefix="cortexlens-ft-") as tmp:
            tensors = {k: v.contiguous() for k, v in best.items()}
            save_file(tensors, str(Path(tmp) / "decoder.safetensors"), metadata={"format": "pt"})
            ray.train.report(last, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(last)


def _run_ray(
    payload: dict,
    workers: int,
    cpus_per_worker: float,
    storage: Path,
    progress: Progress,
    cancelled: Callable[[], bool],
    epochs: int,
) -> tuple[dict, list[dict], dict]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from safetensors.torch import load_file

    if not ray.is_initialized():
        raise RuntimeError("finetune with workers > 1 needs a running Ray instance (ray.init())")
    channel = _ray_channel_class().remote()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"payload": ray.put(payload), "channel": channel},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            storage_path=str(storage.resolve()),
            name="finetune",
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e

    th = threading.Thread(target=target, name="retrain-torchtrainer", daemon=True)
    th.start()
    rows: list[dict] = []
    asked_cancel = False
    while th.is_alive():
        th.join(0.5)
        try:
            new = ray.get(channel.rows_since.remote(len(rows)), timeout=5)
        except Exception:  # noqa: BLE001  (progress is best effort)
            new = []
        for row in new:
            rows.append(row)
            val = row.get("val_acc", {}).get("direction")
            progress(
                row["epoch"] / max(epochs, 1),
                f"epoch {row['epoch']}/{epochs} on {row['world_size']} workers: loss "
                f"{row['train_loss']:.3f}"
                + (f", val direction {val:.3f}" if val is not None else ""),
            )
        if not asked_cancel and cancelled():
            asked_cancel = True
            channel.cancel.remote()
    rows += ray.get(channel.rows_since.remote(len(rows)))
    ray.kill(channel)
    if asked_cancel:
        raise JobCancelled("cancelled during the distributed fine-tune")
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("the fine-tune returned no checkpoint from rank 0")
    with result.checkpoint.as_directory() as d:
        state = load_file(str(Path(d) / "decoder.safetensors"))
    info = {
        "world_size": int(result.metrics.get("world_size", 0)) if result.metrics else 0,
        "final_metrics": dict(result.metrics or {}),
        "checkpoint": str(result.checkpoint.path),
    }
    return state, rows, info


# ---------------------------------------------------------------------------------------------
# entry point


def finetune_decoder(
    init,
    recordings,
    splits: dict,
    train_config,
    *,
    workers: int = 2,
    cpus_per_worker: float = 0.5,
    storage: str | Path,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
):
    """Fine-tune every parameter of ``init`` (a `Checkpoint` whose vocabulary already holds all
    ``recordings``) on the training trials of ``splits`` (session id -> `TrialSplit`),
    validating on their validation trials. Returns (new `Checkpoint`, info dict: world_size,
    epoch log, runner). ``workers > 1``: Ray Train TorchTrainer on the running Ray instance."""
    from models.decoder.checkpoint import Checkpoint
    from models.decoder.model import Decoder

    say = progress or (lambda f, m: None)
    is_cancelled = cancelled or (lambda: False)
    payload = {
        "state": {k: v.detach().cpu().numpy() for k, v in init.model.state_dict().items()},
        "decoder": init.model.config.to_dict(),
        "train": train_config.to_dict(),
        "vocab": init.vocab.to_dict(),
        "recordings": list(recordings),
        "splits": {sid: sp.to_dict() for sid, sp in splits.items()},
    }
    t0 = time.perf_counter()
    if workers > 1:
        state, log, info = _run_ray(
            payload,
            workers,
            cpus_per_worker,
            Path(storage),
            say,
            is_cancelled,
            train_config.epochs,
        )
        runner = "ray.train.torch.TorchTrainer"
    else:

        def on_epoch(row: dict) -> None:
            val = row.get("val_acc", {}).get("direction")
            say(
                row["epoch"] / row["epochs"],
                f"epoch {row['epoch']}/{row['epochs']} inline: loss {row['train_loss']:.3f}"
                + (f", val direction {val:.3f}" if val is not None else ""),
            )

        try:
            state, log = _fit(payload, 0, 1, on_epoch, is_cancelled)
        except _Stop:
            raise JobCancelled("cancelled during the fine-tune") from None
        info = {"world_size": 1}
        runner = "inline"
    model = Decoder(init.model.config)
    model.load_state_dict(state)
    model.eval()
    config = init.config.model_copy(update={"decoder": model.config, "training": train_config})
    ckpt = Checkpoint(model=model, config=config, vocab=init.vocab.copy(), splits=dict(splits))
    info.update({"runner": runner, "epoch_log": log, "seconds": round(time.perf_counter() - t0, 2)})
    return ckpt, info


__all__ = ["finetune_decoder"]
