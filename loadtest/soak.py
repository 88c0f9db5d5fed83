"""``python -m loadtest soak``: a bounded soak of the real Serve application.

    python -m loadtest soak --minutes 10 --sessions 4 --cells 128 --rate 30 \\
        --json runs/soak/soak.json --markdown runs/soak/SOAK.md

N sessions stream C-cell frames at R Hz, without pause, for the whole duration against the real
application (`service.server.start` with a cached quick bundle, free loopback ports, a temporary
home; the same load generator as a load point, `loadtest.loadgen`). Reported, per window of
``--window-s`` (default one minute) by the frames' send time: latency percentiles (frame sent ->
its prediction received), predictions, coalesced decodes; every ``--sample-s``: the resident
memory (RSS) of every Ray process this run started, by role (proxy, ingress, decoder replica,
session actors, raylet, GCS, ...). Drift = least-squares slope over time of the windows' p50 and
p99 (ms per minute) and of the RSS samples (MiB per minute, total and per role), with the
relative change first -> last window. Nothing lost: after the streams closed, every session's
durable record must hold exactly the frames it sent, and every decode due was either answered
or counted as coalesced by the server.

The JSON holds ``config``, ``machine``, ``windows``, ``rss``, ``drift``, ``sessions``,
``totals``, ``lost`` and ``ok``; the Markdown a short table and the drift figures. Bounded:
``--max-seconds`` (SIGALRM; the application is shut down in ``finally``), session opening
bounded, drain 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from loadtest import harness as h
from loadtest.loadgen import run_load_sync


class _Deadline(BaseException):
    pass


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="streaming time")
    ap.add_argument("--seconds", type=float, help="streaming time in seconds (overrides)")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--cells", type=int, default=128)
    ap.add_argument("--rate", type=float, default=30.0, help="frames per second per session")
    ap.add_argument("--window-s", type=float, default=60.0, help="latency window (s)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period (s)")
    ap.add_argument("--no-sync", action="store_true", help="service ingest.record_sync false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--markdown", type=Path, help="write a Markdown summary here")
    ap.add_argument("--cache", type=Path, default=h.CACHE, help="bundle cache")
    ap.add_argument("--max-seconds", type=float, help="hard bound (default: duration + 300 s)")
    return ap


# -- memory --------------------------------------------------------------------------------------
class RssSampler:
    """RSS of every descendant process of this one (the Ray instance it started), by role
    (`loadtest.harness._role`), every ``period_s``."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._th: threading.Thread | None = None
        self._t0 = time.monotonic()

    def sample(self) -> dict:
        import psutil

        by_role: dict[str, float] = {}
        n = 0
        for p in psutil.Process().children(recursive=True):
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            role = h._role(name)
            by_role[role] = by_role.get(role, 0.0) + rss / 2**20
            n += 1
        s = {
            "t_s": round(time.monotonic() - self._t0, 3),
            "total_mib": round(sum(by_role.values()), 2),
            "processes": n,
            "by_role_mib": {k: round(v, 2) for k, v in sorted(by_role.items())},
        }
        self.samples.append(s)
        return s

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._th = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self._th.start()

    def _loop(self) -> None:
        self.sample()
        while not self._stop.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._th is not None:
            self._th.join(10)


# -- statistics ----------------------------------------------------------------------------------
def slope_per_min(t_s, y) -> float | None:
    """Least-squares slope of ``y`` against time ``t_s`` (seconds), per minute."""
    t, v = np.asarray(t_s, float), np.asarray(y, float)
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() < 2 or np.ptp(t[ok]) == 0:
        return None
    return float(np.polyfit(t[ok], v[ok], 1)[0] * 60.0)


