"""Red-team findings C2, C3, C4, M6: a tenant's machine gets only the hardened defaults, its own
volumes and its own org's images; image refs never make the platform contact another host.

Real nats-server, real API (uvicorn, or in-process for the no-DNS proof), real agent, real
registry (taxiway's, two orgs), real machines of a busybox image.
"""

from __future__ import annotations

import ipaddress
import json
import socket

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from registry.conftest import running
from test_agent import AgentProc, until
from test_api import _bootstrap, run, start_api

from taxiway.platform import schema
from taxiway.platform.state import State

EVIL = {
    "mounts": [{"source": "/", "target": "/h"}],
    "cap_add": ["SYS_ADMIN"],
    "seccomp": "unconfined",
    "net": "host",
    "isolation": "host",
    "devices": ["/dev/sda"],
    "tty": True,
}


@pytest.fixture
def platform_api(platform_home, nats_server, tmp_path):
    toks = run(_bootstrap(nats_server.url))
    with start_api(nats_server.url, tmp_path) as s:
        c = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {toks['acme']}"}, timeout=30)
        yield c, nats_server.url
        c.close()


def _machines(nats_url: str, app: str) -> list[str]:
    async def go():
        st = await State.connect(nats_url)
        try:
            return await st.keys(schema.MACHINES, app + ".")
        finally:
            await st.close()
    return run(go())


def test_the_api_refuses_privileged_configs_before_writing_anything(platform_api):
    c, nats_url = platform_api
    base = {"image": "localhost/example:1"}
    for field, value in EVIL.items():
        r = c.post("/v1/apps/web/machines", json={"config": {**base, field: value}})
        assert r.status_code == 400, (field, r.text)
        assert f"config.{field}" in r.json()["error"] and r.json()["fix"], r.json()
    for cfg, field in (({**base, "guest": {"memory_mb": 1 << 30}}, "guest.memory"),
                       ({**base, "guest": {"cpus": 100_000}}, "guest.cpus"),
                       ({**base, "env": {"A=B": "1"}}, "env"),
                       ({**base, "env": {"BIG": "x" * (65 << 10)}}, "env"),
                       ({**base, "mounts": [{"volume": "vol_ffffffffffffffff", "path": "/data"}]}, "mounts"),
                       ({"image": "evil.example:5000/x:1"}, "image"),
                       ({"image": "docker.io/library/busybox:1"}, "image")):
        r = c.post("/v1/apps/web/machines", json={"config": cfg})
        assert r.status_code == 400 and f"config.{field}" in r.json()["error"], (cfg, r.text)
    r = c.post("/v1/apps/web/machines", json={"config": base, "name": "Not A Label"})
    assert r.status_code == 400 and "machine name" in r.json()["error"]
    r = c.post("/v1/apps/web/releases", json={"image": "evil.example:5000/x:1", "config": {}})
    assert r.status_code == 400 and "never contacted" in r.json()["error"]
    # another app's volume is not this app's
    vol = httpx.Client(base_url=str(c.base_url), headers=dict(c.headers)).post(
        "/v1/apps/api/volumes", json={"name": "data"}).json()
    r = c.post("/v1/apps/web/machines", json={"config": {**base, "mounts": [{"volume": vol["id"], "path": "/d"}]}})
    assert r.status_code == 400 and "not a volume of this app" in r.json()["error"]
    assert c.post("/v1/apps/web/volumes", json={"name": "big", "size_gb": 100_000}).status_code == 400
    assert _machines(nats_url, "web") == []  # nothing was written


