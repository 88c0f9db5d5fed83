"""Tuning and selectivity of units (SAE units, or any [n_trials, n_units] response matrix).

Every statistic is a function of per-class sufficient statistics (class sums of activations,
of squares, of ranks, of activation-bin counts), computed with a one-hot matmul. A batch of
label permutations [P, T] therefore costs one batched matmul, which is what makes permutation
tests over all units cheap (:func:`models.interpret.stats.permutation_test`).

Direction (per-trial grating direction in degrees; classes are the distinct directions):
  - ``pref_dir``: direction of the largest mean response (Allen ``pref_dir``);
  - ``osi`` = (R_pref - R_orth) / (R_pref + R_orth), R_orth the mean of the responses at
    pref +- 90 deg; ``dsi`` = (R_pref - R_null) / (R_pref + R_null), R_null at pref + 180 deg
    (Allen Brain Observatory definitions, on mean responses; 0 where the denominator is <= 0);
  - ``dir_vs`` = 1 - circular variance = |sum_c R_c e^{i theta_c}| / sum_c R_c and ``ori_vs``,
    its orientation counterpart on 2 theta (global DSI/OSI); ``vs_dir_deg``/``vs_ori_deg``: the
    angles of these vector sums (preferred direction / orientation);
  - ``eta2`` = SS_between / SS_total and the one-way ANOVA ``anova_f`` with parametric
    ``anova_p``. ``eta2`` is the primary statistic (tests any tuning, bounded, a monotone
    function of F for fixed trial and class counts).
Categorical (genetic background, any class label):
  - ``auroc``: one-vs-rest AUROC (Mann-Whitney, ties averaged), maximised over classes
    (``best_class``) — the primary statistic;
  - ``dprime`` = (mu_best - mu_rest) / sqrt((var_best + var_rest) / 2) for that class;
  - ``mi``: mutual information (bits) between the class and the discretised activation (bin 0 =
    exactly zero, i.e. silent, then ``n_bins - 1`` equal-count bins of the unit's positive
    activations). Plug-in estimate, biased upwards; compare it against its permutation null.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

PRIMARY = {"direction": "eta2", "categorical": "auroc"}
DIRECTION_TESTED = ("eta2", "dir_vs", "ori_vs", "osi", "dsi")
CATEGORICAL_TESTED = ("auroc", "dprime", "mi")


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[P, T] int labels -> [P, T, C] float one-hot."""
    return (labels[..., None] == np.arange(n_classes)).astype(np.float64)


