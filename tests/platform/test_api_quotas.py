"""Per-org quotas through the real API (real nats-server, real uvicorn, httpx): machines across
an org's apps and apps per org, each refused with one clear 4xx line; other orgs are unaffected.

No agent runs: a create that passes every check gets 503 (no agent), one over a quota is refused
before anything is written or asked of an agent.
"""

from __future__ import annotations

import sys
import time

import httpx
from helpers.servers import free_port, serve
from test_api import _bootstrap, run

from taxiway.platform import schema
from taxiway.platform.state import State


def _api(nats_url: str, tmp_path, *extra: str):
    port = free_port()
    return serve([sys.executable, "-m", "taxiway.platform.api", "--nats", nats_url, "--listen", f"127.0.0.1:{port}",
                  *extra], port, log=tmp_path / f"api-{port}.log")


async def _machines(url: str, per_app: dict[str, int]) -> None:
    st = await State.connect(url)
    try:
        for app, n in per_app.items():
            for i in range(n):
                mid = f"{i:02d}{app[:2]}".ljust(14, "0")
                await st.put(schema.MACHINES, schema.machine_key(app, mid),
                             {"id": mid, "app": app, "desired": "stopped", "config": {}, "created_at": time.time()})
    finally:
        await st.close()


def test_org_quotas_on_machines_and_apps(platform_home, nats_server, tmp_path):
    toks = run(_bootstrap(nats_server.url))  # acme: apps web, api; other: app theirs
    run(_machines(nats_server.url, {"web": 2, "api": 1}))
    with _api(nats_server.url, tmp_path, "--max-org-machines", "3", "--max-org-apps", "3") as s:
        def client(who: str) -> httpx.Client:
            return httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {toks[who]}"}, timeout=30)

        body = {"config": {"image": "localhost/example:1"}, "skip_launch": True}
        with client("acme") as c:
            for app in ("web", "api"):  # 3 machines across acme's apps: the org's quota is reached
                r = c.post(f"/v1/apps/{app}/machines", json=body)
                assert r.status_code == 400, r.text
                err = r.json()
                assert err["error"] == "the org already has 3 machines across its apps (at most 3)", err
                assert "destroy machines" in err["fix"]
            assert len(c.get("/v1/apps/web/machines").json()) == 2  # nothing written

            assert c.post("/v1/apps", json={"app_name": "third"}).status_code == 201
            r = c.post("/v1/apps", json={"app_name": "fourth"})
            assert r.status_code == 400 and r.json()["error"] == "the org already has 3 apps (at most 3)", r.text
            assert c.get("/v1/apps/fourth").status_code == 404
        with client("other") as c:  # another org is counted on its own
            r = c.post("/v1/apps/theirs/machines", json=body)
            assert r.status_code == 503 and "agent" in r.json()["error"], r.text
            assert c.post("/v1/apps", json={"app_name": "other-two"}).status_code == 201
