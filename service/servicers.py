"""The servicer registration functions named in the Serve config (``grpc_servicer_functions``).

Serve's gRPC proxy registers the generated method handlers with their protobuf
``request_deserializer`` and parses every request itself, before a replica sees it. A message
that does not parse would then end in grpc.aio's generic ``UNKNOWN "Unexpected DecodeError"``
(unary calls), or silently end a stream's input as if the client had cancelled (streams). These
functions register the same handlers with a deserializer that never raises: bytes that do not
parse arrive at the Ingress as a `Malformed` marker, and the Ingress answers INVALID_ARGUMENT
naming the message type (`service.app.Ingress`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg


class Malformed:
    """A request whose bytes did not parse as ``message_type`` (picklable: it travels from
    the proxy to an Ingress replica)."""

    def __init__(self, message_type: str, error: str, n_bytes: int):
        self.message_type = message_type
        self.error = error
        self.n_bytes = n_bytes

    def describe(self) -> str:
        return (
            f"the request ({self.n_bytes} bytes) could not be parsed as "
            f"{self.message_type} ({self.error}); send a message of that type"
        )


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)  # the message class of `Cls.FromString`
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", None) or repr(owner)

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            return Malformed(name, str(e), len(data))

    return parse


class _Capture:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.registered[service] = handlers


def lenient(generated: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A registration function like ``generated`` whose handlers never fail to parse."""

    def add(servicer: Any, server: Any) -> None:
        cap = _Capture()
        generated(servicer, cap)
        if not cap.registered:
            raise RuntimeError(f"{generated.__name__} registered no method handlers")
        for service, handlers in cap.registered.items():
            ours = {
                name: h._replace(request_deserializer=_lenient(h.request_deserializer))
                for name, h in handlers.items()
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, ours),))
            register = getattr(server, "add_registered_method_handlers", None)
            if register is not None:
                register(service, ours)

    add.__name__ = add.__qualname__ = generated.__name__
    add.__doc__ = f"{generated.__name__}, with requests that do not parse passed on as Malformed."
    return add


add_DecoderServicer_to_server = lenient(pbg.add_DecoderServicer_to_server)
add_RetrainingServicer_to_server = lenient(pbg.add_RetrainingServicer_to_server)
add_HealthServicer_to_server = lenient(health_pb2_grpc.add_HealthServicer_to_server)
