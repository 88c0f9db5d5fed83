"""``python -m loadtest``: one load point, or a sweep that regenerates the benchmark report.

    # one point: N sessions of C cells at R Hz for S seconds, four ways in one run
    python -m loadtest --sessions 16 --cells 512 --rate 30 --seconds 30 --json out.json
    python -m loadtest --sessions 4 --cells 256 --stride 2 --no-batching --markdown out.md

    # the sweep behind loadtest/report/REPORT.md (bounded by --max-seconds)
    python -m loadtest sweep --out loadtest/report/
    python -m loadtest sweep --out /tmp/r --quick          # a small grid, a few minutes

    # a soak: N sessions streaming for M minutes; per-minute latency, RSS of Ray, drift
    python -m loadtest soak --minutes 10 --sessions 4 --cells 128 --rate 30 --json soak.json

A point's JSON holds, for each of ``service``, ``bare_grpc``, ``onnx_floor`` and
``torch_eager``: ``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms``, ``frames_sent``,
``frames_answered``, ``frames_dropped`` (and more: late frames, the server's timings, send lag),
plus ``onnx_floor_batch``, ``ratios`` and ``target`` (service p99 under one frame with zero
dropped frames). See `loadtest.harness` for what each path measures.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from loadtest import harness as h
from loadtest import report as rp


class _Deadline(BaseException):  # not caught by `except Exception`
    pass


def _alarm(seconds: float) -> None:
    """A hard bound on the whole command: SIGALRM raises, so `finally` blocks stop servers."""

    def handler(signum, frame):
        raise _Deadline(f"loadtest: hard time limit of {seconds:.0f} s reached")

    def term(signum, frame):
        raise _Deadline("loadtest: terminated")

    signal.signal(signal.SIGALRM, handler)
    signal.signal(signal.SIGTERM, term)  # `timeout`/kill: still stop the servers
    signal.alarm(max(1, int(seconds)))


def _log(msg: str) -> None:
    print(msg, flush=True)


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


# -- one point -----------------------------------------------------------------------------------
def point_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--rate", type=float, default=30.0, help="frames per second per session")
    ap.add_argument("--seconds", type=float, default=30.0, help="streaming time per path")
    ap.add_argument("--stride", type=int, default=1, help="decode stride (SessionOpen)")
    ap.add_argument("--max-batch", type=int, default=16, help="service max_batch_size")
    ap.add_argument("--no-batching", action="store_true", help="max batch 1")
    ap.add_argument("--aligned", action="store_true", help="all sessions send at once")
    ap.add_argument("--no-sync", action="store_true", help="service ingest.record_sync false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor-seconds", type=float, default=4.0)
    ap.add_argument("--only", default=",".join(h.SECTIONS), help="comma list of paths to measure")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--markdown", type=Path, help="write a Markdown summary here")
    ap.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    ap.add_argument("--cache", type=Path, default=h.CACHE, help="bundle cache")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="hard bound, whole command")
    return ap


def run_point(argv: list[str]) -> dict:
    a = point_parser().parse_args(argv)
    _alarm(a.max_seconds)
    t_end = time.monotonic() + a.max_seconds - 30
    cfg = h.PointConfig(
        sessions=a.sessions,
        cells=a.cells,
        rate=a.rate,
        seconds=a.seconds,
        stride=a.stride,
        max_batch=1 if a.no_batching else a.max_batch,
        seed=a.seed,
        aligned=a.aligned,
        record_sync=not a.no_sync,
        floor_seconds=a.floor_seconds,
    )
    only = tuple(s for s in a.only.split(",") if s)
    _log(f"loadtest point {cfg.label()} for {cfg.seconds:g} s")
    try:
        (r,) = h.run_group([cfg], cache=a.cache, log=_log, deadline=t_end, only=only)
    finally:
        signal.alarm(0)
    plots = []
    if a.plots:
        a.plots.mkdir(parents=True, exist_ok=True)
        plots.append(str(rp.plot_point(r, a.plots)))
    out = h.strip_raw(r)
    if a.json:
        _dump(out, a.json)
        _log(f"wrote {a.json}")
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(rp.point_markdown(out, plots))
        _log(f"wrote {a.markdown}")
    t = out["target"]
    _log(
        f"target (p99 < {t['period_ms']:.1f} ms, 0 dropped): {'met' if t['met'] else 'missed'}; "
        + ", ".join(
            f"{k} p50 {v['p50']:.2f}x p99 {v['p99']:.2f}x"
            for k, v in out["ratios"].items()
            if v.get("p50") and v.get("p99")
        )
    )
    return out


# -- sweep ---------------------------------------------------------------------------------------
def sweep_grid(a) -> list[tuple[str, h.PointConfig]]:
    """(part, point) of the sweep: sessions at 512 cells, cells at ``--cells-sessions``
    sessions, batching off and decode strides at the headline, fsync off at the headline."""
    base = h.PointConfig(
        sessions=16, cells=512, rate=a.rate, seconds=a.seconds, floor_seconds=a.floor_seconds
    )
    head = replace(base, seconds=a.headline_seconds)
    pts: list[tuple[str, h.PointConfig]] = [("headline", head)]
    for n in a.sessions_list:
        if n != head.sessions:
            pts.append(("sessions", replace(base, sessions=n)))
    for c in a.cells_list:
        pts.append(("cells", replace(base, sessions=a.cells_sessions, cells=c)))
    for k in a.strides:
        if k != 1:
            pts.append(("stride", replace(base, stride=k)))
    if not a.no_batching_point:
        pts.append(("batching", replace(base, max_batch=1)))
    if not a.no_sync_point:
        pts.append(("fsync", replace(base, record_sync=False)))
    return pts


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def sweep_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest sweep", description="the benchmark sweep and its report"
    )
    ap.add_argument("--out", type=Path, default=Path("loadtest/report"))
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="per sweep point and path")
    ap.add_argument("--headline-seconds", type=float, default=30.0)
    ap.add_argument("--sessions-list", type=_ints, default=_ints("1,2,4,8,16,32,64"))
    ap.add_argument("--cells-list", type=_ints, default=_ints("64,256,1024,2048"))
    ap.add_argument("--cells-sessions", type=int, default=4, help="sessions of the cells sweep")
    ap.add_argument("--strides", type=_ints, default=_ints("1,2,4"))
    ap.add_argument("--no-batching-point", action="store_true", help="skip max batch 1")
    ap.add_argument("--no-sync-point", action="store_true", help="skip record_sync off")
    ap.add_argument("--floor-seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="a small grid (a few minutes)")
    ap.add_argument("--cache", type=Path, default=h.CACHE)
    ap.add_argument("--max-seconds", type=float, default=2700.0, help="hard bound, whole sweep")
    return ap


def run_sweep(argv: list[str]) -> list[dict]:
    a = sweep_parser().parse_args(argv)
    if a.quick:
        a.seconds, a.headline_seconds = min(a.seconds, 5.0), min(a.headline_seconds, 10.0)
        a.sessions_list, a.cells_list, a.strides = [1, 4], [64], [1, 2]
        a.cells_sessions, a.floor_seconds = 4, 1.0
        a.no_batching_point = a.no_sync_point = True
    _alarm(a.max_seconds)
    t0 = time.monotonic()
    deadline = t0 + a.max_seconds - 60
    grid = sweep_grid(a)
    _log(f"loadtest sweep: {len(grid)} points, <= {a.max_seconds:.0f} s")
    parts = {id(c): part for part, c in grid}
    cfgs = [c for _, c in grid]
    groups: dict[tuple, list[h.PointConfig]] = {}
    for c in cfgs:
        groups.setdefault(h.group_key(c), []).append(c)
    results: list[dict] = []
    raw_head = None
    try:
        for key, cs in groups.items():
            if time.monotonic() > deadline - 90:
                _log(f"  skipped (time budget): {[c.label() for c in cs]}")
                continue
            _log(f"group cells={key[0]} batch={key[3]} sync={key[4]}: "
                 f"{', '.join(c.label() for c in cs)}")  # fmt: skip
            try:
                rs = h.run_group(cs, cache=a.cache, log=_log, deadline=deadline)
            except Exception as e:  # noqa: BLE001 - one failed group does not end the sweep
                _log(f"  group failed: {e}")
                continue
            for c, r in zip(cs, rs, strict=True):
                r["part"] = parts[id(c)]
                if r["part"] == "headline":
                    raw_head = r
                results.append(r)
    except _Deadline as e:
        _log(str(e))
    finally:
        signal.alarm(0)
    a.out.mkdir(parents=True, exist_ok=True)
    plots = []
    if raw_head is not None:
        plots.append(rp.plot_point(raw_head, a.out, "headline_cdf.png"))
    clean = [h.strip_raw(r) for r in results]
    _dump(
        {"argv": list(argv), "points": clean, "elapsed_s": time.monotonic() - t0},
        a.out / "sweep.json",
    )  # fmt: skip
    md = sweep_markdown(clean, a, argv, time.monotonic() - t0, plots_dir=a.out)
    (a.out / "REPORT.md").write_text(md)
    _log(f"wrote {a.out / 'REPORT.md'} and {a.out / 'sweep.json'}")
    return clean


def _command(argv: list[str], out: Path) -> str:
    """The sweep's command line with ``--out`` set to ``out``."""
    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--out":
            skip = True
        elif not x.startswith("--out="):
            rest.append(x)
    return " ".join(["python -m loadtest sweep", "--out", str(out), *rest])


