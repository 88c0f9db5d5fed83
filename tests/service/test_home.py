"""`service.home`: quick bundles, the ``service_home`` fixture, and the default model's first run
(reuse of a current version, the build lock across processes, failed builds)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from models.bundle import BundleError, verify_bundle
from models.registry import Registry
from service.home import (
    DEFAULT_MODEL,
    HOME_ENV,
    REPO_ROOT,
    builds_dir,
    ensure_default_model,
    home_dir,
    quick_bundle,
    registry_dir,
    sessions_dir,
)

ort = pytest.importorskip("onnxruntime")


def _tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: (mtime_ns, sha256)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (
                p.stat().st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def _never_build(workdir, log):
    raise AssertionError("ensure_default_model must not build when a current version exists")


def _window_batch(bundle, rec, n: int = 3) -> dict[str, np.ndarray]:
    """``n`` windows of ``rec`` in the bundle's input format, built from the bundle's own files."""
    from models.decoder.config import DecoderConfig
    from models.decoder.tokenizers import tokenizer_for
    from models.decoder.vocab import Vocab
    from models.decoder.windows import build_batch, trial_lower_bounds

    cfg = bundle.read_json("config.json")
    dcfg = DecoderConfig.model_validate(cfg["checkpoint"]["decoder"])
    vocab = Vocab.from_dict(bundle.read_json("vocab.json"))
    pick = np.arange(n)
    ends = rec.trials.start[pick] + 1.0
    return build_batch(
        rec,
        ends,
        tokenizer_for(dcfg),
        vocab,
        lower_times=trial_lower_bounds(rec)[pick],
        as_torch=False,
    )


# ---------------------------------------------------------------------------------------------
# paths


def test_home_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "h"))
    assert home_dir() == tmp_path / "h"
    assert registry_dir(home_dir()) == tmp_path / "h" / "registry"
    assert sessions_dir(home_dir()) == tmp_path / "h" / "sessions"
    monkeypatch.delenv(HOME_ENV)
    assert home_dir() == REPO_ROOT / ".cortexlens"
    assert (REPO_ROOT / "pyproject.toml").is_file()


def test_sim512_recording(sim512_recording):
    r = sim512_recording
    assert r.session_id == "sim512" and r.n_units == 512 and r.sampling_rate == 30.0
    assert 115 <= r.duration <= 125
    assert len(r.trials) >= 30 and np.isfinite(r.trials.direction).sum() >= 30
    assert r.unit_ids[0] == "sim512/cell0000" and r.unit_ids[-1] == "sim512/cell0511"


# ---------------------------------------------------------------------------------------------
# the service_home fixture (a quick bundle over 5 Park sessions + sim512)


def test_service_home_registry_serves_default(service_home):
    reg = Registry(service_home.registry_dir, create=False)
    assert reg.current(DEFAULT_MODEL) == service_home.version == "v0001"
    b = reg.open(DEFAULT_MODEL)  # verifies every hash and the registry index
    assert b.path == service_home.bundle_path and b.name == DEFAULT_MODEL
    assert verify_bundle(service_home.bundle_path) == []
    assert service_home.home / "registry" == service_home.registry_dir
    assert service_home.sessions_dir == service_home.home / "sessions"


def test_quick_bundle_vocab_holds_every_session(service_home, service_recordings):
    b = service_home.bundle
    vocab = b.read_json("vocab.json")
    ids = [r.session_id for r in service_recordings]
    assert vocab["session_ids"] == ids and "sim512" in ids and len(ids) == 6
    cfg = b.read_json("config.json")
    dec = cfg["checkpoint"]["decoder"]
    assert dec["tokenizer"] == "patch"
    assert dec["n_units"] == sum(r.n_units for r in service_recordings)
    assert set(dec["tasks"]) == {"direction", "temporal_frequency", "genetic"}
    assert cfg["export"]["top_m"] == 16 and cfg["export"]["method"] == "ablation"
    units = b.read_json("units.json")
    assert units["n_units"] == cfg["sae"]["n_units"] == len(units["units"])
    assert all(u["label"] == "" and u["labels"] == [] for u in units["units"])
    metrics = b.read_json("metrics.json")
    for where in ("simulated", "real"):
        assert metrics["parity"][where]["logits"] < 1e-4


def test_quick_bundle_onnx_runs_on_a_window(service_home, sim512_recording, park_recordings):
    from models.export import INPUT_NAMES, ort_session

    b = service_home.bundle
    sess = ort_session(b.read_bytes("model.onnx"), threads=1)
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    names = [o.name for o in sess.get_outputs()]
    for rec, n_tok in ((sim512_recording, 512), (park_recordings[0], park_recordings[0].n_units)):
        batch = _window_batch(b, rec, n=3)
        assert batch["mask"].shape == (3, n_tok)
        out = dict(zip(names, sess.run(None, {k: batch[k] for k in INPUT_NAMES}), strict=True))
        assert out["units"].shape == (3, 16) and out["units"].dtype == np.int64
        for t in ("direction", "temporal_frequency", "genetic"):
            np.testing.assert_allclose(out[f"{t}.probs"].sum(1), 1.0, rtol=1e-5)
            total = out[f"{t}.attributions"].sum(1) + out[f"{t}.unexplained"]
            np.testing.assert_allclose(total, out[f"{t}.logits"], atol=1e-4)
        assert out["direction.logits"].shape == (3, 8)


def test_quick_bundle_is_deterministic_by_seed(service_home, service_recordings, tmp_path):
    again = quick_bundle(service_recordings, tmp_path / "again", seed=0, name=DEFAULT_MODEL)
    first = service_home.bundle
    for f in ("decoder.safetensors", "sae.safetensors", "units.json", "vocab.json"):
        assert again.manifest.files[f].sha256 == first.manifest.files[f].sha256, f
    # model.onnx is not byte-identical across exports (graph metadata); its outputs are
    from models.export import INPUT_NAMES, ort_session

    batch = _window_batch(first, service_recordings[-1], n=2)
    feeds = {k: batch[k] for k in INPUT_NAMES}
    outs = [ort_session(b.read_bytes("model.onnx"), threads=1).run(None, feeds)
            for b in (first, again)]  # fmt: skip
    for x, y in zip(*outs, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_quick_bundle_with_labels(park_recordings, tmp_path):
    b = quick_bundle(park_recordings, tmp_path / "labelled", seed=0, epochs=2, label=True)
    assert verify_bundle(b.path) == []
    units = b.read_json("units.json")
    assert units["schema_version"] == 1 and len(units["units"]) == units["n_units"]
    assert units["method"]["controls"] == ["random_init_decoder", "shuffled_labels"]
    assert "direction" in units["summary"]
    assert b.read_json("metrics.json")["interpret"]["config"]["n_perm"] == 100


# ---------------------------------------------------------------------------------------------
# ensure_default_model


def test_ensure_default_model_returns_the_fixture_version(service_home):
    lines = []
    m = ensure_default_model(service_home.home, builder=_never_build, log=lines.append)
    assert (m.name, m.version, m.built) == (DEFAULT_MODEL, service_home.version, False)
    assert m.bundle_path == service_home.bundle_path and m.registry == service_home.registry_dir
    assert lines == []


def test_ensure_default_model_reuses_current_untouched(service_home, tmp_path, monkeypatch):
    home = tmp_path / "home"
    reg = Registry(registry_dir(home))
    v = reg.publish(service_home.bundle_path, DEFAULT_MODEL, promote=True)
    before = _tree_state(home)
    monkeypatch.setenv(HOME_ENV, str(home))
    m = ensure_default_model(builder=_never_build, log=lambda s: None)  # home from the env
    assert (m.version, m.built, m.bundle_path) == (v, False, reg.path(DEFAULT_MODEL, v))
    assert _tree_state(home) == before  # nothing written, not even the lock file
    assert not builds_dir(home).exists() and not (home / ".build.lock").exists()


def test_ensure_default_model_refuses_a_tampered_current(service_home, tmp_path):
    home = tmp_path / "home"
    reg = Registry(registry_dir(home))
    v = reg.publish(service_home.bundle_path, DEFAULT_MODEL, promote=True)
    units = reg.path(DEFAULT_MODEL, v) / "units.json"
    units.write_text(units.read_text().replace('"label": ""', '"label": "forged"', 1))
    with pytest.raises(BundleError, match="units.json"):
        ensure_default_model(home, builder=_never_build, log=lambda s: None)
    assert reg.current(DEFAULT_MODEL) == v and len(reg.list_versions(DEFAULT_MODEL)) == 1


def test_ensure_default_model_builds_publishes_and_promotes(service_home, tmp_path):
    home = tmp_path / "home"
    lines = []

    def build(workdir, log):
        log("copying the fixture bundle")
        shutil.copytree(service_home.bundle_path, workdir / "bundle")
        return workdir / "bundle"

    m = ensure_default_model(home, builder=build, log=lines.append)
    reg = Registry(registry_dir(home))
    assert m.built and m.version == "v0001" and reg.current(DEFAULT_MODEL) == "v0001"
    assert m.bundle_path == reg.path(DEFAULT_MODEL, "v0001")
    assert [h["action"] for h in reg.history(DEFAULT_MODEL)] == ["promote"]
    bundle = reg.open(DEFAULT_MODEL)
    assert "timings_s" in bundle.manifest.extra["build"]
    assert any("published and promoted" in x for x in lines)
    # the build directory is kept for audit, without a second copy of the bundle
    (bdir,) = builds_dir(home).iterdir()
    assert not bdir.name.endswith(".partial") and not (bdir / "bundle").exists()
    assert json.loads((bdir / "build.json").read_text())["version"] == "v0001"
    # a second call reuses it
    again = ensure_default_model(home, builder=_never_build, log=lambda s: None)
    assert (again.version, again.built) == ("v0001", False)


def test_failed_build_leaves_nothing_published(service_home, tmp_path):
    home = tmp_path / "home"

    def broken(workdir, log):
        (workdir / "checkpoint").mkdir()
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        ensure_default_model(home, builder=broken, log=lambda s: None)
    reg = Registry(registry_dir(home))
    assert reg.current(DEFAULT_MODEL) is None and reg.list_versions(DEFAULT_MODEL) == []
    assert list(builds_dir(home).iterdir()) == []

    def bad_bundle(workdir, log):  # fails inside publish: a bundle whose hashes do not match
        shutil.copytree(service_home.bundle_path, workdir / "bundle")
        (workdir / "bundle" / "units.json").write_text("{}")
        return workdir / "bundle"

    with pytest.raises(BundleError):
        ensure_default_model(home, builder=bad_bundle, log=lambda s: None)
    assert reg.current(DEFAULT_MODEL) is None and reg.list_versions(DEFAULT_MODEL) == []
    staging = reg.root / DEFAULT_MODEL / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []

    # the lock was released: the next call builds
    def ok(workdir, log):
        shutil.copytree(service_home.bundle_path, workdir / "bundle")
        return workdir / "bundle"

    m = ensure_default_model(home, builder=ok, log=lambda s: None)
    assert m.built and reg.current(DEFAULT_MODEL) == m.version


_RACER = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path
    from service.home import ensure_default_model

    home, src, counter, go = sys.argv[1:5]
    while not Path(go).exists():  # start both processes at the same moment
        time.sleep(0.005)

    def build(workdir, log):
        with open(counter, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to queue on it
        shutil.copytree(src, workdir / "bundle")
        return workdir / "bundle"

    lines = []
    m = ensure_default_model(home, builder=build, log=lines.append)
    print(json.dumps({"version": m.version, "built": m.built, "lines": lines}))
    """
)


