"""Integration tests: the real Ray Serve application (Serve config file, gRPC proxy, decoder
deployment, ingestion actors) on a local Ray instance, driven by a real gRPC client on loopback.

One server per module (starting Ray + Serve takes ~20 s on 2 cores); every test uses its own
session ids. The model is the ``service_home`` quick bundle (5 Park sessions + a simulated
512-cell 30 Hz session), published into a fresh registry for this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg
from tests.service.conftest import free_port, published_home

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(service_home, tmp_path_factory):
    from types import SimpleNamespace

    from service import server

    home, reg, v1 = published_home(service_home, tmp_path_factory, "served_home")
    grpc_port, metrics_port = free_port(), free_port()
    cfg = server.load_config(
        grpc_port=grpc_port,
        http_port=free_port(),
        args={"home": str(home), "metrics_port": metrics_port, "ingest": {"max_gap_frames": 60}},
    )
    server.start(cfg, num_cpus=2, log=None)
    try:
        yield SimpleNamespace(
            target=f"127.0.0.1:{grpc_port}",
            cfg=cfg,
            home=home,
            registry=reg,
            version=v1,
            metrics_port=metrics_port,
            records=home / "sessions",
            recordings={r.session_id: r for r in service_home.recordings},
        )
    finally:
        server.stop()


@pytest.fixture
def client(served):
    from service.client import Client

    with Client(served.target, timeout_s=30) as c:
        yield c


@pytest.fixture
def stub(served):
    ch = grpc.insecure_channel(served.target)
    yield pbg.DecoderStub(ch)
    ch.close()


def _park(served, i=0):
    return [r for k, r in served.recordings.items() if k != "sim512"][i]


def _window(rec, end: int, frames: int):
    v = np.ascontiguousarray(rec.traces[end - frames + 1 : end + 1], dtype="<f4")
    return v, rec.timestamps[end - frames + 1 : end + 1]


def _record_indices(served, session_id):
    from service.ingest import FrameRecord

    rec = FrameRecord.open(served.records / session_id, readonly=True)
    return rec.index()[0]


def _session_pid(session_id: str) -> int:
    """The process id of the live session's actor."""
    import ray

    from service.app import _actor_name
    from service.settings import NAMESPACE

    actor = ray.get_actor(_actor_name(session_id), namespace=NAMESPACE)
    return ray.get(actor.pid.remote())