def test_image_refs_are_refused_without_any_name_resolution(platform_home, nats_server, monkeypatch):
    """M6: the API (in this process) answers without resolving evil.example or connecting anywhere."""
    from starlette.testclient import TestClient

    from taxiway.platform import api

    toks = run(_bootstrap(nats_server.url))
    real = socket.getaddrinfo
    asked: list[str] = []

    def only_numeric(host, *a, **k):
        try:
            ipaddress.ip_address(str(host))
        except ValueError:
            asked.append(str(host))
            raise socket.gaierror(f"test: no resolution of {host!r} allowed") from None
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", only_numeric)
    app = api.create_app(api.ApiConfig(nats_server.url, registry="127.0.0.1:1"))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.headers["Authorization"] = f"Bearer {toks['acme']}"
        for path, body in (("/v1/apps/web/machines", {"config": {"image": "evil.example:5000/x:1"}}),
                           ("/v1/apps/web/releases", {"image": "evil.example:5000/x:1", "config": {}})):
            r = c.post(path, json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith("config.image 'evil.example:5000/x:1' is not on the platform's "
                                                "registry 127.0.0.1:1")
    assert asked == []


@pytest.fixture
def two_orgs(platform_home, nats_server, tmp_path):
    """A registry with orgs alpha and beta, each having pushed an image, and an agent that knows it."""
    from taxiway.oci.auth import Credentials
    from taxiway.oci.client import RegistryClient
    from taxiway.oci.push import push

    make_image(tmp_path, BUSYBOX)
    with running(tmp_path / "reg", orgs=("alpha", "beta")) as reg:
        for org, tag in (("alpha", "secret"), ("beta", "mine")):
            with RegistryClient(reg.address, credentials=Credentials(org, reg.tokens[org])) as rc:
                push(f"{reg.address}/web:{tag}", source=BUSYBOX, client=rc)
        auth = platform_home / "platform" / "agent" / "registry-auth.json"
        auth.parent.mkdir(parents=True, mode=0o700)
        auth.write_text(json.dumps({"registry": reg.address, "tenants": str(tmp_path / "reg" / "tenants.db")}))

        async def apps():
            st = await State.connect(nats_server.url)
            try:
                for app, org in (("app-a", "alpha"), ("app-b", "beta")):
                    await st.put(schema.APPS, app, {"name": app, "org": org, "created_at": 0, "config": {}})
            finally:
                await st.close()
        run(apps())
        agent = AgentProc(nats_server.url, tmp_path).start()
        try:
            yield reg, nats_server.url
        finally:
            agent.stop()
            from taxiway import machines

            for m in machines.all_machines():
                machines.destroy(m, force=True)


def _create(nats_url: str, app: str, mid: str, config: dict) -> dict:
    """Write a MACHINES record straight into NATS (as an attacker with NATS access would) and ask
    the agent to create it."""
    async def go():
        st = await State.connect(nats_url)
        try:
            await until(lambda: _pinged(st), what="agent reconciled")
            rec = {"id": mid, "name": mid, "app": app, "org": "alpha", "region": "local", "host": "local",
                   "process_group": "app", "release": 1, "config": {"cmd": ["sleep", "60"], **config},
                   "desired": "started", "instance_id": "i1", "created_at": 0, "updated_at": 0}
            await st.put(schema.MACHINES, schema.machine_key(app, mid), rec)
            return await st.request(schema.agent_subject("local", "create"), {"app": app, "id": mid}, timeout=120)
        finally:
            await st.close()
    return run(go())


async def _pinged(st):
    try:
        r = await st.request(schema.agent_subject("local", "ping"), {}, timeout=5)
    except Exception:
        return None
    return r.get("reconciled_at")


def test_each_org_pulls_only_its_own_images(two_orgs):
    """C4: beta can't run alpha's private image (even after alpha's is on this host); beta runs its own."""
    reg, nats_url = two_orgs
    r = _create(nats_url, "app-a", "a0000000000001", {"image": f"{reg.address}/web:secret"})
    assert r["ok"], r
    r = _create(nats_url, "app-b", "b0000000000001", {"image": f"{reg.address}/web:secret"})
    assert not r["ok"] and ("MANIFEST_UNKNOWN" in r["error"] or "not found" in r["error"].lower()), r
    r = _create(nats_url, "app-b", "b0000000000002", {"image": f"{reg.address}/web:mine"})
    assert r["ok"] and r["status"]["state"] in ("created", "starting", "started"), r


def test_the_agent_rechecks_records_written_straight_into_nats(two_orgs):
    """C2/C3 defence in depth: a privileged record that never went through the API gets no machine."""
    reg, nats_url = two_orgs
    image = f"{reg.address}/web:mine"
    for i, (field, value) in enumerate(EVIL.items()):
        r = _create(nats_url, "app-b", f"c00000000000{i:02d}", {"image": image, field: value})
        assert not r["ok"] and f"config.{field}" in r["error"], (field, r)
    r = _create(nats_url, "app-b", "d0000000000001", {"image": "evil.example:5000/x:1"})
    assert not r["ok"] and "never contacted" in r["error"], r
    from taxiway import machines

    assert not [m for m in machines.all_machines() if m.name.startswith(("tw-c", "tw-d"))]
