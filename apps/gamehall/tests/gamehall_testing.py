"""Fixtures for gamehall: real gamehall nodes (subprocesses on 127.0.0.1), a real
redis-server, and a small websocket client that speaks the JSON view protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

REPO = Path(__file__).resolve().parents[3]
GAMEHALL = [sys.executable, "-m", "gamehall.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int, proc: subprocess.Popen, log: Path, timeout: float = 20, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((host, port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}:\n{log.read_text()[-3000:]}")


@dataclass
class Node:
    port: int
    proc: subprocess.Popen
    log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(data).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def create(self, game: str = "tictactoe", **opts: Any) -> str:
        status, body = self.post("/api/games", {"game": game, **opts})
        assert status == 201, body
        return body["code"]

    def game(self, code: str) -> dict[str, Any]:
        status, body = self.get(f"/api/games/{code}")
        assert status == 200, body
        return json.loads(body)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def gamehall_node(
    tmp: Path, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> Iterator[Node]:
    """``gamehall serve`` on a free loopback port, stopped after."""
    port = free_port()
    log = tmp / f"gamehall-{port}.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(
            [
                *GAMEHALL,
                "serve",
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "info",
                *args,
            ],
            stdout=lf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        wait_for_port(port, proc, log, host=host)
        yield Node(port, proc, log, host)
    finally:
        stop(proc)


@dataclass
class TLSFiles:
    """Certificates from taxiway's own CA for a Redis with mutual TLS."""

    root: Path  # the CA's root certificate (what both sides trust)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def issue_redis_certs(tmp: Path) -> TLSFiles:
    """A fresh taxiway CA (its Python API, as `taxiway ca` uses it), a server certificate
    for Redis on loopback and a client certificate for gamehall nodes."""
    from taxiway.pki import CA

    ca, _ = CA.init(tmp / "ca")
    out = tmp / "certs"
    out.mkdir()
    ca.issue(["localhost", "127.0.0.1"]).write(out / "redis.pem", out / "redis-key.pem")
    ca.issue([], client=True, cn="gamehall").write(out / "client.pem", out / "client-key.pem")
    return TLSFiles(
        tmp / "ca" / "root.pem",
        out / "redis.pem",
        out / "redis-key.pem",
        out / "client.pem",
        out / "client-key.pem",
    )


@contextlib.contextmanager
def server_process(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen]:
    """A server in its own session, logging to ``log``, waited for on 127.0.0.1:``port``
    and stopped after (the whole process group)."""
    with open(log, "wb") as lf:
        proc = subprocess.Popen(
            argv, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        stop(proc)


def _redis_argv(tmp: Path, *listen: str) -> list[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [binary, "--bind", "127.0.0.1", *listen, "--save", "", "--appendonly", "no",
            "--dir", str(tmp)]


@contextlib.contextmanager
def redis_tls_server(tmp: Path, certs: TLSFiles) -> Iterator[str]:
    """redis-server on 127.0.0.1 speaking only TLS and requiring client certificates
    (``tls-auth-clients yes``); yields its rediss:// URL."""
    port = free_port()
    argv = _redis_argv(
        tmp,
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)),
        *("--tls-ca-cert-file", str(certs.root), "--tls-auth-clients", "yes"),
    )
    with server_process(argv, port, tmp / f"redis-tls-{port}.log"):
        yield f"rediss://127.0.0.1:{port}/0"


@contextlib.contextmanager
def redis_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); yields its URL."""
    port = port or free_port()
    with server_process(_redis_argv(tmp, "--port", str(port)), port, tmp / f"redis-{port}.log"):
        yield f"redis://127.0.0.1:{port}/0"


class Player:
    """A websocket client of one game page, in JSON mode (or HTML mode with html=True)."""

    def __init__(self, node: Node, code: str, token: str | None = None, html: bool = False) -> None:
        self.node, self.code = node, code
        self.token = token or secrets.token_urlsafe(8)
        self.html = html
        self.ws = None
        self.view: dict[str, Any] | None = None
        self.seen: list[Any] = []

    async def __aenter__(self) -> Player:
        return await self.connect()

    async def connect(self, node: Node | None = None) -> Player:
        node = node or self.node
        query = f"token={self.token}" + ("" if self.html else "&format=json")
        self.ws = await websockets.connect(
            f"ws://{node.host}:{node.port}/ws/{self.code}?{query}", max_size=2**22
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, action: str | None = None, **kw: Any) -> None:
        await self.ws.send(json.dumps({"action": action, **kw}))

    async def until(self, pred, timeout: float = 10.0) -> Any:
        """Read messages until ``pred(message)`` is true; returns that message."""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.ws.recv()
                msg = raw if self.html else json.loads(raw)
                self.seen.append(msg)
                if not self.html and "view" in msg:
                    self.view = msg["view"]
                if pred(msg):
                    return msg

    async def view_where(self, pred, timeout: float = 10.0) -> dict[str, Any]:
        if self.view is not None and pred(self.view):
            return self.view
        msg = await self.until(lambda m: "view" in m and pred(m["view"]), timeout)
        return msg["view"]

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        return await self.until(lambda m: "ok" in m or "error" in m or "info" in m, timeout)

    async def do(self, action: str, **kw: Any) -> dict[str, Any]:
        await self.send(action, **kw)
        return await self.reply()
