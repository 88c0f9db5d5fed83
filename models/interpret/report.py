"""The interpretation report: one self-contained HTML file with PNG figures.

:func:`write_report` writes ``report.html`` into the output directory. Every figure is a PNG
(matplotlib, Agg backend) **embedded in the HTML as a base64 data URI**, so the one file can be
mailed or archived on its own; the same PNGs are also written to ``figures/`` beside it for other
uses. Sections: what is and is not supported (plain sentences from the numbers), SAE metrics,
accuracy (plain / spliced / mean ablation), labels real vs controls with the selectivity
distributions, tuning curves and top-activating trials of the most selective units per variable,
the ablation (dissociation) matrix with intervals, attribution agreement, and a dashboard per
labelled unit (anchors ``#unit-<id>``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.interpret.selectivity import encode_classes  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}
h1,h2,h3{font-weight:600} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} .note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
.unit{border:1px solid #ddd;padding:.5em 1em;margin:1em 0;border-radius:4px}
img{max-width:100%} .small{font-size:.85em;color:#555} code{background:#f4f4f4;padding:0 .2em}
"""


class _Figures:
    """Renders figures to PNG bytes, keeps them for the HTML and writes them to ``figures/``."""

    def __init__(self, out: Path, dpi: int = 90):
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dpi = dpi
        self.files: list[Path] = []

    def img(self, fig, name: str, alt: str = "", dpi: int | None = None) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi or self.dpi)
        plt.close(fig)
        data = buf.getvalue()
        path = self.dir / f"{name}.png"
        path.write_bytes(data)
        self.files.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        return f'<img alt="{html.escape(alt or name)}" src="data:image/png;base64,{b64}">'


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not np.isfinite(x):
        return "–"
    if isinstance(x, int | np.integer):
        return str(int(x))
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return _e(x)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    h = "".join(
        f'<th class="l">{_e(c)}</th>' if i < left else f"<th>{_e(c)}</th>"
        for i, c in enumerate(header)
    )
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


# ---------------------------------------------------------------------------------------------
# figures


