"""The edge against real servers: nats-server, backends as processes on loopback, raw clients.

Machines here are plain HTTP servers (the edge sees only a host port per
machine); their MACHINES and STATUS records are written through State exactly
as the API and the agent write them. Clients connect to 127.0.0.1 and name the
app in the Host header, so no name is ever resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.platform import edge as edge_mod
from taxiway.platform import edgehttp, schema
from taxiway.platform.edge import Edge, EdgeConfig
from taxiway.platform.nats import NatsServer, free_port
from taxiway.platform.state import State

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
                        pytest.param(("asyncio", {}), id="asyncio")])
def anyio_backend(request: pytest.FixtureRequest):
    """uvloop, as the edge runs (python -m taxiway.platform.edge), and asyncio's own loop."""
    return request.param

# A machine: an HTTP/1.1 server with keep-alive. /hold waits for a gate file, /big streams
# a chunked body (pausing at a gate after the first chunk), /echo hashes the request body
# (Content-Length or chunked) and can mark when its first MiB arrived.
BACKEND = r'''
import hashlib, json, os, sys, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def q(self):
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))

    def wait_gate(self, gate):
        while gate and not os.path.exists(gate):
            time.sleep(0.01)

    def body_chunks(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    return
                left -= len(data)
                yield data

    def replay(self, q):
        # Asks the edge to replay the request elsewhere unless it was replayed here already
        # (/loop: always asks, the edge must cut it)
        path = urllib.parse.urlsplit(self.path).path
        if q.get("to") and (path == "/loop" or not self.headers.get("taxiway-replay-src")):
            self.send_response(409)
            self.send_header("Taxiway-Replay", q["to"])
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"ignored")
            return True
        return False

    def do_GET(self):
        q, path = self.q(), urllib.parse.urlsplit(self.path).path
        if self.replay(q):
            return
        if path == "/hold":
            self.wait_gate(q.get("gate"))
        if path == "/big":
            n, gate = int(q["n"]), q.get("gate")
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = bytes(range(256)) * 256
            sent = 0
            while sent < n:
                part = block[: min(len(block), n - sent)]
                self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
                self.wfile.flush()
                sent += len(part)
                if gate:
                    self.wait_gate(gate)
                    gate = None
            self.wfile.write(b"0\r\n\r\n")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.reply(200, json.dumps({"machine": NAME, "path": self.path, "headers": headers}).encode())

    def do_POST(self):
        q = self.q()
        h, n = hashlib.sha256(), 0
        for data in self.body_chunks():
            h.update(data)
            n += len(data)
            if n >= (1 << 20) and q.get("mark"):
                open(q.pop("mark"), "w").close()
        if self.replay(q):
            return
        self.reply(200, json.dumps({"machine": NAME, "sha256": h.hexdigest(), "bytes": n,
                                    "replay_src": self.headers.get("taxiway-replay-src")}).encode())

srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), H)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
'''


