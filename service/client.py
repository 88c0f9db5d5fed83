"""Python client for the cortexlens gRPC API (`protos/cortexlens/v1/cortexlens.proto`).

A thin, typed layer over the generated stubs: one channel per `Client`, the bearer token sent as
``authorization: Bearer <token>`` metadata on every call, a deadline on every unary call, and
every `grpc.RpcError` turned into a `CortexlensError` that carries the status code and the
server's message.

    from service.client import Client, explanation_text

    with Client("127.0.0.1:9000", token=None) as c:
        print(c.health())                          # "SERVING"
        info = c.model()                           # pb.ModelInfo
        pred = c.decode(rec.session_id, rec.unit_ids, rec.traces[-30:], rec.timestamps[-30:])
        with c.stream(rec, realtime=True, speed=1.0) as s:
            for item in s:                         # StreamItem(kind, message, latency_ms, ...)
                if item.kind == "prediction":
                    print(item.latency_ms, explanation_text(item.message.tasks[0]))
        print(s.stats().to_dict())

Streaming: `Client.stream` opens one bidirectional ``StreamSession`` for one recording session.
The frames are produced by a generator that gRPC consumes in its own sending thread, paced at
their timestamps (``realtime=True``, divided by ``speed``) or as fast as the server takes them
(``realtime=False``; gRPC flow control then sets the pace). The send time of every frame
(``time.perf_counter``) is recorded just before it is handed to gRPC, so every prediction comes
back with ``latency_ms`` = time from sending its frame to receiving its prediction. When the call
ends (server done, error, or the caller stops iterating) the sending side stops too.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np

from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg

if TYPE_CHECKING:
    from models.data.recording import Recording

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "CortexlensError",
    "SessionStream",
    "StreamItem",
    "StreamStats",
    "explanation_text",
    "pack_frames",
    "retriable",
]

DEFAULT_TARGET = "127.0.0.1:9000"
_MiB = 1024 * 1024


class CortexlensError(Exception):
    """A gRPC call that failed: ``code`` (a `grpc.StatusCode`) and the server's ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str = "") -> None:
        self.code = code
        self.details = details or ""
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {self.details}")

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"INVALID_ARGUMENT"``."""
        return self.code.name

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, *, method: str = "") -> CortexlensError:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(err), method=method)


# --------------------------------------------------------------------------------------------
# Frames and explanations


def pack_frames(values: np.ndarray, timestamps: Sequence[float] | np.ndarray) -> pb.FrameBlock:
    """A `FrameBlock` of ``values`` ``[F, N]`` (little-endian float32, row-major) and F times."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"values must be 2-D [frames, cells], got shape {arr.shape}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if ts.shape[0] != arr.shape[0]:
        raise ValueError(f"{ts.shape[0]} timestamps for {arr.shape[0]} frames")
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return pb.FrameBlock(
        n_frames=arr.shape[0], n_cells=arr.shape[1], values=data, timestamps=ts.tolist()
    )


def _class_text(task: str, label: str) -> str:
    if task == "direction":
        try:
            float(label)
        except ValueError:
            return label
        return f"{label}°"
    return label