def fig_accuracy(summary: dict):
    acc = summary["accuracy"]
    tasks = list(acc)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    conds = [
        ("decoder", "plain decoder"),
        ("spliced", "SAE spliced"),
        ("mean_ablation", "mean-ablated"),
    ]
    w = 0.26
    for i, (k, name) in enumerate(conds):
        ax.bar(np.arange(len(tasks)) + (i - 1) * w, [acc[t][k] for t in tasks], w, label=name)
    for j, t in enumerate(tasks):
        ax.text(j, 1.02, f"n={acc[t]['n_trials']}", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("trial-level test accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def fig_sae_training(res):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    runs = [(f"trained, seed {r.seed}", r) for r in res.saes] + [
        (f"random-init decoder, seed {res.control_sae.seed}", res.control_sae)
    ]
    for name, r in runs:
        h = r.history
        axes[0].plot(h["step"], h["fvu"], label=name)
        axes[1].plot(h["step"], h["dead_fraction"], label=name)
        fr = r.metrics_test.firing_rate
        axes[2].hist(np.log10(np.maximum(fr, 1e-6)), bins=40, histtype="step", label=name)
    axes[0].set(xlabel="step", ylabel="training FVU (batch)", yscale="log")
    axes[1].set(xlabel="step", ylabel="dead fraction (AuxK mask)")
    axes[2].set(xlabel="log10 firing rate on test tokens (1e-6 = dead)", ylabel="units")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_selectivity(res):
    lab = res.labelling
    names = list(lab.real.variables)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        vr = lab.real.variables[name]
        series = [
            ("trained", vr.primary_stat, "C0"),
            ("random-init decoder", lab.random_init.variables[name].primary_stat, "C1"),
            ("shuffled labels", lab.shuffled.variables[name].primary_stat, "C2"),
        ]
        allv = np.concatenate([s[np.isfinite(s)] for _, s, _ in series])
        if allv.size == 0:
            continue
        bins = np.linspace(allv.min(), allv.max() + 1e-12, 40)
        for label, s, c in series:
            ax.hist(s[np.isfinite(s)], bins=bins, histtype="step", color=c, label=label, lw=1.4)
        t = lab.thresholds[name]
        ax.axvline(t["random_init"], color="C1", ls="--", lw=1)
        ax.axvline(t["shuffled"], color="C2", ls="--", lw=1)
        ax.set_yscale("log")
        n = int(lab.labelled[name].sum())
        ax.set_title(f"{name}: {vr.primary} ({n} labelled)", fontsize=10)
        ax.set_xlabel(f"{vr.primary} per unit (dashed: control thresholds)")
    axes[0][0].set_ylabel("units")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _class_means(acts: np.ndarray, values: np.ndarray, kind: str):
    """(class values, mean [C], sem [C]) of activations ``acts`` [T] by class."""
    v = np.asarray(values)
    if kind == "direction":
        v = np.round(v.astype(np.float64) % 360.0, 6)
    idx, classes = encode_classes(v)
    ok = (idx >= 0) & np.isfinite(acts)
    means, sems = [], []
    for c in range(len(classes)):
        a = acts[ok & (idx == c)]
        means.append(a.mean() if a.size else np.nan)
        sems.append(a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else 0.0)
    return classes, np.asarray(means), np.asarray(sems)


def _variable(res, name):
    from models.interpret.pipeline import label_variables

    for v in label_variables(res.label_table, list(res.tasks)):
        if v.name == name:
            return v
    return None


def _plot_tuning(ax, res, unit: int, var, title: str = ""):
    a = res.trial_acts[:, unit]
    classes, m, s = _class_means(a, var.values, var.kind)
    x = np.arange(len(classes))
    if var.kind == "direction":
        ax.errorbar(x, m, yerr=s, marker="o", ms=3, capsize=2)
        ax.set_xticks(x, [f"{c:g}" for c in classes], fontsize=7)
        ax.set_xlabel("direction (deg)", fontsize=8)
    else:
        ax.bar(x, m, yerr=s, capsize=2, color="C4")
        lbl = [str(c)[:10] if not isinstance(c, float) else f"{c:g}" for c in classes]
        ax.set_xticks(x, lbl, fontsize=7, rotation=30)
        if var.groups is not None:  # per-session means as dots
            sess = np.asarray(var.groups)
            idx, _ = encode_classes(np.asarray(var.values))
            for sid in np.unique(sess):
                k = (sess == sid) & np.isfinite(a)
                if k.any() and idx[k][0] >= 0:
                    ax.plot(idx[k][0], a[k].mean(), "k.", ms=4)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def _top_units(res, name: str, n: int) -> list[int]:
    lab = res.labelling
    vr = lab.real.variables[name]
    s = np.where(np.isfinite(vr.primary_stat), vr.primary_stat, -np.inf)
    labelled = np.flatnonzero(lab.labelled[name])
    pool = labelled if labelled.size else np.arange(lab.n_units)
    return [int(u) for u in pool[np.argsort(-s[pool])][:n]]


def fig_top_tuning(res, name: str, units: list[int]):
    var = _variable(res, name)
    n = len(units)
    cols = min(4, max(n, 1))
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.4 * rows), squeeze=False)
    vr = res.labelling.real.variables[name]
    for ax, u in zip(axes.flat, units, strict=False):
        _plot_tuning(
            ax, res, u, var, f"unit {u}: {vr.primary} {vr.primary_stat[u]:.3f}, q={vr.q[u]:.2g}"
        )
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supylabel("mean activation per trial", fontsize=8)
    fig.tight_layout()
    return fig


