"""The Ray Serve application: gRPC ingress, decoder deployment, one ingestion actor per session.

::

    client ──gRPC──> Serve gRPC proxy ──> Ingress (servicer methods of cortexlens.v1.Decoder and
                                          │          grpc.health.v1.Health)
                                          ├──> SessionActor "session:<id>" (Ray actor per live
                                          │     session: SessionBuffer + durable FrameRecord)
                                          └──> DecoderModel (ONNX Runtime `Engine`, @serve.batch
                                                across sessions, reconfigured in place)

The classes here are thin shells over plain objects (`service.engine.Engine`,
`service.ingest.SessionBuffer`, `service.wire`); `build_app(args)` is the Serve config file's
``import_path`` (``service.app:build_app``) and ``args`` are `ServiceSettings`.

Errors reach clients as gRPC status codes with a message a person can act on (`IngestError`
carries the code); a bad request ends only its own call or stream, never a replica or another
session. A stream that ends with an error (or a vanished client) leaves its session INTERRUPTED:
its record is kept and the client can reconnect with ``resume=true``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from service import wire
from service.engine import Decoded, Engine, ModelRef, WindowItem
from service.ingest import IngestConfig, IngestError, SessionBuffer, record_status, session_dir
from service.metrics import Metrics
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.servicers import Malformed
from service.settings import NAMESPACE, ServiceSettings

log = logging.getLogger("cortexlens.app")

SERVICE_NAME = "cortexlens.v1.Decoder"
ACTOR_PREFIX = "session:"
TRIALS_FILE = "trials.jsonl"  # stimulus trials sent on a stream, beside its record
PUSH_RETRIES = 20  # tries of one block while a session actor restarts (~0.1 s apart, growing)
CLOSE_GRACE_S = 2.5  # wait before closing a record cleanly after the client's input ended
DECODE_RETRY_S = 30.0  # how long one decode waits through the death of a decoder replica
INTERRUPT_WAIT_S = 10.0  # how long an ending stream waits for its session actor to release


# -- messages between the ingress and the decoder deployment ---------------------------------------
@dataclass(frozen=True)
class DecodeJob:
    session_id: str
    units_key: str  # wire.units_key(unit_ids)
    values: np.ndarray  # [F, N] float32, NaN rows = missing frames
    frame_times: np.ndarray  # [F]
    end_time: float
    top_m: int
    model: str = ""  # the model name the client asked for ("" = whatever is served)


@dataclass(frozen=True)
class DecodeOut:
    decoded: Decoded
    ref: ModelRef
    method: str
    queue_ms: float


@dataclass(frozen=True)
class PlanInfo:
    decodable: bool
    n_known: int
    session_known: bool
    embedding_from: str
    window_s: float
    top_m: int
    ref: ModelRef


def resolve_model(
    s: ServiceSettings, model: str = "", version: str = "", bundle: str = ""
) -> tuple[Path, str]:
    """The bundle directory to serve and its model name (explicit bundle, else the registry)."""
    bundle = bundle or s.bundle
    if bundle:
        p = Path(bundle)
        return p, model or p.name
    from models.registry import Registry

    name = model or s.model
    reg = Registry(s.registry_dir(), create=False)
    b = reg.open(name, version or s.version or None)
    return b.path, name


# -- decoder deployment ----------------------------------------------------------------------------
@serve.deployment(
    name="DecoderModel",
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=5,
)
class DecoderModel:
    """A bundle's ONNX graph behind `@serve.batch`; ``user_config`` swaps the model in place:
    ``{"model": NAME, "version": VERSION, "bundle": PATH}`` (any subset; empty = settings)."""

    def __init__(self, settings: dict):
        self.settings = ServiceSettings.model_validate(settings)
        self.engine: Engine | None = None
        self._plans: dict[tuple[str, str, str], object] = {}
        self._cfg: dict = {}
        self._lock = threading.Lock()
        self._load({})
        self._batch.set_max_batch_size(self.settings.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        if self.settings.follow_current_s > 0:
            threading.Thread(target=self._follow, daemon=True, name="follow-current").start()

    def _load(self, cfg: dict) -> None:
        with self._lock:
            path, name = resolve_model(
                self.settings, cfg.get("model", ""), cfg.get("version", ""), cfg.get("bundle", "")
            )
            self._cfg = dict(cfg)
            if self.engine is not None and Path(self.engine.bundle.path) == Path(path):
                return
            st = self.settings
            eng = Engine(
                path,
                name=name,
                threads=st.threads,
                providers=st.providers,
                trt_fp16=st.trt_fp16,
                trt_cache_dir=st.resolved_trt_cache(),
                io_binding=st.io_binding,
                fixed_shapes=st.fixed_shapes,
            )
            self.engine, self._plans = eng, {}  # one assignment: a running batch keeps its engine
            log.info("serving %s %s from %s", eng.ref.name, eng.ref.version, path)

    def _follows_current(self) -> bool:
        """Serving the registry's current version (not a pinned version or a bundle path)."""
        c, s = self._cfg, self.settings
        return not (c.get("bundle") or c.get("version") or s.bundle or s.version)

    def _follow(self) -> None:
        """Hot swap: when the registry's current version changes (promotion, rollback), load it
        and swap the engine in place between batches."""
        from models.registry import Registry

        while True:
            time.sleep(self.settings.follow_current_s)
            if not self._follows_current():
                continue
            try:
                name = self._cfg.get("model") or self.settings.model
                cur = Registry(self.settings.registry_dir(), create=False).current(name)
                if cur and self.engine is not None and cur != self.engine.ref.version:
                    self._load(self._cfg)
            except Exception:  # noqa: BLE001 - keep serving the loaded model; retry next tick
                log.exception("could not follow the registry's current version")

    def reconfigure(self, user_config: dict) -> None:
        self._load(dict(user_config or {}))

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no model loaded")

    def _plan(self, eng: Engine, session_id: str, key: str):
        k = (eng.ref.version, session_id, key)
        p = self._plans.get(k)
        if p is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            p = self._plans[k] = eng.plan(session_id, wire.split_units_key(key))
        return p

    async def plan_info(self, session_id: str, key: str) -> PlanInfo:
        eng = self.engine
        p = self._plan(eng, session_id, key)
        return PlanInfo(
            p.decodable, p.n_known, p.session_known, p.embedding_from, eng.window_s, eng.top_m,
            eng.ref,
        )  # fmt: skip

    async def model_info(self) -> dict:
        return self.engine.model_info()

    async def ref(self) -> ModelRef:
        """The served model (a cheap call for health checks)."""
        return self.engine.ref

    async def units(self, variable: str = "") -> tuple[ModelRef, list[dict]]:
        eng = self.engine
        return eng.ref, eng.units(variable)

    async def decode(self, job: DecodeJob) -> DecodeOut:
        out = await self._batch((job, time.perf_counter()))
        if isinstance(out, Exception):
            raise out
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, reqs: list[tuple[DecodeJob, float]]) -> list:
        eng = self.engine
        t0 = time.perf_counter()
        outs: list = [None] * len(reqs)
        items, where = [], []
        for i, (job, _) in enumerate(reqs):
            try:
                if job.model and job.model != eng.ref.name:
                    raise IngestError(
                        "NOT_FOUND",
                        f"model {job.model!r} is not served here (this server serves "
                        f"{eng.ref.name!r}); leave model empty for the default",
                    )
                plan = self._plan(eng, job.session_id, job.units_key)
                if not plan.decodable:
                    raise IngestError(
                        "FAILED_PRECONDITION",
                        f"model {eng.ref.name} {eng.ref.version} knows none of the "
                        f"{len(plan.unit_ids)} cells of session {job.session_id!r}; adapt the "
                        "model to this session first",
                    )
                items.append(WindowItem(plan, job.values, job.frame_times, job.end_time, job.top_m))
                where.append(i)
            except IngestError as e:
                outs[i] = e
        if items:
            try:
                res = await asyncio.to_thread(eng.run, items)
            except IngestError as e:
                res = [e] * len(items)
            for i, r in zip(where, res, strict=True):
                if isinstance(r, Exception):
                    outs[i] = r
                else:
                    queue_ms = (t0 - reqs[i][1]) * 1e3
                    outs[i] = DecodeOut(r, eng.ref, eng.method, queue_ms)
        return outs


