"""One load point, measured four ways in one run: the service, bare gRPC, ONNX floor, eager.

A point is (sessions N, cells C, rate R, seconds S, decode stride, batching on/off). For it:

- the model is a `service.home.quick_bundle` trained on a simulated C-cell recording at R Hz,
  cached under ``runs/loadtest/bundles/`` by (cells, rate, seed) so repeated points reuse it;
- the sessions replay another simulated recording with the same unit ids (seed + 1), each from
  its own offset, under fresh session ids (the model lends them the embedding of its training
  session, which shares every unit id);
- ``onnx_floor``: `Engine.run` in process on the same windows, batch 1 (the floor per frame on
  this hardware) and ``onnx_floor_batch``: batch N (one window per session per frame; every frame
  of the batch waits for the whole batch);
- ``torch_eager``: the same windows through the bundle's decoder + SAE in PyTorch eager
  (`models.export.ExplainedDecoder`), with the same tokenization and post-processing as the
  engine (only the ONNX Runtime call is replaced);
- ``bare_grpc``: the load generator against `loadtest.bare_server` (grpc.aio + the same Engine,
  no Ray) in a subprocess;
- ``service``: the load generator against the real Serve application (`service.server.start`
  with the bundle, free loopback ports, a temporary home).

The paths run one after the other, never two at once (the machine may still be shared). Per frame,
latency is send -> prediction received (streams) or compute time per window (in process); a
frame is dropped when its decode was due (stride) and no prediction came, late when its
prediction came after one frame period.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.loadgen import LoadResult, SessionSpec, run_load_sync

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "loadtest" / "bundles"
SECTIONS = ("service", "bare_grpc", "onnx_floor", "torch_eager")
REQUIRED_KEYS = ("p50_ms", "p99_ms", "p999_ms", "frames_sent", "frames_answered", "frames_dropped")

Log = Callable[[str], None]


@dataclass(frozen=True)
class PointConfig:
    sessions: int = 16
    cells: int = 512
    rate: float = 30.0
    seconds: float = 30.0
    stride: int = 1
    max_batch: int = 16  # the service's max_batch_size (1 = batching off); the bare server's too
    seed: int = 0
    aligned: bool = False  # all sessions send at the same instant (default: spread over a frame)
    record_sync: bool = True  # the service's ingest.record_sync (fdatasync per block)
    floor_seconds: float = 4.0  # time budget of each in-process baseline
    warmup_seconds: float = 1.0  # one session streamed before the measured run (not counted)

    @property
    def period_ms(self) -> float:
        return 1e3 / self.rate

    def label(self) -> str:
        s = f"{self.sessions}x{self.cells}@{self.rate:g}Hz"
        if self.stride != 1:
            s += f" stride{self.stride}"
        if self.max_batch == 1:
            s += " nobatch"
        if not self.record_sync:
            s += " nosync"
        return s


# -- model and data ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(cells: int, rate: float, seed: int) -> str:
    return f"c{cells}-r{rate:g}-s{seed}"


def bundle_for(cells: int, rate: float, seed: int = 0, *, cache: Path = CACHE, log: Log = print):
    """The cached quick bundle for (cells, rate, seed), built on first use (~40 s for 512 cells)."""
    from models.bundle import Bundle
    from service.home import quick_bundle, simulated_recording

    d = Path(cache) / _key(cells, rate, seed)
    if (d / "manifest.json").is_file():
        try:
            return Bundle.open(d)
        except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt
            log(f"  cached bundle {d} refused ({e}); rebuilding")
            shutil.rmtree(d, ignore_errors=True)
    d.parent.mkdir(parents=True, exist_ok=True)
    log(f"  building quick bundle {d.name} (simulated {cells} cells at {rate:g} Hz)")
    t0 = time.perf_counter()
    rec = simulated_recording(f"lt{cells}", n_cells=cells, frame_rate=rate, minutes=2.0, seed=seed)
    tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quick_bundle([rec], tmp, seed=seed, name=f"loadtest-c{cells}")
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    log(f"  bundle built in {time.perf_counter() - t0:.0f} s")
    return Bundle.open(d)


def stream_data(
    cells: int, rate: float, seed: int = 0, *, cache: Path = CACHE
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Traces [T, C] (float32, 1 simulated minute) replayed by the sessions, and their unit ids
    (the ids the bundle was trained on; other activity: seed + 1). Cached beside the bundles."""
    from service.home import simulated_recording

    f = Path(cache) / f"{_key(cells, rate, seed)}.stream.npz"
    if f.is_file():
        z = np.load(f, allow_pickle=False)
        return z["traces"], tuple(str(u) for u in z["unit_ids"])
    rec = simulated_recording(
        f"lt{cells}", n_cells=cells, frame_rate=rate, minutes=1.0, seed=seed + 1
    )
    tr = np.ascontiguousarray(rec.traces, dtype=np.float32)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, traces=tr, unit_ids=np.array(rec.unit_ids))
    os.replace(tmp, f)
    return tr, tuple(rec.unit_ids)


