"""The bare gRPC baseline: ``cortexlens.v1.Decoder/StreamSession`` on a plain ``grpc.aio`` server
around one `service.engine.Engine` (one ONNX Runtime session), without Ray, Serve, session actors
or durable records: what gRPC + the model cost alone.

Per stream: the open message is planned (`Engine.plan`: unknown session ids borrow an embedding,
as in the service), frames go into a ring of one model window, and every ``decode_stride``-th
frame queues a decode. One batcher runs whatever windows queued while the previous batch ran (up
to ``--max-batch``, like ``@serve.batch`` with ``batch_wait_timeout_s=0``) in one `Engine.run` in
a worker thread; predictions go back in frame order, serialized by the service's own
`service.wire.prediction_pb` (same message, same cost), with queue/model/server-total timings.
Nothing is coalesced or dropped: if the model falls behind, latency grows.

    python -m loadtest.bare_server --bundle DIR [--port 0] [--max-batch 16] [--max-seconds 600]

Binds 127.0.0.1 only; prints ``{"port": P}`` on stdout when serving and stops by itself after
``--max-seconds`` (or on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

import grpc
import numpy as np

from service import wire
from service.engine import Engine, WindowItem
from service.ingest.errors import IngestError
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg


class _Ring:
    """The last ``w`` frames of one stream (values and times), in order."""

    def __init__(self, w: int, n: int):
        self.v = np.zeros((w, n), dtype=np.float32)
        self.t = np.zeros(w, dtype=np.float64)
        self.w, self.count = w, 0

    def push(self, values: np.ndarray, t: float) -> None:
        i = self.count % self.w
        self.v[i] = values
        self.t[i] = t
        self.count += 1

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.count, self.w)
        idx = (np.arange(self.count - k, self.count)) % self.w
        return self.v[idx], self.t[idx]


class BareDecoder(pbg.DecoderServicer):
    def __init__(self, engine: Engine, max_batch: int):
        self.eng = engine
        self.max_batch = max(1, int(max_batch))
        self.q: asyncio.Queue = asyncio.Queue()

    async def batcher(self) -> None:
        while True:
            jobs = [await self.q.get()]
            while len(jobs) < self.max_batch and not self.q.empty():
                jobs.append(self.q.get_nowait())
            jobs = [j for j in jobs if not j[2].done()]  # streams that ended cancel theirs
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                res = await asyncio.to_thread(self.eng.run, [j[0] for j in jobs])
            except Exception as e:  # noqa: BLE001 - fail these decodes, keep serving
                res = [e] * len(jobs)
            for (_, t_q, fut), r in zip(jobs, res, strict=True):
                if not fut.done():
                    if isinstance(r, Exception):
                        fut.set_exception(r)
                    else:
                        fut.set_result((r, (t0 - t_q) * 1e3))

    async def StreamSession(self, request_iterator, context):  # noqa: N802 - gRPC method name
        eng = self.eng
        out: asyncio.Queue = asyncio.Queue()
        st: dict = {}
        pending: list[asyncio.Future] = []

        async def read() -> None:
            try:
                async for req in request_iterator:
                    kind = req.WhichOneof("kind")
                    if kind == "open":
                        op = req.open
                        plan = eng.plan(op.session_id, list(op.unit_ids))
                        rate = float(op.frame_rate_hz) or 30.0
                        st.update(
                            plan=plan,
                            sid=op.session_id,
                            stride=int(op.decode_stride) or 1,
                            top_m=int(op.top_m),
                            ring=_Ring(eng.window_frames(rate), len(op.unit_ids)),
                        )
                        acc = pb.SessionAccepted(
                            session_id=op.session_id,
                            model=wire.model_ref_pb(eng.ref),
                            decode_stride=st["stride"],
                            window_frames=st["ring"].w,
                            decoding=plan.decodable,
                            n_cells_known=plan.n_known,
                            session_known=plan.session_known,
                            session_embedding_from=plan.embedding_from,
                        )
                        await out.put(pb.StreamResponse(accepted=acc))
                        continue
                    t_in = time.perf_counter()
                    fr = req.frames
                    b = fr.block
                    vals = np.frombuffer(b.values, dtype="<f4").reshape(b.n_frames, b.n_cells)
                    ring: _Ring = st["ring"]
                    for k in range(b.n_frames):
                        j = int(fr.first_frame_index) + k
                        ring.push(vals[k], float(b.timestamps[k]))
                        if (j + 1) % st["stride"] == 0 and st["plan"].decodable:
                            v, t = ring.window()
                            item = WindowItem(st["plan"], v, t, float(t[-1]), st["top_m"])
                            fut = asyncio.get_running_loop().create_future()
                            pending.append(fut)
                            await self.q.put((item, time.perf_counter(), fut))
                            await out.put((j, float(t[-1]), fut, t_in))
            finally:
                await out.put(None)

        reader = asyncio.ensure_future(read())
        decoded = 0
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, pb.StreamResponse):
                    await context.write(item)
                    continue
                j, ts, fut, t_in = item
                d, queue_ms = await fut
                pending.remove(fut)
                decoded += 1
                pred = wire.prediction_pb(
                    d,
                    session_id=st["sid"],
                    frame_index=j,
                    timestamp=ts,
                    ref=eng.ref,
                    method=eng.method,
                    queue_ms=queue_ms,
                    server_total_ms=(time.perf_counter() - t_in) * 1e3,
                )
                await context.write(pb.StreamResponse(prediction=pred))
            reader.result()
            if st:
                ring = st["ring"]
                closed = pb.SessionStatus(
                    session_id=st["sid"],
                    state=pb.SessionStatus.CLOSED,
                    frames_received=ring.count,
                    frames_recorded=0,
                    frames_decoded=decoded,
                    last_frame_index=ring.count - 1,
                    n_cells=ring.v.shape[1],
                    model=wire.model_ref_pb(eng.ref),
                )
                await context.write(pb.StreamResponse(closed=closed))
        except IngestError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        finally:
            if not reader.done():
                reader.cancel()
            for f in pending:  # a stream that ended (or was cancelled) leaves no backlog
                f.cancel()


async def serve(bundle: str, port: int, max_batch: int, threads: int, max_seconds: float) -> None:
    eng = Engine(bundle, threads=threads)
    servicer = BareDecoder(eng, max_batch)
    batcher = asyncio.ensure_future(servicer.batcher())
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
    )
    pbg.add_DecoderServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"port": bound}), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        print(f"bare_server: stopping after {max_seconds:g} s", file=sys.stderr)
    await server.stop(1.0)
    batcher.cancel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this")
    a = ap.parse_args(argv)
    asyncio.run(serve(a.bundle, a.port, a.max_batch, a.threads, a.max_seconds))


if __name__ == "__main__":
    main()