def explanation_text(task_prediction: pb.TaskPrediction, n: int = 3) -> str:
    """One line for a task's prediction and its top ``n`` SAE units.

    ``direction=90° p=0.71 | u12 +1.32 "direction 90°, OSI 0.71" | u3 -0.40 | ... | rest +0.12``

    Units are listed as the server ranked them (by |attribution|) with their attribution to the
    predicted class's logit and label; ``...`` marks units left out, and ``rest`` is the part of
    the logit the listed units do not explain (the server's ``unexplained`` plus the units left
    out), so the shown attributions and ``rest`` add up to the logit.
    """
    t = task_prediction
    label = t.predicted_label
    if not label and 0 <= t.predicted_class < len(t.class_names):
        label = t.class_names[t.predicted_class]
    if not label:
        label = str(t.predicted_class)
    head = f"{t.task}={_class_text(t.task, label)}"
    if 0 <= t.predicted_class < len(t.probabilities):
        head += f" p={t.probabilities[t.predicted_class]:.2f}"
    parts = [head]
    shown = list(t.units[: max(n, 0)])
    for u in shown:
        s = f"u{u.unit} {u.attribution:+.2f}"
        if u.label:
            s += f' "{u.label}"'
        parts.append(s)
    left_out = list(t.units[len(shown) :])
    if left_out:
        parts.append("...")
    rest = float(t.unexplained) + float(sum(u.attribution for u in left_out))
    parts.append(f"rest {rest:+.2f}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# Streaming


class StreamItem(NamedTuple):
    """One message from a session stream.

    ``kind`` is ``"accepted"`` (`pb.SessionAccepted`), ``"prediction"`` (`pb.Prediction`),
    ``"event"`` (`pb.StreamEvent`) or ``"closed"`` (`pb.SessionStatus`). ``latency_ms`` is set on
    predictions of frames sent by this stream: milliseconds from handing the frame to gRPC to
    receiving its prediction. ``received_at`` is the `time.perf_counter` of receipt.
    """

    kind: str
    message: Any
    latency_ms: float | None
    received_at: float

    @property
    def frame_index(self) -> int | None:
        """The decoded frame of a prediction, the first frame of an event, else None."""
        if self.kind == "prediction":
            return int(self.message.frame_index)
        if self.kind == "event":
            return int(self.message.first_frame_index)
        return None


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


@dataclass
class StreamStats:
    """What happened on a session stream (from the client's side)."""

    session_id: str
    frames_sent: int = 0
    predictions: int = 0
    events: dict[str, int] = field(default_factory=dict)
    #: (frame_index, latency_ms) of every prediction of a frame sent by this stream.
    latencies: list[tuple[int, float]] = field(default_factory=list)
    model_version: str = ""
    model_versions: list[str] = field(default_factory=list)
    accepted: pb.SessionAccepted | None = None
    closed: pb.SessionStatus | None = None
    elapsed_s: float = 0.0
    error: str | None = None
    #: times the stream reconnected (``reconnect``) and resumed after a retriable failure
    reconnects: int = 0
    #: the failures it retried after ("CODE: details"), every attempt of every outage
    reconnect_errors: list[str] = field(default_factory=list)

    @property
    def latencies_ms(self) -> np.ndarray:
        return np.array([lat for _, lat in self.latencies], dtype=np.float64)

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50, p90, p99, p999 and max of the frame-to-prediction latency (ms)."""
        lat = self.latencies_ms
        return {
            "p50": _pct(lat, 50),
            "p90": _pct(lat, 90),
            "p99": _pct(lat, 99),
            "p999": _pct(lat, 99.9),
            "max": float(lat.max()) if lat.size else None,
        }

    def to_dict(self, *, include_latencies: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "frames_sent": self.frames_sent,
            "predictions": self.predictions,
            "events": dict(sorted(self.events.items())),
            "latency_ms": self.latency_percentiles(),
            "model_version": self.model_version,
            "model_versions": list(self.model_versions),
            "elapsed_s": round(self.elapsed_s, 6),
            "frames_per_s": (
                round(self.frames_sent / self.elapsed_s, 3) if self.elapsed_s > 0 else None
            ),
            "error": self.error,
            "reconnects": self.reconnects,
        }
        if self.accepted is not None:
            a = self.accepted
            out["accepted"] = {
                "next_frame_index": int(a.next_frame_index),
                "decode_stride": int(a.decode_stride),
                "window_frames": int(a.window_frames),
                "decoding": bool(a.decoding),
                "n_cells_known": int(a.n_cells_known),
                "session_known": bool(a.session_known),
                "session_embedding_from": a.session_embedding_from,
            }
        if self.closed is not None:
            c = self.closed
            out["closed"] = {
                "state": pb.SessionStatus.State.Name(c.state),
                "frames_received": int(c.frames_received),
                "frames_recorded": int(c.frames_recorded),
                "frames_decoded": int(c.frames_decoded),
                "duplicates_dropped": int(c.duplicates_dropped),
                "frames_missing": int(c.frames_missing),
                "late_dropped": int(c.late_dropped),
                "late_filled": int(c.late_filled),
                "decodes_coalesced": int(c.decodes_coalesced),
            }
        if include_latencies:
            out["latencies"] = [
                {"frame_index": f, "latency_ms": round(lat, 4)} for f, lat in self.latencies
            ]
        return out


class SessionStream:
    """One ``StreamSession`` call. Iterate it (once) for `StreamItem`s; `stats()` at any time.

    Made by `Client.stream`; the call starts when iteration starts. Use it as a context manager
    (or call `close()`) so that stopping early cancels the call and stops the sending thread.
    """

    def __init__(
        self,
        stub: pbg.DecoderStub,
        open_msg: pb.SessionOpen,
        traces: np.ndarray,
        timestamps: np.ndarray,
        *,
        first: int,
        stop_at: int,
        realtime: bool,
        speed: float,
        block_frames: int,
        metadata: Sequence[tuple[str, str]],
        deadline_s: float | None,
        accept_timeout_s: float,
        wait_for_ready: bool,
        trials: np.ndarray | None = None,
        reconnect: int = 0,
        reconnect_timeout_s: float = 120.0,
    ) -> None:
        self._stub = stub
        self._reconnect = max(0, int(reconnect))
        self._reconnect_timeout_s = float(reconnect_timeout_s)
        self._attempt = 0  # bumped per reconnection: an older call's sender stops
        # [K, 4] start, end, direction, temporal_frequency: each is sent once its end is streamed
        self._trials = np.zeros((0, 4)) if trials is None else np.asarray(trials, dtype=np.float64)
        self._open = open_msg
        self._traces = traces
        self._ts = timestamps
        self._first = first
        self._stop_at = stop_at
        self._realtime = realtime
        self._speed = speed
        self._block = block_frames
        self._md = list(metadata)
        self._deadline_s = deadline_s
        self._accept_timeout_s = accept_timeout_s
        self._wait_for_ready = wait_for_ready

        # send time (perf_counter) per frame of [first, stop_at); NaN = not sent
        self._sent = np.full(max(stop_at - first, 0), np.nan, dtype=np.float64)
        self._stop = threading.Event()
        self._accepted_evt = threading.Event()
        self._sender_done = threading.Event()
        self._sender_error: BaseException | None = None
        self._gen: Iterator[pb.StreamRequest] | None = None
        self._call: Any = None
        self._started = False
        self._t_start = 0.0
        self._t_end: float | None = None
        self._stats = StreamStats(session_id=open_msg.session_id)

    # -- public -------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self._open.session_id

    @property
    def accepted(self) -> pb.SessionAccepted | None:
        return self._stats.accepted

    @property
    def sender_done(self) -> bool:
        """True once the sending side has finished (all frames sent, or stopped)."""
        return self._sender_done.is_set()

    def wait_sender(self, timeout: float | None = None) -> bool:
        """Wait until the sending side has finished; True if it has."""
        return self._sender_done.wait(timeout)

    def sent_at(self, frame_index: int) -> float | None:
        """`time.perf_counter` at which this stream handed frame ``frame_index`` to gRPC."""
        i = int(frame_index) - self._first
        if 0 <= i < self._sent.shape[0]:
            t = self._sent[i]
            return None if np.isnan(t) else float(t)
        return None

    def stats(self) -> StreamStats:
        """A summary so far (final once iteration has ended)."""
        end = self._t_end if self._t_end is not None else time.perf_counter()
        self._stats.elapsed_s = (end - self._t_start) if self._started else 0.0
        return self._stats

    def cancel(self) -> None:
        """Cancel the call, then stop sending (iteration then ends without an error). No
        `close` is sent, so the server leaves the session INTERRUPTED (resumable), not closed,
        even where its proxy shows the cancellation as the end of the input."""
        call = self._call
        if call is not None:
            call.cancel()
        self._stop.set()
        self._accepted_evt.set()

    def close(self) -> None:
        """Cancel the call if it is still running and stop the sending thread."""
        self._finish()

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamItem]:
        if self._started:
            raise RuntimeError("a SessionStream can be iterated only once")
        self._started = True
        self._t_start = time.perf_counter()
        give_up_at: float | None = None  # in an outage: reconnect until then
        outages = 0
        delay = 0.25
        try:
            while True:
                self._gen = self._requests()
                left = None
                if self._deadline_s is not None:
                    left = self._deadline_s - (time.perf_counter() - self._t_start)
                try:
                    self._call = self._stub.StreamSession(
                        self._gen,
                        metadata=self._md,
                        timeout=left,
                        # reconnecting: wait for the server to be reachable again
                        wait_for_ready=self._wait_for_ready or self._attempt > 0,
                    )
                    for resp in self._call:
                        if resp.WhichOneof("kind") == "accepted" and give_up_at is not None:
                            self._stats.reconnects += 1  # through: a later failure starts over
                            give_up_at, delay = None, 0.25
                        item = self._on_response(resp)
                        if item is not None:
                            yield item
                    return
                except grpc.RpcError as e:
                    if self._stop.is_set() and e.code() == grpc.StatusCode.CANCELLED:
                        return  # cancelled by us (cancel() or close()): a normal end
                    if self._sender_error is not None:
                        self._stats.error = repr(self._sender_error)
                        raise self._sender_error from e
                    err = CortexlensError.from_rpc(e, method="StreamSession")
                    now = time.monotonic()
                    if give_up_at is None:  # a new outage
                        outages += 1
                        give_up_at = now + self._reconnect_timeout_s
                    if (
                        outages <= self._reconnect
                        and retriable(err)
                        and now + delay < give_up_at
                        and not self._stop.is_set()
                    ):
                        self._stats.reconnect_errors.append(f"{err.code_name}: {err.details}")
                        self._new_attempt()
                        if self._stop.wait(delay):
                            return
                        delay = min(delay * 2, 5.0)
                        continue
                    self._stats.error = str(err)
                    raise err from e
        finally:
            self._finish()

    def _new_attempt(self) -> None:
        """Forget the failed call; the next one resumes the session where the server has it."""
        self._attempt += 1  # the old call's sender sees this and stops
        call = self._call
        if call is not None and call.is_active():
            call.cancel()
        if self._stats.accepted is not None or self._open.resume:
            # the session was opened (or is resumed anyway): continue it from the server's
            # next_frame_index (frames it recorded are not sent again)
            op = pb.SessionOpen()
            op.CopyFrom(self._open)
            op.resume = True
            self._open = op
        self._stats.accepted = None
        self._accepted_evt.clear()
        self._sender_done.clear()

    # -- internals ----------------------------------------------------------------------------
    def _on_response(self, resp: pb.StreamResponse) -> StreamItem | None:
        now = time.perf_counter()
        kind = resp.WhichOneof("kind")
        st = self._stats
        if kind == "accepted":
            st.accepted = resp.accepted
            self._note_model(resp.accepted.model.version)
            self._accepted_evt.set()
            return StreamItem("accepted", resp.accepted, None, now)
        if kind == "prediction":
            p = resp.prediction
            st.predictions += 1
            self._note_model(p.model.version)
            sent = self.sent_at(p.frame_index)
            lat = None if sent is None else (now - sent) * 1000.0
            if lat is not None:
                st.latencies.append((int(p.frame_index), lat))
            return StreamItem("prediction", p, lat, now)
        if kind == "event":
            ev = resp.event
            name = pb.StreamEvent.Kind.Name(ev.kind) if ev.kind in _EVENT_KINDS else str(ev.kind)
            st.events[name] = st.events.get(name, 0) + 1
            return StreamItem("event", ev, None, now)
        if kind == "closed":
            st.closed = resp.closed
            self._note_model(resp.closed.model.version)
            return StreamItem("closed", resp.closed, None, now)
        return None  # an empty or newer message kind: skipped

    def _note_model(self, version: str) -> None:
        if version and version != self._stats.model_version:
            self._stats.model_version = version
            self._stats.model_versions.append(version)

    def _finish(self) -> None:
        self._stop.set()
        self._accepted_evt.set()
        call = self._call
        if call is not None and call.is_active():
            call.cancel()
        gen = self._gen
        if gen is None or inspect.getgeneratorstate(gen) == inspect.GEN_CREATED:
            self._sender_done.set()  # never started: nothing will run
        if gen is not None:
            try:
                gen.close()  # parked at a yield: runs its `finally` now
            except ValueError:
                pass  # executing in gRPC's thread right now: it sees the stop flag and returns
        if self._started and self._t_end is None:
            self._t_end = time.perf_counter()

    def _requests(self) -> Iterator[pb.StreamRequest]:
        """Runs in gRPC's sending thread: the open message, then the frames, paced."""
        mine = self._attempt

        def stopped() -> bool:  # by the caller, or a reconnection replaced this call
            return self._stop.is_set() or self._attempt != mine

        try:
            yield pb.StreamRequest(open=self._open)
            # Frames go after `accepted` (with resume it says where to start); a server that
            # only answers once frames arrive still gets them after accept_timeout_s.
            self._accepted_evt.wait(self._accept_timeout_s)
            if stopped():
                return
            start = self._first
            acc = self._stats.accepted
            if self._open.resume and acc is not None and acc.next_frame_index > start:
                start = min(int(acc.next_frame_index), self._stop_at)
            t0 = time.perf_counter()
            ts0 = float(self._ts[start]) if start < self._stop_at else 0.0
            i = start
            while i < self._stop_at:
                j = min(i + self._block, self._stop_at)
                if self._realtime:
                    due = t0 + (float(self._ts[j - 1]) - ts0) / self._speed
                    wait = due - time.perf_counter()
                    if wait > 0 and self._stop.wait(wait):
                        return
                if stopped():
                    return
                due_trials = self._trials[
                    (self._trials[:, 1] <= float(self._ts[j - 1])) & (self._trials[:, 1] > -np.inf)
                ]
                if due_trials.size:
                    self._trials = self._trials[self._trials[:, 1] > float(self._ts[j - 1])]
                    yield trials_message(due_trials)
                msg = pb.StreamRequest(
                    frames=pb.Frames(
                        first_frame_index=i, block=pack_frames(self._traces[i:j], self._ts[i:j])
                    )
                )
                now = time.perf_counter()
                self._sent[i - self._first : j - self._first] = now
                self._stats.frames_sent += j - i
                yield msg
                i = j
            if self._trials.size and not stopped():  # trials ending after the last frame
                yield trials_message(self._trials)
                self._trials = self._trials[:0]
            if not stopped():  # the end of the session, said so (then gRPC half-closes)
                yield pb.StreamRequest(close=pb.SessionClose())
        except GeneratorExit:
            raise
        except BaseException as e:  # a bug on our side: surfaced instead of gRPC's CANCELLED
            self._sender_error = e
            raise
        finally:
            if self._attempt == mine:
                self._sender_done.set()


def retriable(err: CortexlensError) -> bool:
    """Whether a stream that failed with ``err`` may reconnect and resume (``reconnect``):

    - UNAVAILABLE: the server or one of its parts is restarting or draining;
    - INTERNAL from Serve's gRPC proxy when the ingress replica that held the stream died
      ("The actor died unexpectedly ...", "actor unavailable": a replica killed, or stopped
      after its graceful-shutdown timeout while the application was redeployed or deleted);
    - NOT_FOUND from Serve's proxy while the application is not deployed (yet): "Application
      ... not found ... ListApplications".

    Anything else (a bad request, a refused session) is final."""
    code, d = err.code, err.details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.INTERNAL:
        return any(
            k in d
            for k in ("actor died", "actor unavailable", "actordiederror", "actorunavailable")
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return "listapplications" in d and "application" in d
    return False


_EVENT_KINDS = set(pb.StreamEvent.Kind.values())


def trials_message(rows: np.ndarray) -> pb.StreamRequest:
    """Trials ``[K, 4]`` (start, end, direction, temporal_frequency) as a stream message."""
    return pb.StreamRequest(
        trials=pb.Trials(
            trials=[
                pb.Trial(
                    start=float(a), end=float(b), direction=float(d), temporal_frequency=float(f)
                )
                for a, b, d, f in np.asarray(rows, dtype=np.float64)
            ]
        )
    )


# --------------------------------------------------------------------------------------------
# Client


def _trial_rows(recording, *, first: int, stop_at: int, ts: np.ndarray) -> np.ndarray | None:
    """The recording's trials that end inside the streamed frames, as ``[K, 4]`` rows."""
    tr = getattr(recording, "trials", None)
    if tr is None or len(tr.start) == 0 or stop_at <= first:
        return None
    rows = np.stack([tr.start, tr.end, tr.direction, tr.temporal_frequency], axis=1).astype(
        np.float64
    )
    keep = (rows[:, 0] >= ts[first]) & (rows[:, 1] <= ts[stop_at - 1])
    return rows[keep] if keep.any() else None


def _read_bytes(x: bytes | str | Path | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()


class Client:
    """A synchronous client of one cortexlens server (one gRPC channel).

    Args:
        target: ``HOST:PORT`` of the server (Serve's gRPC proxy).
        token: bearer token, sent as ``authorization: Bearer <token>`` on every call.
        root_certificates: PEM bytes or a path; when given (or ``tls=True``) the channel uses
            TLS (``tls=True`` without certificates uses the system's roots), e.g. against the
            TLS front (`service.tls_front`).
        server_name: the host name to check the server's certificate against, when it differs
            from the target's host (e.g. a certificate for ``cortexlens.lab`` reached on an IP
            address); sets ``grpc.ssl_target_name_override``.
        client_cert, client_key: PEM bytes or paths of this client's certificate chain and key,
            for a server that requires mutual TLS (``tls.client_ca``).
        timeout_s: deadline of every unary call.
        max_message_mb: maximum size of a sent or received message.
        metadata: extra metadata sent on every call (e.g. Serve's ``application`` routing key).
        wait_for_ready: wait for the channel to connect instead of failing fast (UNAVAILABLE).
        options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        tls: bool = False,
        server_name: str | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        timeout_s: float = 10.0,
        max_message_mb: float = 64.0,
        metadata: Mapping[str, str] | None = None,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = float(timeout_s)
        self.wait_for_ready = wait_for_ready
        max_bytes = int(max_message_mb * _MiB)
        opts = [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            *options,
        ]
        roots = _read_bytes(root_certificates)
        chain, pkey = _read_bytes(client_cert), _read_bytes(client_key)
        if (chain is None) != (pkey is None):
            raise ValueError("give both client_cert and client_key (mutual TLS), or neither")
        if roots is not None or tls or chain is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=pkey, certificate_chain=chain
            )
            if server_name:
                opts.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        md = [(k.lower(), str(v)) for k, v in (metadata or {}).items()]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(md)
        self._stub = pbg.DecoderStub(self._channel)
        self._jobs = pbg.RetrainingStub(self._channel)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_until_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected; `CortexlensError` UNAVAILABLE otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise CortexlensError(
                grpc.StatusCode.UNAVAILABLE,
                f"no server reachable at {self.target} within {timeout_s:g} s",
            ) from None

    # -- unary --------------------------------------------------------------------------------
    def _unary(self, name: str, fn: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return fn(
                request,
                timeout=self.timeout_s if timeout_s is None else timeout_s,
                metadata=self._metadata,
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as e:
            raise CortexlensError.from_rpc(e, method=name) from e

    def decode(
        self,
        session_id: str,
        unit_ids: Sequence[str],
        values: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
        *,
        model: str = "",
        top_m: int = 0,
        frame_rate_hz: float = 0.0,
        timeout_s: float | None = None,
    ) -> pb.Prediction:
        """Decode one window ``values`` ``[F, N]`` (dF/F) of cells ``unit_ids`` ending now."""
        block = pack_frames(values, timestamps)
        if len(unit_ids) != block.n_cells:
            raise ValueError(f"{len(unit_ids)} unit ids for {block.n_cells} cells")
        req = pb.DecodeRequest(
            model=model,
            session_id=session_id,
            unit_ids=[str(u) for u in unit_ids],
            window=block,
            top_m=top_m,
            frame_rate_hz=frame_rate_hz,
        )
        return self._unary("Decode", self._stub.Decode, req, timeout_s).prediction

    def model(self, name: str = "", *, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model (``name`` empty: the default one)."""
        req = pb.GetModelRequest(model=name)
        return self._unary("GetModel", self._stub.GetModel, req, timeout_s)

    def units(
        self, variable: str = "", model: str = "", *, timeout_s: float | None = None
    ) -> pb.ListUnitsResponse:
        """SAE units with their labels (only those labelled for ``variable`` if given)."""
        req = pb.ListUnitsRequest(model=model, variable=variable)
        return self._unary("ListUnits", self._stub.ListUnits, req, timeout_s)

    def session(self, session_id: str, *, timeout_s: float | None = None) -> pb.SessionStatus:
        """Counters and state of a live or recorded session."""
        req = pb.GetSessionRequest(session_id=session_id)
        return self._unary("GetSession", self._stub.GetSession, req, timeout_s)

    # -- retraining ------------------------------------------------------------------------------
    def start_job(
        self,
        kind: str,
        session_ids: Sequence[str],
        *,
        model: str = "",
        workers: int = 0,
        epochs: int = 0,
        promote: bool | None = None,
        min_accuracy_delta: float | None = None,
        timeout_s: float | None = None,
    ) -> pb.Job:
        """Start a retraining job (``adapt``, ``sae_refit`` or ``finetune``) on recorded
        sessions; returns it QUEUED (watch it with `watch_job`)."""
        req = pb.StartJobRequest(
            kind=kind, session_ids=list(session_ids), model=model, workers=workers, epochs=epochs
        )
        if promote is not None:
            req.promote = promote
        if min_accuracy_delta is not None:
            req.min_accuracy_delta = min_accuracy_delta
        return self._unary("StartJob", self._jobs.StartJob, req, timeout_s)

    def job(self, job_id: str, *, timeout_s: float | None = None) -> pb.Job:
        return self._unary("GetJob", self._jobs.GetJob, pb.JobRef(job_id=job_id), timeout_s)

    def jobs(self, *, timeout_s: float | None = None) -> list[pb.Job]:
        r = self._unary("ListJobs", self._jobs.ListJobs, pb.ListJobsRequest(), timeout_s)
        return list(r.jobs)

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> pb.Job:
        return self._unary("CancelJob", self._jobs.CancelJob, pb.JobRef(job_id=job_id), timeout_s)

    def watch_job(self, job_id: str, *, timeout_s: float | None = None) -> Iterator[pb.Job]:
        """Progress updates of a job until it ends (the last one has its final state)."""
        try:
            yield from self._jobs.WatchJob(
                pb.JobRef(job_id=job_id), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise CortexlensError.from_rpc(e, method="WatchJob") from None

    def rollback(
        self, model: str = "", version: str = "", *, timeout_s: float | None = None
    ) -> pb.ModelRef:
        """Make ``version`` (default: the previous current one) current again; the replicas
        swap to it in place."""
        req = pb.RollbackRequest(model=model, version=version)
        return self._unary("Rollback", self._jobs.Rollback, req, timeout_s)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """Standard ``grpc.health.v1`` check: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._unary("Health.Check", stub.Check, req, timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # -- streaming ----------------------------------------------------------------------------
    def stream(
        self,
        recording: Recording | None = None,
        *,
        traces: np.ndarray | None = None,
        timestamps: Sequence[float] | np.ndarray | None = None,
        unit_ids: Sequence[str] | None = None,
        session_id: str | None = None,
        subject_id: str | None = None,
        genetic_background: str | None = None,
        frame_rate_hz: float | None = None,
        realtime: bool = True,
        speed: float = 1.0,
        block_frames: int = 1,
        start_frame: int = 0,
        max_frames: int | None = None,
        decode_stride: int = 0,
        top_m: int = 0,
        model: str = "",
        resume: bool = False,
        metadata: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
        accept_timeout_s: float | None = None,
        send_trials: bool = True,
        reconnect: int = 0,
        reconnect_timeout_s: float = 120.0,
    ) -> SessionStream:
        """Open a ``StreamSession`` for one recording session (starts when iterated).

        Give either a `Recording` or ``traces`` ``[T, N]`` + ``timestamps`` ``[T]`` +
        ``unit_ids`` + ``session_id`` (explicit arguments override the recording's fields).
        Frames ``[start_frame, start_frame + max_frames)`` are sent with their row numbers as
        frame indices, ``block_frames`` per message; with ``realtime`` each block leaves when its
        last frame is due (timestamps / ``speed``), otherwise as fast as the server takes them.
        ``resume`` continues an interrupted session from the server's ``next_frame_index``.
        ``metadata`` is recorded with the session (SessionOpen.metadata). With ``send_trials``
        the recording's stimulus trials are sent too, each once the frame at its end was sent
        (the labels retraining jobs learn from). ``deadline_s`` bounds
        the whole call (default none); frames wait up to ``accept_timeout_s`` (default: the
        client's ``timeout_s``) for the server's ``accepted``.

        ``reconnect`` (default 0: off): after a failure that `retriable` accepts (the server
        or a part of it restarting: UNAVAILABLE, a dead ingress replica's INTERNAL, the
        application not deployed yet), open the stream again with ``resume=true`` and go on
        from the server's ``next_frame_index``, through up to ``reconnect`` such outages: the
        iteration just continues (a second ``accepted`` marks the reconnection;
        ``stats().reconnects`` counts them). Within one outage, attempts wait for the channel
        to be ready, with a growing pause (0.25 s to 5 s), for at most ``reconnect_timeout_s``.
        Frames the server had not recorded when the call broke are sent again; predictions it
        had not sent for recorded frames are not repeated (the durable record has every frame).
        """
        if recording is not None:
            traces = recording.traces if traces is None else traces
            timestamps = recording.timestamps if timestamps is None else timestamps
            unit_ids = recording.unit_ids if unit_ids is None else unit_ids
            session_id = recording.session_id if session_id is None else session_id
            subject_id = recording.subject_id if subject_id is None else subject_id
            if genetic_background is None:
                genetic_background = recording.genetic_background
            frame_rate_hz = recording.sampling_rate if frame_rate_hz is None else frame_rate_hz
        if traces is None or timestamps is None or unit_ids is None or not session_id:
            raise ValueError("give a Recording or traces, timestamps, unit_ids and session_id")
        tr = np.asarray(traces)
        if tr.ndim != 2:
            raise ValueError(f"traces must be 2-D [frames, cells], got shape {tr.shape}")
        ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if ts.shape[0] != tr.shape[0]:
            raise ValueError(f"{ts.shape[0]} timestamps for {tr.shape[0]} frames")
        if len(unit_ids) != tr.shape[1]:
            raise ValueError(f"{len(unit_ids)} unit ids for {tr.shape[1]} cells")
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        if realtime and not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if not 0 <= start_frame <= tr.shape[0]:
            raise ValueError(f"start_frame {start_frame} outside [0, {tr.shape[0]}]")
        if frame_rate_hz is None:
            d = np.diff(ts)
            frame_rate_hz = float(1.0 / np.median(d)) if d.size else 0.0
        stop_at = tr.shape[0] if max_frames is None else min(tr.shape[0], start_frame + max_frames)
        open_msg = pb.SessionOpen(
            session_id=str(session_id),
            subject_id=subject_id or "",
            genetic_background=genetic_background or "",
            unit_ids=[str(u) for u in unit_ids],
            frame_rate_hz=float(frame_rate_hz),
            decode_stride=decode_stride,
            top_m=top_m,
            model=model,
            metadata={str(k): str(v) for k, v in (metadata or {}).items()},
            resume=resume,
            close_explicitly=True,  # a stream that ends without `close` went away
        )
        return SessionStream(
            self._stub,
            open_msg,
            tr,
            ts,
            first=int(start_frame),
            stop_at=int(stop_at),
            realtime=realtime and np.isfinite(speed),
            speed=float(speed),
            block_frames=int(block_frames),
            metadata=self._metadata,
            deadline_s=deadline_s,
            accept_timeout_s=self.timeout_s if accept_timeout_s is None else accept_timeout_s,
            wait_for_ready=self.wait_for_ready,
            trials=_trial_rows(recording, first=int(start_frame), stop_at=int(stop_at), ts=ts)
            if send_trials and recording is not None
            else None,
            reconnect=reconnect,
            reconnect_timeout_s=reconnect_timeout_s,
        )
