"""End-to-end interpretation pipeline on a tiny (untrained) checkpoint and synthetic sessions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.config import ConfigError
from models.data.recording import Recording, Trials
from models.decoder.checkpoint import Checkpoint
from models.decoder.config import CheckpointConfig, DecoderConfig, TrainConfig
from models.decoder.model import Decoder
from models.interpret.pipeline import (
    InterpretConfig,
    build_trials,
    ground_truth_recovery,
    random_init_decoder,
    run_interpret,
    support_notes,
    write_outputs,
)
from models.splits import split_all


def make_recording(session_id: str, n_cells: int = 10, n_trials: int = 48, genetic: str = "A",
                   fs: float = 16.0, seed: int = 0) -> Recording:  # fmt: skip
    """Gratings (2 s on, 1 s off) with direction-tuned cells; the genetic group scales gain."""
    rng = np.random.default_rng(seed)
    n_frames = int(n_trials * 3.0 * fs) + int(fs)
    t = np.arange(n_frames) / fs
    start = 0.5 + np.arange(n_trials) * 3.0
    direction = (np.arange(n_trials) % 8) * 45.0
    pref = rng.integers(0, 8, n_cells) * 45.0
    gain = 1.5 if genetic == "A" else 0.7
    x = rng.normal(0, 0.3, (n_frames, n_cells))
    for s, d in zip(start, direction, strict=True):
        on = (t >= s) & (t < s + 2.0)
        x[on] += gain * np.exp(2 * (np.cos(np.deg2rad(d - pref)) - 1))
    return Recording(
        traces=x.astype(np.float32),
        timestamps=t,
        unit_ids=[f"{session_id}/c{i}" for i in range(n_cells)],
        session_id=session_id,
        subject_id=f"m{session_id}",
        genetic_background=genetic,
        sampling_rate=fs,
        trials=Trials.from_arrays(start, start + 2.0, direction),
        source="test",
    )


def tiny_checkpoint(recs, seed: int = 0, dim: int = 16, latents: int = 4) -> Checkpoint:
    """An untrained checkpoint over ``recs`` (vocabulary, normalisation and splits as training
    would set them)."""
    from models.train import build_vocab, set_unit_stats, task_sizes

    vocab = build_vocab(recs)
    dcfg = DecoderConfig(
        dim=dim, dim_head=8, depth=1, num_latents=latents, n_units=vocab.n_units,
        n_sessions=vocab.n_sessions, tasks=task_sizes(recs, vocab.genetic_classes), dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Decoder(dcfg).eval()
    for r in recs:
        set_unit_stats(model, vocab, r)
    tcfg = TrainConfig(seed=seed, test_fraction=0.25, val_fraction=0.125)
    splits = split_all(recs, seed=seed, val_fraction=0.125, test_fraction=0.25)
    return Checkpoint(model, CheckpointConfig(decoder=dcfg, training=tcfg), vocab, splits)


TINY = InterpretConfig(
    steps=40, sae_units=32, k=4, n_perm=50, ablation_draws=5, attribution_examples=4,
    attribution_m=3, ig_steps=4, alpha=0.2, ablation_top=2, e2e_steps=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def recs():
    return [
        make_recording("s0", genetic="A", seed=0),
        make_recording("s1", n_cells=8, genetic="B", seed=1),
        make_recording("s2", n_cells=9, genetic="A", seed=2),
    ]


def trained_checkpoint(recs, epochs: int = 6) -> Checkpoint:
    """A tiny decoder trained for a few epochs (~5 s): enough to learn some direction."""
    from models.train import train

    torch.set_num_threads(1)
    ck, _ = train(
        recs, None,
        decoder_config=DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=4, dropout=0.0),
        train_config=TrainConfig(epochs=epochs, threads=1, test_fraction=0.25,
                                 val_fraction=0.125, lr=5e-3),
        progress=False,
    )  # fmt: skip
    return ck


@pytest.fixture(scope="module")
def ckpt(recs):
    return trained_checkpoint(recs)


@pytest.fixture(scope="module")
def result(ckpt, recs):
    torch.set_num_threads(1)
    return run_interpret(ckpt, recs, TINY)


def test_summary_has_the_documented_shape(result, ckpt):
    s = result.summary
    for key in ("l0", "fvu", "dead_fraction"):
        assert isinstance(s["sae"][key], float)
    assert 0 < s["sae"]["l0"] <= TINY.k + 1e-6
    assert 0 <= s["sae"]["dead_fraction"] <= 1
    assert set(s["accuracy"]) == set(ckpt.tasks) == {"direction", "genetic"}
    for r in s["accuracy"].values():
        for c in ("decoder", "spliced", "mean_ablation"):
            assert 0.0 <= r[c] <= 1.0
        assert r["n_trials"] == int((result.table.split == "test").sum())
    assert s["accuracy"]["genetic"]["within_session_upper_bound"] is True
    assert set(s["labels"]) == {"direction", "genetic"}
    for c in ("random_init", "shuffled"):
        assert set(s["controls"][c]) == set(s["labels"])
        assert all(isinstance(v, int) for v in s["controls"][c].values())
    assert s["labels"]["direction"] > 2  # the trained tiny decoder has direction units
    assert set(s["ablation"]) == {v for v, n in s["labels"].items() if n > 0}
    for var, cells in s["ablation"].items():
        assert var in s["labels"] and s["labels"][var] > 0
        for cell in cells.values():
            assert {"drop", "random_drop"} <= set(cell)
    for var, cells in s["ablation_top"].items():
        assert s["labels"][var] > 2
        assert all(c["n_units"] == 2 for c in cells.values())
    assert all(isinstance(v, bool) for v in s["criteria"].values())
    json.dumps(s)  # JSON-serialisable, no NaN objects
    assert s["notes"]


def test_plain_accuracy_matches_predict_trials_pooling(result, ckpt, recs):
    """'plain' is the checkpoint's own trial-level prediction on its test trials."""
    from models.decoder.predict import predict_trials

    correct, n = 0, 0
    for rec in recs:
        test = ckpt.splits[rec.session_id].test
        p = predict_trials(ckpt, rec, test)["direction"]
        y = (np.mod(rec.trials.direction[test], 360) / 45).round().astype(int)
        correct += int((p.argmax(1) == y).sum())
        n += test.size
    assert result.accuracy["direction"]["plain"]["accuracy"] == pytest.approx(correct / n)


