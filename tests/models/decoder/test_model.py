from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.decoder.checkpoint import Checkpoint
from models.decoder.config import CheckpointConfig, DecoderConfig, TrainConfig
from models.decoder.model import Decoder
from models.decoder.tokenizers import collate, tokenizer_for
from models.decoder.windows import SessionData, build_batch, decode_frames
from models.train import build_vocab, set_unit_stats, task_sizes


def make_model(recs, tokenizer="patch", seed=0, **kw):
    torch.manual_seed(seed)
    vocab = build_vocab(recs)
    cfg = DecoderConfig(
        tokenizer=tokenizer,
        n_units=vocab.n_units,
        n_sessions=vocab.n_sessions,
        tasks=task_sizes(recs, vocab.genetic_classes),
        **kw,
    )
    model = Decoder(cfg)
    for r in recs:
        set_unit_stats(model, vocab, r)
    model.eval()
    return model, vocab


@pytest.mark.parametrize(
    ("tokenizer", "direct"), [("patch", False), ("poyo", False), ("patch", True), ("poyo", True)]
)
def test_shapes_and_padding_invariance(small_recs, tokenizer, direct):
    model, vocab = make_model(small_recs, tokenizer, direct_path=direct)
    tok = tokenizer_for(model.config)
    sds = [SessionData.build(r, vocab) for r in small_recs]
    samples, sess = [], []
    for sd in sds:  # different cell counts and frame rates in one batch
        f = int(decode_frames(sd.rec, 3, 0.5)[5])
        samples.append(sd.tokenize(tok, f, sd.lower[3]))
        sess.append(sd.session_index)
    batch = {k: torch.as_tensor(v) for k, v in collate(samples, sess, pad_to=500).items()}
    assert batch["mask"].shape[1] == 500 and not batch["mask"].all()
    with torch.no_grad():
        out = model.forward_batch(batch)
    assert set(out) == {"direction", "temporal_frequency", "genetic"}
    assert out["direction"].shape == (2, 8)
    assert out["temporal_frequency"].shape == (2, 5)
    assert out["genetic"].shape == (2, 2)
    for i, s in enumerate(samples):  # each example alone, unpadded
        single = {k: torch.as_tensor(v) for k, v in collate([s], [sess[i]]).items()}
        assert bool(single["mask"].all())
        with torch.no_grad():
            o1 = model.forward_batch(single)
        for task in out:
            torch.testing.assert_close(o1[task][0], out[task][i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokenizer", ["patch", "poyo"])
def test_causal_frames_after_the_window_end_do_not_matter(small_recs, tokenizer):
    rec = small_recs[0]
    model, vocab = make_model(small_recs, tokenizer)
    tok = tokenizer_for(model.config)
    ends = rec.trials.start[:4] + 0.8
    a = build_batch(rec, ends, tok, vocab)
    traces = rec.traces.copy()
    cut = rec.frame_index(ends.min()) + 1
    traces[cut:] = np.random.default_rng(0).normal(5, 3, traces[cut:].shape)
    rec2 = rec.replace(traces=traces)
    b = build_batch(rec2, ends[:1], tok, vocab)
    with torch.no_grad():
        oa, ob = model.forward_batch(a), model.forward_batch(b)
    for t in oa:
        torch.testing.assert_close(oa[t][:1], ob[t], rtol=1e-5, atol=1e-6)
    # and the later windows do see the change
    c = build_batch(rec2, ends, tok, vocab)
    with torch.no_grad():
        oc = model.forward_batch(c)
    assert not torch.allclose(oa["direction"][1:], oc["direction"][1:])


def test_encode_readout_split_equals_forward(small_recs):
    model, vocab = make_model(small_recs)
    batch = build_batch(
        small_recs[1], small_recs[1].trials.start[:3] + 1.0, tokenizer_for(model.config), vocab
    )
    with torch.no_grad():
        full = model(**batch)
        lat = model.encode(batch)
        split = model.readout(lat, batch)
    assert lat.shape == (3, model.config.num_latents, model.config.dim)
    for t in full:
        torch.testing.assert_close(full[t], split[t], rtol=0, atol=0)


def test_config_round_trip(tmp_path):
    cfg = CheckpointConfig(
        decoder=DecoderConfig(tokenizer="poyo", dim=32, tasks={"direction": 8, "genetic": 3}),
        training=TrainConfig(epochs=3, seed=5),
        sources=["a.mat"],
    )
    p = cfg.save(tmp_path / "config.json")
    assert CheckpointConfig.load(p) == cfg
    raw = json.loads(p.read_text())
    raw["decoder"]["dimm"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    from models.config import ConfigError

    with pytest.raises(ConfigError):
        CheckpointConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("tokenizer", ["patch", "poyo"])
def test_checkpoint_round_trip(small_recs, tmp_path, tokenizer):
    model, vocab = make_model(small_recs, tokenizer)
    ck = Checkpoint(model=model, config=CheckpointConfig(decoder=model.config), vocab=vocab)
    ck.save(tmp_path / "ck")
    for name in ("config.json", "decoder.safetensors", "vocab.json", "splits.json"):
        assert (tmp_path / "ck" / name).is_file()
    with safe_open(str(tmp_path / "ck" / "decoder.safetensors"), "pt") as f:
        assert "unit_emb.weight" in f.keys() and "unit_scale" in f.keys()
    ck2 = Checkpoint.load(tmp_path / "ck")
    assert not ck2.model.training
    assert ck2.vocab.to_dict() == vocab.to_dict()
    batch = build_batch(small_recs[0], [5.0, 9.0], ck.tokenizer, vocab)
    with torch.no_grad():
        a, b = model.forward_batch(batch), ck2.model.forward_batch(batch)
    for t in a:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=0)


def test_vocab_growth_keeps_old_outputs(small_recs):
    from tests.models.decoder.conftest import make_recording

    model, vocab = make_model(small_recs)
    batch = build_batch(small_recs[0], [5.0, 9.0], tokenizer_for(model.config), vocab)
    with torch.no_grad():
        before = model.forward_batch(batch)
    new = make_recording("s_new", n_cells=5, seed=3)
    vocab.add_recording(new)
    model.grow(vocab.n_units, vocab.n_sessions)
    assert model.unit_emb.num_embeddings == vocab.n_units == 22
    assert model.session_emb.num_embeddings == 3
    assert model.config.n_units == 22 and model.config.n_sessions == 3
    with torch.no_grad():
        after = model.forward_batch(batch)
        out_new = model.forward_batch(build_batch(new, [5.0], tokenizer_for(model.config), vocab))
    for t in before:
        torch.testing.assert_close(before[t], after[t], rtol=0, atol=0)
    assert torch.isfinite(out_new["direction"]).all()


def test_unknown_session_is_a_clear_error(small_recs):
    from tests.models.decoder.conftest import make_recording

    model, vocab = make_model(small_recs)
    with pytest.raises(KeyError, match="adapt"):
        build_batch(make_recording("zzz"), [5.0], tokenizer_for(model.config), vocab)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tokenizer", "direct"), [("patch", False), ("poyo", False), ("patch", True)]
)
def test_onnx_export_dynamo_matches_torch(small_recs, tmp_path, tokenizer, direct):
    ort = pytest.importorskip("onnxruntime")
    model, vocab = make_model(small_recs, tokenizer, direct_path=direct)
    tok = tokenizer_for(model.config)
    b = build_batch(small_recs[0], [5.0, 9.0], tok, vocab)
    names = ("values", "unit_index", "timestamps", "mask", "session_index")
    batch_dim, tok_dim = torch.export.Dim("batch"), torch.export.Dim("tokens")
    ds = {k: {0: batch_dim, 1: tok_dim} for k in names[:4]}
    ds["session_index"] = {0: batch_dim}
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model,
        tuple(b[k] for k in names),
        str(path),
        dynamo=True,
        dynamic_shapes=ds,
        input_names=list(names),
        output_names=list(model.task_names),
    )
    sess = ort.InferenceSession(str(path))
    b2 = build_batch(small_recs[1], [5.0, 6.0, 7.0], tok, vocab)  # other batch and cell counts
    out = sess.run(None, {k: b2[k].numpy() for k in names})
    with torch.no_grad():
        ref = model.forward_batch(b2)
    for name, o in zip([o.name for o in sess.get_outputs()], out, strict=True):
        np.testing.assert_allclose(o, ref[name].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("free", [[], ["genetic"]])
def test_session_free_task_queries_ignore_the_session_embedding(small_recs, free):
    model, vocab = make_model(small_recs, session_free_tasks=free, identity_blind_tasks=[])
    with torch.no_grad():
        model.session_emb.weight.normal_(std=1.0)  # make the two sessions' rows differ
    batch = build_batch(
        small_recs[1], small_recs[1].trials.start[:3] + 1.0, tokenizer_for(model.config), vocab
    )
    other = {**batch, "session_index": torch.zeros_like(batch["session_index"])}
    assert int(batch["session_index"][0]) == 1
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    assert not torch.allclose(a["direction"], b["direction"])
    if free:
        torch.testing.assert_close(a["genetic"], b["genetic"], rtol=0, atol=0)
    else:
        assert not torch.allclose(a["genetic"], b["genetic"])
    # the option is config, not weights: the state dict keeps its keys
    assert set(model.state_dict()) == set(make_model(small_recs)[0].state_dict())


@pytest.mark.parametrize("blind", [[], ["genetic"]])
def test_identity_blind_task_loss_never_reaches_the_embeddings(small_recs, blind):
    model, vocab = make_model(small_recs, identity_blind_tasks=blind, direct_path=True)
    with torch.no_grad():
        model.session_emb.weight.normal_(std=1.0)  # the two sessions' rows differ
    batch = build_batch(
        small_recs[1], small_recs[1].trials.start[:3] + 1.0, tokenizer_for(model.config), vocab
    )
    other = {**batch, "session_index": torch.zeros_like(batch["session_index"])}
    with torch.no_grad():  # the same values with the blind pass (eval: no dropout)
        plain, cut = model.forward_batch(batch), model.forward_batch(batch, blind=True)
        moved = model.forward_batch(other)
    for t in plain:
        torch.testing.assert_close(cut[t], plain[t], rtol=0, atol=0)
    # a blind task's query leaves out the session embedding
    assert torch.equal(plain["genetic"], moved["genetic"]) == bool(blind)

    def grads(task):
        model.zero_grad(set_to_none=True)
        model.forward_batch(batch, blind=True)[task].square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    g = grads("genetic")
    vocab_rows = ("unit_emb.weight", "session_emb.weight")
    assert all((g[n] is None or not g[n].any()) for n in vocab_rows) == bool(blind)
    assert g["heads.genetic.weight"].abs().sum() > 0 and g["enc_atn.to_q.weight"].abs().sum() > 0
    g = grads("direction")  # the other tasks still train the embeddings
    assert all(g[n].abs().sum() > 0 for n in vocab_rows)


def test_population_stats_path_reads_the_cells_normalisation_statistics(small_recs):
    model, vocab = make_model(
        small_recs, population_stats=True, unit_stats_input=False, direct_path=False
    )
    with torch.no_grad():
        model.pop_proj.weight.normal_(std=1.0)
    tok = tokenizer_for(model.config)
    batch = build_batch(small_recs[1], small_recs[1].trials.start[:2] + 1.0, tok, vocab)
    perm = torch.randperm(batch["unit_index"].shape[1])
    shuffled = {k: (v[:, perm] if v.dim() >= 2 and k != "session_index" else v)
                for k, v in batch.items()}  # fmt: skip
    with torch.no_grad():
        a, b = model.forward_batch(batch), model.forward_batch(shuffled)
        # the same normalised values, but every cell's level and scale doubled: z-scores are
        # unchanged, only the statistics (log scale) move
        model.unit_loc.mul_(2.0)
        model.unit_scale.mul_(2.0)
        scaled = {**batch, "values": batch["values"] * 2.0}
        c = model.forward_batch(scaled)
        model.pop_proj = None  # without the path the doubling is invisible
        d = model.forward_batch(scaled)
    for t in a:
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)  # permutation invariant
        assert not torch.allclose(a[t], c[t])
    with torch.no_grad():
        model.unit_loc.div_(2.0)
        model.unit_scale.div_(2.0)
        e = model.forward_batch(batch)
    for t in a:
        torch.testing.assert_close(d[t], e[t], rtol=1e-5, atol=1e-5)