def fig_ablation(summary: dict, key: str = "ablation"):
    abl = summary.get(key, {})
    vars_ = list(abl)
    tasks = list(summary["accuracy"])
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * len(tasks), 1.2 + 1.0 * max(len(vars_), 1)))
    if not vars_:
        ax.text(0.5, 0.5, "no labelled units: nothing to ablate", ha="center", va="center")
        ax.axis("off")
        return fig
    mat = np.array(
        [[(abl[v].get(t) or {}).get("drop", np.nan) or 0.0 for t in tasks] for v in vars_]
    )
    lim = max(np.nanmax(np.abs(mat)), 0.02)
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, v in enumerate(vars_):
        for j, t in enumerate(tasks):
            c = abl[v].get(t)
            if not c:
                continue
            txt = (
                f"{c['drop']:+.3f} [{c['drop_ci'][0]:+.2f},{c['drop_ci'][1]:+.2f}]\n"
                f"random {c['random_drop']:+.3f} [{c['random_drop_ci'][0]:+.2f},"
                f"{c['random_drop_ci'][1]:+.2f}]\np={c['p']:.3f}"
                if c.get("random_drop") is not None
                else f"{c['drop']:+.3f}"
            )
            dark = abs(c["drop"] or 0.0) > 0.6 * lim
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_xticks(np.arange(len(tasks)), [f"decoded: {t}" for t in tasks], fontsize=8)
    ax.set_yticks(
        np.arange(len(vars_)),
        [f"ablated: {v} ({abl[v][tasks[0]]['n_units']} units)" for v in vars_],
        fontsize=8,
    )
    fig.colorbar(im, ax=ax, label="accuracy drop")
    fig.tight_layout()
    return fig


def fig_attribution(res):
    sc = res.attribution.get("scatter", {})
    tasks = list(sc)
    if not tasks:
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, 2 * len(tasks), figsize=(3.2 * 2 * len(tasks), 3), squeeze=False)
    k = 0
    for t in tasks:
        e = np.asarray(sc[t]["ablation"])
        for meth in ("grad", "ig"):
            ax = axes[0][k]
            k += 1
            a = np.asarray(sc[t][meth])
            ax.plot(e, a, ".", ms=3, alpha=0.6)
            lim = max(np.abs(e).max(), np.abs(a).max(), 1e-6)
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
            ag = res.attribution["methods"][t][meth]
            ax.set_title(f"{t}: {meth} vs ablation\nr={ag['pearson']:.2f}, top1={ag['top1']:.2f}",
                         fontsize=8)  # fmt: skip
            ax.set_xlabel("exact ablation (logit change)", fontsize=8)
            ax.set_ylabel(meth, fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def fig_unit(res, u: int, variables) -> plt.Figure:
    n = len(variables) + 2
    fig, axes = plt.subplots(1, n, figsize=(2.7 * n, 2.3))
    for ax, var in zip(axes, variables, strict=False):
        vr = res.labelling.real.variables[var.name]
        _plot_tuning(ax, res, u, var, f"{var.name}: {vr.primary} {vr.primary_stat[u]:.3f}")
    tc = res.time_course
    ax = axes[len(variables)]
    ax.plot(tc["t"], np.asarray(tc["acts"])[:, u], color="C3")
    ax.set_title("mean activation vs window end", fontsize=8)
    ax.set_xlabel("s after onset", fontsize=8)
    ax.tick_params(labelsize=7)
    ax = axes[len(variables) + 1]
    a = res.trial_acts[:, u]
    ax.hist(a[np.isfinite(a)], bins=30, color="C7")
    ax.set_title("per-trial activation", fontsize=8)
    ax.tick_params(labelsize=7)
    # fixed margins: a layout engine would cost a full extra draw per dashboard
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.27, top=0.86, wspace=0.32)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML


def _top_trials_table(res, u: int, n: int = 5) -> str:
    t = res.label_table
    a = res.trial_acts[:, u]
    order = np.argsort(-np.where(np.isfinite(a), a, -np.inf))[:n]
    rows = []
    for i in order:
        tf = t.temporal_frequency[i]
        rows.append(
            [
                _e(t.session_id[i]),
                str(int(t.trial[i])),
                _num(t.direction[i], "g"),
                _num(tf, "g") if np.isfinite(tf) else "–",
                _e(t.genetic[i]),
                _num(a[i], ".4f"),
            ]
        )
    return _table(["session", "trial", "direction", "TF", "genetic", "activation"], rows, left=1)


