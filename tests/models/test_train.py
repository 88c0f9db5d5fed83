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
    assert [r["epoch"] for r in lines[:-1] if r.get("stage") != "finetune"] == [1, 2]
    # then the embedding-only stage (on by default), at most as many epochs as training
    assert [r["epoch"] for r in lines[:-1] if r.get("stage") == "finetune"] in ([3], [3, 4])
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


def test_selection_key_on_validation_nll_ignores_genetic_and_accuracy():
    from models.decoder.config import TrainConfig
    from models.train import selection_key

    a = {"acc": {"direction": 0.9}, "nll": {"direction": 1.5, "genetic": 0.0}}
    b = {"acc": {"direction": 0.5}, "nll": {"direction": 1.0, "genetic": 3.0}}
    nll, acc = TrainConfig(select_on="nll"), TrainConfig(select_on="accuracy")
    assert selection_key(b, 9.0, nll) > selection_key(a, 9.0, nll)  # lower trial-task NLL wins
    assert selection_key(a, 9.0, acc) > selection_key(b, 9.0, acc)  # higher accuracy wins
    assert selection_key(None, 2.0, nll) > selection_key(None, 3.0, nll)  # no val: train loss


def test_finetune_stage_changes_only_embeddings_and_keeps_improvements():
    import torch

    from models.decoder.config import DecoderConfig, TrainConfig
    from models.train import train
    from tests.models.decoder.conftest import make_recording

    recs = [make_recording("a", n_trials=24, seed=0), make_recording("b", n_trials=24, seed=1)]
    dcfg = DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=2)
    kw = {"epochs": 2, "seed": 4, "threads": 1, "batch_size": 16, "select_on": "nll"}
    plain, _ = train(
        recs, None, decoder_config=dcfg, train_config=TrainConfig(**kw), progress=False
    )
    ft, summary = train(
        recs,
        None,
        decoder_config=dcfg,
        train_config=TrainConfig(**kw, finetune_epochs=3, finetune_lr=0.05, val_stride=3),
        progress=False,
    )
    p, f = plain.model.state_dict(), ft.model.state_dict()
    emb = {"unit_emb.weight", "session_emb.weight"}
    for k in p:
        if k not in emb:
            torch.testing.assert_close(f[k], p[k], rtol=0, atol=0)  # shared weights frozen
    kept = summary["best_epoch"]
    assert 1 <= kept <= 5
    if kept > 2:  # a fine-tuning epoch improved validation NLL: its embeddings were kept
        assert any(not torch.equal(f[k], p[k]) for k in emb)
    else:
        assert all(torch.equal(f[k], p[k]) for k in emb)
    assert all(q.requires_grad for q in ft.model.parameters())  # restored after the stage


def test_validation_stride_keeps_the_last_window_of_each_trial():
    from models.decoder.vocab import Vocab
    from models.decoder.windows import SessionData, decode_frames, trial_windows
    from tests.models.decoder.conftest import make_recording

    rec = make_recording("a", n_trials=6, seed=0)
    vocab = Vocab(genetic_classes=[])
    vocab.add_recording(rec, genetic="", how="trained")
    sd = SessionData.build(rec, vocab)
    own1, fr1 = trial_windows(sd, [0, 2], 0.5)
    own3, fr3 = trial_windows(sd, [0, 2], 0.5, stride=3)
    for k, tr in enumerate([0, 2]):
        all_fr = decode_frames(rec, tr, 0.5)
        got = [f for o, f in zip(own3, fr3, strict=True) if o == k]
        assert got[-1] == all_fr[-1] and len(got) == -(-all_fr.size // 3)
        assert set(got) <= set(all_fr.tolist())
    assert len(fr1) == sum(decode_frames(rec, t, 0.5).size for t in (0, 2))


def test_tuning_vectors_find_each_cells_preferred_direction():
    from models.train import tuning_vectors
    from tests.models.decoder.conftest import make_recording

    rec = make_recording("a", n_cells=10, n_trials=32, tf=True, seed=2)
    r = tuning_vectors(rec, np.arange(24))
    assert r.shape == (10, 13)
    # the recording's cells respond most to their preferred direction: recover it from the
    # training trials only; directions are centred (sum to ~0 over the 8 classes)
    resp = np.stack([rec.traces[(rec.timestamps >= s) & (rec.timestamps < e)].mean(0)
                     for s, e in zip(rec.trials.start, rec.trials.end, strict=True)])  # fmt: skip
    want = np.array([np.argmax([resp[d::8][:3].mean(0)[c] for d in range(8)]) for c in range(10)])
    np.testing.assert_array_equal(r[:, :8].argmax(1), want)
    np.testing.assert_allclose(r[:, :8].sum(1), 0, atol=1e-4)
    assert np.abs(r[:, 8:]).max() < np.abs(r[:, :8]).max()  # untuned to temporal frequency
    assert not tuning_vectors(rec, np.array([], dtype=int)).any()


def test_tuning_init_sets_the_gain_half_deterministically():
    import torch

    from models.decoder.config import DecoderConfig
    from models.decoder.model import Decoder
    from models.train import TUNING_SEED, build_vocab, init_units_from_tuning, tuning_vectors
    from tests.models.decoder.conftest import make_recording

    recs = [make_recording("a", n_trials=24, seed=0), make_recording("b", n_trials=24, seed=1)]
    vocab = build_vocab(recs)
    model = Decoder(DecoderConfig(dim=16, dim_head=8, n_units=vocab.n_units, n_sessions=2))
    before = model.unit_emb.weight.detach().clone()
    init_units_from_tuning(model, vocab, recs[1], np.arange(16), 2.0)
    w = model.unit_emb.weight.detach()
    rows = vocab.unit_index(recs[1].unit_ids)
    other = np.setdiff1d(np.arange(vocab.n_units), rows)
    torch.testing.assert_close(w[other], before[other], rtol=0, atol=0)  # other session intact
    torch.testing.assert_close(w[rows, :16], before[rows, :16], rtol=0, atol=0)  # additive half
    r = torch.as_tensor(tuning_vectors(recs[1], np.arange(16)))
    q = torch.randn(13, 16, generator=torch.Generator().manual_seed(TUNING_SEED))
    torch.testing.assert_close(w[rows, 16:], 2.0 * r @ q)  # the gain half is scale * r @ Q
    assert w[rows, 16:].abs().max() > 0.1
    m2 = Decoder(DecoderConfig(dim=16, dim_head=8, n_units=vocab.n_units, n_sessions=2))
    init_units_from_tuning(m2, vocab, recs[1], np.arange(16), 2.0)
    torch.testing.assert_close(m2.unit_emb.weight[rows, 16:], w[rows, 16:], rtol=0, atol=0)