@contextlib.contextmanager
def _session_actor_stopped(session_id: str):
    """The session actor's process SIGSTOPped for the block, SIGCONTed after if it still runs."""
    pid = _session_pid(session_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _status_once_not_live(served, session_id: str, timeout_s: float) -> tuple[dict, float]:
    """The record's status as soon as it no longer reads LIVE (or at the deadline), and the
    seconds waited."""
    from service.ingest import record_status

    t0 = time.time()
    st = record_status(served.records / session_id)
    while st["state"] == "LIVE" and time.time() < t0 + timeout_s:
        time.sleep(0.2)
        st = record_status(served.records / session_id)
    return st, time.time() - t0


# -- unary -----------------------------------------------------------------------------------------
def test_health_model_and_units(client, served):
    assert client.health() == "SERVING"
    info = client.model()
    assert info.model.name == "default" and info.model.version == served.version
    assert {t.name for t in info.tasks} >= {"direction", "genetic"}
    assert info.tokenizer == "patch" and info.default_top_m == 16
    units = client.units()
    assert len(units.units) == info.n_sae_units and units.model.version == served.version


def test_unary_decode_explains_the_logit(client, served):
    rec = _park(served)
    v, t = _window(rec, 200, 17)
    p = client.decode(rec.session_id, rec.unit_ids, v, t, top_m=5)
    assert p.model.version == served.version and p.n_cells_used == rec.n_units
    for task in p.tasks:
        assert len(task.probabilities) == len(task.class_names)
        assert abs(sum(task.probabilities) - 1) < 1e-4
        assert task.predicted_class == int(np.argmax(task.logits))
        assert len(task.units) == 5
        total = sum(u.attribution for u in task.units) + task.unexplained
        assert total == pytest.approx(task.logits[task.predicted_class], abs=1e-4)
    # the same window through ONNX Runtime in process gives the same logits
    from service.engine import Engine, WindowItem

    eng = Engine(served.registry.open("default").path)
    d = eng.run([WindowItem(eng.plan(rec.session_id, rec.unit_ids), v, t, float(t[-1]))])[0]
    for task, ref in zip(p.tasks, d.tasks, strict=True):
        np.testing.assert_allclose(task.logits, ref.logits, atol=1e-5)


def _decode_req(rec, n_frames=17, **kw):
    v, t = _window(rec, 100, n_frames)
    req = pb.DecodeRequest(
        session_id=rec.session_id,
        unit_ids=list(rec.unit_ids),
        window=pb.FrameBlock(
            n_frames=n_frames, n_cells=rec.n_units, values=v.tobytes(), timestamps=list(t)
        ),
    )
    for k, val in kw.items():
        setattr(req, k, val)
    return req


def test_unary_bad_inputs_get_actionable_statuses(stub, served):
    rec = _park(served)
    C = grpc.StatusCode

    def code(req):
        with pytest.raises(grpc.RpcError) as e:
            stub.Decode(req, timeout=30)
        assert e.value.details()  # a message a person can act on
        return e.value.code(), e.value.details()

    r = _decode_req(rec)
    r.window.values = r.window.values[:-4]
    assert code(r)[0] == C.INVALID_ARGUMENT and "bytes" in code(r)[1]
    r = _decode_req(rec)
    v = np.frombuffer(r.window.values, "<f4").copy()
    v[5] = np.nan
    r.window.values = v.tobytes()
    assert code(r)[0] == C.INVALID_ARGUMENT
    r = _decode_req(rec)
    del r.unit_ids[-1]
    assert code(r)[0] == C.INVALID_ARGUMENT
    r = _decode_req(rec)
    r.unit_ids[1] = r.unit_ids[0]
    assert code(r)[0] == C.INVALID_ARGUMENT
    r = _decode_req(rec)
    r.window.timestamps[3] = r.window.timestamps[2]
    assert code(r)[0] == C.INVALID_ARGUMENT
    assert code(_decode_req(rec, model="nope"))[0] == C.NOT_FOUND
    r = _decode_req(rec)
    r.unit_ids[:] = [f"never-seen-{i}" for i in range(rec.n_units)]
    assert code(r)[0] == C.FAILED_PRECONDITION
    r = _decode_req(rec)
    r.window.n_frames = 5000
    assert code(r)[0] == C.RESOURCE_EXHAUSTED
    r = _decode_req(rec)
    r.unit_ids[:] = [f"c{i}" for i in range(9000)]  # above max_cells
    assert code(r)[0] == C.RESOURCE_EXHAUSTED
    # a message above the proxy's size limit (64 MiB) is refused before it reaches the service
    r = _decode_req(rec)
    r.window.values = b"\x00" * (65 * 1024 * 1024)
    assert code(r)[0] == C.RESOURCE_EXHAUSTED
    # the server is still fine
    assert stub.Decode(_decode_req(rec), timeout=30).prediction.tasks


def test_get_session_unknown_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.GetSessionRequest(session_id="no-such-session"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.GetSessionRequest(session_id="../etc"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- streaming -------------------------------------------------------------------------------------
def _run_stream(client, rec, **kw):
    items = list(client.stream(rec, **kw))
    kinds = [i.kind for i in items]
    assert kinds[0] == "accepted" and kinds[-1] == "closed", kinds[:3] + kinds[-3:]
    return items


def test_stream_park_session_every_frame_explained(client, served, stub):
    rec = _park(served, 1)
    n = 240
    s = client.stream(rec, realtime=False, max_frames=n, session_id="park-full")
    items = list(s)
    preds = [i.message for i in items if i.kind == "prediction"]
    assert [p.frame_index for p in preds] == list(range(n))
    for p in preds:
        assert p.model.version == served.version
        assert all(len(t.units) > 0 for t in p.tasks)
    closed = items[-1].message
    assert closed.state == pb.SessionStatus.CLOSED
    assert closed.frames_recorded == n and closed.frames_decoded == n
    assert list(_record_indices(served, "park-full")) == list(range(n))
    st = stub.GetSession(pb.GetSessionRequest(session_id="park-full"), timeout=30)
    assert st.state == pb.SessionStatus.CLOSED and st.frames_recorded == n
    # the durable record exports to NWB with exactly the frames sent
    from models.data.io import load_recordings
    from service.ingest import FrameRecord

    out = FrameRecord.open(served.records / "park-full", readonly=True).export(
        served.home / "park-full.nwb"
    )
    back = load_recordings([out])[0]
    np.testing.assert_array_equal(back.traces, rec.traces[:n])
    np.testing.assert_allclose(back.timestamps, rec.timestamps[:n])
    assert list(back.unit_ids) == list(rec.unit_ids)


def test_stream_sim512_at_30hz_in_real_time(client, served):
    rec = served.recordings["sim512"]
    n = 240  # 8 s at 30 Hz
    s = client.stream(rec, realtime=True, max_frames=n, session_id="sim512-live")
    items = list(s)
    preds = [i for i in items if i.kind == "prediction"]
    assert [p.message.frame_index for p in preds] == list(range(n))
    assert all(p.message.n_cells_used == 512 for p in preds)
    lat = np.array([p.latency_ms for p in preds])
    q = np.percentile(lat, [50, 90, 99])
    print(f"\nsim512 30 Hz frame-to-explanation ms p50 {q[0]:.1f} p90 {q[1]:.1f} p99 {q[2]:.1f}")


def test_many_concurrent_sessions(served):
    from service.client import Client

    recs = [_park(served, i % 5) for i in range(8)]
    results: dict[int, object] = {}

    def run(i):
        try:
            with Client(served.target, timeout_s=60) as c:
                items = list(c.stream(recs[i], realtime=False, max_frames=90, session_id=f"c{i}"))
            results[i] = [x.message.frame_index for x in items if x.kind == "prediction"]
        except Exception as e:  # noqa: BLE001
            results[i] = e

    th = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in th:
        t.start()
    for t in th:
        t.join(300)
    for i in range(8):
        assert results[i] == list(range(90)), results[i]


def _frames_msg(rec, first, k=1, values=None, timestamps=None, n_cells=None):
    v = rec.traces[first : first + k].astype("<f4") if values is None else values
    t = list(rec.timestamps[first : first + k]) if timestamps is None else timestamps
    return pb.StreamRequest(
        frames=pb.Frames(
            first_frame_index=first,
            block=pb.FrameBlock(
                n_frames=k,
                n_cells=rec.n_units if n_cells is None else n_cells,
                values=v.tobytes() if hasattr(v, "tobytes") else v,
                timestamps=t,
            ),
        )
    )


def _open_msg(rec, sid, **kw):
    return pb.StreamRequest(
        open=pb.SessionOpen(
            session_id=sid, unit_ids=list(rec.unit_ids), frame_rate_hz=rec.sampling_rate, **kw
        )
    )


def _raw_stream(stub, msgs, pace_s=0.0):
    def gen():
        for m in msgs:
            yield m
            if pace_s:
                time.sleep(pace_s)

    out = []
    try:
        for r in stub.StreamSession(gen(), timeout=60):
            out.append(r)
    except grpc.RpcError as e:
        return out, e.code(), e.details()
    return out, grpc.StatusCode.OK, ""


def test_stream_bad_inputs_end_only_that_stream(stub, served):
    rec = _park(served, 2)
    C = grpc.StatusCode
    # frames before open
    _, code, msg = _raw_stream(stub, [_frames_msg(rec, 0)])
    assert code == C.FAILED_PRECONDITION and "open" in msg
    # a healthy stream in parallel must be unaffected by all of the below
    ok: dict = {}

    def healthy():
        ok["r"] = _raw_stream(
            stub, [_open_msg(rec, "bystander")] + [_frames_msg(rec, j) for j in range(60)], 0.02
        )

    th = threading.Thread(target=healthy)
    th.start()
    nan = rec.traces[0:1].astype("<f4").copy()
    nan[0, 3] = np.inf
    cases = {
        "nan": ([_frames_msg(rec, 0), _frames_msg(rec, 1, values=nan)], C.INVALID_ARGUMENT),
        "cells": ([_frames_msg(rec, 0, values=rec.traces[0:1, :-1].astype("<f4"))], None),
        "bytes": ([_frames_msg(rec, 0, values=b"\x00" * 7)], C.INVALID_ARGUMENT),
        "dtype": ([_frames_msg(rec, 0, values=rec.traces[0:1].astype("<f8"))], None),
        "order": ([_frames_msg(rec, 0), _frames_msg(rec, 500)], C.FAILED_PRECONDITION),
        "reopen": ([_open_msg(rec, "x")], C.FAILED_PRECONDITION),
        "empty": ([pb.StreamRequest()], C.INVALID_ARGUMENT),
        "block": ([_frames_msg(rec, 0, k=0, values=b"", timestamps=[])], C.INVALID_ARGUMENT),
    }
    for name, (msgs, want) in cases.items():
        out, code, msg = _raw_stream(stub, [_open_msg(rec, f"bad-{name}"), *msgs])
        assert out and out[0].WhichOneof("kind") == "accepted", name
        assert code == (want or C.INVALID_ARGUMENT), (name, code, msg)
        assert msg, name
    # bad session ids and cell lists at open
    for op, want in [
        (pb.SessionOpen(session_id="../x", unit_ids=["a"], frame_rate_hz=30), C.INVALID_ARGUMENT),
        (pb.SessionOpen(session_id="ok1", unit_ids=[], frame_rate_hz=30), C.INVALID_ARGUMENT),
        (pb.SessionOpen(session_id="ok2", unit_ids=["a", "a"], frame_rate_hz=30), None),
        (pb.SessionOpen(session_id="ok3", unit_ids=["a"], frame_rate_hz=0), None),
        (
            pb.SessionOpen(
                session_id="ok4", unit_ids=list(rec.unit_ids), model="x", frame_rate_hz=9
            ),
            C.NOT_FOUND,
        ),
    ]:
        _, code, msg = _raw_stream(stub, [pb.StreamRequest(open=op)])
        assert code == (want or C.INVALID_ARGUMENT), (op, code, msg)
    th.join(120)
    out, code, _ = ok["r"]
    assert code == C.OK
    assert sum(r.WhichOneof("kind") == "prediction" for r in out) == 60


def test_gaps_duplicates_and_late_frames_are_reported(stub, served):
    rec = _park(served, 3)
    order = [0, 1, 2, 3, 3, 5, 4, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 19, 20]
    out, code, _ = _raw_stream(
        stub, [_open_msg(rec, "holes")] + [_frames_msg(rec, j) for j in order]
    )
    assert code == grpc.StatusCode.OK
    ev = [
        (r.event.kind, r.event.first_frame_index, r.event.last_frame_index)
        for r in out
        if r.event.kind
    ]
    K = pb.StreamEvent
    assert (K.DUPLICATE, 3, 3) in ev
    assert (K.GAP, 11, 13) in ev
    preds = [r.prediction.frame_index for r in out if r.WhichOneof("kind") == "prediction"]
    assert preds == sorted(set(order))  # every received frame decoded once, gaps decoded through
    masked = [r.prediction.masked_fraction for r in out if r.WhichOneof("kind") == "prediction"]
    assert max(masked) > 0
    closed = out[-1].closed
    assert closed.duplicates_dropped == 1 and closed.frames_missing == 3
    assert list(_record_indices(served, "holes")) == sorted(set(order))


def test_unknown_cells_are_recorded_not_decoded(stub, served):
    rec = _park(served, 0)
    op = pb.SessionOpen(
        session_id="stranger", unit_ids=[f"new-{i}" for i in range(8)], frame_rate_hz=10
    )
    v = np.ones((1, 8), "<f4")
    msgs = [pb.StreamRequest(open=op)] + [
        pb.StreamRequest(
            frames=pb.Frames(
                first_frame_index=j,
                block=pb.FrameBlock(n_frames=1, n_cells=8, values=v.tobytes(), timestamps=[j / 10]),
            )
        )
        for j in range(20)
    ]
    out, code, _ = _raw_stream(stub, msgs)
    assert code == grpc.StatusCode.OK
    assert out[0].accepted.decoding is False and out[0].accepted.n_cells_known == 0
    assert out[1].event.kind == pb.StreamEvent.NOT_DECODED
    assert not any(r.WhichOneof("kind") == "prediction" for r in out)
    assert out[-1].closed.frames_recorded == 20
    del rec


def test_vanished_client_then_resume_loses_nothing(client, served):
    rec = _park(served, 4)
    s = client.stream(rec, realtime=True, speed=4.0, max_frames=400, session_id="vanish")
    got = []
    for it in s:
        if it.kind == "prediction":
            got.append(it.message.frame_index)
            if len(got) == 40:
                s.cancel()
                break
    st, _ = _status_once_not_live(served, "vanish", 30)
    assert st["state"] == "INTERRUPTED"
    sent_before = st["last_frame_index"] + 1
    # reconnect: continue from the server's next_frame_index
    items = _run_stream(
        client, rec, realtime=False, max_frames=120, session_id="vanish", resume=True
    )
    acc = items[0].message
    assert acc.next_frame_index == sent_before
    idx = _record_indices(served, "vanish")
    assert list(idx) == list(range(int(idx[-1]) + 1))  # no hole: nothing acknowledged was lost
    assert items[-1].message.state == pb.SessionStatus.CLOSED


def test_session_calls_outlive_the_cancelled_request_that_made_them(served):
    """Serve cancels a gRPC request whose client left *recursively*; session-actor calls made
    through `_session_call` must not be cancelled with it (queued frames would be dropped and
    the caller's in-order queue to the actor could be left with a hole). Mutation-checked: with
    a plain ``.remote`` the queued calls are cancelled and only the running one completes."""
    import asyncio

    import ray

    from service.app import _session_call

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self):
            self.got = []

        def put(self, i):
            time.sleep(0.3)
            self.got.append(i)

        def seen(self):
            return self.got

    @ray.remote(num_cpus=0)
    class Handler:  # an async actor like a Serve replica; `run` plays a request
        def __init__(self, sink):
            self.sink = sink

        async def run(self):
            await asyncio.gather(*[_session_call(self.sink, "put", i) for i in range(4)])

        def ready(self):
            return True

    sink = Sink.remote()
    h = Handler.remote(sink)
    ray.get([sink.seen.remote(), h.ready.remote()])  # both processes up
    ref = h.run.remote()
    time.sleep(0.45)  # the first put is running, three are queued on the sink
    ray.cancel(ref, recursive=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and len(ray.get(sink.seen.remote())) < 4:
        time.sleep(0.1)
    assert ray.get(sink.seen.remote()) == [0, 1, 2, 3]
    for a in (h, sink):
        ray.kill(a)


def test_unresponsive_session_actor_is_ended_when_its_stream_vanishes(client, served):
    """A stream ends without a clean close while its session actor does not answer (here: its
    process is stopped): the ingress waits `INTERRUPT_WAIT_S`, then ends the actor, so the
    record reads INTERRUPTED (not LIVE forever) and the session resumes from disk."""
    from service.app import INTERRUPT_WAIT_S

    rec = _park(served, 1)
    s = client.stream(rec, realtime=True, speed=4.0, max_frames=400, session_id="frozen")
    items = iter(s)  # not a for loop: leaving one cancels the stream before the actor stops
    while next(items).kind != "prediction":
        pass
    with _session_actor_stopped("frozen"):
        s.cancel()
        st, waited = _status_once_not_live(served, "frozen", INTERRUPT_WAIT_S + 30)
        assert st["state"] == "INTERRUPTED", f"still {st['state']} after {waited:.0f} s"
    items = _run_stream(
        client, rec, realtime=False, max_frames=60, session_id="frozen", resume=True
    )
    assert items[0].message.next_frame_index == st["last_frame_index"] + 1
    idx = _record_indices(served, "frozen")
    assert list(idx) == list(range(int(idx[-1]) + 1))
    assert items[-1].message.state == pb.SessionStatus.CLOSED


def test_cancel_while_the_stream_is_ending_still_ends_its_session_actor(stub, client, served):
    """A vanished client's input breaks off and Serve's cancellation of its request follows, in
    either order, so the cancellation can reach the replica while the stream is already ending.
    Made deterministic here: the stream ends on a message the ingress refuses by itself while
    the session actor does not answer (its process is stopped), and the client cancels while
    the ingress waits for `interrupt`. The wait must still run out and end the actor (record
    INTERRUPTED, resumable); cut short by the cancellation, the record stayed LIVE with no
    stream (mutation-checked: awaiting `_end_stream` in the request's task fails this)."""
    from service.app import INTERRUPT_WAIT_S
    from service.ingest import record_status

    rec = _park(served, 3)
    sid, n = "cut-short", 60
    go, done = threading.Event(), threading.Event()

    def requests():
        yield _open_msg(rec, sid, decode_stride=1)
        for j in range(n):
            yield _frames_msg(rec, j)
        go.wait(120)
        yield pb.StreamRequest()  # refused by the ingress itself (no frames): the stream ends
        done.wait(300)  # and the client never half-closes

    call = stub.StreamSession(requests(), timeout=300)
    try:
        for r in call:  # every block was pushed once the last frame is decoded
            if r.WhichOneof("kind") == "prediction" and r.prediction.frame_index == n - 1:
                break
        with _session_actor_stopped(sid):
            go.set()
            time.sleep(min(3.0, INTERRUPT_WAIT_S / 3))  # the ingress now waits for `interrupt`
            assert record_status(served.records / sid)["state"] == "LIVE"
            call.cancel()
            st, waited = _status_once_not_live(served, sid, INTERRUPT_WAIT_S + 30)
            assert st["state"] == "INTERRUPTED", f"still {st['state']} after {waited:.0f} s"
    finally:
        done.set()
    assert st["last_frame_index"] == n - 1  # every frame pushed before the stop was recorded
    items = _run_stream(client, rec, realtime=False, max_frames=n + 30, session_id=sid, resume=True)
    assert items[0].message.next_frame_index == n
    assert list(_record_indices(served, sid)) == list(range(n + 30))
    assert items[-1].message.state == pb.SessionStatus.CLOSED


def test_close_message_closes_at_once_and_an_input_ending_without_it_interrupts(stub, served):
    """`close` closes the session cleanly without waiting for the half-close (here the client
    never half-closes); with `close_explicitly` an input that ends without `close` is a client
    that went away: INTERRUPTED (resumable) and CANCELLED, never CLOSED; without the flag a
    bare half-close still closes cleanly (older clients)."""
    from service.ingest import record_status

    rec = _park(served, 2)
    n = 30
    done = threading.Event()

    def held_open():
        yield _open_msg(rec, "said-close", close_explicitly=True)
        for j in range(n):
            yield _frames_msg(rec, j)
        yield pb.StreamRequest(close=pb.SessionClose())
        done.wait(120)  # no half-close

    call = stub.StreamSession(held_open(), timeout=120)
    try:
        last = None
        for r in call:
            last = r
            if r.WhichOneof("kind") == "closed":
                break
        assert last is not None and last.WhichOneof("kind") == "closed"
        assert last.closed.state == pb.SessionStatus.CLOSED
        assert record_status(served.records / "said-close")["state"] == "CLOSED"
    finally:
        done.set()
        call.cancel()

    msgs = [_open_msg(rec, "no-close", close_explicitly=True)]
    out, code, msg = _raw_stream(stub, msgs + [_frames_msg(rec, j) for j in range(n)])
    assert code == grpc.StatusCode.CANCELLED and "close" in msg, (code, msg)
    assert not any(r.WhichOneof("kind") == "closed" for r in out)
    st = record_status(served.records / "no-close")
    assert st["state"] == "INTERRUPTED" and st["last_frame_index"] == n - 1

    out, code, msg = _raw_stream(
        stub, [_open_msg(rec, "bare")] + [_frames_msg(rec, j) for j in range(n)]
    )
    assert code == grpc.StatusCode.OK, (code, msg)
    assert out[-1].WhichOneof("kind") == "closed"
    assert record_status(served.records / "bare")["state"] == "CLOSED"


def test_ingestion_actor_restart_mid_stream_keeps_every_frame(client, served):
    rec = _park(served, 0)
    n = 300
    s = client.stream(rec, realtime=True, speed=2.0, max_frames=n, session_id="phoenix")
    killed = {}
    preds = []
    for it in s:
        if it.kind == "prediction":
            preds.append(it.message.frame_index)
            if len(preds) == 60 and not killed:
                pid = _session_pid("phoenix")
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
    assert killed
    assert s.stats().error is None
    closed = s.stats().closed
    assert closed is not None and closed.state == pb.SessionStatus.CLOSED
    assert list(_record_indices(served, "phoenix")) == list(range(n))
    assert preds[-1] == n - 1 and len(preds) >= n - 10


def test_metrics_are_served(served, client):
    rec = _park(served)
    v, t = _window(rec, 150, 17)
    client.decode(rec.session_id, rec.unit_ids, v, t)
    body = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10)
    text = body.read().decode()
    for name in (
        "cortexlens_frame_to_explanation_seconds",
        "cortexlens_queue_wait_seconds",
        "cortexlens_model_seconds",
        "cortexlens_batch_size",
        "cortexlens_frames_received_total",
        "cortexlens_active_sessions",
        "cortexlens_model_version_info",
        "cortexlens_sae_unit_active_total",
    ):
        assert name in text, name
    assert f'version="{served.version}"' in text


def test_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        st = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(st.ServerReflectionInfo(iter([req]), timeout=30)))
    names = {s.name for s in resp.list_services_response.service}
    assert "cortexlens.v1.Decoder" in names and "grpc.health.v1.Health" in names


def test_hot_swap_to_another_version_mid_stream(client, served):
    from service import server

    v2 = served.registry.publish(served.registry.open("default").path, "default")
    rec = _park(served, 2)
    s = client.stream(rec, realtime=True, speed=2.0, max_frames=240, session_id="swap")
    swapped = threading.Event()
    events, versions = [], []

    def swap():
        server.deploy(server.set_model(served.cfg, version=v2), log=None)
        swapped.set()

    th = None
    for it in s:
        if it.kind == "prediction":
            versions.append(it.message.model.version)
            if len(versions) == 30 and th is None:
                th = threading.Thread(target=swap)
                th.start()
        elif it.kind == "event":
            events.append(it.message)
    th.join(120)
    assert swapped.is_set()
    assert s.stats().error is None
    assert len(versions) == 240  # nothing lost across the swap
    assert versions[0] == served.version and versions[-1] == v2
    assert any(e.kind == pb.StreamEvent.MODEL_CHANGED for e in events)
    # unpin: follow the registry's current version (v1) again
    server.deploy(server.set_model(served.cfg), log=None)
    _wait_version(client, served, served.version)


def _wait_version(client, served, version, timeout_s=30.0):
    rec = _park(served)
    v, t = _window(rec, 120, 17)
    deadline = time.time() + timeout_s
    while True:
        got = client.decode(rec.session_id, rec.unit_ids, v, t).model.version
        if got == version or time.time() > deadline:
            return got
        time.sleep(0.2)


def test_promotion_and_rollback_swap_the_serving_model_in_place(client, served):
    reg = served.registry
    v1 = reg.current("default")
    v3 = reg.publish(reg.open("default").path, "default")
    reg.promote("default", v3, reason="test")
    assert _wait_version(client, served, v3) == v3  # replicas follow the current pointer
    back = client.rollback(version=v1)  # one call, over gRPC
    assert back.version == v1 and reg.current("default") == v1
    assert _wait_version(client, served, v1) == v1


# -- retraining under load (runs last: it promotes new versions) -----------------------------------
def test_record_retrain_promote_while_streaming_then_refuse_and_roll_back(client, served):
    """Issue 7: record a session (with its trials) through the stream, fine-tune on it with 2 Ray
    Train workers, promote, and keep streaming across the swap: no failed request, no lost
    frame, the version change visible in the responses. Then a worse candidate is refused with
    its numbers, and a rollback restores the previous version."""
    from service.client import Client
    from service.home import simulated_recording

    reg = served.registry
    v_before = reg.current("default")
    # 1. a session the model has never seen: recorded (with trials), not decoded
    new = simulated_recording("newsim", n_cells=48, frame_rate=15.0, minutes=4.0, seed=11)
    items = _run_stream(client, new, realtime=False, session_id="newsim")
    assert items[0].message.decoding is False
    assert items[-1].message.frames_recorded == new.n_frames
    trials_file = served.records / "newsim" / "trials.jsonl"
    assert len(trials_file.read_text().splitlines()) == len(new.trials.start)

    # 2. meanwhile a known session keeps streaming, stream after stream, through the job
    stop = threading.Event()
    runs: list[dict] = []

    def keep_streaming():
        rec = _park(served, 1)
        k = 0
        with Client(served.target, timeout_s=60) as c:
            while not stop.is_set():
                sid = f"live-{k}"
                s = c.stream(rec, realtime=True, speed=2.0, max_frames=160, session_id=sid)
                got = [
                    (i.message.frame_index, i.message.model.version)
                    for i in s
                    if i.kind == "prediction"
                ]
                st = s.stats()
                runs.append({"sid": sid, "preds": got, "error": st.error, "closed": st.closed})
                k += 1

    th = threading.Thread(target=keep_streaming)
    th.start()
    try:
        job = client.start_job("finetune", ["newsim"], workers=2, epochs=3)
        assert job.state in ("QUEUED", "RUNNING")
        states = [j for j in client.watch_job(job.job_id, timeout_s=900)]
        final = states[-1]
        assert final.state == "SUCCEEDED", (final.state, final.message)
        assert final.candidate_version and final.parent_version == v_before
        assert final.decision
        result = __import__("json").loads(final.result_json)
        print("\nfinetune job:", final.decision, "| durations:", result.get("durations_s"))
        if final.promoted:
            assert reg.current("default") == final.candidate_version
            _wait_version(client, served, final.candidate_version)
            time.sleep(6)  # a few more frames on the new version
    finally:
        stop.set()
        th.join(300)
    assert runs
    for r in runs:  # zero failed requests, zero lost frames
        assert r["error"] is None, r
        assert [f for f, _ in r["preds"]] == list(range(160)), r["sid"]
        assert list(_record_indices(served, r["sid"])) == list(range(160))
    versions = [v for r in runs for _, v in r["preds"]]
    assert versions[0] == v_before
    if final.promoted:
        assert versions[-1] == final.candidate_version  # the swap is visible in the responses
        # the new session is now decoded by the promoted version
        again = _run_stream(client, new, realtime=False, max_frames=60, session_id="newsim-again")
        assert again[0].message.decoding is True
        assert all(
            i.message.model.version == final.candidate_version
            for i in again
            if i.kind == "prediction"
        )

    # 3. a worse candidate (impossible gate) is refused with its numbers
    bad = client.start_job("sae_refit", ["newsim"], min_accuracy_delta=1.0)
    final_bad = list(client.watch_job(bad.job_id, timeout_s=600))[-1]
    assert final_bad.state == "SUCCEEDED", (final_bad.state, final_bad.message)
    assert final_bad.promoted is False
    assert "refused" in final_bad.decision.lower() or "not promoted" in final_bad.decision.lower()
    assert any(ch.isdigit() for ch in final_bad.decision)
    current = reg.current("default")
    assert current != final_bad.candidate_version
    jobs = {j.job_id for j in client.jobs()}
    assert {job.job_id, bad.job_id} <= jobs

    # 4. rollback to the version served before the job, in one call
    back = client.rollback(version=v_before)
    assert back.version == v_before
    assert _wait_version(client, served, v_before) == v_before