def _metrics_table(res) -> str:
    rows = []
    for name, r in [(f"trained, seed {x.seed}", x) for x in res.saes] + [
        (f"random-init decoder, seed {res.control_sae.seed}", res.control_sae)
    ]:
        for split, m in (("test", r.metrics_test), ("train", r.metrics_train)):
            rows.append(
                [
                    _e(name),
                    split,
                    _num(m.n_tokens),
                    _num(m.l0, ".2f"),
                    _num(m.fvu, ".4f"),
                    _num(m.dead_fraction, ".3f"),
                    _num(m.dense_fraction, ".3f"),
                ]
            )
    return _table(
        ["SAE", "tokens", "n", "L0", "FVU", "dead fraction", f"dense (> {m.dense_threshold:g})"],
        rows,
        left=2,
    )


def _accuracy_table(summary: dict) -> str:
    rows = []
    for t, r in summary["accuracy"].items():
        rows.append(
            [
                _e(t)
                + (" (within-session upper bound)" if r.get("within_session_upper_bound") else ""),
                _num(r["n_trials"]),
                _num(r["decoder"]),
                _num(r["spliced"]),
                _num(r["mean_ablation"]),
                _num(r.get("recovered")),
                f"{_num(r['nll']['plain'])} / {_num(r['nll']['spliced'])} / "
                f"{_num(r['nll']['mean_ablation'])}",
                _num(r.get("nll_recovered")),
            ]
        )
    return _table(
        ["task", "test trials", "plain decoder", "SAE spliced", "mean-ablated",
         "accuracy recovered", "NLL plain / spliced / ablated", "NLL recovered"],
        rows,
    )  # fmt: skip


def _labels_table(summary: dict) -> str:
    rows = []
    for v, d in summary["label_details"].items():
        rows.append(
            [
                _e(v),
                _num(d["n_labelled"]),
                _num(d.get("n_reproduced")),
                _num(d["n_significant"]),
                _num(d["random_init_n_significant"]),
                _num(d["shuffled_n_significant"]),
                _num(d["threshold_random_init"], ".4f"),
                _num(d["threshold_shuffled"], ".4f"),
                _e(d["permutation_level"]),
                _num(d["min_attainable_p"], ".3g"),
            ]
        )
    return _table(
        ["variable", "labelled (beat both controls)", "reproduced (seed 2)",
         "significant (q<alpha)", "random-init: significant", "shuffled: significant",
         "threshold random-init", "threshold shuffled", "permutations", "min attainable p"],
        rows,
    )  # fmt: skip


def _attribution_table(summary: dict) -> str:
    at = summary.get("attribution") or {}
    rows = []
    for t, meths in at.get("methods", {}).items():
        for meth, a in meths.items():
            rows.append(
                [_e(t), meth]
                + [_num(a[k]) for k in ("pearson", "spearman", "top1", "sign", "rel_error")]
            )  # fmt: skip
    tab = _table(["task", "method", "pearson", "spearman", "top-1", "sign", "rel. error"], rows, 2)
    add = at.get("additivity", {})
    rows2 = [
        [
            _e(t),
            _num(a["max_abs_error_vs_plain_decoder"], ".2e"),
            _num(a["logit_scale"], ".3f"),
            _num(a["unit_share"], ".3f"),
        ]
        for t, a in add.items()
    ]
    tab2 = _table(
        ["task", "max |units + error + biases - logit|", "max |logit|",
         "mean |sum top-M| / |logit|"],
        rows2,
    )  # fmt: skip
    return tab + tab2