def session_specs(
    n: int, traces: np.ndarray, unit_ids: tuple[str, ...], rate: float, prefix: str
) -> list[SessionSpec]:
    t = traces.shape[0]
    ts = np.arange(t, dtype=np.float64) / rate
    return [
        SessionSpec(f"{prefix}-{k:03d}", unit_ids, traces, ts, start=(k * 97) % t) for k in range(n)
    ]


def windows(eng, specs: list[SessionSpec], rate: float, frames: range):
    """The windows the stream would decode: per frame index, one `WindowItem` per session."""
    from service.engine import WindowItem

    w = eng.window_frames(rate)
    plans = [eng.plan(s.session_id, s.unit_ids) for s in specs]
    out = []
    for i in frames:
        row = []
        for s, p in zip(specs, plans, strict=True):
            js = np.arange(max(0, i - w + 1), i + 1)
            v = s.traces[(s.start + js) % s.traces.shape[0]]
            t = js / rate
            row.append(WindowItem(p, v, t, float(t[-1])))
        out.append(row)
    return out


# -- in-process baselines ------------------------------------------------------------------------
class TorchSession:
    """Stands in for the ONNX Runtime session of an `Engine`: the bundle's decoder + SAE in
    PyTorch eager (`ExplainedDecoder`), same inputs, same outputs by name."""

    def __init__(self, bundle, output_names: list[str]):
        import torch
        from safetensors.torch import load_file

        from models.decoder.config import CheckpointConfig
        from models.decoder.model import Decoder
        from models.export import INPUT_NAMES, ExplainedDecoder
        from models.sae import SAEConfig
        from models.sae.registry import build_sae

        cfg = bundle.read_json("config.json")
        ck = CheckpointConfig.model_validate(cfg["checkpoint"])
        dec = Decoder(ck.decoder)
        dec.load_state_dict(load_file(str(Path(bundle.path) / "decoder.safetensors")))
        sae = build_sae(SAEConfig.model_validate(cfg["sae"]))
        sae.load_weights(Path(bundle.path) / "sae.safetensors")
        top_m = int(cfg["export"]["top_m"])  # the trained modules as they are (not folded)
        self.model = ExplainedDecoder(dec.eval(), sae.eval(), top_m, folded=False).eval()
        self.output_names = list(output_names)
        self.input_names = INPUT_NAMES
        self.torch = torch

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(feeds[k]) for k in self.input_names))
        d = dict(zip(self.model.output_names, out, strict=True))
        return [d[n].numpy() for n in self.output_names]


def torch_engine(eng):
    """A shallow copy of ``eng`` whose model runs in PyTorch eager (1 intra-op thread, like ORT)."""
    import copy

    import torch

    torch.set_num_threads(1)
    te = copy.copy(eng)
    te.session = TorchSession(eng.bundle, eng.output_names)
    return te


