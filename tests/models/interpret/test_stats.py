import numpy as np
import pytest
from scipy.stats import false_discovery_control

from models.interpret.selectivity import CategoricalStatistic, DirectionStatistic
from models.interpret.stats import (
    bh_fdr,
    n_distinct_assignments,
    permutation_test,
    permuted_labels,
)


def test_bh_matches_scipy():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(bh_fdr(p), false_discovery_control(p, method="bh"), rtol=1e-12)
    p2 = p[:200].reshape(40, 5)  # units x variables: one family over all entries
    np.testing.assert_allclose(
        bh_fdr(p2).ravel(), false_discovery_control(p2.ravel(), method="bh"), rtol=1e-12
    )
    p3 = p[:10].copy()
    p3[3] = np.nan
    q3 = bh_fdr(p3)
    assert np.isnan(q3[3])
    ok = np.isfinite(p3)
    np.testing.assert_allclose(q3[ok], false_discovery_control(p3[ok], method="bh"))


def test_trial_permutation_null_is_uniform_and_signal_is_found():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 2, 200)
    x = np.maximum(rng.standard_normal((200, 300)), 0)
    x[:, 0] += 2.0 * lab  # one real unit
    st = CategoricalStatistic(x, 2)
    res = permutation_test(lambda lb: {"auroc": st(lb)["auroc"]}, lab, n_perm=200, rng=1)
    p = res.p["auroc"]
    assert res.level == "trial" and not res.exact and res.n_perm == 200
    assert p[0] == pytest.approx(1 / 201)
    frac = (p[1:] < 0.05).mean()
    assert 0.01 < frac < 0.1  # calibrated null
    assert p.min() >= res.min_p


def test_session_permutation_minimum_p():
    # 5 sessions, 3 KO vs 2 control, 40 trials each; a unit that is pure session identity
    # separates the groups perfectly, yet p cannot go below 1 / C(5, 2) = 0.1
    sessions = np.repeat(np.arange(5), 40)
    geno = np.where(sessions < 3, 0, 1)
    rng = np.random.default_rng(0)
    session_offset = np.array([1.0, 2.0, 3.0, 10.0, 11.0])
    x = (session_offset[sessions] + 0.1 * rng.standard_normal(200))[:, None]
    st = CategoricalStatistic(np.maximum(x, 0), 2)
    fn = lambda lb: {"auroc": st(lb)["auroc"]}  # noqa: E731
    res = permutation_test(fn, geno, n_perm=1000, rng=0, groups=sessions)
    assert res.observed["auroc"][0] == 1.0
    assert res.exact and res.level == "session" and res.n_perm == 10
    assert res.min_p == pytest.approx(0.1)
    # AUROC maximised over classes is symmetric: the split with the 2 *lowest* sessions as
    # the 2-session class is perfect too, so the attainable p here is 2 / 10
    assert res.p["auroc"][0] == pytest.approx(0.2)
    assert (res.p["auroc"] >= res.min_p).all()
    # trial-level permutation would call it wildly significant (pseudo-replication)
    naive = permutation_test(fn, geno, n_perm=200, rng=0)
    assert naive.p["auroc"][0] < 0.01
    # with more sessions than can be enumerated, random session permutations are used
    perms, exact = permuted_labels(np.repeat([0, 1] * 10, 3), 50, rng, np.repeat(np.arange(20), 3))
    assert not exact and perms.shape == (50, 60)
    assert (perms.reshape(50, 20, 3).std(-1) == 0).all()  # sessions stay together
    assert n_distinct_assignments(np.array([0, 0, 0, 1, 1])) == 10


def test_session_label_must_be_constant():
    with pytest.raises(ValueError, match="varies within session"):
        permuted_labels(
            np.array([0, 1, 1, 1]), 10, np.random.default_rng(0), np.array([0, 0, 1, 1])
        )


def test_direction_permutation():
    rng = np.random.default_rng(0)
    dirs = np.repeat(np.arange(8), 10)
    x = np.maximum(rng.standard_normal((80, 50)), 0)
    x[:, 0] += np.exp(2 * (np.cos(np.deg2rad(dirs * 45.0)) - 1)) * 3
    st = DirectionStatistic(x, np.arange(0, 360, 45.0))
    res = permutation_test(lambda lb: {"eta2": st(lb)["eta2"]}, dirs, n_perm=100, rng=0)
    assert res.p["eta2"][0] == pytest.approx(1 / 101)
    assert np.median(res.p["eta2"][1:]) > 0.2
