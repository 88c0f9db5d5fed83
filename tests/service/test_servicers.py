"""service.servicers: the registration functions of the Serve config pass unparseable requests on
as `Malformed` instead of failing inside grpc (a real grpc server on loopback, no Ray)."""

from __future__ import annotations

import copy
from concurrent import futures

import grpc
import pytest

from service import servicers
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb
from service.protos_gen.cortexlens.v1 import cortexlens_pb2_grpc as pbg
from service.servicers import Malformed


class _Decoder(pbg.DecoderServicer):
    """Answers GetModel with the model name it received, or INVALID_ARGUMENT for `Malformed`."""

    def GetModel(self, request, context):
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return pb.ModelInfo(model=pb.ModelRef(name=request.model))


@pytest.fixture
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicers.add_DecoderServicer_to_server(_Decoder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    ch.close()
    server.stop(0)


def _raw(ch, payload: bytes):
    call = ch.unary_unary("/cortexlens.v1.Decoder/GetModel")  # bytes in, bytes out
    return call(payload, timeout=10)


def test_a_parsing_request_reaches_the_servicer_as_its_message(channel):
    out = pb.ModelInfo.FromString(_raw(channel, pb.GetModelRequest(model="m1").SerializeToString()))
    assert out.model.name == "m1"


@pytest.mark.parametrize("payload", [b"\xff" * 7, b"\x0a\x80", b"\x0b"])
def test_bytes_that_do_not_parse_reach_the_servicer_as_malformed(channel, payload):
    with pytest.raises(grpc.RpcError) as e:
        _raw(channel, payload)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    d = e.value.details()
    assert "could not be parsed as cortexlens.v1.GetModelRequest" in d
    assert f"({len(payload)} bytes)" in d


def test_malformed_copies_by_the_pickle_protocol():
    # Ray sends it from the proxy to a replica with (cloud)pickle's reduce protocol, which
    # copy.deepcopy uses too (no unpickling needed to check it)
    m = copy.deepcopy(Malformed("x.Y", "bad", 3))
    assert m.describe().startswith("the request (3 bytes) could not be parsed as x.Y")


def test_every_method_is_registered_like_the_generated_function():
    def methods(add):
        cap = servicers._Capture()
        add(__import__("unittest.mock").mock.Mock(), cap)
        return {s: sorted(h) for s, h in cap.registered.items()}

    assert methods(servicers.add_DecoderServicer_to_server) == methods(
        pbg.add_DecoderServicer_to_server
    )
    assert methods(servicers.add_RetrainingServicer_to_server) == methods(
        pbg.add_RetrainingServicer_to_server
    )
