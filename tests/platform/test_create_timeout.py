"""A create whose agent stops answering mid-way keeps its record (red team M7).

Before: the API waited 300 s, then answered 503 "nothing was changed" and deleted the
MACHINES record, while the restarted agent had adopted and started the machine: it was
then destroyed. Now a request that reached the agent but got no answer is a 202 with the
machine "created"; the agent's reconcile owns the record, and /wait follows it.
Real nats-server, API and agent; the agent is frozen (SIGSTOP) so the request is delivered
and unanswered, then kill -9'd and started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from helpers.servers import free_port, serve
from machines.conftest import BUSYBOX, make_image
from test_api import _bootstrap, run
from test_api_agent import _agent_down, web_config

from taxiway.platform import schema
from taxiway.platform.state import State


def _agent(nats_url: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", nats_url, "--poll", "0.2"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_a_create_the_agent_does_not_answer_keeps_the_record_and_the_machine_starts(platform_home, nats_server,
                                                                                     tmp_path):
    image = make_image(tmp_path, BUSYBOX)
    toks = run(_bootstrap(nats_server.url))
    log = open(tmp_path / "agent.log", "ab")
    agents = [_agent(nats_server.url, log)]
    port = free_port()
    argv = [sys.executable, "-m", "taxiway.platform.api", "--nats", nats_server.url, "--listen", f"127.0.0.1:{port}",
            "--create-wait", "3"]
    try:
        with serve(argv, port, log=tmp_path / "api.log") as api:
            c = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {toks['acme']}"}, timeout=120)
            import time

            deadline = time.monotonic() + 60
            while c.get("/v1/apps/web/machines").status_code != 200 or _agent_down(c):
                assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-2000:]
                time.sleep(0.2)
            os.kill(agents[0].pid, signal.SIGSTOP)  # it has the request, and never answers it
            r = c.post("/v1/apps/web/machines", json={"config": web_config(image)})
            assert r.status_code == 202, r.text
            body = r.json()
            mid = body["id"]
            assert body["state"] == "created" and body["pending"] is True
            assert "nothing was changed" not in r.text
            assert c.get(f"/v1/apps/web/machines/{mid}").status_code == 200  # the record stays

            os.kill(agents[0].pid, signal.SIGKILL)  # dies mid-create
            agents[0].wait()
            agents.append(_agent(nats_server.url, log))
            r = c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started", "timeout": 90})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 90
            while (m := c.get(f"/v1/apps/web/machines/{mid}").json())["state"] != "started" or not m.get("ports"):
                assert time.monotonic() < deadline, (m, (tmp_path / "agent.log").read_text()[-2000:])
                time.sleep(0.2)
            got = httpx.get(f"http://127.0.0.1:{m['ports']['8080']}/index.html", trust_env=False, timeout=10)
            assert got.text == "hello\n"
            c.close()
    finally:
        for a in agents:
            _stop(a)
        log.close()
        from taxiway import machines

        for m in machines.all_machines():
            machines.destroy(m, force=True)
