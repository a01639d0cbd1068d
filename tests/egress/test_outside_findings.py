"""An outside tester's findings against `taxiway egress serve`, replayed on loopback with raw sockets.

Each test runs the real proxy with the loopback test resolver (``dns``), so no
query ever leaves the machine; ``dns.queries`` records what the proxy asked.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading

import pytest
from helpers.servers import free_port

from .conftest import ALLOWED, raw_request, status_of
from .test_server import basic, get, log_lines, wait_for_log

AUTH = "Proxy-Authorization: " + basic("any", "pw")

WILD_ACL = """\
version: v1
services:
  - name: authed
    project: platform
    action: enforce
    allowed_domains: ["*.wild.test", ok.test]
global_deny_list: [blocked.test, pastebin.com]
"""


@pytest.fixture
def acl_proxy(start_proxy, tmp_path):
    acl = tmp_path / "acl.yaml"
    acl.write_text(WILD_ACL)
    return start_proxy("--acl", str(acl), env={"PROXY_PASSWORD": "pw"})


def read_to_eof(s: socket.socket) -> bytes:
    """Everything until the proxy closes; socket.timeout (a failure) if it keeps the connection."""
    out = b""
    while True:
        c = s.recv(65536)
        if not c:
            return out
        out += c


def asked(dns, name: str, since: int) -> list[str]:
    """The queries for ``name`` (or below it) since ``dns.queries`` had ``since`` entries."""
    return [q for q in dns.queries[since:] if q.split("/")[0].endswith(name)]


# -- finding 1: long names ----------------------------------------------------------------------

def test_a_30000_label_name_is_400_before_any_acl_or_dns_and_is_not_echoed(acl_proxy, dns, upstream):
    name = "a." * 30_000 + "wild.test"
    n0 = len(dns.queries)
    resp = get(acl_proxy, f"http://{name}:{upstream.port}/", AUTH)
    assert status_of(resp) == 400, resp[:300]
    # Before: the 60 KB name came back in the body and (cut at 500) in the header.
    assert len(resp) < 1000 and b"at most 253" in resp, resp
    assert not asked(dns, "wild.test", n0)
    line = wait_for_log(acl_proxy, lambda d: d.get("msg") == "refused")
    assert line["status"] == 400 and line["proxy_type"] == "http"
    assert len(line["target"]) < 200 and len(line["error"]) < 500
    # The same name through CONNECT, and one with a 64-character label.
    resp = raw_request(acl_proxy, f"CONNECT {name}:443 HTTP/1.1\r\n{AUTH}\r\n\r\n".encode())
    assert status_of(resp) == 400 and len(resp) < 1000
    assert status_of(get(acl_proxy, f"http://{'b' * 64}.wild.test:{upstream.port}/", AUTH)) == 400
    assert not asked(dns, "wild.test", n0)
    assert len([d for d in log_lines(acl_proxy) if d.get("msg") == "refused"]) >= 3


# -- finding 4: two trailing dots -----------------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost..", "ok.test..", "pastebin.com..", "blocked.test..", "ok.test..."])
def test_two_trailing_dots_are_400_and_never_resolved(acl_proxy, dns, upstream, host):
    n0 = len(dns.queries)
    resp = get(acl_proxy, f"http://{host}:{upstream.port}/", AUTH)
    assert status_of(resp) == 400 and b"empty label" in resp, resp
    assert not asked(dns, host.rstrip("."), n0)
    # One trailing dot is the same name as none.
    resp = get(acl_proxy, f"http://ok.test.:{upstream.port}/one-dot", AUTH)
    assert status_of(resp) == 200 and b"GET /one-dot" in resp


def test_egress_check_refuses_two_trailing_dots(taxiway, tmp_path):
    acl = tmp_path / "acl.yaml"
    acl.write_text(WILD_ACL)
    r = taxiway("egress", "check", "--acl", str(acl), "--role", "authed", "https://pastebin.com../")
    assert r.returncode != 0 and b"empty label" in r.stderr, r
    r = taxiway("egress", "check", "--acl", str(acl), "--role", "authed", "https://pastebin.com./")
    assert r.returncode == 1 and b"global deny list" in r.stdout


# -- finding 7: a denied name is never resolved ---------------------------------------------------

@pytest.mark.parametrize("host", ["blocked.test", "sub.blocked.test", "internal.test", "private.test"])
def test_a_name_the_acl_denies_is_refused_before_any_dns_query(acl_proxy, dns, upstream, host):
    # blocked.test is on the deny list; the others are outside the role's enforce list.
    n0 = len(dns.queries)
    resp = get(acl_proxy, f"http://{host}:{upstream.port}/", AUTH)
    assert status_of(resp) == 403, resp
    s = socket.create_connection((acl_proxy.host, acl_proxy.port), timeout=10)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\n{AUTH}\r\n\r\n".encode())
    assert status_of(read_to_eof(s)) == 403
    s.close()
    assert not asked(dns, host, n0)
    # Control: an allowed name is resolved through the same resolver.
    assert status_of(get(acl_proxy, f"http://ok.test:{upstream.port}/", AUTH)) == 200
    assert asked(dns, "ok.test", n0)


# -- finding 2: local endpoints and Connection: close ---------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
])
def test_local_endpoints_close_when_asked(shared_proxy, request_bytes):
    with socket.create_connection((shared_proxy.host, shared_proxy.port), timeout=15) as s:
        s.sendall(request_bytes)
        resp = read_to_eof(s)  # before: kept open for --idle-timeout (300 s)
    assert status_of(resp) == 200 and b"\r\nConnection: close\r\n" in resp


def test_a_kept_alive_local_connection_is_closed_after_the_idle_timeout(start_proxy):
    proxy = start_proxy("--idle-timeout", "1")
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_to_eof(s)
    assert status_of(resp) == 200 and b"Connection: close" not in resp and resp.endswith(b"ok\n")


# -- finding 3: a cap on client connections -------------------------------------------------------

def test_connections_past_max_connections_are_refused_logged_and_counted(start_proxy):
    proxy = start_proxy("--max-connections", "3")
    held = [socket.create_connection((proxy.host, proxy.port), timeout=10) for _ in range(3)]
    for s in held:
        s.sendall(b"GET http://ok.test/ HTTP/1.1\r\nX-Half: " + b"x" * 30_000)  # half-sent heads
    extra = socket.create_connection((proxy.host, proxy.port), timeout=10)
    resp = read_to_eof(extra)
    extra.close()
    assert status_of(resp) == 503 and b"too many client connections (3)" in resp
    line = wait_for_log(proxy, lambda d: d.get("msg") == "connection refused")
    assert "--max-connections" in line["reason"] and line["refused_total"] == 1
    held.pop().close()
    metrics = b""
    for _ in range(50):  # the proxy notices the close on its next loop iteration
        metrics = raw_request(proxy, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        if status_of(metrics) == 200:
            break
    assert b"taxiway_egress_connections_refused_total" in metrics
    assert status_of(metrics) == 200
    for s in held:
        s.close()


# -- finding 5: chunked bodies are re-framed ------------------------------------------------------

class RawUpstream:
    """A one-connection-at-a-time server that records the bytes it gets and answers 200 at a body's end."""

    def __init__(self) -> None:
        self.sock = socket.create_server((ALLOWED, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            with conn:
                conn.settimeout(30)
                try:
                    while True:
                        c = conn.recv(65536)
                        if not c:
                            break
                        data += c
                        if data.endswith(b"\r\n0\r\n\r\n") or b"\r\n0\r\nX-" in data and data.endswith(b"\r\n\r\n"):
                            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                            break
                except OSError:
                    pass
            self.received.append(data)
            self.done.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_upstream():
    u = RawUpstream()
    yield u
    u.close()


def post_chunked(proxy, port: int, body: bytes) -> bytes:
    return raw_request(proxy, b"POST http://%s:%d/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                              b"Connection: close\r\n\r\n%s" % (ALLOWED.encode(), port, body), timeout=20)


def test_chunk_sizes_are_rewritten_and_trailers_filtered(shared_proxy, raw_upstream):
    body = (b"3 \r\nabc\r\n0004;ext=1\r\ndefg\r\n0\r\nX-Sum: 1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 9\r\nConnection: keep-alive\r\n\r\n")
    resp = post_chunked(shared_proxy, raw_upstream.port, body)
    assert status_of(resp) == 200, resp
    assert raw_upstream.done.wait(20)
    got = raw_upstream.received[-1]
    head, _, sent_body = got.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    # Before: forwarded byte for byte, "3 " and the trailer's Transfer-Encoding included.
    assert sent_body == b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Sum: 1\r\n\r\n"


def test_a_body_broken_from_its_first_line_sends_nothing_upstream(shared_proxy, raw_upstream):
    resp = post_chunked(shared_proxy, raw_upstream.port, b"zz\r\nhello\r\n0\r\n\r\n")
    assert status_of(resp) == 400 and b"bad chunk size line" in resp
    # The proxy had dialled; it closes that connection without having written the head.
    assert raw_upstream.done.wait(20)
    assert raw_upstream.received == [b""]


# -- finding 6: empty password, ACL keys not applied, bcrypt off the loop -------------------------

def test_an_empty_proxy_password_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "taxiway", "egress", "serve", "--listen", f"127.0.0.1:{free_port()}",
                        "--resolver", "127.0.0.1:9"], env={**os.environ, "PROXY_PASSWORD": ""},
                       capture_output=True, timeout=60)
    assert r.returncode != 0
    assert b"PROXY_PASSWORD is set but empty" in r.stderr and b"unset it" in r.stderr, r.stderr


def test_acl_keys_taxiway_does_not_apply_are_warned_about_once(start_proxy, tmp_path, taxiway):
    acl = tmp_path / "acl.yaml"
    acl.write_text("""\
version: v1
services:
  - name: mitm
    project: x
    action: enforce
    allowed_domains: [a.test]
    mitm_domains: [{domain: a.test}]
    allowed_external_proxies: [proxy.test]
  - name: mitm2
    project: x
    action: enforce
    allowed_domains: [b.test]
    mitm_domains: [{domain: b.test}]
""")
    proxy = start_proxy("--acl", str(acl))
    wait_for_log(proxy, lambda d: d.get("msg") == "listening")
    warnings = [d["warning"] for d in log_lines(proxy) if d.get("msg") == "acl warning"]
    assert len(warnings) == 2, warnings
    assert "'mitm_domains' is not supported" in warnings[0] and "mitm, mitm2" in warnings[0]
    assert "'allowed_external_proxies' is not supported" in warnings[1]
    r = taxiway("egress", "check", "--acl", str(acl), "--role", "mitm", "https://a.test/")
    assert r.returncode == 0 and r.stderr.count(b"is not supported by taxiway egress") == 2


@pytest.mark.timeout(120)
def test_a_slow_password_check_does_not_stall_other_clients(start_proxy, tmp_path, upstream):
    import bcrypt

    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt.hashpw(b'alice-pw', bcrypt.gensalt(14)).decode()}\n")
    proxy = start_proxy("--users", str(users))
    slow = socket.create_connection((proxy.host, proxy.port), timeout=60)
    slow.sendall(f"GET http://ok.test:{upstream.port}/ HTTP/1.1\r\n"
                 f"Proxy-Authorization: {basic('alice', 'wrong')}\r\nConnection: close\r\n\r\n".encode())
    wait_for_log(proxy, lambda d: d.get("msg") == "listening")
    # While bcrypt (cost 14) runs for the wrong password, the loop answers others.
    for _ in range(3):
        assert status_of(raw_request(proxy, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200
    ready, _, _ = select.select([slow], [], [], 0)
    assert not ready, "the wrong password was answered before /healthz: the check ran fast or on the loop"
    assert status_of(read_to_eof(slow)) == 407
    slow.close()


def test_a_very_long_password_gets_407(start_proxy, tmp_path, upstream):
    import bcrypt

    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt.hashpw(b'alice-pw', bcrypt.gensalt(4)).decode()}\n")
    proxy = start_proxy("--users", str(users))
    resp = get(proxy, f"http://ok.test:{upstream.port}/", "Proxy-Authorization: " + basic("alice", "x" * 5000))
    assert status_of(resp) == 407, resp
    assert not [d for d in log_lines(proxy) if d.get("msg") == "error"]