def test_concurrent_first_runs_build_once(service_home, tmp_path):
    home, counter, go = tmp_path / "home", tmp_path / "builds.txt", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _RACER,
                str(home),
                str(service_home.bundle_path),
                str(counter),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )  # fmt: skip
        for _ in range(2)
    ]
    time.sleep(1.0)  # both imported and polling
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert counter.read_text().splitlines() == ["built"]  # trained once
    assert sorted(r["built"] for r in results) == [False, True]
    assert {r["version"] for r in results} == {"v0001"}
    waiter = next(r for r in results if not r["built"])
    assert any("built by another process" in x for x in waiter["lines"])
    reg = Registry(registry_dir(home))
    assert [v.version for v in reg.list_versions(DEFAULT_MODEL)] == ["v0001"]
    assert reg.current(DEFAULT_MODEL) == "v0001" and len(reg.history(DEFAULT_MODEL)) == 1
    assert reg.verify(DEFAULT_MODEL, "v0001") == []


def test_build_lock_excludes_other_processes(tmp_path):
    from service.home import build_lock

    code = textwrap.dedent(
        """
        import fcntl, sys
        f = open(sys.argv[1], "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("acquired")
        except BlockingIOError:
            print("busy")
        """
    )
    lock = tmp_path / ".build.lock"

    def probe() -> str:
        r = subprocess.run(
            [sys.executable, "-c", code, str(lock)], capture_output=True, text=True, check=True
        )
        return r.stdout.strip()

    with build_lock(tmp_path):
        assert probe() == "busy"
    assert probe() == "acquired"


