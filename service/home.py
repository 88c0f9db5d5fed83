"""The service's embedded local home: a model registry with a default model, and quick bundles.

A home is one directory (``$CORTEXLENS_HOME``, else ``<repo>/.cortexlens``, gitignored)::

    home/
      registry/        a models.registry.Registry; model "default" is what the service serves
      sessions/        durable records of live sessions (written by the ingestion actors)
      builds/          what a default-model build leaves for audit: checkpoint, interpret
                       output (report.html, summary.json, units.json), build.json with timings
      .build.lock      fcntl lock: one default-model build at a time, across processes

:func:`ensure_default_model` returns the current version of model ``default``, building it on
first run from the shipped Park et al. 2024 sessions: the decoder with the same defaults as
``cortexlens train``, SAEs and unit labels with the controls of the interpret pipeline
(:data:`DEFAULT_INTERPRET`: fewer SAE steps, permutations and ablation draws than
``cortexlens interpret`` so that the whole build takes minutes on 2 cores), exported to a bundle,
published and promoted. The build happens under ``.build.lock`` and re-checks the registry once
the lock is held, so two processes starting together train once; a failed build publishes
nothing (the registry's own publish is atomic: a version appears whole or not at all).

:func:`quick_bundle` trains a *small* decoder and SAE on any recordings in seconds (test
fixtures, load benchmarks); deterministic by seed on one machine (one torch thread).
:func:`simulated_recording` makes one simulated session with a chosen id (e.g. "sim512").

Plain Python: no ray or grpc imports; torch and the models are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.bundle import Bundle
    from models.data.recording import Recording
    from models.decoder.config import DecoderConfig, TrainConfig
    from models.interpret.pipeline import InterpretConfig

Log = Callable[[str], None]

DEFAULT_MODEL = "default"
HOME_ENV = "CORTEXLENS_HOME"
REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_LOCK = ".build.lock"

#: quick_bundle's decoder: small enough to train on 5 Park sessions + a 512-cell session in
#: seconds, with the real architecture (rotary cross-attention, processor, per-task readout).
QUICK_DECODER: dict[str, Any] = {
    "dim": 32,
    "dim_head": 16,
    "cross_heads": 2,
    "self_heads": 2,
    "depth": 1,
    "num_latents": 4,
    "dropout": 0.1,
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# paths


def home_dir() -> Path:
    """``$CORTEXLENS_HOME`` if set, else ``<repo root>/.cortexlens``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cortexlens"


def registry_dir(home: str | Path | None = None) -> Path:
    return Path(home if home is not None else home_dir()) / "registry"


def sessions_dir(home: str | Path | None = None) -> Path:
    """Where the durable records of live sessions go."""
    return Path(home if home is not None else home_dir()) / "sessions"


def builds_dir(home: str | Path | None = None) -> Path:
    return Path(home if home is not None else home_dir()) / "builds"


# ---------------------------------------------------------------------------------------------
# recordings


def simulated_recording(
    session_id: str = "sim512",
    *,
    n_cells: int = 512,
    frame_rate: float = 30.0,
    minutes: float = 2.0,
    seed: int = 0,
    cre_line: str | None = None,
) -> Recording:
    """One simulated session (Allen-like gratings, with trials) renamed to ``session_id``:
    unit ids ``<session_id>/cellNNNN``, subject ``<session_id>-mouse``. Deterministic."""
    from models.data.simulate import SimConfig, simulate_session

    cfg = SimConfig(n_cells=n_cells, frame_rate=frame_rate, minutes=minutes, cre_line=cre_line)
    rec, _ = simulate_session(cfg, seed=seed)
    return rec.replace(
        session_id=session_id,
        subject_id=f"{session_id}-mouse",
        unit_ids=tuple(f"{session_id}/cell{j:04d}" for j in range(rec.n_units)),
    )


def load_default_recordings(data: str | Path | None = None) -> tuple[list[Recording], list[Path]]:
    """The shipped Park sessions (``default_data_dir()``) or the recordings at ``data``."""
    from models.data.io import expand_paths, load_recordings
    from service.cli import default_data_dir

    src = Path(data) if data is not None else default_data_dir()
    files = expand_paths([str(src)])
    return load_recordings(files), files


# ---------------------------------------------------------------------------------------------
# quick bundle


