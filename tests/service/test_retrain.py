"""Retraining jobs (service.retrain): durable job state, recorded sessions, the three job kinds,
promotion gates, cancellation, rollback, and a fine-tune across 2 Ray Train workers.

The model is tiny (``quick_bundle`` on two simulated 64-cell sessions, built once per module)
and the recorded session is a simulated 3-minute session written through ``FrameRecord`` with
its trials in ``trials.jsonl``, so each job takes about a minute on 2 cores (most of it the
ONNX export of the candidate).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.retrain import (
    INTERRUPTED_MESSAGE,
    GateConfig,
    JobCancelled,
    JobSpec,
    JobStore,
    apply_gates,
    execute_job,
    load_session,
    run_job,
)

LENIENT = {"max_fvu": 10.0, "max_dead_fraction": 1.0}


def write_session(home: Path, rec, *, chunk: int = 64, trials: bool = True) -> Path:
    """Record ``rec``'s frames as a live session would (FrameRecord) + its trials.jsonl."""
    from service.ingest import FrameRecord

    d = home / "sessions" / rec.session_id
    fr = FrameRecord.create(
        d,
        session_id=rec.session_id,
        unit_ids=rec.unit_ids,
        frame_rate_hz=rec.sampling_rate,
        sync=False,
    )
    idx = np.arange(rec.n_frames)
    for s in range(0, rec.n_frames, chunk):
        fr.append(idx[s : s + chunk], rec.timestamps[s : s + chunk], rec.traces[s : s + chunk])
    fr.mark_closed()
    fr.close()
    if trials:
        t = rec.trials
        with open(d / "trials.jsonl", "w") as f:
            for i in range(len(t)):
                tf, dr = t.temporal_frequency[i], t.direction[i]
                row = {
                    "start": float(t.start[i]),
                    "end": float(t.end[i]),
                    "direction": float(dr) if np.isfinite(dr) else None,
                    "temporal_frequency": float(tf) if np.isfinite(tf) else None,
                }
                f.write(json.dumps(row) + "\n")
    return d


@pytest.fixture(scope="module")
def live_recording():
    from service.home import simulated_recording

    return simulated_recording("live1", n_cells=64, minutes=3.0, seed=5)


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory, live_recording):
    """A home whose registry holds a tiny ``default`` v0001 (promoted) and the recorded
    session ``live1``. Copy it (``fresh_home``) before changing anything."""
    from models.registry import Registry
    from service.home import quick_bundle, simulated_recording

    root = tmp_path_factory.mktemp("retrain")
    home = root / "home"
    recs = [
        simulated_recording(f"sim{c}", n_cells=64, minutes=3.0, seed=i) for i, c in enumerate("AB")
    ]
    b = quick_bundle(recs, root / "quick", epochs=3, seed=0, name="default", sae_units=64, sae_k=4)
    Registry(home / "registry").publish(b.path, "default", promote=True)
    write_session(home, live_recording)
    return home


