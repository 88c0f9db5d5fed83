import json
import re

import numpy as np
import pytest

from models.interpret.labels import (
    LabelConfig,
    Variable,
    mark_reproduced,
    match_units,
    read_units_json,
    run_labelling,
    write_units_json,
)
from tests.models.interpret.synth import tuned_population

N_TUNED, N_UNTUNED = 8, 24


def _population(seed=0):
    acts, dirs, pref = tuned_population(N_TUNED, N_UNTUNED, reps=24, seed=seed)
    t = dirs.size
    rng = np.random.default_rng(seed + 100)
    sessions = np.arange(t) % 16  # 16 sessions (8 KO, 8 control), every direction in each
    geno = np.where(sessions < 8, "KO", "control")
    genetic_unit = np.maximum(0.6 * (geno == "KO") + 0.3 * rng.standard_normal(t), 0)
    session_unit = np.maximum(rng.uniform(0, 2, 16)[sessions] + 0.1 * rng.standard_normal(t), 0)
    acts = np.concatenate([acts, genetic_unit[:, None], session_unit[:, None]], 1)
    variables = [
        Variable("direction", "direction", dirs),
        Variable("genetic", "categorical", geno.astype(object), groups=sessions),
    ]
    return acts, variables, pref


def _control(n_units, t, seed=5):
    return np.random.default_rng(seed).gamma(0.5, 0.5, size=(t, n_units))


@pytest.fixture(scope="module")
def labelled():
    acts, variables, pref = _population()
    cfg = LabelConfig(alpha=0.01, n_perm=2000)
    res = run_labelling(acts, _control(acts.shape[1], acts.shape[0]), variables, cfg)
    return res, acts, variables, pref


def test_tuned_units_labelled_untuned_not(labelled):
    res, acts, variables, pref = labelled
    lab = res.labelled["direction"]
    assert lab[:N_TUNED].all()
    assert not lab[N_TUNED:].any()
    strings = res.label_strings()
    for u in range(N_TUNED):
        assert strings[u].startswith(f"direction {pref[u]:g}°, OSI ")
        assert re.search(r"direction \d+°, OSI \d\.\d\d, q<0\.00?1$", strings[u])
    s = res.summary()
    assert s["direction"]["n_labelled"] == N_TUNED
    assert s["direction"]["shuffled_n_significant"] == 0
    assert s["direction"]["random_init_n_significant"] == 0
    assert s["genetic"]["permutation_level"] == "session"


def test_genetic_unit_labelled_but_not_session_identity(labelled):
    res, *_ = labelled
    g = res.labelled["genetic"]
    gu, su = N_TUNED + N_UNTUNED, N_TUNED + N_UNTUNED + 1
    assert g[gu] and "genetic KO, AUROC" in res.label_strings()[gu]
    assert not g[su]  # separates sessions, not genotypes
    assert g.sum() == 1


def test_label_needs_to_beat_random_init_control():
    acts, variables, _ = _population()
    strong, dirs, _ = tuned_population(N_TUNED, N_UNTUNED, reps=24, kappa=3, noise=0.05, seed=0)
    ctrl = np.concatenate([strong * 3, _control(2, acts.shape[0])], 1)
    res = run_labelling(acts, ctrl, variables[:1], LabelConfig(alpha=0.05, n_perm=200))
    assert (res.real.variables["direction"].q[:N_TUNED] < 0.05).all()  # significant ...
    assert not res.labelled["direction"].any()  # ... but no better than a random decoder


def test_units_json(labelled, tmp_path):
    res, acts, *_ = labelled
    fr = (acts > 0).mean(0)
    p = write_units_json(tmp_path / "units.json", res, firing_rate=fr, extra={"sae": "x"})

    def no_nan(c):
        raise AssertionError(f"non-JSON constant {c}")

    doc = json.loads(p.read_text(), parse_constant=no_nan)
    assert doc == read_units_json(p)
    assert doc["n_units"] == acts.shape[1] == len(doc["units"])
    u0 = doc["units"][0]
    assert set(u0) >= {"id", "label", "labels", "stats", "reproduced_across_seeds", "firing_rate"}
    assert u0["labels"][0]["variable"] == "direction" and u0["labels"][0]["q"] < 0.01
    assert {"eta2", "osi", "dsi", "dir_vs", "ori_vs", "anova_p", "p_eta2", "q"} <= set(
        u0["stats"]["direction"]
    )
    assert {"auroc", "dprime", "mi", "best_class", "p_auroc"} <= set(u0["stats"]["genetic"])
    assert doc["units"][-3]["label"] == ""
    assert doc["summary"]["direction"]["n_labelled"] == N_TUNED