def _figure_units(res, n: int | None) -> list[int]:
    """Labelled units to draw: the most selective of each variable, taken in turn."""
    lab = res.labelling
    queues = []
    for name, m in lab.labelled.items():
        units = np.flatnonzero(m)
        s = lab.real.variables[name].primary_stat[units]
        queues.append([int(u) for u in units[np.argsort(-s)]])
    out, seen = [], set()
    while any(queues) and (n is None or len(out) < n):
        for q in queues:
            while q and q[0] in seen:
                q.pop(0)
            if q and (n is None or len(out) < n):
                u = q.pop(0)
                seen.add(u)
                out.append(u)
    return out


def _unit_section(res, figs: _Figures, u: int, variables, figure: bool = True) -> str:
    lab = res.labelling
    labels = lab.unit_labels(u)
    ltxt = "; ".join(
        d["text"] + (" [reproduced across seeds]" if d.get("reproduced_across_seeds") else "")
        for d in labels
    )
    stats_rows = []
    for name, vr in lab.real.variables.items():
        extra = ""
        if vr.kind == "direction":
            extra = (
                f"pref {vr.stats['pref_dir'][u]:g}°, OSI {vr.stats['osi'][u]:.2f}, "
                f"DSI {vr.stats['dsi'][u]:.2f}, dir_vs {vr.stats['dir_vs'][u]:.2f}"
            )
        else:
            cls = vr.stats["classes"][int(vr.stats["best_class"][u])]
            extra = f"best {cls}, d' {vr.stats['dprime'][u]:.2f}, MI {vr.stats['mi'][u]:.3f} bits"
        stats_rows.append(
            [
                _e(name),
                _e(vr.primary),
                _num(vr.primary_stat[u], ".4f"),
                _num(vr.p[vr.primary][u], ".3g"),
                _num(vr.q[u], ".3g"),
                "yes" if lab.labelled[name][u] else "no",
                _e(extra),
            ]
        )
    match = ""
    if lab.seed_match is not None:
        m, c = lab.seed_match
        match = f"seed-2 match: unit {int(m[u])} (decoder cosine {c[u]:.2f}); "
    fr = res.saes[0].metrics_test.firing_rate[u]
    img = (
        figs.img(fig_unit(res, u, variables), f"unit_{u:05d}", f"unit {u}", dpi=70)
        if figure
        else ""
    )
    return (
        f'<div class="unit" id="unit-{u}"><h3>Unit {u}: {_e(ltxt)}</h3>'
        f'<p class="small">{match}firing rate on test tokens {fr:.4f}</p>'
        + _table(["variable", "statistic", "value", "p", "q", "label", "details"], stats_rows)
        + img
        + "<p>Top-activating trials</p>"
        + _top_trials_table(res, u)
        + "</div>"
    )