def run_report(argv: list[str]) -> None:
    """Re-render REPORT.md and the scaling plots from a sweep's JSON (no new measurement)."""
    import shutil

    ap = argparse.ArgumentParser(prog="python -m loadtest report")
    ap.add_argument("--from", dest="src", type=Path, required=True, help="a sweep.json")
    ap.add_argument("--out", type=Path, default=Path("loadtest/report"))
    a = ap.parse_args(argv)
    doc = json.loads(a.src.read_text())
    argv0 = list(doc["argv"])
    if argv0[:4] == ["python", "-m", "loadtest", "sweep"]:
        argv0 = argv0[4:]
    sa = sweep_parser().parse_args(argv0)
    a.out.mkdir(parents=True, exist_ok=True)
    cdf = a.src.parent / "headline_cdf.png"
    if cdf.is_file() and cdf.resolve() != (a.out / cdf.name).resolve():
        shutil.copyfile(cdf, a.out / cdf.name)
    md = sweep_markdown(doc["points"], sa, argv0, doc["elapsed_s"], plots_dir=a.out)
    (a.out / "REPORT.md").write_text(md)
    _log(f"wrote {a.out / 'REPORT.md'}")


def _sorted(pts: list[dict], part_names: tuple[str, ...], x: str, fixed: dict) -> list[dict]:
    sel = [
        r
        for r in pts
        if r.get("part") in part_names and all(r["config"][k] == v for k, v in fixed.items())
    ]
    return sorted(sel, key=lambda r: r["config"][x])


