"""The deployer against a real nats-server, the real host agent (its own process), real busybox
machines and the real edge: rolling deploys under a request loop, automatic rollback, release_command,
and a deploy cut in the middle that the next start finishes.

Deadlines below are only there to fail instead of hanging; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from test_agent import AgentProc, until

from taxiway.platform import appconfig, deploy, schema
from taxiway.platform.edge import Edge, EdgeConfig

pytestmark = pytest.mark.anyio

APP = "web"


@pytest.fixture
def image(platform_home, tmp_path) -> str:
    return make_image(tmp_path, BUSYBOX)


@pytest.fixture
async def platform(state, nats_server, tmp_path, platform_home, image):
    """Agent (process) + edge (in this loop) + an app record; machines removed after."""
    agent = AgentProc(nats_server.url, tmp_path).start()
    edge = Edge(EdgeConfig(listen=("127.0.0.1", 0)), state=state, log=open(tmp_path / "edge.log", "ab"))
    await edge.start()

    async def ping():
        try:
            r = await state.request(schema.agent_subject("local", "ping"), {}, timeout=2)
        except Exception:
            return None
        return r if r.get("reconciled_at") else None

    await until(ping, timeout=90, what="the agent")
    await state.put(schema.APPS, APP, {"name": APP, "org": "personal", "created_at": time.time()})
    try:
        yield edge
    finally:
        await deploy.shutdown()
        await edge.close()
        agent.stop()
        from taxiway import machines

        for m in machines.all_machines():
            machines.destroy(m, force=True)


def config(version: int, check_path: str = "/index.html", release_command: str | None = None,
           strategy: str = "rolling", wait: str = "60s") -> dict:
    doc = {"app": APP, "kill_timeout": "2s",
           "processes": {"app": f"mkdir -p /www; echo v{version} > /www/index.html; "
                                 "exec busybox httpd -f -p 8080 -h /www"},
           "http_service": {"internal_port": 8080, "checks": [
               {"path": check_path, "interval": "200ms", "timeout": "2s", "grace_period": "0s"}]},
           "deploy": {"strategy": strategy, "wait_timeout": wait,
                      **({"release_command": release_command} if release_command else {})}}
    return appconfig.validate(doc)


async def release(state, image: str, cfg: dict, strategy: str | None = None) -> dict:
    """Record a release as the API does (next version, status pending)."""
    keys = await state.keys(schema.RELEASES, APP + ".")
    version = max((int(k.rsplit(".", 1)[1]) for k in keys), default=0) + 1
    rec = {"app": APP, "version": version, "status": "pending", "created_at": time.time(), "image": image,
           "config": cfg, "strategy": strategy or (cfg.get("deploy") or {}).get("strategy", "rolling")}
    await state.put(schema.RELEASES, schema.release_key(APP, version), rec, revision=0)
    return rec


async def deploy_and_wait(state, rec: dict, timeout: float = 180) -> dict:
    await deploy.start(state, APP, rec)
    await deploy.wait(APP, timeout)
    got = await state.get(schema.RELEASES, schema.release_key(APP, rec["version"]))
    return got[0]


async def live(state) -> list[dict]:
    return [r for _, r, _ in await state.items(schema.MACHINES, APP + ".") if r.get("desired") != "destroyed"]


class Load:
    """Requests through the edge, one after another, until stopped: every answer is recorded."""

    def __init__(self, edge: Edge):
        host, port = edge.address
        self.client = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30.0,
                                        headers={"Host": f"{APP}.localhost"})
        self.answers: list[str] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = await self.client.get("/index.html")
                if r.status_code == 200:
                    self.answers.append(r.text.strip())
                else:
                    self.failures.append(f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.01)
        await self.client.aclose()


async def test_rolling_deploys_under_load_rollback_and_release_command(state, platform, image):
    edge = platform
    # v1: the first deploy makes one machine per process group.
    r1 = await deploy_and_wait(state, await release(state, image, config(1)))
    assert r1["status"] == "complete", r1
    assert [m["release"] for m in await live(state)] == [1]

    load = Load(edge)
    task = asyncio.create_task(load.run())
    await until(lambda: load.answers, what="the edge to answer v1")

    # v2, rolling, while requests flow: no request fails, and the answers move from v1 to v2.
    r2 = await deploy_and_wait(state, await release(state, image, config(2)))
    assert r2["status"] == "complete", r2
    await until(lambda: load.answers[-1:] == ["v2"], what="v2 answering")
    machines = await live(state)
    assert [m["release"] for m in machines] == [2]
    assert load.failures == []

    # v3's check never passes: rolled back, v2 keeps answering the whole time.
    seen = len(load.answers)
    r3 = await deploy_and_wait(state, await release(state, image, config(3, check_path="/missing", wait="3s")))
    assert r3["status"] == "rolled_back", r3
    assert "rolled back to v2: app machine " in r3["error"] and "did not pass its health checks within 3s" in r3["error"]
    assert [m["id"] for m in await live(state)] == [machines[0]["id"]]  # the same v2 machine, untouched
    await until(lambda: len(load.answers) > seen + 5, what="more answers")
    assert set(load.answers[seen:]) == {"v2"}
    assert load.failures == []

    # v4's release_command exits 3: the release fails before any machine changes.
    r4 = await deploy_and_wait(state, await release(state, image, config(4, release_command="echo migrating; exit 3")))
    assert r4["status"] == "failed" and "exited with 3" in r4["error"], r4
    assert [m["id"] for m in await live(state)] == [machines[0]["id"]]
    assert not await state.get(schema.DEPLOYS, APP)

    # v5's release_command succeeds, then the machines roll.
    r5 = await deploy_and_wait(state, await release(state, image, config(5, release_command="true")))
    assert r5["status"] == "complete", r5
    await until(lambda: load.answers[-1:] == ["v5"], what="v5 answering")
    load.stop.set()
    await task
    assert load.failures == []


async def test_a_cut_deploy_is_finished_on_the_next_start(state, platform, image):
    r1 = await deploy_and_wait(state, await release(state, image, config(1)))
    assert r1["status"] == "complete"
    rec = await release(state, image, config(2))
    await deploy.start(state, APP, rec)

    async def new_machine_made():
        return [m for m in await live(state) if m["release"] == 2]

    await until(new_machine_made, what="the v2 machine")
    await deploy.shutdown()  # the control plane goes away mid-deploy
    assert (await state.get(schema.DEPLOYS, APP))[0]["release"] == 2
    got = (await state.get(schema.RELEASES, schema.release_key(APP, 2)))[0]
    assert got["status"] == "running"

    assert await deploy.resume(state) == [APP]  # the next API start
    await deploy.wait(APP, 180)
    got = (await state.get(schema.RELEASES, schema.release_key(APP, 2)))[0]
    assert got["status"] == "complete", got
    assert [m["release"] for m in await live(state)] == [2]
    assert not await state.get(schema.DEPLOYS, APP)


async def test_first_deploy_that_fails_its_checks_leaves_nothing(state, platform, image):
    r1 = await deploy_and_wait(state, await release(state, image, config(1, check_path="/missing", wait="2s")))
    assert r1["status"] == "failed" and "no earlier release" in r1["error"], r1
    assert await live(state) == []


async def test_invalid_config_fails_the_release(state, platform, image):
    rec = await release(state, image, {"http_service": {"internal_port": "eighty"}})
    with pytest.raises(appconfig.ConfigError, match="http_service.internal_port"):
        await deploy.start(state, APP, rec)
    got = (await state.get(schema.RELEASES, schema.release_key(APP, rec["version"])))[0]
    assert got["status"] == "failed"


async def test_start_records_the_release_itself_and_refuses_before_recording(state, platform, image):
    """What the API sends: an unrecorded body. Bad input and a busy app record nothing."""
    with pytest.raises(appconfig.ConfigError):
        await deploy.start(state, APP, {"image": image, "config": {"deploy": {"strategy": "yolo"}}}, org="personal")
    with pytest.raises(deploy.InvalidInput, match="no complete release to restart"):
        await deploy.start(state, APP, {"reason": "secrets"})
    assert await state.keys(schema.RELEASES, APP + ".") == []

    rel = await deploy.start(state, APP, {"image": image, "config": config(1), "by": "tok"}, org="personal")
    assert rel["version"] == 1 and rel["status"] == "running" and rel["by"] == "tok"
    with pytest.raises(deploy.Busy):
        await deploy.start(state, APP, {"image": image, "config": config(2)})
    assert await state.keys(schema.RELEASES, APP + ".") == [schema.release_key(APP, 1)]
    await deploy.wait(APP, 180)
    assert (await state.get(schema.RELEASES, schema.release_key(APP, 1)))[0]["status"] == "complete"

    # A secrets change re-deploys the newest complete release's image and config.
    rel = await deploy.start(state, APP, {"reason": "secrets"})
    assert rel["version"] == 2 and rel["image"] == image and rel["description"] == "secrets changed"
    await deploy.wait(APP, 180)
    assert (await state.get(schema.RELEASES, schema.release_key(APP, 2)))[0]["status"] == "complete"
    assert [m["release"] for m in await live(state)] == [2]


async def test_a_missing_image_is_rolled_back_naming_the_cause(state, platform, image):
    assert (await deploy_and_wait(state, await release(state, image, config(1))))["status"] == "complete"
    [m1] = await live(state)
    r2 = await deploy_and_wait(state, await release(state, "localhost/no-such/image:1", config(2)))
    assert r2["status"] == "rolled_back", r2
    assert "rolled back to v1: machine" in r2["error"] and "failed to start" in r2["error"], r2["error"]
    assert [m["id"] for m in await live(state)] == [m1["id"]]


@pytest.mark.parametrize("strategy", ["bluegreen", "canary", "immediate"])
async def test_other_strategies_replace_the_machines(state, platform, image, strategy):
    edge = platform
    assert (await deploy_and_wait(state, await release(state, image, config(1))))["status"] == "complete"
    load = Load(edge)
    task = asyncio.create_task(load.run())
    await until(lambda: load.answers, what="v1 answering")
    r2 = await deploy_and_wait(state, await release(state, image, config(2, strategy=strategy)))
    assert r2["status"] == "complete" and r2["strategy"] == strategy, r2
    await until(lambda: load.answers[-1:] == ["v2"], what="v2 answering")
    load.stop.set()
    await task
    assert [m["release"] for m in await live(state)] == [2]
    if strategy != "immediate":  # immediate replaces everything at once, without waiting: as Fly's
        assert load.failures == []