# ---------------------------------------------------------------------------------------------
# the real first run


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_first_run_builds_the_default_model_from_park(tmp_path, park_dir):
    """The real first-run build (decoder with `cortexlens train` defaults, two SAE seeds, labels
    with both controls, ablations, export): ~4 minutes on 2 idle cores, ~10 on a busy box."""
    home = tmp_path / "home"
    lines = []

    def log(msg: str) -> None:  # shown with -s, and in the report of a failure
        lines.append(msg)
        print(msg, flush=True)

    m = ensure_default_model(home, park_dir, progress=False, log=log)
    print("timings (s):", dict(m.timings))
    assert m.built and m.version == "v0001"
    for step in ("load_s", "train_s", "interpret_s", "export_s", "publish_s", "total_s"):
        assert m.timings[step] >= 0, step
    assert any("2/4 decoder trained" in x for x in lines)
    reg = Registry(registry_dir(home))
    b = reg.open(DEFAULT_MODEL)
    units = b.read_json("units.json")
    assert units["schema_version"] == 1 and units["method"]["controls"] == [
        "random_init_decoder",
        "shuffled_labels",
    ]
    metrics = b.read_json("metrics.json")
    assert metrics["checkpoint"]["test_acc"]["direction"] > 0.125 + 0.05  # above chance
    assert metrics["interpret"]["controls"]["random_init"] is not None
    assert len(b.provenance["checkpoint"]["sources"]) == 5
    (bdir,) = builds_dir(home).iterdir()
    assert (bdir / "interpret" / "report.html").is_file()
    assert (bdir / "checkpoint" / "train_log.jsonl").is_file()
    again = ensure_default_model(home, builder=_never_build, log=lambda s: None)
    assert (again.version, again.built) == ("v0001", False)
