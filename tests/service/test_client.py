"""`service.client`, `cortexlens stream` and the closed-loop example against a real gRPC server.

The server here is a small test servicer (`EchoDecoder`) on 127.0.0.1: it really parses the
FrameBlock bytes (little-endian float32, row-major), refuses what the real service refuses
(byte length, unit count, NaN/Inf, missing bearer token) with the same status codes, and answers
every decoded frame with a prediction whose unit activations are that frame's values, so that
packing, pacing, latency bookkeeping, error mapping, metadata and shutdown are exercised end to
end. Integration tests against the Ray Serve application live elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.client import (
    Client,
    CortexlensError,
    StreamStats,
    explanation_text,
    pack_frames,
)
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg
from tests.service.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DIRECTIONS = [str(d) for d in range(0, 360, 45)]

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------------
# The test server


class EchoDecoder(pbg.DecoderServicer):
    """A real gRPC servicer that parses frames and echoes them back as predictions.

    Prediction of frame i: direction class = argmax of the frame's values mod 8, the top-3 cells
    by |value| as "SAE units" (unit = column, activation = attribution = the value), unexplained
    0.25; decoded frames are those with ``index % stride == 0``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        delay_s: float = 0.0,
        abort_after_frames: int | None = None,
        resume_from: int = 0,
        swap_model_at: int | None = None,
    ) -> None:
        self.token = token
        self.delay_s = delay_s
        self.abort_after_frames = abort_after_frames
        self.resume_from = resume_from
        self.swap_model_at = swap_model_at
        self.version = "v0001"
        self.opens: list[pb.SessionOpen] = []
        self.blocks: list[tuple[int, int, float]] = []  # (first index, n frames, perf_counter)
        self.metadata: list[dict[str, str]] = []
        self.sessions: dict[str, pb.SessionStatus] = {}
        self.closes: list[str] = []  # sessions whose client sent `close`
        self.stream_done = threading.Event()  # the StreamSession RPC terminated (any reason)

    # -- helpers ------------------------------------------------------------------------------
    def _auth(self, context: grpc.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.metadata.append(md)
        if self.token is not None and md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    @staticmethod
    def _parse(block: pb.FrameBlock, n_cells: int, context: grpc.ServicerContext) -> np.ndarray:
        if block.n_cells != n_cells:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"block has {block.n_cells} cells, the session has {n_cells} unit ids",
            )
        want = 4 * block.n_frames * block.n_cells
        if len(block.values) != want:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"values has {len(block.values)} bytes, expected {want}",
            )
        if len(block.timestamps) != block.n_frames:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one timestamp per frame expected")
        arr = np.frombuffer(block.values, dtype="<f4").reshape(block.n_frames, block.n_cells)
        if not np.isfinite(arr).all():
            f = int(np.argwhere(~np.isfinite(arr))[0][0])
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"NaN/Inf in frame {f} of the block")
        return arr

    def _model(self) -> pb.ModelRef:
        return pb.ModelRef(name="echo", version=self.version, label_set="test")

    def _prediction(self, session_id: str, index: int, t: float, row: np.ndarray) -> pb.Prediction:
        cls = int(np.argmax(row)) % 8
        probs = np.full(8, 0.5 / 7, dtype=np.float32)
        probs[cls] = 0.5
        top = np.argsort(-np.abs(row), kind="stable")[:3]
        units = [
            pb.UnitExplanation(
                unit=int(j),
                activation=float(row[j]),
                attribution=float(row[j]),
                label=f"cell {j}" if j % 2 == 0 else "",
            )
            for j in top
        ]
        task = pb.TaskPrediction(
            task="direction",
            predicted_class=cls,
            predicted_label=DIRECTIONS[cls],
            class_names=DIRECTIONS,
            probabilities=probs.tolist(),
            logits=np.log(probs).tolist(),
            units=units,
            unexplained=0.25,
        )
        return pb.Prediction(
            session_id=session_id,
            frame_index=index,
            timestamp=t,
            model=self._model(),
            attribution_method="echo",
            tasks=[task],
            timings=pb.Timings(queue_ms=0.0, model_ms=0.0, server_total_ms=0.0, batch_size=1),
            n_cells_used=row.shape[0],
        )

    # -- RPCs ---------------------------------------------------------------------------------
    def Decode(self, request, context):
        self._auth(context)
        arr = self._parse(request.window, len(request.unit_ids), context)
        last = arr.shape[0] - 1
        ts = request.window.timestamps[last]
        return pb.DecodeResponse(prediction=self._prediction(request.session_id, last, ts, arr[-1]))

    def GetModel(self, request, context):
        self._auth(context)
        if request.model not in ("", "echo"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.model}'")
        return pb.ModelInfo(
            model=self._model(),
            tasks=[pb.TaskInfo(name="direction", class_names=DIRECTIONS)],
            n_sae_units=64,
            attribution_method="echo",
            default_top_m=3,
        )

    def ListUnits(self, request, context):
        self._auth(context)
        units = []
        for u in range(8):
            labels = []
            if u % 2 == 0 and request.variable in ("", "direction"):
                labels.append(pb.UnitLabel(variable="direction", text=f"cell {u}", statistic=u))
            if labels or not request.variable:
                units.append(pb.UnitInfo(unit=u, labels=labels))
        return pb.ListUnitsResponse(model=self._model(), units=units)

    def GetSession(self, request, context):
        self._auth(context)
        st = self.sessions.get(request.session_id)
        if st is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session '{request.session_id}'")
        return st

    def StreamSession(self, request_iterator, context):
        context.add_callback(self.stream_done.set)
        self._auth(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be open")
        op = first.open
        self.opens.append(op)
        sid, n_cells = op.session_id, len(op.unit_ids)
        stride = op.decode_stride or 1
        expected = self.resume_from if op.resume else 0
        st = pb.SessionStatus(session_id=sid, state=pb.SessionStatus.LIVE, n_cells=n_cells)
        self.sessions[sid] = st
        yield pb.StreamResponse(
            accepted=pb.SessionAccepted(
                session_id=sid,
                model=self._model(),
                next_frame_index=expected,
                decode_stride=stride,
                window_frames=16,
                decoding=True,
                n_cells_known=n_cells,
                session_known=True,
            )
        )
        for req in request_iterator:
            if req.WhichOneof("kind") == "close":  # the client's end of the session
                self.closes.append(sid)
                break
            if req.WhichOneof("kind") != "frames":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "open sent twice")
            fr = req.frames
            arr = self._parse(fr.block, n_cells, context)
            i0, n = int(fr.first_frame_index), arr.shape[0]
            self.blocks.append((i0, n, time.perf_counter()))
            st.frames_received += n
            if i0 > expected:
                st.frames_missing += i0 - expected
                yield pb.StreamResponse(
                    event=pb.StreamEvent(
                        kind=pb.StreamEvent.GAP, first_frame_index=expected, last_frame_index=i0 - 1
                    )
                )
            for k in range(n):
                idx = i0 + k
                if idx < expected:
                    st.duplicates_dropped += 1
                    continue
                if self.swap_model_at is not None and idx == self.swap_model_at:
                    self.version = "v0002"
                    yield pb.StreamResponse(
                        event=pb.StreamEvent(
                            kind=pb.StreamEvent.MODEL_CHANGED,
                            first_frame_index=idx,
                            last_frame_index=idx,
                            message="echo v0001 -> v0002",
                        )
                    )
                if idx % stride == 0:
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    st.frames_decoded += 1
                    pred = self._prediction(sid, idx, fr.block.timestamps[k], arr[k])
                    yield pb.StreamResponse(prediction=pred)
            expected = max(expected, i0 + n)
            st.last_frame_index = expected - 1
            if self.abort_after_frames is not None and st.frames_received >= (
                self.abort_after_frames
            ):
                st.state = pb.SessionStatus.INTERRUPTED
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "test server: refusing frames")
        st.state = pb.SessionStatus.CLOSED
        st.frames_recorded = st.frames_received - st.duplicates_dropped
        st.model.CopyFrom(self._model())
        yield pb.StreamResponse(closed=st)