def time_windows(eng, rows, *, batch: int, budget_s: float, warmup: int = 3) -> dict:
    """Run windows through ``eng.run`` for up to ``budget_s``: batch 1 (round robin over the
    sessions) or batch N (one row = every session's window at one frame). Per frame latency =
    the call's time (every window of a batch waits for the whole batch)."""
    if batch == 1:
        calls = [[it] for row in rows for it in row]
    else:
        calls = [row[:batch] for row in rows]
    load0 = os.getloadavg()[0]
    for c in calls[:warmup]:
        eng.run(c)
    lat: list[float] = []
    n_frames, n_calls = 0, 0
    t_end = time.perf_counter() + budget_s
    t0 = time.perf_counter()
    model_ms = []
    cpu: list[float] = []
    for c in calls[warmup:] or calls:
        s = time.perf_counter()
        sc = time.thread_time()
        d = eng.run(c)
        e = (time.perf_counter() - s) * 1e3
        cpu.append((time.thread_time() - sc) * 1e3 / len(c))
        lat.extend([e] * len(c))
        model_ms.append(d[0].model_ms)
        n_frames += len(c)
        n_calls += 1
        if time.perf_counter() > t_end:
            break
    busy = time.perf_counter() - t0
    a = np.asarray(lat)
    return {
        **percentiles(a),
        "frames_sent": n_frames,
        "frames_answered": n_frames,
        "frames_dropped": 0,
        "batch": batch,
        "calls": n_calls,
        "model_ms_p50": float(np.median(model_ms)) if model_ms else None,
        "capacity_fps": n_frames / busy if busy > 0 else None,
        # CPU time of the calling thread per window (ORT runs on it: 1 intra-op thread)
        "cpu": {
            "ms_per_decode": float(np.mean(cpu)) if cpu else None,
            "ms_per_decode_p50": float(np.median(cpu)) if cpu else None,
        },
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "_raw": a,
    }


def engine_split(eng, rows, *, budget_s: float = 2.0) -> dict:
    """Where `Engine.run`'s CPU time goes on batches (one row = every session's window at a
    frame): tokenize, collate, the ONNX Runtime call, and the rest (explanations: top-M ranking,
    labels, result objects); mean CPU ms per batch (thread CPU time; 1 ORT thread)."""
    from models.decoder.tokenizers import collate

    parts: dict[str, list[float]] = {"tokenize": [], "collate": [], "onnx": [], "total": []}
    clock = time.thread_time  # CPU time: wall time on a shared box mixes in others' load
    t_end = time.perf_counter() + budget_s
    for row in rows:
        t0 = clock()
        samples = [eng.tokens(it) for it in row]
        t1 = clock()
        batch = collate(samples, [it.plan.session_index for it in row])
        feeds = {k: batch[k] for k in eng.input_names}
        t2 = clock()
        eng.session.run(None, feeds)
        t3 = clock()
        eng.run(row)
        t4 = clock()
        parts["tokenize"].append(t1 - t0)
        parts["collate"].append(t2 - t1)
        parts["onnx"].append(t3 - t2)
        parts["total"].append(t4 - t3)
        if time.perf_counter() > t_end:
            break
    med = {k: float(np.mean(v)) * 1e3 for k, v in parts.items()}
    med["explain_and_rest"] = max(
        0.0, med["total"] - med["tokenize"] - med["collate"] - med["onnx"]
    )
    med["batch"] = len(rows[0])
    med["batches"] = len(parts["total"])
    return med


def parity(eng, teng, row) -> float:
    """Max |logit difference| between ONNX Runtime and eager on one window (sanity)."""
    a, b = eng.run(row[:1])[0], teng.run(row[:1])[0]
    return max(
        float(np.max(np.abs(x.logits - y.logits))) for x, y in zip(a.tasks, b.tasks, strict=True)
    )


