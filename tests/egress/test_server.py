"""The running proxy: roles, ACL decisions, answers, logs, metrics, limits, reload and drain."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import time

import pytest

from .conftest import ALLOWED, raw_request, status_of

ACL = """\
version: v1
services:
  - name: authed
    project: platform
    action: enforce
    allowed_domains: [ok.test]
  - name: billing
    project: payments
    action: report
    allowed_domains: [ok.test]
  - name: alice-role
    project: web
    action: enforce
    allowed_domains: ["*.ok.test"]
default:
  project: other
  action: enforce
  allowed_domains: [ok.test]
global_deny_list: [blocked.test]
"""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(proxy, url: str, *headers: str, method: str = "GET") -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return raw_request(proxy, f"{method} {url} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n".encode())


def connect(proxy, hostport: str, *headers: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection((proxy.host, proxy.port), timeout=10)
    extra = "".join(h + "\r\n" for h in headers)
    s.sendall(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n{extra}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(4096)
        if not c:
            break
        head += c
    return s, head


def log_lines(proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.log.read_text().splitlines() if line.startswith("{")]


def wait_for_log(proxy, pred, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_lines(proxy):
            if pred(line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no such log line in {proxy.log.read_text()[-2000:]}")


def recv_until(s: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        c = s.recv(65536)
        if not c:
            raise AssertionError(f"connection closed before {marker!r}: {data[:300]!r}")
        data += c
    return data


def http_over(s: socket.socket, path: str, host: str = "ok.test") -> bytes:
    """One request over an open tunnel; ConnectionError if the tunnel was closed."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        c = s.recv(65536)
        if not c:
            raise ConnectionResetError("tunnel closed")
        data += c
    head, _, body = data.partition(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < n:
        c = s.recv(1 << 20)
        if not c:
            raise ConnectionResetError("tunnel closed")
        body += c
    return head + b"\r\n\r\n" + body


@pytest.fixture
def acl_file(tmp_path):
    p = tmp_path / "acl.yaml"
    p.write_text(ACL)
    return p


def test_password_gives_role_authed(start_proxy, acl_file, upstream):
    proxy = start_proxy("--acl", str(acl_file), env={"PROXY_PASSWORD": "s3cret"})
    url = f"http://ok.test:{upstream.port}/p"
    resp = get(proxy, url)
    assert status_of(resp) == 407
    assert b'Proxy-Authenticate: Basic realm="taxiway egress"' in resp
    assert b"X-Taxiway-Egress-Error: egress to ok.test:" in resp and b"proxy credentials required" in resp
    resp = get(proxy, url, "Proxy-Authorization: " + basic("x", "wrong"))
    assert status_of(resp) == 407 and b"wrong proxy credentials" in resp
    resp = get(proxy, url, "Proxy-Authorization: " + basic("anyone", "s3cret"))
    assert status_of(resp) == 200 and b"GET /p" in resp
    # The credentials are for the proxy only: never forwarded upstream.
    assert "proxy-authorization" not in upstream.requests[-1][2]
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    s.close()
    assert status_of(head) == 407 and b"Proxy-Authenticate" in head
    resp = get(proxy, f"http://cname-ok.test:{upstream.port}/", "Proxy-Authorization: " + basic("a", "s3cret"))
    assert status_of(resp) == 403
    assert b"denied: rule has enforce policy (role authed)" in resp
    line = wait_for_log(proxy, lambda d: d.get("msg") == "decision" and d.get("status") == 403)
    assert line["role"] == "authed" and line["project"] == "platform" and line["decision"] == "deny"
    assert line["requested_host"] == f"cname-ok.test:{upstream.port}"


def test_users_file_roles(start_proxy, acl_file, tmp_path, upstream, taxiway):
    r = taxiway("egress", "hash-password", "--rounds", "4", input=b"alice-pw\n")
    assert r.returncode == 0 and r.stdout.startswith(b"$2b$04$")
    users = tmp_path / "users"
    users.write_text(f"# name:hash:role\nalice:{r.stdout.decode().strip()}:alice-role\n")
    proxy = start_proxy("--acl", str(acl_file), "--users", str(users))
    auth = "Proxy-Authorization: " + basic("alice", "alice-pw")
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/", auth)) == 200
    resp = get(proxy, f"http://ok.test:{upstream.port}/", auth)
    assert status_of(resp) == 403 and b"(role alice-role)" in resp
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/",
                         "Proxy-Authorization: " + basic("alice", "nope"))) == 407
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/",
                         "Proxy-Authorization: " + basic("mallory", "alice-pw"))) == 407


