"""Security for a lab network, through the real Serve application on loopback: the TLS front
(`service.tls_front`, started and stopped by `service.server`), the bearer token on every RPC,
health left open, the message-size limit through TLS, and the per-session quotas (frame rate
relative to the declared rate, record size, trials), driven by real gRPC clients.

One application for the module: token set, TLS front on a free port with a certificate made
here (``cryptography``; SAN 127.0.0.1 and localhost), small quotas. Quota streams use cells the
model does not know (recorded, not decoded: cheap) and no fsync.
"""

from __future__ import annotations

import re
import socket
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import Client, CortexlensError
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg
from tests.service.conftest import free_port, published_home
from tests.service.test_tls_front import make_cert

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "lab-7f3c9e-token"
RATE_FACTOR, BURST_S = 2.0, 1.0  # 30 Hz declared: 60 frames/s after a burst of 60 frames
MAX_RECORD_BYTES = 8000  # 50 frames of 40 cells
MAX_TRIALS = 5
C = grpc.StatusCode


@pytest.fixture(scope="module")
def secured(service_home, tmp_path_factory):
    from types import SimpleNamespace

    from service import server

    home, reg, v1 = published_home(service_home, tmp_path_factory, "secured_home")
    crt, key = make_cert("127.0.0.1", dns=("localhost",), ips=("127.0.0.1",))
    (home / "tls.crt").write_bytes(crt)
    (home / "tls.key").write_bytes(key)
    grpc_port, metrics_port, tls_port = free_port(), free_port(), free_port()
    cfg = server.load_config(
        grpc_port=grpc_port,
        http_port=free_port(),
        args={
            "home": str(home),
            "metrics_port": metrics_port,
            "token": TOKEN,
            "ingest": {"max_block_frames": 16, "record_sync": False},
            "quotas": {
                "max_rate_factor": RATE_FACTOR,
                "rate_burst_s": BURST_S,
                "max_record_bytes": MAX_RECORD_BYTES,
                "max_trials": MAX_TRIALS,
            },
            "tls": {"cert": str(home / "tls.crt"), "key": str(home / "tls.key"), "port": tls_port},
        },
    )
    server.start(cfg, num_cpus=2, log=None)
    front = server.tls_front()
    try:
        assert front is not None and front.address == f"127.0.0.1:{tls_port}"
        yield SimpleNamespace(
            plain=f"127.0.0.1:{grpc_port}",
            tls=f"127.0.0.1:{tls_port}",
            tls_port=tls_port,
            crt=crt,
            cfg=cfg,
            home=home,
            version=v1,
            metrics_port=metrics_port,
            recordings={r.session_id: r for r in service_home.recordings},
        )
    finally:
        server.stop()
    # server.stop() took the TLS front down with the application
    assert server.tls_front() is None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", tls_port)) != 0, "the TLS port is still open"


def _tls_channel(secured, **options) -> grpc.Channel:
    opts = [(k, v) for k, v in options.items()]
    return grpc.secure_channel(secured.tls, grpc.ssl_channel_credentials(secured.crt), opts)


def _park(secured):
    return [r for k, r in secured.recordings.items() if k != "sim512"][0]


def _decode_req(rec, n_frames=17, values: bytes | None = None) -> pb.DecodeRequest:
    v = np.ascontiguousarray(rec.traces[100 - n_frames : 100], dtype="<f4")
    return pb.DecodeRequest(
        session_id=rec.session_id,
        unit_ids=list(rec.unit_ids),
        window=pb.FrameBlock(
            n_frames=n_frames,
            n_cells=rec.n_units,
            values=v.tobytes() if values is None else values,
            timestamps=list(rec.timestamps[100 - n_frames : 100]),
        ),
    )


def _metric(secured, name: str, **labels) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{secured.metrics_port}/metrics", timeout=10)
    text = body.read().decode()
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{lab}}}" if lab else name
    m = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- TLS front + token -----------------------------------------------------------------------------