def windows(lr, window_s: float) -> list[dict]:
    """Per window of send time: latency percentiles and counts (frame j left at j / rate)."""
    rate = lr.rate_hz
    n_win = max(1, int(np.ceil(lr.seconds / window_s - 1e-9)))
    lat: list[list[float]] = [[] for _ in range(n_win)]
    for s in lr.sessions:
        for p in s.preds:
            k = min(n_win - 1, int((p[0] / rate) // window_s))
            lat[k].append(p[1])
    out = []
    for k in range(n_win):
        a = np.asarray(lat[k], float)
        q = np.percentile(a, [50, 90, 99]) if a.size else [None] * 3
        out.append(
            {
                "window": k,
                "start_s": k * window_s,
                "mid_s": min((k + 0.5) * window_s, lr.seconds),
                "predictions": int(a.size),
                "p50_ms": None if q[0] is None else float(q[0]),
                "p90_ms": None if q[1] is None else float(q[1]),
                "p99_ms": None if q[2] is None else float(q[2]),
                "max_ms": float(a.max()) if a.size else None,
            }
        )
    return out


def drift(wins: list[dict], rss: list[dict]) -> dict:
    full = [w for w in wins if w["predictions"]]
    t = [w["mid_s"] for w in full]

    def rel(key):
        if len(full) < 2 or not full[0][key]:
            return None
        return float(full[-1][key] / full[0][key] - 1.0)

    roles = sorted({r for s in rss for r in s["by_role_mib"]})
    ts = [s["t_s"] for s in rss]
    return {
        "p50_ms_per_min": slope_per_min(t, [w["p50_ms"] for w in full]),
        "p99_ms_per_min": slope_per_min(t, [w["p99_ms"] for w in full]),
        "p50_change_first_to_last": rel("p50_ms"),
        "p99_change_first_to_last": rel("p99_ms"),
        "rss_mib_per_min": slope_per_min(ts, [s["total_mib"] for s in rss]),
        "rss_change_mib": (rss[-1]["total_mib"] - rss[0]["total_mib"]) if len(rss) > 1 else None,
        "rss_mib_per_min_by_role": {
            r: slope_per_min(ts, [s["by_role_mib"].get(r, np.nan) for s in rss]) for r in roles
        },
    }


def check_records(records: Path, lr, specs) -> dict:
    """Every session's durable record holds exactly the frames it sent, with their values."""
    from service.ingest import FrameRecord

    per: dict[str, dict] = {}
    lost = 0
    for s, spec in zip(lr.sessions, specs, strict=True):
        try:
            got = FrameRecord.open(records / s.session_id, readonly=True).read()
        except Exception as e:  # noqa: BLE001 - reported, counted as all lost
            per[s.session_id] = {"error": f"{type(e).__name__}: {e}", "missing": s.frames_sent}
            lost += s.frames_sent
            continue
        idx = got.indices
        missing = int(s.frames_sent - np.isin(np.arange(s.frames_sent), idx).sum())
        t = spec.traces.shape[0]
        rows = (spec.start + idx) % t
        values_ok = bool(np.array_equal(got.values, spec.traces[rows]))
        per[s.session_id] = {
            "recorded": int(idx.size),
            "sent": s.frames_sent,
            "missing": missing,
            "extra": int(idx.size - (s.frames_sent - missing)),
            "values_match": values_ok,
        }
        lost += missing + (0 if values_ok else 1)
    return {"frames_lost": lost, "by_session": per}


# -- the run -------------------------------------------------------------------------------------
def run(argv: list[str], log=print) -> dict:
    a = parser().parse_args(argv)
    seconds = float(a.seconds) if a.seconds is not None else a.minutes * 60.0
    limit = a.max_seconds or seconds + 300.0

    def alarm(signum, frame):
        raise _Deadline(f"soak: hard time limit of {limit:.0f} s reached")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(limit)))
    try:
        return _run(a, seconds, log)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(a, seconds: float, log) -> dict:
    from service import server

    t_start = time.monotonic()
    b = h.bundle_for(a.cells, a.rate, a.seed, cache=a.cache, log=log)
    traces, unit_ids = h.stream_data(a.cells, a.rate, a.seed, cache=a.cache)
    specs = h.session_specs(a.sessions, traces, unit_ids, a.rate, f"soak{os.getpid()}")
    home = Path(tempfile.mkdtemp(prefix="cortexlens-soak-"))
    port = h.free_port()
    cfg = server.load_config(
        grpc_port=port,
        http_port=h.free_port(),
        args={
            "bundle": str(b.path),
            "home": str(home),
            "metrics_port": 0,
            "max_sessions": max(64, a.sessions),
            "ingest": {"record_sync": not a.no_sync},
        },
    )
    rss = RssSampler(a.sample_s)
    try:
        h.start_local_service(cfg)
        target = f"127.0.0.1:{port}"
        log(f"soak: {a.sessions} sessions x {a.cells} cells at {a.rate:g} Hz for {seconds:g} s "
            f"against {target}")  # fmt: skip
        t_load = time.monotonic()
        lr = run_load_sync(
            target,
            specs,
            rate=a.rate,
            seconds=seconds,
            open_timeout_s=max(60.0, 2.0 * a.sessions),
            on_start=lambda: rss.start(time.monotonic()),
        )
        rss.stop()
        # while streaming only: the closing sessions' actors end afterwards (a drop in RSS
        # that is not drift)
        rss.samples = [s for s in rss.samples if s["t_s"] <= seconds + 1e-6]
        log(f"  streamed in {time.monotonic() - t_load:.0f} s; checking the records")
        records = check_records(home / "sessions", lr, specs)
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
    wins = windows(lr, a.window_s)
    summ = h.summarize_load(lr, 1e3 / a.rate)
    sessions = [
        {
            "session_id": s.session_id,
            "frames_sent": s.frames_sent,
            "predictions": len({p[0] for p in s.preds}),
            "decodes_expected": s.expected,
            "coalesced": s.coalesced,
            "closed": s.closed,
            "error": s.error,
        }
        for s in lr.sessions
    ]
    unanswered = sum(
        max(0, s["decodes_expected"] - s["predictions"] - s["coalesced"]) for s in sessions
    )
    report = {
        "config": {
            "sessions": a.sessions,
            "cells": a.cells,
            "rate": a.rate,
            "seconds": seconds,
            "window_s": a.window_s,
            "sample_s": a.sample_s,
            "record_sync": not a.no_sync,
            "seed": a.seed,
            "bundle": str(b.path),
        },
        "machine": h.machine(),
        "windows": wins,
        "rss": rss.samples,
        "drift": drift(wins, rss.samples),
        "totals": {
            k: summ[k]
            for k in (
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "p999_ms",
                "max_ms",
                "frames_sent",
                "frames_answered",
                "frames_dropped",
                "decodes_expected",
                "decodes_coalesced",
                "frames_late",
                "n_errors",
                "errors",
                "sessions_closed",
            )
        },  # fmt: skip
        "sessions": sessions,
        "lost": {
            # frames sent but missing from the durable records (or with other values)
            "frames_lost": records["frames_lost"],
            # decodes due that were neither answered nor counted as coalesced by the server
            "decodes_unaccounted": unanswered,
            "records": records["by_session"],
        },
        "elapsed_s": time.monotonic() - t_start,
    }
    report["ok"] = bool(
        report["lost"]["frames_lost"] == 0
        and unanswered == 0
        and summ["n_errors"] == 0
        and summ["sessions_closed"] == a.sessions
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1, default=float) + "\n")
        log(f"wrote {a.json}")
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(markdown(report))
        log(f"wrote {a.markdown}")
    d = report["drift"]
    log(
        f"soak {'ok' if report['ok'] else 'FAILED'}: p50 {_f(summ['p50_ms'])} p99 "
        f"{_f(summ['p99_ms'])} ms; drift p50 {_f(d['p50_ms_per_min'])} p99 "
        f"{_f(d['p99_ms_per_min'])} ms/min, RSS {_f(d['rss_mib_per_min'])} MiB/min; lost "
        f"{records['frames_lost']} frames, {unanswered} decodes unaccounted"
    )
    return report


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(r: dict) -> str:
    c, d, t, lost = r["config"], r["drift"], r["totals"], r["lost"]
    m = r["machine"]
    lines = [
        "# cortexlens soak",
        "",
        f"{c['sessions']} sessions x {c['cells']} cells at {c['rate']:g} Hz for "
        f"{c['seconds'] / 60:.1f} min (record fsync {'on' if c['record_sync'] else 'off'}); "
        f"{m.get('cpus')} CPUs, Ray {m.get('ray')}, 1-min load average at the end "
        f"{m.get('load', 0):.1f}. Result: **{'ok' if r['ok'] else 'FAILED'}** "
        f"({lost['frames_lost']} frames lost from the records, "
        f"{lost['decodes_unaccounted']} decodes unaccounted, {t['n_errors']} stream errors).",
        "",
        "| window (s) | predictions | p50 ms | p90 ms | p99 ms | max ms | RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    rss = r["rss"]
    for w in r["windows"]:
        lo, hi = w["start_s"], w["start_s"] + c["window_s"]
        inside = [s["total_mib"] for s in rss if lo <= s["t_s"] < hi]
        lines.append(
            f"| {lo:g}-{min(hi, c['seconds']):g} | {w['predictions']} | {_f(w['p50_ms'])} | "
            f"{_f(w['p90_ms'])} | {_f(w['p99_ms'])} | {_f(w['max_ms'])} | "
            f"{_f(inside[-1] if inside else None, 0)} |"
        )
    lines += [
        "",
        f"Drift (least-squares slope over the run): p50 {_f(d['p50_ms_per_min'])} ms/min, "
        f"p99 {_f(d['p99_ms_per_min'])} ms/min (first -> last window: p50 "
        f"{_pct(d['p50_change_first_to_last'])}, p99 {_pct(d['p99_change_first_to_last'])}); "
        f"RSS of the Ray processes {_f(d['rss_mib_per_min'])} MiB/min "
        f"({_f(d['rss_change_mib'], 0)} MiB over the run).",
        "",
        "RSS slope by role (MiB/min): "
        + ", ".join(f"{k} {_f(v)}" for k, v in d["rss_mib_per_min_by_role"].items())
        + ".",
        "",
        f"Totals: p50 {_f(t['p50_ms'])} ms, p99 {_f(t['p99_ms'])} ms, p99.9 "
        f"{_f(t['p999_ms'])} ms; {t['frames_sent']} frames sent, {t['frames_answered']} "
        f"answered, {t['decodes_coalesced']} coalesced, {t['frames_late']} late (> one frame).",
        "",
    ]
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.0f}%"
