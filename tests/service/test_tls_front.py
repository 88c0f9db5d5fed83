"""`service.tls_front.TLSFront` against a tiny plaintext gRPC server on 127.0.0.1 (no Ray).

The upstream (`_Upstream`) is a raw-bytes generic server with one method per kind of call; it
records what reached it (metadata, deadline, cancellation) so that these tests can check that the
front forwards bytes, metadata and deadlines, relays status code + details + trailing metadata,
and that cancellation crosses it in both directions. Certificates are made here with
``cryptography`` (also used by ``test_security.py``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from service.tls_front import TLSFront

pytestmark = pytest.mark.timeout(120)

SVC = "/test.Echo/"


# -- certificates ----------------------------------------------------------------------------------
def make_cert(
    cn: str = "127.0.0.1",
    *,
    dns: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
    issuer: tuple[bytes, bytes] | None = None,
    ca: bool = False,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): self-signed, or signed by ``issuer`` (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    if issuer is None:
        issuer_name, sign_key = name, key
    else:
        icert = x509.load_pem_x509_certificate(issuer[0])
        issuer_name = icert.subject
        sign_key = serialization.load_pem_private_key(issuer[1], None)
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        sans = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = b.sign(sign_key, hashes.SHA256())
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the upstream ----------------------------------------------------------------------------------
class _Upstream(grpc.GenericRpcHandler):
    """Raw-bytes methods: Unary (echo, or abort on b"fail"), Count (unary-stream: N chunks, then
    optionally an error), Bidi (echo each message), Hang (stream until cancelled)."""

    def __init__(self) -> None:
        self.metadata: list[dict] = []
        self.remaining: list[float | None] = []
        self.hang_cancelled = threading.Event()
        self.hang_started = threading.Event()

    def _note(self, ctx) -> None:
        self.metadata.append(dict(ctx.invocation_metadata()))
        self.remaining.append(ctx.time_remaining())

    def unary(self, req: bytes, ctx):
        self._note(ctx)
        ctx.send_initial_metadata((("x-initial", "hello"),))
        if req == b"fail":
            ctx.abort_with_status(_Status(grpc.StatusCode.INVALID_ARGUMENT, "bad: fail"))
        ctx.set_trailing_metadata((("x-trailer", "t1"), ("x-len", str(len(req)))))
        return b"echo:" + req

    def count(self, req: bytes, ctx):
        self._note(ctx)
        n, _, fail = req.decode().partition(",")
        for i in range(int(n)):
            yield f"{i}".encode()
        if fail:
            ctx.set_trailing_metadata((("x-why", fail),))
            ctx.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            ctx.set_details(f"stopped: {fail}")

    def bidi(self, it, ctx):
        self._note(ctx)
        for m in it:
            yield m[::-1]

    def refuse(self, it, ctx):
        """Reads one message, then ends the call with an error while the client still writes."""
        next(it)
        ctx.abort_with_status(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota: refused"))

    def hang(self, req: bytes, ctx):
        self._note(ctx)
        ctx.add_callback(self.hang_cancelled.set)
        self.hang_started.set()
        i = 0
        while ctx.is_active():
            yield str(i).encode()
            i += 1
            time.sleep(0.05)

    def service(self, details):
        m = details.method
        if m == SVC + "Unary":
            return grpc.unary_unary_rpc_method_handler(self.unary)
        if m == SVC + "Count":
            return grpc.unary_stream_rpc_method_handler(self.count)
        if m == SVC + "Bidi":
            return grpc.stream_stream_rpc_method_handler(self.bidi)
        if m == SVC + "Hang":
            return grpc.unary_stream_rpc_method_handler(self.hang)
        if m == SVC + "Refuse":
            return grpc.stream_stream_rpc_method_handler(self.refuse)
        return None


class _Status(grpc.Status):
    def __init__(self, code, details):
        self.code, self.details = code, details
        self.trailing_metadata = (("x-error", "e1"),)


@pytest.fixture(scope="module")
def upstream():
    svc = _Upstream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((svc,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield svc, f"127.0.0.1:{port}"
    server.stop(None).wait(5)


@pytest.fixture(scope="module")
def server_cert():
    return make_cert("127.0.0.1")


KINDS = {
    SVC + "Unary": (False, False),
    SVC + "Count": (False, True),
    SVC + "Bidi": (True, True),
    SVC + "Hang": (False, True),
    SVC + "Refuse": (True, True),
}


@pytest.fixture(scope="module", params=["generic", "typed"])
def front(request, upstream, server_cert):
    """The front forwarding every method as stream-stream (kinds unknown, as for a service
    whose descriptors are not loaded) and with each method's own kind (as for cortexlens.v1)."""
    crt, key = server_cert
    kinds = KINDS if request.param == "typed" else None
    f = TLSFront(upstream[1], cert=crt, key=key, max_message_bytes=1024 * 1024, kinds=kinds)
    f.start()
    yield f
    f.stop()