@pytest.fixture
def fresh_home(tiny_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    return home


# ---------------------------------------------------------------------------------------------
# job store


def test_job_store_is_durable_and_recovers(tmp_path):
    store = JobStore(tmp_path / "jobs")
    a = store.create(JobSpec(kind="adapt", session_ids=["s1"]))
    b = store.create(JobSpec(kind="finetune", session_ids=["s1", "s2"], workers=2))
    c = store.create(JobSpec(kind="sae_refit", session_ids=["s2"]))
    assert a["state"] == "QUEUED" and a["spec"]["gates"]["tasks"] == ["direction"]
    store.update(a["job_id"], state="RUNNING", progress=0.4, message="adapting")
    store.update(c["job_id"], state="RUNNING")
    store.update(
        c["job_id"],
        state="SUCCEEDED",
        progress=1.0,
        promoted=True,
        candidate_version="v0002",
        result={"x": 1},
    )
    got = store.get(a["job_id"])
    assert got["started_at"] and got["progress"] == 0.4 and got["message"] == "adapting"
    assert store.get(c["job_id"])["finished_at"]
    with pytest.raises(ValueError, match="unknown job state"):
        store.update(a["job_id"], state="DONE")
    with pytest.raises(KeyError):
        store.get("nope")
    assert not list((tmp_path / "jobs").glob(".*.tmp"))  # atomic writes leave nothing behind

    # "restart": a new store on the same directory sees everything and fails the active jobs
    store2 = JobStore(tmp_path / "jobs")
    assert [r["job_id"] for r in store2.list()] == [a["job_id"], b["job_id"], c["job_id"]]
    assert sorted(store2.recover()) == sorted([a["job_id"], b["job_id"]])
    for jid in (a["job_id"], b["job_id"]):
        r = store2.get(jid)
        assert r["state"] == "FAILED" and r["message"] == INTERRUPTED_MESSAGE and r["finished_at"]
    assert store2.get(c["job_id"])["state"] == "SUCCEEDED"
    assert store2.get(c["job_id"])["result"] == {"x": 1}
    assert store2.recover() == []
    spec = JobSpec.model_validate(store2.get(b["job_id"])["spec"])
    assert spec.workers == 2 and spec.session_ids == ["s1", "s2"]


def test_job_spec_validation():
    with pytest.raises(ValueError):
        JobSpec(kind="distill", session_ids=["a"])
    with pytest.raises(ValueError):
        JobSpec(kind="adapt", session_ids=[])
    with pytest.raises(ValueError):
        JobSpec(kind="adapt", session_ids=["a"], gates={"max_fvu": 0.1, "typo": 1})


def test_gates_print_their_numbers():
    ev = {
        "direction": {
            "serving": {"accuracy": 0.5},
            "candidate": {"accuracy": 0.625},
            "n_trials": 16,
        }
    }
    ok, rules, text = apply_gates(GateConfig(), ev, {"fvu": 0.1, "dead_fraction": 0.2})
    assert ok and text.startswith("PASS") and "0.625" in text and "0.500" in text
    ok, rules, text = apply_gates(
        GateConfig(min_accuracy_delta=0.2), ev, {"fvu": 0.3, "dead_fraction": 0.2}
    )
    assert not ok and text.startswith("REFUSED: 2 gate(s) failed")
    assert "candidate 0.625 < serving 0.500 + +0.200 = 0.700" in text
    assert "SAE FVU 0.300 > 0.200" in text
    ok, _, text = apply_gates(
        GateConfig(tasks=["temporal_frequency"]), ev, {"fvu": 0.1, "dead_fraction": 0}
    )
    assert not ok and "no labelled held-out trials" in text
    ev["direction"]["chance"] = 0.125
    ok, _, text = apply_gates(GateConfig(min_over_chance=0.6), ev, {"fvu": 0.1, "dead_fraction": 0})
    assert not ok and "candidate 0.625 < chance 0.125 + +0.600 = 0.725" in text


# ---------------------------------------------------------------------------------------------
# recorded sessions


def test_load_session_from_record_and_trials(tmp_path, live_recording):
    from service.ingest import IngestError

    home = tmp_path / "home"
    write_session(home, live_recording)
    rec = load_session(home, "live1")
    assert rec.session_id == "live1" and rec.n_units == 64
    assert rec.n_frames == live_recording.n_frames
    np.testing.assert_allclose(rec.traces, live_recording.traces)
    np.testing.assert_allclose(rec.trials.start, live_recording.trials.start)
    np.testing.assert_allclose(rec.trials.direction, live_recording.trials.direction)
    np.testing.assert_allclose(
        rec.trials.temporal_frequency, live_recording.trials.temporal_frequency
    )
    assert len(rec.metadata["retrain"]["record_sha256"]) == 64

    with pytest.raises(IngestError, match="no frame record"):
        load_session(home, "missing")
    write_session(home, live_recording.replace(session_id="notrials"), trials=False)
    with pytest.raises(ValueError, match="no labelled trials"):
        load_session(home, "notrials")
    (home / "sessions" / "notrials" / "trials.jsonl").write_text('{"start": 1e6, "end": 1e6 + 2}')
    with pytest.raises(ValueError, match="not a trial"):
        load_session(home, "notrials")
    (home / "sessions" / "notrials" / "trials.jsonl").write_text(
        '{"start": 1e6, "end": 1000002, "direction": 90, "temporal_frequency": null}\n'
    )
    with pytest.raises(ValueError, match="inside the recorded frames"):
        load_session(home, "notrials")


# ---------------------------------------------------------------------------------------------
# jobs


def _check_published(home: Path, result: dict, job_id: str, kind: str) -> None:
    from models.registry import Registry

    reg = Registry(home / "registry")
    b = reg.open("default", result["candidate_version"])
    assert b.parent == result["parent_version"] == "v0001"
    prov = b.provenance["retrain"]
    assert prov["job_id"] == job_id and prov["kind"] == kind and prov["parent"] == "v0001"
    assert len(prov["sessions"]["live1"]["record_sha256"]) == 64
    assert prov["decision"] in result["decision"]
    metrics = b.read_json("metrics.json")
    assert metrics["interpret"]["retrain"]["evaluation"] == result["evaluation"]
    ev = result["evaluation"]["direction"]
    assert ev["n_trials"] == result["data"]["job_sessions"]["live1"]["split"]["test"] > 0
    assert 0 <= ev["serving"]["accuracy"] <= 1 and 0 <= ev["candidate"]["accuracy"] <= 1
    assert result["promoted"] == all(r["passed"] for r in result["rules"])
    assert reg.current("default") == (
        result["candidate_version"] if result["promoted"] else "v0001"
    )
    assert set(result["durations_s"]) >= {"load_data_s", "evaluate_s", "export_s", "total_s"}


@pytest.mark.slow
def test_adapt_job_refused_when_worse_then_sae_refit_promoted_and_rollback(fresh_home):
    from models.registry import Registry

    home = fresh_home
    store = JobStore(home / "jobs")
    # a candidate that cannot be at least serving + 1.0: refused, with the numbers
    spec = JobSpec(
        kind="adapt", session_ids=["live1"], epochs=1, gates={**LENIENT, "min_accuracy_delta": 1.0}
    )
    job = store.create(spec)
    seen = []
    rec = execute_job(store, job["job_id"], home=home, min_interval_s=0.0)
    assert rec["state"] == "SUCCEEDED", rec["error"]
    res = rec["result"]
    _check_published(home, res, job["job_id"], "adapt")
    assert not rec["promoted"] and rec["candidate_version"] == "v0002"
    assert rec["decision"].startswith("REFUSED") and "+1.000" in rec["decision"]
    ev = res["evaluation"]["direction"]
    assert f"candidate {ev['candidate']['accuracy']:.3f} <" in rec["decision"]
    assert res["sae"]["sae_source"] == "carried over from v0001"
    assert "random_init" in res["sae"]["controls"] and "shuffled" in res["sae"]["controls"]
    assert res["training"]["adapted_sessions"] == ["live1"]
    reg = Registry(home / "registry")
    assert reg.current("default") == "v0001"
    # the adapted decoder: only the new rows changed
    from models.decoder.from_bundle import checkpoint_from_bundle

    old = checkpoint_from_bundle(reg.open("default", "v0001"))
    new = checkpoint_from_bundle(reg.open("default", "v0002"))
    assert new.vocab.has_session("live1") and not old.vocab.has_session("live1")
    for k, v in old.model.state_dict().items():
        w = new.model.state_dict()[k]
        if k in ("unit_emb.weight", "session_emb.weight", "unit_loc", "unit_scale"):
            w = w[: v.shape[0]]
        assert (w == v).all(), k
    # units move with versions: the adapted bundle carries its parent's units
    assert new_units_match(reg)

    # SAE refit with lenient gates: promoted (the serving version does not know live1, so its
    # embeddings are adapted first)
    spec = JobSpec(kind="sae_refit", session_ids=["live1"], epochs=1, gates=LENIENT)
    res = run_job(
        spec,
        home=home,
        job_id="refit1",
        progress=lambda f, m: seen.append((f, m)),
        cancelled=lambda: False,
    )
    _check_published(home, res, "refit1", "sae_refit")
    assert res["promoted"] and res["candidate_version"] == "v0003"
    assert reg.current("default") == "v0003"
    assert res["sae"]["sae"]["fvu"] < 10 and "labels" in res["sae"]
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0
    # rollback to the earlier version is one call
    assert reg.rollback("default") == "v0001" and reg.current("default") == "v0001"
    assert reg.rollback("default", to="v0003") == "v0003"


def new_units_match(reg) -> bool:
    a = reg.open("default", "v0001").read_json("units.json")
    b = reg.open("default", "v0002").read_json("units.json")
    return a["units"] == b["units"] and b["retrain_check"]["parent"] == "v0001"


@pytest.mark.slow
def test_cancelled_job_publishes_and_promotes_nothing(fresh_home):
    from models.registry import Registry

    store = JobStore(fresh_home / "jobs")
    job = store.create(JobSpec(kind="sae_refit", session_ids=["live1"], gates=LENIENT))
    calls = []

    def cancelled() -> bool:  # cancel as the training step starts
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobCancelled):
        run_job(
            JobSpec.model_validate(job["spec"]),
            home=fresh_home,
            job_id=job["job_id"],
            progress=lambda f, m: None,
            cancelled=cancelled,
        )
    reg = Registry(fresh_home / "registry")
    assert [v.version for v in reg.list_versions("default")] == ["v0001"]
    assert reg.current("default") == "v0001"
    rec = execute_job(store, job["job_id"], home=fresh_home, cancelled=lambda: True)
    assert rec["state"] == "CANCELLED" and not rec["promoted"]
    assert [v.version for v in reg.list_versions("default")] == ["v0001"]


