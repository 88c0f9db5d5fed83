import json
from types import SimpleNamespace

import numpy as np
import pytest

from models.metrics import (
    accuracy,
    balanced_accuracy,
    bootstrap_ci,
    chance_interval,
    hierarchical_bootstrap_ci,
    pooled_bootstrap_ci,
    score,
)
from models.splits import split_all
from models.tasks import direction_labels

MODELS = {"decoder", "logistic", "mlp", "chance"}


# --- metrics ------------------------------------------------------------------------------------
def test_perfect_and_wrong_predictions():
    y = np.arange(40) % 8
    assert accuracy(y, y) == balanced_accuracy(y, y) == 1.0
    assert bootstrap_ci(y, y) == (1.0, 1.0)
    assert bootstrap_ci(y, y, balanced_accuracy) == (1.0, 1.0)
    assert accuracy(y, (y + 1) % 8) == 0.0
    assert bootstrap_ci(y, (y + 1) % 8) == (0.0, 0.0)
    s = score(y, y, n_boot=100)
    assert s["ci95"] == [1.0, 1.0] and s["n_test"] == 40


def test_balanced_accuracy_matches_sklearn_and_ignores_imbalance():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
    # a constant predictor on imbalanced data: high accuracy, balanced accuracy 1/K
    y = np.array([0] * 90 + [1] * 10)
    assert accuracy(y, np.zeros(100, int)) == 0.9
    assert balanced_accuracy(y, np.zeros(100, int)) == 0.5


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 60)
    p = np.where(rng.random(60) < 0.4, y, rng.integers(0, 8, 60))
    acc = accuracy(y, p)
    for metric in (accuracy, balanced_accuracy):
        lo, hi = bootstrap_ci(y, p, metric, seed=3)
        assert lo <= metric(y, p) <= hi and 0 <= lo < hi <= 1
        assert bootstrap_ci(y, p, metric, seed=3) == (lo, hi)
    # width about 2 x 1.96 x binomial s.e.
    lo, hi = bootstrap_ci(y, p)
    se = np.sqrt(acc * (1 - acc) / 60)
    assert 0.7 * 3.92 * se < hi - lo < 1.3 * 3.92 * se
    # the vectorised balanced-accuracy path equals the plain one
    from models.metrics import _balanced_accuracy_rows

    idx = rng.integers(0, 60, (30, 60))
    plain = [balanced_accuracy(y[i], p[i]) for i in idx]
    np.testing.assert_allclose(_balanced_accuracy_rows(y, p, idx), plain)


def test_hierarchical_bootstrap_and_chance_interval():
    y = np.arange(24) % 8
    sessions = [(y, y), (y, (y + 1) % 8)]  # one perfect, one always wrong
    lo, hi = hierarchical_bootstrap_ci(sessions, n_boot=500)
    assert lo < 0.5 < hi and lo >= 0 and hi <= 1
    assert hierarchical_bootstrap_ci([(y, y)] * 3) == (1.0, 1.0)
    # pooled balanced accuracy across single-label sessions: a constant guess gets 1/K, exactly
    a, b = np.zeros(20, int), np.ones(20, int)
    const = [(a, a), (a, a), (b, a)]
    assert balanced_accuracy(np.r_[a, a, b], np.r_[a, a, a]) == 0.5
    assert pooled_bootstrap_ci(const, n_boot=300) == (0.5, 0.5)
    lo, hi = chance_interval(8, 24)
    assert lo <= 1 / 8 <= hi and hi < 0.4
    assert chance_interval(2, 1000)[1] < 0.55


# --- evaluate with a stand-in checkpoint ---------------------------------------------------------
class _FakeVocab:
    def __init__(self, sessions, classes):
        self.session_ids = list(sessions)
        self.genetic_classes = list(classes)

    def has_session(self, sid):
        return sid in self.session_ids