def sweep_markdown(pts: list[dict], a, argv, elapsed: float, plots_dir: Path) -> str:
    head = next((r for r in pts if r.get("part") == "headline"), None)
    fixed = {"cells": 512, "stride": 1, "max_batch": 16, "record_sync": True}
    by_sessions = _sorted(pts, ("headline", "sessions"), "sessions", fixed)
    by_cells = _sorted(pts, ("cells",), "cells", {"sessions": a.cells_sessions})
    extra = [r for r in by_sessions if r["config"]["sessions"] == a.cells_sessions]
    by_cells = sorted(by_cells + extra, key=lambda r: r["config"]["cells"])
    p_sess = rp.plot_scaling(
        by_sessions, "sessions", plots_dir, "scaling_sessions.png",
        f"512 cells, {a.rate:g} Hz: latency vs sessions",
    )  # fmt: skip
    p_cells = rp.plot_scaling(
        by_cells, "cells", plots_dir, "scaling_cells.png",
        f"{a.cells_sessions} sessions, {a.rate:g} Hz: latency vs cells",
    )  # fmt: skip
    m = pts[0]["machine"] if pts else {}
    met = [r["config"]["sessions"] for r in by_sessions if r["target"]["met"]]
    missed = [r["config"]["sessions"] for r in by_sessions if not r["target"]["met"]]
    ceiling = max((n for n in met if all(n < k for k in missed) or not missed), default=None)
    lines = [
        "# cortexlens load benchmark",
        "",
        f"Regenerate: `{_command(list(argv), plots_dir)}` "
        f"({elapsed / 60:.0f} min here). Every figure in a row was measured in the same run, "
        "the paths one after the other (never two at once). The machine is shared with other "
        "jobs (1-minute load average before/after each path: `loadavg_1m` in `sweep.json`): "
        "wall-clock figures include their work, so compare ratios and above all the CPU time "
        "per decode, which does not. Points where sessions failed to open are left out of the "
        "plots. Reading of this run: `loadtest/README.md` (Findings).",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('platform')}), ONNX Runtime "
        f"{m.get('onnxruntime')}, Ray {m.get('ray')}, Python {m.get('python')}. Model: the "
        "`quick_bundle` of a simulated recording with the point's cell count (`patch` "
        "tokenizer, top-16 ablation attributions in the graph); sessions replay another "
        "simulated recording with the same unit ids. Load generator: one `grpc.aio` event loop, "
        "one channel per session, frames sent one per message on a fixed schedule, the "
        "sessions' phases spread over one frame period.",
        "",
        "Paths: **service** = the Serve application (gRPC proxy -> Ingress -> session actor "
        "with fsync'd record -> DecoderModel `@serve.batch`); **bare_grpc** = a plain "
        "`grpc.aio` server around the same `Engine` with the same batching rule; "
        "**onnx_floor** = `Engine.run` in process, batch 1 (tokenize + ONNX Runtime + "
        "explanations); **torch_eager** = the same with the model in PyTorch eager. Streams: "
        "latency = frame sent -> its prediction received; in process: compute time per window.",
        "",
    ]
    if head:
        t = head["target"]
        lines += [
            "## Headline: 16 sessions x 512 cells x 30 Hz",
            "",
            *rp.point_table(head),
            "",
            f"Target (service p99 < {t['period_ms']:.1f} ms and zero dropped frames): "
            f"**{'met' if t['met'] else 'missed'}** (p99 {rp._f(t['p99_ms'])} ms, dropped "
            f"{t['frames_dropped']}).",
            "",
            *rp.point_ratios(head),
            "",
            *rp.point_breakdown(head),
            "",
            "![headline latency CDF](headline_cdf.png)",
            "",
        ]
    lines += [
        "## Sessions (512 cells)",
        "",
        f"Largest session count meeting the target (p99 < one frame, zero dropped): "
        f"**{ceiling if ceiling is not None else 'none'}** "
        f"(met at {met or 'none'}, missed at {missed or 'none'}).",
        "",
    ]
    ce = (head or {}).get("cpu_ceiling") or {}
    if ce:
        lines += [
            "CPU-bound ceiling from the headline's CPU time per decode (server processes + load "
            f"generator; sessions at {a.rate:g} Hz on {m.get('cpus')} idle cores, no queueing): "
            + ", ".join(
                f"{k} {v['max_sessions']:.1f} ({v['cpu_ms_per_decode']:.2f} CPU ms/decode)"
                for k, v in ce.items()
            )
            + ". The machine was shared (load average per path in `sweep.json`): wall-clock "
            "latencies include other people's work, CPU time per decode does not.",
            "",
        ]
    if p_sess:
        lines += [f"![latency vs sessions]({p_sess.name})", ""]
    lines += [*rp.sweep_table(by_sessions), ""]
    lines += [f"## Cells ({a.cells_sessions} sessions)", ""]
    if p_cells:
        lines += [f"![latency vs cells]({p_cells.name})", ""]
    lines += [*rp.sweep_table(by_cells), ""]
    others = [r for r in pts if r.get("part") in ("stride", "batching", "fsync")]
    if others:
        ref = [head] if head else []
        lines += [
            "## Batching, decode stride, record fsync (16 x 512)",
            "",
            *rp.sweep_table(ref + others),
            "",
        ]
    lines += [
        "## Where the time goes",
        "",
        "Server timings carried by every prediction: queue = waiting for the batch; model = "
        "the whole batch's ONNX Runtime call; server total = from the frame's arrival at the "
        "ingress (after the proxy) to its prediction being ready; outside server = client "
        "latency - server total (Serve's gRPC proxy both ways, the network stack, the client's "
        "event loop).",
        "",
        *rp.breakdown_table(pts),
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        return run_sweep(argv[1:])
    if argv and argv[0] == "report":
        return run_report(argv[1:])
    if argv and argv[0] == "soak":
        from loadtest import soak

        return soak.run(argv[1:], log=_log)
    return run_point(argv)


if __name__ == "__main__":
    main()