def write_report(
    res, out: str | Path, *, n_top: int = 8, max_unit_figures: int | None = 150
) -> Path:
    """Write ``report.html`` (figures embedded; copies in ``figures/``). Returns its path.

    Every labelled unit gets a dashboard; ``max_unit_figures`` caps how many of them carry a
    figure (matplotlib costs ~0.5 s per figure on a busy CPU; None = all)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out)
    s = res.summary
    variables = [
        v for v in (_variable(res, n) for n in res.labelling.real.variables) if v is not None
    ]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cortexlens interpret</title>"
        f"<style>{CSS}</style></head><body>",
        "<h1>cortexlens: SAE interpretation report</h1>",
        f"<p class='small'>checkpoint <code>{_e(res.checkpoint)}</code>; sessions: "
        f"{_e(', '.join(s['data']['sessions']))}; trials train/val/test "
        f"{s['data']['trials']['train']}/{s['data']['trials']['val']}/"
        f"{s['data']['trials']['test']}; labels computed on {s['data']['n_label_trials']} "
        f"trials ({_e(s['data']['label_trials'])}); runtime {s['runtime_s'].get('total_s')} s. "
        "Figures are embedded (base64 PNG); copies in <code>figures/</code>. Machine-readable: "
        "<code>summary.json</code>, <code>units.json</code>.</p>",
    ]
    if s["data"]["skipped_sessions"]:
        parts.append(
            f"<p class='note'>Skipped (not in the checkpoint's vocabulary): "
            f"{_e(', '.join(s['data']['skipped_sessions']))}</p>"
        )
    parts.append("<h2>What is and is not supported</h2><ul>")
    parts += [f"<li>{_e(n)}</li>" for n in s.get("notes", [])]
    parts.append("</ul>")

    parts.append("<h2>SAE</h2>")
    c = res.saes[0].sae.cfg
    parts.append(
        f"<p>{_e(c.architecture)} SAE, {c.n_units} units on the {c.d_in}-dim latent stream after "
        f"the processor, k={c.k}; trained on training-trial latents "
        f"({s['data']['windows']['train']} windows), {s['sae']['steps']} steps. Headline "
        f"(seed {res.saes[0].seed}, test tokens): L0 {s['sae']['l0']:.2f}, FVU "
        f"{s['sae']['fvu']:.4f}, dead {s['sae']['dead_fraction']:.3f}.</p>"
    )
    parts.append(_metrics_table(res))
    parts.append(figs.img(fig_sae_training(res), "sae_training"))

    parts.append("<h2>Decoding with the SAE spliced in</h2>")
    parts.append(
        "<p>Trial-level accuracy on the checkpoint's test trials (mean per-window log-probability "
        "over a trial's decoded windows, as <code>predict_trials</code>). Spliced: latents "
        "replaced by the SAE reconstruction (no error term). Mean-ablated: every latent replaced "
        "by its per-position mean over the training latents. Recovered = (spliced - ablated) / "
        "(plain - ablated).</p>"
    )
    parts.append(_accuracy_table(s))
    parts.append(figs.img(fig_accuracy(s), "accuracy"))
    rows = []
    for sid, conds in s.get("accuracy_by_session", {}).items():
        for t in conds.get("plain", {}):
            rows.append([_e(sid), _e(t)] + [_num(conds[c].get(t)) for c in conds])
    if rows:
        conds = list(next(iter(s["accuracy_by_session"].values())))
        parts.append("<details><summary>per session</summary>")
        parts.append(_table(["session", "task", *conds], rows, left=2))
        parts.append("</details>")

    parts.append("<h2>Unit labels: real model vs controls</h2>")
    parts.append(
        f"<p>Primary statistics: eta² (direction), AUROC (categorical). One-sided permutation "
        f"p-values ({res.config.n_perm} permutations; session-level for per-session labels), "
        f"Benjamini-Hochberg over units x variables at alpha={res.config.alpha:g}. A unit is "
        f"labelled only when it is significant AND its statistic exceeds the "
        f"{res.config.control_quantile:g} quantile of both controls: the SAE of a randomly "
        "initialised decoder of the same architecture, and the real units with shuffled labels. "
        "The controls' own counts of significant units are shown beside the real model.</p>"
    )
    parts.append(_labels_table(s))
    parts.append(figs.img(fig_selectivity(res), "selectivity"))

    gt = s.get("ground_truth")
    if gt and (gt.get("direction") or gt.get("genetic")):
        parts.append("<h3>Against the simulator's planted ground truth</h3>")
        d = gt.get("direction")
        if d:
            rows = [
                [f"{g:g}°", d["planted_cells"][i], d["labelled_units"][i],
                 d["significant_units"][i], d["random_init_significant_units"][i]]
                for i, g in enumerate(d["directions"])
            ]  # fmt: skip
            parts.append(
                f"<p>Planted directions (with >= 5% of responsive cells): "
                f"{d['planted_directions']}; covered by labelled units {d['covered_labelled']}, "
                f"by significant units {d['covered_significant']}, by the random-init "
                f"decoder's significant units {d['covered_random_init']}.</p>"
            )
            parts.append(
                _table(["direction", "planted responsive cells", "labelled units",
                        "significant units", "random-init significant"], rows)
            )  # fmt: skip
        g = gt.get("genetic")
        if g:
            rows = [
                [_e(ln), g["sessions_per_line"][ln], g["labelled_units"][ln],
                 g["significant_units"][ln], g["random_init_significant_units"][ln]]
                for ln in g["cre_lines"]
            ]  # fmt: skip
            parts.append(
                _table(["Cre line", "sessions", "labelled units (best class)",
                        "significant units", "random-init significant"], rows)
            )  # fmt: skip
    parts.append("<h2>Most selective units per variable</h2>")
    for v in variables:
        units = _top_units(res, v.name, n_top)
        labelled = bool(res.labelling.labelled[v.name].sum())
        parts.append(
            f"<h3>{_e(v.name)}</h3><p class='small'>"
            + (
                "labelled units, most selective first"
                if labelled
                else "no labelled unit: the most selective units, for inspection only"
            )  # fmt: skip
            + "; mean ± s.e.m. of per-trial activation.</p>"
        )
        parts.append(figs.img(fig_top_tuning(res, v.name, units), f"top_{v.name}"))
        for u in units[:3]:
            link = f"<a href='#unit-{u}'>unit {u}</a>" if labelled else f"unit {u}"
            parts.append(f"<p class='small'>Top-activating trials of {link}</p>")
            parts.append(_top_trials_table(res, u))

    parts.append("<h2>Ablation: which variable's decoding each group of units supports</h2>")
    parts.append(
        "<p>On the test trials, the SAE is spliced in with its error term (nothing ablated = the "
        "plain decoder); the units labelled for one variable are zeroed and every task's accuracy "
        f"is measured, against {res.config.ablation_draws} draws of as many random units (units "
        "that fire on test tokens and carry no label of that variable). Cells: drop [paired "
        "bootstrap 95% CI over trials]; random drop mean [2.5, 97.5 percentiles]; one-sided "
        "p = fraction of random draws dropping at least as much.</p>"
    )
    parts.append(figs.img(fig_ablation(s), "ablation"))
    if s.get("ablation_top"):
        parts.append(
            f"<p>The same with only the {res.config.ablation_top} most selective labelled units "
            "of each variable (and as many random units):</p>"
        )
        parts.append(figs.img(fig_ablation(s, "ablation_top"), "ablation_top"))
    parts.append(
        "<pre class='small'>"
        + _e(json.dumps({"baseline": s.get("ablation_baseline"), "matrix": s.get("ablation"),
                         "matrix_top": s.get("ablation_top")}, indent=1))
        + "</pre>"
    )  # fmt: skip

    parts.append("<h2>Per-prediction attribution: cheap methods vs exact ablation</h2>")
    at = s.get("attribution") or {}
    parts.append(
        f"<p>{at.get('n_examples')} test windows, the {at.get('m')} most active units each, "
        f"attribution to the predicted class's logit. Exact: logit change when the unit is "
        f"ablated (one batched pass). Cheap: activation x gradient, integrated gradients "
        f"({at.get('ig_steps')} steps). Additivity: attributions + rest + SAE error + biases = the "
        "logit.</p>"
    )
    parts.append(_attribution_table(s))
    parts.append(figs.img(fig_attribution(res), "attribution"))

    labelled_units = sorted(
        {int(u) for m in res.labelling.labelled.values() for u in np.flatnonzero(m)}
    )
    with_fig = set(_figure_units(res, max_unit_figures))
    parts.append(f"<h2>Unit dashboards ({len(labelled_units)} labelled units)</h2>")
    if len(with_fig) < len(labelled_units):
        parts.append(
            f"<p class='note'>Every labelled unit has a dashboard; figures are drawn for the "
            f"{len(with_fig)} most selective (per variable, in turn); the others show their "
            "statistics and top-activating trials.</p>"
        )
    if labelled_units:
        parts.append(
            "<p>" + " ".join(f"<a href='#unit-{u}'>{u}</a>" for u in labelled_units) + "</p>"
        )
    else:
        parts.append("<p>No unit was labelled.</p>")
    for u in labelled_units:
        parts.append(_unit_section(res, figs, u, variables, figure=u in with_fig))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
