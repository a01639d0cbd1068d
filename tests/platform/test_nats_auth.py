"""nats-server requires authentication, per component (red team finding C1).

Before: any local user could connect to the platform's NATS without credentials,
read every org's token records, forge a platform-admin token by writing TOKENS
and run commands in any machine through agent.local.exec.
"""

from __future__ import annotations

import json
import stat

import pytest

from taxiway.platform import schema
from taxiway.platform.nats import NatsServer
from taxiway.platform.state import State, Unavailable

pytestmark = pytest.mark.anyio


async def test_a_connection_without_credentials_is_refused(nats_server: NatsServer, monkeypatch) -> None:
    monkeypatch.delenv("TAXIWAY_NATS_URL", raising=False)
    assert "@" not in nats_server.address
    with pytest.raises(Unavailable, match="refused the credentials|cannot reach"):
        await State.connect(nats_server.address, timeout=3)
    wrong = nats_server.url_for("edge").replace(nats_server.users()["edge"], "guess")
    with pytest.raises(Unavailable):
        await State.connect(wrong, timeout=3)
    for name in ("auth.json", "nats.conf"):
        assert stat.S_IMODE((nats_server.dir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(nats_server.dir.stat().st_mode) == 0o700


async def test_credentials_come_from_the_environment_for_a_bare_url(nats_server: NatsServer, monkeypatch) -> None:
    monkeypatch.setenv("TAXIWAY_NATS_URL", nats_server.url_for("api"))
    st = await State.connect(nats_server.address, timeout=3)
    try:
        await st.put(schema.APPS, "envapp", {"name": "envapp"})
    finally:
        await st.close()


async def test_the_edge_user_cannot_write_or_read_tokens_nor_command_agents(nats_server: NatsServer,
                                                                           state: State) -> None:
    await state.put(schema.TOKENS, "t1", {"org": "a", "hash": "x"})
    await state.put(schema.APPS, "web", {"name": "web", "org": "a"})
    edge = await State.connect(nats_server.url_for("edge"), timeout=3)
    try:
        # reading what it routes by works
        assert (await edge.get(schema.APPS, "web"))[0]["org"] == "a"
        with pytest.raises(Exception):
            await edge.put(schema.TOKENS, "forged", {"org": "personal", "platform": True, "scope": "admin"})
        with pytest.raises(Exception):
            await edge.put(schema.APPS, "web", {"name": "web", "org": "evil"})
        got = None
        try:
            got = await edge.get(schema.TOKENS, "t1")
        except Exception:
            pass
        assert not got
        # agent commands are refused to the edge: no responder sees the request
        seen: list = []
        async def got_one(msg) -> None:
            seen.append(msg)

        sub = await state.nc.subscribe("agent.local.exec", cb=got_one)
        with pytest.raises(Exception):
            await edge.request("agent.local.exec", {"app": "web", "id": "x", "command": ["id"]}, timeout=1)
        await state.nc.flush()
        assert seen == []
        await sub.unsubscribe()
    finally:
        await edge.close()
    assert await state.get(schema.TOKENS, "forged") is None
    assert (await state.get(schema.APPS, "web"))[0]["org"] == "a"
    # the agent user may not write tokens either
    agent = await State.connect(nats_server.url_for("agent"), timeout=3)
    try:
        with pytest.raises(Exception):
            await agent.put(schema.TOKENS, "forged", {"org": "personal", "platform": True})
    finally:
        await agent.close()
    assert await state.get(schema.TOKENS, "forged") is None


def test_credentials_survive_a_restart(tmp_path) -> None:
    srv = NatsServer(tmp_path / "n").start()
    users = dict(srv.users())
    srv.stop()
    srv2 = NatsServer(tmp_path / "n").start()
    try:
        assert srv2.users() == users
        assert json.loads((tmp_path / "n" / "auth.json").read_text()) == users
    finally:
        srv2.stop()


PARENT = r"""
import asyncio, sys, time
from taxiway.platform.nats import NatsServer
from taxiway.platform.state import State
srv = NatsServer(sys.argv[1], pdeathsig=True).start()
async def put():
    st = await State.connect(srv.url)
    await st.put("tw_apps", "kept", {"name": "kept"})
    await st.close()
asyncio.run(put())
print(srv.proc.pid, flush=True)
time.sleep(600)
"""


def test_nats_server_follows_a_kill_9d_parent_and_keeps_its_state(tmp_path) -> None:
    """Before, a kill -9'd supervisor left nats-server running until the next 'up'."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "n")], stdout=subprocess.PIPE)
    try:
        npid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while True:
            try:
                os.kill(npid, 0)
            except ProcessLookupError:
                break
            try:
                with open(f"/proc/{npid}/stat") as f:  # reaped by init soon; a zombie counts as gone
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            assert time.monotonic() < deadline, "nats-server outlived its kill -9'd parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    import asyncio

    srv = NatsServer(tmp_path / "n").start()
    try:
        async def get():
            st = await State.connect(srv.url)
            try:
                return await st.get(schema.APPS, "kept")
            finally:
                await st.close()

        assert asyncio.run(get())[0] == {"name": "kept"}
    finally:
        srv.stop()


async def test_the_edge_user_cannot_listen_to_agent_commands(nats_server: NatsServer, state: State) -> None:
    """An edge that subscribed to agent.> would get every exec's command (and could answer it)."""
    edge = await State.connect(nats_server.url_for("edge"), timeout=3)
    try:
        got: list = []

        async def cb(msg) -> None:
            got.append(msg)

        await edge.nc.subscribe("agent.local.exec", cb=cb)
        await edge.nc.flush()
        await edge.nc.flush()  # the server's -ERR for the subscription has arrived by the second PONG
        assert "permissions violation" in str(edge.nc.last_error).lower()
        with pytest.raises(Unavailable, match="nobody serves"):  # the server routes nothing to it
            await state.request("agent.local.exec", {"app": "web", "id": "x", "command": ["id"]}, timeout=2)
        assert got == []
    finally:
        await edge.close()
