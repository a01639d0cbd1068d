"""Issue 22: the running proxy under bad input, slow clients, a large ACL, no file descriptors, reloads.

Every test talks to a real ``taxiway egress serve`` on loopback with raw sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
from helpers.servers import free_port

from .conftest import proxy_server, raw_request, status_of
from .test_acl import large_acl
from .test_server import basic, get, log_lines, wait_for_log


def post_chunked(proxy, port: int, body: bytes, extra: bytes = b"") -> bytes:
    return raw_request(proxy, b"POST http://ok.test:%d/upload HTTP/1.1\r\nHost: ok.test\r\n"
                              b"Transfer-Encoding: chunked\r\n%s\r\n%s" % (port, extra, body), timeout=20)


@pytest.mark.parametrize("size", [b"zz", b"-1", b"0x5", b"+5", b"5_0", b" 5"])
def test_a_malformed_chunk_size_is_answered_400(shared_proxy, upstream, size):
    # Before: the body task failed unseen ("Task exception was never retrieved") and
    # the client waited for the upstream, which waited for the rest of the body.
    r = post_chunked(shared_proxy, upstream.port, size + b"\r\nhello\r\n0\r\n\r\n")
    assert status_of(r) == 400, r
    assert b"bad chunk size line" in r
    assert "Task exception was never retrieved" not in shared_proxy.log.read_text()


def test_a_bare_lf_chunk_line_is_refused_not_forwarded(shared_proxy, upstream):
    r = post_chunked(shared_proxy, upstream.port, b"5\nhello\r\n0\r\n\r\n")
    assert status_of(r) == 400 and b"bare LF" in r, r
    r = post_chunked(shared_proxy, upstream.port, b"5\r\nhello\n0\r\n\r\n")
    assert status_of(r) == 400, r
    # A well-formed body still goes through on the same proxy.
    r = post_chunked(shared_proxy, upstream.port, b"5\r\nhello\r\n0\r\n\r\n", b"Connection: close\r\n")
    assert status_of(r) == 200 and r.endswith(b"hello"), r


def test_two_transfer_encoding_headers_are_501_and_not_forwarded(shared_proxy, upstream):
    before = len(upstream.requests)
    r = post_chunked(shared_proxy, upstream.port, b"5\r\nhello\r\n0\r\n\r\n",
                     b"Transfer-Encoding: identity\r\n")
    assert status_of(r) == 501 and b"multiple Transfer-Encoding headers" in r, r
    assert not [q for q in upstream.requests[before:] if q[1] == "/upload"]


@pytest.mark.timeout(90)
def test_the_header_timeout_applies_to_every_request_on_a_connection(start_proxy, upstream):
    proxy = start_proxy("--header-timeout", "1", "--idle-timeout", "300")
    s = socket.create_connection((proxy.host, proxy.port), timeout=30)
    request = b"GET http://ok.test:%d/one HTTP/1.1\r\nHost: ok.test\r\n\r\n" % upstream.port
    s.sendall(request)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    # Idle between requests for longer than the header timeout: allowed (that is the idle timeout).
    time.sleep(2)
    s.sendall(request)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    # Now a slowloris head on the kept-alive connection: one byte every 0.2 s. Before the
    # fix it could go on for the 300 s idle timeout; now the proxy closes it.
    slow = b"GET http://ok.test:%d/slow-head HTTP/1.1\r\nX-Padding: " % upstream.port + b"a" * 200
    closed = False
    for byte in slow:
        try:
            s.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        s.settimeout(0.2)
        try:
            if s.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
    s.close()
    assert closed, "the proxy held a slow request head open"


def test_a_large_acl_decides_through_the_proxy(tmp_path, start_proxy, upstream):
    # 10,000 allowed and 10,000 denied globs; role "authed" (the password) has the big rule.
    acl = tmp_path / "big.yaml"
    acl.write_text(large_acl(10_000).replace("name: big", "name: authed")
                   .replace("allowed_domains:\n", "allowed_domains:\n      - ok.test\n", 1)
                   .replace("global_deny_list:\n", 'global_deny_list:\n  - "*.ok.test"\n'))
    proxy = start_proxy("--acl", str(acl), env={"PROXY_PASSWORD": "pw"})
    auth = "Proxy-Authorization: " + basic("authed", "pw")
    for _ in range(20):
        assert status_of(get(proxy, f"http://ok.test:{upstream.port}/", auth)) == 200
        r = get(proxy, f"http://www.ok.test:{upstream.port}/", auth)
        assert status_of(r) == 403 and b"host matched rule in global deny list" in r


def test_a_non_utf8_acl_on_reload_keeps_the_old_one_and_names_the_file(start_proxy, tmp_path, upstream, taxiway):
    acl = tmp_path / "acl.yaml"
    acl.write_text("version: v1\nservices: []\ndefault:\n  project: p\n  action: open\n")
    proxy = start_proxy("--acl", str(acl))
    acl.write_bytes(b"version: v1\nservices: []\ndefault:\n  project: caf\xe9\n  action: enforce\n")
    os.kill(proxy.proc.pid, signal.SIGHUP)
    line = wait_for_log(proxy, lambda d: d.get("msg") == "reload" and d.get("ok") is False)
    assert line["error"].startswith(f"ACL {acl} is not UTF-8 text: byte 0xe9 on line 4"), line
    assert status_of(get(proxy, f"http://ok.test:{upstream.port}/")) == 200
    assert "Traceback" not in proxy.log.read_text()
    # At start-up it is one error line, not a traceback.
    r = taxiway("egress", "serve", "--listen", f"127.0.0.1:{free_port()}", "--acl", str(acl))
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip() == (f"error: ACL {acl} is not UTF-8 text: byte 0xe9 on line 4; "
                                         "save the file as UTF-8 (YAML files are UTF-8)")


def test_a_typo_in_the_acl_is_refused_at_start_and_on_reload(start_proxy, tmp_path, upstream, taxiway):
    acl = tmp_path / "acl.yaml"
    good = "version: v1\nservices:\n  - name: a\n    project: p\n    action: open\n    allowed_domains: [ok.test]\n"
    acl.write_text(good.replace("allowed_domains", "alowed_domains"))
    r = taxiway("egress", "check", "--acl", str(acl), "--role", "a", "http://ok.test/")
    assert r.returncode == 2
    assert r.stderr.decode().startswith(
        f"error: unknown key 'alowed_domains' in {acl} (did you mean 'allowed_domains'?);")
    acl.write_text(good)
    proxy = start_proxy("--acl", str(acl))
    acl.write_text(good.replace("allowed_domains", "alowed_domains"))
    os.kill(proxy.proc.pid, signal.SIGHUP)
    line = wait_for_log(proxy, lambda d: d.get("msg") == "reload" and d.get("ok") is False)
    assert "unknown key 'alowed_domains'" in line["error"] and str(acl) in line["error"]


@pytest.mark.timeout(120)
def test_running_out_of_file_descriptors_is_logged_counted_and_survived(tmp_path, dns, upstream):
    # The proxy runs under RLIMIT_NOFILE 64 (prlimit execs it, so the pid is the proxy's).
    port = free_port()
    argv = ["prlimit", "--nofile=64:64", "--", sys.executable, "-m", "taxiway", "egress", "serve",
            "--listen", f"127.0.0.1:{port}", "--resolver", dns.address, "--allow-range", "127.0.0.2/32"]
    from helpers.servers import serve

    with serve(argv, port, log=tmp_path / "egress.log", env={}) as proxy:
        held = []
        try:
            for _ in range(100):  # each one costs the proxy a descriptor
                held.append(socket.create_connection((proxy.host, proxy.port), timeout=10))
            line = wait_for_log(proxy, lambda d: d.get("msg") == "accept failed")
            assert line["error"].startswith("EMFILE") and line["nofile_limit"] == 64, line
            assert "ulimit -n" in line["fix"]
            # A client queued while descriptors ran out is served once they free up, not dropped.
            waiting = held.pop()
            waiting.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            for s in held[:60]:
                s.close()
            waiting.settimeout(30)
            assert waiting.recv(65536).startswith(b"HTTP/1.1 200"), "the queued connection was dropped"
            waiting.close()
        finally:
            for s in held:
                s.close()
        metrics = raw_request(proxy, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").decode()
        count = [ln for ln in metrics.splitlines() if ln.startswith('taxiway_egress_accept_errors_total{error="EMFILE"}')]
        assert count and float(count[0].split()[-1]) >= 1, metrics
        assert status_of(get(proxy, f"http://ok.test:{upstream.port}/")) == 200
        assert all(d.get("msg") != "error" for d in log_lines(proxy))


def test_the_proxy_still_serves_over_its_own_acceptor(tmp_path, dns, upstream):
    # The accept loop replaced asyncio's server: keep-alive, CONNECT and drain still work.
    with proxy_server(tmp_path, "--resolver", dns.address, "--allow-range", "127.0.0.2/32") as proxy:
        s = socket.create_connection((proxy.host, proxy.port), timeout=10)
        for i in range(3):
            s.sendall(b"GET http://ok.test:%d/k%d HTTP/1.1\r\nHost: ok.test\r\n\r\n" % (upstream.port, i))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.close()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(20) == 0
        assert any(d.get("msg") == "stopped" for d in log_lines(proxy))