def test_match_units_and_reproduction(labelled):
    res, acts, variables, _ = labelled
    rng = np.random.default_rng(0)
    w = rng.standard_normal((acts.shape[1], 16))
    perm = rng.permutation(acts.shape[1])
    w_b = w[perm] + 0.05 * rng.standard_normal(w.shape)
    match, cos = match_units(w, w_b)
    assert np.array_equal(perm[match], np.arange(acts.shape[1]))
    assert (cos > 0.95).all()
    # the "second seed" is the same units in another order: every label is reproduced
    cfg = LabelConfig(alpha=0.01, n_perm=2000)
    res_b = run_labelling(acts[:, perm], _control(acts.shape[1], acts.shape[0]), variables, cfg)
    mark_reproduced(res, res_b, w, w_b)
    for name in ("direction", "genetic"):
        assert np.array_equal(res.reproduced[name], res.labelled[name])
    assert res.unit_labels(0)[0]["reproduced_across_seeds"] is True
    # an unrelated second SAE reproduces nothing
    mark_reproduced(res, res_b, w, rng.standard_normal(w.shape))
    assert not any(r.any() for r in res.reproduced.values())


def test_trial_activations_and_shuffle_keeps_missing():
    from models.interpret.labels import _shuffle, trial_activations

    acts = np.arange(24.0).reshape(4, 3, 2)  # 4 windows, 3 latent tokens, 2 units
    out = trial_activations(acts, np.array([0, 0, -1, 2]), n_trials=4)
    np.testing.assert_allclose(out[0], acts[:2].mean((0, 1)))
    np.testing.assert_allclose(out[2], acts[3].mean(0))
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()
    v = Variable("direction", "direction", np.array([0.0, np.nan, 90.0, 180.0, np.nan]))
    sh = _shuffle(v, np.random.default_rng(0))
    assert np.isnan(sh.values[[1, 4]]).all()
    assert sorted(sh.values[[0, 2, 3]]) == [0.0, 90.0, 180.0]


def test_within_variable_counts_expose_what_the_pooled_fdr_hides():
    """A trained model whose many direction units carry its modest genetic units through the
    pooled BH, against a control with stronger genetic units and nothing else: pooled, the
    control looks weaker; within the variable it is not, and no genetic unit is labelled."""
    rng = np.random.default_rng(3)
    dir_acts, dirs, _ = tuned_population(60, 4, reps=8, seed=3)
    t = dirs.size
    sessions = np.arange(t) % 12
    geno = np.where(sessions < 6, "KO", "control")
    ko = (geno == "KO").astype(float)
    real_gen = np.maximum(0.15 * ko[:, None] + rng.standard_normal((t, 6)), 0)  # weak, many
    ctrl_gen = np.maximum(2.0 * ko[:, None] + 0.2 * rng.standard_normal((t, 6)), 0)  # perfect
    acts = np.concatenate([dir_acts, real_gen], 1)
    ctrl = np.concatenate([rng.gamma(0.5, 0.5, size=dir_acts.shape), ctrl_gen], 1)
    variables = [
        Variable("direction", "direction", dirs),
        Variable("genetic", "categorical", geno.astype(object), groups=sessions),
    ]
    res = run_labelling(acts, ctrl, variables, LabelConfig(alpha=0.05, n_perm=500))
    g = res.summary()["genetic"]
    assert g["n_significant"] > g["random_init_n_significant"] == 0  # pooled: looks learned
    assert g["random_init_n_significant_within_variable"] >= 6
    assert g["random_init_n_significant_within_variable"] >= g["n_significant_within_variable"]
    assert g["random_init_n_significant"] < g["random_init_n_significant_within_variable"]
    assert g["threshold_random_init"] == pytest.approx(1.0)
    assert not res.labelled["genetic"].any()