def _fake_checkpoint(recs, splits):
    """Knows ``recs``; its genetic head reads the session's identity (as a real one can)."""
    classes = ["KO", "control"]
    return SimpleNamespace(
        config=SimpleNamespace(
            decoder=SimpleNamespace(tasks={"direction": 8, "genetic": 2}),
            training=SimpleNamespace(seed=0, val_fraction=0.1, test_fraction=0.2),
        ),
        vocab=_FakeVocab([r.session_id for r in recs], classes),
        splits={r.session_id: splits[r.session_id] for r in recs},
        path=None,
        adapted=False,
    )


def _fake_predict(ckpt, rec, trial_index, *, session_id=None):
    trial_index = np.asarray(trial_index)
    n = trial_index.size
    d = np.full((n, 8), 0.01)
    d[np.arange(n), direction_labels(rec)[trial_index]] = 1.0  # perfect direction
    g = np.full((n, 2), 0.5)
    if not ckpt.adapted:  # lookup of the session's label: perfect on training sessions
        g[:, ckpt.vocab.genetic_classes.index(rec.genetic_background)] = 0.9
    else:  # an adapted session: the head has nothing to look up; always says "KO"
        g[:, 0] = 0.9
    return {"direction": d / d.sum(1, keepdims=True), "genetic": g / g.sum(1, keepdims=True)}


def _fake_adapt(ckpt, rec, trial_index, *, steps=300, seed=0, **kw):
    assert not ckpt.vocab.has_session(rec.session_id)
    new = SimpleNamespace(**vars(ckpt))
    new.vocab = _FakeVocab([*ckpt.vocab.session_ids, rec.session_id], ckpt.vocab.genetic_classes)
    new.adapted = True
    new.adapt_calls = (rec.session_id, np.asarray(trial_index).size, steps)
    return new


@pytest.fixture
def fake_decoder(monkeypatch):
    import models.decoder.adapt as adapt_mod
    import models.decoder.predict as predict_mod

    monkeypatch.setattr(predict_mod, "predict_trials", _fake_predict)
    monkeypatch.setattr(adapt_mod, "adapt_session", _fake_adapt)


def test_evaluate_report_schema_with_fake_checkpoint(park_recordings, fake_decoder):
    from models.evaluate import evaluate_checkpoint

    recs = park_recordings[:3] + park_recordings[3:4]  # 3 KO + 1 control
    splits = split_all(recs, seed=0)
    ckpt = _fake_checkpoint(recs[:2], splits)  # trained on 2 KO sessions; 2 sessions new
    rep = evaluate_checkpoint(ckpt, recs, seed=0, n_boot=200, adapt_steps=5)
    json.loads(json.dumps(rep))  # JSON-able
    assert set(rep["tasks"]) == {"direction", "genetic"}  # Park has no temporal frequency
    sids = [r.session_id for r in recs]
    for task, t in rep["tasks"].items():
        assert set(t["per_session"]) == set(sids)
        assert MODELS <= set(t["mean"]) or task == "genetic"
        for sid, row in t["per_session"].items():
            for model, e in row.items():
                assert 0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1, (task, model)
                assert 0 <= e["balanced_accuracy"] <= 1
                assert e["n_test"] == splits[sid].test.size
    d = rep["tasks"]["direction"]
    assert d["mean"]["decoder"] == 1.0 and d["mean"]["chance"] == 0.125
    assert d["per_session"][sids[0]]["decoder"]["ci95"] == [1.0, 1.0]
    assert d["per_session"][sids[0]]["decoder"]["protocol"] == "trained session"
    assert d["per_session"][sids[2]]["decoder"]["protocol"] == "adapted from direction labels"
    g = rep["tasks"]["genetic"]
    assert g["classes"] == ["KO", "control"] and g["mean"]["chance"] == 0.5
    # honest decoder figure only on sessions the checkpoint was not trained on
    assert {s for s in sids if "decoder" in g["per_session"][s]} == set(sids[2:])
    assert g["per_session"][sids[2]]["decoder"]["accuracy"] == 1.0  # KO, always says KO
    assert g["per_session"][sids[3]]["decoder"]["accuracy"] == 0.0  # control
    # the lookup is kept, labelled, as an upper bound on training sessions only
    ub = "decoder_within_session_upper_bound"
    assert {s for s in sids if ub in g["per_session"][s]} == set(sids[:2])
    assert g["mean"][ub] == 1.0
    assert {s for s in sids if "decoder_reembedded" in g["per_session"][s]} == set(sids[:2])
    for s in sids:  # baselines: leave-one-session-out on every session
        assert {"logistic", "mlp", "chance", "majority"} <= set(g["per_session"][s])
    assert rep["sessions"][sids[0]]["trained_on"] and not rep["sessions"][sids[2]]["trained_on"]
    assert rep["sessions"][sids[2]]["split"] == "split_trials"


