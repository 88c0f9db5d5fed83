"""Reliability suite (issue 9): malformed messages on every RPC, and faults during streaming.

One real Serve application for the module (the ``service_home`` quick bundle, loopback ports,
like ``test_app.py``'s ``served``). Tests run in file order: the fuzz tests first (with a
bystander stream running through all of them), then the faults, the one that restarts the whole
application last.

**Fuzzing** (hypothesis, derandomized, no example database, ``deadline=None``, small
``max_examples``): every method of ``cortexlens.v1.Decoder``, ``cortexlens.v1.Retraining`` and
``grpc.health.v1.Health``, two layers:

- raw bytes as the serialized request (identity serializers on the method path), for unary,
  server-streaming and bidirectional methods;
- structurally valid protos with adversarial values (NaN/Inf, huge or negative-looking
  uint32/uint64, byte lengths that do not match the shape, float64 instead of float32, empty,
  unicode, path-like and very long ids, out-of-order and duplicate frame indices, random
  sequences of ``StreamRequest`` messages).

Property: every call ends within its deadline with a status from the method's acceptable set
(`ACCEPT`; UNKNOWN, INTERNAL and DEADLINE_EXCEEDED are failures), and after every example the
health check says SERVING. At the end a known-good ``Decode`` and a known-good stream work, and
the bystander stream that ran through all the fuzzing got every frame predicted and recorded.

Bytes that do not parse as a method's request message: Serve's gRPC proxy parses every request
itself, before a replica sees it, with the deserializers of the registered handlers. The Serve
config registers them through `service.servicers`, whose deserializers never raise: such bytes
reach the Ingress as a `Malformed` marker and the call ends with INVALID_ARGUMENT naming the
message type (with the generated handlers, grpc.aio answered unary calls with
``UNKNOWN "Unexpected DecodeError"`` and a stream's input silently ended as if cancelled).

Retraining: ``StartJob`` is fuzzed with session ids that never name a recorded session, so every
request is refused before a job is created (kinds, workers, epochs and gates are adversarial);
the test checks no job was created. ``Rollback`` may succeed only onto the current version (the
module's registry holds one version); the served version is checked unchanged at the end.

**Faults** during streaming, the durable record checked afterwards (every frame that got a
prediction is recorded; the record holds exactly the frames sent, with their values):
a DecoderModel replica killed mid-stream (``ray.kill``; Serve replaces it), and the whole
application deleted and deployed again mid-stream (clients see a clean status, not a hang, and
resume with ``resume=true``, by hand and with ``Client.stream(..., reconnect=...)``). The
ingestion-actor kill is in ``test_app.py``.
"""

from __future__ import annotations

import collections
import math
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg
from tests.service.conftest import free_port, published_home

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

C = grpc.StatusCode
CALL_TIMEOUT_S = 20.0  # a call that has not ended by then is a hang (a failure)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI reproducibility)
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)

D, R, H = "/cortexlens.v1.Decoder/", "/cortexlens.v1.Retraining/", "/grpc.health.v1.Health/"
#: method path -> (arity, request type)
METHODS = {
    D + "Decode": ("unary", pb.DecodeRequest),
    D + "StreamSession": ("bidi", pb.StreamRequest),
    D + "GetModel": ("unary", pb.GetModelRequest),
    D + "ListUnits": ("unary", pb.ListUnitsRequest),
    D + "GetSession": ("unary", pb.GetSessionRequest),
    R + "StartJob": ("unary", pb.StartJobRequest),
    R + "GetJob": ("unary", pb.JobRef),
    R + "WatchJob": ("server_stream", pb.JobRef),
    R + "ListJobs": ("unary", pb.ListJobsRequest),
    R + "CancelJob": ("unary", pb.JobRef),
    R + "Rollback": ("unary", pb.RollbackRequest),
    H + "Check": ("unary", health_pb2.HealthCheckRequest),
    H + "Watch": ("server_stream", health_pb2.HealthCheckRequest),
}
#: the statuses a well-formed but adversarial request may end with, per method
ACCEPT = {
    D + "Decode": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION,
                   C.RESOURCE_EXHAUSTED},
    D + "StreamSession": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION,
                          C.RESOURCE_EXHAUSTED, C.ALREADY_EXISTS},
    D + "GetModel": {C.OK, C.NOT_FOUND},
    D + "ListUnits": {C.OK, C.NOT_FOUND},
    D + "GetSession": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
    # never OK: the fuzzed session ids name no recorded session (no job may start)
    R + "StartJob": {C.INVALID_ARGUMENT, C.NOT_FOUND},
    R + "GetJob": {C.NOT_FOUND, C.INVALID_ARGUMENT},
    R + "WatchJob": {C.NOT_FOUND, C.INVALID_ARGUMENT},
    R + "ListJobs": {C.OK},
    R + "CancelJob": {C.NOT_FOUND, C.INVALID_ARGUMENT},
    # OK only onto the current version (checked unchanged at the end)
    R + "Rollback": {C.OK, C.FAILED_PRECONDITION, C.NOT_FOUND, C.INVALID_ARGUMENT},
    H + "Check": {C.OK, C.NOT_FOUND},
    H + "Watch": {C.OK, C.NOT_FOUND},
}  # fmt: skip
#: in the details of the INVALID_ARGUMENT that bytes which do not parse get
NOT_PARSED = "could not be parsed as"  # service.servicers.Malformed.describe


