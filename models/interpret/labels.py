"""Unit labels: selectivity + permutation p-values + BH-FDR, gated by two controls.

Pipeline (:func:`run_labelling`) for unit activations per trial ``acts`` [T, U]:

1. For every variable, all statistics of :mod:`models.interpret.selectivity` with one-sided
   permutation p-values (trial-level permutations; session-level for per-session variables,
   i.e. those given ``groups``). The *primary* statistic per variable (``eta2`` for direction,
   ``auroc`` for categorical) is the one tested for labelling.
2. Benjamini-Hochberg q-values of the primary p-values over units x variables.
3. The same pipeline on two controls: (a) the SAE units of a randomly initialised decoder of
   the same architecture on the same trials (``control_acts``) and (b) the real units with the
   labels shuffled once (at the variable's level: sessions for per-session labels).
4. A unit is labelled with variable V when q < ``alpha`` AND its primary statistic exceeds the
   ``control_quantile`` quantile (default 0.99) of that statistic across all units of *each*
   control ("beats both controls"). Every report carries the controls' thresholds and how many
   of their units would have passed the q-criterion alone (the pipeline's false-label count).

Labels reproduced with a second SAE seed (:func:`mark_reproduced`: units matched one-to-one by
decoder-row cosine similarity, Hungarian assignment, same variable and preferred value) are
marked ``reproduced_across_seeds``. :func:`write_units_json` writes the bundle's ``units.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from models.config import Config
from models.interpret.selectivity import (
    CATEGORICAL_TESTED,
    DIRECTION_TESTED,
    PRIMARY,
    CategoricalStatistic,
    DirectionStatistic,
    encode_classes,
)
from models.interpret.stats import bh_fdr, permutation_test, session_labels

SCHEMA_VERSION = 1


class LabelConfig(Config):
    alpha: float = Field(0.01, gt=0, lt=1, description="BH-FDR level for a label")
    n_perm: int = Field(1000, ge=10, description="permutations per variable")
    control_quantile: float = Field(0.99, gt=0, lt=1)
    mi_bins: int = Field(8, ge=3)
    seed: int = 0
    match_min_cosine: float = Field(0.7, ge=-1, le=1, description="seed matching threshold")
    match_direction_tol_deg: float = Field(45.0, ge=0, description="same preferred direction")


@dataclass
class Variable:
    """A variable to label units by. ``values`` is per trial: direction in degrees (NaN =
    none) for ``kind="direction"``; any class labels (None/NaN/"" = none) for categorical.
    ``groups`` (session id per trial) marks a per-session label: permutations then move whole
    sessions."""

    name: str
    kind: Literal["direction", "categorical"]
    values: np.ndarray
    groups: np.ndarray | None = None


@dataclass
class VariableResult:
    name: str
    kind: str
    primary: str
    stats: dict[str, np.ndarray]  # [U] each (plus "classes" for categorical: class values)
    p: dict[str, np.ndarray]  # permutation p per tested statistic [U]
    level: str
    n_perm: int
    exact: bool
    min_p: float
    q: np.ndarray = field(default_factory=lambda: np.array([]))  # BH over units x variables

    @property
    def primary_stat(self) -> np.ndarray:
        return self.stats[self.primary]


@dataclass
class SelectivityTable:
    n_units: int
    variables: dict[str, VariableResult]


def _shuffle(var: Variable, rng: np.random.Generator) -> Variable:
    """The variable with its labels shuffled once (valid entries only; whole sessions when
    ``groups`` is set)."""
    v = np.asarray(var.values)
    if var.groups is None:
        if var.kind == "direction":
            ok = np.isfinite(v.astype(np.float64))
        else:
            ok = encode_classes(v)[0] >= 0
        out = v.copy()
        out[ok] = rng.permutation(v[ok])
        return Variable(var.name, var.kind, out, None)
    idx, classes = encode_classes(v)
    ok = idx >= 0
    per, sess = session_labels(idx[ok], np.asarray(var.groups)[ok])
    new = idx.copy()
    new[ok] = rng.permutation(per)[sess]
    vals = np.array([classes[i] if i >= 0 else None for i in new], dtype=object)
    return Variable(var.name, var.kind, vals, var.groups)


def analyse_selectivity(
    acts: np.ndarray,
    variables: Sequence[Variable],
    cfg: LabelConfig | None = None,
    *,
    shuffle_labels: bool = False,
    seed_offset: int = 0,
) -> SelectivityTable:
    """Statistics, permutation p-values and BH q-values for every unit and variable.

    ``acts`` [T, U]: one row per trial (see :func:`trial_activations`); rows with NaN and
    trials with a missing label are left out of that variable's analysis.
    """
    cfg = cfg or LabelConfig()
    rng = np.random.default_rng([cfg.seed, seed_offset])
    acts = np.asarray(acts, dtype=np.float64)
    out: dict[str, VariableResult] = {}
    finite = np.isfinite(acts).all(1)  # trials without activations (NaN rows) are left out
    for var in variables:
        if shuffle_labels:
            var = _shuffle(var, rng)
        vals = np.asarray(var.values)
        if var.kind == "direction":
            d = vals.astype(np.float64)
            ok = np.isfinite(d) & finite
            idx, classes = encode_classes(np.round(d[ok] % 360.0, 6))
            st = DirectionStatistic(acts[ok], classes)
            tested = DIRECTION_TESTED
        elif var.kind == "categorical":
            idx, classes = encode_classes(vals)
            ok = (idx >= 0) & finite
            idx = idx[ok]
            st = CategoricalStatistic(acts[ok], len(classes), cfg.mi_bins)
            tested = CATEGORICAL_TESTED
        else:
            raise ValueError(f"variable {var.name}: unknown kind {var.kind!r}")
        groups = None if var.groups is None else np.asarray(var.groups)[ok]

        def stat_fn(lab: np.ndarray, st=st, tested=tested) -> dict[str, np.ndarray]:
            s = st(lab)
            return {k: s[k] for k in tested}

        res = permutation_test(stat_fn, idx, n_perm=cfg.n_perm, rng=rng, groups=groups)
        stats = {k: v[0] for k, v in st(idx[None]).items()}
        if var.kind == "direction":
            stats["anova_p"] = st.anova_p(stats["anova_f"])
        else:
            stats["classes"] = classes
        out[var.name] = VariableResult(
            var.name,
            var.kind,
            PRIMARY[var.kind],
            stats,
            res.p,
            res.level,
            res.n_perm,
            res.exact,
            res.min_p,
        )
    names = list(out)
    if names:
        p = np.stack([out[n].p[out[n].primary] for n in names], axis=1)  # [U, V]
        q = bh_fdr(p)
        for j, n in enumerate(names):
            out[n].q = q[:, j]
    return SelectivityTable(acts.shape[1], out)


def trial_activations(
    acts: np.ndarray, trial_index: np.ndarray, n_trials: int | None = None
) -> np.ndarray:
    """Per-trial unit activations [n_trials, U] from per-window SAE activations.

    ``acts`` [N, L, U] (windows x latent tokens x units) or [N, U]; ``trial_index`` [N] the
    trial each window belongs to (-1 = none, e.g. grey screen). Each trial's value is the mean
    over its windows and latent tokens; trials without windows get NaN rows (drop them, or
    their labels, before labelling).
    """
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(1)
    ti = np.asarray(trial_index, dtype=np.int64)
    n = int(ti.max()) + 1 if n_trials is None else n_trials
    ok = (ti >= 0) & (ti < n)
    sums = np.zeros((n, a.shape[1]))
    np.add.at(sums, ti[ok], a[ok])
    counts = np.bincount(ti[ok], minlength=n)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _fmt_q(q: float) -> str:
    for t in (0.001, 0.01, 0.05):
        if q < t:
            return f"q<{t:g}"
    return f"q={q:.2f}"


def label_text(vr: VariableResult, u: int) -> tuple[str, dict]:
    """Human-readable label and its structured form for unit ``u`` of one variable."""
    s, q = vr.stats, float(vr.q[u])
    if vr.kind == "direction":
        pref = float(s["pref_dir"][u])
        osi, dsi = float(s["osi"][u]), float(s["dsi"][u])
        text = f"{vr.name} {pref:g}°, OSI {osi:.2f}, {_fmt_q(q)}"
        info = {"preferred": pref, "osi": osi, "dsi": dsi}
    else:
        cls = s["classes"][int(s["best_class"][u])]
        cls = cls.item() if hasattr(cls, "item") else cls
        text = f"{vr.name} {cls}, AUROC {float(s['auroc'][u]):.2f}, {_fmt_q(q)}"
        info = {"preferred": cls, "auroc": float(s["auroc"][u])}
    info |= {
        "variable": vr.name,
        "text": text,
        "statistic": vr.primary,
        "value": float(vr.primary_stat[u]),
        "p": float(vr.p[vr.primary][u]),
        "q": q,
    }
    return text, info


@dataclass
class LabellingResult:
    real: SelectivityTable
    random_init: SelectivityTable
    shuffled: SelectivityTable
    cfg: LabelConfig
    thresholds: dict[str, dict[str, float]]  # {var: {"random_init": t, "shuffled": t}}
    labelled: dict[str, np.ndarray]  # {var: bool [U]}
    reproduced: dict[str, np.ndarray] | None = None  # {var: bool [U]}
    seed_match: tuple[np.ndarray, np.ndarray] | None = None  # (matched unit, cosine) [U]

    def unit_labels(self, u: int) -> list[dict]:
        out = []
        for name, vr in self.real.variables.items():
            if self.labelled[name][u]:
                info = label_text(vr, u)[1]
                if self.reproduced is not None:
                    info["reproduced_across_seeds"] = bool(self.reproduced[name][u])
                out.append(info)
        return out

    def label_strings(self) -> list[str]:
        """One string per unit ('' when unlabelled), labels joined by '; '."""
        return ["; ".join(d["text"] for d in self.unit_labels(u)) for u in range(self.n_units)]

    @property
    def n_units(self) -> int:
        return self.real.n_units

    def summary(self) -> dict:
        """Per variable: labelled units in the real model and what each control would get.

        ``n_significant`` (and the controls' counts) use the q-values of the pipeline, BH over
        units x variables. Because that family is pooled, one table's count for a variable
        depends on its other variables: a trained decoder with hundreds of direction units at
        the smallest p lets its weaker genetic p-values through, while a control with nothing
        else significant does not pass the same p-values. The ``*_within_variable`` counts
        (BH over one variable's units only) compare the tables on that variable alone."""
        a = self.cfg.alpha
        out = {}
        for name in self.real.variables:
            within = {
                k: int((bh_fdr(t.variables[name].p[t.variables[name].primary]) < a).sum())
                for k, t in (
                    ("real", self.real),
                    ("random_init", self.random_init),
                    ("shuffled", self.shuffled),
                )
            }
            out[name] = {
                "n_labelled": int(self.labelled[name].sum()),
                "n_significant": int((self.real.variables[name].q < a).sum()),
                "random_init_n_significant": int((self.random_init.variables[name].q < a).sum()),
                "shuffled_n_significant": int((self.shuffled.variables[name].q < a).sum()),
                "n_significant_within_variable": within["real"],
                "random_init_n_significant_within_variable": within["random_init"],
                "shuffled_n_significant_within_variable": within["shuffled"],
                "threshold_random_init": self.thresholds[name]["random_init"],
                "threshold_shuffled": self.thresholds[name]["shuffled"],
                "permutation_level": self.real.variables[name].level,
                "min_attainable_p": self.real.variables[name].min_p,
            }
            if self.reproduced is not None:
                out[name]["n_reproduced"] = int(self.reproduced[name].sum())
        return out


def label_units(
    real: SelectivityTable,
    random_init: SelectivityTable,
    shuffled: SelectivityTable,
    cfg: LabelConfig | None = None,
) -> LabellingResult:
    """Apply the labelling rule (module docstring, step 4) to precomputed tables."""
    cfg = cfg or LabelConfig()
    thresholds, labelled = {}, {}
    for name, vr in real.variables.items():
        t = {}
        for cname, tab in (("random_init", random_init), ("shuffled", shuffled)):
            cs = tab.variables[name].primary_stat
            cs = cs[np.isfinite(cs)]
            t[cname] = float(np.quantile(cs, cfg.control_quantile)) if cs.size else -np.inf
        thresholds[name] = t
        s = vr.primary_stat
        labelled[name] = (
            np.isfinite(s) & (vr.q < cfg.alpha) & (s > t["random_init"]) & (s > t["shuffled"])
        )
    return LabellingResult(real, random_init, shuffled, cfg, thresholds, labelled)


def run_labelling(
    acts: np.ndarray,
    control_acts: np.ndarray,
    variables: Sequence[Variable],
    cfg: LabelConfig | None = None,
) -> LabellingResult:
    """Full pipeline: real units, random-init-decoder units (``control_acts`` [T, U'] on the
    same trials) and shuffled labels; then :func:`label_units`."""
    cfg = cfg or LabelConfig()
    real = analyse_selectivity(acts, variables, cfg, seed_offset=0)
    rnd = analyse_selectivity(control_acts, variables, cfg, seed_offset=1)
    shf = analyse_selectivity(acts, variables, cfg, shuffle_labels=True, seed_offset=2)
    return label_units(real, rnd, shf, cfg)


def match_units(w_a: np.ndarray, w_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of units of two SAEs by decoder-row cosine similarity.

    ``w_a`` [U_a, D], ``w_b`` [U_b, D] (decoder rows). Returns, per unit of A, the matched unit
    of B (-1 if none, when U_a > U_b) and the cosine similarity (NaN if none).
    """
    a = np.asarray(w_a, dtype=np.float64)
    b = np.asarray(w_b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = a @ b.T
    rows, cols = linear_sum_assignment(-cos)
    match = np.full(a.shape[0], -1, dtype=np.int64)
    sim = np.full(a.shape[0], np.nan)
    match[rows] = cols
    sim[rows] = cos[rows, cols]
    return match, sim


def _same_preference(vr_a: VariableResult, vr_b: VariableResult, ua: int, ub: int, tol: float):
    if vr_a.kind == "direction":
        da = float(vr_a.stats["pref_dir"][ua])
        db = float(vr_b.stats["pref_dir"][ub])
        return abs((da - db + 180.0) % 360.0 - 180.0) <= tol
    ca = vr_a.stats["classes"][int(vr_a.stats["best_class"][ua])]
    cb = vr_b.stats["classes"][int(vr_b.stats["best_class"][ub])]
    return ca == cb


def mark_reproduced(
    a: LabellingResult, b: LabellingResult, w_dec_a: np.ndarray, w_dec_b: np.ndarray
) -> None:
    """Mark each label of ``a`` reproduced when its matched unit in ``b`` (cosine >=
    ``cfg.match_min_cosine``) carries a label for the same variable with the same preference
    (preferred direction within ``match_direction_tol_deg``, or the same class)."""
    match, sim = match_units(w_dec_a, w_dec_b)
    cfg = a.cfg
    rep = {}
    for name, vr in a.real.variables.items():
        r = np.zeros(a.n_units, dtype=bool)
        vb = b.real.variables.get(name)
        if vb is not None:
            for u in np.flatnonzero(a.labelled[name]):
                j = match[u]
                if j < 0 or not sim[u] >= cfg.match_min_cosine or not b.labelled[name][j]:
                    continue
                r[u] = _same_preference(vr, vb, u, j, cfg.match_direction_tol_deg)
        rep[name] = r
    a.reproduced = rep
    a.seed_match = (match, sim)


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def units_document(
    result: LabellingResult,
    firing_rate: np.ndarray | None = None,
    extra: dict | None = None,
) -> dict:
    """The ``units.json`` document (see :func:`write_units_json`)."""
    units = []
    for u in range(result.n_units):
        stats = {}
        for name, vr in result.real.variables.items():
            s = {k: v[u] for k, v in vr.stats.items() if k != "classes"}
            if vr.kind == "categorical":
                s["best_class"] = vr.stats["classes"][int(vr.stats["best_class"][u])]
            s |= {f"p_{k}": v[u] for k, v in vr.p.items()}
            s["q"] = vr.q[u]
            stats[name] = s
        labels = result.unit_labels(u)
        entry = {
            "id": u,
            "label": "; ".join(d["text"] for d in labels),
            "labels": labels,
            "stats": stats,
            "reproduced_across_seeds": None,
            "seed_match": None,
        }
        if result.reproduced is not None:
            entry["reproduced_across_seeds"] = bool(
                any(d["reproduced_across_seeds"] for d in labels)
            )
        if result.seed_match is not None:
            m, c = result.seed_match
            entry["seed_match"] = {"unit": int(m[u]), "cosine": c[u]}
        if firing_rate is not None:
            entry["firing_rate"] = float(firing_rate[u])
        units.append(entry)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "n_units": result.n_units,
        "method": {
            "config": result.cfg.to_dict(),
            "primary_statistic": {n: v.primary for n, v in result.real.variables.items()},
            "fdr": "Benjamini-Hochberg over units x variables (primary statistics)",
            "rule": (
                "label iff q < alpha and the primary statistic exceeds the control_quantile "
                "quantile of that statistic over all units of both controls"
            ),
            "controls": ["random_init_decoder", "shuffled_labels"],
        },
        "summary": result.summary(),
        "units": units,
    }
    if extra:
        doc["extra"] = extra
    return _jsonable(doc)


def write_units_json(
    path: str | Path,
    result: LabellingResult,
    firing_rate: np.ndarray | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``units.json``: schema_version, n_units, method, summary (per variable: labelled
    count, controls' thresholds and significant counts), and per unit: id, label (joined text,
    '' if none), labels (structured), stats per variable (every statistic, p_<stat>, q),
    reproduced_across_seeds (null when no second seed was compared) and seed_match."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(units_document(result, firing_rate, extra), indent=1) + "\n")
    return path


def read_units_json(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: unsupported units.json schema {doc.get('schema_version')}")
    return doc
