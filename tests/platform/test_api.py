"""The platform API over a real nats-server and a real uvicorn server, with real httpx.

These tests run without a host agent: they pin auth, scopes, cross-org refusal,
validation, compare-and-set and the 503 a machine verb gets when no agent answers
(nothing is changed then). The flow with the agent is in test_api_agent.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from helpers.servers import Server, free_port, serve

from taxiway.platform import api, schema
from taxiway.platform.state import State


@dataclass
class Api:
    url: str
    nats: str
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, who: str | None = "acme") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def run(coro):
    return asyncio.run(coro)


async def _bootstrap(url: str) -> dict[str, str]:
    """Orgs acme (with the platform admin token) and other, apps web and api of acme, and scoped tokens."""
    from taxiway.platform import tokens

    st = await State.connect(url)
    try:
        out = {}
        out["acme"] = (await api.new_org(st, "acme", platform=True))[1]
        out["other"] = (await api.new_org(st, "other"))[1]
        for app in ("web", "api"):
            await st.put(schema.APPS, app, {"name": app, "org": "acme", "created_at": 0, "config": {}}, revision=0)
        await st.put(schema.APPS, "theirs", {"name": "theirs", "org": "other", "created_at": 0, "config": {}},
                     revision=0)
        out["read"] = (await tokens.create(st, "acme", "read"))[1]
        out["deploy"] = (await tokens.create(st, "acme", "deploy", "web"))[1]
        return out
    finally:
        await st.close()


def start_api(nats_url: str, tmp_path, port: int | None = None):
    port = port or free_port()
    return serve([sys.executable, "-m", "taxiway.platform.api", "--nats", nats_url, "--listen", f"127.0.0.1:{port}"],
                 port, log=tmp_path / f"api-{port}.log")


@pytest.fixture
def platform_api(platform_home, nats_server, tmp_path):
    toks = run(_bootstrap(nats_server.url))
    with start_api(nats_server.url, tmp_path) as s:
        yield Api(s.url, nats_server.url, s, toks)


MID = "0123456789abcd"


def _put_machine(nats_url: str, app: str = "web", mid: str = MID, status: dict | None = None) -> None:
    """A machine record as the API would have written it (the agent is absent in these tests)."""
    async def go():
        st = await State.connect(nats_url)
        try:
            rec = {"id": mid, "name": f"{app}-1", "app": app, "org": "acme", "region": "local", "host": "local",
                   "process_group": "app", "release": None, "config": {"image": "example:1"}, "desired": "started",
                   "instance_id": "i1", "created_at": 0, "updated_at": 0, "cordoned": False}
            await st.put(schema.MACHINES, schema.machine_key(app, mid), rec)
            if status is not None:
                await st.put(schema.STATUS, schema.machine_key(app, mid), status)
        finally:
            await st.close()
    run(go())


def _concrete(path: str, app: str = "web") -> str:
    return (path.replace("{app}", app).replace("{id}", "vol_0123456789abcdef" if "/volumes/" in path else MID)
            .replace("{version}", "1").replace("{name}", "KEY"))


APP_ROUTES = [(m, p) for m, p, _, _ in api.ROUTES if p.startswith("/v1/apps/{app}")]
PRIVATE_ROUTES = [(m, p) for m, p, _, _ in api.ROUTES if p not in ("/v1/health", "/openapi.json")]


def test_every_endpoint_needs_a_valid_token(platform_api):
    bad = ["", "Basic dXNlcjpwYXNz", "Bearer nonsense", "Bearer tw_0123456789abcdef_" + "x" * 43,
           "Bearer " + platform_api.tokens["acme"][:-2] + "zz"]
    with platform_api.client(None) as c:
        for method, path in PRIVATE_ROUTES:
            for auth in bad:
                r = c.request(method, _concrete(path).replace("{id}", "0123456789abcdef"),
                              headers={"Authorization": auth} if auth else {})
                assert r.status_code == 401, (method, path, auth, r.text)
                assert r.json()["error"] and r.json()["fix"]
        assert c.get("/v1/health").status_code == 200


def test_every_app_endpoint_refuses_other_orgs_with_404(platform_api):
    _put_machine(platform_api.nats)
    with platform_api.client("other") as c:
        for method, path in APP_ROUTES:
            r = c.request(method, _concrete(path), json={})
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert "web" in r.json()["error"] and "acme" not in r.text
        # and its own app still answers
        assert c.get("/v1/apps/theirs").json()["org"] == "other"
        assert [a["name"] for a in c.get("/v1/apps").json()["apps"]] == ["theirs"]
    with platform_api.client("acme") as c:
        for method, path in APP_ROUTES:
            assert c.request(method, _concrete(path, "theirs"), json={}).status_code == 404, (method, path)


def test_read_tokens_only_get(platform_api):
    _put_machine(platform_api.nats)
    with platform_api.client("read") as c:
        for method, path in PRIVATE_ROUTES:
            r = c.request(method, _concrete(path).replace("/v1/tokens/{id}", "/v1/tokens/0123456789abcdef"),
                          json={}, params={"timeout": "0"} if path.endswith("/wait") else None)
            if method == "GET":
                assert r.status_code not in (401, 403) or path == "/v1/tokens", (method, path, r.text)
            else:
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert "read token" in r.json()["error"]
        assert sorted(a["name"] for a in c.get("/v1/apps").json()["apps"]) == ["api", "web"]


def test_deploy_tokens_only_their_app(platform_api):
    _put_machine(platform_api.nats)
    with platform_api.client("deploy") as c:
        for method, path in PRIVATE_ROUTES:
            if path.startswith("/v1/apps/{app}"):
                r = c.request(method, _concrete(path, "api"), json={})
                assert r.status_code == 403, (method, path, r.text)
                assert "for app web only" in r.json()["fix"]
                r = c.request(method, _concrete(path, "web"), json={},
                              params={"timeout": "0"} if path.endswith("/wait") else None)
                if (method, path) == ("DELETE", "/v1/apps/{app}"):
                    assert r.status_code == 403  # a deploy token never destroys its app
                else:
                    assert r.status_code not in (401, 403), (method, path, r.text)
            elif (method, path) != ("GET", "/v1/apps"):
                r = c.request(method, path.replace("{id}", "0123456789abcdef"), json={})
                assert r.status_code == 403, (method, path, r.text)
        assert [a["name"] for a in c.get("/v1/apps").json()["apps"]] == ["web"]


def test_apps_lifecycle_and_bad_input(platform_api):
    with platform_api.client() as c:
        r = c.post("/v1/apps", json={"app_name": "Bad_Name"})
        assert r.status_code == 400 and "invalid app name" in r.json()["error"] and r.json()["fix"]
        assert c.post("/v1/apps", content=b"{not json").status_code == 400
        assert c.post("/v1/apps", json=["x"]).status_code == 400
        assert c.post("/v1/apps", json={}).json()["error"] == "'name' is required"
        r = c.post("/v1/apps", json={"app_name": "shop"})
        assert r.status_code == 201 and r.json()["org"] == "acme"
        assert c.post("/v1/apps", json={"app_name": "shop"}).status_code == 409
        assert c.get("/v1/apps/shop").json()["name"] == "shop"
        assert c.delete("/v1/apps/shop").status_code == 200
        assert c.get("/v1/apps/shop").status_code == 404
    with platform_api.client("other") as c:
        assert c.post("/v1/apps", json={"app_name": "web"}).status_code == 409  # names are global
        assert c.post("/v1/apps", json={"app_name": "x", "org_slug": "acme"}).status_code == 404


def test_machine_verbs_without_an_agent_answer_503_and_change_nothing(platform_api):
    _put_machine(platform_api.nats, status={"id": MID, "app": "web", "state": "stopped"})
    with platform_api.client() as c:
        r = c.post("/v1/apps/web/machines", json={"config": {"image": "localhost/example:1"}})
        assert r.status_code == 503 and "agent" in r.json()["error"] and "taxiway up" in r.json()["fix"]
        assert [m["id"] for m in c.get("/v1/apps/web/machines").json()] == [MID]
        before = c.get(f"/v1/apps/web/machines/{MID}").json()
        for verb in ("start", "stop", "restart"):
            assert c.post(f"/v1/apps/web/machines/{MID}/{verb}").status_code == 503
        assert c.post(f"/v1/apps/web/machines/{MID}", json={"config": {"image": "localhost/example:2"}}).status_code == 503
        assert c.delete(f"/v1/apps/web/machines/{MID}").status_code == 503
        after = c.get(f"/v1/apps/web/machines/{MID}").json()
        assert {k: after[k] for k in ("desired", "config", "instance_id")} == \
            {k: before[k] for k in ("desired", "config", "instance_id")}
        # bad input is refused before anything is asked of an agent
        for body in ({}, {"config": {}}, {"config": {"image": ""}}, {"config": {"image": "x", "checks": []}},
                     {"config": {"image": "x", "metadata": {"process_group": "Bad Group"}}}):
            r = c.post("/v1/apps/web/machines", json=body)
            assert r.status_code == 400 and r.json()["error"], body
        r = c.post("/v1/apps/web/machines", json={"config": {"image": "localhost/x:1"}, "region": "../etc"})
        assert r.status_code == 400 and "region" in r.json()["error"]
        r = c.post("/v1/apps/web/machines", content=b"{" + b" " * (api.MAX_BODY + 10) + b"}")
        assert r.status_code == 413 and r.json()["error"]
        assert c.get("/v1/apps/web/machines/zz").status_code == 404
        assert c.post(f"/v1/apps/web/machines/{MID}/exec", json={"command": []}).status_code == 400


def test_cordon_wait_and_events_need_no_agent(platform_api):
    _put_machine(platform_api.nats, status={"id": MID, "app": "web", "state": "starting", "instance_id": "i1"})
    with platform_api.client() as c:
        assert c.post(f"/v1/apps/web/machines/{MID}/cordon").status_code == 200
        assert c.get(f"/v1/apps/web/machines/{MID}").json()["cordoned"] is True
        assert c.post(f"/v1/apps/web/machines/{MID}/uncordon").status_code == 200
        r = c.get(f"/v1/apps/web/machines/{MID}/wait", params={"state": "started", "timeout": "0.5"})
        assert r.status_code == 408 and "starting" in r.json()["error"]
        assert c.get(f"/v1/apps/web/machines/{MID}/wait", params={"state": "bogus"}).status_code == 400

        def later():  # what the agent does when the machine is up
            async def go():
                st = await State.connect(platform_api.nats)
                await st.publish(schema.events_subject("web", MID), {"type": "start", "status": "started"})
                await st.put(schema.STATUS, schema.machine_key("web", MID),
                             {"id": MID, "app": "web", "state": "started", "instance_id": "i1"})
                await st.close()
            run(go())

        t = threading.Timer(0.5, later)
        t.start()
        r = c.get(f"/v1/apps/web/machines/{MID}/wait", params={"state": "started", "timeout": "60"})
        t.join()
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/apps/web/machines/{MID}").json()["state"] == "started"
        assert [e["type"] for e in c.get(f"/v1/apps/web/machines/{MID}/events").json()] == ["start"]


def test_leases_guard_writes(platform_api):
    _put_machine(platform_api.nats)
    with platform_api.client() as c:
        r = c.post(f"/v1/apps/web/machines/{MID}/lease", json={"ttl": 60, "description": "deploy"})
        assert r.status_code == 201
        nonce = r.json()["data"]["nonce"]
        assert c.post(f"/v1/apps/web/machines/{MID}/lease", json={"ttl": 60}).status_code == 409
        r = c.post(f"/v1/apps/web/machines/{MID}/cordon")
        assert r.status_code == 409 and api.LEASE_HEADER in r.json()["fix"]
        assert c.post(f"/v1/apps/web/machines/{MID}/stop").status_code == 409
        h = {api.LEASE_HEADER: nonce}
        assert c.post(f"/v1/apps/web/machines/{MID}/cordon", headers=h).status_code == 200
        assert c.get(f"/v1/apps/web/machines/{MID}/lease").json()["data"]["nonce"] == nonce
        assert c.delete(f"/v1/apps/web/machines/{MID}/lease").status_code == 409
        assert c.delete(f"/v1/apps/web/machines/{MID}/lease", headers=h).status_code == 200
        assert c.get(f"/v1/apps/web/machines/{MID}/lease").status_code == 404
        assert c.post(f"/v1/apps/web/machines/{MID}/uncordon").status_code == 200


def test_compare_and_set_under_concurrency(platform_api):
    """Concurrent writers: one app per name, one lease per machine, distinct release versions."""
    from concurrent.futures import ThreadPoolExecutor

    _put_machine(platform_api.nats)

    def post(path, body):
        with platform_api.client() as c:
            return c.post(path, json=body).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda _: post("/v1/apps", {"app_name": "race"}), range(8)))
        assert sorted(codes) == [201] + [409] * 7
        codes = list(ex.map(lambda _: post(f"/v1/apps/web/machines/{MID}/lease", {"ttl": 60}), range(8)))
        assert sorted(codes) == [201] + [409] * 7

    async def releases():  # the one place that assigns release versions
        from taxiway.platform import deploy

        st = await State.connect(platform_api.nats)
        try:
            return await asyncio.gather(*(deploy.record_release(st, "api", {"image": f"api:{i}"}) for i in range(10)))
        finally:
            await st.close()

    rels = run(releases())
    assert sorted(r["version"] for r in rels) == list(range(1, 11))
    with platform_api.client() as c:
        listed = c.get("/v1/apps/api/releases").json()
        assert sorted(r["image"] for r in listed) == sorted(f"api:{i}" for i in range(10))
        assert c.get("/v1/apps/api/releases/v3").json()["version"] == 3
        assert c.get("/v1/apps/api/releases/99").status_code == 404
        r = c.post("/v1/apps/api/releases", json={"image": "x", "strategy": "yolo"})
        assert r.status_code == 400 and "rolling" in r.json()["fix"]


def test_release_long_poll_answers_when_the_release_changes(platform_api):
    """GET .../releases/N?wait=S&after=<updated_at>: at once when the copy is stale, else when the
    record changes (a follower of a deploy sees each step as it is written, not a poll later)."""
    from taxiway.platform import deploy

    async def record():
        st = await State.connect(platform_api.nats)
        try:
            return await deploy.record_release(st, "web", {"image": "web:1", "updated_at": 1.5})
        finally:
            await st.close()

    rel = run(record())
    key = schema.release_key("web", rel["version"])
    path = f"/v1/apps/web/releases/{rel['version']}"
    with platform_api.client() as c:
        assert c.get(path, params={"wait": 30, "after": "0.5"}).json()["updated_at"] == 1.5  # stale copy: at once
        got: dict = {}

        def follow():
            got["rel"] = c.get(path, params={"wait": 30, "after": "1.5"}).json()

        t = threading.Thread(target=follow)
        t.start()

        async def change():
            st = await State.connect(platform_api.nats)
            try:
                await st.update(schema.RELEASES, key, lambda o: {**o, "status": "complete", "updated_at": 2.5})
            finally:
                await st.close()

        t.join(0.5)  # the follower is waiting on the record (nothing changed yet)
        assert t.is_alive()
        run(change())
        t.join(30)
        assert not t.is_alive() and got["rel"]["status"] == "complete" and got["rel"]["updated_at"] == 2.5
        r = c.get(path, params={"wait": "lots", "after": "2.5"})
        assert r.status_code == 400 and "wait" in r.json()["error"]


def test_secrets_are_sealed_and_never_returned(platform_api):
    with platform_api.client() as c:
        r = c.post("/v1/apps/web/secrets", json={"values": {"DB_PASSWORD": "hunter2", "API_KEY": "k"}, "stage": True})
        assert r.status_code == 200, r.text
        listed = c.get("/v1/apps/web/secrets").json()
        assert sorted(x["name"] for x in listed) == ["API_KEY", "DB_PASSWORD"] and all(x["digest"] for x in listed)
        assert "hunter2" not in c.get("/v1/apps/web/secrets").text
        r = c.post("/v1/apps/web/secrets", json={"values": {"1BAD": "x", "OK": "y"}})
        assert r.status_code == 400 and "1BAD" in r.json()["error"]
        assert "OK" not in [x["name"] for x in c.get("/v1/apps/web/secrets").json()]  # nothing half-written
        assert c.delete("/v1/apps/web/secrets/API_KEY", params={"stage": "1"}).status_code == 200
        assert c.delete("/v1/apps/web/secrets/API_KEY").status_code == 404
        assert [x["name"] for x in c.get("/v1/apps/web/secrets").json()] == ["DB_PASSWORD"]

    async def stored():
        st = await State.connect(platform_api.nats)
        try:
            return await st.get(schema.SECRETS, schema.secret_key("web", "DB_PASSWORD"))
        finally:
            await st.close()

    rec, _ = run(stored())
    assert "hunter2" not in str(rec) and rec["sealed"]


def test_tokens_orgs_and_volumes(platform_api):
    with platform_api.client() as c:
        r = c.post("/v1/tokens", json={"scope": "deploy", "app": "api", "name": "ci"})
        assert r.status_code == 201 and r.json()["token"].startswith("tw_") and "hash" not in r.json()
        tid, tok = r.json()["id"], r.json()["token"]
        assert c.post("/v1/tokens", json={"scope": "deploy", "app": "theirs"}).status_code == 404
        assert c.post("/v1/tokens", json={"scope": "root"}).status_code == 400
        assert tid in [t["id"] for t in c.get("/v1/tokens").json()]
        with httpx.Client(base_url=platform_api.url, headers={"Authorization": f"Bearer {tok}"}) as d:
            assert d.get("/v1/apps/api").status_code == 200
            assert c.delete(f"/v1/tokens/{tid}").status_code == 200
            assert d.get("/v1/apps/api").status_code == 401
        r = c.post("/v1/orgs", json={"name": "neworg"})
        assert r.status_code == 201
        with httpx.Client(base_url=platform_api.url, headers={"Authorization": f"Bearer {r.json()['token']}"}) as n:
            assert n.get("/v1/apps").json()["apps"] == []
            assert n.post("/v1/orgs", json={"name": "another"}).status_code == 403
        r = c.post("/v1/apps/web/volumes", json={"name": "data", "size": "1gb"})
        assert r.status_code == 201 and r.json()["size"] == 1 << 30
        vid = r.json()["id"]
        assert c.post("/v1/apps/web/volumes", json={"name": "Data!"}).status_code == 400
        assert c.post("/v1/apps/web/volumes", json={"name": "d", "size": "lots"}).status_code == 400
        assert [v["id"] for v in c.get("/v1/apps/web/volumes").json()] == [vid]
        # the host agent removes the volume's file first; none runs here, so nothing changes
        # (the destroy with an agent: tests/platform/test_volumes.py)
        assert c.delete(f"/v1/apps/web/volumes/{vid}").status_code == 503
        assert [v["id"] for v in c.get("/v1/apps/web/volumes").json()] == [vid]


def test_openapi_document_lists_every_route(platform_api):
    with platform_api.client(None) as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for method, path, _, _ in api.ROUTES:
        assert method.lower() in doc["paths"][path]
    assert "bearer" in doc["components"]["securitySchemes"]


def test_kill_9_of_the_api_keeps_state(platform_api, tmp_path):
    with platform_api.client() as c:
        assert c.post("/v1/apps", json={"app_name": "durable"}).status_code == 201
    os.killpg(platform_api.server.proc.pid, signal.SIGKILL)
    platform_api.server.proc.wait()
    with start_api(platform_api.nats, tmp_path) as s, \
            httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {platform_api.tokens['acme']}"}) as c:
        assert c.get("/v1/apps/durable").status_code == 200
        assert sorted(a["name"] for a in c.get("/v1/apps").json()["apps"]) == ["api", "durable", "web"]


def test_client_turns_api_errors_into_one_line(platform_api, platform_home, monkeypatch):
    from taxiway.platform.client import (
        Client,
        ClientError,
        ClientInvalid,
        ClientNotFound,
        load_config,
    )

    with pytest.raises(ClientError, match="no platform API configured"):
        load_config()
    monkeypatch.setenv("TAXIWAY_API_URL", platform_api.url)
    monkeypatch.setenv("TAXIWAY_API_TOKEN", platform_api.tokens["acme"])
    with Client.from_config() as c:
        assert c.create_app("cli-app")["name"] == "cli-app"
        assert "cli-app" in [a["name"] for a in c.apps()]
        with pytest.raises(ClientInvalid) as e:
            c.create_app("Nope!")
        assert str(e.value).startswith("invalid app name 'Nope!'; ") and e.value.exit_code == 2
        with pytest.raises(ClientNotFound, match="no app 'theirs'"):
            c.machines("theirs")
        with pytest.raises(ClientError) as e:
            c.create_machine("web", {"image": "localhost/x:1"})
        assert e.value.status == 503 and "agent" in str(e.value)
        assert c.logs("web") == []
    with Client(f"http://127.0.0.1:{free_port()}", "tw_x") as c, pytest.raises(ClientError, match="cannot reach"):
        c.apps()


def test_logs_follow_survives_a_nats_server_restart(platform_api, nats_server):
    """logs?follow=1 keeps streaming after nats-server restarts (the lines are published as the agent does)."""
    async def publish(line: str) -> None:
        st = await State.connect(nats_server.url)
        try:
            await st.publish(schema.logs_subject("web", "local", MID), {"line": line, "machine": MID})
        finally:
            await st.close()

    run(publish("before"))
    stop = threading.Event()
    with platform_api.client() as c, c.stream("GET", "/v1/apps/web/logs", params={"follow": "1"},
                                              timeout=httpx.Timeout(10, read=120)) as s:
        lines = s.iter_lines()
        assert json.loads(next(lines))["line"] == "before"
        nats_server.stop()
        nats_server.start()

        def ticks():  # until the reader sees one: the API resubscribes at its own pace after reconnecting
            n = 0
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    run(publish(f"tick {n}"))
                n += 1
                stop.wait(0.3)

        t = threading.Thread(target=ticks)
        t.start()
        try:
            assert json.loads(next(lines))["line"].startswith("tick ")
        finally:
            stop.set()
            t.join()


def test_wait_survives_a_nats_server_restart(platform_api, nats_server):
    _put_machine(platform_api.nats, status={"id": MID, "app": "web", "state": "starting"})
    got = {}

    def waiter():
        with platform_api.client() as c:
            got["r"] = c.get(f"/v1/apps/web/machines/{MID}/wait", params={"state": "started", "timeout": 120},
                             timeout=150)

    t = threading.Thread(target=waiter)
    t.start()
    nats_server.stop()
    nats_server.start()

    async def started():  # what the agent writes once the machine is up, after NATS came back
        st = await State.connect(nats_server.url)
        try:
            await st.put(schema.STATUS, schema.machine_key("web", MID), {"id": MID, "app": "web", "state": "started"})
        finally:
            await st.close()

    time.sleep(1)  # let the API reconnect and watch again (a write before that is seen as the initial value)
    run(started())
    t.join()
    assert got["r"].status_code == 200, got["r"].text
