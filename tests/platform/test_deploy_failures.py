"""A failed deploy never removes machines it did not make (red team M8a/M8c).

Before: a first release with a bad image rolled back to "nothing" and destroyed every
machine of the app, also those made through the Machines API that served before the
deploy; a secrets change then restarted the failed release's image and did it again.
Real nats-server and agent; the deployer in this loop.
"""

from __future__ import annotations

import time

import httpx
import pytest
from test_deploy import APP, config, deploy_and_wait, image, live, platform, release  # noqa: F401 (fixtures)
from test_api_agent import web_config

from taxiway.errors import InvalidInput
from taxiway.platform import deploy, schema

pytestmark = pytest.mark.anyio


async def test_a_failed_first_release_keeps_the_machines_made_before_it(state, platform, image):
    # a machine made the way POST /v1/apps/{app}/machines makes one (no release, no deploy)
    mid = schema.new_machine_id()
    now = time.time()
    rec = {"id": mid, "name": f"{APP}-{mid[:6]}", "app": APP, "org": "personal", "region": schema.DEFAULT_REGION,
           "host": schema.DEFAULT_HOST, "process_group": "app", "release": None, "config": web_config(image),
           "desired": "started", "instance_id": "a" * 26, "created_at": now, "updated_at": now, "cordoned": False}
    await state.put(schema.MACHINES, schema.machine_key(APP, mid), rec, revision=0)
    reply = await state.request(schema.agent_subject("local", "create"), {"app": APP, "id": mid}, timeout=120)
    assert reply["ok"], reply
    port = reply["status"]["ports"]["8080"]

    bad = await deploy_and_wait(state, await release(state, "localhost/nope/missing:1", config(1), "rolling"))
    assert bad["status"] in ("failed", "rolled_back"), bad
    ids = [m["id"] for m in await live(state)]
    assert ids == [mid]  # the deploy's own machine is gone, the one from before stays
    assert not (await state.get(schema.MACHINES, schema.machine_key(APP, mid)))[0].get("cordoned")
    got = await state.get(schema.STATUS, schema.machine_key(APP, mid))
    assert got[0]["state"] == "started"
    async with httpx.AsyncClient(trust_env=False) as c:
        assert (await c.get(f"http://127.0.0.1:{port}/index.html")).text == "hello\n"

    # a secrets change does not restart a release that never worked
    with pytest.raises(InvalidInput, match="no complete release"):
        await deploy.start(state, APP, {"reason": "secrets"}, org="personal")
    assert [m["id"] for m in await live(state)] == [mid]
