"""Handshakes with real clients and servers: curl, openssl s_server, Python's ssl module.

Every name is mapped to 127.0.0.1 (curl --resolve, explicit connect addresses).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from helpers.servers import free_port, serve

from taxiway.pki import CertHolder, profile
from taxiway.pki.tls import peer_identity

HTTPS_SERVER = """
import http.server, ssl, sys
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


@contextmanager
def https_server(tmp: Path, leaf, name: str) -> Iterator[int]:
    """A Python HTTPS server (a separate process) presenting ``leaf``."""
    cert, key = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
    leaf.write(cert, key, force=True)
    port = free_port()
    with serve([sys.executable, "-c", HTTPS_SERVER, str(cert), str(key), str(port)], port, log=tmp / f"{name}.log"):
        yield port


def curl(url_host: str, port: int, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(root),
                           "--resolve", f"{url_host}:{port}:127.0.0.1", *extra, f"https://{url_host}:{port}/"],
                          capture_output=True, text=True, timeout=30)


def test_curl_good_wrong_name_expired_revoked(ca, tmp_path):
    root = ca.dir / "root.pem"
    good = ca.issue(["web.example.test", "127.0.0.1"])
    with https_server(tmp_path, good, "good") as port:
        r = curl("web.example.test", port, root)
        assert r.returncode == 0 and r.stdout == "hello over tls\n", r.stderr
        r = curl("other.example.test", port, root)  # wrong name
        assert r.returncode == 60 and "other.example.test" in r.stderr, (r.returncode, r.stderr)
        r = curl("web.example.test", port, Path("/etc/ssl/certs/ca-certificates.crt"))  # not trusting our CA
        assert r.returncode == 60

    expired = ca.issue(["web.example.test"], not_before=profile.now() - timedelta(days=2),
                       validity=timedelta(days=1))
    with https_server(tmp_path, expired, "expired") as port:
        r = curl("web.example.test", port, root)
        assert r.returncode == 60 and "expired" in r.stderr, r.stderr

    revoked = ca.issue(["web.example.test"])
    ca.revoke(revoked.serial_hex)
    with https_server(tmp_path, revoked, "revoked") as port:
        assert curl("web.example.test", port, root).returncode == 0  # without the CRL curl cannot know
        r = curl("web.example.test", port, root, "--crlfile", str(ca.dir / "crl.pem"))
        assert r.returncode != 0 and "revoked" in r.stderr, (r.returncode, r.stderr)
        # the good certificate still works with the CRL loaded
    with https_server(tmp_path, good, "good2") as port:
        assert curl("web.example.test", port, root, "--crlfile", str(ca.dir / "crl.pem")).returncode == 0


def test_openssl_s_server_crl_check_rejects_revoked_client(ca, tmp_path):
    server = ca.issue(["mtls.example.test"])
    server.write(tmp_path / "s.pem", tmp_path / "s-key.pem")
    (tmp_path / "leaf.pem").write_bytes(server.cert_pem)
    good = ca.issue([], client=True, cn="good-client")
    bad = ca.issue([], client=True, cn="bad-client")
    good.write(tmp_path / "good.pem", tmp_path / "good-key.pem")
    bad.write(tmp_path / "bad.pem", tmp_path / "bad-key.pem")
    ca.revoke(bad.serial_hex)
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet",
            "-cert", str(tmp_path / "leaf.pem"), "-key", str(tmp_path / "s-key.pem"),
            "-cert_chain", str(ca.dir / "intermediate.pem"),
            "-CAfile", str(ca.dir / "root.pem"), "-Verify", "3", "-verify_return_error", "-crl_check", "-CRL", str(ca.dir / "crl.pem")]
    root = ca.dir / "root.pem"
    with serve(argv, port, log=tmp_path / "s_server.log"):
        time.sleep(0.2)
        r = curl("mtls.example.test", port, root, "--cert", str(tmp_path / "good.pem"), "--key",
                 str(tmp_path / "good-key.pem"))
        assert r.returncode == 0 and "good-client" in r.stdout, (r.returncode, r.stderr)
        r = curl("mtls.example.test", port, root, "--cert", str(tmp_path / "bad.pem"), "--key",
                 str(tmp_path / "bad-key.pem"))
        assert r.returncode != 0, r.stdout
        r = curl("mtls.example.test", port, root)  # no client certificate at all
        assert r.returncode != 0
    assert "revoked" in (tmp_path / "s_server.log").read_text()


@contextmanager
def tls_echo(ctx: ssl.SSLContext) -> Iterator[tuple[int, list]]:
    """A threaded TLS server on 127.0.0.1 that answers each connection with the client's CN."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    port, stop, errors = lsock.getsockname()[1], threading.Event(), []

    def loop():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(5)
                with ctx.wrap_socket(conn, server_side=True) as s:
                    who = peer_identity(s)
                    s.sendall(((who.cn if who else None) or "-").encode())
            except (ssl.SSLError, OSError) as e:
                errors.append(e)
                conn.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield port, errors
    finally:
        stop.set()
        t.join(5)
        lsock.close()


def talk(ctx: ssl.SSLContext, port: int, name: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=name)


def test_python_mtls_with_crl(ca):
    server = ca.issue(["api.internal"])
    alice = ca.issue([], client=True, cn="alice")
    mallory = ca.issue([], client=True, cn="mallory")
    ca.revoke(mallory.serial_hex)
    sctx = ca.ssl_context(server, server=True, client_auth="required", check_crl=True)
    with tls_echo(sctx) as (port, errors):
        with talk(ca.ssl_context(alice), port, "api.internal") as s:
            assert s.recv(100) == b"alice"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with talk(ca.ssl_context(mallory), port, "api.internal") as s:
                s.recv(100)  # TLS 1.3: the server's verdict arrives after the client's handshake
        with pytest.raises(ssl.SSLCertVerificationError):
            talk(ca.ssl_context(alice), port, "other.internal")
    assert any("revoked" in str(e) for e in errors), errors

    # a client that checks the CRL refuses a revoked server
    revoked_server = ca.issue(["api.internal"])
    ca.revoke(revoked_server.serial_hex)
    with tls_echo(ca.ssl_context(revoked_server, server=True)) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
            talk(ca.ssl_context(check_crl=True), port, "api.internal")
        with talk(ca.ssl_context(), port, "api.internal") as s:  # without the CRL: accepted
            assert s.recv(100) == b"-"


def test_short_lived_holder_renews_on_handshake(ca):
    clock = {"now": profile.now()}
    holder = CertHolder(ca, ["edge.internal"], validity=timedelta(hours=1), clock=lambda: clock["now"])
    first = holder.current()
    assert first.not_after - first.not_before == timedelta(hours=1) + profile.BACKDATE
    assert holder.current() is first  # not due yet
    sctx = holder.server_context()
    cctx = ca.ssl_context()
    with tls_echo(sctx) as (port, errors):
        with talk(cctx, port, "edge.internal") as s:
            assert s.getpeercert(binary_form=False)["serialNumber"] == f"{first.serial:X}"
            s.recv(10)
        clock["now"] += timedelta(minutes=41)  # past 2/3 of the lifetime
        with talk(cctx, port, "edge.internal") as s:
            served = int(s.getpeercert()["serialNumber"], 16)
            s.recv(10)
        assert holder.renewals == 1 and served == holder.current().serial != first.serial
        with talk(cctx, port, "edge.internal") as s:  # later connections get it from the listening context
            assert int(s.getpeercert()["serialNumber"], 16) == served
            s.recv(10)
    assert not errors
    assert all(r.serial != holder.current().serial_hex for r in ca.records())  # not in the inventory