# -- CPU accounting ------------------------------------------------------------------------------
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _procs() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds user + system) of every process (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        f2 = raw.rsplit(")", 1)[-1].split()
        try:
            out[int(d)] = (int(f2[1]), (int(f2[11]) + int(f2[12])) / _CLK)
        except (IndexError, ValueError):
            continue
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


ROLES = (
    ("ProxyActor", "serve_grpc_proxy"),
    ("Ingress", "ingress"),
    ("DecoderModel", "decoder_model"),
    ("SessionActor", "session_actors"),
    ("ServeController", "serve_controller"),
    ("raylet", "raylet"),
    ("gcs_server", "gcs"),
    ("loadtest.bare_server", "bare_server"),
)


def _role(name: str) -> str:
    for key, role in ROLES:
        if key in name:
            return role
    first = name.split(" ")[0] if name else "?"
    if first.startswith("ray::"):
        return first[5:]  # e.g. IDLE (pooled workers)
    for tok in name.split(" "):  # python -m x / python path/to/x.py: the module or script
        if tok.endswith(".py"):
            return Path(tok).stem
    return Path(first).name


class CpuSampler:
    """CPU time of this process's descendants (the servers it started) over a run, by role,
    sampled every ``period_s`` so processes that end during the run (session actors) count up to
    their last sample. Wall-clock latency on a shared box mixes in other people's load; CPU time
    per decode is what the work itself costs."""

    def __init__(self, period_s: float = 0.25):
        self.period_s = period_s
        self.me = os.getpid()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._th: threading.Thread | None = None

    def _sample(self) -> None:
        t = _procs()
        kids: dict[int, list[int]] = {}
        for pid, (pp, _) in t.items():
            kids.setdefault(pp, []).append(pid)
        todo, mine = list(kids.get(self.me, [])), []
        while todo:
            p = todo.pop()
            mine.append(p)
            todo.extend(kids.get(p, []))
        for p in mine:
            cpu = t[p][1]
            if p not in self.first:
                # born during the run: from zero (unless this is the first sample)
                self.first[p] = cpu if self._th is None else 0.0
            self.last[p] = cpu
            n = _name(p)  # Ray renames a pooled worker when it becomes an actor
            if n and "default_worker" not in n or p not in self.names:
                self.names[p] = n

    def mark(self) -> None:
        """Count from now on (e.g. once every session is open: actor start-up excluded)."""
        self._sample()
        self.first = dict(self.last)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._th = threading.Thread(target=self._loop, daemon=True)
        self._th.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._th is not None:
            self._th.join(5)
        self._sample()

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p, c in self.last.items():
            r = _role(self.names.get(p, ""))
            out[r] = out.get(r, 0.0) + max(0.0, c - self.first.get(p, 0.0))
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- statistics ----------------------------------------------------------------------------------
def strip_raw(r: dict) -> dict:
    """A point's result without the raw latency arrays (what goes into JSON)."""
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "_raw"} if isinstance(v, dict) else v)
        for k, v in r.items()
    }