@pytest.mark.slow
def test_failed_job_is_recorded(fresh_home):
    store = JobStore(fresh_home / "jobs")
    job = store.create(JobSpec(kind="adapt", session_ids=["nosuch"]))
    rec = execute_job(store, job["job_id"], home=fresh_home)
    assert rec["state"] == "FAILED" and "nosuch" in rec["message"] and rec["error"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():  # another module's instance: use it, leave it running
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_finetune_with_two_ray_train_workers(fresh_home, local_ray):
    from models.registry import Registry

    msgs = []
    spec = JobSpec(kind="finetune", session_ids=["live1"], workers=2, epochs=2, gates=LENIENT)
    res = run_job(
        spec,
        home=fresh_home,
        job_id="ft2",
        progress=lambda f, m: msgs.append(m),
        cancelled=lambda: False,
    )
    tr = res["training"]
    assert tr["runner"] == "ray.train.torch.TorchTrainer"
    assert tr["world_size"] == 2
    assert {r["world_size"] for r in tr["epoch_log"]} == {2} and len(tr["epoch_log"]) == 2
    assert any("on 2 workers" in m for m in msgs)
    _check_published(fresh_home, res, "ft2", "finetune")
    reg = Registry(fresh_home / "registry")
    b = reg.open("default", res["candidate_version"])
    assert b.provenance["retrain"]["workers"] == 2
    assert res["promoted"] and reg.current("default") == res["candidate_version"]


@pytest.mark.slow
@pytest.mark.ray
def test_finetune_cancelled_on_ray_workers(fresh_home, local_ray):
    from models.registry import Registry

    state = {"cancel": False}

    def progress(fraction: float, text: str) -> None:
        if "on 2 workers" in text:  # the first epoch has been reported by the workers
            state["cancel"] = True

    spec = JobSpec(kind="finetune", session_ids=["live1"], workers=2, epochs=500, gates=LENIENT)
    with pytest.raises(JobCancelled, match="distributed fine-tune"):
        run_job(
            spec,
            home=fresh_home,
            job_id="ftc",
            progress=progress,
            cancelled=lambda: state["cancel"],
        )
    reg = Registry(fresh_home / "registry")
    assert [v.version for v in reg.list_versions("default")] == ["v0001"]
    assert reg.current("default") == "v0001"
    assert not list((fresh_home / "jobs" / ".work").iterdir())  # scratch removed


@pytest.mark.slow
def test_inline_finetune_and_checkpoint_from_bundle(tiny_home, tmp_path):
    import torch

    from models.decoder.config import TrainConfig
    from models.decoder.from_bundle import checkpoint_from_bundle, sae_from_bundle
    from models.registry import Registry
    from models.splits import split_trials
    from service.home import simulated_recording
    from service.retrain.distributed import finetune_decoder

    b = Registry(tiny_home / "registry").open("default", "v0001")
    ckpt = checkpoint_from_bundle(b)
    assert sae_from_bundle(b).cfg.n_units == 64
    rec = simulated_recording("simA", n_cells=64, minutes=3.0, seed=0)  # a session it knows
    splits = {"simA": split_trials(rec, seed=0)}
    tcfg = TrainConfig(epochs=1, windows_per_trial=1, batch_size=32, warmup_epochs=0)
    msgs = []
    new, info = finetune_decoder(
        ckpt,
        [rec],
        splits,
        tcfg,
        workers=1,
        storage=tmp_path,
        progress=lambda f, m: msgs.append((f, m)),
    )
    assert info["runner"] == "inline" and info["world_size"] == 1
    assert msgs[-1][0] == 1.0 and "inline" in msgs[-1][1]
    before, after = ckpt.model.state_dict(), new.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert new.vocab.session_ids == ckpt.vocab.session_ids