def _quick_sae_latents(ckpt, recordings: Sequence[Recording], per_session: int, seed: int):
    """Latent tokens [n, D] of windows ending inside training trials (after decode_from_s)."""
    import numpy as np
    import torch

    from models.decoder.windows import build_batch, trial_lower_bounds

    rng = np.random.default_rng(seed)
    tc = ckpt.config.training
    from_s = tc.decode_from_s if tc is not None else 1.0
    out = []
    with torch.no_grad():
        for rec in recordings:
            sp = ckpt.splits.get(rec.session_id)
            trials = np.asarray(sp.train if sp is not None else np.arange(len(rec.trials)))
            if trials.size == 0:
                continue
            pick = np.sort(rng.choice(trials, min(per_session, trials.size), replace=False))
            start, end = rec.trials.start[pick], rec.trials.end[pick]
            ends = (
                start
                + np.minimum(from_s, end - start)
                + rng.random(pick.size) * np.maximum(end - start - from_s, 0.0)
            )
            ends = np.minimum(ends, rec.timestamps[-1])
            lower = trial_lower_bounds(rec)[pick]
            b = build_batch(rec, ends, ckpt.tokenizer, ckpt.vocab, lower_times=lower)
            z = ckpt.model.encode(b)
            out.append(z.reshape(-1, z.shape[-1]))
    return torch.cat(out)


def _empty_units_doc(n_units: int, firing_rate=None, reason: str = "") -> dict:
    """A units.json in the interpret schema (v1) with every unit present and no labels."""
    units = []
    for u in range(n_units):
        e: dict[str, Any] = {
            "id": u,
            "label": "",
            "labels": [],
            "stats": {},
            "reproduced_across_seeds": None,
            "seed_match": None,
        }
        if firing_rate is not None:
            e["firing_rate"] = float(firing_rate[u])
        units.append(e)
    return {
        "schema_version": 1,
        "n_units": n_units,
        "labels": "none",
        "method": {"labelled": False, "reason": reason},
        "summary": {},
        "units": units,
    }


