"""A real multi-node Ray cluster on one machine: a head and two worker nodes started with
``ray start``, the Serve application deployed to it from the Serve config (the way a RayService
does), Ingress and DecoderModel replicas on different worker nodes, live sessions streaming
through the gRPC proxy; then a worker node is killed mid stream (SIGKILL of every process of
that node: raylet, agents, workers) and the service must recover: streams that fail end with a
clean gRPC status and reconnect with ``resume=True``, sessions whose actor died are restarted on
another node from their durable record, every session ends CLOSED with every frame recorded
intact, and a replacement node brings the application back to full capacity.

Differences from the cluster manifests, all forced by the nodes sharing one network namespace:
the proxy runs on the head only (``proxy_location: HeadOnly``; a proxy per node would fight for
the gRPC port), and replicas are pinned to the worker nodes by a custom resource ``worker``.

Prints the recovery time (kill -> first prediction of every interrupted session).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

N_SESSIONS = 4
N_FRAMES = 900  # per session, 30 Hz: 30 s of recording
SPEED = 2.5  # x real time: ~12 s per session when nothing goes wrong
STRIDE = 2  # a prediction every other frame: 4 sessions stay within one decoder on 2 cores
KILL_AFTER_PREDICTIONS = 30  # per session, before the node is killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a Ray cluster of `ray start` nodes on this machine -------------------------------------------
class LocalCluster:
    """Nodes started with ``ray start --block``, each in its own session (``setsid``): every
    process of a node (raylet, agents, workers) carries the session id of its ``ray start``, so a
    node is killed by SIGKILL of that session, and nothing else on the machine is touched."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.join_error: str | None = None
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # token authentication on, with a token of this cluster only (not ~/.ray/auth_token)
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }

    def start(
        self, name: str, *, head: bool = False, num_cpus: float, resources: dict, attempt: int = 1
    ) -> None:
        tmp = self.root / f"{name}.{attempt}"  # own temp dir: nodes must not share sockets
        tmp.mkdir()
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={tmp}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=100000000",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.nodes[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def started(self, name: str) -> bool:
        """``ray start`` said the node is up (raises if it exited)."""
        p = self.nodes[name]
        if p.poll() is not None:
            raise RuntimeError(f"node {name} exited ({p.returncode}):\n{self.log_tail(name)}")
        log = self.root / f"{name}.log"
        return log.exists() and "Ray runtime started" in log.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        import psutil

        sid = self.nodes[name].pid
        out = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    def node_of_pid(self, pid: int) -> str | None:
        try:
            sid = os.getsid(pid)
        except ProcessLookupError:
            return None
        return next((n for n, p in self.nodes.items() if p.pid == sid), None)

    def kill(self, name: str) -> int:
        """SIGKILL every process of a node (like a pod or machine lost); returns how many."""
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait(timeout=10)
        return len(pids)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.kill(name)
        deadline = time.monotonic() + 10
        while any(self.pids(n) for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)

    def bring_up(self, workers, *, timeout: float = 240.0) -> None:
        """Start the head, then the worker nodes one at a time, each until its ``ray start``
        reports the node up; a node whose ``ray start`` gives up (Ray waits 30 s for a raylet to
        register, too short on a loaded machine) is started again once. Errors go to
        ``join_error`` (this runs in a thread beside the model build)."""
        self.join_error = None
        try:
            self._start_retrying("head", timeout, head=True, num_cpus=0, resources={"head": 1})
            for w in workers:
                self._start_retrying(w, timeout, num_cpus=1, resources={"worker": 1, w: 1})
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.join_error = f"{e}\n{self.log_tails()}"

    def _start_retrying(self, name: str, timeout: float, **kw) -> None:
        for attempt in (1, 2):
            if kw.get("head"):
                self.port = _free_port()
                self.address = f"127.0.0.1:{self.port}"
            self.start(name, attempt=attempt, **kw)
            try:
                _wait(lambda: self.started(name), timeout, f"node {name}")
                return
            except RuntimeError:  # `ray start` exited
                self.kill(name)  # whatever it left behind
                if attempt == 2:
                    raise

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.nodes)

    def log_tail(self, name: str, n: int = 20) -> str:
        p = self.root / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