# -- ingestion actor -------------------------------------------------------------------------------
class SessionActor:
    """One live session: `SessionBuffer` with its durable `FrameRecord`. Restarted by Ray when
    its process dies; a restarted actor reopens the record (every acknowledged frame is on disk)
    and continues after the last recorded frame."""

    def __init__(self, directory: str, open_kwargs: dict, ingest: dict, resume: bool, sync: bool):
        self._args = (directory, open_kwargs, ingest, sync)
        self.buf: SessionBuffer | None = None
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.epoch = 0
        self.n_trials = 0
        if self.restarted:  # the process died: reopen the record and continue after it
            self.start(True)

    def start(self, resume: bool) -> None:
        """Open (or resume) the session and its record; raises `IngestError` on refusal."""
        if self.buf is not None:
            return
        directory, open_kwargs, ingest, sync = self._args
        self.buf = SessionBuffer.open(
            directory, config=IngestConfig(**ingest), resume=resume, sync=sync, **open_kwargs
        )
        tf = Path(directory) / TRIALS_FILE
        if tf.exists():
            self.n_trials = sum(1 for line in tf.read_text().splitlines() if line.strip())

    def hello(self) -> dict:
        return {
            "next_frame_index": self.buf.next_frame_index,
            "status": self.buf.status(),
            "restarted": self.restarted,
            "pid": os.getpid(),
            "state": self.buf.state,
            "n_trials": self.n_trials,
        }

    def attach(self) -> tuple[int, str]:
        """A stream takes the session over (a resumed stream supersedes an older one); returns
        the new epoch and the session's state (not LIVE: the actor is ending, start afresh)."""
        self.epoch += 1
        return self.epoch, (self.buf.state if self.buf is not None else "LIVE")

    def _check(self, epoch: int) -> None:
        if self.epoch == 0:  # restarted: the first stream that comes back owns it again
            self.epoch = epoch
        if epoch != self.epoch:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"session {self.buf.session_id!r} was taken over by a newer stream (resume)",
            )

    def _pop(self, max_pop: int) -> list[tuple]:
        out = []
        while len(out) < max_pop:
            t = self.buf.pop_decode()
            if t is None:
                break
            w = t.window
            out.append((t.frame_index, t.timestamp, w.values, w.timestamps, t.enqueued_at))
        return out

    def push(
        self,
        epoch: int,
        first: int,
        data: bytes,
        n_frames: int,
        n_cells: int,
        timestamps: list[float],
        max_pop: int,
    ) -> dict:
        self._check(epoch)
        r = self.buf.push_bytes(first, data, n_frames, n_cells, timestamps)
        return {
            "events": r.events,
            "accepted": r.frames_accepted,
            "duplicates": r.duplicates,
            "late": r.late,
            "coalesced": r.decodes_coalesced,
            "next": r.next_frame_index,
            "decodes": self._pop(max_pop),
        }

    def pop(self, epoch: int, max_pop: int) -> list[tuple]:
        self._check(epoch)
        return self._pop(max_pop)

    def finish(self, epoch: int) -> dict:
        """Client half-closed: commit frames held behind holes, return the last decodes."""
        self._check(epoch)
        r = self.buf.flush()
        return {"events": r.events, "decodes": self._pop(1 << 30)}

    def add_trials(self, epoch: int, trials: list[dict]) -> int:
        """Append stimulus trials to ``trials.jsonl`` beside the record (fsync'd); returns how
        many the session holds. The labels retraining jobs learn from."""
        self._check(epoch)
        for i, t in enumerate(trials):
            s, e = t["start"], t["end"]
            if not (np.isfinite(s) and np.isfinite(e) and e > s):
                raise IngestError(
                    "INVALID_ARGUMENT",
                    f"trial {i}: start {s} and end {e} must be finite with end > start (seconds "
                    "on the session's clock)",
                )
        path = Path(self.buf.record.directory) / TRIALS_FILE
        lines = "".join(json.dumps(t, allow_nan=True) + "\n" for t in trials)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.n_trials += len(trials)
        return self.n_trials

    def mark_decoded(self, n: int) -> None:
        self.buf.mark_decoded(n)

    def status(self) -> dict:
        return self.buf.status()

    def close(self, epoch: int) -> dict:
        self._check(epoch)
        return self.buf.close()

    def interrupt(self, epoch: int) -> dict:
        """The stream ended without a clean close: sync and release the record (resumable)."""
        if epoch != self.epoch or self.buf is None:
            return {"released": False}
        st = self.buf.status()
        if self.buf.record is not None:
            self.buf.record.close()
        self.buf.state = "INTERRUPTED"
        st["state"] = "INTERRUPTED"
        st["released"] = True
        return st

    def pid(self) -> int:
        return os.getpid()