def test_attribution_adds_up_and_cheap_methods_are_compared(result):
    at = result.summary["attribution"]
    for task, add in at["additivity"].items():
        assert add["max_abs_error_vs_plain_decoder"] < 1e-4 * max(1.0, add["logit_scale"]), task
        assert set(at["methods"][task]) == {"grad", "ig"}
        assert -1 <= at["methods"][task]["grad"]["top1"] <= 1


def test_labels_and_controls_are_consistent(result):
    lab = result.labelling
    assert result.trial_acts.shape == (int(result.label_mask.sum()), TINY.sae_units)
    assert not result.label_mask[result.table.split == "test"].any()  # fit trials only
    for var, m in lab.labelled.items():
        vr = lab.real.variables[var]
        t = lab.thresholds[var]
        assert np.all(vr.q[m] < TINY.alpha)
        assert np.all(vr.primary_stat[m] > max(t["random_init"], t["shuffled"]))
    assert lab.reproduced is not None  # two SAE seeds
    assert lab.real.variables["genetic"].level == "session"


def test_a_control_at_the_ceiling_is_said_plainly(result):
    """When the random-init control's units reach the maximum of the primary statistic, no
    trained unit can beat it: the report says why that variable has no labels."""
    thr = result.labelling.thresholds["genetic"]
    kept = thr["random_init"]
    try:
        thr["random_init"] = 1.0
        notes = support_notes(result)
    finally:
        thr["random_init"] = kept
    assert any(
        "'genetic': the random-init decoder's SAE units reach the ceiling" in n for n in notes
    )
    if kept < 1.0:
        assert not any("reach the ceiling" in n for n in support_notes(result))


