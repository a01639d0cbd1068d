"""Blob bodies: sendfile(2) under uvicorn/httptools, streamed elsewhere, the same bytes either way.

uvicorn runs in-process here (in a thread) so the test can count the sendfile calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from helpers.servers import free_port

from taxiway.registry import sendfile as sf
from taxiway.registry.app import Config, create_app

SIZE = 24 * 1024 * 1024 + 12345  # several socket buffers, not a multiple of any chunk size


@contextlib.contextmanager
def uvicorn_server(root: Path, http: str, loop: str = "uvloop", tls: tuple[str, str] | None = None):
    port = free_port()
    config = uvicorn.Config(create_app(Config(root=root, auth=False)), host="127.0.0.1", port=port, http=http,
                            loop=loop, log_level="warning", access_log=False, lifespan="off",
                            ssl_certfile=tls and tls[0], ssl_keyfile=tls and tls[1])
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """A registry root holding one large blob in repository ``big``; yields (root, digest, bytes)."""
    root = tmp_path_factory.mktemp("blobserve") / "root"
    data = os.urandom(SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with uvicorn_server(root, "httptools") as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v2/big/blobs/uploads/", params={"digest": digest}, content=data)
        assert r.status_code == 201, r.text
    return root, digest, data


@pytest.fixture
def sendfile_calls(monkeypatch):
    calls = []
    real = os.sendfile

    def counting(out_fd, in_fd, offset, count):
        n = real(out_fd, in_fd, offset, count)
        calls.append(n)
        return n

    monkeypatch.setattr(sf.os, "sendfile", counting)
    return calls


def check_serving(url: str, digest: str, data: bytes) -> None:
    with httpx.Client(base_url=url, timeout=60, verify=False) as c:
        for _ in range(2):  # twice on one keep-alive connection: the response must end cleanly
            r = c.get(f"/v2/big/blobs/{digest}")
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(data))
            assert r.headers["docker-content-digest"] == digest
            assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
        r = c.head(f"/v2/big/blobs/{digest}")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == str(len(data)) and r.headers["docker-content-digest"] == digest
        start, end = len(data) - 5_000_000, len(data) - 3
        r = c.get(f"/v2/big/blobs/{digest}", headers={"Range": f"bytes={start}-{end}"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
        assert r.content == data[start:end + 1]
        r = c.get(f"/v2/big/blobs/{digest}")  # still a healthy connection after the range
        assert r.status_code == 200 and r.content == data


def test_blobs_go_out_with_sendfile_under_httptools(blob, sendfile_calls):
    root, digest, data = blob
    with uvicorn_server(root, "httptools") as url:
        check_serving(url, digest, data)
    # Three full GETs through sendfile; HEAD and the Range request never reach it.
    assert sum(sendfile_calls) == 3 * len(data)


def test_blobs_stream_without_sendfile_under_h11(blob, sendfile_calls):
    root, digest, data = blob
    with uvicorn_server(root, "h11", loop="asyncio") as url:
        check_serving(url, digest, data)
    assert sendfile_calls == []


def test_blobs_stream_without_sendfile_over_tls(blob, sendfile_calls, tmp_path):
    root, digest, data = blob
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with uvicorn_server(root, "httptools", tls=(str(cert), str(key))) as url:
        check_serving(url, digest, data)
    assert sendfile_calls == []


def test_a_client_leaving_mid_blob_does_not_hurt_the_server(blob, sendfile_calls):
    root, digest, data = blob
    with uvicorn_server(root, "httptools") as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(5):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(100_000)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.get(f"/v2/big/blobs/{digest}")
            assert r.status_code == 200 and r.content == data
    assert sendfile_calls  # the aborted responses went through sendfile too


def test_pathsend_without_content_length_is_streamed_chunked(tmp_path, sendfile_calls):
    """A pathsend response that gave no Content-Length goes out chunked, through Python."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "f"
    path.write_bytes(data)

    async def app(scope, receive, send):
        assert sf.PATHSEND in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(path)})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sf.PathSend(app), host="127.0.0.1", port=port, http="httptools",
                                           loop="uvloop", log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(f"http://127.0.0.1:{port}/", timeout=60)
        assert r.headers["transfer-encoding"] == "chunked" and r.content == data
    finally:
        server.should_exit = True
        thread.join(20)
    assert sendfile_calls == []
