"""The bearer-token flow against the real docker-registry configured with ``auth: token``.

A small token service on loopback (the part a real deployment would run
separately) checks basic credentials and signs RS256 JWTs whose ``x5c`` cert is
in the registry's ``rootcertbundle``; docker-registry verifies them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from helpers.images import write_fixture_image
from helpers.servers import free_port, serve

SERVICE = "taxiway-test-registry"
ISSUER = "taxiway-test-tokens"
USERS = {"alice": "wonderland"}


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenService:
    """Issues registry tokens: full access for known users, nothing for anonymous ones."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                     .not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.requests: list[dict] = []

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        if user:
            for s in scopes:
                kind, _, rest = s.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
        sig = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64(sig)}"


@contextlib.contextmanager
def token_service():
    svc = TokenService()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            q = parse_qs(urlsplit(self.path).query)
            user = None
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                if USERS.get(u) != p:
                    body = b'{"details":"bad credentials"}'
                    self.send_response(401)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                user = u
            svc.requests.append({"user": user, "scope": q.get("scope", []), "service": q.get("service", [])})
            body = json.dumps({"token": svc.token(user, q.get("scope", []))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield svc, f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-registry")
    with token_service() as (svc, realm):
        (root / "root.pem").write_bytes(svc.cert.public_bytes(serialization.Encoding.PEM))
        port = free_port()
        (root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: t\n"
            f"auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {root / 'root.pem'}\n")
        with serve(["docker-registry", "serve", str(root / "config.yml")], port, log=root / "registry.log") as reg:
            yield reg, svc, root


def test_bearer_tokens_with_the_real_registry(token_registry, taxiway_home, taxiway, tmp_path):
    reg, svc, root = token_registry
    ref = f"{reg.address}/team/app:v1"
    # Push with skopeo as alice, so there is something to pull.
    layout = tmp_path / "layout"
    write_fixture_image(layout)
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {reg.address: {"auth": base64.b64encode(b"alice:wonderland").decode()}}}))
    import subprocess

    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-authfile", str(authfile),
                    f"oci:{layout}:fixture", f"docker://{ref}"], check=True, capture_output=True)
    # Anonymous: the token grants nothing, the registry says 401, we say how to log in.
    r = taxiway("pull", ref)
    assert r.returncode != 0 and f"taxiway login {reg.address}".encode() in r.stderr and r.stderr.count(b"\n") == 1
    # Wrong password: the token service refuses.
    r = taxiway("login", reg.address, "-u", "alice", "--password-stdin", input=b"nope\n")
    assert r.returncode != 0 and b"refused" in r.stderr
    taxiway("login", reg.address, "-u", "alice", "--password-stdin", "--no-verify", input=b"nope\n", check=True)
    r = taxiway("pull", ref)
    assert r.returncode != 0 and b"refused" in r.stderr
    taxiway("login", reg.address, "-u", "alice", "--password-stdin", input=b"wonderland\n", check=True)
    n = len(svc.requests)
    r = taxiway("pull", ref)
    assert r.returncode == 0, r.stderr
    asked = svc.requests[n:]
    assert {"user": "alice", "scope": ["repository:team/app:pull"], "service": [SERVICE]} in asked
    # Push to another repository: pull,push on it (and pull on the source for the mount).
    taxiway("tag", ref, f"{reg.address}/team/copy:v1", check=True)
    n = len(svc.requests)
    r = taxiway("push", f"{reg.address}/team/copy:v1")
    assert r.returncode == 0, r.stderr
    assert b"4 mounted" in r.stdout
    scopes = [s for q in svc.requests[n:] for s in q["scope"]]
    assert "repository:team/copy:pull,push" in scopes and "repository:team/app:pull" in scopes
