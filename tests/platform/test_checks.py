"""Health checks: the pure schedule (no servers), then the runners against real loopback servers."""

from __future__ import annotations

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.platform import checks as C

# -- parse ------------------------------------------------------------------------------------------


def test_parse_top_level_and_service_checks():
    cfg = {"checks": {"alive": {"type": "tcp", "port": 9000, "interval": 5, "timeout": "500ms"}},
           "services": [{"internal_port": 8080, "checks": [{"type": "http", "path": "/health", "method": "head",
                                                             "grace_period": "2s", "headers": {"X-A": ["b"]}}]},
                        {"internal_port": 9090}]}
    got = C.parse(cfg)
    assert [c.name for c in got] == ["alive", "servicecheck-00-00"]
    alive, svc = got
    assert (alive.type, alive.port, alive.interval, alive.timeout) == ("tcp", 9000, 5.0, 0.5)
    assert (svc.port, svc.method, svc.path, svc.grace_period, svc.headers) == (8080, "HEAD", "/health", 2.0, {"X-A": "b"})
    assert C.ports(cfg) == [8080, 9000]
    assert C.parse({}) == []


@pytest.mark.parametrize("bad, words", [
    ({"checks": {"x": {"type": "udp", "port": 1}}}, "type"),
    ({"checks": {"x": {"type": "tcp"}}}, "no valid port"),
    ({"checks": {"x": {"type": "tcp", "port": 70000}}}, "no valid port"),
    ({"checks": {"x": {"type": "http", "port": 80, "path": "health"}}}, "path"),
    ({"checks": {"x": {"type": "tcp", "port": 80, "interval": "soon"}}}, "interval"),
    ({"checks": {"x": {"type": "tcp", "port": 80, "timeout": -1}}}, "negative"),
    ({"checks": {"x": "tcp"}}, "not a table"),
])
def test_parse_refuses_bad_checks_naming_them(bad, words):
    with pytest.raises(InvalidInput) as e:
        C.parse(bad)
    assert "check x" in e.value.message and words in e.value.message


# -- schedule ---------------------------------------------------------------------------------------


def test_schedule_grace_period_then_interval():
    c = C.Check("h", "http", 80, interval=10, grace_period=5)
    s = C.Schedule([c], started_at=100.0)
    assert s.statuses()["h"]["status"] == "critical" and s.statuses()["h"]["output"] == C.WAITING
    assert s.due(104.9) == [] and s.next_due() == 105.0
    assert s.due(105.0) == [c]
    assert s.due(200.0) == []  # running: never twice at once
    assert s.next_due() is None
    assert s.record("h", True, "200 OK", 105.2) is True
    assert s.statuses()["h"] == {"status": "passing", "output": "200 OK", "updated_at": 105.2}
    assert s.next_due() == 115.0
    assert s.due(115.0) == [c]
    assert s.record("h", True, "200 OK", 115.1) is False  # nothing new to write
    assert s.due(125.0) == [c]
    assert s.record("h", False, "503 Service Unavailable", 125.1) is True
    assert s.statuses()["h"]["status"] == "critical"


def test_schedule_retries_soon_until_the_first_pass():
    """A starting app fails its first checks: they are tried again after a short, growing delay
    (never more than the interval), until the first pass; then every interval, failures included."""
    c = C.Check("t", "tcp", 80, interval=1.0)
    s = C.Schedule([c], started_at=0.0)
    assert s.due(0.0) == [c]
    s.record("t", False, "connection closed at once", 0.01)
    assert s.next_due() == pytest.approx(0.01 + C.FIRST_RETRY)
    now, delays = 0.01, []
    for _ in range(30):
        nxt = s.next_due()
        delays.append(nxt - now)
        now = nxt
        assert s.due(now) == [c]
        s.record("t", False, "refused", now)
    assert all(b >= a - 1e-9 for a, b in zip(delays, delays[1:], strict=False)) and delays[0] == pytest.approx(C.FIRST_RETRY)
    assert max(delays) <= c.interval + 1e-9 and delays[-1] == pytest.approx(c.interval)
    now = s.next_due()
    assert s.due(now) == [c]
    s.record("t", True, "connection open", now)
    assert s.next_due() == pytest.approx(now + c.interval)
    now += c.interval
    assert s.due(now) == [c]
    s.record("t", False, "refused", now)  # failing after a pass: the configured interval
    assert s.next_due() == pytest.approx(now + c.interval)


def test_healthy_needs_every_configured_check_passing():
    ok = {"status": "passing"}
    assert C.healthy({}, 0)
    assert C.healthy({"a": ok, "b": ok}, 2)
    assert not C.healthy({"a": ok}, 2)
    assert not C.healthy({"a": ok, "b": {"status": "critical"}}, 2)


@settings(deadline=None)  # no timing in tests: a loaded CI machine is slow, not wrong
@given(st.lists(st.tuples(st.floats(0.1, 30), st.floats(0, 30)), min_size=1, max_size=5),
       st.lists(st.tuples(st.floats(0, 5), st.booleans()), min_size=1, max_size=40))