class _Served(__import__("types").SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis prints the fixture of a failing example
        return f"<served {self.target}>"


@pytest.fixture(scope="module")
def served(service_home, tmp_path_factory):

    from service import server

    home, reg, v1 = published_home(service_home, tmp_path_factory, "reliability_home")
    grpc_port = free_port()
    cfg = server.load_config(
        grpc_port=grpc_port,
        http_port=free_port(),
        args={"home": str(home), "metrics_port": 0, "ingest": {"max_gap_frames": 60}},
    )
    server.start(cfg, num_cpus=2, log=None)
    ch = grpc.insecure_channel(grpc_port and f"127.0.0.1:{grpc_port}")
    try:
        yield _Served(
            target=f"127.0.0.1:{grpc_port}",
            cfg=cfg,
            home=home,
            registry=reg,
            version=v1,
            records=home / "sessions",
            recordings={r.session_id: r for r in service_home.recordings},
            channel=ch,
            stub=pbg.DecoderStub(ch),
            jobs=pbg.RetrainingStub(ch),
        )
    finally:
        ch.close()
        server.stop()


def _park(served, i=0):
    return [r for k, r in served.recordings.items() if k != "sim512"][i]


def _record(served, session_id):
    from service.ingest import FrameRecord

    return FrameRecord.open(served.records / session_id, readonly=True).read()


def _serving(served) -> None:
    from grpc_health.v1 import health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(served.channel)
    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


#: (method, status) of every fuzzed call: printed at the end, and checked for variety (a fuzzer
#: whose every example is refused at the first check would prove little)
SEEN: collections.Counter = collections.Counter()


def _seen(path: str, code) -> None:
    SEEN[(path.rsplit("/", 1)[-1], code.name)] += 1


def _ident(b: bytes) -> bytes:
    return b


def _call_raw(served, path: str, payloads: list[bytes]):
    """One call of ``path`` with raw request bytes: (code, details, responses)."""
    arity, _ = METHODS[path]
    ch = served.channel
    out: list[bytes] = []
    try:
        if arity == "unary":
            f = ch.unary_unary(path, request_serializer=_ident, response_deserializer=_ident)
            out.append(f(payloads[0], timeout=CALL_TIMEOUT_S))
        elif arity == "server_stream":
            f = ch.unary_stream(path, request_serializer=_ident, response_deserializer=_ident)
            call = f(payloads[0], timeout=CALL_TIMEOUT_S)
            for r in call:  # Watch streams forever: one answer is enough
                out.append(r)
                call.cancel()
                break
        else:
            f = ch.stream_stream(path, request_serializer=_ident, response_deserializer=_ident)
            for r in f(iter(payloads), timeout=CALL_TIMEOUT_S):
                out.append(r)
    except grpc.RpcError as e:
        if e.code() == C.CANCELLED and out:
            return C.OK, "", out  # cancelled by us after the first Watch answer
        return e.code(), e.details() or "", out
    return C.OK, "", out


def _parses(cls, b: bytes) -> bool:
    from google.protobuf.message import DecodeError

    try:
        cls.FromString(b)
    except DecodeError:
        return False
    return True


# -- strategies ------------------------------------------------------------------------------------
NASTY_IDS = [
    "", " ", ".", "..", "../etc", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "nul\x00x",
    "sep\x1fx", "é" * 8, "日本語", "🧠", "x" * 129, "y" * 5000, "-lead", "CON", "a b", "\n",
    "default", "session:evil", "v0001", "sim512", "%s%n", "${HOME}",
]  # fmt: skip
ids = st.one_of(
    st.sampled_from(NASTY_IDS),
    st.text(max_size=24),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
)
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, -1.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
u32 = st.one_of(st.sampled_from([0, 1, 2, 7, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


@st.composite
def frame_blocks(draw, rec, first: int, max_frames: int = 3):
    """A FrameBlock of ``rec`` at ``first``: valid or with one or more adversarial fields."""
    k = draw(st.integers(1, max_frames))
    lo = min(first, rec.n_frames - k)
    v = np.ascontiguousarray(rec.traces[lo : lo + k], dtype="<f4")
    t = list(rec.timestamps[lo : lo + k])
    n_frames, n_cells, data = k, rec.n_units, v.tobytes()
    bad = draw(
        st.sets(st.sampled_from(["nf", "nc", "bytes", "nan", "f64", "ts", "tsn"]), max_size=2)
    )
    if "nf" in bad:
        n_frames = draw(u32)
    if "nc" in bad:
        n_cells = draw(u32)
    if "bytes" in bad:
        data = draw(st.one_of(st.binary(max_size=64), st.just(data[:-1]), st.just(data + b"\0")))
    if "nan" in bad:
        w = v.copy()
        w.flat[draw(st.integers(0, w.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        data = w.tobytes()
    if "f64" in bad:
        data = v.astype("<f8").tobytes()
    if "ts" in bad:
        t = draw(st.lists(floats, max_size=4))
    if "tsn" in bad and t:
        t[draw(st.integers(0, len(t) - 1))] = draw(floats)
    return pb.FrameBlock(n_frames=n_frames, n_cells=n_cells, values=data, timestamps=t)


@st.composite
def decode_requests(draw, rec):
    end = draw(st.integers(17, 400))
    block = draw(frame_blocks(rec, end - 16, max_frames=17))
    unit_ids = list(rec.unit_ids)
    which = draw(st.sampled_from(["real", "real", "nasty", "dup", "short", "unknown"]))
    if which == "nasty":
        unit_ids = draw(st.lists(ids, min_size=0, max_size=6))
    elif which == "dup":
        unit_ids[1] = unit_ids[0]
    elif which == "short":
        unit_ids = unit_ids[:-1]
    elif which == "unknown":
        unit_ids = [f"never-{i}" for i in range(len(unit_ids))]
    return pb.DecodeRequest(
        model=draw(st.one_of(st.just(""), st.just("default"), ids)),
        session_id=draw(st.one_of(st.just(rec.session_id), ids)),
        unit_ids=unit_ids,
        window=block,
        top_m=draw(st.one_of(st.just(0), u32)),
        frame_rate_hz=draw(st.one_of(st.just(rec.sampling_rate), floats)),
    )


_counter = iter(range(1 << 30))


@st.composite
def open_messages(draw, rec):
    sid = draw(st.one_of(st.just(None), st.just(None), ids))
    return pb.SessionOpen(
        session_id=f"fz-{next(_counter)}" if sid is None else sid,
        subject_id=draw(st.one_of(st.just(""), ids)),
        genetic_background=draw(st.one_of(st.just(""), ids)),
        unit_ids=draw(
            st.one_of(
                st.just(list(rec.unit_ids)),
                st.just(list(rec.unit_ids)),
                st.lists(ids, max_size=5),
            )
        ),
        frame_rate_hz=draw(st.one_of(st.just(rec.sampling_rate), floats)),
        decode_stride=draw(st.one_of(st.just(0), st.just(1), u32)),
        top_m=draw(st.one_of(st.just(0), u32)),
        model=draw(st.one_of(st.just(""), st.just(""), ids)),
        metadata=draw(st.dictionaries(ids, ids, max_size=3)),
        resume=draw(st.booleans()),
    )


@st.composite
def stream_scripts(draw, rec):
    """A sequence of StreamRequests: mostly open first, then frames (in order, duplicated,
    reordered, far ahead, malformed), trials, a second open, an empty message."""
    msgs = []
    if draw(st.integers(0, 9)):
        msgs.append(pb.StreamRequest(open=draw(open_messages(rec))))
    nxt = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["frames"] * 6 + ["trials", "open", "empty"]))
        if kind == "frames":
            first = draw(
                st.one_of(
                    st.just(nxt), st.just(nxt), st.just(max(0, nxt - 1)), st.just(nxt + 2), u64
                )
            )
            block = draw(frame_blocks(rec, first if first < rec.n_frames else 0))
            msgs.append(pb.StreamRequest(frames=pb.Frames(first_frame_index=first, block=block)))
            if first == nxt:
                nxt += int(block.n_frames) if block.n_frames < 4 else 1
        elif kind == "trials":
            trials = [
                pb.Trial(start=draw(floats), end=draw(floats), direction=draw(floats),
                         temporal_frequency=draw(floats))
                for _ in range(draw(st.integers(0, 3)))
            ]  # fmt: skip
            msgs.append(pb.StreamRequest(trials=pb.Trials(trials=trials)))
        elif kind == "open":
            msgs.append(pb.StreamRequest(open=draw(open_messages(rec))))
        else:
            msgs.append(pb.StreamRequest())
    return msgs


job_refs = st.builds(pb.JobRef, job_id=ids)


def _unrecorded(served):
    def ok(sid: str) -> bool:
        try:
            return not (served.records / sid / "meta.json").exists()
        except (OSError, ValueError):
            return True

    return ids.filter(ok)


# -- bystander: a healthy stream running through all the fuzzing -----------------------------------
class _Bystander:
    def __init__(self, served, rec, session_id="bystander", rate_hz=20.0):
        self.rec, self.session_id = rec, session_id
        self.stop = threading.Event()
        self.sent = 0
        self.responses: list = []
        self.error: tuple | None = None
        self._stub = served.stub
        self._period = 1.0 / rate_hz
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def __repr__(self) -> str:
        return f"<bystander {self.session_id} sent={self.sent}>"

    def _gen(self):
        rec = self.rec
        yield pb.StreamRequest(
            open=pb.SessionOpen(
                session_id=self.session_id,
                unit_ids=list(rec.unit_ids),
                frame_rate_hz=rec.sampling_rate,
            )
        )
        i = 0
        while not self.stop.is_set() and i < rec.n_frames:
            v = np.ascontiguousarray(rec.traces[i : i + 1], dtype="<f4")
            yield pb.StreamRequest(
                frames=pb.Frames(
                    first_frame_index=i,
                    block=pb.FrameBlock(
                        n_frames=1,
                        n_cells=rec.n_units,
                        values=v.tobytes(),
                        timestamps=[float(rec.timestamps[i])],
                    ),
                )
            )
            i += 1
            self.sent = i
            self.stop.wait(self._period)

    def _run(self):
        try:
            for r in self._stub.StreamSession(self._gen(), timeout=600):
                self.responses.append(r)
        except grpc.RpcError as e:
            self.error = (e.code(), e.details())

    def finish(self, timeout_s=120.0):
        self.stop.set()
        self._th.join(timeout_s)
        assert not self._th.is_alive(), "the bystander stream did not end"


@pytest.fixture(scope="module")
def bystander(served):
    b = _Bystander(served, _park(served, 3))
    yield b
    b.stop.set()


def _after_example(served, bystander):
    _serving(served)
    assert bystander.error is None, bystander.error


# -- fuzz: raw bytes -------------------------------------------------------------------------------
raw_payloads = st.one_of(
    st.binary(max_size=96),
    # bytes that start like a field of the request, then break off or overflow
    st.builds(lambda a, b: a + b, st.sampled_from([b"\x0a", b"\x12", b"\x1a\xff", b"\x08"]),
              st.binary(max_size=24)),
    st.sampled_from([b"", b"\xff" * 11, b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                     b"\x0b", b"\x0a\x05ab", b"\x12\x03\x0a\x01"]),
)  # fmt: skip


def _check_raw(path: str, payloads: list[bytes], code, details: str) -> None:
    arity, cls = METHODS[path]
    sent = payloads if arity == "bidi" else payloads[:1]
    parseable = all(_parses(cls, p) for p in sent)
    if arity == "bidi" and not parseable:
        # the messages before the bad one may already end the call (e.g. frames before open);
        # otherwise INVALID_ARGUMENT; never OK
        assert code in ACCEPT[path] - {C.OK}, (path, payloads, code, details)
        return
    if not parseable:
        # refused by the Ingress, naming the message type (see the module docstring)
        assert code == C.INVALID_ARGUMENT and NOT_PARSED in details, (
            path, payloads, code, details
        )  # fmt: skip
        return
    assert code in ACCEPT[path], (path, payloads, code, details)
    assert code == C.OK or details, (path, code)  # an error always says what to do


@settings(FUZZ, max_examples=150)
@given(
    path=st.sampled_from(sorted(METHODS)),
    payloads=st.lists(raw_payloads, min_size=1, max_size=3),
)
def test_fuzz_raw_bytes_on_every_method(served, bystander, path, payloads):
    t0 = time.monotonic()
    if "StartJob" in path:  # a parseable StartJob naming a recorded session would start a job
        for p in payloads:
            if _parses(pb.StartJobRequest, p):
                for sid in pb.StartJobRequest.FromString(p).session_ids:
                    hypothesis.assume(not (served.records / sid / "meta.json").exists())
    code, details, _ = _call_raw(served, path, payloads)
    _seen(path, code)
    assert time.monotonic() - t0 < CALL_TIMEOUT_S
    _check_raw(path, payloads, code, details)
    _after_example(served, bystander)


def test_every_method_with_unparseable_bytes(served, bystander):
    """The same, deterministically, once per method: bytes that can never parse."""
    junk = b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"  # a varint length that overflows
    for path in METHODS:
        code, details, _ = _call_raw(served, path, [junk])
        _check_raw(path, [junk], code, details)
    # a stream that opened fine, then sends garbage: INVALID_ARGUMENT, the session resumable
    rec = _park(served, 0)
    op = pb.StreamRequest(
        open=pb.SessionOpen(
            session_id="raw-then-junk", unit_ids=list(rec.unit_ids), frame_rate_hz=16.0
        )
    ).SerializeToString()
    code, details, out = _call_raw(served, D + "StreamSession", [op, junk])
    assert code == C.INVALID_ARGUMENT, (code, details)
    assert pb.StreamResponse.FromString(out[0]).WhichOneof("kind") == "accepted"
    deadline = time.monotonic() + 20
    while (
        served.stub.GetSession(
            pb.GetSessionRequest(session_id="raw-then-junk"), timeout=CALL_TIMEOUT_S
        ).state
        != pb.SessionStatus.INTERRUPTED
    ):
        assert time.monotonic() < deadline, "the session was not left INTERRUPTED"
        time.sleep(0.2)
    _after_example(served, bystander)


# -- fuzz: well-formed messages with adversarial values --------------------------------------------
def _unary(fn, req):
    try:
        return C.OK, "", fn(req, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_decode(served, bystander, data):
    rec = _park(served, data.draw(st.integers(0, 4)))
    req = data.draw(decode_requests(rec))
    code, details, resp = _unary(served.stub.Decode, req)
    _seen("Decode", code)
    assert code in ACCEPT[D + "Decode"], (code, details)
    assert code == C.OK or details
    if code == C.OK:  # a window that passed validation: a well-formed prediction
        assert resp.prediction.tasks
        for t in resp.prediction.tasks:
            p = np.asarray(t.probabilities)
            assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-3
            assert np.isfinite(t.logits).all() and math.isfinite(t.unexplained)
    _after_example(served, bystander)


@settings(FUZZ, max_examples=80)
@given(
    which=st.sampled_from(["GetModel", "ListUnits", "GetSession", "GetJob", "WatchJob",
                           "CancelJob", "ListJobs", "Rollback", "Check", "Watch"]),
    a=ids,
    b=ids,
)  # fmt: skip
def test_fuzz_metadata_job_and_health_calls(served, bystander, which, a, b):
    reqs = {
        "GetModel": pb.GetModelRequest(model=a),
        "ListUnits": pb.ListUnitsRequest(model=a, variable=b),
        "GetSession": pb.GetSessionRequest(session_id=a),
        "GetJob": pb.JobRef(job_id=a),
        "WatchJob": pb.JobRef(job_id=a),
        "CancelJob": pb.JobRef(job_id=a),
        "ListJobs": pb.ListJobsRequest(),
        "Rollback": pb.RollbackRequest(model=a, version=b),
        "Check": health_pb2.HealthCheckRequest(service=a),
        "Watch": health_pb2.HealthCheckRequest(service=a),
    }
    path = next(p for p in METHODS if p.endswith("/" + which))
    code, details, out = _call_raw(served, path, [reqs[which].SerializeToString()])
    _seen(path, code)
    assert code in ACCEPT[path], (path, a, b, code, details)
    assert code == C.OK or details
    if which in ("Check", "Watch") and code == C.OK:
        assert health_pb2.HealthCheckResponse.FromString(out[0]).status == 1  # SERVING
    _after_example(served, bystander)


@FUZZ
@given(data=st.data())
def test_fuzz_start_job_is_refused_fast(served, bystander, data):
    req = pb.StartJobRequest(
        kind=data.draw(st.one_of(st.sampled_from(["adapt", "sae_refit", "finetune"]), ids)),
        session_ids=data.draw(st.lists(_unrecorded(served), max_size=3)),
        model=data.draw(st.one_of(st.just(""), ids)),
        workers=data.draw(u32),
        epochs=data.draw(u32),
    )
    if data.draw(st.booleans()):
        req.promote = data.draw(st.booleans())
    if data.draw(st.booleans()):
        req.min_accuracy_delta = data.draw(floats)
    t0 = time.monotonic()
    code, details, _ = _unary(served.jobs.StartJob, req)
    _seen("StartJob", code)
    assert code in ACCEPT[R + "StartJob"], (code, details)
    assert details and time.monotonic() - t0 < 10.0
    _after_example(served, bystander)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_stream_sequences(served, bystander, data):
    rec = _park(served, data.draw(st.integers(0, 2)))
    msgs = data.draw(stream_scripts(rec))
    out = []
    try:
        for r in served.stub.StreamSession(iter(msgs), timeout=CALL_TIMEOUT_S):
            out.append(r)
        code, details = C.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    _seen("StreamSession", code)
    assert code in ACCEPT[D + "StreamSession"], (code, details, msgs[:3])
    assert code == C.OK or details
    kinds = [r.WhichOneof("kind") for r in out]
    if out:
        assert kinds[0] == "accepted", kinds
    if code == C.OK and msgs:  # (an empty request stream just ends: nothing was opened)
        assert kinds and kinds[-1] == "closed", kinds
    preds = [r.prediction.frame_index for r in out if r.WhichOneof("kind") == "prediction"]
    assert preds == sorted(set(preds)), preds  # frame order, each frame once
    if preds:  # every frame that got a prediction is in the durable record
        sid = out[0].accepted.session_id
        rec_idx = _record(served, sid).indices
        assert set(preds) <= set(rec_idx.tolist()), (preds, rec_idx)
    _after_example(served, bystander)


def test_after_fuzzing_the_server_still_serves(served, bystander):
    from service.client import Client

    print("\nfuzzed calls by (method, status):", dict(sorted(SEEN.items())))
    if SEEN:  # the fuzzing got past validation too, not only refusals
        for ok in ["Decode", "StreamSession", "GetModel", "ListJobs", "Check"]:
            assert SEEN[(ok, "OK")] > 0, ok
        for refused in ["Decode", "StreamSession", "StartJob"]:
            assert SEEN[(refused, "INVALID_ARGUMENT")] > 0, refused
    bystander.finish()
    assert bystander.error is None, bystander.error
    n = bystander.sent
    assert n >= 100, n  # it ran through the fuzzing
    kinds = [r.WhichOneof("kind") for r in bystander.responses]
    assert kinds[0] == "accepted" and kinds[-1] == "closed"
    preds = [r.prediction.frame_index for r in bystander.responses if r.prediction.tasks]
    assert preds == list(range(n))
    got = _record(served, bystander.session_id)
    assert got.indices.tolist() == list(range(n))
    np.testing.assert_array_equal(got.values, bystander.rec.traces[:n].astype("<f4"))
    # a known-good Decode and a known-good stream
    rec = _park(served, 1)
    with Client(served.target, timeout_s=30) as c:
        p = c.decode(rec.session_id, rec.unit_ids, rec.traces[100:117], rec.timestamps[100:117])
        assert p.model.version == served.version and p.tasks
        items = list(c.stream(rec, realtime=False, max_frames=40, session_id="after-fuzz"))
    assert [i.message.frame_index for i in items if i.kind == "prediction"] == list(range(40))
    assert items[-1].kind == "closed"
    # no retraining job was created by the fuzzing, the served version did not move
    assert not list(served.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs)
    assert served.registry.current("default") == served.version


# -- faults during streaming -----------------------------------------------------------------------
def _replicas(deployment: str) -> list[dict]:
    import ray

    prefix = f"SERVE_REPLICA::cortexlens#{deployment}#"
    return [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def _kill_replica(deployment: str, freeze_s: float = 0.0) -> str:
    """Kill the deployment's (one) replica. With ``freeze_s`` its process is stopped (SIGSTOP)
    that long first, so requests pile up in flight on it and die with it (ActorDiedError) rather
    than the kill landing between two short requests."""
    import os
    import signal

    import psutil
    import ray

    (r,) = _replicas(deployment)
    if freeze_s:
        # this cluster's replica process (other Ray clusters on the machine may run replicas of
        # the same name)
        pid = ray.get(ray.get_actor(r["name"], namespace=r["namespace"]).__ray_call__.remote(
            lambda self: os.getpid()
        ))  # fmt: skip
        assert psutil.pid_exists(pid), pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(freeze_s)
        os.kill(pid, signal.SIGKILL)
    else:
        ray.kill(ray.get_actor(r["name"], namespace=r["namespace"]), no_restart=True)
    return r["name"]


def _wait_serving(served, timeout_s: float = 180.0, gone: str | None = None) -> float:
    """Until the application is RUNNING again (with ``gone`` replaced) and health says SERVING;
    returns the seconds waited."""
    from ray import serve

    t0 = time.monotonic()
    while True:
        try:
            app = serve.status().applications.get("cortexlens")
            ok = app is not None and str(app.status).endswith("RUNNING")
            if ok and gone is not None:
                names = [r["name"] for r in _replicas(gone.split("#")[1])]
                ok = bool(names) and gone not in names
            if ok:
                _serving(served)
                return time.monotonic() - t0
        except (grpc.RpcError, AssertionError):
            pass
        assert time.monotonic() - t0 < timeout_s, f"not serving again after {timeout_s:.0f} s"
        time.sleep(0.25)


def _check_record(served, session_id: str, rec, n: int, acknowledged: list[int]) -> None:
    """Every acknowledged frame is recorded; the record is exactly frames 0..n-1 as sent."""
    got = _record(served, session_id)
    assert set(acknowledged) <= set(got.indices.tolist()), "an acknowledged frame was lost"
    assert got.indices.tolist() == list(range(n)), "the record has a hole or extra frames"
    np.testing.assert_array_equal(got.values, rec.traces[:n].astype("<f4"))
    np.testing.assert_allclose(got.timestamps, rec.timestamps[:n])


def _stream_until_error(c, rec, session_id, n, on_pred, **kw):
    """Stream; returns (predicted frame indices, the error or None, the stream)."""
    from service.client import CortexlensError

    s = c.stream(rec, max_frames=n, session_id=session_id, deadline_s=240, **kw)
    preds: list[int] = []
    err = None
    try:
        for it in s:
            if it.kind == "prediction":
                preds.append(int(it.message.frame_index))
                on_pred(len(preds))
    except CortexlensError as e:
        err = e
    return preds, err, s


@pytest.mark.parametrize("how", ["frozen-then-sigkill", "ray-kill"])
def test_decoder_replica_killed_mid_stream(served, how):
    """A DecoderModel replica dies mid-stream (Serve starts a new one): with decodes in flight
    (its process frozen, then SIGKILLed) or wherever the kill lands (``ray.kill``). The stream
    goes on seamlessly (the ingress retries a decode whose replica died,
    `service.app._decode`), and the record holds every frame. Without the retry the frozen case
    ended with UNAVAILABLE (the in-flight decodes raised ActorDiedError)."""
    from service.client import Client

    rec, sid, n = _park(served, 1), f"decoder-kill-{how}", 320
    killed: list[str] = []

    def kill(k):
        if k == 40 and not killed:
            freeze = 0.5 if how == "frozen-then-sigkill" else 0.0
            killed.append(_kill_replica("DecoderModel", freeze_s=freeze))

    with Client(served.target, timeout_s=60) as c:
        t0 = time.monotonic()
        preds, err, s = _stream_until_error(c, rec, sid, n, kill, realtime=False)
        took = time.monotonic() - t0
    assert killed, "the replica was never killed"
    closed = s.stats().closed
    missing = sorted(set(range(n)) - set(preds))
    print(
        f"\ndecoder replica killed ({how}): error {err}, {len(preds)} predictions "
        f"in {took:.1f} s, coalesced {getattr(closed, 'decodes_coalesced', None)}"
    )
    assert err is None, err
    assert closed is not None and closed.state == pb.SessionStatus.CLOSED
    assert preds == sorted(set(preds)) and preds[-1] == n - 1
    # a frame without a prediction was coalesced under backpressure while no replica was up
    # (the newest window is always decoded) and counted as such: none silently dropped
    assert len(missing) == closed.decodes_coalesced, missing
    _check_record(served, sid, rec, n, preds)
    _wait_serving(served, gone=killed[0])


def _restart_app(served, out: dict) -> None:
    """Delete the Serve application and deploy it again from the same config."""
    from ray import serve

    from service import server

    t0 = time.monotonic()
    serve.delete("cortexlens")
    out["deleted_s"] = time.monotonic() - t0
    server.deploy(served.cfg, log=None)
    out["restarted_s"] = time.monotonic() - t0


def test_application_restart_mid_stream_then_resume(served):
    """The whole application is deleted and deployed again mid-stream (runs last). Two streams
    are live: one resumes by hand with ``resume=true``, the other with
    ``Client.stream(..., reconnect=...)``. Both get a clean status, not a hang (Serve drains
    the old ingress replica for its graceful-shutdown timeout, then kills it; its proxy then
    answers INTERNAL "The actor died unexpectedly"), resume against the new application, and
    lose nothing acknowledged; each record is exactly the frames sent."""
    from service.client import Client, retriable

    rec, sid, n = _park(served, 2), "app-restart", 400
    rec2, sid2 = _park(served, 4), "app-restart-auto"
    timing: dict = {}
    th: list[threading.Thread] = []
    auto: dict = {}

    def restart(k):
        if k == 40 and not th:
            th.append(threading.Thread(target=_restart_app, args=(served, timing)))
            th[0].start()

    def auto_stream():
        with Client(served.target, timeout_s=60) as c:
            auto["r"] = _stream_until_error(
                c, rec2, sid2, n, lambda k: None, realtime=True, speed=1.5, reconnect=2
            )

    t_auto = threading.Thread(target=auto_stream)
    t_auto.start()
    with Client(served.target, timeout_s=60) as c:
        t0 = time.monotonic()
        preds, err, _ = _stream_until_error(c, rec, sid, n, restart, realtime=True, speed=2.0)
        ended = time.monotonic() - t0
        th[0].join(300)
        print(f"\napp restart: stream ended after {ended:.1f} s with {err!r}; {timing}")
        assert err is not None and retriable(err), err  # UNAVAILABLE or the dead replica's
        assert ended < 120  # no hang: Serve's graceful shutdown is 20 s
        _wait_serving(served)
        preds2, err2, s2 = _stream_until_error(
            c, rec, sid, n, lambda k: None, realtime=False, resume=True
        )
    assert err2 is None, err2
    assert s2.accepted.next_frame_index >= max(preds) + 1
    assert s2.stats().closed.state == pb.SessionStatus.CLOSED
    both = preds + preds2
    assert both == sorted(set(both)) and both[-1] == n - 1
    _check_record(served, sid, rec, n, both)
    # the reconnecting client: one iteration, no error, the reconnection counted
    t_auto.join(300)
    preds_a, err_a, s_a = auto["r"]
    st_a = s_a.stats()
    print(f"reconnecting client: {st_a.reconnects} reconnects after {st_a.reconnect_errors}")
    assert err_a is None, err_a
    assert st_a.reconnects == 1  # one outage, however many attempts it took
    assert st_a.closed is not None and st_a.closed.state == pb.SessionStatus.CLOSED
    assert preds_a == sorted(set(preds_a)) and preds_a[-1] == n - 1
    _check_record(served, sid2, rec2, n, preds_a)