def _wait(cond, timeout: float, what: str, poll: float = 0.3, on_timeout=None):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            more = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"{what}: not after {timeout:.0f} s{more}")
        time.sleep(poll)


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


# -- the deployment --------------------------------------------------------------------------------
def _cluster_config(home: Path) -> dict:
    """deploy/serve/cortexlens.yaml with this test's ports and home, and the placement above."""
    from deploy.render import merge
    from service import server

    cfg = server.load_config(
        grpc_port=_free_port(),
        http_port=_free_port(),
        args={"home": str(home), "metrics_port": _free_port()},
    )
    pin = {"num_cpus": 0.5, "resources": {"worker": 0.001}}
    return merge(
        cfg,
        {
            "proxy_location": "HeadOnly",
            "applications": [
                {
                    "name": "cortexlens",
                    "deployments": [
                        {
                            "name": name,
                            "num_replicas": 2,
                            "max_replicas_per_node": 1,
                            "ray_actor_options": pin,
                        }
                        for name in ("Ingress", "DecoderModel")
                    ],
                }
            ],
        },
    )


def _replica_nodes() -> dict[str, set[str]]:
    """Node ids of the ALIVE Serve replicas, by deployment."""
    from ray._private import state

    out: dict[str, set[str]] = {}
    for a in state.actors().values():
        name = a.get("Name") or ""
        if a["State"] == "ALIVE" and name.startswith("SERVE_REPLICA::cortexlens#"):
            dep = name.split("#")[1]
            out.setdefault(dep, set()).add(a["Address"]["NodeID"])
    return out


def _running_replicas(dep: str) -> int:
    from ray import serve

    app = serve.status().applications.get("cortexlens")
    if app is None or dep not in app.deployments:
        return 0
    counts = app.deployments[dep].replica_states
    return int(counts.get("RUNNING", 0))


# -- a client that reconnects ----------------------------------------------------------------------
@dataclass
class SessionRun:
    session_id: str
    predictions: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, frame)
    errors: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic, code, msg)
    accepted_next: list[int] = field(default_factory=list)
    closed: object = None
    failure: str | None = None


def _stream_until_closed(target: str, rec, run: SessionRun, deadline: float) -> None:
    """Stream the session; on an error, reconnect with resume=True (continuing from the server's
    next_frame_index) until the session is CLOSED."""
    from service.client import Client, CortexlensError

    try:
        with Client(target, timeout_s=60) as c:
            attempt = 0
            while time.monotonic() < deadline:
                s = c.stream(
                    rec,
                    session_id=run.session_id,
                    realtime=True,
                    speed=SPEED,
                    max_frames=N_FRAMES,
                    resume=attempt > 0,
                    decode_stride=STRIDE,
                    deadline_s=max(1.0, deadline - time.monotonic()),
                )
                attempt += 1
                try:
                    for it in s:
                        if it.kind == "prediction":
                            run.predictions.append((time.monotonic(), int(it.message.frame_index)))
                        elif it.kind == "accepted":
                            run.accepted_next.append(int(it.message.next_frame_index))
                        elif it.kind == "closed":
                            run.closed = it.message
                    if run.closed is not None:
                        return
                    run.errors.append((time.monotonic(), "EOF", "stream ended without closed"))
                except CortexlensError as e:
                    run.errors.append((time.monotonic(), e.code_name, e.details[:200]))
                time.sleep(0.25)
            run.failure = f"not closed before the deadline; errors: {run.errors[-3:]}"
    except Exception as e:  # noqa: BLE001 - reported by the test
        run.failure = f"{type(e).__name__}: {e}"


