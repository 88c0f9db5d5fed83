"""`models.export`: decoder + spliced SAE + ablation attribution as one ONNX graph, and the bundle.

A tiny (untrained) checkpoint over two real Park sessions (different cell counts) and a small
SAE trained in-test on its latents; parity ONNX Runtime vs PyTorch within 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.decoder.checkpoint import Checkpoint
from models.decoder.config import CheckpointConfig, DecoderConfig, TrainConfig
from models.decoder.model import Decoder
from models.decoder.windows import build_batch
from models.export import (
    INPUT_NAMES,
    ExplainedDecoder,
    export_bundle,
    export_onnx,
    ort_session,
    parity,
    real_windows,
    run_ort,
    simulated_batch,
)
from models.sae import SAEConfig, SAETrainConfig, train_sae
from models.splits import split_all

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def recs(park_recordings):
    return list(park_recordings[:2])


@pytest.fixture(scope="module")
def setup(recs, tmp_path_factory):
    """(checkpoint dir, SAE dir, ExplainedDecoder, onnx path) — exported once per module."""
    from models.train import build_vocab, set_unit_stats, task_sizes

    torch.set_num_threads(1)
    vocab = build_vocab(recs)
    dcfg = DecoderConfig(
        dim=16, dim_head=8, depth=1, num_latents=4, n_units=vocab.n_units,
        n_sessions=vocab.n_sessions, tasks=task_sizes(recs, vocab.genetic_classes), dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(dcfg).eval()
    for r in recs:
        set_unit_stats(model, vocab, r)
    splits = split_all(recs, seed=0, val_fraction=0.125, test_fraction=0.25)
    ckpt = Checkpoint(
        model,
        CheckpointConfig(decoder=dcfg, training=TrainConfig(seed=0), sources=["park-test"]),
        vocab,
        splits,
    )
    root = tmp_path_factory.mktemp("export")
    ckpt.save(root / "ckpt")
    (root / "ckpt" / "train_log.jsonl").write_text(
        json.dumps({"epoch": 1}) + "\n" + json.dumps({"event": "done", "test_acc": {}}) + "\n"
    )
    # SAE on the latents of some training windows
    lat = []
    with torch.no_grad():
        for r in recs:
            ends = r.trials.start[:24] + 1.0
            lat.append(model.encode(build_batch(r, ends, ckpt.tokenizer, vocab)))
    z = torch.cat(lat)
    sae, _ = train_sae(
        z, SAEConfig(d_in=16, n_units=32, k=4), SAETrainConfig(steps=30, batch_size=256)
    )
    sae.save(root / "sae")
    explained = ExplainedDecoder(model, sae, top_m=6).eval()
    path = export_onnx(explained, root / "model.onnx")
    return root / "ckpt", root / "sae", explained, path


def test_explained_logits_equal_the_plain_decoder(setup, recs):
    ckpt_dir, _, ex, _ = setup
    b = real_windows(Checkpoint.load(ckpt_dir), recs[:1])[0]
    out = ex.run_dict(b)
    with torch.no_grad():
        plain = ex.decoder.forward_batch(b)
    for t in ex.task_names:
        torch.testing.assert_close(out[f"{t}.logits"], plain[t], rtol=0, atol=1e-5)
        total = out[f"{t}.attributions"].sum(1) + out[f"{t}.unexplained"]
        torch.testing.assert_close(total, out[f"{t}.logits"], rtol=0, atol=1e-5)
    assert out["units"].dtype == torch.int64 and out["units"].shape == (b["mask"].shape[0], 6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_parity_on_park_windows(setup, recs, batch_size):
    ckpt_dir, _, ex, path = setup
    ckpt = Checkpoint.load(ckpt_dir)
    sess = ort_session(path, threads=1)
    batches = real_windows(ckpt, recs, per_session=batch_size, seed=batch_size)
    cells = {int(b["mask"].shape[1]) for b in batches}
    assert len(cells) == 2  # two sessions, two cell counts: the token dim is dynamic
    assert all(b["mask"].shape[0] == batch_size for b in batches)
    p = parity(ex, sess, batches)
    assert p["logits"] < TOL and p["attributions"] < TOL and p["probs"] < TOL
    assert p["additivity"] < TOL and p["unexplained"] < TOL
    assert p["units_mismatch"] == 0.0
    assert p["plain_decoder_logits"] < 1e-5


def test_onnx_parity_on_simulated_windows_with_padding(setup):
    _, _, ex, path = setup
    sess = ort_session(path)
    batches = [
        simulated_batch(ex.decoder, 1, 3, seed=5),
        simulated_batch(ex.decoder, 3, 40, seed=6, n_pad=7),
    ]
    p = parity(ex, sess, batches)
    assert max(p["logits"], p["attributions"], p["additivity"]) < TOL
    got = run_ort(sess, batches[1])
    names = [i.name for i in sess.get_inputs()]
    assert names == list(INPUT_NAMES)
    t = ex.task_names[0]
    c = ex.decoder.config.tasks[t]
    assert got["units"].dtype == np.int64 and got["units"].shape == (3, 6)
    assert got[f"{t}.attributions"].shape == (3, 6, c)
    np.testing.assert_allclose(got[f"{t}.probs"].sum(1), 1.0, rtol=1e-5)


def test_export_bundle_is_verified_and_loads(setup, recs, tmp_path):
    from models.bundle import Bundle, verify_bundle

    ckpt_dir, sae_dir, _, _ = setup
    units = tmp_path / "units.json"
    units.write_text(json.dumps({"units": [{"id": 0, "label": None}]}))
    bundle = export_bundle(ckpt_dir, sae_dir, units, tmp_path / "b1", top_m=5, recordings=recs)
    out = tmp_path / "b1"
    assert verify_bundle(out) == []
    for f in ("model.onnx", "decoder.safetensors", "sae.safetensors", "config.json",
              "units.json", "metrics.json", "manifest.json", "vocab.json"):  # fmt: skip
        assert (out / f).is_file(), f
    metrics = bundle.read_json("metrics.json")
    for where in ("simulated", "real"):
        p = metrics["parity"][where]
        assert p["logits"] < TOL and p["attributions"] < TOL and p["additivity"] < TOL
    assert metrics["checkpoint"]["event"] == "done"
    cfg = bundle.read_json("config.json")
    assert cfg["export"]["method"] == "ablation" and cfg["export"]["top_m"] == 5
    prov = bundle.provenance
    assert prov["checkpoint"]["sources"] == ["park-test"]
    assert len(prov["checkpoint"]["sha256"]["decoder.safetensors"]) == 64
    # ORT loads the verified bytes
    b2 = Bundle.open(out)
    sess = ort_session(b2.read_bytes("model.onnx"))
    batch = real_windows(Checkpoint.load(ckpt_dir), recs[1:], per_session=2)[0]
    got = run_ort(sess, batch)
    assert got["units"].shape == (2, 5)


def test_fixed_shape_graphs_in_a_bundle_match_pytorch_through_their_padding(setup, recs, tmp_path):
    from models.bundle import verify_bundle
    from models.export import fixed_model_file
    from models.runtime import FixedShapeRunner

    ckpt_dir, sae_dir, _, _ = setup
    ckpt = Checkpoint.load(ckpt_dir)
    cells = max(r.n_units for r in recs)
    shapes = [(1, cells), (3, cells + 5)]
    bundle = export_bundle(
        ckpt_dir, sae_dir, None, tmp_path / "b", top_m=5, recordings=recs, fixed_shapes=shapes
    )
    assert verify_bundle(tmp_path / "b") == []
    listed = bundle.read_json("config.json")["export"]["fixed_shapes"]
    assert [(d["batch"], d["tokens"], d["file"]) for d in listed] == [
        (b, n, fixed_model_file(b, n)) for b, n in shapes
    ]
    par = bundle.read_json("metrics.json")["parity"]
    for b, n in shapes:
        p = par[f"fixed_{b}x{n}"]
        assert max(p["logits"], p["attributions"], p["additivity"]) < TOL, (b, n, p)
    # against the dynamic graph of the same bundle, on real windows smaller than the graph
    dyn = ort_session(bundle.read_bytes("model.onnx"))
    runner = FixedShapeRunner(ort_session(bundle.read_bytes(fixed_model_file(3, cells + 5))))
    assert (runner.batch, runner.tokens) == (3, cells + 5)
    for batch in real_windows(ckpt, recs, per_session=2, seed=4):
        want, got = run_ort(dyn, batch), run_ort(runner, batch)
        assert got["units"].shape == (2, 5)
        np.testing.assert_array_equal(got["units"], want["units"])
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOL, err_msg=k)


def test_export_cli(setup, tmp_path):
    import typer
    from typer.testing import CliRunner

    from service.cli.export import register

    ckpt_dir, sae_dir, _, _ = setup
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "export" as a subcommand
        pass

    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        app, ["export", str(ckpt_dir), "--out", str(out), "--sae", str(sae_dir), "--top-m", "4"]
    )
    assert r.exit_code == 0, r.output
    from models.bundle import verify_bundle

    assert verify_bundle(out) == []
    units = json.loads((out / "units.json").read_text())
    assert units["units"] == []  # no units file given: labels absent, said so
    r = CliRunner().invoke(app, ["export", str(ckpt_dir), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--sae" in r.output
    args = ["export", str(ckpt_dir), "--sae", str(sae_dir), "--top-m", "4", "--out"]
    r = CliRunner().invoke(app, [*args, str(tmp_path / "f"), "--fixed-shape", "2x12"])
    assert r.exit_code == 0, r.output
    assert "fixed_2x12" in r.output and (tmp_path / "f" / "model.b2.t12.onnx").is_file()
    for bad in ("2x", "0x12", "2by12", "-1x3"):
        r = CliRunner().invoke(app, [*args, str(tmp_path / "g"), "--fixed-shape", bad])
        assert r.exit_code == 2 and "BATCHxTOKENS" in r.output, (bad, r.output)
        assert not (tmp_path / "g").exists()


def test_models_export_imports_no_service_layer():
    import subprocess
    import sys

    code = (
        "import sys, models.export; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('service', 'ray', 'grpc')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