def percentiles(a: np.ndarray) -> dict[str, float | None]:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return {k: None for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")}
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {
        "p50_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "p999_ms": float(q[3]),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
    }


def _p(a: np.ndarray, q: float) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if a.size else None


def summarize_load(lr: LoadResult, period_ms: float) -> dict:
    """Per-frame figures of a streamed run (see the module docstring)."""
    preds = [p for s in lr.sessions for p in s.preds]
    arr = np.array([p[1:] for p in preds], dtype=np.float64).reshape(-1, 5)
    lat, queue, model, total, bs = arr.T if arr.size else (np.zeros(0),) * 5
    answered = sum(len({p[0] for p in s.preds}) for s in lr.sessions)
    expected = sum(s.expected for s in lr.sessions)
    sent = sum(s.frames_sent for s in lr.sessions)
    lag = np.array([x for s in lr.sessions for x in s.send_lag_ms], dtype=np.float64)
    net = lat - total
    events: dict[str, int] = {}
    for s in lr.sessions:
        for k, v in s.events.items():
            events[k] = events.get(k, 0) + v
    errors = [f"{s.session_id}: {s.error}" for s in lr.sessions if s.error]
    return {
        **percentiles(lat),
        "frames_sent": sent,
        "frames_answered": answered,
        "frames_dropped": max(0, expected - answered),
        "decodes_expected": expected,
        "frames_late": int((lat > period_ms).sum()),
        "late_fraction": float((lat > period_ms).mean()) if lat.size else None,
        "decodes_coalesced": sum(s.coalesced for s in lr.sessions),
        "throughput_fps": answered / lr.duration_s if lr.duration_s > 0 else None,
        "offered_fps": len(lr.sessions) * lr.rate_hz / lr.stride,
        "duration_s": lr.duration_s,
        "open_s": lr.open_s,
        "client_cpu_s": lr.client_cpu_s,
        "send_lag_ms": {"p50": _p(lag, 50), "p99": _p(lag, 99), "max": _p(lag, 100)},
        "server_ms": {  # where the time goes (the server's own timings, per prediction)
            "queue_p50": _p(queue, 50),
            "queue_p99": _p(queue, 99),
            "model_p50": _p(model, 50),
            "model_p99": _p(model, 99),
            "server_total_p50": _p(total, 50),
            "server_total_p99": _p(total, 99),
            "outside_server_p50": _p(net, 50),  # client latency - server total: proxy, network
            "outside_server_p99": _p(net, 99),
            "batch_size_mean": float(bs.mean()) if bs.size else None,
            "batch_size_max": int(bs.max()) if bs.size else None,
        },
        "events": events,
        "sessions_closed": sum(s.closed for s in lr.sessions),
        "errors": errors[:10],
        "n_errors": len(errors),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b not in (None, 0) else None


def cpu_ms(sec: dict) -> float | None:
    """CPU ms per decode of a path: the server processes for streams, the thread in process."""
    c = (sec or {}).get("cpu") or {}
    return c.get("server_ms_per_decode", c.get("ms_per_decode"))


def ratios(res: dict) -> dict:
    out: dict = {}
    pairs = [
        ("service", "bare_grpc"),
        ("service", "onnx_floor"),
        ("bare_grpc", "onnx_floor"),
        ("torch_eager", "onnx_floor"),
    ]
    for a, b in pairs:
        if a in res and b in res:
            out[f"{a}/{b}"] = {
                q: _ratio(res[a].get(f"{q}_ms"), res[b].get(f"{q}_ms"))
                for q in ("p50", "p99", "p999")
            }
            out[f"{a}/{b}"]["cpu"] = _ratio(cpu_ms(res[a]), cpu_ms(res[b]))
    return out


def cpu_ceiling(res: dict, cfg: PointConfig, cpus: int) -> dict:
    """Sessions at ``cfg.rate`` / ``cfg.stride`` that ``cpus`` idle cores could carry if CPU
    were the only limit: cores / (server + client CPU per decode x decodes per session-second).
    An upper bound (no queueing, no other load); a measured point beyond it cannot keep up."""
    out = {}
    per_s = cfg.rate / cfg.stride
    for sec in ("service", "bare_grpc", "onnx_floor"):
        c = (res.get(sec) or {}).get("cpu") or {}
        ms = c.get("server_ms_per_decode", c.get("ms_per_decode"))
        if ms:
            ms_all = ms + (c.get("client_ms_per_decode") or 0.0)
            out[sec] = {
                "cpu_ms_per_decode": ms_all,
                "max_decodes_per_s": 1e3 * cpus / ms_all,
                "max_sessions": 1e3 * cpus / ms_all / per_s,
            }
    return out


# -- servers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def bare_server(bundle_path, *, max_batch: int, limit_s: float, log: Log = print) -> Iterator[str]:
    """`loadtest.bare_server` in a subprocess on a free loopback port; yields its target."""
    cmd = [
        sys.executable, "-m", "loadtest.bare_server", "--bundle", str(bundle_path),
        "--max-batch", str(max_batch), "--max-seconds", f"{limit_s:.0f}",
    ]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line: list[str] = []
        th = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        th.start()
        th.join(60)
        if not line or not line[0].strip():
            raise RuntimeError(f"bare server did not start (exit code {p.poll()})")
        port = json.loads(line[0])["port"]
        yield f"127.0.0.1:{port}"
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start_local_service(cfg: dict) -> None:
    """Start the Serve application of ``cfg`` on a NEW local Ray instance (never another one on
    this machine; quiet: no dashboard, no worker logs), returning when it is RUNNING."""
    import ray

    from service import server
    from service.settings import NAMESPACE

    if not ray.is_initialized():
        ray.init(
            address="local",
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=os.cpu_count() or 2,
        )
    server.start(cfg, log=None, timeout_s=240)


@contextlib.contextmanager
def service_app(
    bundle_path, *, max_batch: int, max_sessions: int, record_sync: bool, log: Log = print
) -> Iterator[str]:
    """The real Serve application on free loopback ports with the bundle; yields its target."""
    from service import server

    home = tempfile.mkdtemp(prefix="cortexlens-loadtest-")
    port = free_port()
    cfg = server.load_config(
        grpc_port=port,
        http_port=free_port(),
        args={
            "bundle": str(bundle_path),
            "home": home,
            "metrics_port": 0,
            "max_batch_size": max_batch,
            "max_sessions": max(64, max_sessions),
            "ingest": {"record_sync": record_sync},
        },
    )
    t0 = time.perf_counter()
    try:
        start_local_service(cfg)
        log(f"  service up in {time.perf_counter() - t0:.0f} s on 127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _stream(target: str, cfg: PointConfig, specs, log: Log, name: str) -> dict:
    load0 = os.getloadavg()[0]
    if cfg.warmup_seconds > 0:  # one session, not counted: first decodes, plan caches
        w = [replace(specs[0], session_id=specs[0].session_id + "-warm")]
        run_load_sync(target, w, rate=cfg.rate, seconds=cfg.warmup_seconds, stride=cfg.stride)
    with CpuSampler() as cpu:
        lr = run_load_sync(
            target,
            specs,
            rate=cfg.rate,
            seconds=cfg.seconds,
            stride=cfg.stride,
            aligned=cfg.aligned,
            open_timeout_s=max(60.0, 2.0 * cfg.sessions),
            on_start=cpu.mark,
        )
    s = summarize_load(lr, cfg.period_ms)
    roles = cpu.by_role()
    total = sum(roles.values())
    n = max(1, s["frames_answered"])
    s["cpu"] = {  # CPU seconds of the server processes from the first frame to the close
        "server_s": total,
        "server_ms_per_decode": 1e3 * total / n,
        "client_ms_per_decode": 1e3 * lr.client_cpu_s / n,
        "by_role_s": {k: round(v, 3) for k, v in roles.items()},
        "by_role_ms_per_decode": {k: round(1e3 * v / n, 3) for k, v in roles.items()},
    }
    s["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after
    s["_raw"] = lr.latencies_ms()  # for plots; stripped before JSON
    log(f"  {name:10s} {_line(s)}")
    return s


def _line(s: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    return (
        f"p50 {f(s['p50_ms'])} p99 {f(s['p99_ms'])} p99.9 {f(s['p999_ms'])} ms  "
        f"answered {s['frames_answered']}/{s.get('decodes_expected', s['frames_sent'])}  "
        f"dropped {s['frames_dropped']}  late {s.get('frames_late', 0)}"
    )


def machine() -> dict:
    import onnxruntime
    import ray

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
        "load": os.getloadavg()[0],
    }


# -- points --------------------------------------------------------------------------------------
def run_group(
    cfgs: list[PointConfig],
    *,
    cache: Path = CACHE,
    log: Log = print,
    deadline: float | None = None,
    only: tuple[str, ...] = SECTIONS,
) -> list[dict]:
    """Points sharing (cells, rate, seed, max_batch, record_sync): one bundle, one bare server,
    one service for all of them; each phase measures every point before the next starts."""
    c0 = cfgs[0]
    for c in cfgs:
        key = (c.cells, c.rate, c.seed, c.max_batch, c.record_sync)
        if key != (c0.cells, c0.rate, c0.seed, c0.max_batch, c0.record_sync):
            raise ValueError("run_group: the points must share cells, rate, seed, batching, sync")
    from service.engine import Engine

    b = bundle_for(c0.cells, c0.rate, c0.seed, cache=cache, log=log)
    traces, unit_ids = stream_data(c0.cells, c0.rate, c0.seed, cache=cache)
    eng = Engine(b.path, threads=1)
    token = uuid.uuid4().hex[:6]
    results: list[dict] = []
    for c in cfgs:
        results.append(
            {
                "config": {**asdict(c), "label": c.label(), "period_ms": c.period_ms},
                "machine": machine(),
                "bundle": {
                    "path": str(b.path),
                    "version": eng.ref.version,
                    "tokenizer": eng.tokenizer.name,
                    "window_frames": eng.window_frames(c.rate),
                    "top_m": eng.top_m,
                    "n_sae_units": eng.n_sae_units,
                },
                "load_generator": "grpc.aio, one event loop, one channel per session",
            }
        )

    def specs_for(c: PointConfig, tag: str):
        # session ids never repeat: the service refuses a recorded id without resume
        i = cfgs.index(c)
        return session_specs(c.sessions, traces, unit_ids, c.rate, f"lt{token}{tag}{i}")

    # 1) in process: the floor and eager
    teng = torch_engine(eng) if "torch_eager" in only else None
    for c, r in zip(cfgs, results, strict=True):
        w = eng.window_frames(c.rate)
        rows = windows(eng, specs_for(c, "f"), c.rate, range(w, w + 400))
        if "onnx_floor" in only:
            r["onnx_floor"] = time_windows(eng, rows, batch=1, budget_s=c.floor_seconds)
            r["onnx_floor_batch"] = time_windows(
                eng, rows, batch=min(c.sessions, c.max_batch), budget_s=c.floor_seconds
            )
            log(f"  {'onnx_floor':10s} {_line(r['onnx_floor'])}  [{c.label()}]")
            k = min(c.sessions, c.max_batch)
            r["engine_split_ms"] = engine_split(eng, [row[:k] for row in rows], budget_s=1.0)
        if teng is not None:
            r["torch_eager"] = time_windows(teng, rows, batch=1, budget_s=c.floor_seconds)
            r["torch_eager"]["parity_max_abs_logit"] = parity(eng, teng, rows[0])
            log(f"  {'torch_eager':10s} {_line(r['torch_eager'])}")
    del teng

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.monotonic()

    # the servers see the lightest points first, and settle between points (a saturated point
    # leaves at most the decodes already scheduled behind it)
    order = sorted(
        range(len(cfgs)), key=lambda i: cfgs[i].sessions * cfgs[i].cells / cfgs[i].stride
    )
    settle_s = 2.0

    def need(c: PointConfig) -> float:
        return c.seconds + c.warmup_seconds + 15.0

    # 2) bare gRPC
    if "bare_grpc" in only:
        limit = sum(need(c) for c in cfgs) + 120
        with bare_server(b.path, max_batch=c0.max_batch, limit_s=limit, log=log) as target:
            for i in order:
                c, r = cfgs[i], results[i]
                if left() < need(c):
                    r["bare_grpc"] = {"skipped": "time budget"}
                    continue
                r["bare_grpc"] = _stream(target, c, specs_for(c, "b"), log, "bare_grpc")
                time.sleep(settle_s)
    # 3) the service
    if "service" in only and left() > 60 + need(c0):
        with service_app(
            b.path,
            max_batch=c0.max_batch,
            max_sessions=max(c.sessions for c in cfgs),
            record_sync=c0.record_sync,
            log=log,
        ) as target:
            for i in order:
                c, r = cfgs[i], results[i]
                if left() < need(c) + 10:
                    r["service"] = {"skipped": "time budget"}
                    continue
                r["service"] = _stream(target, c, specs_for(c, "s"), log, "service")
                time.sleep(settle_s)
    for c, r in zip(cfgs, results, strict=True):
        for sec in only:
            r.setdefault(sec, {"skipped": "time budget"})
        r["ratios"] = ratios(r)
        r["cpu_ceiling"] = cpu_ceiling(r, c, os.cpu_count() or 2)
        s = r.get("service", {})
        r["target"] = {
            "period_ms": c.period_ms,
            "p99_ms": s.get("p99_ms"),
            "frames_dropped": s.get("frames_dropped"),
            "met": bool(
                s.get("p99_ms") is not None
                and s["p99_ms"] < c.period_ms
                and s.get("frames_dropped") == 0
                and not s.get("n_errors")
            ),
        }
    return results


def group_key(c: PointConfig) -> tuple:
    return (c.cells, c.rate, c.seed, c.max_batch, c.record_sync)


def run_points(cfgs: list[PointConfig], **kw) -> list[dict]:
    """Run points grouped by what they share (`run_group`), results in the given order."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(group_key(c), []).append(i)
    out: list[Any] = [None] * len(cfgs)
    for idx in groups.values():
        for i, r in zip(idx, run_group([cfgs[i] for i in idx], **kw), strict=True):
            out[i] = r
    return out
