"""The edge's TLS side against real clients: curl (HTTP/1.1 and HTTP/2), h2load, Python's ssl.

An Edge with its HTTPS listener runs in the test's loop on free loopback ports;
certificates come from a taxiway CA made in tmp. Clients never resolve a name:
curl gets ``--resolve NAME:PORT:127.0.0.1``, h2load ``--connect-to``, Python
connects to 127.0.0.1 and sends the name as SNI only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_edge import machine_record, machines, put_machine, routed, until  # noqa: F401, F811

from taxiway.platform import edgeh2, edgetls, schema
from taxiway.platform.edge import Edge, EdgeConfig
from taxiway.platform.state import State

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
                        pytest.param(("asyncio", {}), id="asyncio")])
def anyio_backend(request: pytest.FixtureRequest):
    """uvloop, as the edge runs (python -m taxiway.platform.edge), and asyncio's own loop."""
    return request.param


# -- pure parts -----------------------------------------------------------------------------------------

def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The ClientHello Python's own TLS client sends (the bytes a real client puts on the wire)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_client_hello_gives_server_name_and_alpn():
    data = client_hello("Web.Localhost", ["h2", "http/1.1"])
    assert edgetls.parse_client_hello(data) == edgetls.Hello("web.localhost", ("h2", "http/1.1"))
    assert edgetls.parse_client_hello(client_hello(None)) == edgetls.Hello(None, ())
    assert edgetls.parse_client_hello(client_hello("x.test", ["acme-tls/1"])).alpn == ("acme-tls/1",)
    # Every strict prefix asks for more bytes; other protocols are told apart at once.
    for n in range(len(data)):
        assert edgetls.parse_client_hello(data[:n]) is None
    for other in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"):
        with pytest.raises(edgetls.NotTLS):
            edgetls.parse_client_hello(other)


REAL_HELLO = client_hello("web.localhost", ["h2"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 400))
def test_client_hello_parser_never_crashes(noise: bytes, cut: int):
    real = REAL_HELLO
    for data in (noise, b"\x16\x03\x01" + noise, real[:cut] + noise, real[: 5 + cut] + noise):
        try:
            hello = edgetls.parse_client_hello(data)
        except edgetls.NotTLS:
            continue
        assert hello is None or isinstance(hello, edgetls.Hello)


def test_policy_names_redirects_and_renewal():
    known = {"web"}.__contains__
    custom = {"www.example.test": {"app": "web"}}
    assert edgetls.app_for_server_name("web.localhost", "localhost", custom, known) == "web"
    assert edgetls.app_for_server_name("nope.localhost", "localhost", custom, known) is None
    assert edgetls.app_for_server_name("www.example.test", "localhost", custom, known) == "web"
    assert edgetls.app_for_server_name("a.web.localhost", "localhost", custom, known) is None
    assert edgetls.app_for_server_name(None, "localhost", custom, known) is None
    from taxiway.egress import http

    head = http.RequestHead("GET", "/a?b=1", b"HTTP/1.1", [])
    out = edgetls.redirect_to_https(head, "web.localhost:8180", 8443)
    assert out.startswith(b"HTTP/1.1 301 ") and b"\r\nLocation: https://web.localhost:8443/a?b=1\r\n" in out
    assert b"Location: https://web.localhost/a?b=1\r\n" in edgetls.redirect_to_https(head, "web.localhost", 443)
    force = {"services": [{"internal_port": 80, "ports": [{"port": 80, "handlers": ["http"], "force_https": True}]}]}
    assert edgetls.wants_force_https([None, force]) and not edgetls.wants_force_https([machine_record("a", "b")["config"]])
    tls_svc = {"services": [
        {"internal_port": 5432, "protocol": "tcp", "ports": [{"port": 15432, "handlers": ["tls", "proxy_proto"]},
                                                             {"port": 5432, "handlers": []}]},
        {"internal_port": 8080, "ports": [{"port": 443, "handlers": ["tls", "http"]}]},  # the http service: not TCP
        {"internal_port": 7, "protocol": "udp", "ports": [{"port": 7, "handlers": ["tls"]}]},
        {"internal_port": 99999, "ports": [{"port": 1, "handlers": ["tls"]}]}]}
    assert edgetls.tls_tcp_services(tls_svc) == [(15432, 5432, True)]
    assert edgetls.tls_tcp_listeners({"b.1": {"config": tls_svc}, "a.1": {"config": tls_svc},
                                      "c.1": {"config": tls_svc, "desired": "destroyed"}}) == {15432: ("a", 5432, True)}
    now = datetime.now(UTC)
    assert not edgetls.due(now + timedelta(days=20), timedelta(days=30), now)
    assert edgetls.due(now + timedelta(days=9), timedelta(days=30), now)