def _start_server(servicer: EchoDecoder, credentials=None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=6))
    pbg.add_DecoderServicer_to_server(servicer, server)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set("cortexlens.v1.Decoder", health_pb2.HealthCheckResponse.SERVING)
    hs.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[EchoDecoder, str]]]:
    """serve(**servicer_options) -> (servicer, target); every server stops at teardown."""
    servers: list[grpc.Server] = []

    def start(credentials=None, **kw) -> tuple[EchoDecoder, str]:
        svc = EchoDecoder(**kw)
        server, target = _start_server(svc, credentials)
        servers.append(server)
        return svc, target

    yield start
    for s in servers:
        s.stop(grace=None).wait(5)


def _traces(n_frames: int, n_cells: int, rate: float = 30.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    traces = rng.normal(size=(n_frames, n_cells)).astype(np.float32)
    ts = 100.0 + np.arange(n_frames) / rate
    unit_ids = [f"c{j}" for j in range(n_cells)]
    return traces, ts, unit_ids


def _stream_kw(n_frames=40, n_cells=10, rate=30.0, seed=0, **kw):
    traces, ts, unit_ids = _traces(n_frames, n_cells, rate, seed)
    return dict(traces=traces, timestamps=ts, unit_ids=unit_ids, session_id="s1", **kw), traces


# --------------------------------------------------------------------------------------------
# Packing and explanations


def test_pack_frames_is_little_endian_row_major():
    v = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian input is converted
    b = pack_frames(v, [0.0, 0.1])
    assert (b.n_frames, b.n_cells) == (2, 3)
    assert b.values == np.arange(6, dtype="<f4").tobytes()
    assert list(b.timestamps) == [0.0, 0.1]
    with pytest.raises(ValueError, match="2-D"):
        pack_frames(np.zeros(3), [0.0])
    with pytest.raises(ValueError, match="timestamps"):
        pack_frames(np.zeros((2, 3)), [0.0])


def _task(units, unexplained=0.12, task="direction", cls=2, label="90"):
    probs = [0.0] * 8
    probs[cls] = 0.71
    return pb.TaskPrediction(
        task=task,
        predicted_class=cls,
        predicted_label=label,
        class_names=DIRECTIONS,
        probabilities=probs,
        units=[pb.UnitExplanation(unit=u, attribution=a, label=lab) for u, a, lab in units],
        unexplained=unexplained,
    )


def test_explanation_text():
    t = _task([(12, 1.32, "direction 90°, OSI 0.71"), (3, -0.40, ""), (7, 0.05, ""), (9, 0.03, "")])
    assert explanation_text(t) == (
        'direction=90° p=0.71 | u12 +1.32 "direction 90°, OSI 0.71" | u3 -0.40 | u7 +0.05 | ... '
        "| rest +0.15"
    )
    # all units shown: no ellipsis, rest is the server's unexplained part
    assert explanation_text(t, n=4).endswith("u9 +0.03 | rest +0.12")
    # the parts add up to the logit
    assert explanation_text(t, n=1) == (
        'direction=90° p=0.71 | u12 +1.32 "direction 90°, OSI 0.71" | ... | rest -0.20'
    )
    g = _task([], unexplained=-1.5, task="genetic", cls=0, label="Pvalb")
    assert explanation_text(g) == "genetic=Pvalb p=0.71 | rest -1.50"
    # no label: the class name is used
    assert explanation_text(_task([], label="")).startswith("direction=90° p=0.71")


# --------------------------------------------------------------------------------------------
# Unary calls


def test_unary_calls_round_trip(serve):
    svc, target = serve()
    traces, ts, unit_ids = _traces(5, 12)
    with Client(target, token="tok", metadata={"application": "cortexlens"}) as c:
        assert c.health() == "SERVING"
        assert c.health("cortexlens.v1.Decoder") == "SERVING"
        assert c.health("draining") == "NOT_SERVING"
        p = c.decode("s1", unit_ids, traces, ts, top_m=3, frame_rate_hz=30.0)
        info = c.model()
        units = c.units(variable="direction")
    # the server parsed the exact float32 values of the last frame
    assert p.session_id == "s1" and p.frame_index == 4 and p.timestamp == ts[-1]
    row = traces[-1]
    got = {u.unit: u.activation for u in p.tasks[0].units}
    assert len(got) == 3
    for j, a in got.items():
        assert a == row[j]  # bit-exact through the bytes
    assert p.tasks[0].predicted_class == int(np.argmax(row)) % 8
    assert info.model.version == "v0001" and info.tasks[0].class_names == DIRECTIONS
    assert [u.unit for u in units.units] == [0, 2, 4, 6]
    # the token and the extra metadata went with every call
    decoder_calls = [m for m in svc.metadata]
    assert len(decoder_calls) == 3
    for m in decoder_calls:
        assert m["authorization"] == "Bearer tok" and m["application"] == "cortexlens"


def test_unary_errors_carry_the_status(serve):
    svc, target = serve()
    traces, ts, unit_ids = _traces(4, 6)
    bad = traces.copy()
    bad[2, 3] = np.nan
    with Client(target) as c:
        with pytest.raises(CortexlensError) as ei:
            c.decode("s1", unit_ids, bad, ts)
        e = ei.value
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.code_name == "INVALID_ARGUMENT"
        assert e.details == "NaN/Inf in frame 2 of the block"
        assert str(e) == "Decode: INVALID_ARGUMENT: NaN/Inf in frame 2 of the block"
        with pytest.raises(CortexlensError) as ei:
            c.session("nope")
        assert ei.value.code == grpc.StatusCode.NOT_FOUND and "nope" in ei.value.details
        with pytest.raises(CortexlensError) as ei:
            c.model("other")
        assert ei.value.code == grpc.StatusCode.NOT_FOUND
        # shapes that cannot be packed are refused before anything is sent
        with pytest.raises(ValueError, match="unit ids"):
            c.decode("s1", unit_ids[:-1], traces, ts)


def test_token_required(serve):
    _, target = serve(token="secret")
    traces, ts, unit_ids = _traces(3, 4)
    with Client(target) as c:
        with pytest.raises(CortexlensError) as ei:
            c.decode("s1", unit_ids, traces, ts)
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        kw, _ = _stream_kw(5, 4, realtime=False)
        with pytest.raises(CortexlensError) as ei:
            list(c.stream(**kw))
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(target, token="wrong") as c:
        with pytest.raises(CortexlensError) as ei:
            c.model()
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(target, token="secret") as c:
        assert c.decode("s1", unit_ids, traces, ts).frame_index == 2


def test_unreachable_server_is_unavailable():
    with Client(f"127.0.0.1:{free_port()}", timeout_s=2.0) as c:
        with pytest.raises(CortexlensError) as ei:
            c.health()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(CortexlensError) as ei:
            c.wait_until_ready(0.2)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_with_root_certificate(serve, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(crt), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    creds = grpc.ssl_server_credentials([(key.read_bytes(), crt.read_bytes())])
    svc, target = serve(credentials=creds, token="t")
    traces, ts, unit_ids = _traces(3, 4)
    with Client(target, root_certificates=crt, token="t") as c:
        assert c.health() == "SERVING"
        assert c.decode("s1", unit_ids, traces, ts).frame_index == 2
    assert svc.metadata[-1]["authorization"] == "Bearer t"
    with Client(target, timeout_s=2.0) as c:  # plaintext against a TLS port
        with pytest.raises(CortexlensError) as ei:
            c.health()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------------
# Streaming


def test_stream_every_frame_fast(serve):
    svc, target = serve()
    kw, traces = _stream_kw(40, 10, realtime=False, metadata={"rig": "2p-1"}, top_m=3)
    with Client(target, token="tok") as c, c.stream(**kw) as s:
        items = list(s)
    kinds = [it.kind for it in items]
    assert kinds[0] == "accepted" and kinds[-1] == "closed"
    preds = [it for it in items if it.kind == "prediction"]
    assert [it.frame_index for it in preds] == list(range(40))
    for it in preds:  # each prediction echoes its own frame's values, bit-exact
        row = traces[it.message.frame_index]
        assert {u.unit: u.activation for u in it.message.tasks[0].units} == {
            int(j): row[j] for j in np.argsort(-np.abs(row), kind="stable")[:3]
        }
        assert it.latency_ms is not None and 0 <= it.latency_ms < 10_000
    closed = items[-1].message
    assert closed.state == pb.SessionStatus.CLOSED and closed.frames_received == 40
    op = svc.opens[0]
    assert op.session_id == "s1" and list(op.unit_ids) == kw["unit_ids"]
    assert op.frame_rate_hz == pytest.approx(30.0) and op.top_m == 3
    assert dict(op.metadata) == {"rig": "2p-1"}
    assert op.close_explicitly and svc.closes == ["s1"]  # the session ended with `close`
    assert [(i, n) for i, n, _ in svc.blocks] == [(i, 1) for i in range(40)]
    assert svc.metadata[0]["authorization"] == "Bearer tok"

    st = s.stats()
    assert isinstance(st, StreamStats)
    assert (st.frames_sent, st.predictions) == (40, 40) and st.events == {}
    assert st.model_version == "v0001" and st.error is None and s.sender_done
    pct = st.latency_percentiles()
    assert pct["p50"] <= pct["p90"] <= pct["p99"] <= pct["p999"] <= pct["max"]
    d = st.to_dict(include_latencies=True)
    assert d["closed"]["frames_received"] == 40 and d["accepted"]["decode_stride"] == 1
    assert [x["frame_index"] for x in d["latencies"]] == list(range(40))
    json.dumps(d)  # serialisable


def test_stream_blocks_window_stride_and_recording(serve):
    from models.data.simulate import SimConfig, simulate_session

    rec, _ = simulate_session(SimConfig(n_cells=9, minutes=0.02), seed=1)
    svc, target = serve()
    with Client(target) as c:
        s = c.stream(
            rec, realtime=False, block_frames=4, start_frame=5, max_frames=10, decode_stride=3
        )
        items = list(s)
    assert [(i, n) for i, n, _ in svc.blocks] == [(5, 4), (9, 4), (13, 2)]
    preds = [it.message for it in items if it.kind == "prediction"]
    assert [p.frame_index for p in preds] == [6, 9, 12]
    assert [p.timestamp for p in preds] == [rec.timestamps[i] for i in (6, 9, 12)]
    op = svc.opens[0]
    assert op.session_id == rec.session_id and op.subject_id == rec.subject_id
    assert op.genetic_background == rec.genetic_background and op.decode_stride == 3
    assert list(op.unit_ids) == list(rec.unit_ids)
    assert op.frame_rate_hz == rec.sampling_rate
    assert s.stats().frames_sent == 10 and s.sent_at(4) is None and s.sent_at(14) is not None


def test_stream_realtime_pacing(serve):
    # Pacing is checked from the client's own send times (`sent_at`) against lower bounds that
    # load cannot break: a paced block never leaves before its due time. Upper bounds are wide
    # (seconds), so a busy machine cannot fail the test, while a client that did not pace, or
    # paced a block-less stream at the wrong speed, still would.
    svc, target = serve()

    def sent_offsets(**kw):
        t_before = time.perf_counter()  # the client's clock starts after this
        with Client(target) as c, c.stream(**kw) as s:
            list(s)
        n = len(kw["timestamps"])
        return np.array([s.sent_at(i) - t_before for i in range(n)])

    # 16 frames at 30 Hz, speed 2: frame k is due (k / 30) / 2 s after the stream starts
    kw, _ = _stream_kw(16, 4, rate=30.0, realtime=True, speed=2.0)
    ts = np.asarray(kw["timestamps"])
    sent = sent_offsets(**kw)
    due = (ts - ts[0]) / 2.0
    assert np.all(sent >= due), (sent - due).tolist()
    assert sent[-1] < due[-1] + 5.0, sent[-1]
    assert [(i, n) for i, n, _ in svc.blocks] == [(i, 1) for i in range(16)]

    # unpaced: a minute of recording (0.25 Hz) goes out without waiting for its timestamps
    svc.blocks.clear()
    kw, _ = _stream_kw(16, 4, rate=0.25, realtime=False)
    sent = sent_offsets(**kw)
    assert sent[-1] < 20.0, sent.tolist()
    assert len(svc.blocks) == 16

    # a block leaves when its last frame is due: blocks of 4 frames at 30 Hz, speed 1
    svc.blocks.clear()
    kw, _ = _stream_kw(12, 4, rate=30.0, realtime=True, speed=1.0, block_frames=4)
    ts = np.asarray(kw["timestamps"])
    sent = sent_offsets(**kw)
    assert [(i, n) for i, n, _ in svc.blocks] == [(0, 4), (4, 4), (8, 4)]
    for b in range(3):
        block = sent[4 * b : 4 * b + 4]
        assert np.all(block == block[0])  # one message
        assert block[0] >= ts[4 * b + 3] - ts[0], (b, block[0])
    assert sent[-1] < ts[-1] - ts[0] + 5.0


def test_stream_latency_is_send_to_prediction(serve):
    delay = 0.03
    svc, target = serve(delay_s=delay)
    # 10 Hz: each frame is answered (after `delay`) before the next one leaves
    kw, _ = _stream_kw(6, 4, rate=10.0, realtime=True)
    with Client(target) as c, c.stream(**kw) as s:
        lats = [it.latency_ms for it in s if it.kind == "prediction"]
    assert len(lats) == 6
    for lat in lats:
        assert delay * 1000 * 0.9 <= lat < 5000, lats
    st = s.stats()
    assert [f for f, _ in st.latencies] == list(range(6))
    assert st.latency_percentiles()["max"] == pytest.approx(max(lats))


def test_server_error_ends_stream_and_sender(serve):
    svc, target = serve(abort_after_frames=5)
    # 30 s if nothing stopped it; bounds below leave seconds of slack for a busy machine
    kw, _ = _stream_kw(300, 4, rate=10.0, realtime=True)
    t0 = time.perf_counter()
    with Client(target) as c:
        s = c.stream(**kw)
        got = []
        with pytest.raises(CortexlensError) as ei:
            for it in s:
                got.append(it)
    assert time.perf_counter() - t0 < 10.0
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details == "test server: refusing frames"
    assert s.wait_sender(2.0), "the sending thread did not stop"
    sent = s.stats().frames_sent
    assert 5 <= sent < 40
    time.sleep(0.2)
    assert s.stats().frames_sent == sent  # nothing more left after the call ended
    assert s.stats().error.startswith("StreamSession: INVALID_ARGUMENT")
    assert [it.kind for it in got][:1] == ["accepted"]


def test_bad_frame_is_refused_by_the_server(serve):
    svc, target = serve()
    kw, traces = _stream_kw(20, 4, realtime=False)
    traces[7, 1] = np.inf
    with Client(target) as c:
        with pytest.raises(CortexlensError) as ei:
            list(c.stream(**kw))
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN/Inf" in ei.value.details
    assert svc.stream_done.wait(2.0)


def test_stopping_early_cancels_the_call(serve):
    svc, target = serve()
    kw, _ = _stream_kw(300, 4, rate=10.0, realtime=True)  # 30 s if nothing stopped it
    t0 = time.perf_counter()
    with Client(target) as c:
        with c.stream(**kw) as s:
            n = 0
            for it in s:
                n += it.kind == "prediction"
                if n == 3:
                    break
        assert s.wait_sender(2.0)
        assert svc.stream_done.wait(2.0), "the server still sees the call"
    assert time.perf_counter() - t0 < 10.0
    assert s.stats().frames_sent < 40
    assert s.stats().error is None


def test_cancel_from_another_thread(serve):
    _, target = serve()
    kw, _ = _stream_kw(300, 4, rate=30.0, realtime=True)
    with Client(target) as c:
        s = c.stream(**kw)
        threading.Timer(0.3, s.cancel).start()
        items = list(s)  # ends without an error
    assert 3 <= sum(it.kind == "prediction" for it in items) < 30
    assert s.wait_sender(2.0)


def test_resume_starts_where_the_server_says(serve):
    svc, target = serve(resume_from=7)
    kw, _ = _stream_kw(12, 4, realtime=False, resume=True)
    with Client(target) as c:
        s = c.stream(**kw)
        items = list(s)
    assert svc.opens[0].resume
    assert [(i, n) for i, n, _ in svc.blocks] == [(i, 1) for i in range(7, 12)]
    assert s.accepted.next_frame_index == 7
    assert [it.frame_index for it in items if it.kind == "prediction"] == list(range(7, 12))
    assert s.stats().frames_sent == 5


def test_events_and_model_change(serve):
    svc, target = serve(swap_model_at=5)
    kw, _ = _stream_kw(10, 4, realtime=False)
    with Client(target) as c:
        s = c.stream(**kw)
        items = list(s)
    ev = [it for it in items if it.kind == "event"]
    assert len(ev) == 1 and ev[0].message.kind == pb.StreamEvent.MODEL_CHANGED
    assert ev[0].frame_index == 5
    st = s.stats()
    assert st.events == {"MODEL_CHANGED": 1}
    assert st.model_versions == ["v0001", "v0002"] and st.model_version == "v0002"
    preds = [it.message for it in items if it.kind == "prediction"]
    assert {p.model.version for p in preds[5:]} == {"v0002"}


def test_stream_deadline(serve):
    _, target = serve()
    kw, _ = _stream_kw(300, 4, rate=30.0, realtime=True)
    with Client(target) as c:
        s = c.stream(**kw, deadline_s=0.3)
        with pytest.raises(CortexlensError) as ei:
            list(s)
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert s.wait_sender(2.0) and s.stats().frames_sent < 30


def test_stream_argument_checks():
    with Client("127.0.0.1:1") as c:
        kw, _ = _stream_kw(5, 3)
        with pytest.raises(ValueError, match="unit ids"):
            c.stream(**{**kw, "unit_ids": ["a"]})
        with pytest.raises(ValueError, match="block_frames"):
            c.stream(**kw, block_frames=0)
        with pytest.raises(ValueError, match="speed"):
            c.stream(**kw, speed=0)
        with pytest.raises(ValueError, match="Recording"):
            c.stream(traces=kw["traces"])
        s = c.stream(**kw)
        s.close()  # never started: closing is harmless
        assert s.sender_done


# --------------------------------------------------------------------------------------------
# `cortexlens stream`


@pytest.fixture(scope="module")
def rec_file(tmp_path_factory) -> tuple[Path, object]:
    from models.data.io import write_recording
    from models.data.simulate import SimConfig, simulate_session

    rec, _ = simulate_session(SimConfig(n_cells=12, minutes=0.05), seed=3)  # 90 frames
    path = tmp_path_factory.mktemp("rec") / "sim.h5"
    write_recording(rec, path, fmt="brainsets")
    return path, rec


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from service.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_stream(serve, rec_file, tmp_path, capsys):
    path, rec = rec_file
    svc, target = serve(token="tok", swap_model_at=30)
    out_json = tmp_path / "out" / "stream.json"
    code, out, err = _cli(
        ["stream", str(path), "--target", target, "--fast", "--token", "tok", "--every", "10"]
        + ["--json", str(out_json), "--block-frames", "2"],
        capsys,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"accepted session {rec.session_id}: model echo v0001")
    pred_lines = [ln for ln in lines if ln.startswith("frame ")]
    assert len(pred_lines) == 9  # 90 predictions, every 10th printed
    assert pred_lines[0].split()[:2] == ["frame", "0"] and " ms  direction=" in pred_lines[0]
    assert "| rest +0.25" in pred_lines[0]
    assert "event MODEL_CHANGED frame 30: echo v0001 -> v0002" in lines
    assert "frames sent" in out and "v0001 -> v0002" in out and "p999" in out
    d = json.loads(out_json.read_text())
    assert d["frames_sent"] == 90 and d["predictions"] == 90
    assert d["events"] == {"MODEL_CHANGED": 1} and d["model_version"] == "v0002"
    assert len(d["latencies"]) == 90 and d["closed"]["frames_received"] == 90
    assert svc.opens[0].metadata["client"] == "cortexlens stream"


def test_cli_stream_options(serve, rec_file, capsys):
    path, rec = rec_file
    svc, target = serve()
    code, out, err = _cli(
        ["stream", str(path), "--target", target, "--speed", "20", "--max-frames", "12"]
        + ["--start-frame", "3", "--decode-stride", "4", "--session-id", "renamed"],
        capsys,
    )
    assert code == 0, err
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("frame ")] == ["4", "8", "12"]
    assert svc.opens[0].session_id == "renamed" and svc.opens[0].decode_stride == 4
    assert svc.blocks[0][0] == 3 and sum(n for _, n, _ in svc.blocks) == 12


def test_cli_stream_grpc_error_is_one_line(serve, rec_file, capsys):
    path, _ = rec_file
    _, target = serve(token="secret")
    code, out, err = _cli(["stream", str(path), "--target", target, "--fast"], capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: UNAUTHENTICATED: missing or wrong bearer token (server {target})"
    ]
    _, target = serve(abort_after_frames=4)
    code, out, err = _cli(["stream", str(path), "--target", target, "--fast"], capsys)
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: test server: refusing frames")
    assert "Traceback" not in err
    assert "frames sent" in out  # the partial summary is still shown


def test_cli_stream_user_errors(tmp_path, capsys):
    code, _, err = _cli(["stream", str(tmp_path / "missing.nwb")], capsys)
    assert code == 2 and err.startswith("error: ") and "missing.nwb" in err


def test_cli_stream_console_script(serve, rec_file):
    """The installed `cortexlens` script, a real process: exit status and one error line."""
    path, _ = rec_file
    _, target = serve(token="secret")
    exe = Path(sys.executable).parent / "cortexlens"
    env = {**os.environ, "CORTEXLENS_TOKEN": "wrong"}
    r = subprocess.run(
        [str(exe), "stream", str(path), "--target", target, "--fast"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: UNAUTHENTICATED: missing or wrong bearer token (server {target})"
    ]


def test_cli_stream_interrupt_prints_summary(serve, rec_file):
    """Ctrl-C stops the stream cleanly: summary on stdout, "interrupted", exit status 130."""
    import signal

    path, _ = rec_file
    _, target = serve()
    exe = Path(sys.executable).parent / "cortexlens"
    # The CLI must see SIGINT at its default (a shell's background job, as CI runs us, starts
    # with it ignored, and exec keeps that). Reset by a launcher that execs the CLI, not by
    # `preexec_fn`: that forces a plain fork() of this process, which has gRPC threads running
    # (the test server), and gRPC's fork handlers then abort the child now and then
    # ("epoll_wait error: Bad file descriptor", exit -6) before the CLI even starts.
    launch = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    launch += "os.execv(sys.argv[1], sys.argv[1:])"
    p = subprocess.Popen(
        [sys.executable, "-c", launch, str(exe), "stream", str(path), "--target", target],
        stdout=subprocess.PIPE,  # real time: 3 s
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not any(ln.startswith("frame      5 ") for ln in lines):
            line = p.stdout.readline()
            if not line:
                p.wait(timeout=30)
                raise AssertionError(
                    f"the stream ended before frame 5 (exit {p.returncode}): "
                    f"{''.join(lines)}\n{p.stderr.read()}"
                )
            lines.append(line)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "interrupted"
    assert "frames sent" in out and "Traceback" not in out + err


def test_cli_line_formats():
    from service.cli.stream import accepted_line, event_line
    from service.client import StreamItem

    ev = pb.StreamEvent(kind=pb.StreamEvent.GAP, first_frame_index=10, last_frame_index=12)
    assert event_line(StreamItem("event", ev, None, 0.0)) == "event GAP frames 10-12"
    ev = pb.StreamEvent(kind=pb.StreamEvent.NOT_DECODED, message="no known unit ids")
    assert event_line(StreamItem("event", ev, None, 0.0)) == (
        "event NOT_DECODED: no known unit ids"
    )
    acc = pb.SessionAccepted(
        session_id="s",
        model=pb.ModelRef(name="m", version="v0003"),
        decode_stride=2,
        window_frames=30,
        decoding=False,
        n_cells_known=0,
        session_known=False,
        session_embedding_from="s0",
    )
    assert accepted_line(StreamItem("accepted", acc, None, 0.0), 50) == (
        "accepted session s: model m v0003, decode stride 2, window 30 frames, cells known 0/50, "
        "decoding NO, session embedding from s0, from frame 0"
    )


# --------------------------------------------------------------------------------------------
# examples/closed_loop.py


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "closed_loop_example", REPO / "examples" / "closed_loop.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_closed_loop_example(serve, capsys):
    mod = _load_example()
    svc, target = serve()
    reactions = mod.run(
        ["--target", target, "--simulate", "--cells", "10", "--minutes", "0.05", "--fast"]
        + ["--unit", "2", "--threshold", "0.0"]
    )
    out = capsys.readouterr().out
    assert out.startswith("watching unit u2 on 'direction'")
    assert reactions, out
    for r in reactions:
        assert r.attribution > 0 and r.reaction_ms >= 0
    assert out.count(": trigger, ") == len(reactions)
    assert f"{len(reactions)} triggers in 90 predictions (90 frames)" in out

    # the unit is chosen from the model's labels when not given (the echo model labels 0,2,4,6)
    reactions = mod.run(
        ["--target", target, "--simulate", "--cells", "10", "--minutes", "0.02", "--fast"]
    )
    assert capsys.readouterr().out.startswith("watching unit u6 on 'direction'")