def _channel(front, crt, **kw):
    creds = grpc.ssl_channel_credentials(root_certificates=crt, **kw)
    return grpc.secure_channel(front.address, creds)


# -- tests -----------------------------------------------------------------------------------------
def test_unary_bytes_metadata_deadline_and_trailers_pass_through(front, upstream, server_cert):
    svc, _ = upstream
    with _channel(front, server_cert[0]) as ch:
        call = ch.unary_unary(SVC + "Unary")
        resp, c = call.with_call(
            b"\x00\x01payload", timeout=7.0, metadata=(("authorization", "Bearer abc"),)
        )
        assert resp == b"echo:\x00\x01payload"
        assert dict(c.initial_metadata())["x-initial"] == "hello"
        assert dict(c.trailing_metadata()) == {"x-trailer": "t1", "x-len": "9"}
        # the token and the deadline reached the upstream
        assert svc.metadata[-1]["authorization"] == "Bearer abc"
        assert 5.0 < svc.remaining[-1] <= 7.1  # (the grpc-timeout header rounds up)
        # an error: code, details and trailing metadata of the upstream
        with pytest.raises(grpc.RpcError) as ei:
            call(b"fail", timeout=7.0)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details() == "bad: fail"
        assert dict(ei.value.trailing_metadata())["x-error"] == "e1"
    assert front.calls >= 2


def test_server_streaming_and_its_final_status(front, server_cert):
    with _channel(front, server_cert[0]) as ch:
        count = ch.unary_stream(SVC + "Count")
        assert list(count(b"50", timeout=10)) == [str(i).encode() for i in range(50)]
        got = []
        it = count(b"3,quota", timeout=10)
        with pytest.raises(grpc.RpcError) as ei:
            for m in it:
                got.append(m)
        assert got == [b"0", b"1", b"2"]  # the messages before the error still arrive
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ei.value.details() == "stopped: quota"
        assert dict(ei.value.trailing_metadata())["x-why"] == "quota"


def test_bidirectional_stream(front, server_cert):
    msgs = [bytes([i]) * (i + 1) for i in range(100)]
    with _channel(front, server_cert[0]) as ch:
        out = list(ch.stream_stream(SVC + "Bidi")(iter(msgs), timeout=10))
    assert out == [m[::-1] for m in msgs]


def test_an_upstream_refusal_mid_stream_keeps_its_status(front, server_cert):
    """The upstream ends a stream while the client is still writing: the client gets the
    upstream's code, details and trailing metadata, never the INTERNAL "Internal error from
    Core" that grpc.aio reports for the front's own write that failed because of that end."""
    payload = b"x" * 4096
    codes = []
    with _channel(front, server_cert[0]) as ch:
        refuse = ch.stream_stream(SVC + "Refuse")
        for _ in range(60):
            with pytest.raises(grpc.RpcError) as ei:
                list(refuse(iter([payload] * 400), timeout=10))
            e = ei.value
            codes.append(e.code())
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert e.details() == "quota: refused"
                assert dict(e.trailing_metadata())["x-error"] == "e1"
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_client_cancel_cancels_the_upstream_call(front, upstream, server_cert):
    svc, _ = upstream
    svc.hang_cancelled.clear()
    svc.hang_started.clear()
    with _channel(front, server_cert[0]) as ch:
        it = ch.unary_stream(SVC + "Hang")(b"", timeout=60)
        assert next(it) == b"0"
        assert svc.hang_started.wait(5)
        it.cancel()
        assert svc.hang_cancelled.wait(5), "the upstream call was not cancelled"
        with pytest.raises(grpc.RpcError) as ei:
            list(it)
        assert ei.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_ends_both_sides(front, upstream, server_cert):
    svc, _ = upstream
    svc.hang_cancelled.clear()
    with _channel(front, server_cert[0]) as ch:
        it = ch.unary_stream(SVC + "Hang")(b"", timeout=0.5)
        with pytest.raises(grpc.RpcError) as ei:
            list(it)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert svc.hang_cancelled.wait(5)


