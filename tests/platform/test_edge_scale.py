"""Scale to zero end to end: the edge (as the NATS user "edge") stops an idle machine through the
real host agent and starts it again when a request comes, with a real busybox machine.

The agent runs as its own process, as ``taxiway up`` runs it; the edge runs in the test's loop
with its own (restricted) NATS credentials, so the permission it needs is exercised too.
Deadlines are only there to fail instead of hanging; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image

from taxiway import machines as local_machines
from taxiway.platform import schema
from taxiway.platform.edge import Edge, EdgeConfig
from taxiway.platform.nats import NatsServer
from taxiway.platform.state import State, Unavailable

pytestmark = pytest.mark.anyio

HTTPD = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; exec httpd -f -p 8080 -h /www"]


async def until(fn, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def agent(nats_server: NatsServer, tmp_path: Path, platform_home: Path):
    log = open(tmp_path / "agent.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", nats_server.url,
                             "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    for m in local_machines.all_machines():  # the agent leaves machines running by design: the test removes them
        local_machines.destroy(m, force=True)


def record(mid: str, image: str) -> dict:
    service = {"internal_port": 8080, "protocol": "tcp", "ports": [{"port": 80, "handlers": ["http"]}],
               "checks": [{"type": "http", "path": "/index.html", "interval": 0.3, "timeout": 2, "grace_period": 0}],
               "autostop": "stop", "autostart": True, "min_machines_running": 0}
    config = {"image": image, "cmd": HTTPD, "services": [service], "stop_timeout": 2,
              "metadata": {"release": 1, "process_group": "app"}}
    return {"id": mid, "name": mid, "app": "web", "org": "personal", "region": "local", "host": "local",
            "process_group": "app", "release": 1, "config": config, "desired": "started", "instance_id": "i1",
            "created_at": time.time(), "updated_at": time.time()}


async def test_idle_machine_stops_and_the_next_request_starts_it(nats_server, state, agent, tmp_path):
    image = make_image(tmp_path, BUSYBOX)

    async def ping():
        with contextlib.suppress(Exception):
            r = await state.request(schema.agent_subject("local", "ping"), {}, timeout=2)
            return r.get("reconciled_at")

    await until(ping, "the agent")
    mid, key = schema.new_machine_id(), None
    key = schema.machine_key("web", mid)
    await state.put(schema.APPS, "web", {"name": "web", "org": "personal"})
    await state.put(schema.MACHINES, key, record(mid, image))

    edge_state = await State.connect(nats_server.url_for("edge"))  # the edge's own, restricted user
    edge = Edge(EdgeConfig(listen=("127.0.0.1", 0), autostop_after=1.0, wake_timeout=90.0), state=edge_state,
                log=open(tmp_path / "edge.log", "ab"))
    await edge.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.address[1]}", timeout=120) as c:
            await until(lambda: edge.routes.backends("web"), "the machine routed")
            r = await c.get("/index.html", headers={"Host": "web.localhost"})
            assert r.text == "hello\n"
            # Idle for autostop_after: the edge asks the agent to stop it; it stays desired "started".
            await until(lambda: edge.routes.sleeping("web") == [mid], "the idle machine stopped")
            status = (await state.get(schema.STATUS, key))[0]
            assert status["state"] == "stopped"
            assert (await state.get(schema.MACHINES, key))[0]["desired"] == "started"
            assert (await c.get("/index.html", headers={"Host": "nope.localhost"})).status_code == 404
            # A request wakes it and is held until the machine answers (several at once: one start).
            answers = await asyncio.gather(*(c.get("/index.html", headers={"Host": "web.localhost"})
                                             for _ in range(3)))
            assert [a.text for a in answers] == ["hello\n"] * 3
            assert (await state.get(schema.STATUS, key))[0]["state"] == "started"
            log = (tmp_path / "edge.log").read_text()
            assert log.count('"msg":"autostart"') == 1 and '"msg":"awake"' in log
            # The edge's NATS user may start and stop machines, nothing more.
            for verb in ("create", "destroy", "exec", "restart"):
                with pytest.raises(Unavailable):  # the server drops the publish: nobody answers
                    await edge_state.request(schema.agent_subject("local", verb), {"app": "web", "id": mid},
                                             timeout=1)
            rec = (await state.get(schema.MACHINES, key))[0]
            assert (rec["desired"], rec["instance_id"]) == ("started", "i1")  # neither destroyed nor remade
    finally:
        await edge.close()
        await edge_state.close()