def test_tls_front_serves_the_application_with_the_token(secured):
    rec = _park(secured)
    for target in (secured.tls, f"localhost:{secured.tls_port}"):
        with Client(target, root_certificates=secured.crt, token=TOKEN, timeout_s=30) as c:
            assert c.health() == "SERVING"
            assert c.model().model.version == secured.version
            p = c.decode(rec.session_id, rec.unit_ids, rec.traces[83:100], rec.timestamps[83:100])
            assert p.model.version == secured.version and p.tasks
    # the same answer as on the plaintext port, and Serve's trailing metadata came through
    with _tls_channel(secured) as ch:
        md = (("authorization", f"Bearer {TOKEN}"),)
        resp, call = pbg.DecoderStub(ch).Decode.with_call(_decode_req(rec), metadata=md, timeout=30)
        assert "request_id" in dict(call.trailing_metadata())
    with grpc.insecure_channel(secured.plain) as ch:
        direct = pbg.DecoderStub(ch).Decode(_decode_req(rec), metadata=md, timeout=30)
    for a, b in zip(resp.prediction.tasks, direct.prediction.tasks, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
    # plaintext against the TLS port, or TLS trusting another certificate: no connection
    other, _ = make_cert("127.0.0.1")
    for c in (
        Client(secured.tls, token=TOKEN, timeout_s=3),
        Client(secured.tls, root_certificates=other, token=TOKEN, timeout_s=3),
    ):
        with c, pytest.raises(CortexlensError) as ei:
            c.model()
        assert ei.value.code == C.UNAVAILABLE


def _kw(md) -> dict:
    return {"metadata": md, "timeout": 60}


def _rpcs(rec):
    """Every cortexlens.v1 RPC: (name, call(decoder, retraining, metadata) -> None, expected
    status with the right token). Calls that would change state are made harmless (an unknown
    job, a rollback with nothing to roll back to, a stream whose open is invalid)."""

    def stream(d, r, md):
        open_ = pb.SessionOpen(session_id="auth-probe", unit_ids=["a", "b"], frame_rate_hz=0)
        list(d.StreamSession(iter([pb.StreamRequest(open=open_)]), metadata=md, timeout=30))

    return [
        ("Decode", lambda d, r, md: d.Decode(_decode_req(rec), metadata=md, timeout=30), C.OK),
        ("GetModel", lambda d, r, md: d.GetModel(pb.GetModelRequest(), **_kw(md)), C.OK),
        ("ListUnits", lambda d, r, md: d.ListUnits(pb.ListUnitsRequest(), **_kw(md)), C.OK),
        (
            "GetSession",
            lambda d, r, md: d.GetSession(pb.GetSessionRequest(session_id="nope"), **_kw(md)),
            C.NOT_FOUND,
        ),
        ("StreamSession", stream, C.INVALID_ARGUMENT),
        (
            "StartJob",
            lambda d, r, md: r.StartJob(pb.StartJobRequest(kind="bogus"), metadata=md, timeout=60),
            C.INVALID_ARGUMENT,
        ),
        ("GetJob", lambda d, r, md: r.GetJob(pb.JobRef(job_id="nope"), **_kw(md)), C.NOT_FOUND),
        (
            "WatchJob",
            lambda d, r, md: list(r.WatchJob(pb.JobRef(job_id="nope"), metadata=md, timeout=30)),
            C.NOT_FOUND,
        ),
        ("ListJobs", lambda d, r, md: r.ListJobs(pb.ListJobsRequest(), **_kw(md)), C.OK),
        (
            "CancelJob",
            lambda d, r, md: r.CancelJob(pb.JobRef(job_id="nope"), **_kw(md)),
            C.NOT_FOUND,
        ),
        (
            "Rollback",
            lambda d, r, md: r.Rollback(pb.RollbackRequest(), **_kw(md)),
            C.FAILED_PRECONDITION,  # one promoted version: nothing to roll back to
        ),
    ]


def _status(fn, *args) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return C.OK, ""


@pytest.mark.parametrize("transport", ["tls", "plain"])
def test_every_rpc_needs_the_right_token(secured, transport):
    """Missing, malformed or wrong token: UNAUTHENTICATED with a message naming the fix; the
    right one (either scheme case): the RPC's own answer. On the TLS front and on Serve's own
    plaintext port alike (the check is in the application)."""
    rec = _park(secured)
    before = _metric(secured, "cortexlens_auth_refusals_total", reason="wrong")
    ch = _tls_channel(secured) if transport == "tls" else grpc.insecure_channel(secured.plain)
    with ch:
        d, r = pbg.DecoderStub(ch), pbg.RetrainingStub(ch)
        rpcs = _rpcs(rec)
        assert len(rpcs) == 11
        for name, fn, expected in rpcs:
            for md, why in (
                ((), "missing"),
                ((("authorization", TOKEN),), "missing"),  # no scheme
                ((("authorization", f"Basic {TOKEN}"),), "missing"),
                ((("authorization", "Bearer "),), "missing"),
                ((("authorization", "Bearer wrong-token"),), "wrong"),
                ((("authorization", f"Bearer {TOKEN[:-1]}"),), "wrong"),  # a prefix
                ((("authorization", f"Bearer {TOKEN}x"),), "wrong"),
            ):
                code, details = _status(fn, d, r, md)
                assert code == C.UNAUTHENTICATED, (name, md, code, details)
                assert f"{why} bearer token" in details and "authorization: Bearer" in details
            for scheme in ("Bearer", "bearer"):
                md = (("authorization", f"{scheme} {TOKEN}"),)
                code, details = _status(fn, d, r, md)
                assert code == expected, (name, code, details)
    assert _metric(secured, "cortexlens_auth_refusals_total", reason="wrong") == before + 33


def test_health_and_reflection_are_open_without_a_token(secured):
    """Policy: grpc.health.v1 Check/Watch and server reflection need no token (probes cannot
    carry one; they reveal SERVING/NOT_SERVING and the public schema only)."""
    with _tls_channel(secured) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        ok = health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=30).status == ok
        svc = health_pb2.HealthCheckRequest(service="cortexlens.v1.Decoder")
        assert h.Check(svc, timeout=30).status == ok
        watch = h.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == ok  # a server-streaming call through the front
        watch.cancel()
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=30))
        names = {s.name for s in resp.list_services_response.service}
        assert {"cortexlens.v1.Decoder", "cortexlens.v1.Retraining"} <= names