def test_h2_request_translation_refuses_field_splitting():
    raw, chunked, method = edgeh2.request_head(
        [(b":method", b"POST"), (b":path", b"/up?x=1"), (b":authority", b"web.localhost"), (b":scheme", b"https"),
         (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-y", b"z")], has_body=True)
    assert method == "POST" and chunked
    assert raw == (b"POST /up?x=1 HTTP/1.1\r\nhost: web.localhost\r\nx-y: z\r\ncookie: a=1; b=2\r\n"
                   b"transfer-encoding: chunked\r\n\r\n")
    for bad in (b"a\r\nTransfer-Encoding: chunked", b"a\nb", b"a\x00"):
        with pytest.raises(edgeh2.BadRequest):
            edgeh2.request_head([(b":method", b"GET"), (b":path", b"/"), (b"x", bad)], has_body=False)


def test_cert_store_issues_caches_and_renews(tmp_path: Path):
    from taxiway.pki.ca import CA

    CA.init(tmp_path / "ca")
    store = edgetls.CertStore(tmp_path / "tls", str(tmp_path / "ca"))
    ctx = store.context_for("web.localhost")
    path = store.path("ca", "web.localhost")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and b"PRIVATE KEY" in path.read_bytes()
    assert store.context_for("web.localhost") is ctx  # memory
    first = path.read_bytes()
    again = edgetls.CertStore(tmp_path / "tls", str(tmp_path / "ca"))
    again.context_for("web.localhost")
    assert path.read_bytes() == first  # the file, not a new certificate
    # Due (last third of its lifetime): the next use issues a new one.
    store.clock = lambda: datetime.now(UTC) + timedelta(days=25)
    assert store.context_for("web.localhost") is not ctx and path.read_bytes() != first


# -- against real clients ---------------------------------------------------------------------------------

@pytest.fixture
async def tls_edge(state: State, tmp_path: Path) -> AsyncIterator[Edge]:
    from taxiway.pki.ca import CA

    CA.init(tmp_path / "ca")
    e = Edge(EdgeConfig(listen=("127.0.0.1", 0), https=("127.0.0.1", 0), ca=str(tmp_path / "ca"),
                        tls_dir=str(tmp_path / "tls"), header_timeout=2.0, retry_window=1.0),
             state=state, log=open(tmp_path / "edge.log", "ab"))
    await e.start()
    try:
        yield e
    finally:
        await e.close()


def root(tmp_path: Path) -> str:
    return str(tmp_path / "ca" / "root.pem")


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "20", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def tls_port(e: Edge) -> int:
    return e.tls.address[1]


async def test_https_http2_and_uploads_with_curl(state, tls_edge, machines, tmp_path):  # noqa: F811 - the fixture
    web = machines("web", "0000000000000a")
    await put_machine(state, web)
    await until(lambda: routed(tls_edge, "web"), "routes")
    port = tls_port(tls_edge)
    resolve = f"web.localhost:{port}:127.0.0.1"
    assert Path(root(tmp_path)).exists()
    rc, out, err = await curl("--cacert", root(tmp_path), "--resolve", resolve, "--http1.1",
                              "-w", "\n%{http_version}", f"https://web.localhost:{port}/hi")
    assert rc == 0, err
    body, version = out.rsplit("\n", 1)
    got = json.loads(body)
    assert version == "1.1" and got["machine"] == web.id and got["path"] == "/hi"
    assert got["headers"]["x-forwarded-proto"] == "https"
    # HTTP/2 (ALPN h2), several streams on one connection, and a body upload.
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20) )
    rc, out, err = await curl("--cacert", root(tmp_path), "--resolve", resolve, "--http2",
                              "-w", "\n%{http_version}", f"https://web.localhost:{port}/a",
                              f"https://web.localhost:{port}/b")
    assert rc == 0, err
    assert out.endswith("\n2") and out.count('"machine"') == 2 and '"x-forwarded-proto": "https"' in out
    rc, out, err = await curl("--cacert", root(tmp_path), "--resolve", resolve, "--http2",
                              "--data-binary", f"@{blob}", f"https://web.localhost:{port}/echo")
    assert rc == 0, err
    got = json.loads(out)
    assert (got["machine"], got["sha256"], got["bytes"]) == (web.id, hashlib.sha256(blob.read_bytes()).hexdigest(),
                                                             3 << 20)
    # h2load: 40 requests, 10 streams at once on each of 2 connections.
    proc = await asyncio.create_subprocess_exec(
        "h2load", "-n", "40", "-c", "2", "-m", "10", f"--connect-to=127.0.0.1:{port}",
        f"https://web.localhost:{port}/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out_b, _ = await proc.communicate()
    report = out_b.decode()
    assert "40 succeeded, 0 failed, 0 errored" in report and "status codes: 40 2xx" in report, report
    assert "Application protocol: h2" in report


async def test_unknown_names_get_no_certificate(state, tls_edge, machines, tmp_path):  # noqa: F811 - the fixture
    web = machines("web", "0000000000000a")
    await put_machine(state, web)
    await until(lambda: routed(tls_edge, "web"), "routes")
    port = tls_port(tls_edge)
    ctx = ssl.create_default_context(cafile=root(tmp_path))

    def handshake(name: str | None) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            c = ctx if name else ssl._create_unverified_context()  # noqa: SLF001 - no SNI at all
            with c.wrap_socket(s, server_hostname=name) as t:
                return t.getpeercert()["subjectAltName"]

    assert await asyncio.to_thread(handshake, "web.localhost") == (("DNS", "web.localhost"),)
    for name in ("nothere.localhost", "other.example", None):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
            await asyncio.to_thread(handshake, name)
    # No certificate was made for them, and plain HTTP to the HTTPS port is told so.
    assert sorted(p.name for p in (tmp_path / "tls" / "ca").iterdir()) == ["web.localhost.pem"]
    rc, out, err = await curl(f"http://127.0.0.1:{port}/")
    assert "HTTPS" in out


async def test_force_https_custom_hostnames_and_http01_answers(state, tls_edge, machines, tmp_path):  # noqa: F811 - the fixture
    web = machines("web", "0000000000000a")
    await put_machine(state, web)
    rec = machine_record("web", web.id)
    rec["config"]["services"][0]["ports"][0]["force_https"] = True
    await state.put(schema.MACHINES, schema.machine_key("web", web.id), rec)
    await until(lambda: routed(tls_edge, "web"), "routes")
    plain, port = tls_edge.address[1], tls_port(tls_edge)
    rc, out, err = await curl("-i", "-H", "Host: web.localhost", f"http://127.0.0.1:{plain}/x?y=1")
    assert out.startswith("HTTP/1.1 301") and f"Location: https://web.localhost:{port}/x?y=1" in out, out
    # A custom hostname (the API writes it to CERTS): routed on both listeners, with its own certificate.
    await state.put(schema.CERTS, "www.example.test", {"hostname": "www.example.test", "app": "web",
                                                       "org": "personal", "acme": None})
    await until(lambda: "www.example.test" in tls_edge.tls.hostnames, "hostnames")
    rc, out, err = await curl("--cacert", root(tmp_path), "--resolve", f"www.example.test:{port}:127.0.0.1",
                              f"https://www.example.test:{port}/z")
    assert rc == 0, err
    assert json.loads(out)["headers"]["host"] == f"www.example.test:{port}"
    # ACME HTTP-01 answers come before any redirect or routing.
    tls_edge.tls.http_tokens["tok123"] = "tok123.thumb"
    rc, out, err = await curl("-H", "Host: www.example.test", f"http://127.0.0.1:{plain}/.well-known/acme-challenge/tok123")
    assert out == "tok123.thumb"
    await state.delete(schema.CERTS, "www.example.test")
    await until(lambda: "www.example.test" not in tls_edge.tls.hostnames, "hostname gone")
    rc, out, err = await curl("--cacert", root(tmp_path), "--resolve", f"www.example.test:{port}:127.0.0.1",
                              f"https://www.example.test:{port}/z")
    assert rc != 0


async def test_http2_upload_to_a_machine_that_does_not_read_is_held_back(state, tls_edge, tmp_path):
    """The edge stops acknowledging a stream's DATA while the machine reads none of it: the client's
    flow-control window closes, so the body never piles up in the edge's memory."""
    import h2.config
    import h2.connection
    import h2.events

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head, then never another byte read
        await asyncio.sleep(30)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await state.put(schema.APPS, "slow", {"name": "slow", "org": "personal"})
    await state.put(schema.MACHINES, "slow.0000000000000c", machine_record("slow", "0000000000000c"))
    await state.put(schema.STATUS, "slow.0000000000000c",
                    {"id": "0000000000000c", "app": "slow", "host": "local", "state": "started",
                     "ports": {"8080": port}, "checks": {}})
    await until(lambda: routed(tls_edge, "slow"), "routes")
    ctx = ssl.create_default_context(cafile=root(tmp_path))
    ctx.set_alpn_protocols(["h2"])

    def upload() -> tuple[int, int]:
        with socket.create_connection(("127.0.0.1", tls_port(tls_edge)), timeout=10) as raw_sock, \
                ctx.wrap_socket(raw_sock, server_hostname="slow.localhost") as s:
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
            s.sendall(c.data_to_send())
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "POST"), (":path", "/up"), (":authority", "slow.localhost"),
                                 (":scheme", "https")])
            sent, stalled_since = 0, None
            s.settimeout(0.02)
            while sent < (64 << 20):
                room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, (64 << 20) - sent)
                if room > 0:
                    c.send_data(sid, b"x" * room)
                    sent += room
                    stalled_since = None
                elif stalled_since is None:
                    stalled_since = time.monotonic()
                elif time.monotonic() - stalled_since > 1:
                    return sent, c.local_flow_control_window(sid)
                s.sendall(c.data_to_send())
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                for ev in c.receive_data(data):
                    assert not isinstance(ev, h2.events.StreamReset)
            return sent, c.local_flow_control_window(sid)

    try:
        sent, window = await asyncio.to_thread(upload)
    finally:
        server.close()
    # What got through sits in the loopback socket buffers (a few MiB), not in the edge.
    assert window == 0 and sent < (16 << 20), (sent, window)