@pytest.fixture
def pki(tmp_path):
    from taxiway.pki import CA

    ca, _ = CA.init(tmp_path / "ca")
    server = ca.issue(["127.0.0.1"])
    server.write(tmp_path / "proxy.pem", tmp_path / "proxy.key")
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    return ca, tmp_path


def test_client_certificate_cn_is_the_role(start_proxy, acl_file, pki, upstream):
    ca, d = pki
    proxy = start_proxy("--acl", str(acl_file), "--tls-cert", str(d / "proxy.pem"), "--tls-key",
                        str(d / "proxy.key"), "--client-ca", str(d / "root.pem"),
                        env={"PROXY_PASSWORD": "s3cret"})
    leaf = ca.issue(["billing"], client=True, cn="billing")
    leaf.write(d / "billing.pem", d / "billing.key")

    def over_tls(request: bytes, cert: bool) -> bytes:
        ctx = ssl.create_default_context(cafile=str(d / "root.pem"))
        if cert:
            ctx.load_cert_chain(str(d / "billing.pem"), str(d / "billing.key"))
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(request)
            out = b""
            while True:
                c = s.recv(65536)
                if not c:
                    return out
                out += c

    # Role billing has a report policy: a name outside its list is let through and reported.
    req = f"GET http://cname-ok.test:{upstream.port}/r HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
    resp = over_tls(req, cert=True)
    assert status_of(resp) == 200 and b"GET /r" in resp
    line = wait_for_log(proxy, lambda d: d.get("msg") == "decision" and d.get("role") == "billing")
    assert line["decision"] == "report" and line["enforce_would_deny"] is True
    assert line["project"] == "payments" and line["resolved_address"] == ALLOWED
    # Without a certificate, no role: 407 (the password would be the other way in).
    assert status_of(over_tls(req, cert=False)) == 407


def test_failures_have_their_status(start_proxy, upstream):
    proxy = start_proxy("--idle-timeout", "1", "--max-header-bytes", "2048")
    resp = get(proxy, f"http://nope.test:{upstream.port}/")
    assert status_of(resp) == 502 and b"NXDOMAIN" in resp and b"X-Taxiway-Egress-Error" in resp
    closed = socket.socket()
    closed.bind((ALLOWED, 0))
    port = closed.getsockname()[1]
    closed.close()
    resp = get(proxy, f"http://ok.test:{port}/")
    assert status_of(resp) == 502 and b"Connection refused" in resp
    _, head = connect(proxy, f"ok.test:{port}")
    assert status_of(head) == 502
    resp = get(proxy, f"http://ok.test:{upstream.port}/slow/3")
    assert status_of(resp) == 504 and b"timed out" in resp
    resp = get(proxy, f"http://ok.test:{upstream.port}/", "X-Big: " + "a" * 4000)
    assert status_of(resp) == 431
    resp = get(proxy, f"https://ok.test:{upstream.port}/")
    assert status_of(resp) == 400


def test_dns_timeout_answers_504(tmp_path, upstream):
    from .conftest import proxy_server

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a "DNS server" that never answers
    silent.bind(("127.0.0.1", 0))
    try:
        with proxy_server(tmp_path, "--resolver", f"127.0.0.1:{silent.getsockname()[1]}",
                          "--dns-timeout", "0.5") as proxy:
            resp = get(proxy, f"http://ok.test:{upstream.port}/")
            assert status_of(resp) == 504 and b"DNS lookup of ok.test timed out" in resp
    finally:
        silent.close()


def test_tunnel_limit_answers_503(start_proxy, upstream):
    proxy = start_proxy("--max-tunnels", "1")
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    assert status_of(head) == 200
    _, head2 = connect(proxy, f"ok.test:{upstream.port}")
    assert status_of(head2) == 503 and b"Retry-After: 1" in head2
    s.close()
    deadline = time.monotonic() + 10  # the slot frees once the proxy sees the tunnel close
    while True:
        s3, head3 = connect(proxy, f"ok.test:{upstream.port}")
        s3.close()
        if status_of(head3) == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status_of(head3) == 200


def test_connect_tunnel_large_transfer_and_close_log(shared_proxy, upstream):
    s, head = connect(shared_proxy, f"ok.test:{upstream.port}")
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    resp = http_over(s, "/big/5000000")
    assert resp.endswith(b"x" * 1000) and len(resp.partition(b"\r\n\r\n")[2]) == 5_000_000
    s.close()
    line = wait_for_log(shared_proxy, lambda d: d.get("msg") == "close" and d.get("bytes_in", 0) > 5_000_000)
    assert line["proxy_type"] == "connect" and line["bytes_out"] > 0 and line["duration_ms"] >= 0