def test_write_outputs(result, tmp_path):
    paths = write_outputs(result, tmp_path, report=False)
    s = json.loads(paths["summary"].read_text())
    assert s["sae"]["l0"] == pytest.approx(result.summary["sae"]["l0"])
    units = json.loads(paths["units"].read_text())
    assert units["n_units"] == TINY.sae_units and len(units["units"]) == TINY.sae_units
    assert "heldout_confirmation" in units["extra"]
    for d in ("sae", "sae_seed2", "sae_random_init"):
        assert (tmp_path / d / "sae.safetensors").is_file() and (
            tmp_path / d / "cfg.json"
        ).is_file()
    from models.sae import load_sae

    sae = load_sae(tmp_path / "sae")
    assert torch.equal(sae.W_dec, result.saes[0].sae.W_dec)


def test_random_init_decoder_keeps_normalisation_and_global_rng(ckpt):
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    rnd = random_init_decoder(ckpt, seed=5)
    b = torch.rand(1)
    assert torch.equal(a, b)  # the caller's RNG stream is untouched
    assert rnd.config == ckpt.model.config
    assert torch.equal(rnd.unit_scale, ckpt.model.unit_scale)
    w0 = dict(ckpt.model.named_parameters())
    assert any(not torch.equal(p, w0[n]) for n, p in rnd.named_parameters())
    again = random_init_decoder(ckpt, seed=5)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in rnd.named_parameters())


def test_build_trials_skips_unknown_sessions_and_refuses_none(ckpt, recs):
    other = make_recording("zz", seed=9)
    sessions, trials, table, skipped = build_trials(ckpt, [*recs, other])
    assert skipped == ["zz"] and len(sessions) == 3
    assert len(table) == sum(t.size for t in trials)
    assert set(table.split) == {"train", "val", "test"}
    with pytest.raises(ConfigError, match="vocabulary"):
        build_trials(ckpt, [other])


def test_ground_truth_recovery_counts(result):
    truths = [
        SimpleNamespace(session_id=s, cre_line=g, responsive=np.ones(8, bool),
                        pref_direction=np.arange(8) * 45.0)
        for s, g in (("s0", "A"), ("s1", "B"), ("s2", "A"), ("other", "A"))
    ]  # fmt: skip
    gt = ground_truth_recovery(result, truths)
    assert gt["sessions"] == 3
    d = gt["direction"]
    assert d["planted_cells"] == [3] * 8 and d["planted_directions"] == 8
    assert sum(d["labelled_units"]) == int(result.labelling.labelled["direction"].sum())
    assert 0 <= d["covered_random_init"] <= 8
    g = gt["genetic"]
    assert g["cre_lines"] == ["A", "B"] and g["sessions_per_line"] == {"A": 2, "B": 1}


def test_e2e_finetune_keeps_the_decoder_frozen(ckpt):
    from models.interpret.pipeline import _train_one

    torch.manual_seed(0)
    model = ckpt.model.eval()
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    d, L = model.config.dim, model.config.num_latents
    z = torch.randn(64, L, d)
    sess = torch.zeros(64, dtype=torch.long)
    cfg = InterpretConfig(steps=20, sae_units=32, k=4, e2e_steps=5, e2e_lr=1e-3)
    run = _train_one(z, z[:16], cfg, d, 0, model, sess)
    assert run.sae.cfg.train.e2e_steps == 5 and run.sae.cfg.train.e2e_lr == 1e-3
    assert len([x for x in run.history["kl"] if x == x]) > 0  # the e2e phase ran
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    # no decoder, no e2e phase: the control's recipe is chosen by the caller
    run = _train_one(z, z[:16], cfg, d, 0)
    assert run.sae.cfg.train.e2e_steps == 0


def test_summary_reports_spliced_agreement(result):
    for task, r in result.summary["accuracy"].items():
        a = r["spliced_agreement"]
        assert 0.0 <= a <= 1.0
        assert abs(r["spliced"] - r["decoder"]) <= 1 - a + 1e-9, task
