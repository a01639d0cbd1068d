"""A small real HTTP registry on loopback that serves crafted responses.

For the faults docker-registry cannot produce: wrong digests, 5xx and 429 with
Retry-After, connections dropped mid-blob, a bearer-token challenge, schema 1,
non-JSON manifests, truncated gzip. It speaks enough of the distribution API
for pulls (GET/HEAD manifests and blobs, Range) and logs every request.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeRegistry:
    """State and fault plan of the fake registry; mutate between requests."""

    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: digest or "manifest" -> list of faults consumed one per request: "500", "429", "drop", "wrong"
    faults: dict[str, list[str]] = field(default_factory=dict)
    retry_after: str = "1"
    drop_after: int = 1000
    bearer: tuple[str, str] | None = None  # (user, password) the token endpoint accepts; None: anonymous tokens
    require_token: bool = False
    log: list[Logged] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    port: int = 0
    #: digest -> (block, count): a large blob served as ``block`` repeated, never held whole in memory
    repeated: dict[str, tuple[bytes, int]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_image(self, repo: str, tag: str, layers: list[tuple[bytes, str]], config: dict | None = None,
                  manifest_media_type: str = OCI_MANIFEST, diff_ids: list[str] | None = None) -> str:
        """Serve an image of ``layers`` ((blob bytes, media type)); returns the manifest digest."""
        cfg = {"architecture": "amd64", "os": "linux", "config": {},
               "rootfs": {"type": "layers", "diff_ids": diff_ids if diff_ids is not None else [_diff_id(b, t) for b, t in layers]}}
        cfg.update(config or {})
        cfg_bytes = json.dumps(cfg).encode()
        self.blobs[sha(cfg_bytes)] = cfg_bytes
        descs = []
        for data, mtype in layers:
            self.blobs[sha(data)] = data
            descs.append({"mediaType": mtype, "digest": sha(data), "size": len(data)})
        manifest = {"schemaVersion": 2, "mediaType": manifest_media_type,
                    "config": {"mediaType": OCI_CONFIG if "oci" in manifest_media_type else "application/vnd.docker.container.image.v1+json",
                               "digest": sha(cfg_bytes), "size": len(cfg_bytes)},
                    "layers": descs}
        raw = json.dumps(manifest).encode()
        self.manifests[(repo, tag)] = (raw, manifest_media_type)
        self.manifests[(repo, sha(raw))] = (raw, manifest_media_type)
        return sha(raw)

    def add_repeated_blob(self, block: bytes, count: int) -> tuple[str, int]:
        """Register a big blob (``block`` x ``count``); returns (digest, size)."""
        h = hashlib.sha256()
        for _ in range(count):
            h.update(block)
        digest = "sha256:" + h.hexdigest()
        self.repeated[digest] = (block, count)
        return digest, len(block) * count

    def requests(self, method: str = "GET", contains: str = "") -> list[Logged]:
        return [r for r in self.log if r.method == method and contains in r.path]


def _diff_id(blob: bytes, mtype: str) -> str:
    if mtype.endswith("gzip"):
        return sha(gzip.decompress(blob))
    if mtype.endswith("zstd"):
        import zstandard

        return sha(zstandard.ZstdDecompressor().decompressobj().decompress(blob))
    return sha(blob)


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            self._send(status, json.dumps({"errors": [{"code": code, "message": code.lower().replace("_", " ")}]}).encode(),
                       {"Content-Type": "application/json"})

        def _fault(self, key: str) -> str | None:
            plan = reg.faults.get(key)
            return plan.pop(0) if plan else None

        def _authorized(self) -> bool:
            if not reg.require_token:
                return True
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer ") and auth[7:] in reg.tokens_issued:
                return True
            realm = f"http://{reg.address}/token"
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"',
                "Content-Type": "application/json"})
            return False

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            url = urlsplit(self.path)
            reg.log.append(Logged(self.command, url.path, dict(self.headers.items())))
            if url.path == "/token":
                return self._token(parse_qs(url.query))
            if url.path == "/v2/":
                return self._send(200, b"{}", {"Content-Type": "application/json"}, head)
            if not self._authorized():
                return
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", url.path)
            if not m:
                return self._error(404, "NAME_UNKNOWN")
            repo, kind, ident = m.groups()
            if kind == "manifests":
                fault = self._fault("manifest")
                if fault == "403":
                    return self._error(403, "DENIED")
                if fault in ("500", "429"):
                    return self._send(int(fault), b"busy", {"Retry-After": reg.retry_after})
                if (repo, ident) not in reg.manifests:
                    return self._error(404, "MANIFEST_UNKNOWN")
                raw, mtype = reg.manifests[(repo, ident)]
                return self._send(200, raw, {"Content-Type": mtype, "Docker-Content-Digest": sha(raw)}, head)
            if ident in reg.repeated:
                block, count = reg.repeated[ident]
                self.send_response(200)
                self.send_header("Content-Length", str(len(block) * count))
                self.end_headers()
                if not head:
                    for _ in range(count):
                        self.wfile.write(block)
                return
            if ident not in reg.blobs:
                return self._error(404, "BLOB_UNKNOWN")
            data = reg.blobs[ident]
            fault = self._fault(ident)
            if fault in ("500", "429", "503"):
                return self._send(int(fault), b"busy", {"Retry-After": reg.retry_after})
            if fault == "wrong":
                data = data[:-1] + bytes([data[-1] ^ 1])
            start = 0
            rng = self.headers.get("Range")
            status = 200
            headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ident}
            if rng:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(data):
                    return self._send(416, b"")
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if fault == "drop":
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: reg.drop_after])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            self._send(status, body, headers, head)

        def _token(self, q: dict[str, list[str]]) -> None:
            if reg.bearer is not None:
                want = "Basic " + base64.b64encode(f"{reg.bearer[0]}:{reg.bearer[1]}".encode()).decode()
                if self.headers.get("Authorization") != want:
                    return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"Content-Type": "application/json"})
            token = f"tok-{len(reg.tokens_issued)}-{','.join(q.get('scope', []))}"
            reg.tokens_issued.append(token)
            self._send(200, json.dumps({"token": token}).encode(), {"Content-Type": "application/json"})

    return H


@contextlib.contextmanager
def fake_registry() -> Iterator[FakeRegistry]:
    """Run a FakeRegistry on 127.0.0.1 (free port) in a thread; stop it after."""
    reg = FakeRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(reg))
    server.daemon_threads = True
    reg.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield reg
    finally:
        server.shutdown()
        server.server_close()
