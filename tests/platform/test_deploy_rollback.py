"""A rollback gives back what the deploy took: a machine of the previous release that the deploy had
cordoned (its retire cut by a control-plane restart) serves again, uncordoned, instead of being
retired and made anew. Real nats-server, agent process, busybox machines and edge."""

from __future__ import annotations

import time

import httpx
import pytest
from test_agent import until
from test_deploy import APP, config, deploy_and_wait, image, live, platform, release  # noqa: F401 (fixtures)

from taxiway.platform import deploy, schema

pytestmark = pytest.mark.anyio


async def test_a_rollback_uncordons_the_machines_the_deploy_cordoned(state, platform, image):  # noqa: F811
    r1 = await deploy_and_wait(state, await release(state, image, config(1)))
    assert r1["status"] == "complete", r1
    [m1] = await live(state)

    # v2's check never passes; while the deployer waits on it, the control plane goes away...
    rec = await release(state, image, config(2, check_path="/missing", wait="3s"))
    await deploy.start(state, APP, rec)

    async def v2_made():
        return [m for m in await live(state) if m["release"] == 2]

    [m2] = await until(v2_made, what="the v2 machine")
    await deploy.shutdown()
    # ...having cordoned v1's machine to retire it (noted in DEPLOYS first, as _retire does)
    await state.update(schema.DEPLOYS, APP, lambda o: {**o, "cordoned": [m1["id"]]})
    await state.update(schema.MACHINES, schema.machine_key(APP, m1["id"]), lambda o: {**o, "cordoned": True})

    # ...and v2's machine is past its wait_timeout when it comes back: the deploy now rolls back
    await until(lambda: time.time() - m2["created_at"] > 3.5, what="v2's wait_timeout to pass")
    assert await deploy.resume(state) == [APP]
    await deploy.wait(APP, 180)
    got = (await state.get(schema.RELEASES, schema.release_key(APP, 2)))[0]
    assert got["status"] == "rolled_back", got
    assert any(f"uncordoned {m1['id']}" in s for s in got["steps"]), got["steps"]
    [kept] = await live(state)
    assert kept["id"] == m1["id"] and not kept["cordoned"]  # the same v1 machine, serving again
    status = (await state.get(schema.STATUS, schema.machine_key(APP, m1["id"])))[0]
    assert status["state"] == "started"
    host, port = platform.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers={"Host": f"{APP}.localhost"},
                                 trust_env=False, timeout=30) as c:
        async def v1_answers():
            r = await c.get("/index.html")
            return r.status_code == 200 and r.text.strip() == "v1"

        await until(v1_answers, what="the edge routing v1's machine again")