def quick_bundle(
    recordings: Sequence[Recording],
    out: str | Path,
    *,
    tokenizer: str = "patch",
    epochs: int = 2,
    seed: int = 0,
    top_m: int = 16,
    label: bool = False,
    name: str | None = None,
    progress: bool = False,
    log: Log | None = None,
    sae_units: int = 128,
    sae_k: int = 8,
    sae_steps: int = 200,
    decoder: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Train a small decoder and SAE on ``recordings`` and export them to a bundle at ``out``.

    For tests and benchmarks, not for science: a ``QUICK_DECODER``-sized model (override with
    ``decoder={...}``) trained for ``epochs`` epochs on every session (simulated ones included),
    a TopK SAE (``sae_units``, ``sae_k``, ``sae_steps``) on its latents of training windows, and
    ``units.json``: with ``label=True`` units labelled by the interpret pipeline with cheap
    settings (one SAE seed, 100 permutations, both controls), else every unit with an empty
    label. Exported with ``export_bundle`` (ONNX parity checked on simulated and real windows)
    and returned opened and verified. Deterministic by ``seed`` (one torch thread).
    """
    import tempfile

    import torch

    from models.decoder.config import DecoderConfig, TrainConfig
    from models.export import export_bundle
    from models.sae import SAEConfig, SAETrainConfig, sae_metrics, train_sae
    from models.train import train

    say = log or (lambda s: None)
    recordings = list(recordings)
    if not recordings:
        raise ValueError("quick_bundle needs at least one recording")
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="cortexlens-quick-") as tmp:
            tmp = Path(tmp)
            dcfg = DecoderConfig(tokenizer=tokenizer, **{**QUICK_DECODER, **dict(decoder or {})})
            tcfg = TrainConfig(
                seed=seed,
                epochs=epochs,
                patience=max(epochs, 1),
                windows_per_trial=2,
                batch_size=64,
                warmup_epochs=min(1, epochs - 1),
                lr=3e-3,
                threads=1,
            )
            t0 = time.perf_counter()
            ckpt, summary = train(
                recordings,
                tmp / "checkpoint",
                decoder_config=dcfg,
                train_config=tcfg,
                sources=[r.source_path or f"{r.source}:{r.session_id}" for r in recordings],
                progress=progress,
            )
            say(f"quick_bundle: decoder trained in {time.perf_counter() - t0:.1f}s "
                f"(test accuracy {summary['test_acc']})")  # fmt: skip
            t0 = time.perf_counter()
            if label:
                from models.interpret.pipeline import run_interpret, write_outputs

                icfg = cheap_interpret_config(seed, sae_steps, sae_units=sae_units, k=sae_k)
                res = run_interpret(ckpt, recordings, icfg, log=say)
                sae_dir = write_outputs(res, tmp / "interpret", report=False)["sae"].parent
                units_json = None  # picked up beside the SAE
            else:
                torch.manual_seed(seed)
                z = _quick_sae_latents(ckpt, recordings, per_session=64, seed=seed)
                scfg = SAEConfig(
                    d_in=z.shape[-1], n_units=sae_units, k=min(sae_k, sae_units), seed=seed
                )
                sae, _ = train_sae(
                    z,
                    scfg,
                    SAETrainConfig(
                        steps=sae_steps,
                        batch_size=min(512, z.shape[0]),
                        lr=2e-3,
                        warmup_steps=min(20, sae_steps // 5),
                        seed=seed,
                    ),
                    log_every=max(sae_steps, 1),
                )
                sae_dir = sae.save(tmp / "sae" / "sae")  # nothing beside it: no units picked up
                units_json = tmp / "units.json"
                rate = sae_metrics(sae, z).firing_rate
                units_json.write_text(
                    json.dumps(
                        _empty_units_doc(
                            sae_units, rate, "quick bundle built with label=False: no labelling"
                        ),
                        indent=1,
                    )
                )
            say(f"quick_bundle: SAE{' + labels' if label else ''} in "
                f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
            t0 = time.perf_counter()
            if overwrite and out.exists():
                shutil.rmtree(out)
            bundle = export_bundle(
                tmp / "checkpoint",
                sae_dir,
                units_json,
                out,
                top_m=top_m,
                recordings=recordings,
                name=name or out.name,
            )
            say(f"quick_bundle: exported in {time.perf_counter() - t0:.1f}s -> {out} "
                f"(total {time.perf_counter() - t_all:.1f}s)")  # fmt: skip
            return bundle
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# default model


@dataclass(frozen=True)
class DefaultModel:
    """What :func:`ensure_default_model` returns: where the served model is."""

    registry: Path
    name: str
    version: str
    bundle_path: Path
    built: bool = False  # True when this call built it
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per step, if built


def cheap_interpret_config(seed: int, steps: int, **overrides) -> InterpretConfig:
    """Interpret settings that take seconds (one SAE seed, 100 permutations, both controls, few
    ablation draws and attribution examples): quick bundles and retraining jobs."""
    from models.interpret.pipeline import InterpretConfig

    kw = {
        "seed": seed,
        "steps": steps,
        "sae_batch_size": 512,
        "n_seeds": 1,
        "n_perm": 100,
        "ablation_draws": 5,
        "ablation_top": 0,
        "attribution_examples": 8,
        "ig_steps": 4,
        "window_stride": 4,
        "e2e_steps": steps // 5,  # the KL + FVU fine-tune through the frozen decoder
    }
    return InterpretConfig(**(kw | overrides))


def default_interpret_config(seed: int = 0) -> InterpretConfig:
    """The interpret settings of the default model's build: the pipeline of ``cortexlens
    interpret`` (two SAE seeds, both controls, BH-FDR, ablations, attribution agreement), with
    fewer SAE steps, ablation draws and attribution examples so the build stays in minutes.

    SAEs: 1000 reconstruction steps then 300 steps of the end-to-end fine-tune (KL + FVU through
    the frozen decoder; an e2e step costs about two reconstruction steps; `cortexlens interpret`
    runs 1000), about the time of the 1500 reconstruction-only steps used before, with the
    spliced decoder much closer to the plain one."""
    from models.interpret.pipeline import InterpretConfig

    return InterpretConfig(
        seed=seed,
        steps=1000,
        e2e_steps=300,
        n_seeds=2,
        n_perm=1000,
        ablation_draws=30,
        attribution_examples=32,
        ig_steps=16,
        window_stride=2,
    )


@dataclass(frozen=True)
class DefaultBuild:
    """How the default model is built (overridable for tests and experiments)."""

    seed: int = 0
    decoder: DecoderConfig | None = None  # None: DecoderConfig() (`cortexlens train` defaults)
    training: TrainConfig | None = None  # None: TrainConfig(seed=seed)
    interpret: InterpretConfig | None = None  # None: default_interpret_config(seed)
    top_m: int = 16
    report: bool = True  # write interpret's report.html into the build directory
    report_unit_figures: int = 24  # unit dashboards with a figure (the CLI's default: 150)


Builder = Callable[[Path, Log], Path]


def build_default_bundle(
    workdir: str | Path,
    data: str | Path | None = None,
    *,
    settings: DefaultBuild | None = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[Path, dict[str, float]]:
    """Train, interpret and export the default model into ``workdir``; return the bundle
    directory and the seconds of each step (load, train, interpret, report, export, total)."""
    import torch

    from models.decoder.config import DecoderConfig, TrainConfig
    from models.export import export_bundle
    from models.interpret.pipeline import run_interpret, write_outputs
    from models.train import train

    s = settings or DefaultBuild()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    threads = torch.get_num_threads()
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        recs, files = load_default_recordings(data)
        times["load_s"] = time.perf_counter() - t0
        log(f"[default model] 1/4 loaded {len(recs)} session(s), "
            f"{sum(r.n_units for r in recs)} cells, in {times['load_s']:.1f}s")  # fmt: skip

        dcfg = s.decoder or DecoderConfig()
        tcfg = s.training or TrainConfig(seed=s.seed)
        torch.set_num_threads(tcfg.threads)
        log(
            f"[default model] 2/4 training the {dcfg.tokenizer} decoder (`cortexlens train` "
            f"defaults: up to {tcfg.epochs} epochs, early stopping after {tcfg.patience}) ..."
        )
        t0 = time.perf_counter()
        _, summary = train(
            recs,
            workdir / "checkpoint",
            decoder_config=dcfg,
            train_config=tcfg,
            sources=[str(f) for f in files],
            progress=progress,
        )
        times["train_s"] = time.perf_counter() - t0
        log(f"[default model] 2/4 decoder trained in {times['train_s']:.1f}s: "
            f"{summary['epochs_run']} + {summary.get('finetune_epochs_run', 0)} embedding-only "
            f"epochs (kept epoch {summary['best_epoch']}), test accuracy "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary["test_acc"].items()))  # fmt: skip

        icfg = s.interpret or default_interpret_config(s.seed)
        torch.set_num_threads(1)
        log(f"[default model] 3/4 SAEs and unit labels ({icfg.n_seeds} SAE seed(s), "
            f"{icfg.steps} steps; controls: random-init decoder, shuffled labels; "
            f"{icfg.n_perm} permutations) ...")  # fmt: skip
        t0 = time.perf_counter()
        res = run_interpret(
            workdir / "checkpoint", recs, icfg, log=lambda m: log(f"[default model]     {m}")
        )
        write_outputs(res, workdir / "interpret", report=False)
        times["interpret_s"] = time.perf_counter() - t0
        log(f"[default model] 3/4 interpreted in {times['interpret_s']:.1f}s "
            f"(labels: {res.summary.get('labels')}; controls: "
            f"{res.summary.get('controls', {}).get('random_init')} random-init, "
            f"{res.summary.get('controls', {}).get('shuffled')} shuffled)")  # fmt: skip
        if s.report:
            from models.interpret.report import write_report

            t0 = time.perf_counter()
            path = write_report(res, workdir / "interpret", max_unit_figures=s.report_unit_figures)
            times["report_s"] = time.perf_counter() - t0
            log(f"[default model] 3/4 report written in {times['report_s']:.1f}s: {path}")

        log("[default model] 4/4 exporting to ONNX (parity checked against PyTorch) ...")
        t0 = time.perf_counter()
        bundle = export_bundle(
            workdir / "checkpoint",
            workdir / "interpret",
            None,
            workdir / "bundle",
            top_m=s.top_m,
            recordings=recs,
            name=DEFAULT_MODEL,
        )
        times["export_s"] = time.perf_counter() - t0
        log(f"[default model] 4/4 exported in {times['export_s']:.1f}s")
    finally:
        torch.set_num_threads(threads)
    times["total_s"] = time.perf_counter() - t_all
    return bundle.path, {k: round(v, 2) for k, v in times.items()}


@contextlib.contextmanager
def build_lock(home: str | Path, *, log: Log | None = None) -> Iterator[None]:
    """Exclusive ``home/.build.lock`` (fcntl.flock; released by the kernel if the process dies)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / BUILD_LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"[default model] another process is building it; waiting for {f.name}")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _current(reg, name: str) -> DefaultModel | None:
    version = reg.current(name)
    if version is None:
        return None
    bundle = reg.open(name, version)  # verifies every hash and the index; raises if tampered
    return DefaultModel(registry=reg.root, name=name, version=version, bundle_path=bundle.path)