def test_evaluate_uses_the_checkpoint_splits(park_recordings, fake_decoder):
    from models.evaluate import evaluate_checkpoint
    from models.splits import TrialSplit

    rec = park_recordings[3]
    idx = np.arange(128)
    custom = {rec.session_id: TrialSplit(rec.session_id, idx[:100], idx[100:110], idx[110:])}
    ckpt = _fake_checkpoint([rec], custom)
    rep = evaluate_checkpoint(ckpt, [rec], n_boot=100, baselines=("logistic",))
    row = rep["tasks"]["direction"]["per_session"][rec.session_id]
    assert row["decoder"]["n_test"] == row["logistic"]["n_test"] == 18
    assert "genetic" not in rep["tasks"]  # one class in the data: no genetic task
    assert "mlp" not in row


def test_print_report_renders(park_recordings, fake_decoder, capsys):
    from models.evaluate import evaluate_checkpoint
    from service.cli.evaluate import print_report

    recs = [park_recordings[0], park_recordings[3]]
    ckpt = _fake_checkpoint(recs[:1], split_all(recs, seed=0))
    rep = evaluate_checkpoint(ckpt, recs, n_boot=100, baselines=("logistic",), reembed=False)
    print_report(rep)
    out = capsys.readouterr().out
    assert "direction" in out and "genetic" in out and "upper bound" in out and "mean" in out


# --- the real decoder, end to end -----------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_real_tiny_decoder(park_recordings, tmp_path):
    from models.decoder.config import DecoderConfig, TrainConfig
    from models.evaluate import evaluate, write_json
    from models.train import train

    trained = [park_recordings[1], park_recordings[3]]  # one KO, one control
    new = park_recordings[4]
    train(
        trained,
        tmp_path / "ckpt",
        decoder_config=DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=4),
        train_config=TrainConfig(epochs=2, windows_per_trial=1, threads=1),
        progress=False,
    )
    rep = evaluate(tmp_path / "ckpt", [*trained, new], seed=0, n_boot=200, adapt_steps=10)
    path = write_json(rep, tmp_path / "eval.json")
    rep = json.loads(path.read_text())
    assert set(rep["tasks"]) == {"direction", "genetic"}
    for task, t in rep["tasks"].items():
        for model, v in t["mean"].items():
            assert 0 <= v <= 1, (task, model)
        for row in t["per_session"].values():
            for e in row.values():
                assert 0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1
    d, g = rep["tasks"]["direction"], rep["tasks"]["genetic"]
    assert MODELS <= set(d["mean"])
    assert set(d["per_session"]) == {r.session_id for r in [*trained, new]}
    assert set(g["per_session"][new.session_id]) >= MODELS  # honest: a session new to the model
    for r in trained:
        assert "decoder" not in g["per_session"][r.session_id]
        assert "decoder_within_session_upper_bound" in g["per_session"][r.session_id]
    # like for like: every model's mean over the decoder's (new) session alone
    same = g["mean_on_decoder_sessions"]
    for m in ("decoder", "logistic", "mlp"):
        assert same[m] == g["per_session"][new.session_id][m]["accuracy"]
    assert "mean_on_decoder_sessions" not in d  # the decoder is scored on every session there
    # trained sessions are scored on the checkpoint's own test trials
    from models.splits import load_splits

    sp = load_splits(tmp_path / "ckpt" / "splits.json")
    for r in trained:
        assert d["per_session"][r.session_id]["decoder"]["n_test"] == sp[r.session_id].test.size
    # a checkpoint adapted to the new session: its own embedding was fitted without genotype
    # labels, so its genetic figure counts as the honest one (no upper-bound key for it)
    from models.decoder.adapt import adapt_session
    from models.decoder.checkpoint import Checkpoint
    from models.evaluate import evaluate_checkpoint
    from models.splits import split_trials

    ck = Checkpoint.load(tmp_path / "ckpt")
    sn = split_trials(new, seed=0)
    ad = adapt_session(ck, new, np.concatenate([sn.train, sn.val]), steps=10, seed=0)
    rep2 = evaluate_checkpoint(ad, [*trained, new], n_boot=100, reembed=False)
    row = rep2["tasks"]["genetic"]["per_session"][new.session_id]
    assert "decoder" in row and "decoder_within_session_upper_bound" not in row
    assert row["decoder"]["protocol"].startswith("own embedding, fitted without genotype")
    # same adaptation as `evaluate` did on the fly (same trials, steps and seed)
    assert row["decoder"]["accuracy"] == g["per_session"][new.session_id]["decoder"]["accuracy"]