def test_saved_configs_without_new_keys_load_with_their_legacy_values(tmp_path):
    from models.decoder.config import LEGACY_DECODER, LEGACY_TRAINING

    new = CheckpointConfig(decoder=DecoderConfig(), training=TrainConfig())
    raw = new.to_dict()
    old = {
        "decoder": {k: v for k, v in raw["decoder"].items() if k not in LEGACY_DECODER},
        "training": {k: v for k, v in raw["training"].items() if k not in LEGACY_TRAINING},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    loaded = CheckpointConfig.load(path)
    assert not loaded.decoder.direct_path and loaded.decoder.unit_init_scale == 1.0
    assert loaded.training.tuning_init == 0 and loaded.training.finetune_epochs == 0
    assert loaded.training.select_on == "accuracy" and loaded.training.emb_lr_mult == 1.0
    assert loaded.decoder.identity_blind_tasks == []
    # today's defaults differ, and a config saved today round-trips with them
    assert new.decoder.direct_path and new.training.tuning_init > 0
    assert CheckpointConfig.load(new.save(tmp_path / "new.json")) == new
    # a legacy checkpoint (no direct path) still loads its weights
    legacy_cfg = loaded.decoder.model_copy(update={"n_units": 5, "tasks": {"direction": 8}})
    sd = Decoder(legacy_cfg).state_dict()
    Decoder(CheckpointConfig.model_validate({"decoder": old["decoder"] | {"n_units": 5}}).decoder
            ).load_state_dict(sd)  # fmt: skip


def test_unit_stats_input_makes_the_units_level_readable(small_recs):
    model, vocab = make_model(small_recs, unit_stats_input=True, population_stats=False)
    batch = build_batch(
        small_recs[0], small_recs[0].trials.start[:2] + 1.0, tokenizer_for(model.config), vocab
    )
    with torch.no_grad():
        a = model(**batch)["direction"]
        # same z-scored inputs (values shifted and scaled with loc/scale), different levels
        idx = batch["unit_index"]
        shifted = {**batch, "values": batch["values"] * 3.0 + 2.0}
        model.unit_loc[idx] = model.unit_loc[idx] * 3.0 + 2.0
        model.unit_scale[idx] = model.unit_scale[idx] * 3.0
        b = model(**shifted)["direction"]
        model.stats_proj.weight.zero_()
        model.stats_proj.bias.zero_()
        c = model(**shifted)["direction"]
        model.unit_loc[idx] = (model.unit_loc[idx] - 2.0) / 3.0
        model.unit_scale[idx] = model.unit_scale[idx] / 3.0
        d = model(**batch)["direction"]
    assert not torch.allclose(a, b, atol=1e-4)  # the level is seen
    torch.testing.assert_close(c, d, rtol=1e-4, atol=1e-4)  # without it, only z-scores matter