def _class_sums(oh: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-class sums [P, C, K] of ``x`` [T, K] for one-hot labels [P, T, C]: one BLAS GEMM."""
    p, t, c = oh.shape
    return (oh.transpose(0, 2, 1).reshape(p * c, t) @ x).reshape(p, c, x.shape[1])


def encode_classes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index per trial (-1 for missing: NaN, None, negative ints) and the class values."""
    v = np.asarray(values)
    if v.dtype.kind == "f":
        ok = np.isfinite(v)
    elif v.dtype.kind in "iu":
        ok = v >= 0
    else:
        ok = np.array([x is not None and x == x and x != "" for x in v.tolist()], dtype=bool)
    idx = np.full(v.shape, -1, dtype=np.int64)
    classes = np.unique(v[ok]) if ok.any() else np.array([])
    if ok.any():
        idx[ok] = np.searchsorted(classes, v[ok])
    return idx, classes


class DirectionStatistic:
    """Direction tuning statistics of ``acts`` [T, U] for label batches [P, T] of class indices
    into ``directions_deg`` [C] (the distinct directions, degrees)."""

    def __init__(self, acts: np.ndarray, directions_deg: np.ndarray):
        self.x = np.asarray(acts, dtype=np.float64)
        self.dirs = np.asarray(directions_deg, dtype=np.float64) % 360.0
        c = self.dirs.size
        if c < 2:
            raise ValueError("direction tuning needs at least two directions")
        self.n = self.x.shape[0]
        self.grand = self.x.mean(0)
        self.ss_total = ((self.x - self.grand) ** 2).sum(0)
        rad = np.deg2rad(self.dirs)
        self.e1 = np.exp(1j * rad)
        self.e2 = np.exp(2j * rad)

        def nearest(target: np.ndarray) -> np.ndarray:
            d = np.abs((self.dirs[None, :] - target[:, None] + 180.0) % 360.0 - 180.0)
            return d.argmin(1)

        self.null_idx = nearest(self.dirs + 180.0)
        self.orth1 = nearest(self.dirs + 90.0)
        self.orth2 = nearest(self.dirs - 90.0)

    def class_means(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        oh = _one_hot(np.atleast_2d(labels), self.dirs.size)  # [P, T, C]
        counts = oh.sum(1)  # [P, C]
        sums = _class_sums(oh, self.x)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts[..., None]
        return means, counts

    def __call__(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        means, counts = self.class_means(labels)  # [P, C, U]
        return self.from_means(means, counts)

    def from_means(self, means: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        c = self.dirs.size
        means_f = np.nan_to_num(means)
        ss_b = (counts[..., None] * (means_f - self.grand) ** 2).sum(1)  # [P, U]
        with np.errstate(invalid="ignore", divide="ignore"):
            eta2 = np.where(self.ss_total > 0, ss_b / self.ss_total, 0.0)
            df_w = max(self.n - c, 1)
            ss_w = np.maximum(self.ss_total - ss_b, 0.0)
            f = np.where(ss_w > 0, (ss_b / (c - 1)) / (ss_w / df_w), np.where(ss_b > 0, np.inf, 0))
        pref = means_f.argmax(1)  # [P, U]
        r_pref = np.take_along_axis(means_f, pref[:, None, :], 1)[:, 0]
        r_null = np.take_along_axis(means_f, self.null_idx[pref][:, None, :], 1)[:, 0]
        r_o1 = np.take_along_axis(means_f, self.orth1[pref][:, None, :], 1)[:, 0]
        r_o2 = np.take_along_axis(means_f, self.orth2[pref][:, None, :], 1)[:, 0]
        r_orth = 0.5 * (r_o1 + r_o2)

        def index(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            den = a + b
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, (a - b) / den, 0.0)

        total = means_f.sum(1)
        v1 = np.einsum("pcu,c->pu", means_f, self.e1)
        v2 = np.einsum("pcu,c->pu", means_f, self.e2)
        with np.errstate(invalid="ignore", divide="ignore"):
            dir_vs = np.where(total > 0, np.abs(v1) / total, 0.0)
            ori_vs = np.where(total > 0, np.abs(v2) / total, 0.0)
        return {
            "eta2": eta2,
            "anova_f": f,
            "osi": index(r_pref, r_orth),
            "dsi": index(r_pref, r_null),
            "dir_vs": dir_vs,
            "ori_vs": ori_vs,
            "pref_dir": self.dirs[pref],
            "vs_dir_deg": np.rad2deg(np.angle(v1)) % 360.0,
            "vs_ori_deg": (np.rad2deg(np.angle(v2)) % 360.0) / 2.0,
        }

    def anova_p(self, f: np.ndarray) -> np.ndarray:
        return sps.f.sf(f, self.dirs.size - 1, max(self.n - self.dirs.size, 1))


def direction_tuning(acts: np.ndarray, directions_deg: np.ndarray) -> dict[str, np.ndarray]:
    """All direction statistics [U] (see module docstring); trials with NaN direction dropped."""
    d = np.asarray(directions_deg, dtype=np.float64)
    ok = np.isfinite(d)
    idx, classes = encode_classes(np.round(d[ok] % 360.0, 6))
    st = DirectionStatistic(np.asarray(acts)[ok], classes)
    out = {k: v[0] for k, v in st(idx[None]).items()}
    out["anova_p"] = st.anova_p(out["anova_f"])
    return out


class CategoricalStatistic:
    """Categorical selectivity of ``acts`` [T, U] for label batches [P, T] in 0..C-1."""

    def __init__(self, acts: np.ndarray, n_classes: int, n_bins: int = 8):
        if n_classes < 2:
            raise ValueError("categorical selectivity needs at least two classes")
        self.x = np.asarray(acts, dtype=np.float64)
        self.c = n_classes
        self.n, self.u = self.x.shape
        self.ranks = sps.rankdata(self.x, axis=0)
        self.s1 = self.x.sum(0)
        self.s2 = (self.x**2).sum(0)
        self.moments = np.concatenate([self.ranks, self.x, self.x**2], axis=1)  # [T, 3U]
        self.n_bins = n_bins
        self.bins = self._discretise(self.x, n_bins)  # [T, U] in 0..n_bins-1
        self.bin_hot = (self.bins[..., None] == np.arange(n_bins)).astype(np.float64)
        self.bin_hot = self.bin_hot.reshape(self.n, self.u * n_bins)
        self.p_bin = self.bin_hot.mean(0).reshape(self.u, n_bins)

    @staticmethod
    def _discretise(x: np.ndarray, n_bins: int) -> np.ndarray:
        out = np.zeros(x.shape, dtype=np.int64)
        for j in range(x.shape[1]):
            col = x[:, j]
            pos = col > 0
            if pos.sum() == 0:
                continue
            edges = np.quantile(col[pos], np.linspace(0, 1, n_bins)[1:-1])
            out[pos, j] = 1 + np.searchsorted(edges, col[pos], side="right")
        return np.minimum(out, n_bins - 1)

    def __call__(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        oh = _one_hot(np.atleast_2d(labels), self.c)  # [P, T, C]
        n_c = oh.sum(1)[..., None]  # [P, C, 1]
        n_r = self.n - n_c
        mom = _class_sums(oh, self.moments)
        u = self.u
        rank_sum, s1c, s2c = mom[..., :u], mom[..., u : 2 * u], mom[..., 2 * u :]
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (rank_sum - n_c * (n_c + 1) / 2) / (n_c * n_r)
        auc = np.where((n_c > 0) & (n_r > 0), auc, np.nan)
        best = np.nanargmax(np.where(np.isnan(auc), -np.inf, auc), axis=1)  # [P, U]
        auroc = np.take_along_axis(auc, best[:, None, :], 1)[:, 0]
        nb = np.take_along_axis(n_c[..., 0], best, 1)  # [P, U]
        nr = self.n - nb
        sb1 = np.take_along_axis(s1c, best[:, None, :], 1)[:, 0]
        sb2 = np.take_along_axis(s2c, best[:, None, :], 1)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            mu_b, mu_r = sb1 / nb, (self.s1 - sb1) / nr
            var_b = np.maximum(sb2 / nb - mu_b**2, 0)
            var_r = np.maximum((self.s2 - sb2) / nr - mu_r**2, 0)
            den = np.sqrt(0.5 * (var_b + var_r))
            dprime = np.where(den > 0, (mu_b - mu_r) / den, 0.0)
        # mutual information from joint (class, bin) counts
        joint = _class_sums(oh, self.bin_hot).reshape(-1, self.c, self.u, self.n_bins)
        pj = joint / self.n
        pc = (n_c[..., 0] / self.n)[:, :, None, None]
        pb = self.p_bin[None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(pj > 0, pj * np.log2(pj / (pc * pb)), 0.0)
        mi = terms.sum((1, 3))
        return {"auroc": auroc, "best_class": best, "dprime": dprime, "mi": mi}


def categorical_selectivity(
    acts: np.ndarray, labels: np.ndarray, n_bins: int = 8
) -> dict[str, np.ndarray]:
    """All categorical statistics [U]; ``best_class`` indexes ``classes`` (also returned)."""
    idx, classes = encode_classes(labels)
    ok = idx >= 0
    st = CategoricalStatistic(np.asarray(acts)[ok], len(classes), n_bins)
    out = {k: v[0] for k, v in st(idx[ok][None]).items()}
    out["classes"] = classes
    return out