def test_schedule_properties(defs, steps):
    """Nothing runs before its grace period, nothing runs twice at once; once a check has passed its
    runs are >= interval apart, before that >= the retry delay after the failure they follow."""
    cs = [C.Check(f"c{i}", "tcp", 1, interval=iv, grace_period=g) for i, (iv, g) in enumerate(defs)]
    s = C.Schedule(cs, started_at=0.0)
    now, running, last, passed, gap = 0.0, set(), {}, set(), {}
    for dt, ok in steps:
        now += dt
        for c in s.due(now):
            assert c.name not in running
            assert now >= c.grace_period
            if c.name in last:
                assert now - last[c.name] >= gap[c.name] - 1e-9
            last[c.name] = now
            running.add(c.name)
        for name in sorted(running)[::2]:  # half of them finish each step
            c = s.slots[name].check
            fails = s.slots[name].failures
            s.record(name, ok, "ok" if ok else "no", now)
            # the next run comes at the earlier of (its start + interval) and, before any pass,
            # (this failure + the retry delay)
            gap[name] = c.interval if ok or name in passed else min(c.interval, C.retry_delay(c, fails))
            if ok:
                passed.add(name)
            running.discard(name)
    assert set(s.statuses()) == {c.name for c in cs}


# -- runners against real servers --------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/slow":
            self.server.release.wait(5)  # type: ignore[attr-defined]
        code = {"/ok": 200, "/moved": 302, "/broken": 500, "/slow": 200}.get(self.path, 404)
        self.send_response(code)
        if code == 302:
            self.send_header("Location", "/elsewhere")
        body = f"path {self.path}".encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_port():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.release = threading.Event()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.mark.anyio
async def test_http_runner_codes_and_timeout(http_port):
    def chk(path, timeout=2.0):
        return C.Check("h", "http", 8080, path=path, timeout=timeout)

    assert await C.run_http(chk("/ok"), http_port) == (True, "200 OK: path /ok")
    ok, out = await C.run_http(chk("/moved"), http_port)
    assert ok and out.startswith("302")  # 3xx passes, not followed
    ok, out = await C.run_http(chk("/broken"), http_port)
    assert not ok and out.startswith("500")
    ok, out = await C.run_http(chk("/nope"), http_port)
    assert not ok and out.startswith("404")
    ok, out = await C.run_http(chk("/slow", timeout=0.3), http_port)
    assert not ok and "timed out" in out
    ok, out = await C.run_http(chk("/ok"), _closed_port())
    assert not ok and "ConnectError" in out


@pytest.mark.anyio
async def test_tcp_runner_open_closed_and_forwarder_eof():
    c = C.Check("t", "tcp", 1, timeout=1)
    held = []  # keep each writer: Python 3.13 closes a connection whose StreamWriter is collected
    srv = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]

    async def hang_up(r, w):  # as a machine's port forwarder does when nothing listens inside
        w.close()

    eof = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        assert await C.run_tcp(c, port) == (True, "connection open")
        ok, out = await C.run_tcp(c, eof.sockets[0].getsockname()[1])
        assert not ok and "closed at once" in out
        ok, out = await C.run_tcp(c, _closed_port())
        assert not ok and "connect failed" in out
    finally:
        for w in held:
            w.close()
        srv.close()
        eof.close()


def test_listening_in_reads_the_namespaces_listeners():
    """/proc/PID/net/tcp{,6} of a process in the namespace (here: this test's own, on the host's)."""
    import os

    with socket.socket() as s4, socket.socket(socket.AF_INET6) as s6:
        s4.bind(("127.0.0.1", 0))
        s4.listen()
        s6.bind(("::1", 0))
        s6.listen()
        assert C.listening_in(os.getpid(), s4.getsockname()[1]) is True
        assert C.listening_in(os.getpid(), s6.getsockname()[1]) is True
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))  # bound, not listening
        try:
            assert C.listening_in(os.getpid(), bound.getsockname()[1]) is False
        finally:
            bound.close()
    assert C.listening_in(None, 80) is None
    assert C.listening_in(2 ** 22 + 12345, 80) is None  # no such process: can't tell


@pytest.mark.anyio
async def test_tcp_check_passes_at_once_when_the_namespace_shows_a_listener():
    """With the machine's pid the check trusts its namespace's listener instead of waiting for EOF; a
    forwarder that hangs up still fails it when nothing listens there."""
    import os

    held = []
    srv = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]

    async def hang_up(r, w):
        w.close()

    eof = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        c = C.Check("t", "tcp", port, timeout=1)
        assert await C.run_tcp(c, port, netns_pid=os.getpid()) == (True, "connection open")
        e = C.Check("t", "tcp", _closed_port(), timeout=1)  # nothing listens on the machine's port
        ok, out = await C.run_tcp(e, eof.sockets[0].getsockname()[1], netns_pid=os.getpid())
        assert not ok and "closed at once" in out
    finally:
        for w in held:
            w.close()
        srv.close()
        eof.close()


@pytest.mark.anyio
async def test_run_checks_reports_changes(http_port):
    cs = [C.Check("web", "http", 8080, path="/ok", interval=0.1), C.Check("bad", "http", 8080, path="/broken", interval=0.1),
          C.Check("unpublished", "tcp", 9999, interval=0.1)]
    seen: list[dict] = []
    both = asyncio.Event()

    async def on_change(st):
        seen.append(st)
        if st["web"]["status"] == "passing" and st["bad"]["output"] != C.WAITING and \
                st["unpublished"]["output"] != C.WAITING:
            both.set()

    task = asyncio.create_task(C.run_checks(cs, {8080: http_port}, started_at=0.0, on_change=on_change))
    try:
        await asyncio.wait_for(both.wait(), 20)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    first, last = seen[0], seen[-1]
    assert all(v["status"] == "critical" and v["output"] == C.WAITING for v in first.values())
    assert last["web"]["status"] == "passing"
    assert last["bad"]["status"] == "critical" and last["bad"]["output"].startswith("500")
    assert last["unpublished"]["status"] == "critical" and "not published" in last["unpublished"]["output"]
