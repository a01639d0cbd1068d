"""The API's machine flow end to end: real nats-server, the real host agent, real machines.

API (uvicorn) -> MACHINES record -> agent.local.<verb> -> a busybox machine serving HTTP.
Deadlines only keep a broken run from hanging; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from test_api import _bootstrap, run, start_api

HTTPD = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; echo serving; exec httpd -f -p 8080 -h /www"]


def web_config(image: str, **extra) -> dict:
    return {"image": image, "cmd": HTTPD, "services": [{"internal_port": 8080, "protocol": "tcp", "checks": [
        {"type": "http", "path": "/index.html", "interval": 0.5, "timeout": 2, "grace_period": 0}]}],
        "metadata": {"process_group": "app"}, **extra}


@pytest.fixture
def stack(platform_home, nats_server, tmp_path):
    """nats-server, the agent and the API as processes; every machine left is destroyed after."""
    image = make_image(tmp_path, BUSYBOX)
    toks = run(_bootstrap(nats_server.url))
    log = open(tmp_path / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", nats_server.url,
                              "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with start_api(nats_server.url, tmp_path) as api:
            c = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {toks['acme']}"}, timeout=300)
            deadline = time.monotonic() + 60
            # The agent answers once it has reconciled; until then a create gets a 503.
            while c.get("/v1/apps/web/machines").status_code != 200 or _agent_down(c):
                assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-2000:]
                time.sleep(0.2)
            yield c, image, api, tmp_path, nats_server.url, toks
            c.close()
    finally:
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
        # machines outlive the agent by design: the test removes its own
        from taxiway import machines

        for m in machines.all_machines():
            machines.destroy(m, force=True)


def _agent_down(c: httpx.Client) -> bool:
    r = c.post("/v1/apps/web/machines/00000000000000/start")  # a 404 means the API got past the agent check
    return r.status_code == 503


def _get(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False, timeout=10).text


def test_machine_lifecycle_through_the_api(stack):
    c, image, api, tmp_path, nats_url, toks = stack
    r = c.post("/v1/apps/web/machines", json={"config": web_config(image), "name": "web-1"})
    assert r.status_code == 200, r.text
    m = r.json()
    mid = m["id"]
    assert m["state"] == "started" and m["name"] == "web-1"
    assert c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started", "timeout": 60}).status_code == 200
    port = c.get(f"/v1/apps/web/machines/{mid}").json()["ports"]["8080"]
    assert _get(port) == "hello\n"

    # logs: what the machine printed, as NDJSON; follow=1 streams
    deadline = time.monotonic() + 60
    while "serving" not in c.get("/v1/apps/web/logs", params={"machine": mid}).text:
        assert time.monotonic() < deadline, "no log line"
        time.sleep(0.2)
    with c.stream("GET", "/v1/apps/web/logs", params={"follow": "1"}) as s:
        assert s.status_code == 200 and "ndjson" in s.headers["content-type"]
        first = next(s.iter_lines())
        assert json.loads(first)["machine"] == mid
    assert c.get("/v1/apps/web/logs", params={"machine": "../x"}).status_code == 400

    r = c.post(f"/v1/apps/web/machines/{mid}/exec", json={"command": ["cat", "/www/index.html"]})
    assert r.status_code == 200 and r.json()["stdout"] == "hello\n" and r.json()["exit_code"] == 0

    r = c.delete(f"/v1/apps/web/machines/{mid}")
    assert r.status_code == 409 and "force" in r.json()["fix"]

    assert c.post(f"/v1/apps/web/machines/{mid}/stop").status_code == 200
    assert c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "stopped", "timeout": 60}).status_code == 200
    assert c.get(f"/v1/apps/web/machines/{mid}").json()["state"] == "stopped"
    r = c.post(f"/v1/apps/web/machines/{mid}/start")
    assert r.status_code == 200 and r.json()["previous_state"] == "stopped"
    assert c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started", "timeout": 60}).status_code == 200

    # update: a new config replaces the machine (new instance) and it serves again
    old = c.get(f"/v1/apps/web/machines/{mid}").json()
    cfg = web_config(image, env={"GREETING": "v2"})
    r = c.post(f"/v1/apps/web/machines/{mid}", json={"config": cfg, "current_version": old["version"]})
    assert r.status_code == 200, r.text
    new = c.get(f"/v1/apps/web/machines/{mid}").json()
    assert new["instance_id"] != old["instance_id"] and new["config"]["env"] == {"GREETING": "v2"}
    r = c.get(f"/v1/apps/web/machines/{mid}/wait",
              params={"state": "started", "timeout": 60, "instance_id": new["instance_id"]})
    assert r.status_code == 200, r.text
    r = c.post(f"/v1/apps/web/machines/{mid}/exec", json={"command": ["sh", "-c", "echo $GREETING"]})
    assert r.json()["stdout"] == "v2\n"
    # a stale version loses (compare-and-set)
    r = c.post(f"/v1/apps/web/machines/{mid}", json={"config": cfg, "current_version": old["version"]})
    assert r.status_code == 409

    # kill -9 of the API: the machine keeps serving, a new API sees it as it was
    os.killpg(api.proc.pid, signal.SIGKILL)
    api.proc.wait()
    with start_api(nats_url, tmp_path) as api2, \
            httpx.Client(base_url=api2.url, headers={"Authorization": f"Bearer {toks['acme']}"}, timeout=300) as c2:
        m2 = c2.get(f"/v1/apps/web/machines/{mid}").json()
        assert m2["state"] == "started" and m2["instance_id"] == new["instance_id"]
        assert _get(m2["ports"]["8080"]) == "hello\n"
        types = [e["type"] for e in c2.get(f"/v1/apps/web/machines/{mid}/events").json()]
        assert "start" in types and "stop" in types

        r = c2.delete(f"/v1/apps/web/machines/{mid}", params={"force": "true"})
        assert r.status_code == 200, r.text
        r = c2.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "destroyed", "timeout": 60})
        assert r.status_code == 200
        assert c2.get("/v1/apps/web/machines").json() == []
        assert [x["id"] for x in c2.get("/v1/apps/web/machines", params={"include_deleted": 1}).json()] == [mid]

        # destroying the app destroys its running machines too
        r = c2.post("/v1/apps/web/machines", json={"config": web_config(image)})
        assert r.status_code == 200, r.text
        port = r.json()["ports"]["8080"]
        assert _get(port) == "hello\n"
        assert c2.delete("/v1/apps/web").status_code == 200
        assert c2.get("/v1/apps/web").status_code == 404
        with pytest.raises(httpx.HTTPError):
            _get(port)
        from taxiway import machines

        assert [m for m in machines.all_machines() if m.status() == "running"] == []


def test_agent_errors_are_one_clear_line(stack):
    c, image, *_ = stack
    r = c.post("/v1/apps/web/machines", json={"config": {"image": "localhost/no-such/image:1"}})
    assert r.status_code in (422, 404, 400), r.text
    assert r.json()["error"]
    assert c.get("/v1/apps/web/machines").json() == []  # nothing half-made
