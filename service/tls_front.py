"""A TLS-terminating, pass-through gRPC front for the Serve gRPC proxy.

Ray Serve's gRPC proxy binds its port without TLS (``add_insecure_port``; ``gRPCOptions`` has no
TLS settings). `TLSFront` is a ``grpc.aio`` server with server credentials (certificate chain +
key, optionally a client CA for mutual TLS) whose one generic handler forwards every method of
every service, byte for byte, to the proxy on loopback::

    client ──TLS──> TLSFront (host:port) ──plaintext, loopback──> Serve gRPC proxy ──> Ingress

Forwarding uses identity serializers (raw message bytes in, raw bytes out), so nothing is parsed
or re-encoded. A method whose kind is known from the protobuf descriptors loaded in the process
(cortexlens.v1, grpc.health.v1, reflection) is forwarded as that kind: unary-unary (Decode,
GetModel, ...), unary-stream (WatchJob, health Watch), stream-stream (StreamSession, reflection).
Any other method, of any service, is forwarded as stream-stream, which carries every kind on the
wire (a unary call is a stream of one request and one response), so a method added to the proto
later passes through too (the typed unary path is only cheaper: ~0.5 ms instead of ~1.4 ms added
per unary call on a loaded 2-core machine). Client-streaming calls are forwarded by the
synchronous gRPC client in a thread of the front's pool (see `TLSFront._forward`: grpc.aio loses
the upstream's status when the upstream refuses a stream the client is still writing to); a
request/response round trip through the front costs ~0.4 ms more than direct on loopback
(p50 of a ping-pong of 300-byte messages; ~0.2 ms when grpc.aio forwarded them). Per call
the front forwards the request metadata (``authorization`` included; transport headers
dropped) and the deadline (the client's remaining time), relays the upstream's initial
metadata, and ends the client's call with the upstream's status code, details and trailing
metadata. A client that cancels (or whose deadline passes) cancels the upstream call; an
upstream call that ends with CANCELLED (or any other status) ends the client's call with it.

Messages larger than ``max_message_bytes`` are refused by the front itself with
RESOURCE_EXHAUSTED, the same limit as the Serve proxy's (``service.settings.MAX_MESSAGE_BYTES``).

Where it runs: `service.server.start` starts it in a daemon thread (its own event loop) of the
process that called ``start`` (``cortexlens serve`` or a test), and `service.server.stop` stops it.
Not a Ray actor, on purpose: the private key is read by the process the operator started, from
a path on that machine, and never travels through Ray (actor arguments are kept in Ray's control
store); the listening TLS port lives exactly as long as that process (no detached actor left
listening after a crash); and it costs no extra Ray worker. Every Ray node runs a Serve gRPC
proxy on the same port (``proxy_location: EveryNode``), so the front forwards to the proxy of its
own node on loopback. On Kubernetes nothing calls ``start``: terminate TLS at the ingress, or
run ``python -m service.tls_front`` as a sidecar (see ``docs/operations.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from service.settings import MAX_MESSAGE_BYTES

log = logging.getLogger("cortexlens.tls_front")

#: metadata keys that belong to the transport of one hop, never forwarded
_HOP_KEYS = frozenset({"user-agent", "te", "content-type", "host", "connection", "keep-alive"})


_Metadata = tuple[tuple[str, str | bytes], ...]


def _forwardable(md: Sequence[tuple[str, str | bytes]] | None) -> _Metadata:
    out = []
    for k, v in md or ():
        k = k.lower()
        if k.startswith((":", "grpc-")) or k in _HOP_KEYS:
            continue
        out.append((k, v))
    return tuple(out)


def _read(x: bytes | str | Path | None) -> bytes | None:
    if x is None or x == "" or x == b"":
        return None
    if isinstance(x, bytes):
        return x
    return Path(x).expanduser().read_bytes()


#: services whose descriptors are loaded (best effort) so that their methods' kinds are known
_KNOWN_MODULES = (
    "service.protos_gen.cortexlens.v1.cortexlens_pb2",
    "grpc_health.v1.health_pb2",
    "grpc_reflection.v1alpha.reflection_pb2",
)


_END = object()


class _RequestPipe:
    """The request messages of one forwarded call, from this event loop (`fill`) to the
    synchronous client's sending thread (iteration); bounded, so a client faster than the
    upstream is held back by flow control instead of filling memory here."""

    def __init__(self, depth: int = 64) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()

    async def fill(self, requests: AsyncIterator[bytes], loop, pool) -> None:
        try:
            async for m in requests:
                if not await self._put(m, loop, pool):
                    return
        finally:
            await self._put(_END, loop, pool)  # half-close upstream (or unblock the sender)

    async def _put(self, m, loop, pool) -> bool:
        try:
            self._q.put_nowait(m)
            return True
        except queue.Full:
            return await loop.run_in_executor(pool, self._put_blocking, m)

    def _put_blocking(self, m) -> bool:
        while not self._closed.is_set():
            try:
                self._q.put(m, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """No more requests: the sending thread ends its iteration."""
        self._closed.set()
        with contextlib.suppress(queue.Full):
            while True:  # make room for the end marker
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    break
            self._q.put_nowait(_END)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        while True:
            try:
                m = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set():
                    raise StopIteration from None
                continue
            if m is _END:
                raise StopIteration
            return m


def method_kind(method: str) -> tuple[bool, bool] | None:
    """(client streaming, server streaming) of ``/pkg.Service/Method`` from the protobuf
    descriptors loaded in this process; None when unknown."""
    from google.protobuf import descriptor_pool

    try:
        _, service, name = method.split("/")
        m = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except (ValueError, KeyError):
        return None
    return bool(m.client_streaming), bool(m.server_streaming)


class _Forwarder(grpc.GenericRpcHandler):
    """Every method of every service as a raw-bytes call to the upstream (identity
    serializers: handlers get and return message bytes). Methods whose kind is known (from
    ``kinds`` or the loaded descriptors) are forwarded as that kind; any other method as
    stream-stream, which carries every kind on the wire (a unary call is a stream of one)."""

    def __init__(self, front: TLSFront, kinds: dict[str, tuple[bool, bool]] | None) -> None:
        self._front = front
        self._kinds: dict[str, tuple[bool, bool] | None] = dict(kinds or {})

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method not in self._kinds:
            self._kinds[method] = method_kind(method)
        kind = self._kinds[method]
        f = self._front
        if kind == (False, False):
            return grpc.unary_unary_rpc_method_handler(functools.partial(f._unary, method))
        if kind == (False, True):
            return grpc.unary_stream_rpc_method_handler(functools.partial(f._unary_stream, method))
        return grpc.stream_stream_rpc_method_handler(functools.partial(f._forward, method))


class TLSFront:
    """TLS in front of a plaintext gRPC server (the Serve proxy); see the module docstring.

    Args:
        upstream: ``HOST:PORT`` of the plaintext server (the Serve gRPC proxy on loopback).
        cert, key: PEM certificate chain and private key (bytes or paths).
        client_ca: PEM CA bundle (bytes or path); when given, clients must present a certificate
            signed by it (mutual TLS).
        host, port: where the TLS port listens (``port=0``: any free port; see `port`).
        max_message_bytes: larger messages are refused with RESOURCE_EXHAUSTED.
        kinds: ``{"/pkg.Service/Method": (client_streaming, server_streaming)}`` for methods
            whose descriptors are not loaded here (others: looked up, else stream-stream).
    """

    def __init__(
        self,
        upstream: str,
        *,
        cert: bytes | str | Path,
        key: bytes | str | Path,
        client_ca: bytes | str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        kinds: dict[str, tuple[bool, bool]] | None = None,
    ) -> None:
        self.upstream = upstream
        self._kinds = kinds
        self.host = host
        self._want_port = int(port)
        self.max_message_bytes = int(max_message_bytes)
        cert_b, key_b, ca_b = _read(cert), _read(key), _read(client_ca)
        if not cert_b or not key_b:
            raise ValueError("the TLS front needs a PEM certificate chain and its private key")
        self._creds = grpc.ssl_server_credentials(
            [(key_b, cert_b)], root_certificates=ca_b, require_client_auth=ca_b is not None
        )
        self.mutual = ca_b is not None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._sync_channel: grpc.Channel | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.calls = 0  # calls forwarded (for tests and logs)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> int:
        """Bind and serve in a daemon thread; returns the bound port. Raises if it cannot bind."""
        if self._thread is not None:
            raise RuntimeError("the TLS front is already started")
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(ready, err))
            except BaseException as e:  # noqa: BLE001 - reported to start()
                if not ready.is_set():
                    err.append(e)
                else:
                    log.exception("TLS front stopped with an error")
            finally:
                ready.set()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="cortexlens-tls-front", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"the TLS front did not start within {timeout_s:g} s")
        if err:
            self._thread.join(5)
            self._thread = None
            raise err[0]
        log.info("TLS front on %s -> %s", self.address, self.upstream)
        return int(self.port)

    async def _serve(self, ready: threading.Event, err: list) -> None:
        lim = self.max_message_bytes
        opts = [
            ("grpc.max_receive_message_length", lim),
            ("grpc.max_send_message_length", lim),
        ]
        self._channel = grpc.aio.insecure_channel(self.upstream, options=opts)
        self._sync_channel = grpc.insecure_channel(self.upstream, options=opts)
        # blocking waits of forwarded client-streaming calls: one thread per open stream
        self._pool = futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="tls-front")
        # no SO_REUSEPORT: a second front (or anything else) on the same port is an error
        server = grpc.aio.server(options=[*opts, ("grpc.so_reuseport", 0)])
        for mod in _KNOWN_MODULES:  # their descriptors tell the kind of each method
            with contextlib.suppress(ImportError):
                importlib.import_module(mod)
        server.add_generic_rpc_handlers((_Forwarder(self, self._kinds),))
        addr = f"[{self.host}]" if ":" in self.host else self.host
        try:
            port = server.add_secure_port(f"{addr}:{self._want_port}", self._creds)
        except RuntimeError:
            port = 0
        if not port:
            await self._close_upstream()
            raise OSError(
                f"cannot bind the TLS front on {self.host}:{self._want_port} (in use, or not an "
                "address of this machine); choose another tls port/host"
            )
        self.port = port
        await server.start()
        self._server = server
        self._stopped = asyncio.Event()
        ready.set()
        await self._stopped.wait()
        await server.stop(self._grace)
        await self._close_upstream()

    async def _close_upstream(self) -> None:
        await self._channel.close()
        self._sync_channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    _grace: float | None = 1.0

    def stop(self, grace: float | None = 1.0, timeout_s: float = 10.0) -> None:
        """Stop listening; calls still running get ``grace`` seconds, then are cancelled."""
        t, loop = self._thread, self._loop
        if t is None or loop is None:
            return
        self._grace = grace
        if self._stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._stopped.set)
        t.join(timeout_s)
        self._thread = None

    def __enter__(self) -> TLSFront:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- forwarding -----------------------------------------------------------------------------
    def _call_kw(self, context) -> dict:
        self.calls += 1
        return {
            "metadata": _forwardable(context.invocation_metadata()),
            "timeout": context.time_remaining(),
        }

    @staticmethod
    async def _send_initial(metadata, context) -> None:
        """The upstream's initial metadata, forwardable part, to the client (if any)."""
        md = _forwardable(metadata)
        if md:
            await context.send_initial_metadata(md)

    @staticmethod
    async def _abort_with(e: grpc.RpcError, context) -> None:
        md = _forwardable(e.trailing_metadata())
        await context.abort(e.code(), e.details() or "", trailing_metadata=md)

    async def _unary(self, method: str, request: bytes, context) -> bytes:
        call = self._channel.unary_unary(method)(request, **self._call_kw(context))
        try:
            await self._send_initial(await call.initial_metadata(), context)
            resp = await call
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
            return resp
        except grpc.aio.AioRpcError as e:
            await self._abort_with(e, context)
        finally:
            if not call.done():  # the client went away (CancelledError): end upstream too
                call.cancel()

    async def _unary_stream(self, method: str, request: bytes, context) -> AsyncIterator[bytes]:
        call = self._channel.unary_stream(method)(request, **self._call_kw(context))
        async for resp in self._relay(call, context):
            yield resp

    async def _forward(
        self, method: str, request_iterator: AsyncIterator[bytes], context
    ) -> AsyncIterator[bytes]:
        """Client-streaming calls go upstream through the synchronous gRPC client, bridged to
        this event loop: when the upstream ends a call while the client is still writing (a
        quota refusal), grpc.aio reports its own failed write as INTERNAL "Internal error from
        Core" and loses the upstream's status (most such calls on a quick loopback); the
        synchronous client keeps the status the upstream sent."""
        loop = asyncio.get_running_loop()
        pipe = _RequestPipe()
        call = self._sync_channel.stream_stream(method)(pipe, **self._call_kw(context))
        pump = asyncio.ensure_future(pipe.fill(request_iterator, loop, self._pool))
        blocking = functools.partial(loop.run_in_executor, self._pool)
        try:
            await self._send_initial(await blocking(call.initial_metadata), context)
            while (resp := await blocking(next, call, _END)) is not _END:
                yield resp
            context.set_trailing_metadata(_forwardable(call.trailing_metadata()))
        except grpc.RpcError as e:
            await self._abort_with(e, context)
        finally:
            # the client went away (CancelledError here), the upstream ended, or we stopped
            # reading for any other reason: end the upstream call and the request pump
            call.cancel()
            pump.cancel()
            pipe.close()

    async def _relay(self, call, context) -> AsyncIterator[bytes]:
        """The responses of a streaming upstream ``call``, then its trailing metadata and status."""
        try:
            await self._send_initial(await call.initial_metadata(), context)
            async for resp in call:
                yield resp
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as e:
            await self._abort_with(e, context)
        finally:
            # the client went away (its cancellation reaches us as CancelledError here), or we
            # stopped reading for any other reason: end the upstream call too
            if not call.done():
                call.cancel()


def main(argv: list[str] | None = None) -> None:
    """``python -m service.tls_front``: run the front alone (e.g. as a Kubernetes sidecar)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", default="127.0.0.1:9000", help="plaintext Serve gRPC proxy")
    p.add_argument("--cert", required=True, help="PEM certificate chain")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--client-ca", default=None, help="PEM CA bundle: require client certs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    front = TLSFront(
        a.upstream, cert=a.cert, key=a.key, client_ca=a.client_ca, host=a.host, port=a.port
    )
    front.start()
    print(f"TLS front on {front.address} -> {a.upstream} (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        front.stop()


if __name__ == "__main__":
    main()
