"""A tiny training run through the real CLI, on two real Park sessions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.decoder.checkpoint import Checkpoint
from models.decoder.predict import predict_trials
from service.cli import main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, park_files):
    out = tmp_path_factory.mktemp("ck") / "decoder"
    files = [str(p) for p in park_files[:2]]
    try:
        main(["train", *files, "--out", str(out), "--epochs", "2", "--seed", "3", "--quiet",
              "--dim", "32", "--latents", "4", "--depth", "1", "--threads", "1"])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def test_train_cli_writes_a_complete_checkpoint(tiny_ckpt, park_recordings):
    for name in (
        "config.json",
        "decoder.safetensors",
        "vocab.json",
        "splits.json",
        "train_log.jsonl",
        "learning_curve.png",
    ):
        assert (tiny_ckpt / name).is_file(), name
    lines = [json.loads(x) for x in (tiny_ckpt / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines[:-1]] == [1, 2]
    assert lines[-1]["event"] == "done" and "direction" in lines[-1]["test_acc"]
    ck = Checkpoint.load(tiny_ckpt)
    assert ck.config.training.seed == 3 and ck.config.decoder.dim == 32
    assert ck.vocab.genetic_classes == ["KO"]  # both sessions KO: no genetic task
    assert set(ck.tasks) == {"direction"}
    rec = park_recordings[0]
    split = ck.splits[rec.session_id]
    # splits by trial: disjoint, and test trials are whole trials
    assert not set(split.train) & set(split.test) and not set(split.val) & set(split.test)
    probs = predict_trials(ck, rec, split.test)
    assert probs["direction"].shape == (len(split.test), 8)
    np.testing.assert_allclose(probs["direction"].sum(1), 1.0, rtol=1e-5)


def test_train_cli_bad_input_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "missing.mat"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def test_adapt_cli_on_a_left_out_session(tiny_ckpt, park_files, tmp_path):
    new = str(park_files[3])  # not among the two training sessions
    out = tmp_path / "adapted"
    js = tmp_path / "adapt.json"
    try:
        main(["adapt", str(tiny_ckpt), new, "--out", str(out), "--trials", "8", "--steps", "5",
              "--curve", "4,8", "--json", str(js), "--threads", "1"])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None)
    res = json.loads(js.read_text())
    assert len(res) == 1 and res[0]["n_trials"] == 8
    assert [r["n_trials"] for r in res[0]["curve"]] == [4, 8]
    assert 0 <= res[0]["direction_acc"] <= 1
    ck = Checkpoint.load(out)
    base = Checkpoint.load(tiny_ckpt)
    assert ck.vocab.n_sessions == base.vocab.n_sessions + 1
    assert ck.vocab.session_genetic[ck.vocab.session_ids[-1]] == ""


def test_training_is_reproducible_with_a_seed():
    import torch

    from models.decoder.config import DecoderConfig, TrainConfig
    from models.train import train
    from tests.models.decoder.conftest import make_recording

    recs = [make_recording("a", n_trials=24, seed=0), make_recording("b", n_trials=24, seed=1)]
    cfg = TrainConfig(epochs=2, seed=4, threads=1, batch_size=16)
    dcfg = DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=2)
    (c1, s1), (c2, s2) = (
        train(recs, None, decoder_config=dcfg, train_config=cfg, progress=False) for _ in range(2)
    )
    for k, v in c1.model.state_dict().items():
        torch.testing.assert_close(v, c2.model.state_dict()[k], rtol=0, atol=0)
    assert s1["test_acc"] == s2["test_acc"]


def test_weight_averaging_and_direct_path_train():
    from models.decoder.config import DecoderConfig, TrainConfig
    from models.train import train
    from tests.models.decoder.conftest import make_recording

    recs = [make_recording("a", n_trials=24, seed=0), make_recording("b", n_trials=24, seed=1)]
    cfg = TrainConfig(epochs=2, seed=4, threads=1, batch_size=16, ema_decay=0.9)
    dcfg = DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=2, direct_path=True)
    ckpt, summary = train(recs, None, decoder_config=dcfg, train_config=cfg, progress=False)
    assert ckpt.model.direct_proj is not None
    assert summary["epochs_run"] == 2 and 0 <= summary["test_acc"]["direction"] <= 1