# -- the test --------------------------------------------------------------------------------------
@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="clmn", dir="/tmp"))  # short: unix socket paths
    c = LocalCluster(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", c.env["RAY_AUTH_TOKEN"])
        _refresh_ray_auth()  # Ray caches the auth mode and token per process: re-read them
        try:
            yield c
        finally:
            from service import server

            try:
                server.stop()
            except Exception:  # noqa: BLE001 - the cluster goes anyway
                pass
            c.stop()
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    _refresh_ray_auth()  # back to this process's own settings for the tests that follow


def _refresh_ray_auth() -> None:
    """Make this process re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN: Ray caches both when it is
    first used, so a test process that already used Ray (another test module) would otherwise
    connect to this cluster without its token."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def test_worker_node_lost_mid_stream_recovers(cluster, tmp_path):
    import ray

    from models.registry import Registry
    from service import server
    from service.client import Client
    from service.home import quick_bundle, simulated_recording
    from service.ingest import FrameRecord
    from service.settings import NAMESPACE

    t_start = time.monotonic()
    # nodes come up while the model trains
    joiner = threading.Thread(target=cluster.bring_up, args=(("w1", "w2"),), daemon=True)
    joiner.start()
    recs = [simulated_recording(f"mn{i}", n_cells=48, minutes=0.7, seed=i) for i in range(2)]
    built = quick_bundle(
        recs, tmp_path / "quick", seed=0, name="default", epochs=1, sae_units=32, sae_k=4,
        sae_steps=40,
    )  # fmt: skip
    home = tmp_path / "home"
    Registry(home / "registry").publish(built.path, "default", promote=True)
    t_model = time.monotonic() - t_start

    joiner.join(timeout=300)
    assert cluster.join_error is None, cluster.join_error
    _try_init(cluster)
    _wait(lambda: len(_alive_nodes()) == 3, 120, "3 nodes", on_timeout=cluster.log_tails)
    cfg = _cluster_config(home)
    server.start(cfg, address=cluster.address, timeout_s=240, log=None)
    t_up = time.monotonic() - t_start
    placed = _replica_nodes()
    workers = {n["NodeID"] for n in _alive_nodes() if "worker" in n["Resources"]}
    for dep in ("Ingress", "DecoderModel"):
        assert placed.get(dep) == workers, f"{dep} replicas not one per worker node: {placed}"

    # -- sessions streaming through the head's gRPC proxy
    target = f"127.0.0.1:{cfg['grpc_options']['port']}"
    sessions = []
    for i in range(N_SESSIONS):
        rec = recs[i % len(recs)]
        sessions.append((rec, SessionRun(f"{rec.session_id}-live{i}")))
    deadline = time.monotonic() + 240
    threads = [
        threading.Thread(
            target=_stream_until_closed, args=(target, rec, run, deadline), daemon=True
        )
        for rec, run in sessions
    ]
    for t in threads:
        t.start()
    runs = [run for _, run in sessions]
    _wait(
        lambda: (
            all(len(r.predictions) >= KILL_AFTER_PREDICTIONS for r in runs)
            or any(r.failure for r in runs)
        ),
        120,
        "predictions on every session",
    )
    assert not any(r.failure for r in runs), [r.failure for r in runs]
    assert not any(r.closed for r in runs), "a session ended before the node was killed"

    # -- kill the worker node that hosts the most session actors
    where: dict[str, list[str]] = {"w1": [], "w2": []}
    for _, run in sessions:
        actor = ray.get_actor(f"session:{run.session_id}", namespace=NAMESPACE)
        node = cluster.node_of_pid(ray.get(actor.pid.remote(), timeout=30))
        if node in where:
            where[node].append(run.session_id)
    victim = max(where, key=lambda n: len(where[n]))
    survivor = "w2" if victim == "w1" else "w1"
    victim_id = next(
        n["NodeID"] for n in _alive_nodes() if victim in n["Resources"]
    )  # fmt: skip
    t_kill = time.monotonic()
    n_killed = cluster.kill(victim)
    print(
        f"\nkilled node {victim} ({n_killed} processes; session actors there: {where[victim]}) "
        f"{t_kill - t_start:.1f} s into the test"
    )
    _wait(lambda: victim_id not in {n["NodeID"] for n in _alive_nodes()}, 120, "node marked dead")
    t_dead = time.monotonic() - t_kill

    # -- the service recovers: every session continues to its end
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a session did not finish"
    failures = {r.session_id: r.failure for r in runs if r.failure}
    assert not failures, failures
    t_done = time.monotonic()

    # recovery of a session: from the kill to its first prediction after the outage: after its
    # last reconnect if it had to reconnect, else after the first stall (> 1 s without a
    # prediction) that began after the kill; 0 if it never stalled
    recovery = {}
    for r in runs:
        times = [t for t, _ in r.predictions]
        after = [t for t in times if t > t_kill]
        assert after, f"{r.session_id}: no prediction after the node was killed"
        errs = [t for t, _, _ in r.errors if t > t_kill]
        if errs:
            back = next(t for t in after if t > errs[-1])
        else:
            edges = [max([t for t in times if t <= t_kill], default=t_kill), *after]
            stalls = [b for a, b in zip(edges, edges[1:], strict=False) if b - a > 1.0]
            back = stalls[0] if stalls else t_kill
        recovery[r.session_id] = {"recovered_s": round(back - t_kill, 2), "reconnects": len(errs)}
        for _, code, msg in r.errors:
            assert _retryable(code, msg), (r.session_id, code, msg)
        assert r.closed is not None and r.closed.frames_recorded == N_FRAMES, r.closed
    worst = max(v["recovered_s"] for v in recovery.values())
    print(
        f"model built {t_model:.0f} s, application RUNNING {t_up:.0f} s after the start; node "
        f"{victim} marked dead {t_dead:.1f} s after the kill; every session predicting again "
        f"{worst:.1f} s after the kill (worst); all {len(runs)} sessions CLOSED "
        f"{t_done - t_kill:.1f} s after it; per session: {recovery}"
    )
    for r in runs:
        print(f"  {r.session_id} statuses:", [(round(t - t_kill, 1), c) for t, c, _ in r.errors])

    # -- durable records: every frame, each exactly as sent
    for rec, r in sessions:
        fr = FrameRecord.open(home / "sessions" / r.session_id, readonly=True)
        got = fr.read()
        assert list(got.indices) == list(range(N_FRAMES)), f"{r.session_id}: frames lost"
        np.testing.assert_array_equal(got.values, rec.traces[:N_FRAMES].astype(np.float32))
        np.testing.assert_allclose(got.timestamps, rec.timestamps[:N_FRAMES])
        assert fr.closed_clean
        fr.close()
        # the end of the session was decoded
        assert max(f for _, f in r.predictions) >= N_FRAMES - STRIDE

    # the survivor still serves with one replica of each deployment (Serve keeps the missing
    # ones pending until capacity returns: on Kubernetes, the replacement pod)
    with Client(target, timeout_s=30) as c:
        assert c.health() == "SERVING"
    print(f"survivor {survivor}; total {time.monotonic() - t_start:.0f} s")


def _retryable(code: str, msg: str) -> bool:
    """A status a client acts on by reconnecting with resume=True. Serve's gRPC proxy reports a
    replica that died mid-call as INTERNAL naming the dead or unavailable actor; the ingress
    reports its own trouble as UNAVAILABLE."""
    if code in ("UNAVAILABLE", "EOF"):
        return True
    m = msg.lower()
    return (
        code == "INTERNAL" and "actor" in m and ("unavailable" in m or "died" in m or "dead" in m)
    )


def _try_init(cluster: LocalCluster) -> None:
    import ray

    from service.settings import NAMESPACE

    ray.init(
        address=cluster.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False
    )