def test_keep_alive_reuses_the_pinned_upstream_connection(shared_proxy, upstream):
    before = upstream.connections
    with socket.create_connection((shared_proxy.host, shared_proxy.port), timeout=10) as s:
        for i in range(3):
            s.sendall(f"GET http://ok.test:{upstream.port}/k{i} HTTP/1.1\r\nHost: ok.test\r\n\r\n".encode())
            data = recv_until(s, f"GET /k{i}".encode())
            assert status_of(data) == 200
        s.sendall(f"POST http://ok.test:{upstream.port}/post HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".encode())
        recv_until(s, b"hello")
        s.sendall((f"POST http://ok.test:{upstream.port}/chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "3\r\nabc\r\n0\r\n\r\n").encode())
        recv_until(s, b"abc")
    assert upstream.connections - before == 1


def test_websocket_through_connect(shared_proxy):
    import threading

    from websockets.sync.client import connect as ws_connect
    from websockets.sync.server import serve as ws_serve

    def echo(ws):  # noqa: ANN001
        for msg in ws:
            ws.send(msg)

    with ws_serve(echo, ALLOWED, 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        s, head = connect(shared_proxy, f"ok.test:{port}")
        assert status_of(head) == 200
        with ws_connect(f"ws://ok.test:{port}/", sock=s) as ws:
            for i in range(3):
                ws.send(f"hello {i}")
                assert ws.recv(timeout=5) == f"hello {i}"
        server.shutdown()


def test_metrics_and_health(shared_proxy, upstream):
    get(shared_proxy, f"http://ok.test:{upstream.port}/m")
    get(shared_proxy, f"http://internal.test:{upstream.port}/m")
    resp = raw_request(shared_proxy, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(resp) == 200
    text = resp.partition(b"\r\n\r\n")[2].decode()
    assert "# TYPE taxiway_egress_decisions_total counter" in text
    assert 'taxiway_egress_decisions_total{decision="deny",project="",proxy_type="http",role=""}' in text
    assert 'taxiway_egress_bytes_total{direction="in"}' in text
    assert "taxiway_egress_connect_seconds_bucket" in text
    assert status_of(raw_request(shared_proxy, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200


def test_sighup_reloads_the_acl_without_dropping_tunnels(start_proxy, acl_file, upstream):
    proxy = start_proxy("--acl", str(acl_file))
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    assert status_of(head) == 200
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/")) == 403
    acl_file.write_text(ACL.replace("allowed_domains: [ok.test]\nglobal", "allowed_domains: [ok.test, www.ok.test]\nglobal"))
    os.kill(proxy.proc.pid, signal.SIGHUP)
    wait_for_log(proxy, lambda d: d.get("msg") == "reload" and d.get("ok"))
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/")) == 200
    assert b"GET /still-open" in http_over(s, "/still-open")
    # A broken file keeps the last good ACL.
    acl_file.write_text("version: v1\nservices:\n  - name: x\n    action: sometimes\n")
    os.kill(proxy.proc.pid, signal.SIGHUP)
    wait_for_log(proxy, lambda d: d.get("msg") == "reload" and d.get("ok") is False)
    assert status_of(get(proxy, f"http://www.ok.test:{upstream.port}/")) == 200
    assert b"GET /still-open-2" in http_over(s, "/still-open-2")
    s.close()


def test_sigterm_drains_open_tunnels(start_proxy, upstream):
    proxy = start_proxy("--drain-timeout", "10")
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    assert status_of(head) == 200
    idle = socket.create_connection((proxy.host, proxy.port))
    os.kill(proxy.proc.pid, signal.SIGTERM)
    wait_for_log(proxy, lambda d: d.get("msg") == "draining")
    # The open tunnel keeps working; new clients are refused.
    assert b"GET /during-drain" in http_over(s, "/during-drain")
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port), timeout=2).recv(1)
    assert idle.recv(1) == b""  # an idle client connection is closed
    assert proxy.proc.poll() is None
    s.close()
    proxy.proc.wait(10)
    assert proxy.proc.returncode == 0


@pytest.mark.timeout(60)
def test_tunnel_idle_and_total_timeouts(start_proxy, upstream):
    proxy = start_proxy("--idle-timeout", "1", "--total-timeout", "30")
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    assert status_of(head) == 200
    assert b"GET /before-idle" in http_over(s, "/before-idle")
    s.settimeout(10)
    assert s.recv(1) == b""  # closed by the proxy after a second of silence
    line = wait_for_log(proxy, lambda d: d.get("msg") == "close" and d.get("proxy_type") == "connect")
    assert line["ended"] == "timeout"
    s.close()

    proxy = start_proxy("--idle-timeout", "30", "--total-timeout", "1.5")
    s, head = connect(proxy, f"ok.test:{upstream.port}")
    s.settimeout(10)
    started = time.monotonic()
    with pytest.raises(OSError):
        while time.monotonic() - started < 8:
            http_over(s, "/busy")  # never idle, yet cut after ~1.5 s
            time.sleep(0.1)
    assert time.monotonic() - started < 6
    s.close()


@pytest.mark.timeout(60)
def test_tunnel_half_close_is_passed_on(shared_proxy, upstream):
    """The client shuts its sending side after the request; the answer still comes back."""
    s, head = connect(shared_proxy, f"ok.test:{upstream.port}")
    assert status_of(head) == 200
    s.sendall(b"GET /half HTTP/1.1\r\nHost: ok.test\r\nConnection: close\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    s.close()
    assert status_of(data) == 200 and b"GET /half" in data


def test_acl_names_are_matched_after_normalization(start_proxy, acl_file, upstream):
    """The default rule allows ok.test only: spellings of it pass, look-alikes don't."""
    proxy = start_proxy("--acl", str(acl_file))
    p = upstream.port
    for host in ("ok.test", "OK.TEST.", "ｏｋ.test"):  # case, trailing dot, full-width letters
        resp = get(proxy, f"http://{host}:{p}/n")
        assert status_of(resp) == 200 and f"host=ok.test:{p}".encode() in resp, (host, resp[:200])
    for host in ("οk.test", "ok.test.evil.test", "ok-test", "blocked.test", "www.ok.test"):  # Greek omicron
        resp = get(proxy, f"http://{host}:{p}/n")
        assert status_of(resp) == 403, (host, resp[:200])
    line = wait_for_log(proxy, lambda d: d.get("msg") == "decision" and d.get("status") == 403)
    assert line["project"] == "other" and line["reason"] == "default rule policy used"


def test_broken_upstreams_answer_502(shared_proxy):
    import threading

    def serve_once(reply: bytes) -> int:
        srv = socket.socket()
        srv.bind((ALLOWED, 0))
        srv.listen()

        def run() -> None:
            conn, _ = srv.accept()
            conn.recv(65536)
            if reply:
                conn.sendall(reply)
            conn.close()
            srv.close()

        threading.Thread(target=run, daemon=True).start()
        return srv.getsockname()[1]

    port = serve_once(b"NOT HTTP AT ALL\r\n\r\n")
    resp = get(shared_proxy, f"http://ok.test:{port}/")
    assert status_of(resp) == 502 and b"bad response from upstream" in resp
    port = serve_once(b"")  # accepts, then hangs up without a word
    resp = get(shared_proxy, f"http://ok.test:{port}/")
    assert status_of(resp) == 502 and b"X-Taxiway-Egress-Error: egress to ok.test:" in resp
    port = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")  # dies mid-body
    resp = get(shared_proxy, f"http://ok.test:{port}/")
    assert status_of(resp) == 200 and resp.endswith(b"short") and resp.count(b"HTTP/1.1") == 1


def test_tunnel_through_a_tls_proxy_relays_large_bodies(start_proxy, pki, upstream):
    """TLS clients can't be spliced: the protocol relay's flow control carries 16 MB intact."""
    ca, d = pki
    proxy = start_proxy("--tls-cert", str(d / "proxy.pem"), "--tls-key", str(d / "proxy.key"))
    ctx = ssl.create_default_context(cafile=str(d / "root.pem"))
    with socket.create_connection((proxy.host, proxy.port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(f"CONNECT ok.test:{upstream.port} HTTP/1.1\r\nHost: ok.test\r\n\r\n".encode())
        assert recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        for _ in range(2):
            resp = http_over(s, "/big/8000000")
            assert len(resp.partition(b"\r\n\r\n")[2]) == 8_000_000
    line = wait_for_log(proxy, lambda d: d.get("msg") == "close" and d.get("proxy_type") == "connect")
    assert line["bytes_in"] > 16_000_000
