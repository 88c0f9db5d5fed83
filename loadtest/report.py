"""Markdown summaries and PNG plots of load points and sweeps (matplotlib, Agg, small PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loadtest.harness import SECTIONS, cpu_ms

COLORS = {
    "service": "C3",
    "bare_grpc": "C0",
    "onnx_floor": "C2",
    "onnx_floor_batch": "C8",
    "torch_eager": "C1",
}


def _f(v, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- one point -----------------------------------------------------------------------------------
def point_table(r: dict) -> list[str]:
    c = r["config"]
    lines = [
        f"**{c['label']}** for {c['seconds']:g} s, decode stride {c['stride']}, "
        f"max batch {c['max_batch']}, record fsync {'on' if c['record_sync'] else 'off'}; "
        f"one frame = {c['period_ms']:.1f} ms.",
        "",
        "| path | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | sent | answered | dropped "
        "| late |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sec in (*SECTIONS, "onnx_floor_batch"):
        s = r.get(sec)
        if not s:
            continue
        if "skipped" in s:
            lines.append(f"| {sec} | skipped: {s['skipped']} ||||||||| ")
            continue
        lines.append(
            f"| {sec} | {_f(s['p50_ms'])} | {_f(s['p90_ms'])} | {_f(s['p99_ms'])} | "
            f"{_f(s['p999_ms'])} | {_f(s['max_ms'])} | {s['frames_sent']} | "
            f"{s['frames_answered']} | {s['frames_dropped']} | {s.get('frames_late', '–')} |"
        )
    for sec in ("service", "bare_grpc"):
        s = r.get(sec) or {}
        if s.get("n_errors"):
            lines.append(
                f"\n{sec}: {s['n_errors']} of {r['config']['sessions']} sessions failed "
                f"(e.g. {s['errors'][0]})"
            )
    return lines


def point_breakdown(r: dict) -> list[str]:
    out = []
    for sec in ("service", "bare_grpc"):
        s = r.get(sec) or {}
        sm = s.get("server_ms")
        if not sm:
            continue
        lag = s["send_lag_ms"]
        out.append(
            f"- {sec}: server queue p50/p99 {_f(sm['queue_p50'])}/{_f(sm['queue_p99'])} ms, "
            f"model (whole batch) {_f(sm['model_p50'])}/{_f(sm['model_p99'])} ms, "
            f"server total {_f(sm['server_total_p50'])}/{_f(sm['server_total_p99'])} ms, "
            f"outside the server (proxy, network, client) {_f(sm['outside_server_p50'])}/"
            f"{_f(sm['outside_server_p99'])} ms; mean batch {_f(sm['batch_size_mean'])} "
            f"(max {sm['batch_size_max']}); throughput {_f(s['throughput_fps'], 1)} of "
            f"{_f(s['offered_fps'], 1)} decodes/s; coalesced {s['decodes_coalesced']}; "
            f"generator send lag p99 {_f(lag['p99'])} ms; errors {s['n_errors']}"
        )
    cl = []
    for sec in ("service", "bare_grpc", "onnx_floor", "onnx_floor_batch", "torch_eager"):
        c = (r.get(sec) or {}).get("cpu") or {}
        ms = c.get("server_ms_per_decode", c.get("ms_per_decode"))
        if ms is not None:
            cl.append(f"{sec} {ms:.2f}")
    if cl:
        out.append(
            "- CPU ms per decode (server processes; in process: the thread): " + ", ".join(cl)
        )
    sv = ((r.get("service") or {}).get("cpu") or {}).get("by_role_ms_per_decode")
    if sv:
        out.append(
            "- service CPU ms per decode by process: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sv.items())
            + f"; load generator {r['service']['cpu']['client_ms_per_decode']:.2f}"
        )
    ce = r.get("cpu_ceiling") or {}
    if ce:
        out.append(
            f"- CPU-bound ceiling on {r['machine']['cpus']} idle cores (sessions at "
            f"{r['config']['rate']:g} Hz / stride {r['config']['stride']}, load generator "
            "included): " + ", ".join(f"{k} {v['max_sessions']:.1f}" for k, v in ce.items())
        )
    f = r.get("onnx_floor", {})
    fb = r.get("onnx_floor_batch", {})
    if f.get("capacity_fps"):
        out.append(
            f"- in-process capacity (one core): batch 1 {_f(f['capacity_fps'], 0)} windows/s, "
            f"batch {fb.get('batch')} {_f(fb.get('capacity_fps'), 0)} windows/s"
        )
    sp = r.get("engine_split_ms")
    if sp:
        out.append(
            f"- `Engine.run` on a batch of {sp['batch']} (mean CPU ms): tokenize "
            f"{_f(sp['tokenize'])}, collate {_f(sp['collate'])}, ONNX Runtime {_f(sp['onnx'])}, "
            f"explanations and the rest {_f(sp['explain_and_rest'])}, total {_f(sp['total'])}"
        )
    te = r.get("torch_eager", {})
    if "parity_max_abs_logit" in te:
        out.append(f"- eager vs ONNX max |logit diff|: {te['parity_max_abs_logit']:.2e}")
    return out


def point_ratios(r: dict) -> list[str]:
    lines = [
        "| ratio | p50 | p99 | p99.9 | CPU per decode |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in r.get("ratios", {}).items():
        lines.append(
            f"| {k} | {_f(v['p50'])} | {_f(v['p99'])} | {_f(v['p999'])} | {_f(v.get('cpu'))} |"
        )
    return lines


def point_markdown(r: dict, plots: list[str] = ()) -> str:
    t = r.get("target", {})
    verdict = "**target met**" if t.get("met") else "**target missed**"
    lines = [
        f"# cortexlens load point: {r['config']['label']}",
        "",
        *point_table(r),
        "",
        f"Target (service p99 < {t.get('period_ms', 0):.1f} ms, zero dropped): {verdict} "
        f"(p99 {_f(t.get('p99_ms'))} ms, dropped {t.get('frames_dropped')}).",
        "",
        "## Ratios (same run)",
        "",
        *point_ratios(r),
        "",
        "## Where the time goes",
        "",
        *point_breakdown(r),
        "",
        f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, ONNX Runtime "
        f"{r['machine']['onnxruntime']}, Ray {r['machine']['ray']}; load generator: "
        f"{r['load_generator']}.",
    ]
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return "\n".join(lines) + "\n"


def plot_point(r: dict, out: Path, name: str = "latency_cdf.png") -> Path:
    """CDF of per-frame latency of every path of one point (log x), one frame marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    for sec in (*SECTIONS, "onnx_floor_batch"):
        a = (r.get(sec) or {}).get("_raw")
        if a is None or not len(a):
            continue
        a = np.sort(np.asarray(a))
        y = np.arange(1, a.size + 1) / a.size
        ax.plot(a, y, label=sec, color=COLORS.get(sec))
    ax.axvline(r["config"]["period_ms"], color="k", ls=":", lw=1, label="one frame")
    ax.set_xscale("log")
    ax.set_xlabel("per-frame latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title(r["config"]["label"])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(out) / name
    fig.savefig(p)
    plt.close(fig)
    return p


# -- sweeps --------------------------------------------------------------------------------------
def _curve(ax, pts: list[dict], x: str, secs, q: str = "p99_ms", ls="-") -> None:
    for sec in secs:
        xs, ys = [], []
        for r in pts:
            d = r.get(sec) or {}
            v = d.get(q)
            if v is not None and not d.get("n_errors"):  # sessions that failed to open: left out
                xs.append(r["config"][x])
                ys.append(v)
        if xs:
            ax.plot(xs, ys, ls, marker="o", ms=3, color=COLORS.get(sec), label=f"{sec} {q[:-3]}")


def plot_scaling(pts: list[dict], x: str, out: Path, name: str, title: str) -> Path | None:
    if len(pts) < 1:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    ax = axes[0]
    _curve(ax, pts, x, ("service", "bare_grpc", "onnx_floor", "torch_eager"), "p50_ms", "--")
    _curve(ax, pts, x, ("service", "bare_grpc", "onnx_floor", "torch_eager"), "p99_ms", "-")
    ax.axhline(pts[0]["config"]["period_ms"], color="k", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("per-frame latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, col in (("service/bare_grpc", "C0"), ("service/onnx_floor", "C2")):
        for q, ls in (("p50", "--"), ("p99", "-")):
            ok = [
                r
                for r in pts
                if (r["ratios"].get(key) or {}).get(q)
                and not (r.get("service") or {}).get("n_errors")
            ]
            xs = [r["config"][x] for r in ok]
            ys = [r["ratios"][key][q] for r in ok]
            if xs:
                ax.plot(xs, ys, ls, marker="o", ms=3, color=col, label=f"{key} {q}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("ratio (same run)")
    ax.set_title("service / baselines", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(out) / name
    fig.savefig(p)
    plt.close(fig)
    return p


def sweep_table(pts: list[dict]) -> list[str]:
    lines = [
        "| point | service p50 / p99 / p99.9 ms | dropped | late | sessions failed | "
        "bare gRPC p50 / p99 ms | "
        "ONNX floor p50 / p99 ms | eager p50 ms | service/bare p50, p99 | "
        "service/floor p50, p99 | CPU ms/decode service, bare, floor | mean batch | met |",
        "|---|---|---:|---:|---:|---|---|---:|---|---|---|---:|:-:|",
    ]
    for r in pts:
        s, b, f, e = (r.get(k) or {} for k in SECTIONS)
        rb = r["ratios"].get("service/bare_grpc", {})
        rf = r["ratios"].get("service/onnx_floor", {})
        sm = s.get("server_ms") or {}
        lines.append(
            f"| {r['config']['label']} | {_f(s.get('p50_ms'))} / {_f(s.get('p99_ms'))} / "
            f"{_f(s.get('p999_ms'))} | {s.get('frames_dropped', '–')} | "
            f"{s.get('frames_late', '–')} | {s.get('n_errors', '–')}/{r['config']['sessions']} | "
            f"{_f(b.get('p50_ms'))} / {_f(b.get('p99_ms'))} | "
            f"{_f(f.get('p50_ms'))} / {_f(f.get('p99_ms'))} | {_f(e.get('p50_ms'))} | "
            f"{_f(rb.get('p50'), 1)}, {_f(rb.get('p99'), 1)} | "
            f"{_f(rf.get('p50'), 1)}, {_f(rf.get('p99'), 1)} | "
            f"{_f(cpu_ms(s))}, {_f(cpu_ms(b))}, {_f(cpu_ms(f))} | "
            f"{_f(sm.get('batch_size_mean'), 1)} | {'yes' if r['target']['met'] else 'no'} |"
        )
    return lines


def breakdown_table(pts: list[dict]) -> list[str]:
    lines = [
        "| point | path | queue p50 / p99 | model (batch) p50 / p99 | server total p50 / p99 | "
        "outside server p50 / p99 | throughput / offered (decodes/s) | coalesced |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for r in pts:
        for sec in ("service", "bare_grpc"):
            s = r.get(sec) or {}
            sm = s.get("server_ms")
            if not sm:
                continue
            lines.append(
                f"| {r['config']['label']} | {sec} | {_f(sm['queue_p50'])} / "
                f"{_f(sm['queue_p99'])} | {_f(sm['model_p50'])} / {_f(sm['model_p99'])} | "
                f"{_f(sm['server_total_p50'])} / {_f(sm['server_total_p99'])} | "
                f"{_f(sm['outside_server_p50'])} / {_f(sm['outside_server_p99'])} | "
                f"{_f(s['throughput_fps'], 0)} / {_f(s['offered_fps'], 0)} | "
                f"{s['decodes_coalesced']} |"
            )
    return lines