async def test_secure_websockets_are_tunnelled(state, tls_edge, tmp_path):
    """wss:// (HTTP/1.1 Upgrade over TLS: browsers open a separate HTTP/1.1 connection for it) reaches
    the machine, with X-Forwarded-Proto https."""
    import websockets

    async def echo(ws):
        async for message in ws:
            await ws.send(f"{ws.request.headers['x-forwarded-proto']}: {message}")

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await state.put(schema.APPS, "chat", {"name": "chat", "org": "personal"})
        await state.put(schema.MACHINES, "chat.0000000000000c", machine_record("chat", "0000000000000c"))
        await state.put(schema.STATUS, "chat.0000000000000c",
                        {"id": "0000000000000c", "app": "chat", "host": "local", "state": "started",
                         "ports": {"8080": port}, "checks": {}})
        await until(lambda: routed(tls_edge, "chat"), "routes")
        ctx = ssl.create_default_context(cafile=root(tmp_path))
        ctx.set_alpn_protocols(["http/1.1"])
        async with websockets.connect("wss://chat.localhost/ws", host="127.0.0.1", port=tls_port(tls_edge),
                                      ssl=ctx, server_hostname="chat.localhost") as ws:
            for i in range(3):
                await ws.send(f"hello {i}")
                assert await ws.recv() == f"https: hello {i}"