@pytest.mark.parametrize("kinds", [None, KINDS])
def test_upstream_going_away_reaches_the_client(kinds):
    """The upstream stops mid-stream: the client's call ends (not left hanging) with a status."""
    crt, key = make_cert()
    svc = _Upstream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((svc,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with TLSFront(f"127.0.0.1:{port}", cert=crt, key=key, kinds=kinds) as f, _channel(f, crt) as ch:
        it = ch.unary_stream(SVC + "Hang")(b"", timeout=30)
        assert next(it) == b"0"
        server.stop(None).wait(5)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            list(it)
        assert ei.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - t0 < 10


def test_message_size_limit_at_the_front(front, server_cert):
    with _channel(front, server_cert[0]) as ch:
        call = ch.unary_unary(SVC + "Unary")
        assert call(b"x" * (512 * 1024), timeout=10) == b"echo:" + b"x" * (512 * 1024)
        with pytest.raises(grpc.RpcError) as ei:
            call(b"x" * (2 * 1024 * 1024), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_plaintext_and_untrusted_clients_are_refused(front, server_cert):
    with grpc.insecure_channel(front.address) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SVC + "Unary")(b"hi", timeout=3)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    other, _ = make_cert("127.0.0.1")  # a different self-signed certificate
    with _channel(front, other) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SVC + "Unary")(b"hi", timeout=3)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_name_override_and_client_option(upstream):
    """A certificate for a lab host name, reached on 127.0.0.1: the client names the host."""
    from service.client import Client

    crt, key = make_cert("cortexlens.lab", dns=("cortexlens.lab",), ips=())
    with TLSFront(upstream[1], cert=crt, key=key) as f:
        with grpc.secure_channel(f.address, grpc.ssl_channel_credentials(crt)) as ch:
            with pytest.raises(grpc.RpcError) as ei:  # the name does not match 127.0.0.1
                ch.unary_unary(SVC + "Unary")(b"hi", timeout=3)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        c = Client(f.address, root_certificates=crt, server_name="cortexlens.lab")
        with c:
            assert c.channel.unary_unary(SVC + "Unary")(b"hi", timeout=5) == b"echo:hi"


def test_mutual_tls(upstream, tmp_path):
    from service.client import Client

    ca = make_cert("cortexlens test CA", ca=True)
    crt, key = make_cert("127.0.0.1", issuer=ca)
    ccrt, ckey = make_cert("lab-rig-1", dns=(), ips=(), issuer=ca, client=True)
    stranger = make_cert("someone", dns=(), ips=(), client=True)  # self-signed, not from the CA
    (tmp_path / "client_ca.pem").write_bytes(ca[0])
    (tmp_path / "cert.pem").write_bytes(crt)
    (tmp_path / "key.pem").write_bytes(key)
    # paths, as the settings give them
    paths = {k: tmp_path / f"{k}.pem" for k in ("cert", "key", "client_ca")}
    with TLSFront(upstream[1], **paths) as f:
        assert f.mutual
        for kw in ({}, {"private_key": stranger[1], "certificate_chain": stranger[0]}):
            with _channel(f, ca[0], **kw) as ch:
                with pytest.raises(grpc.RpcError) as ei:
                    ch.unary_unary(SVC + "Unary")(b"hi", timeout=3)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with _channel(f, ca[0], private_key=ckey, certificate_chain=ccrt) as ch:
            assert ch.unary_unary(SVC + "Unary")(b"hi", timeout=5) == b"echo:hi"
        with Client(f.address, root_certificates=ca[0], client_cert=ccrt, client_key=ckey) as c:
            assert c.channel.unary_unary(SVC + "Unary")(b"hi", timeout=5) == b"echo:hi"


@pytest.mark.parametrize("kinds", [None, KINDS])
def test_unreachable_upstream_is_unavailable(server_cert, kinds):
    crt, key = server_cert
    up = f"127.0.0.1:{_free_port()}"
    with TLSFront(up, cert=crt, key=key, kinds=kinds) as f, _channel(f, crt) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SVC + "Unary")(b"hi", timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_method_kinds_come_from_the_loaded_descriptors():
    import service.protos_gen.cortexlens.v1.cortexlens_pb2  # noqa: F401
    from service.tls_front import method_kind

    assert method_kind("/cortexlens.v1.Decoder/Decode") == (False, False)
    assert method_kind("/cortexlens.v1.Decoder/StreamSession") == (True, True)
    assert method_kind("/cortexlens.v1.Retraining/WatchJob") == (False, True)
    assert method_kind("/cortexlens.v1.Decoder/NoSuchMethod") is None
    assert method_kind("/no.Such/Service") is None
    assert method_kind("garbage") is None


def test_bind_failure_and_bad_files_are_reported(server_cert, tmp_path):
    crt, key = server_cert
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(OSError, match="cannot bind"):
            TLSFront("127.0.0.1:1", cert=crt, key=key, port=taken).start()
    with pytest.raises(FileNotFoundError):
        TLSFront("127.0.0.1:1", cert=tmp_path / "nope.pem", key=key)
    with pytest.raises(ValueError, match="certificate"):
        TLSFront("127.0.0.1:1", cert=b"", key=key)


def test_server_starts_and_stops_the_front_from_the_config(upstream, server_cert, tmp_path):
    """`service.server.start_tls_front` / `stop_tls_front` (called by `start` / `stop`): the
    ``tls`` settings of the Serve config, forwarding to the config's gRPC port on loopback."""
    from service import server

    svc, target = upstream
    crt, key = server_cert
    (tmp_path / "c.pem").write_bytes(crt)
    (tmp_path / "k.pem").write_bytes(key)
    port = _free_port()
    cfg_tls = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"), "port": port}
    cfg = server.load_config(grpc_port=int(target.rsplit(":", 1)[1]), args={"tls": cfg_tls})
    assert server.start_tls_front(server.load_config()) is None  # no tls settings: no front
    front = server.start_tls_front(cfg)
    try:
        assert server.tls_front() is front and front.address == f"127.0.0.1:{port}"
        with pytest.raises(RuntimeError, match="already running"):
            server.start_tls_front(cfg)
        with grpc.secure_channel(front.address, grpc.ssl_channel_credentials(crt)) as ch:
            assert ch.unary_unary(SVC + "Unary")(b"cfg", timeout=5) == b"echo:cfg"
    finally:
        server.stop_tls_front()
    assert server.tls_front() is None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # no longer listening
        # a taken port is reported before anything starts
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = server.load_config(args={"tls": {**cfg_tls, "port": s.getsockname()[1]}})
        with pytest.raises(OSError, match="cannot bind the TLS front"):
            server.start_tls_front(taken)
    assert server.tls_front() is None


def test_tls_settings_are_validated(tmp_path):
    from pydantic import ValidationError

    from service import server
    from service.cli import main

    with pytest.raises(ValidationError, match="both cert and key"):
        server.load_config(args={"tls": {"cert": "/x.pem"}})
    with pytest.raises(ValidationError, match="client_ca"):
        server.load_config(args={"tls": {"client_ca": "/ca.pem"}})
    with pytest.raises(ValidationError):
        server.load_config(args={"quotas": {"max_rate_factor": -1}})
    # the CLI: one line, exit status 2, before anything starts
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--home", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")])
    assert ei.value.code == 2


def test_serve_command_options_reach_the_settings(tmp_path):
    """`cortexlens serve --tls-* --token-env` compose into the Serve config's args."""
    from service import server
    from service.cli.serve import prepare

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    c.write_text("x")
    k.write_text("x")
    tls = {"cert": str(c), "key": str(k), "port": 9555, "host": "0.0.0.0"}
    kw = dict(
        config=None,
        port=19001,
        metrics_port=0,
        home=tmp_path,
        bundle=bundle,
        model=None,
        version=None,
        train=False,
        tls=tls,
        token_env="LAB_TOKEN",
    )
    cfg = prepare(**kw)
    s = server.settings_of(cfg)
    assert (s.tls.cert, s.tls.key, s.tls.port, s.tls.host) == (str(c), str(k), 9555, "0.0.0.0")
    assert s.tls.enabled and not s.tls.client_ca and s.token_env == "LAB_TOKEN"
    assert s.quotas.max_rate_factor == 100.0  # defaults kept
    import typer

    with pytest.raises(typer.BadParameter, match="no such file"):
        prepare(**{**kw, "tls": {**tls, "key": str(tmp_path / "missing.pem")}})