class Machine:
    """One backend process standing in for a machine of an app."""

    def __init__(self, app: str, mid: str, script: Path, port: int = 0) -> None:
        self.app, self.id = app, mid
        self.proc = subprocess.Popen([sys.executable, str(script), mid, str(port)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def machines(tmp_path: Path):
    """A factory of backend processes, all killed at the end."""
    script = tmp_path / "backend.py"
    script.write_text(BACKEND)
    made: list[Machine] = []

    def make(app: str, mid: str, port: int = 0) -> Machine:
        m = Machine(app, mid, script, port)
        made.append(m)
        return m

    yield make
    for m in made:
        m.kill()


def machine_record(app: str, mid: str, *, desired: str = "started", cordoned: bool = False,
                   checks: bool = False, region: str = "local") -> dict:
    config: dict = {"image": f"{app}:latest",
                    "services": [{"internal_port": 8080, "protocol": "tcp",
                                  "ports": [{"port": 80, "handlers": ["http"]}]}]}
    if checks:
        config["checks"] = {"alive": {"type": "http", "port": 8080, "path": "/"}}
    return {"id": mid, "app": app, "org": "personal", "region": region, "host": "local", "config": config,
            "desired": desired, "cordoned": cordoned, "process_group": "app", "release": 1}


def status_record(app: str, mid: str, port: int, *, state: str = "started", checks: dict | None = None) -> dict:
    return {"id": mid, "app": app, "host": "local", "state": state, "ports": {"8080": port},
            "checks": checks or {}, "updated_at": "now"}


async def put_machine(st: State, m: Machine, **kw) -> None:
    """The API's desired record and the agent's observed one for a started, healthy machine."""
    status_kw = {k: kw.pop(k) for k in ("state",) if k in kw}
    if "results" in kw:
        status_kw["checks"] = kw.pop("results")
    await st.put(schema.APPS, m.app, {"name": m.app, "org": "personal"})
    await st.put(schema.MACHINES, schema.machine_key(m.app, m.id), machine_record(m.app, m.id, **kw))
    await st.put(schema.STATUS, schema.machine_key(m.app, m.id), status_record(m.app, m.id, m.port, **status_kw))


async def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait for a condition the edge reaches asynchronously (a watch delivering a change)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def routed(e: Edge, app: str) -> set[str]:
    return {b.machine for b in e.routes.backends(app)}


@pytest.fixture
async def edge(state: State, tmp_path: Path) -> AsyncIterator[Edge]:
    """An Edge on a free loopback port in this test's loop, with short limits for the tests."""
    e = Edge(EdgeConfig(listen=("127.0.0.1", 0), header_timeout=1.0, max_body_bytes=256 << 20,
                        idle_timeout=30.0, retry_window=1.0), state=state, log=open(tmp_path / "edge.log", "ab"))
    await e.start()
    try:
        yield e
    finally:
        await e.close()


@pytest.fixture
async def client(edge: Edge) -> AsyncIterator[httpx.AsyncClient]:
    host, port = edge.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30.0) as c:
        yield c


def on(app: str, port: int | None = None) -> dict[str, str]:
    return {"Host": f"{app}.localhost" + (f":{port}" if port else "")}


async def raw(edge: Edge, data: bytes, read_until_close: bool = True) -> bytes:
    """Send raw bytes to the edge and read what it answers until it closes."""
    r, w = await asyncio.open_connection(*edge.address)
    w.write(data)
    await w.drain()
    try:
        async with asyncio.timeout(20):
            return await r.read(-1) if read_until_close else await r.readuntil(b"\r\n\r\n")
    finally:
        w.close()


# -- routing --------------------------------------------------------------------------------------

async def test_routes_by_host_and_forwards_client_headers(state, edge, client, machines):
    web, api = machines("web", "0000000000000a"), machines("api", "0000000000000b")
    await put_machine(state, web)
    await put_machine(state, api)
    await until(lambda: routed(edge, "web") and routed(edge, "api"), "routes")
    r = await client.get("/hello?x=1", headers={**on("web", 8180), "X-Forwarded-For": "10.9.9.9",
                                                 "X-Forwarded-Proto": "https"})
    assert r.status_code == 200
    body = r.json()
    assert body["machine"] == web.id and body["path"] == "/hello?x=1"
    h = body["headers"]
    assert h["host"] == "web.localhost:8180"
    assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"  # appended to, as every proxy does
    assert h["x-forwarded-proto"] == "http"  # the client's own claim is replaced
    assert h["x-forwarded-host"] == "web.localhost:8180"
    assert h["taxiway-request-id"] == r.headers["taxiway-request-id"]
    assert (await client.get("/", headers=on("API"))).json()["machine"] == api.id  # names are case-free
    # Absolute-form request targets name the app too, and reach the backend in origin form.
    resp = await raw(edge, b"GET http://api.localhost/x HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200") and b'"path": "/x"' in resp and api.id.encode() in resp


async def test_unknown_app_404_and_no_healthy_machine_503(state, edge, client, machines):
    r = await client.get("/", headers=on("nope"))
    assert r.status_code == 404 and r.text == "no app is served at nope.localhost\n"
    assert (await client.get("/", headers={"Host": "example.org"})).status_code == 404
    assert (await client.get("/", headers={"Host": "localhost"})).status_code == 404
    assert (await client.get("/", headers={"Host": "a.b.localhost"})).status_code == 404
    m = machines("web", "0000000000000a")
    await put_machine(state, m, state="stopped")
    await until(lambda: edge.routes.known("web"), "app known")
    r = await client.get("/", headers=on("web"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "app web has no healthy machine" in r.text
    # An app with no machines at all is known too (its APPS record): 503, not 404.
    await state.put(schema.APPS, "empty", {"name": "empty", "org": "personal"})
    await until(lambda: edge.routes.known("empty"), "app known")
    assert (await client.get("/", headers=on("empty"))).status_code == 503
    # The same client connection stays usable after answers the edge gives itself.
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "route")
    assert (await client.get("/", headers=on("web"))).status_code == 200


async def test_unhealthy_cordoned_and_stopped_machines_get_nothing(state, edge, client, machines):
    good = machines("web", "00000000000001")
    cordoned, critical, unchecked, stopping, stopped = (machines("web", f"0000000000000{i}") for i in range(2, 7))
    await put_machine(state, good, checks=True, results={"alive": {"status": "passing"}})
    await put_machine(state, cordoned, cordoned=True)
    await put_machine(state, critical, results={"alive": {"status": "critical"}})
    await put_machine(state, unchecked, checks=True)  # declares checks; none ran yet
    await put_machine(state, stopping, state="stopping")
    await put_machine(state, stopped, desired="stopped")
    await until(lambda: len(edge.routes.status) == 6, "all records")
    seen = {(await client.get("/", headers=on("web"))).json()["machine"] for _ in range(30)}
    assert seen == {good.id}
    # Uncordoned, it gets its share at once (least connections, ties rotate).
    await put_machine(state, cordoned)
    await until(lambda: routed(edge, "web") == {good.id, cordoned.id}, "uncordon")
    seen = [(await client.get("/", headers=on("web"))).json()["machine"] for _ in range(10)]
    assert set(seen) == {good.id, cordoned.id}
    # A check turning critical takes a machine out.
    await state.put(schema.STATUS, f"web.{good.id}",
                    status_record("web", good.id, good.port, checks={"alive": {"status": "critical"}}))
    await until(lambda: routed(edge, "web") == {cordoned.id}, "critical")
    assert {(await client.get("/", headers=on("web"))).json()["machine"] for _ in range(10)} == {cordoned.id}


# -- failures while serving -----------------------------------------------------------------------

async def test_backend_killed_under_a_request_loop_fails_no_request(state, edge, machines):
    a, b = machines("web", "0000000000000a"), machines("web", "0000000000000b")
    await put_machine(state, a)
    await put_machine(state, b)
    await until(lambda: routed(edge, "web") == {a.id, b.id}, "routes")
    results: list[int] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def loop(n: int) -> None:
        # Each loop keeps its connection alive, so killed backends also break pooled connections.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.address[1]}", timeout=30.0) as c:
            while not stop.is_set():
                try:
                    r = await c.get(f"/?loop={n}", headers=on("web"))
                    results.append(r.status_code)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    loops = [asyncio.create_task(loop(i)) for i in range(6)]
    await until(lambda: len(results) > 200, "traffic")
    a.kill()  # mid-loop, while it is still routed: connections refused and reset
    at_kill = len(results)
    await until(lambda: len(results) > at_kill + 300, "traffic after the kill")
    # The agent notices and says so; the edge drops the machine from its routes.
    await state.put(schema.STATUS, f"web.{a.id}", status_record("web", a.id, a.port, state="stopped"))
    await until(lambda: routed(edge, "web") == {b.id}, "route drop")
    after = len(results)
    await until(lambda: len(results) > after + 100, "traffic after the route drop")
    stop.set()
    await asyncio.gather(*loops)
    assert failures == []
    assert edge.balancer.counts() == {}


async def test_only_machine_gone_gives_502_then_503(state, edge, client, machines):
    a = machines("web", "0000000000000a")
    await put_machine(state, a)
    await until(lambda: routed(edge, "web"), "routes")
    a.kill()
    r = await client.get("/", headers=on("web"))
    assert r.status_code == 502 and "no machine of app web could answer" in r.text
    await state.put(schema.STATUS, f"web.{a.id}", status_record("web", a.id, a.port, state="failed"))
    await until(lambda: not routed(edge, "web"), "route drop")
    assert (await client.get("/", headers=on("web"))).status_code == 503


async def test_routes_follow_the_state_after_nats_server_restarts(nats_server, state, edge, client, machines):
    a, b = machines("web", "0000000000000a"), machines("web", "0000000000000b")
    await put_machine(state, a)
    await until(lambda: routed(edge, "web") == {a.id}, "routes")
    await asyncio.to_thread(nats_server.stop)
    # The routes the edge holds keep serving while NATS is away.
    assert (await client.get("/", headers=on("web"))).json()["machine"] == a.id
    await asyncio.to_thread(nats_server.start)  # same port, same store
    async with asyncio.timeout(30):
        while True:  # the test's own client reconnects too; retry its writes until it has
            try:
                await put_machine(state, b)
                await put_machine(state, a, cordoned=True)
                break
            except Exception:
                await asyncio.sleep(0.2)
    await until(lambda: routed(edge, "web") == {b.id}, "routes after the restart", timeout=30)
    assert (await client.get("/", headers=on("web"))).json()["machine"] == b.id


async def test_a_machine_that_is_not_listening_yet_is_tried_again(state, edge, client, machines):
    """Started (no checks declared) but its server not bound yet: the request waits for it
    within retry_window instead of failing (a deploy's new machine, the old one gone)."""
    edge.config.retry_window = 60.0  # far more than a Python server takes to start, even on a loaded host
    port = free_port()
    ghost = Machine.__new__(Machine)
    ghost.app, ghost.id, ghost.port = "web", "0000000000000a", port
    await put_machine(state, ghost)
    await until(lambda: routed(edge, "web"), "routes")
    fast = asyncio.create_task(client.get("/", headers=on("web")))  # the fast path
    slow = asyncio.create_task(client.post("/echo", content=b"abc", headers=on("web")))  # the stream path
    await until(lambda: edge.balancer.failed_until, "a refused connect")
    machines("web", ghost.id, port)  # now it listens
    assert (await fast).json()["machine"] == ghost.id
    assert (await slow).json()["bytes"] == 3


# -- in-flight counts and draining -----------------------------------------------------------------

async def test_inflight_counts_and_drain_before_stop(state, edge, client, machines, tmp_path):
    a, b = machines("web", "0000000000000a"), machines("web", "0000000000000b")
    await put_machine(state, a)
    await until(lambda: routed(edge, "web") == {a.id}, "routes")
    gate = tmp_path / "gate"
    held = [asyncio.create_task(client.get(f"/hold?gate={gate}", headers=on("web"))) for _ in range(3)]
    await until(lambda: edge.balancer.counts().get(a.id) == 3, "in flight")
    answer = await state.request(edge_mod.INFLIGHT_SUBJECT, {})
    assert answer["ok"] and answer["inflight"] == {a.id: 3} and answer["routes"] == {"web": [a.id]}
    one = await state.request(edge_mod.INFLIGHT_SUBJECT, {"app": "web", "machine": a.id})
    assert (one["inflight"], one["routed"]) == (3, True)
    # A deploy: the new machine is up; the old one is cordoned, drained, then stopped.
    await put_machine(state, b)
    await put_machine(state, a, cordoned=True)
    drained = asyncio.create_task(edge_mod.drain(state, [a.id], timeout=60))
    await until(lambda: routed(edge, "web") == {b.id}, "cordon seen")
    # New requests go to the new machine while the old one's finish.
    assert {(await client.get("/", headers=on("web"))).json()["machine"] for _ in range(5)} == {b.id}
    short = await edge_mod.drain(state, [a.id], timeout=0.2)  # what a drain that gives up says
    assert short == {"ok": True, "edge": edge.name, "drained": False, "inflight": {a.id: 3}, "routed": []}
    assert not drained.done()
    gate.touch()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
    assert (await drained)["drained"] is True
    assert (await state.request(edge_mod.INFLIGHT_SUBJECT, {}))["inflight"] == {}


async def test_drain_without_an_edge_is_immediate(state):
    assert (await edge_mod.drain(state, ["0000000000000a"], timeout=1))["drained"] is True


async def test_hard_limit_queues_then_serves(state, edge, client, machines, tmp_path):
    a = machines("web", "0000000000000a")
    await put_machine(state, a)
    rec = machine_record("web", a.id)
    rec["config"]["services"][0]["concurrency"] = {"type": "requests", "soft_limit": 1, "hard_limit": 1}
    await state.put(schema.MACHINES, f"web.{a.id}", rec)
    await until(lambda: [x.hard_limit for x in edge.routes.backends("web")] == [1], "limits")
    gate = tmp_path / "gate"
    first = asyncio.create_task(client.get(f"/hold?gate={gate}", headers=on("web")))
    await until(lambda: edge.balancer.counts().get(a.id) == 1, "first in flight")
    second = asyncio.create_task(client.get("/", headers=on("web")))
    await asyncio.sleep(0.2)
    assert edge.balancer.counts() == {a.id: 1} and not second.done()  # waits: never above hard_limit
    gate.touch()
    assert (await first).status_code == 200 and (await second).status_code == 200
    # Many at once, one at a time each: all are served (waits for a slot are not retries). Ten, not
    # more: each waits at most 10 s for its slot, and a loaded CI host serves a few per second.
    many = await asyncio.gather(*(client.get(f"/{i}", headers=on("web")) for i in range(10)))
    assert [r.status_code for r in many] == [200] * 10
    # A request that finds no slot within queue_timeout: 503 with Retry-After, naming the limit.
    edge.config.queue_timeout = 0.2
    gate2 = tmp_path / "gate2"
    first = asyncio.create_task(client.get(f"/hold?gate={gate2}", headers=on("web")))
    await until(lambda: edge.balancer.counts().get(a.id) == 1, "first in flight")
    r = await client.get("/", headers=on("web"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "hard_limit" in r.text
    gate2.touch()
    assert (await first).status_code == 200


# -- bodies ---------------------------------------------------------------------------------------------

async def test_large_bodies_stream_both_ways(state, edge, client, machines, tmp_path):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    size = 48 << 20
    block = os.urandom(1 << 20)
    want = hashlib.sha256(block * (size >> 20)).hexdigest()

    async def gen():
        for _ in range(size >> 20):
            yield block

    r = await client.post("/echo", content=gen(), headers=on("web"))  # chunked
    assert r.json() == {"machine": m.id, "sha256": want, "bytes": size, "replay_src": None}
    r = await client.post("/echo", content=block * (size >> 20), headers=on("web"))  # Content-Length
    assert r.json()["sha256"] == want
    got, h = 0, hashlib.sha256()
    async with client.stream("GET", f"/big?n={size}", headers=on("web")) as resp:
        async for data in resp.aiter_raw():
            h.update(data)
            got += len(data)
    assert got == size
    assert h.hexdigest() == hashlib.sha256((bytes(range(256)) * 256) * (size // 65536)).hexdigest()


async def test_bodies_are_not_buffered_whole(state, edge, client, machines, tmp_path):
    """Each direction passes its first bytes on before the rest exists: no full buffering."""
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    gate = tmp_path / "gate"
    async with client.stream("GET", f"/big?n={4 << 20}&gate={gate}", headers=on("web")) as resp:
        chunks = resp.aiter_raw()
        first = await anext(chunks)  # arrives while the backend waits at the gate
        assert first
        gate.touch()
        rest = sum([len(c) async for c in chunks])
    assert len(first) + rest == 4 << 20
    mark = tmp_path / "mark"
    sent_rest = asyncio.Event()

    async def gen():
        yield b"x" * (1 << 20)
        await until(mark.exists, "the backend got the first MiB")  # before the rest was sent
        sent_rest.set()
        yield b"y" * (1 << 20)

    r = await client.post(f"/echo?mark={mark}", content=gen(), headers=on("web"))
    assert sent_rest.is_set() and r.json()["bytes"] == 2 << 20


# -- abuse ------------------------------------------------------------------------------------------------

async def test_slowloris_client_is_cut_off_without_blocking_others(state, edge, client, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    r, w = await asyncio.open_connection(*edge.address)
    w.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")
    await w.drain()

    async def trickle():
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                w.write(b"X-a: b\r\n")
                await w.drain()
                await asyncio.sleep(0.1)

    t = asyncio.create_task(trickle())
    # Served meanwhile.
    assert [(await client.get("/", headers=on("web"))).status_code for _ in range(5)] == [200] * 5
    async with asyncio.timeout(20):
        answer = await r.read(-1)  # the edge closes it (header_timeout is 1 s here)
    assert answer.startswith(b"HTTP/1.1 408")
    t.cancel()
    w.close()
    # An idle connection that never sent a byte is closed too, without an answer.
    r2, w2 = await asyncio.open_connection(*edge.address)
    async with asyncio.timeout(20):
        assert await r2.read(-1) == b""
    w2.close()


# Each raw request, and what the edge must answer (then close). Sent all at once by one test:
# a backend process and an edge per case would cost a second each.
HOSTILE = [
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-a: b\r\n  folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nHost: other.localhost\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-big: " + b"a" * (70 << 10) + b"\r\n\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 999999999999\r\n\r\n", 413),
    # More smuggling shapes: whitespace before the colon, signed/listed/hex lengths, TE twice,
    # TE in HTTP/1.0, TE with a control character, bad chunk sizes and chunk data overruns.
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length : 3\r\n\r\nabc", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST /echo HTTP/1.0\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcGET / HTTP/1.1\r\n"
     b"\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: web.localhost\n\n", 408),  # bare LFs: never a head; cut at header_timeout
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n Host: web.localhost\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
]


async def test_hostile_requests_are_refused(state, edge, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    answers = await asyncio.gather(*(raw(edge, request_bytes) for request_bytes, _ in HOSTILE))
    for (request_bytes, status), answer in zip(HOSTILE, answers, strict=True):
        assert answer.startswith(b"HTTP/1.1 %d" % status), (request_bytes[:120], answer[:200])
        assert b"Connection: close" in answer
    # The machine saw none of them: nothing was smuggled through (each answer came from the edge).
    assert all(b"taxiway-request-id" not in a or b'"machine"' not in a for a in answers)


async def test_chunked_body_over_the_limit_is_413(state, edge, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    edge.config.max_body_bytes = 1 << 20
    chunk = b"%x\r\n" % (256 << 10) + b"a" * (256 << 10) + b"\r\n"
    answer = await raw(edge, b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunk * 5 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")


async def test_keep_alive_serves_many_requests_on_one_connection(state, edge, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    one = b"GET /k HTTP/1.1\r\nHost: web.localhost\r\n\r\n"
    answer = await raw(edge, one * 3 + b"GET /last HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 4 and answer.count(b'"path": "/k"') == 3
    # The balancer's open-connection count (concurrency type "connections") is the pool's idle ones now.
    await until(lambda: edge.balancer.counts() == {}, "released")
    assert edge.balancer.conns.get(m.id, 0) == edge.balancer.idle.get(m.id, 0) >= 1


async def test_websocket_upgrade_is_tunnelled(state, edge, machines):
    import websockets

    async def echo(ws):
        async for message in ws:
            await ws.send(f"{ws.request.headers['x-forwarded-host']}: {message}")

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await state.put(schema.APPS, "chat", {"name": "chat", "org": "personal"})
        await state.put(schema.MACHINES, "chat.0000000000000c", machine_record("chat", "0000000000000c"))
        await state.put(schema.STATUS, "chat.0000000000000c", status_record("chat", "0000000000000c", port))
        await until(lambda: routed(edge, "chat"), "routes")
        # The URL names the app (its Host header); the socket goes to the edge's address.
        async with websockets.connect("ws://chat.localhost/ws", host=edge.address[0], port=edge.address[1]) as ws:
            assert edge.balancer.counts() == {"0000000000000c": 1}  # a WebSocket is in flight while open
            for i in range(3):
                await ws.send(f"hello {i}")
                assert await ws.recv() == f"chat.localhost: hello {i}"
        await until(lambda: edge.balancer.counts() == {}, "released")


async def test_expect_100_continue_and_http_1_0(state, edge, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    await until(lambda: routed(edge, "web"), "routes")
    r, w = await asyncio.open_connection(*edge.address)
    try:
        w.write(b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await w.drain()
        async with asyncio.timeout(20):
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")  # from the machine, passed on
            w.write(b"hello")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
    finally:
        w.close()
    answer = await raw(edge, b"GET /old HTTP/1.0\r\nHost: web.localhost\r\n\r\n")  # closed after, as 1.0 wants
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close\r\n" in answer and b'"path": "/old"' in answer


async def test_stream_path_alone_serves_the_same(state, machines, tmp_path):
    """EdgeConfig(fast=False): every request on the stream path (the fallback), same answers."""
    e = Edge(EdgeConfig(listen=("127.0.0.1", 0), fast=False), state=state, log=open(tmp_path / "edge.log", "ab"))
    await e.start()
    try:
        m = machines("web", "0000000000000a")
        await put_machine(state, m)
        await until(lambda: routed(e, "web"), "routes")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{e.address[1]}") as c:
            assert [(await c.get("/", headers=on("web"))).json()["machine"] for _ in range(3)] == [m.id] * 3
            assert (await c.get("/", headers=on("nope"))).status_code == 404
            assert (await c.post("/echo", content=b"x" * 1000, headers=on("web"))).json()["bytes"] == 1000
    finally:
        await e.close()


# -- the process ----------------------------------------------------------------------------------------

async def test_edge_process_routes_and_stops_on_sigterm(nats_server: NatsServer, state, machines):
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats_server.url,
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        while (line := json.loads(await asyncio.to_thread(proc.stdout.readline)))["msg"] != "listening":
            assert line["msg"] == "routes"  # the initial copy of the routes, then it listens
        assert line["routes"] == {"web": [m.id]}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/", headers=on("web"))).json()["machine"] == m.id
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_workers_share_the_port_and_answer_as_one(nats_server: NatsServer, state, machines, tmp_path):
    """--workers 2: two processes on one port (SO_REUSEPORT); edge.inflight and edge.drain answer
    for both; SIGTERM stops both."""
    m = machines("web", "0000000000000a")
    await put_machine(state, m)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats_server.url,
                             "--listen", f"127.0.0.1:{port}", "--workers", "2"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        listening = 0
        while listening < 2:  # the primary, then its worker
            line = json.loads(await asyncio.to_thread(proc.stdout.readline))
            listening += line["msg"] == "listening"
        gate = tmp_path / "gate"
        clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) for _ in range(8)]
        held = [asyncio.create_task(c.get(f"/hold?gate={gate}", headers=on("web"))) for c in clients]

        async def inflight() -> int:
            return (await state.request(edge_mod.INFLIGHT_SUBJECT, {})).get("inflight", {}).get(m.id, 0)

        async with asyncio.timeout(30):
            while await inflight() != 8:  # the sum over both processes, whichever got which client
                await asyncio.sleep(0.05)
        await put_machine(state, m, cordoned=True)
        short = await edge_mod.drain(state, [m.id], timeout=0.5)
        assert short["drained"] is False and short["inflight"] == {m.id: 8}
        gate.touch()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 8
        assert (await edge_mod.drain(state, [m.id], timeout=30))["drained"] is True
        for c in clients:
            await c.aclose()
        # A worker that dies is started again.
        import psutil

        worker = psutil.Process(proc.pid).children()[0]
        worker.kill()
        while True:
            line = json.loads(await asyncio.to_thread(proc.stdout.readline))
            if line["msg"] == "listening":
                break
        assert [c.pid for c in psutil.Process(proc.pid).children()] != [worker.pid]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # the worker is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_are_one_error_line():
    for args, want in ((["--listen", "nowhere"], "error: --listen 'nowhere' is not HOST:PORT; use HOST:PORT"),
                       (["--domain", "bad_domain!"], "error: invalid --domain 'bad_domain!'"),
                       (["--max-body", "lots"], "error: invalid size 'lots'")):
        p = subprocess.run([sys.executable, "-m", "taxiway.platform.edge", "--nats", "nats://127.0.0.1:1", *args],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith(want) and p.stderr.count("\n") == 1, p.stderr


def test_unreachable_nats_is_one_error_line():
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "taxiway.platform.edge", "--nats", f"nats://127.0.0.1:{port}",
                        "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith(f"error: cannot reach NATS at nats://127.0.0.1:{port}")
    assert p.stderr.count("\n") == 1


def test_listen_flag_is_the_shared_one():
    """--listen is parsed by taxiway.listen, as every server's is: loopback unless an address is named."""
    def listen(*argv: str) -> tuple[str, int]:
        return edge_mod.config_from_args(["--nats", "nats://127.0.0.1:4222", *argv]).listen

    assert listen() == ("127.0.0.1", 8180)
    assert listen("--listen", "127.0.0.1:0") == ("127.0.0.1", 0)
    assert listen("--listen", ":8181") == ("127.0.0.1", 8181)
    assert listen("--listen", "[::1]:8180") == ("::1", 8180)
    for bad in ("127.0.0.1:99999", "edge.example:80", "::1:8180"):
        with pytest.raises(edge_mod.InvalidInput, match="^--listen "):
            listen("--listen", bad)


# -- the pure parts of the hot path -------------------------------------------------------------------

def test_plan_of_a_request_head():
    from taxiway.egress import http

    e = Edge(EdgeConfig())
    head = http.parse_request_head(
        b"GET /a?b=1 HTTP/1.1\r\nHost: Web.localhost:8180\r\nConnection: keep-alive, X-Private, Content-Length\r\n"
        b"X-Private: 1\r\nKeep-Alive: 5\r\nContent-Length: 0\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\ntaxiway-request-id: forged\r\nAccept: */*\r\n\r\n")
    plan = e._plan(head, "127.0.0.1")
    assert (plan.app, plan.host, plan.keep, plan.body, plan.upgrade) == ("web", "Web.localhost:8180", True, False, False)
    lines = plan.out.split(b"\r\n")
    assert lines[0] == b"GET /a?b=1 HTTP/1.1" and lines[1] == b"Host: Web.localhost:8180"
    # Hop-by-hop and Connection-named fields go; framing stays whatever Connection says.
    assert b"X-Private: 1" not in lines and b"Keep-Alive: 5" not in lines and b"Content-Length: 0" in lines
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1" in lines and b"X-Forwarded-Proto: http" in lines
    assert [x for x in lines if x.lower().startswith(b"taxiway-request-id")] == [b"taxiway-request-id: " +
                                                                                  plan.request_id.encode()]
    absolute = e._plan(http.parse_request_head(b"GET http://api.localhost/x HTTP/1.1\r\nHost: web.localhost\r\n"
                                               b"Connection: close\r\n\r\n"), "127.0.0.1")
    assert (absolute.app, absolute.keep) == ("api", False)
    assert absolute.out.startswith(b"GET /x HTTP/1.1\r\nHost: api.localhost\r\n")
    old = e._plan(http.parse_request_head(b"GET / HTTP/1.0\r\nHost: web.localhost\r\n\r\n"), "127.0.0.1")
    assert not old.keep
    chunked = e._plan(http.parse_request_head(b"POST / HTTP/1.1\r\nHost: web.localhost\r\n"
                                              b"Transfer-Encoding: chunked\r\n\r\n"), "127.0.0.1")
    assert chunked.body
    ws = e._plan(http.parse_request_head(b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: Upgrade\r\n"
                                         b"Upgrade: websocket\r\n\r\n"), "127.0.0.1")
    assert ws.upgrade and ws.out.endswith(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")


def test_forward_head_of_a_response():
    from taxiway.egress import http

    status, head, framing, keep_conn, keep_client, replay = edgehttp.forward_response_head(
        b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
        b"X-Secret: 1\r\nContent-Length: 3\r\n\r\n", "GET", True, "e-1")
    assert (status, framing, keep_conn, keep_client, replay) == (200, ("length", 3), True, True, None)
    assert head == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 3\r\ntaxiway-request-id: e-1\r\n\r\n"
    *_, replay = edgehttp.forward_response_head(b"HTTP/1.1 200 OK\r\nTaxiway-Replay: instance=abc\r\n"
                                                b"Content-Length: 0\r\n\r\n", "GET", True, "e-1")
    assert replay == b"instance=abc"
    _, head, framing, keep_conn, keep_client, _ = edgehttp.forward_response_head(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", "GET", True, "e-2")
    assert (framing, keep_conn, keep_client) == (("close", 0), False, False) and head.endswith(
        b"Connection: close\r\n\r\n")
    assert edgehttp.forward_response_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", "GET", True, "x")[2] == \
        ("none", 0)
    assert edgehttp.forward_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD", True, "x")[2] == ("none", 0)
    assert edgehttp.forward_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", True, "x")[2] == \
        ("chunked", 0)
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"nonsense\r\n\r\n"):
        with pytest.raises(http.ProtocolError) as e:
            edgehttp.forward_response_head(bad, "GET", True, "x")
        assert e.value.status == 502


_HEAD_PARTS = st.sampled_from([b"GET", b"HEAD", b"DELETE", b"FOO", b"G T", b""])


@given(method=_HEAD_PARTS,
       target=st.sampled_from([b"/", b"/a?b=1", b"/\xff", b"http://api.localhost/x", b"/a b", b"*", b"/\x7f"]),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x"]),
       fields=st.lists(st.tuples(st.sampled_from([b"Host", b"X-A", b"Bad Name", b"", b"X:Y", b"Accept"]),
                                 st.sampled_from([b"web.localhost", b"", b" v ", b"a\x00b", b"\xe9t\xe9", b"x\ty"])),
                       max_size=6),
       fold=st.booleans())
@settings(max_examples=400, deadline=None)
def test_fast_head_parser_agrees_with_egress_http(method, target, version, fields, fold):
    """llhttp on the fast path accepts exactly what egress.http accepts, with the same result."""
    from taxiway.egress import http

    lines = [method + b" " + target + b" " + version] + [k + b": " + v for k, v in fields]
    if fold and len(lines) > 1:
        lines.append(b"  folded")
    raw = b"\r\n".join(lines) + b"\r\n\r\n"

    def parse(f):
        try:
            return f(raw)
        except http.ProtocolError as e:
            return ("refused", e.status)

    assert parse(edgehttp.parse_request_head) == parse(http.parse_request_head)


# -- replay (taxiway-replay, Fly's fly-replay) ----------------------------------------------------------

async def test_replay_sends_the_request_to_the_named_instance_or_region(state, edge, client, machines):
    a, b = machines("web", "0000000000000a"), machines("web", "0000000000000b")
    await put_machine(state, a)
    await put_machine(state, b, region="ams")
    await until(lambda: routed(edge, "web") == {a.id, b.id}, "routes")
    for _ in range(4):  # whichever machine the balancer picks first, b answers
        r = await client.get(f"/replay?to=instance={b.id}", headers=on("web"))
        assert r.status_code == 200 and "taxiway-replay" not in r.headers, r.text
        got = r.json()
        assert got["machine"] == b.id
        assert got["headers"]["taxiway-replay-src"] in (f"instance={a.id};region=local",
                                                        f"instance={b.id};region=ams")
    assert {(await client.get("/replay?to=region=ams", headers=on("web"))).json()["machine"]
            for _ in range(4)} == {b.id}
    # A client cannot forge where a request came from: its own header is dropped (so b asks again).
    r = await client.get(f"/replay?to=instance={a.id}", headers={**on("web"), "taxiway-replay-src": "instance=x"})
    assert r.json()["machine"] == a.id and r.json()["headers"]["taxiway-replay-src"].startswith("instance=")
    # A small body is kept and sent again (the stream path).
    body = os.urandom(40_000)
    r = await client.post(f"/echo?replay=1&to=instance={a.id}", content=body, headers=on("web"))
    got = r.json()
    assert (got["machine"], got["bytes"], got["sha256"]) == (a.id, len(body), hashlib.sha256(body).hexdigest())
    assert got["replay_src"].startswith("instance=")
    # Loops are cut after one replay; a target that does not exist is a 503; neither shows the header.
    for path in (f"/loop?to=instance={a.id}", "/replay?to=instance=00000000000fff", "/replay?to=region=nowhere"):
        r = await client.get(path, headers=on("web"))
        assert r.status_code == (502 if path.startswith("/loop") else 503), (path, r.status_code, r.text)
        assert "taxiway-replay" not in r.headers
    r = await client.post(f"/loop?to=instance={a.id}", content=b"abc", headers=on("web"))
    assert r.status_code == 502 and "replayed already" in r.text
    # A chunked body (not kept) cannot be replayed: said, not resent half.
    async def gen():
        yield b"x" * 100

    r = await client.post(f"/echo?to=instance={a.id}", content=gen(), headers=on("web"))
    assert r.status_code == 502 and "was not kept" in r.text


# -- plain TCP services ----------------------------------------------------------------------------

async def test_tcp_service_passes_bytes_and_proxy_protocol_v2(state, edge, machines):
    """A [[services]] entry without an http handler: the edge listens on its port and splices bytes
    to the machine's internal port; with the proxy_proto handler the machine first gets a PROXY v2
    header naming the client."""
    got_headers: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(16)
        if first.startswith(edgehttp.PROXY_V2_SIGNATURE):
            rest = await r.readexactly(int.from_bytes(first[14:16], "big"))
            got_headers.append(first + rest)
            first = b""
        w.write(first)
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    tcp_port = server.sockets[0].getsockname()[1]
    web = machines("db", "0000000000000d")
    plain, proxied = free_port(), free_port()
    rec = machine_record("db", web.id)
    rec["config"]["services"].append({"internal_port": 5432, "protocol": "tcp", "ports": [
        {"port": plain, "handlers": []}, {"port": proxied, "handlers": ["proxy_proto"]}]})
    st = status_record("db", web.id, web.port)
    st["ports"]["5432"] = tcp_port
    try:
        await state.put(schema.APPS, "db", {"name": "db", "org": "personal"})
        await state.put(schema.MACHINES, f"db.{web.id}", rec)
        await state.put(schema.STATUS, f"db.{web.id}", st)
        await until(lambda: set(edge._tcp) == {plain, proxied} and edge.routes.tcp_backends("db", 5432),
                    "tcp listeners and their machine")
        payload = os.urandom(3 << 20)
        for port in (plain, proxied):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(payload)
            await w.drain()
            w.write_eof()
            assert await r.readexactly(len(payload)) == payload
            me = w.get_extra_info("sockname")
            w.close()
        assert len(got_headers) == 1
        h = got_headers[0]
        assert h[12:14] == b"\x21\x11"  # v2 PROXY, TCP over IPv4
        assert h[16:20] == bytes([127, 0, 0, 1]) and int.from_bytes(h[24:26], "big") == me[1]
        assert int.from_bytes(h[26:28], "big") == proxied
        await until(lambda: edge.balancer.counts() == {}, "released")
        # The service goes away with its machines: so does the listener.
        await state.put(schema.MACHINES, f"db.{web.id}", {**rec, "desired": "destroyed"})
        await until(lambda: not edge._tcp, "listeners closed")
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", plain)
    finally:
        server.close()


async def test_drain_closes_websockets_last_with_a_going_away_frame(state, edge, machines):
    """A drained machine: no new requests, in-flight ones finish, then its WebSockets get a
    close frame 1001 from the edge, and the drain reports it drained."""
    import websockets

    gate = asyncio.Event()

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def hold(conn, request):
        if request.path.startswith("/hold"):
            await gate.wait()
            return conn.respond(200, "held\n")
        return None

    mid, key = "0000000000000c", "chat.0000000000000c"
    async with websockets.serve(echo, "127.0.0.1", 0, process_request=hold) as server:
        port = server.sockets[0].getsockname()[1]
        await state.put(schema.APPS, "chat", {"name": "chat", "org": "personal"})
        await state.put(schema.MACHINES, key, machine_record("chat", mid))
        await state.put(schema.STATUS, key, status_record("chat", mid, port))
        await until(lambda: routed(edge, "chat"), "routes")
        async with websockets.connect("ws://chat.localhost/ws", host=edge.address[0], port=edge.address[1]) as ws, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.address[1]}", timeout=30) as c:
            await ws.send("a")
            assert await ws.recv() == "a"
            held = asyncio.create_task(c.get("/hold", headers=on("chat")))
            await until(lambda: edge.balancer.counts().get(mid) == 2, "a request and a WebSocket in flight")
            await state.put(schema.MACHINES, key, machine_record("chat", mid, cordoned=True))
            drained = asyncio.create_task(edge_mod.drain(state, [mid], timeout=60))
            await until(lambda: not routed(edge, "chat"), "cordon seen")
            assert (await c.get("/", headers=on("chat"))).status_code == 503  # no new requests
            # The WebSocket stays open while a request of the machine is in flight.
            await ws.send("b")
            assert await ws.recv() == "b"
            assert not drained.done()
            gate.set()
            assert (await held).text == "held\n"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert (await drained)["drained"] is True
        await until(lambda: edge.balancer.counts() == {} and not edge._tunnels, "released")


def test_websocket_frames_and_proxy_header_are_tracked_exactly():
    """WsFrames finds frame boundaries (any split of the bytes), so a close frame is never put inside one."""
    def frame(payload: bytes, masked: bool, opcode: int = 1) -> bytes:
        n = len(payload)
        ln = bytes([n | (0x80 if masked else 0)]) if n < 126 else (
            bytes([126 | (0x80 if masked else 0)]) + n.to_bytes(2, "big") if n < 65536 else
            bytes([127 | (0x80 if masked else 0)]) + n.to_bytes(8, "big"))
        return bytes([0x80 | opcode]) + ln + (b"MASK" if masked else b"") + payload

    stream = frame(b"x" * 5, False) + frame(b"y" * 300, True, 2) + frame(b"z" * 70000, False) + frame(b"", True, 8)
    ends = {7, 7 + 308, 7 + 308 + 70010, len(stream)}
    for step in (1, 3, 64, 4096, len(stream)):
        f, seen, at = edgehttp.WsFrames(), [], 0
        for i in range(0, len(stream), step):
            part = stream[i:i + step]
            b = f.boundary_in(part)
            if b is not None and not f.at_boundary:
                assert at + b in ends
            seen += f.feed(part)
            at += len(part)
            assert f.at_boundary == (at in ends)
        assert seen == [1, 2, 1, 8]
    assert edgehttp.ws_close_frame() [:4] == b"\x88\x1b\x03\xe9"  # FIN+close, 27 bytes, 1001
    h = edgehttp.proxy_v2_header(("127.0.0.1", 40000), ("127.0.0.2", 5432))
    assert h == edgehttp.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 1, 127, 0, 0, 2]) + \
        (40000).to_bytes(2, "big") + (5432).to_bytes(2, "big")
    assert edgehttp.proxy_v2_header(("::1", 1), ("::1", 2))[12:16] == b"\x21\x21\x00\x24"
    assert edgehttp.parse_replay(b"instance=abc; state=x") == {"instance": "abc", "state": "x"}
    with pytest.raises(edgehttp.http.ProtocolError):
        edgehttp.parse_replay(b"nothing=here")


async def test_slow_body_is_cut_and_busy_machines_wake_a_stopped_one(state, edge, machines, tmp_path):
    """A body that trickles slower than read_timeout is cut (408); when every routed machine is at
    its soft_limit, the edge asks the agent to start a stopped machine of the app (auto_start)."""
    a, b = machines("web", "0000000000000a"), machines("web", "0000000000000b")
    rec = machine_record("web", a.id)
    rec["config"]["services"][0]["concurrency"] = {"type": "requests", "soft_limit": 1, "hard_limit": 5}
    await state.put(schema.APPS, "web", {"name": "web", "org": "personal"})
    await state.put(schema.MACHINES, f"web.{a.id}", rec)
    await state.put(schema.STATUS, f"web.{a.id}", status_record("web", a.id, a.port))
    await put_machine(state, b, state="stopped")  # desired started, stopped: asleep
    await until(lambda: routed(edge, "web") == {a.id} and edge.routes.sleeping("web") == [b.id], "routes")
    edge.config.read_timeout = 1.0
    answer = await raw(edge, b"POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 10\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.1 408")
    gate = tmp_path / "gate"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.address[1]}", timeout=30) as c:
        held = asyncio.create_task(c.get(f"/hold?gate={gate}", headers=on("web")))
        await until(lambda: edge.balancer.counts().get(a.id) == 1, "a at its soft limit")
        second = asyncio.create_task(c.get("/", headers=on("web")))  # above soft: served, and b is woken
        log = tmp_path / "edge.log"
        await until(lambda: f'"msg":"autostart","app":"web","machine":"{b.id}"' in log.read_text(), "autostart of b")
        gate.touch()
        assert (await held).status_code == 200 and (await second).json()["machine"] == a.id