async def test_http2_rapid_reset_is_cut_off(state, tls_edge, machines, tmp_path):  # noqa: F811 - the fixture
    """Streams opened and reset at once (CVE-2023-44487) end the connection with ENHANCE_YOUR_CALM;
    a client that lets its streams finish is never cut."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    web = machines("web", "0000000000000a")
    await put_machine(state, web)
    await until(lambda: routed(tls_edge, "web"), "routes")
    ctx = ssl.create_default_context(cafile=root(tmp_path))
    ctx.set_alpn_protocols(["h2"])
    request = [(":method", "GET"), (":path", "/"), (":authority", "web.localhost"), (":scheme", "https")]

    def session(reset: bool, streams: int) -> tuple[int, object]:
        """(answers received, the GOAWAY's error code or None)."""
        with socket.create_connection(("127.0.0.1", tls_port(tls_edge)), timeout=20) as raw_sock, \
                ctx.wrap_socket(raw_sock, server_hostname="web.localhost") as s:
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            answers, goaway = 0, None
            for _ in range(streams):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, request, end_stream=True)
                if reset:
                    c.reset_stream(sid)
                try:
                    s.sendall(c.data_to_send())
                except OSError:  # the edge hung up on us: what it said is still to be read
                    break
                if not reset:  # one at a time: wait for this answer
                    done = False
                    while not done:
                        for ev in c.receive_data(s.recv(65536)):
                            done = done or isinstance(ev, h2.events.StreamEnded)
                            answers += isinstance(ev, h2.events.ResponseReceived)
            if not reset:
                return answers, goaway
            with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
                while data := s.recv(65536):
                    for ev in c.receive_data(data):
                        if isinstance(ev, h2.events.ConnectionTerminated):
                            goaway = ev.error_code
                    if goaway is not None:
                        break
            return answers, goaway

    answers, goaway = await asyncio.to_thread(session, False, 20)
    assert answers == 20 and goaway is None
    answers, goaway = await asyncio.to_thread(session, True, 400)
    assert goaway == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_tcp_services_with_a_tls_handler(state, tls_edge, tmp_path):
    """[[services]] ports with handlers ["tls"]: the edge ends TLS with the app's certificate (SNI or
    not) and relays plain TCP to the machine; with "proxy_proto" too, a PROXY v2 header comes first."""
    from taxiway.platform.nats import free_port

    got: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(4096)
        got.append(first)
        if first.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):  # PROXY v2: answer with what follows its header
            size = int.from_bytes(first[14:16], "big")
            rest = first[16 + size:] or await reader.read(4096)  # the header may come on its own
            first = b"proxied " + rest
        writer.write(first)
        while data := await reader.read(4096):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    internal_port = server.sockets[0].getsockname()[1]
    plain_port, proxied_port = free_port(), free_port()
    config = {"image": "db:latest", "services": [{"internal_port": 9000, "protocol": "tcp", "ports": [
        {"port": plain_port, "handlers": ["tls"]}, {"port": proxied_port, "handlers": ["tls", "proxy_proto"]}]}]}
    rec = machine_record("db", "0000000000000d")
    rec["config"] = config
    await state.put(schema.APPS, "db", {"name": "db", "org": "personal"})
    await state.put(schema.MACHINES, "db.0000000000000d", rec)
    await state.put(schema.STATUS, "db.0000000000000d", {"id": "0000000000000d", "app": "db", "host": "local",
                                                         "state": "started", "ports": {"9000": internal_port},
                                                         "checks": {}})
    await until(lambda: proxied_port in tls_edge.tls._tcp, "TLS TCP listeners", timeout=10)
    ctx = ssl.create_default_context(cafile=root(tmp_path))

    def talk(port: int, sni: str | None, text: bytes) -> tuple[bytes, list]:
        c = ctx
        if sni is None:
            c = ssl.create_default_context(cafile=root(tmp_path))
            c.check_hostname = False  # no name sent: the certificate is still checked against the CA
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_sock, \
                c.wrap_socket(raw_sock, server_hostname=sni) as s:
            s.sendall(text)
            answer = s.recv(4096)
            return answer, s.getpeercert()["subjectAltName"]

    try:
        answer, san = await asyncio.to_thread(talk, plain_port, "db.localhost", b"hello")
        assert answer == b"hello" and san == (("DNS", "db.localhost"),)
        answer, san = await asyncio.to_thread(talk, plain_port, None, b"no sni")
        assert answer == b"no sni" and san == (("DNS", "db.localhost"),)
        answer, _ = await asyncio.to_thread(talk, proxied_port, "db.localhost", b"hi")
        assert answer == b"proxied hi"
        assert got[-1].startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11")  # v2, PROXY, TCP over IPv4
    finally:
        server.close()
    # The service gone from the records: the port is closed.
    await state.delete(schema.MACHINES, "db.0000000000000d")
    await until(lambda: plain_port not in tls_edge.tls._tcp, "listener closed", timeout=10)