SessionActorRemote = ray.remote(SessionActor)


_ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def _session_call(actor, method: str, *args) -> ray.ObjectRef:
    """Submit ``actor.method(*args)`` outside the gRPC request's task context.

    Ray makes an actor call submitted while a request runs a *child* of that request, and Serve
    cancels a request whose client went away recursively: every call of it still queued on the
    session actor is cancelled too. For the session actor that is wrong twice over: frames the
    server already received are dropped instead of recorded, and a call cancelled before it was
    sent leaves a hole in Ray's in-order queue of this replica's calls to the actor, so the
    stream's final ``interrupt`` waited 30 s behind it and was then cancelled as well (the
    session stayed LIVE). Submitted from an empty context, the calls belong to the replica, not
    to the request, and run in order whatever happens to the request."""
    return contextvars.Context().run(getattr(actor, method).remote, *args)


async def _through_restarts(
    call: Callable[[], Awaitable[Any]],
    *,
    tries: int | None = None,
    within_s: float | None = None,
    growth: float = 1.5,
    warn: str = "",
) -> tuple[Any, int]:
    """``await call()``, calling again while the actor behind it is dead or restarting (Ray
    restarts a session actor; Serve replaces a replica): pauses 0.05 s, growing by ``growth``
    up to 1 s. Gives up (re-raises) after ``tries`` calls, or when the next call would start
    after ``within_s``. Returns (result, retries). ``warn``: logged at each retry."""
    deadline = None if within_s is None else time.monotonic() + within_s
    delay, retries = 0.05, 0
    while True:
        try:
            return await call(), retries
        except _ACTOR_GONE:
            if (tries is not None and retries + 1 >= tries) or (
                deadline is not None and time.monotonic() + delay > deadline
            ):
                raise
            if warn:
                log.warning("%s; retrying in %.2f s", warn, delay)
            await asyncio.sleep(delay)
            delay = min(delay * growth, 1.0)
            retries += 1


async def _decode(decoder: DeploymentHandle, job: DecodeJob) -> DecodeOut:
    """Decode one window, waiting through the death of the decoder replica that had it (Serve
    starts another one; until it is up the handle's calls fail with `RayActorError`). A decode
    is a pure function of the window, so running it again is safe. Gives up (the error becomes
    UNAVAILABLE) after `DECODE_RETRY_S`."""
    out, _ = await _through_restarts(
        lambda: decoder.decode.remote(job),
        within_s=DECODE_RETRY_S,
        growth=2.0,
        warn="decoder replica lost during a decode",
    )
    return out


def _parsed(request) -> None:
    """INVALID_ARGUMENT for a request whose bytes did not parse (`service.servicers`)."""
    if isinstance(request, Malformed):
        raise _Abort("INVALID_ARGUMENT", request.describe())


def _actor_name(session_id: str) -> str:
    return ACTOR_PREFIX + session_id


def _cause(e: BaseException) -> BaseException:
    """The user-level exception inside a RayTaskError (an IngestError raised in an actor)."""
    if isinstance(e, ray.exceptions.RayTaskError):
        c = e.cause if getattr(e, "cause", None) is not None else e.as_instanceof_cause()
        return c
    return e


