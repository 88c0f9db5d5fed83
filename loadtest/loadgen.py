"""The load generator: N concurrent ``cortexlens.v1.Decoder/StreamSession`` calls paced at R Hz.

One asyncio event loop (``grpc.aio``) drives every session, one channel (HTTP/2 connection) per
session as independent rigs would have. A session opens, waits for ``accepted``, then sends one
frame per message on an absolute schedule (``t0 + phase + i / rate``; the sessions' phases are
spread over one frame period unless ``aligned``), records the send time of every frame just
before it is handed to gRPC, and reads predictions concurrently; per prediction the latency is
receive time minus the send time of its frame. After the last frame it half-closes and waits
(bounded) for the server's ``closed``. The same generator drives the Serve application and the
bare gRPC baseline (`loadtest.bare_server`), so both see the same load.

Per session it keeps: frames sent, the send lag (how late the generator itself sent each frame,
to show it kept up), the decodes expected (frames ``j`` with ``(j + 1) % stride == 0``),
predictions received with latency and the server's timings (queue, model, server total, batch
size), events, and the closing status (decodes coalesced under backpressure).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg

_MiB = 1024 * 1024


@dataclass(frozen=True)
class SessionSpec:
    """One simulated rig: frames ``traces[start:]`` sent as frames 0, 1, ... of ``session_id``."""

    session_id: str
    unit_ids: tuple[str, ...]
    traces: np.ndarray  # [T, N] float32 (shared between sessions; read only)
    timestamps: np.ndarray  # [T] seconds
    start: int = 0


@dataclass
class SessionResult:
    session_id: str
    frames_sent: int = 0
    expected: int = 0  # decodes the stride asks for among the frames sent
    send_lag_ms: list[float] = field(default_factory=list)
    # per prediction: frame index, latency ms, queue ms, model ms, server total ms, batch size
    preds: list[tuple[int, float, float, float, float, int]] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    coalesced: int = 0
    closed: bool = False
    accepted: bool = False
    error: str | None = None


@dataclass
class LoadResult:
    target: str
    sessions: list[SessionResult]
    rate_hz: float
    seconds: float
    stride: int
    duration_s: float  # from the first scheduled frame to the last prediction received
    open_s: float  # time to open every session
    client_cpu_s: float  # CPU time of this process during the run (generator overhead)

    def latencies_ms(self) -> np.ndarray:
        return np.array([p[1] for s in self.sessions for p in s.preds], dtype=np.float64)


def _open_msg(spec: SessionSpec, rate: float, stride: int, top_m: int) -> pb.StreamRequest:
    return pb.StreamRequest(
        open=pb.SessionOpen(
            session_id=spec.session_id,
            subject_id=f"{spec.session_id}-mouse",
            unit_ids=list(spec.unit_ids),
            frame_rate_hz=float(rate),
            decode_stride=int(stride),
            top_m=int(top_m),
            metadata={"origin": "loadtest"},
            close_explicitly=True,
        )
    )


async def _session(
    spec: SessionSpec,
    target: str,
    *,
    rate: float,
    n_frames: int,
    stride: int,
    top_m: int,
    start_at: asyncio.Future,
    phase_s: float,
    opened: asyncio.Queue,
    open_timeout_s: float,
    drain_s: float,
) -> SessionResult:
    res = SessionResult(spec.session_id)
    opts = [
        ("grpc.max_send_message_length", 64 * _MiB),
        ("grpc.max_receive_message_length", 64 * _MiB),
    ]
    sent = np.full(n_frames, np.nan)
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        call = pbg.DecoderStub(ch).StreamSession()
        done_sending = asyncio.Event()
        closed = asyncio.Event()

        async def reader() -> None:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                now = time.perf_counter()
                kind = resp.WhichOneof("kind")
                if kind == "prediction":
                    p = resp.prediction
                    j = int(p.frame_index)
                    t = sent[j] if 0 <= j < n_frames else np.nan
                    tm = p.timings
                    res.preds.append(
                        (
                            j,
                            (now - t) * 1e3,
                            tm.queue_ms,
                            tm.model_ms,
                            tm.server_total_ms,
                            int(tm.batch_size),
                        )
                    )
                elif kind == "accepted":
                    res.accepted = True
                    await opened.put(spec.session_id)
                elif kind == "event":
                    name = pb.StreamEvent.Kind.Name(resp.event.kind)
                    res.events[name] = res.events.get(name, 0) + 1
                elif kind == "closed":
                    res.coalesced = int(resp.closed.decodes_coalesced)
                    res.closed = True
                    closed.set()

        rd = asyncio.ensure_future(reader())
        try:
            await call.write(_open_msg(spec, rate, stride, top_m))
            t_open = time.perf_counter()
            while not res.accepted:
                if rd.done():
                    rd.result()  # raises the call's error
                    raise RuntimeError("stream ended before `accepted`")
                if time.perf_counter() - t_open > open_timeout_s:
                    raise TimeoutError(f"no `accepted` after {open_timeout_s:g} s")
                await asyncio.sleep(0.005)
            t0 = await start_at
            n = spec.traces.shape[0]
            for i in range(n_frames):
                due = t0 + phase_s + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                if rd.done():
                    break
                r = (spec.start + i) % n
                block = pb.FrameBlock(
                    n_frames=1,
                    n_cells=spec.traces.shape[1],
                    values=spec.traces[r].astype("<f4", copy=False).tobytes(),
                    timestamps=[float(spec.timestamps[0]) + i / rate],
                )
                msg = pb.StreamRequest(frames=pb.Frames(first_frame_index=i, block=block))
                now = time.perf_counter()
                sent[i] = now
                res.send_lag_ms.append((now - due) * 1e3)
                res.frames_sent += 1
                await call.write(msg)
            await call.write(pb.StreamRequest(close=pb.SessionClose()))
            await call.done_writing()
            done_sending.set()
            try:
                await asyncio.wait_for(closed.wait(), drain_s)
            except TimeoutError:
                pass
        except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as e:
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            res.error = f"{type(e).__name__}: {detail}"
        finally:
            if not rd.done():
                if res.closed:
                    try:
                        await asyncio.wait_for(rd, 1.0)
                    except (TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
                        pass
                call.cancel()
                rd.cancel()
            try:
                await rd
            except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
                if isinstance(e, grpc.aio.AioRpcError) and res.error is None and not res.closed:
                    if e.code() != grpc.StatusCode.CANCELLED:
                        res.error = f"{e.code().name}: {e.details()}"
            if not res.accepted:
                await opened.put(spec.session_id)  # never block the others' start
    res.expected = sum(1 for j in range(res.frames_sent) if (j + 1) % stride == 0)
    return res


async def run_load(
    target: str,
    specs: list[SessionSpec],
    *,
    rate: float,
    seconds: float,
    stride: int = 1,
    top_m: int = 0,
    aligned: bool = False,
    open_timeout_s: float = 60.0,
    drain_s: float = 5.0,
    on_start=None,
) -> LoadResult:
    """Stream every session of ``specs`` for ``seconds`` at ``rate`` Hz against ``target``.

    Sessions open concurrently; the frames start together (0.2 s after the last ``accepted``;
    ``on_start()`` is called then, and ``client_cpu_s`` counts from then),
    each session offset by ``k / (N * rate)`` unless ``aligned``. Bounded: opening by
    ``open_timeout_s``, sending by ``seconds``, draining by ``drain_s``.
    """
    n = len(specs)
    n_frames = max(1, int(round(seconds * rate)))
    loop = asyncio.get_running_loop()
    start_at: asyncio.Future = loop.create_future()
    opened: asyncio.Queue = asyncio.Queue()
    cpu0 = time.process_time()
    t_open = time.perf_counter()
    tasks = [
        asyncio.ensure_future(
            _session(
                s,
                target,
                rate=rate,
                n_frames=n_frames,
                stride=stride,
                top_m=top_m,
                start_at=start_at,
                phase_s=0.0 if aligned else k / (n * rate),
                opened=opened,
                open_timeout_s=open_timeout_s,
                drain_s=drain_s,
            )
        )
        for k, s in enumerate(specs)
    ]
    for _ in range(n):
        try:
            await asyncio.wait_for(opened.get(), open_timeout_s + 5)
        except TimeoutError:
            break
    open_s = time.perf_counter() - t_open
    if on_start is not None:
        on_start()  # e.g. start counting CPU time
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.2
    start_at.set_result(t0)
    results = await asyncio.gather(*tasks)
    t_end = time.perf_counter()
    return LoadResult(
        target=target,
        sessions=list(results),
        rate_hz=rate,
        seconds=seconds,
        stride=stride,
        duration_s=t_end - t0,
        open_s=open_s,
        client_cpu_s=time.process_time() - cpu0,
    )


def run_load_sync(target: str, specs: list[SessionSpec], **kw) -> LoadResult:
    """`run_load` in a fresh event loop (the caller's thread)."""
    return asyncio.run(run_load(target, specs, **kw))