@pytest.mark.slow
def test_loso_retrain_gives_honest_genetic_figure_on_training_sessions(park_recordings, tmp_path):
    from models.decoder.config import DecoderConfig, TrainConfig
    from models.evaluate import evaluate
    from models.train import train

    recs = [park_recordings[0], park_recordings[1], park_recordings[3]]  # KO, KO, control
    train(
        recs,
        tmp_path / "ckpt",
        decoder_config=DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=4),
        train_config=TrainConfig(epochs=1, windows_per_trial=1, threads=1),
        progress=False,
    )
    rep = evaluate(
        tmp_path / "ckpt",
        recs,
        n_boot=100,
        adapt_steps=5,
        reembed=False,
        loso_retrain=True,
        baselines=("logistic",),
    )
    g = rep["tasks"]["genetic"]["per_session"]
    for r in recs[:2]:  # the rest keeps both classes: retrained without it, then adapted
        assert g[r.session_id]["decoder"]["protocol"].startswith("leave-one-session-out")
        assert "decoder_within_session_upper_bound" in g[r.session_id]
    # without the only control session the retrained model has no genetic head: no figure
    assert "decoder" not in g[recs[2].session_id]
    assert "note" not in rep["tasks"]["genetic"]


def test_baselines_only_on_simulated_sessions_with_temporal_frequency():
    """Allen-like data: temporal frequency present, blank sweeps left out, Cre lines as labels."""
    from models.data.simulate import SimConfig, simulate_session
    from models.evaluate import evaluate_checkpoint

    cfg = SimConfig(n_cells=30, minutes=6.0, frame_rate=10.0)
    recs = [
        simulate_session(cfg.model_copy(update={"cre_line": line}), seed=0, session_index=i)[0]
        for i, line in enumerate(["Cux2-CreERT2", "Cux2-CreERT2", "Sst-IRES-Cre"])
    ]
    rep = evaluate_checkpoint(None, recs, n_boot=100, baselines=("logistic",))
    assert set(rep["tasks"]) == {"direction", "temporal_frequency", "genetic"}
    tf = rep["tasks"]["temporal_frequency"]
    assert tf["n_classes"] == 5 and tf["mean"]["chance"] == pytest.approx(0.2)
    assert tf["mean"]["logistic"] > 0.2  # simulated cells are tuned to temporal frequency
    assert rep["tasks"]["direction"]["mean"]["logistic"] > 0.2  # chance 0.125
    assert rep["tasks"]["genetic"]["classes"] == ["Cux2-CreERT2", "Sst-IRES-Cre"]