def test_message_size_limit_through_the_tls_front(secured):
    """A message above 64 MiB is refused with RESOURCE_EXHAUSTED through TLS too (the client
    here would send it: the refusal is the server's), and the server carries on."""
    rec = _park(secured)
    md = (("authorization", f"Bearer {TOKEN}"),)
    big = _decode_req(rec, values=b"\x00" * (65 * 1024 * 1024))
    with _tls_channel(secured, **{"grpc.max_send_message_length": -1}) as ch:
        stub = pbg.DecoderStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Decode(big, metadata=md, timeout=60)
        assert ei.value.code() == C.RESOURCE_EXHAUSTED, ei.value.details()
        del big
        assert stub.Decode(_decode_req(rec), metadata=md, timeout=30).prediction.tasks


# -- per-session quotas ----------------------------------------------------------------------------
def _unknown_cells(prefix: str, n_frames: int, n_cells: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    traces = rng.normal(size=(n_frames, n_cells)).astype(np.float32)
    return dict(
        traces=traces,
        timestamps=10.0 + np.arange(n_frames) / 30.0,
        unit_ids=[f"{prefix}/cell{j}" for j in range(n_cells)],
        frame_rate_hz=30.0,
    )


def _client(secured) -> Client:
    return Client(secured.tls, root_certificates=secured.crt, token=TOKEN, timeout_s=30)


def test_a_stream_flooding_far_above_its_declared_rate_is_refused(secured):
    before = _metric(secured, "cortexlens_quota_refusals_total", quota="frame_rate")
    with _client(secured) as c:
        # blocks of 15 frames (the fixture's largest is 16): four fit the 60-frame burst and the
        # fifth is over the ceiling unless the server took > 1/4 s per block. (With one frame a
        # message, a server slowed to > 1/60 s per message by a busy machine refills the bucket
        # as fast as the client drains it and the flood is no flood: it failed so once in a
        # CI-like run.)
        kw = _unknown_cells("flood", 400, 2)
        s = c.stream(session_id="q-flood", realtime=False, block_frames=15, **kw)
        with pytest.raises(CortexlensError) as ei:
            list(s)
        assert ei.value.code == C.RESOURCE_EXHAUSTED
        assert "faster than the 30 Hz it declared" in ei.value.details
        assert "max_rate_factor" in ei.value.details
        st = c.session("q-flood")
    # the burst (60 frames) got in, the flood did not
    assert 60 <= st.frames_recorded < 400, st.frames_recorded
    assert st.state == pb.SessionStatus.INTERRUPTED  # resumable, at a sane pace
    after = _metric(secured, "cortexlens_quota_refusals_total", quota="frame_rate")
    assert after == before + 1


def test_a_stream_paced_within_its_ceiling_is_accepted(secured):
    """90 frames at 1.5x the declared 30 Hz (2 s): more than the 60-frame burst, so they pass
    only because the allowance refills at 2 x 30 frames/s."""
    with _client(secured) as c:
        kw = _unknown_cells("paced", 90, 2, seed=1)
        items = list(c.stream(session_id="q-paced", realtime=True, speed=1.5, **kw))
    assert items[-1].kind == "closed", [i.kind for i in items][-3:]
    closed = items[-1].message
    assert closed.state == pb.SessionStatus.CLOSED and closed.frames_recorded == 90


def test_record_quota_stops_a_session_at_its_size_and_after_resume(secured):
    before = _metric(secured, "cortexlens_quota_refusals_total", quota="record_bytes")
    kw = _unknown_cells("rec", 80, 40, seed=2)  # 160 bytes a frame: the quota is 50 frames
    with _client(secured) as c:
        with pytest.raises(CortexlensError) as ei:
            list(c.stream(session_id="q-record", realtime=False, **kw))
        assert ei.value.code == C.RESOURCE_EXHAUSTED
        assert "record quota" in ei.value.details and "max_record_bytes" in ei.value.details
        assert c.session("q-record").frames_recorded == 50
        # a resumed stream counts what the record holds already
        with pytest.raises(CortexlensError) as ei:
            list(c.stream(session_id="q-record", realtime=False, resume=True, **kw))
        assert ei.value.code == C.RESOURCE_EXHAUSTED and "50 frames recorded" in ei.value.details
        assert c.session("q-record").frames_recorded == 50
    after = _metric(secured, "cortexlens_quota_refusals_total", quota="record_bytes")
    assert after == before + 2


def _trials_msg(n: int, t0: float = 10.0) -> pb.StreamRequest:
    return pb.StreamRequest(
        trials=pb.Trials(
            trials=[pb.Trial(start=t0 + i, end=t0 + i + 0.5, direction=45.0) for i in range(n)]
        )
    )


def _raw_stream(stub, msgs, md):
    try:
        return list(stub.StreamSession(iter(msgs), metadata=md, timeout=60)), None
    except grpc.RpcError as e:
        return None, e


def test_trials_quota_counts_every_stream_of_a_session(secured):
    kw = _unknown_cells("trials", 4, 2, seed=3)
    ids, v = kw["unit_ids"], kw["traces"]
    md = (("authorization", f"Bearer {TOKEN}"),)

    def open_(resume=False):
        return pb.StreamRequest(
            open=pb.SessionOpen(
                session_id="q-trials", unit_ids=ids, frame_rate_hz=30.0, resume=resume
            )
        )

    frames = pb.StreamRequest(
        frames=pb.Frames(
            first_frame_index=0,
            block=pb.FrameBlock(
                n_frames=4, n_cells=2, values=v.tobytes(), timestamps=list(kw["timestamps"])
            ),
        )
    )
    before = _metric(secured, "cortexlens_quota_refusals_total", quota="trials")
    trials_file = secured.home / "sessions" / "q-trials" / "trials.jsonl"
    with _tls_channel(secured) as ch:
        stub = pbg.DecoderStub(ch)
        _, err = _raw_stream(stub, [open_(), frames, _trials_msg(3), _trials_msg(3)], md)
        assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
        assert "max_trials" in err.details() and "6 trials" in err.details()
        assert len(trials_file.read_text().splitlines()) == 3
        # resumed: the session already holds 3 of its 5
        _, err = _raw_stream(stub, [open_(True), _trials_msg(3, 20.0)], md)
        assert err is not None and err.code() == C.RESOURCE_EXHAUSTED, err
        out, err = _raw_stream(stub, [open_(True), _trials_msg(2, 20.0)], md)
        assert err is None and out[-1].WhichOneof("kind") == "closed"
    assert len(trials_file.read_text().splitlines()) == 5
    after = _metric(secured, "cortexlens_quota_refusals_total", quota="trials")
    assert after == before + 2