def ensure_default_model(
    home: str | Path | None = None,
    data: str | Path | None = None,
    *,
    progress: bool = True,
    log: Log = print,
    settings: DefaultBuild | None = None,
    builder: Builder | None = None,
) -> DefaultModel:
    """The current version of model ``default`` in ``home``'s registry, built on first run.

    If the registry has a current ``default`` version it is verified (every file hash, and the
    manifest against the registry index; a tampered bundle raises ``BundleError`` rather than
    being silently replaced) and returned. Otherwise, under ``home/.build.lock`` (re-checked once
    held, so a concurrent caller waits and then returns the version the other one built), the
    model is built from ``data`` (default: the shipped Park sessions) with
    :func:`build_default_bundle` (or ``builder(workdir, log) -> bundle dir``), published and
    promoted. Progress lines go to ``log``; ``progress`` shows the training bar.
    """
    from models.registry import Registry

    home = Path(home) if home is not None else home_dir()
    reg = Registry(registry_dir(home))
    found = _current(reg, DEFAULT_MODEL)
    if found is not None:
        return found
    with build_lock(home, log=log):
        found = _current(reg, DEFAULT_MODEL)
        if found is not None:
            log(f"[default model] {found.version} was built by another process")
            return found
        bdir = builds_dir(home)
        bdir.mkdir(parents=True, exist_ok=True)
        for stale in bdir.glob("*.partial"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        work = bdir / f"{DEFAULT_MODEL}-{stamp}-{uuid.uuid4().hex[:6]}.partial"
        log(f"[default model] no current version in {reg.root}: building it (first run) in {work}")
        t0 = time.perf_counter()
        try:
            work.mkdir()
            if builder is not None:
                bundle_dir, times = Path(builder(work, log)), {}
            else:
                bundle_dir, times = build_default_bundle(
                    work, data, settings=settings, progress=progress, log=log
                )
            t1 = time.perf_counter()
            version = reg.publish(
                bundle_dir,
                DEFAULT_MODEL,
                promote=False,
                build={"built_at": _now(), "host": os.uname().nodename, "timings_s": times},
            )
            reg.promote(DEFAULT_MODEL, version, reason="first run: built the default model")
            times = {**times, "publish_s": round(time.perf_counter() - t1, 2)}
            times["total_s"] = round(time.perf_counter() - t0, 2)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work / "bundle", ignore_errors=True)  # the registry holds the copy
        final = work.with_name(work.name.removesuffix(".partial"))
        with contextlib.suppress(OSError):
            os.rename(work, final)
            (final / "build.json").write_text(
                json.dumps({"version": version, "timings_s": times}, indent=2) + "\n"
            )
        log(f"[default model] {DEFAULT_MODEL} {version} published and promoted in "
            f"{times['total_s']:.1f}s (checkpoint, interpret report: {final})")  # fmt: skip
        found = _current(reg, DEFAULT_MODEL)
        assert found is not None
        return DefaultModel(
            registry=found.registry,
            name=found.name,
            version=found.version,
            bundle_path=found.bundle_path,
            built=True,
            timings=times,
        )


__all__ = [
    "DEFAULT_MODEL",
    "DefaultBuild",
    "DefaultModel",
    "build_default_bundle",
    "build_lock",
    "default_interpret_config",
    "ensure_default_model",
    "home_dir",
    "load_default_recordings",
    "quick_bundle",
    "registry_dir",
    "sessions_dir",
    "simulated_recording",
]
