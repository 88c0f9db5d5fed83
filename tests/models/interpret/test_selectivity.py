import numpy as np
import pytest
from scipy import stats as sps

from models.interpret.selectivity import (
    CategoricalStatistic,
    DirectionStatistic,
    categorical_selectivity,
    direction_tuning,
    encode_classes,
)
from tests.models.interpret.synth import tuned_population


def test_direction_tuning_recovers_preference():
    acts, dirs, pref = tuned_population(orientation_units=2)
    t = direction_tuning(acts, dirs)
    n = pref.size
    assert np.array_equal(t["pref_dir"][:n], pref)
    circ = np.abs((t["vs_dir_deg"][:n] - pref + 180) % 360 - 180)
    assert circ.max() < 15
    assert (t["anova_p"][:n] < 1e-6).all()
    assert (t["dsi"][:n] > 0.5).all() and (t["osi"][:n] > 0.5).all()
    # orientation-tuned units: two opposite peaks -> orientation selective, not direction
    o = slice(n, n + 2)
    assert (t["ori_vs"][o] > 0.4).all() and (t["dir_vs"][o] < 0.15).all()
    assert (t["dsi"][o] < 0.3).all() and (t["osi"][o] > 0.5).all()
    assert np.allclose(t["vs_ori_deg"][o], pref[:2] % 180, atol=15)
    # untuned units are weakly tuned
    assert np.median(t["eta2"][n + 2 :]) < 0.1


def test_osi_dsi_allen_definitions():
    d = np.arange(0, 360, 45.0)
    means = np.array([1.0, 0.6, 0.2, 0.1, 0.5, 0.1, 0.3, 0.6])  # pref 0, null 180, orth 90/270
    st = DirectionStatistic(np.zeros((8, 1)), d)
    s = st.from_means(means[None, :, None], np.ones((1, 8)))
    r_orth = (0.2 + 0.3) / 2
    assert s["osi"][0, 0] == pytest.approx((1 - r_orth) / (1 + r_orth))
    assert s["dsi"][0, 0] == pytest.approx((1 - 0.5) / (1 + 0.5))
    v = np.abs((means * np.exp(1j * np.deg2rad(d))).sum()) / means.sum()
    assert s["dir_vs"][0, 0] == pytest.approx(v)
    assert s["pref_dir"][0, 0] == 0


def test_anova_matches_scipy():
    acts, dirs, _ = tuned_population(n_tuned=3, n_untuned=2, reps=6)
    t = direction_tuning(acts, dirs)
    for u in range(acts.shape[1]):
        f, p = sps.f_oneway(*[acts[dirs == g, u] for g in np.unique(dirs)])
        assert t["anova_f"][u] == pytest.approx(f, rel=1e-8)
        assert t["anova_p"][u] == pytest.approx(p, rel=1e-6, abs=1e-300)


def test_categorical_auroc_dprime_mi():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    lab = np.array(["KO"] * 60 + ["control"] * 40)
    x = rng.standard_normal((100, 3))
    x[:60, 0] += 1.0  # unit 0 prefers KO
    x[:, 2] = (lab == "control") * 1.0  # unit 2: perfectly separates, binary
    x = np.maximum(x, 0)
    s = categorical_selectivity(x, lab)
    assert list(s["classes"]) == ["KO", "control"]
    auc_ko = sk.roc_auc_score(lab == "KO", x[:, 0])
    assert s["auroc"][0] == pytest.approx(max(auc_ko, 1 - auc_ko))
    assert s["classes"][s["best_class"][0]] == "KO"
    assert s["auroc"][2] == 1.0 and s["classes"][s["best_class"][2]] == "control"
    # d' for unit 0 and the best class
    a, b = x[:60, 0], x[60:, 0]
    assert s["dprime"][0] == pytest.approx((a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2))
    # MI of a deterministic binary code = H(class)
    h = -(0.6 * np.log2(0.6) + 0.4 * np.log2(0.4))
    assert s["mi"][2] == pytest.approx(h)
    assert 0 <= s["mi"][1] < 0.15


def test_batched_statistics_equal_single():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((50, 4)), 0)
    labels = rng.integers(0, 3, size=(5, 50))
    cs = CategoricalStatistic(x, 3)
    ds = DirectionStatistic(x, np.array([0.0, 120.0, 240.0]))
    for st in (cs, ds):
        batch = st(labels)
        for i in range(5):
            one = st(labels[i][None])
            for k in batch:
                np.testing.assert_allclose(batch[k][i], one[k][0], rtol=1e-10)


def test_encode_classes_missing():
    idx, cls = encode_classes(np.array([90.0, np.nan, 0.0, 90.0]))
    assert idx.tolist() == [1, -1, 0, 1] and cls.tolist() == [0.0, 90.0]
    idx, cls = encode_classes(np.array(["b", None, "a"], dtype=object))
    assert idx.tolist() == [1, -1, 0]