# -- ingress ---------------------------------------------------------------------------------------
class _Abort(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message


def _fail(ctx, code: str, message: str) -> None:
    if ctx is not None:
        ctx.set_code(getattr(grpc.StatusCode, code))
        ctx.set_details(message)


class StreamError(Exception):
    """Ends a streaming call; Serve sends the status code set on the context with it."""


def _abort(ctx, code: str, message: str):
    """End a streaming method with a status: on Serve's proxy a streaming method reports its
    status by raising after setting it on the context (a plain return would end with OK)."""
    _fail(ctx, code, message)
    raise StreamError(f"{code}: {message}")


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=2048,
    ray_actor_options={"num_cpus": 0.5},
)
class Ingress:
    """The servicer methods of ``cortexlens.v1.Decoder`` and ``grpc.health.v1.Health``."""

    def __init__(self, decoder: DeploymentHandle, settings: dict):
        self.s = ServiceSettings.model_validate(settings)
        self.decoder = decoder
        self.metrics = Metrics()
        self.metrics_port = self.metrics.serve(self.s.metrics_port, self.s.metrics_host)
        self.token = self.s.bearer_token()
        self._token_bytes = self.token.encode()
        self.quotas = self.s.quotas
        self.live: dict[str, int] = {}  # session id -> epoch, streams of this replica
        self.records = self.s.records_dir()
        self.records.mkdir(parents=True, exist_ok=True)
        self.draining = False
        self._retrain_actor = None
        self._endings: set[asyncio.Task] = set()  # streams' end-of-stream work, see _end_detached

    # -- helpers ----------------------------------------------------------------------------------
    def _auth(self, ctx) -> None:
        """Every cortexlens.v1 RPC (Decoder and Retraining) calls this first; with a token set,
        a call without metadata ``authorization: Bearer <token>`` (scheme case-insensitive) or
        with another token gets UNAUTHENTICATED. Compared in constant time. grpc.health.v1
        (Check, Watch) does not call it: probes carry no token (docs/operations.md)."""
        if not self.token:
            return
        import hmac

        got = ""
        for k, v in ctx.invocation_metadata() if ctx is not None else ():
            if k.lower() == "authorization":
                got = v.decode("latin-1") if isinstance(v, bytes) else str(v)
                break
        scheme, _, tok = got.strip().partition(" ")
        if not got or scheme.lower() != "bearer" or not tok.strip():
            self.metrics.auth_refusals.labels("missing").inc()
            raise _Abort(
                "UNAUTHENTICATED",
                "missing bearer token: this server requires metadata 'authorization: Bearer "
                "<token>' on every call (Client(token=...), --token)",
            )
        if not hmac.compare_digest(tok.strip().encode(), self._token_bytes):
            self.metrics.auth_refusals.labels("wrong").inc()
            raise _Abort(
                "UNAUTHENTICATED",
                "wrong bearer token: the token in metadata 'authorization: Bearer <token>' is "
                "not this server's; check the token you were given",
            )

    def _check_model(self, name: str, ref: ModelRef) -> None:
        if name and name != ref.name:
            raise _Abort(
                "NOT_FOUND",
                f"model {name!r} is not served here (this server serves {ref.name!r}); leave "
                "model empty for the default",
            )

    async def _plan_info(self, session_id: str, key: str) -> PlanInfo:
        return await self.decoder.plan_info.remote(session_id, key)

    def _count(self, method: str, code: str) -> None:
        self.metrics.requests.labels(method, code).inc()

    def _decoded_metrics(self, out: DecodeOut) -> None:
        m = self.metrics
        m.queue_wait.observe(out.queue_ms / 1e3)
        m.model_time.observe(out.decoded.model_ms / 1e3)
        m.batch_size.observe(out.decoded.batch_size)
        m.set_model(out.ref.name, out.ref.version, out.ref.label_set)
        seen = set()
        for t in out.decoded.tasks:
            for u in t.units:
                if u.unit not in seen:
                    seen.add(u.unit)
                    m.unit_active.labels(str(u.unit)).inc()

    # -- unary ------------------------------------------------------------------------------------
    async def Decode(self, request: pb.DecodeRequest, grpc_context=None) -> pb.DecodeResponse:
        t0 = time.perf_counter()
        try:
            self._auth(grpc_context)
            _parsed(request)
            ids = wire.check_unit_ids(request.unit_ids, self.s.max_cells)
            values, ts = wire.window_from_block(request.window, len(ids), self.s.max_window_frames)
            sid = request.session_id or "unary"
            key = wire.units_key(ids)
            top_m = int(request.top_m) or self.s.top_m
            job = DecodeJob(sid, key, values, ts, float(ts[-1]), top_m, request.model)
            out: DecodeOut = await _decode(self.decoder, job)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            code, msg = self._status_of(e)
            self._count("Decode", code)
            _fail(grpc_context, code, msg)
            return pb.DecodeResponse()
        self._decoded_metrics(out)
        self._count("Decode", "OK")
        self.metrics.predictions.labels("Decode").inc()
        return pb.DecodeResponse(
            prediction=wire.prediction_pb(
                out.decoded,
                session_id=sid,
                frame_index=0,
                timestamp=float(ts[-1]),
                ref=out.ref,
                method=out.method,
                queue_ms=out.queue_ms,
                server_total_ms=(time.perf_counter() - t0) * 1e3,
            )
        )

    def _status_of(self, e: BaseException) -> tuple[str, str]:
        e = _cause(e)
        if isinstance(e, _Abort | IngestError):
            return e.code, e.message
        if isinstance(e, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
            return "UNAVAILABLE", f"a server component is restarting; retry ({type(e).__name__})"
        from models.bundle import BundleError

        if isinstance(e, BundleError):
            return "NOT_FOUND", str(e)
        log.exception("internal error")
        return "INTERNAL", f"internal error ({type(e).__name__}: {e}); please report it"

    async def _unary(self, ctx, request, empty, answer):
        """Authenticate, check ``request`` parsed, run ``answer()`` and return its message; any
        failure becomes the call's status (with ``empty`` as the message), never an exception in
        the replica."""
        try:
            self._auth(ctx)
            _parsed(request)
            return await answer()
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            code, msg = self._status_of(e)
            _fail(ctx, code, msg)
            return empty

    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.ModelInfo:
        async def answer():
            info = await self.decoder.model_info.remote()
            self._check_model(request.model, info["ref"])
            return wire.model_info_pb(info)

        return await self._unary(grpc_context, request, pb.ModelInfo(), answer)

    async def ListUnits(
        self, request: pb.ListUnitsRequest, grpc_context=None
    ) -> pb.ListUnitsResponse:
        async def answer():
            ref, units = await self.decoder.units.remote(request.variable)
            self._check_model(request.model, ref)
            return wire.units_pb(ref, units)

        return await self._unary(grpc_context, request, pb.ListUnitsResponse(), answer)

    async def GetSession(
        self, request: pb.GetSessionRequest, grpc_context=None
    ) -> pb.SessionStatus:
        async def answer():
            sid = request.session_id
            d = session_dir(self.records, sid)
            try:
                actor = ray.get_actor(_actor_name(sid), namespace=NAMESPACE)
            except ValueError:
                actor = None
            if actor is not None:
                return wire.status_pb(await _session_call(actor, "status"))
            if (d / "meta.json").exists():
                return wire.status_pb(await asyncio.to_thread(record_status, d))
            raise IngestError("NOT_FOUND", f"no live or recorded session {sid!r} on this server")

        return await self._unary(grpc_context, request, pb.SessionStatus(), answer)

    # -- retraining control ------------------------------------------------------------------------
    def _retrainer(self):
        if self._retrain_actor is None:
            from service.retrainer import retrainer_actor

            self._retrain_actor = retrainer_actor(self.s.model_dump(mode="json"))
        return self._retrain_actor

    async def _job_call(self, name: str, *args):
        return await getattr(self._retrainer(), name).remote(*args)

    async def StartJob(self, request: pb.StartJobRequest, grpc_context=None) -> pb.Job:
        async def answer():
            req = {
                "kind": request.kind,
                "session_ids": list(request.session_ids),
                "model": request.model or None,
                "workers": int(request.workers) or None,
                "epochs": int(request.epochs) or None,
                "promote": request.promote if request.HasField("promote") else None,
                "min_accuracy_delta": (
                    request.min_accuracy_delta if request.HasField("min_accuracy_delta") else None
                ),
            }
            return wire.job_pb(await self._job_call("start", req))

        return await self._unary(grpc_context, request, pb.Job(), answer)

    async def GetJob(self, request: pb.JobRef, grpc_context=None) -> pb.Job:
        async def answer():
            return wire.job_pb(await self._job_call("get", request.job_id))

        return await self._unary(grpc_context, request, pb.Job(), answer)

    async def CancelJob(self, request: pb.JobRef, grpc_context=None) -> pb.Job:
        async def answer():
            return wire.job_pb(await self._job_call("cancel", request.job_id))

        return await self._unary(grpc_context, request, pb.Job(), answer)

    async def ListJobs(self, request: pb.ListJobsRequest, grpc_context=None):
        async def answer():
            jobs = await self._job_call("list")
            return pb.ListJobsResponse(jobs=[wire.job_pb(j) for j in jobs])

        return await self._unary(grpc_context, request, pb.ListJobsResponse(), answer)

    async def WatchJob(self, request: pb.JobRef, grpc_context=None):
        try:
            self._auth(grpc_context)
            _parsed(request)
            last = None
            while True:
                job = await self._job_call("get", request.job_id)
                key = (job.get("state"), job.get("progress"), job.get("message"))
                if key != last:
                    last = key
                    yield wire.job_pb(job)
                if job.get("state") in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    return
                await asyncio.sleep(0.5)
        except StreamError:
            raise
        except Exception as e:  # noqa: BLE001
            code, msg = self._status_of(e)
            _abort(grpc_context, code, msg)

    async def Rollback(self, request: pb.RollbackRequest, grpc_context=None) -> pb.ModelRef:
        async def answer():
            version = await self._job_call("rollback", request.model, request.version)
            return pb.ModelRef(name=request.model or self.s.model, version=version)

        return await self._unary(grpc_context, request, pb.ModelRef(), answer)

    # -- health -----------------------------------------------------------------------------------
    async def _health(self, service: str) -> int:
        if service not in ("", SERVICE_NAME):
            raise _Abort("NOT_FOUND", f"unknown service {service!r}")
        if self.draining:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            await asyncio.wait_for(self.decoder.ref.remote(), timeout=5.0)
        except Exception:  # noqa: BLE001
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(self, request, grpc_context=None):
        try:
            _parsed(request)
            st = await self._health(request.service)
        except _Abort as e:
            _fail(grpc_context, e.code, e.message)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=st)

    async def Watch(self, request, grpc_context=None):
        last = None
        try:
            _parsed(request)
            while True:
                st = await self._health(request.service)
                if st != last:
                    yield health_pb2.HealthCheckResponse(status=st)
                    last = st
                await asyncio.sleep(1.0)
        except _Abort as e:
            _abort(grpc_context, e.code, e.message)

    # -- streaming --------------------------------------------------------------------------------
    async def StreamSession(self, request_stream, grpc_context=None) -> AsyncIterator:
        try:
            self._auth(grpc_context)
        except _Abort as e:
            self._count("StreamSession", e.code)
            _abort(grpc_context, e.code, e.message)
        out: asyncio.Queue = asyncio.Queue()
        state = _StreamState()
        state.input = request_stream
        reader = asyncio.create_task(self._read_stream(request_stream, out, state))
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, asyncio.Future):
                    try:
                        msgs = await item
                    except Exception as e:  # noqa: BLE001 - a failed decode ends the stream
                        state.error = self._status_of(e)
                        break
                    for m in msgs:
                        yield m
                else:
                    yield item
            if not reader.done():
                await reader
        except asyncio.CancelledError:
            state.cancelled = True
            raise
        finally:
            if not reader.done():
                reader.cancel()
            await self._end_detached(state)
        if state.error is not None:
            code, msg = state.error
            self._count("StreamSession", code)
            _abort(grpc_context, code, msg)
        self._count("StreamSession", "OK")

    async def _end_detached(self, st: _StreamState) -> None:
        """Run `_end_stream` as the replica's own task and wait for it.

        The request may be cancelled while its stream is already ending: a vanished client's
        input breaks off and Serve's cancellation of the request arrives a moment later, in
        either order. Awaited in the request's task, `_end_stream` was then stopped half way
        (while waiting for `interrupt`), the actor never ended and the record read LIVE with no
        stream. In its own task, from an empty context (nothing of the request's), it runs to
        the end whatever happens to the request; a cancelled request only stops waiting for it."""
        task = asyncio.get_running_loop().create_task(
            self._end_stream(st), context=contextvars.Context()
        )
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)
        await asyncio.shield(task)

    async def _end_stream(self, st: _StreamState) -> None:
        if st.actor is None:
            return
        if not st.closed:
            st.cancelled = True  # a pending clean close must not happen now
        if st.session_id in self.live and self.live[st.session_id] == st.epoch:
            del self.live[st.session_id]
            self.metrics.active_sessions.set(len(self.live))
        if not st.closed:
            try:
                r = await asyncio.wait_for(
                    asyncio.shield(_session_call(st.actor, "interrupt", st.epoch)),
                    INTERRUPT_WAIT_S,
                )
            except TimeoutError:
                # The actor did not answer: end its process, which releases the record (its
                # lock goes with the process), so the session reads INTERRUPTED and resumes
                # from disk rather than staying LIVE with no stream.
                log.warning(
                    "session %s: no answer to interrupt in %.0f s; ending its actor",
                    st.session_id,
                    INTERRUPT_WAIT_S,
                )
                r = {"released": True}
            except Exception:  # noqa: BLE001 - the actor may be gone already
                r = {"released": True}
            if r.get("released"):  # not taken over by a newer stream: end the actor
                try:
                    ray.kill(st.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass

    async def _open(self, op: pb.SessionOpen, st: _StreamState, out: asyncio.Queue) -> None:
        ids = wire.check_unit_ids(op.unit_ids, self.s.max_cells)
        d = session_dir(self.records, op.session_id)
        rate = float(op.frame_rate_hz)
        if not (np.isfinite(rate) and 0 < rate <= 10_000):
            raise IngestError(
                "INVALID_ARGUMENT",
                f"frame_rate_hz must be a positive number (frames per second), got {rate}",
            )
        key = wire.units_key(ids)
        info = await self._plan_info(op.session_id, key)
        self._check_model(op.model, info.ref)
        if op.session_id not in self.live and len(self.live) >= self.s.max_sessions:
            raise IngestError(
                "RESOURCE_EXHAUSTED",
                f"this server already has {len(self.live)} live sessions (limit "
                f"{self.s.max_sessions}); close one or try another replica",
            )
        ing = self.s.ingest
        stride = int(op.decode_stride) or ing.decode_stride
        wf = int(np.ceil(info.window_s * rate - 1e-6)) + 1
        if wf > self.s.max_window_frames:
            raise IngestError(
                "RESOURCE_EXHAUSTED",
                f"a {info.window_s:g} s window at {rate:g} Hz is {wf} frames, above the limit "
                f"of {self.s.max_window_frames}",
            )
        cfg = {
            "window_frames": wf,
            "decode_stride": stride,
            "reorder_frames": ing.reorder_frames,
            "max_gap_frames": ing.max_gap_frames,
            "max_pending_decodes": ing.max_pending_decodes,
            "backpressure": ing.backpressure,
            "max_block_frames": ing.max_block_frames,
        }
        open_kwargs = {
            "session_id": op.session_id,
            "unit_ids": list(ids),
            "frame_rate_hz": rate,
            "subject_id": op.subject_id,
            "genetic_background": op.genetic_background,
            "metadata": dict(op.metadata),
        }
        name = _actor_name(op.session_id)
        try:
            existing = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            existing = None
        if existing is not None and not op.resume:
            raise IngestError(
                "ALREADY_EXISTS",
                f"session {op.session_id!r} is live on another stream; reconnect with "
                "resume=true to take it over, or use a new session id",
            )
        epoch = 0
        if existing is not None:
            epoch, state = await _session_call(existing, "attach")
            if state != "LIVE":
                # its stream just ended (record released, the actor is on its way out): wait
                # for it to go, then continue the session from its record in a new actor
                await self._wait_gone(name, existing)
                existing, epoch = None, 0
        if existing is not None:
            actor = existing
        else:
            try:
                actor = SessionActorRemote.options(
                    name=name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    max_restarts=-1,
                    max_task_retries=0,
                    num_cpus=0,
                ).remote(str(d), open_kwargs, cfg, bool(op.resume), ing.record_sync)
            except ValueError:  # created by a concurrent stream a moment ago
                raise IngestError(
                    "ALREADY_EXISTS",
                    f"session {op.session_id!r} is live on another stream; reconnect with "
                    "resume=true to take it over, or use a new session id",
                ) from None
            try:
                await _session_call(actor, "start", bool(op.resume))
            except BaseException:
                ray.kill(actor, no_restart=True)
                raise
        hello = await _session_call(actor, "hello")
        st.actor = actor
        st.epoch = epoch or (await _session_call(actor, "attach"))[0]
        st.session_id = op.session_id
        st.units_key = key
        st.top_m = int(op.top_m) or self.s.top_m
        st.close_explicitly = bool(op.close_explicitly)
        st.ref = info.ref
        st.decodable = info.decodable
        st.max_inflight = ing.max_pending_decodes
        st.frame_rate_hz = rate
        # per-session quotas (checked in _push/_trials without further Ray calls)
        q = self.quotas
        st.rate_fill = q.max_rate_factor * rate
        st.rate_cap = max(st.rate_fill * q.rate_burst_s, float(ing.max_block_frames))
        st.tokens, st.t_tokens = st.rate_cap, time.perf_counter()
        st.frame_bytes = 4 * len(ids)
        st.record_frames = int((hello.get("status") or {}).get("frames_recorded", 0))
        st.trials = int(hello.get("n_trials", 0))  # what the session holds already
        self.live[op.session_id] = st.epoch
        self.metrics.active_sessions.set(len(self.live))
        await out.put(
            pb.StreamResponse(
                accepted=pb.SessionAccepted(
                    session_id=op.session_id,
                    model=wire.model_ref_pb(info.ref),
                    next_frame_index=int(hello["next_frame_index"]),
                    decode_stride=stride,
                    window_frames=wf,
                    decoding=info.decodable,
                    n_cells_known=info.n_known,
                    session_known=info.session_known,
                    session_embedding_from=info.embedding_from,
                )
            )
        )
        if not info.decodable:
            await out.put(
                pb.StreamResponse(
                    event=pb.StreamEvent(
                        kind=pb.StreamEvent.NOT_DECODED,
                        message=(
                            f"model {info.ref.name} {info.ref.version} knows none of the "
                            f"{len(ids)} cells of this session: frames are recorded but not "
                            "decoded; adapt the model to the session (retraining) to decode it"
                        ),
                    )
                )
            )

    async def _wait_gone(self, name: str, actor, timeout_s: float = 10.0) -> None:
        async def gone() -> bool:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    return True
                await asyncio.sleep(0.05)
            return False

        if await gone():
            return
        ray.kill(actor, no_restart=True)  # released but never ended: end it here
        if not await gone():
            raise IngestError("UNAVAILABLE", f"{name} is still ending; reconnect with resume=true")

    async def _read_stream(self, request_stream, out: asyncio.Queue, st: _StreamState) -> None:
        try:
            first = True
            async for req in request_stream:
                if isinstance(req, Malformed):
                    raise IngestError("INVALID_ARGUMENT", req.describe())
                if first:
                    first = False
                    if req.WhichOneof("kind") != "open":
                        raise IngestError(
                            "FAILED_PRECONDITION",
                            "the first message of a stream must be `open` (SessionOpen)",
                        )
                    await self._open(req.open, st, out)
                    continue
                kind = req.WhichOneof("kind")
                if kind == "open":
                    raise IngestError(
                        "FAILED_PRECONDITION", "the session is already open; send frames"
                    )
                if kind == "trials":
                    await self._trials(req.trials, st)
                    continue
                if kind == "close":
                    st.close_requested = True
                    break  # what follows `close` is not read
                if kind != "frames":
                    raise IngestError("INVALID_ARGUMENT", "empty StreamRequest (no frames)")
                await self._push(req.frames, st, out)
            if st.close_requested:  # (set only after a successful `open`)
                await self._finish(st, out)
            elif st.input_cancelled() or st.close_explicitly:
                # The input broke off without a half-close (the client vanished, or the proxy
                # could not receive a message), or it ended without the `close` this client
                # promised: no clean close, the session stays resumable. Bytes that do not
                # parse arrive as `Malformed` (INVALID_ARGUMENT above); the status here reaches
                # only a client that is still there, instead of OK.
                st.cancelled = True
                st.error = (
                    "CANCELLED",
                    "the stream's input ended without `close`; the session is left "
                    "INTERRUPTED, reconnect with resume=true",
                )
            elif st.actor is not None:
                await self._finish(st, out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            st.error = self._status_of(e)
        finally:
            await out.put(None)

    async def _call_actor(self, st: _StreamState, method: str, *args):
        """Call the session actor, waiting through a restart of its process (Ray restarts it
        from its record; a restarted actor is owned by the first stream that calls it again);
        returns (result, retries)."""
        return await _through_restarts(
            lambda: _session_call(st.actor, method, *args), tries=PUSH_RETRIES
        )

    def _quota_frames(self, st: _StreamState, n: int) -> None:
        """Per-session quotas on a block of ``n`` frames (a few float operations per block):
        the frame-rate ceiling (token bucket) and the size of the durable record."""
        q = self.quotas
        if st.rate_fill > 0:
            now = time.perf_counter()
            st.tokens = min(st.rate_cap, st.tokens + (now - st.t_tokens) * st.rate_fill)
            st.t_tokens = now
            if n > st.tokens:
                self.metrics.quota_refusals.labels("frame_rate").inc()
                raise IngestError(
                    "RESOURCE_EXHAUSTED",
                    f"session {st.session_id!r} sends frames far faster than the "
                    f"{st.frame_rate_hz:g} Hz it declared: more than {q.max_rate_factor:g}x that "
                    f"rate after a burst of {st.rate_cap:.0f} frames (quotas.max_rate_factor, "
                    "rate_burst_s); pace the stream (or declare its real frame_rate_hz) and "
                    "reconnect with resume=true",
                )
            st.tokens -= n
        if q.max_record_bytes and (st.record_frames + n) * st.frame_bytes > q.max_record_bytes:
            self.metrics.quota_refusals.labels("record_bytes").inc()
            raise IngestError(
                "RESOURCE_EXHAUSTED",
                f"session {st.session_id!r} would exceed its record quota: {st.record_frames} "
                f"frames recorded + {n} x {st.frame_bytes} bytes > {q.max_record_bytes} bytes "
                "(quotas.max_record_bytes); close this session and continue in a new session id",
            )

    async def _push(self, fr: pb.Frames, st: _StreamState, out: asyncio.Queue) -> None:
        b = fr.block
        self._quota_frames(st, max(0, int(b.n_frames)))
        if st.decodable and st.inflight >= st.max_inflight:
            # backpressure: hold this block (and so the client) until a decode finishes, for up
            # to two frame periods; past that the session buffer coalesces pending decodes, so
            # a live stream's latency stays bounded (the newest window is always decoded)
            deadline = time.perf_counter() + 2.0 / st.frame_rate_hz
            while st.inflight >= st.max_inflight:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                st.freed.clear()
                try:
                    await asyncio.wait_for(st.freed.wait(), left)
                except TimeoutError:
                    break
        t_in = time.perf_counter()
        free = max(0, st.max_inflight - st.inflight) if st.decodable else 0
        r, retried = await self._call_actor(
            st,
            "push",
            st.epoch,
            int(fr.first_frame_index),
            b.values,
            int(b.n_frames),
            int(b.n_cells),
            list(b.timestamps),
            free,
        )
        st.record_frames += int(r["accepted"])
        m = self.metrics
        m.frames_received.inc(int(b.n_frames))
        if r["duplicates"]:
            m.frames_dropped.labels("duplicate").inc(r["duplicates"])
        if r["late"]:
            m.frames_out_of_order.inc(r["late"])
        if r["coalesced"]:
            m.frames_dropped.labels("coalesced").inc(r["coalesced"])
        lo, hi = int(fr.first_frame_index), int(fr.first_frame_index) + int(b.n_frames) - 1
        for e in r["events"]:
            if retried and e.kind == "DUPLICATE" and lo <= e.first_frame_index <= hi:
                continue  # our own retry after an actor restart, not the client's duplicate
            if e.kind == "GAP":
                m.frames_missing.inc(e.last_frame_index - e.first_frame_index + 1)
            elif e.kind == "LATE":
                m.frames_dropped.labels("late").inc(e.last_frame_index - e.first_frame_index + 1)
            await out.put(pb.StreamResponse(event=wire.event_pb(e)))
        for d in r["decodes"]:
            await out.put(self._schedule(st, d, t_in))

    async def _trials(self, msg: pb.Trials, st: _StreamState) -> None:
        if len(msg.trials) > 100_000:
            raise IngestError("RESOURCE_EXHAUSTED", "more than 100000 trials in one message")
        q = self.quotas.max_trials
        if q and st.trials + len(msg.trials) > q:
            self.metrics.quota_refusals.labels("trials").inc()
            raise IngestError(
                "RESOURCE_EXHAUSTED",
                f"session {st.session_id!r} would hold {st.trials + len(msg.trials)} trials, above "
                f"its quota of {q} (quotas.max_trials); continue in a new session id",
            )
        rows = [
            {
                "start": t.start,
                "end": t.end,
                "direction": t.direction,
                "temporal_frequency": t.temporal_frequency,
            }
            for t in msg.trials
        ]
        st.trials, _ = await self._call_actor(st, "add_trials", st.epoch, rows)

    def _schedule(self, st: _StreamState, d: tuple, t_in: float) -> asyncio.Task:
        frame_index, timestamp, values, frame_times, _ = d
        job = DecodeJob(
            st.session_id, st.units_key, values, frame_times, float(timestamp), st.top_m
        )
        st.inflight += 1

        async def run() -> pb.StreamResponse:
            try:
                o: DecodeOut = await _decode(self.decoder, job)
            finally:
                st.inflight -= 1
                st.freed.set()
            self._decoded_metrics(o)
            msgs = []
            if st.ref is not None and o.ref.version != st.ref.version:
                msgs.append(
                    pb.StreamResponse(
                        event=pb.StreamEvent(
                            kind=pb.StreamEvent.MODEL_CHANGED,
                            first_frame_index=int(frame_index),
                            last_frame_index=int(frame_index),
                            message=f"model {o.ref.name} {st.ref.version} -> {o.ref.version}",
                        )
                    )
                )
            st.ref = o.ref
            st.decoded += 1
            total = (time.perf_counter() - t_in) * 1e3
            self.metrics.frame_to_explanation.observe(total / 1e3)
            self.metrics.predictions.labels("StreamSession").inc()
            pred = wire.prediction_pb(
                o.decoded,
                session_id=st.session_id,
                frame_index=frame_index,
                timestamp=timestamp,
                ref=o.ref,
                method=o.method,
                queue_ms=o.queue_ms,
                server_total_ms=total,
            )
            msgs.append(pb.StreamResponse(prediction=pred))
            return msgs

        return asyncio.ensure_future(run())

    async def _finish(self, st: _StreamState, out: asyncio.Queue) -> None:
        t_in = time.perf_counter()
        r, _ = await self._call_actor(st, "finish", st.epoch)
        for e in r["events"]:
            await out.put(pb.StreamResponse(event=wire.event_pb(e)))
        if st.decodable:
            for d in r["decodes"]:
                await out.put(self._schedule(st, d, t_in))
        fut = asyncio.ensure_future(self._close(st))
        await out.put(fut)

    async def _close(self, st: _StreamState) -> list:
        # wait for this stream's decodes (they precede this future in the queue) to be counted
        while st.inflight:
            await asyncio.sleep(0.001)
        # A client that vanished can look like a half-close to the replica (the proxy's request
        # iterator may just end); its cancellation reaches this handler a moment later. After a
        # bare half-close, wait a little before marking the record closed, so a vanished client
        # leaves it resumable (the input stream's own cancellation flag may be set then too:
        # poll both). An explicit `close` says what the client meant: no wait.
        t_end = time.monotonic() + (0.0 if st.close_requested else CLOSE_GRACE_S)
        while not (st.cancelled or st.input_cancelled()) and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        if st.cancelled or st.input_cancelled():
            st.cancelled = True
            raise asyncio.CancelledError
        await _session_call(st.actor, "mark_decoded", st.decoded)
        status, _ = await self._call_actor(st, "close", st.epoch)
        st.closed = True
        try:
            ray.kill(st.actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        return [pb.StreamResponse(closed=wire.status_pb(status, st.ref))]


class _StreamState:
    def __init__(self) -> None:
        # quotas: token bucket of the frame-rate ceiling (frames), record size, trials
        self.rate_fill = 0.0  # frames/s added to the bucket (0 = no ceiling)
        self.rate_cap = 0.0
        self.tokens = 0.0
        self.t_tokens = 0.0
        self.frame_bytes = 0  # record bytes per frame (4 x cells)
        self.record_frames = 0  # frames in the session's durable record
        self.trials = 0  # trials the session holds
        self.actor = None
        self.epoch = 0
        self.session_id = ""
        self.input = None  # the request stream
        self.units_key = ""
        self.top_m = 0
        self.ref: ModelRef | None = None
        self.decodable = False
        self.max_inflight = 4
        self.inflight = 0
        self.freed = asyncio.Event()
        self.frame_rate_hz = 30.0
        self.decoded = 0
        self.closed = False
        self.cancelled = False
        self.close_explicitly = False  # SessionOpen.close_explicitly
        self.close_requested = False  # a `close` message arrived
        self.error: tuple[str, str] | None = None

    def input_cancelled(self) -> bool:
        """Whether the client's side of the stream was cancelled (Serve's `gRPCInputStream`
        says so; an input without that flag never is)."""
        f = getattr(self.input, "is_cancelled", None)
        return f is not None and f()


def build_app(args: dict | None = None) -> serve.Application:
    """The Serve application (``import_path: service.app:build_app``); ``args``: ServiceSettings."""
    s = ServiceSettings.model_validate(dict(args or {}))
    d = s.model_dump(mode="json")
    decoder = DecoderModel.bind(d)
    return Ingress.bind(decoder, d)
