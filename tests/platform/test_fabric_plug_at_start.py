"""A machine is plugged into the private network fabric when it STARTS, not at create.

Through the real API and the real agent (test_api_agent's stack: nats-server, agent, API as
processes; busybox machines): a skip_launch machine gets its address at create (STATUS.private_ip
is stable) but no veth pair or rules until it is started; destroy unplugs it.
"""

from __future__ import annotations

import asyncio
import time

from test_api_agent import HTTPD, stack  # noqa: F401 (fixture)

from taxiway.platform import fabric, schema
from taxiway.platform.state import State


def _until(fn, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (got := fn()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return got


def _status(nats_url: str, mid: str) -> dict:
    async def go() -> dict:
        st = await State.connect(nats_url)
        try:
            got = await st.get(schema.STATUS, schema.machine_key("web", mid))
            return got[0] if got else {}
        finally:
            await st.close()

    return asyncio.run(go())


def test_a_skip_launch_machine_holds_no_network_until_it_starts(stack):  # noqa: F811
    c, image, api, tmp_path, nats_url, toks = stack
    fab = fabric.Fabric.for_home()
    cfg = {"image": image, "cmd": HTTPD, "restart": {"policy": "no"}, "stop_timeout": 1}
    ids = []
    for _ in range(3):
        r = c.post("/v1/apps/web/machines", json={"config": cfg, "skip_launch": True})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    mid = ids[0]
    created = _until(lambda: (m := _status(nats_url, mid)).get("private_ip") and m,
                     "a private_ip for the created machine")
    assert created["state"] == "created", created
    address = created["private_ip"]
    assert not set(ids) & set(fab.plugged()), fab.plugged()  # no netns, veth or rules for never-started machines
    assert all(fab.info(i) is None for i in ids)

    assert c.post(f"/v1/apps/web/machines/{mid}/start").status_code == 200
    assert c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started", "timeout": 90}).status_code == 200
    assert mid in fab.plugged() and fab.info(mid)["address"] == address
    assert _status(nats_url, mid)["private_ip"] == address  # stable across the start
    r = c.post(f"/v1/apps/web/machines/{mid}/exec", json={"command": ["sh", "-c", "ip -6 addr show dev eth0"]})
    assert r.status_code == 200 and f"inet6 {address}/128" in r.json()["stdout"], r.text
    assert not set(ids[1:]) & set(fab.plugged())

    for i in ids:
        assert c.delete(f"/v1/apps/web/machines/{i}", params={"force": "true"}).status_code == 200
    _until(lambda: not set(ids) & set(fab.plugged()), "every machine unplugged after destroy")
