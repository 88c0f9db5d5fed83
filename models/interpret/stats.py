"""Permutation tests (vectorised across units) and Benjamini-Hochberg FDR.

Trial-level labels are permuted across trials. Per-session labels (e.g. genetic background)
are permuted across *sessions*, keeping each session's trials together: with S sessions the
null has at most S! / prod(n_c!) distinct label assignments, which are enumerated exactly when
there are few, so the smallest attainable p-value is 1 / (number of distinct assignments) —
e.g. 0.1 for 5 sessions split 3 vs 2. Nothing can be "significant" below that, however
strongly a unit separates the sessions, and this is the point: such a unit may encode session
identity rather than the label. (``min_p`` is a lower bound: a statistic that is symmetric under
relabelling, such as AUROC maximised over classes, ties with mirrored assignments and attains
at best a multiple of it — 0.2 for the 3 vs 2 example.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

StatFn = Callable[[np.ndarray], dict[str, np.ndarray]]
"""Maps label batches [P, T] (class indices per trial) to statistics {name: [P, U]}."""


@dataclass
class PermutationResult:
    observed: dict[str, np.ndarray]  # {stat: [U]}
    p: dict[str, np.ndarray]  # {stat: [U]} one-sided (greater) permutation p-values
    n_perm: int  # permutations used (distinct assignments when exact)
    exact: bool  # all distinct assignments enumerated
    level: str  # "trial" or "session"
    min_p: float  # lower bound on attainable p: 1 / (assignments + 1 if random else assignments)


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over all entries of ``p`` (any shape).

    NaN entries are left out of the family and stay NaN. Matches
    ``scipy.stats.false_discovery_control(p, method="bh")`` on finite input.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    ok = np.flatnonzero(np.isfinite(flat))
    m = ok.size
    if m == 0:
        return q
    order = np.argsort(flat[ok], kind="mergesort")
    ranked = flat[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    qf = q.reshape(-1)
    qf[ok] = out
    return qf.reshape(p.shape)


def _multiset_permutations(items: list[int]) -> Iterator[tuple[int, ...]]:
    counts = Counter(items)
    keys = sorted(counts)
    n = len(items)
    cur: list[int] = []

    def rec() -> Iterator[tuple[int, ...]]:
        if len(cur) == n:
            yield tuple(cur)
            return
        for k in keys:
            if counts[k]:
                counts[k] -= 1
                cur.append(k)
                yield from rec()
                cur.pop()
                counts[k] += 1

    yield from rec()


def n_distinct_assignments(labels: np.ndarray) -> int:
    """Number of distinct permutations of a label vector (multinomial coefficient)."""
    counts = Counter(np.asarray(labels).tolist()).values()
    n = math.factorial(sum(counts))
    for c in counts:
        n //= math.factorial(c)
    return n


def session_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-session label and each trial's session index; refuses labels varying in a session."""
    uniq, sess_idx = np.unique(np.asarray(groups), return_inverse=True)
    lab = np.asarray(labels)
    per = np.empty(uniq.size, dtype=lab.dtype)
    for s in range(uniq.size):
        vals = np.unique(lab[sess_idx == s])
        if vals.size != 1:
            raise ValueError(
                f"label varies within session {uniq[s]!r}: a per-session label must be constant"
            )
        per[s] = vals[0]
    return per, sess_idx


def permuted_labels(
    labels: np.ndarray,
    n_perm: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    max_exact: int | None = None,
) -> tuple[np.ndarray, bool]:
    """Label permutations [P, T] for the null distribution, and whether they are exhaustive.

    Trial level (``groups`` None): P = ``n_perm`` random permutations across trials.
    Session level: session labels are permuted across sessions and broadcast to trials; when the
    number of distinct assignments is at most ``max_exact`` (default ``n_perm``) they are all
    enumerated (the identity included) and the test is exact.
    """
    labels = np.asarray(labels)
    if groups is None:
        perms = rng.permuted(np.broadcast_to(labels, (n_perm, labels.size)).copy(), axis=1)
        return perms, False
    per, sess_idx = session_labels(labels, groups)
    n_assign = n_distinct_assignments(per)
    if n_assign <= (max_exact or n_perm):
        assign = np.array(list(_multiset_permutations(per.tolist())), dtype=per.dtype)
        return assign[:, sess_idx], True
    assign = rng.permuted(np.broadcast_to(per, (n_perm, per.size)).copy(), axis=1)
    return assign[:, sess_idx], False


def permutation_test(
    stat_fn: StatFn,
    labels: np.ndarray,
    *,
    n_perm: int = 1000,
    rng: np.random.Generator | int | None = 0,
    groups: np.ndarray | None = None,
    chunk: int = 64,
) -> PermutationResult:
    """One-sided ("greater") permutation p-values for every statistic and unit at once.

    ``stat_fn`` receives label batches [P, T] and returns {stat: [P, U]}. With random
    permutations p = (1 + #{null >= observed}) / (1 + P); with exact enumeration (session level,
    few sessions) p = #{null >= observed} / P, the identity being one of the P assignments.
    NaN statistics give NaN p-values.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    labels = np.asarray(labels)
    observed = {k: v[0] for k, v in stat_fn(labels[None, :]).items()}
    perms, exact = permuted_labels(labels, n_perm, rng, groups)
    ge = {k: np.zeros(v.shape, dtype=np.int64) for k, v in observed.items()}
    for i in range(0, perms.shape[0], chunk):
        null = stat_fn(perms[i : i + chunk])
        for k, v in null.items():
            obs = observed[k]
            tol = 1e-9 * np.maximum(np.abs(obs), 1.0)
            ge[k] += (v >= obs[None, :] - tol[None, :]).sum(0)
    n = perms.shape[0]
    p = {}
    for k, c in ge.items():
        pk = c / n if exact else (c + 1) / (n + 1)
        p[k] = np.where(np.isfinite(observed[k]), pk, np.nan)
    min_p = 1.0 / n if exact else 1.0 / (n + 1)
    return PermutationResult(
        observed, p, n, exact, "trial" if groups is None else "session", float(min_p)
    )
