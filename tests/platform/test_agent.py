"""The host agent against a real nats-server and real machines of a busybox image.

The agent runs as its own process (``python -m taxiway.platform.agent``), as ``taxiway up``
runs it, so kill -9 means what it says. Deadlines below are only there to fail instead of
hanging; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from machines.conftest import BUSYBOX, make_image

from taxiway.platform import schema
from taxiway.platform.agent import decide, machine_config

pytestmark = pytest.mark.anyio

HTTPD = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; echo serving; exec httpd -f -p 8080 -h /www"]


# -- the pure core ---------------------------------------------------------------------------------


def test_decide():
    want = {"desired": "started", "instance_id": "i1"}
    row = {"instance_id": "i1", "acted_rev": 5}
    run = {"state": "running", "orphan": False}
    exited = {"state": "exited", "orphan": False}
    assert decide(want, 1, None, None) == ["create", "start"]
    assert decide({**want, "desired": "stopped"}, 1, None, None) == ["create"]
    assert decide(want, 5, row, None) == ["create", "start"]          # the local machine vanished
    assert decide(want, 5, row, run) == []                            # adopted as it is
    assert decide(want, 5, row, exited) == []                         # stopped on its own: restart policy had its say
    assert decide(want, 6, row, exited) == ["start"]                  # asked again since
    assert decide(want, 5, row, {"state": "exited", "orphan": True}) == ["start"]  # its supervisor vanished
    assert decide(want, 5, row, {"state": "created", "orphan": False}) == ["start"]
    assert decide({**want, "instance_id": "i2"}, 6, row, run) == ["recreate", "start"]
    assert decide({**want, "desired": "stopped"}, 6, row, run) == ["stop"]
    assert decide({**want, "desired": "destroyed"}, 6, row, run) == ["destroy"]
    assert decide(None, 0, row, None) == ["destroy"]
    assert decide(None, 0, None, None) == []


@given(st.sampled_from(["started", "stopped", "destroyed", None]), st.integers(0, 9),
       st.one_of(st.none(), st.fixed_dictionaries({"instance_id": st.sampled_from(["i1", "i2"]),
                                                   "acted_rev": st.integers(0, 9)})),
       st.one_of(st.none(), st.fixed_dictionaries({"state": st.sampled_from(
           ["created", "starting", "running", "stopping", "exited", "failed"]), "orphan": st.booleans()})))
def test_decide_properties(target, rev, row, local):
    """Whatever the inputs: never start and stop at once, destroy alone, nothing made for a machine
    that should not exist, and a machine that runs as wanted is left alone."""
    desired = None if target is None else {"desired": target, "instance_id": "i1"}
    acts = decide(desired, rev, row, local)
    assert not ({"start", "stop"} <= set(acts))
    assert acts == ["destroy"] or "destroy" not in acts
    if target in (None, "destroyed"):
        assert acts in ([], ["destroy"])
    if row and local and row["instance_id"] == "i1" and target == "started" and \
            local["state"] == "running" and not local["orphan"]:
        assert acts == []
    assert len(acts) == len(set(acts))


def test_machine_config(tmp_path):
    rec = {"id": "m1", "config": {"image": "img:1", "env": {"A": "1"}, "guest": {"memory_mb": 256, "cpus": 1},
                                  "services": [{"internal_port": 8080}], "checks": {}, "metadata": {"release": 1},
                                  "mounts": [{"volume": "vol_1", "path": "/data"}],
                                  "restart": {"policy": "on-failure", "max_retries": 2}}}
    cfg = machine_config(rec, {8080: 40000}, {"SECRET": "s"}, tmp_path)
    assert cfg["env"] == {"A": "1", "SECRET": "s"}
    assert cfg["guest"] == {"memory": 256 << 20, "cpus": 1}
    assert cfg["ports"] == [{"host_port": 40000, "port": 8080, "host": "127.0.0.1"}]
    assert cfg["mounts"] == [{"type": "ext4-image", "source": str(tmp_path / "vol_1.img"), "target": "/data",
                              "readonly": False}]
    assert cfg["restart"] == {"policy": "on-failure", "max_retries": 2}
    assert "services" not in cfg and "metadata" not in cfg
    from taxiway import machines

    machines.MachineConfig.from_json(cfg)  # the runtime takes it as it is


def test_record_persists_what_it_caches(tmp_path):
    from taxiway.platform.agent import Record

    r = Record(tmp_path / "a" / "agent.sqlite")
    r.put({"id": "m1", "app": "web", "region": "local", "ports": {8080: 40000}})
    r.put({"id": "m2", "app": "web", "region": "local"})
    r.set("m1", local_id="L1", log_offset=12, ports={8080: 40001, 9000: 40002})
    r.delete("m2")
    cached = r.all()
    r.close()
    again = Record(tmp_path / "a" / "agent.sqlite")
    assert again.all() == cached
    row = again.get("m1")
    assert (row["local_id"], row["log_offset"], row["ports"], row["restarts"]) == ("L1", 12, {8080: 40001, 9000: 40002}, 0)
    assert again.get("m2") is None
    again.close()


def test_log_following_survives_rotation_and_partial_lines(tmp_path):
    """What the agent ships is read from (inode, offset): a rotation (log -> log.1) loses nothing,
    and a line still being written waits for its newline."""
    from taxiway.platform.agent import _read_new

    log = tmp_path / "log"
    log.write_bytes(b"t stdout one\nt stdout tw")
    lines, ino, off = _read_new(log, None, 0)
    assert lines == [b"t stdout one"] and off == len(b"t stdout one\n")
    with open(log, "ab") as f:
        f.write(b"o\nt stdout three\n")
    log.rename(tmp_path / "log.1")  # rotated before we read again
    log.write_bytes(b"t stderr four\n")
    lines, ino2, off = _read_new(log, ino, off)
    assert lines == [b"t stdout two", b"t stdout three", b"t stderr four"] and ino2 != ino
    assert _read_new(log, ino2, off)[0] == []
    assert _read_new(tmp_path / "absent", None, 0)[0] == []


# -- helpers ----------------------------------------------------------------------------------------


class AgentProc:
    """``python -m taxiway.platform.agent`` as a child process (its log in tmp)."""

    def __init__(self, url: str, logdir: Path):
        self.url, self.logdir, self.proc = url, logdir, None

    def start(self) -> AgentProc:
        self.log = open(self.logdir / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", self.url,
                                      "--poll", "0.2"], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def until(fn, timeout: float = 60.0, what: str = "condition"):
    """Poll ``fn`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def ping(state):
    try:
        r = await state.request(schema.agent_subject("local", "ping"), {}, timeout=2)
    except Exception:
        return None
    return r if r.get("reconciled_at") else None


async def status(state, app, mid):
    got = await state.get(schema.STATUS, schema.machine_key(app, mid))
    return got[0] if got else None


def record(app: str, mid: str, config: dict, desired: str = "started", instance: str = "i1") -> dict:
    return {"id": mid, "name": mid, "app": app, "org": "personal", "region": "local", "host": "local",
            "process_group": "app", "release": 1, "config": config, "desired": desired, "instance_id": instance,
            "created_at": time.time(), "updated_at": time.time()}


async def put(state, rec: dict) -> None:
    await state.put(schema.MACHINES, schema.machine_key(rec["app"], rec["id"]), rec)


async def cmd(state, verb: str, app: str, mid: str, **extra) -> dict:
    r = await state.request(schema.agent_subject("local", verb), {"app": app, "id": mid, **extra}, timeout=120)
    assert r.get("ok"), r
    return r


def web_config(image: str, **extra) -> dict:
    return {"image": image, "cmd": HTTPD, "services": [{"internal_port": 8080, "protocol": "tcp", "checks": [
        {"type": "http", "path": "/index.html", "interval": 0.3, "timeout": 2, "grace_period": 0}]}],
        "checks": {"missing": {"type": "http", "port": 8080, "path": "/missing", "interval": 0.3}},
        "metadata": {"release": 1, "process_group": "app"}, "stop_timeout": 2, **extra}


@pytest.fixture
def image(platform_home, tmp_path) -> str:
    return make_image(tmp_path, BUSYBOX)


@pytest.fixture
def agent(nats_server, tmp_path, platform_home):
    procs: list[AgentProc] = []

    def start() -> AgentProc:
        a = AgentProc(nats_server.url, tmp_path).start()
        procs.append(a)
        return a

    yield start
    for a in procs:
        a.stop()
    from taxiway import (
        machines,  # the agent leaves machines running by design: the test removes them
    )

    for m in machines.all_machines():
        machines.destroy(m, force=True)


# -- lifecycle --------------------------------------------------------------------------------------


async def test_lifecycle_status_events_logs_checks(state, agent, image):
    agent()
    await until(lambda: ping(state), what="the agent")
    app, mid = "web", schema.new_machine_id()
    from taxiway.platform import secrets

    sealed = secrets.record(app, "DB_PASSWORD", "s3cret value", secrets.load_key())
    await state.put(schema.SECRETS, schema.secret_key(app, "DB_PASSWORD"), sealed)
    await put(state, record(app, mid, web_config(image, env={"PLAIN": "yes"})))
    st = (await cmd(state, "create", app, mid))["status"]
    assert st["state"] == "started" and st["instance_id"] == "i1" and st["pid"]
    port = st["ports"]["8080"]
    r = httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False, timeout=10)
    assert r.text == "hello\n"

    # checks: one entry per configured check; the passing one passes, the 404 one is critical
    def checks_settled(s):
        c = (s or {}).get("checks") or {}
        return c.get("servicecheck-00-00", {}).get("status") == "passing" and \
            c.get("missing", {}).get("output", "").startswith("404")

    s = await until(lambda: _and(status(state, app, mid), checks_settled), what="checks")
    assert s["checks"]["missing"]["status"] == "critical"

    logs = await until(lambda: _lines(state, app, mid), what="logs")
    assert "serving" in [x["line"] for x in logs] and logs[0]["machine"] == mid

    # stop (desired written first, as the API does), start, exec
    await put(state, record(app, mid, web_config(image), desired="stopped"))
    st = (await cmd(state, "stop", app, mid))["status"]
    assert st["state"] == "stopped" and st["pid"] is None
    s = await until(lambda: _and(status(state, app, mid),
                                 lambda s: all(c["status"] == "critical" for c in s["checks"].values())
                                 and len(s["checks"]) == 2), what="checks critical once stopped")
    await put(state, record(app, mid, web_config(image)))
    st = (await cmd(state, "start", app, mid))["status"]
    assert st["state"] == "started" and st["ports"]["8080"] == port  # the host port is kept
    r = await cmd(state, "exec", app, mid, cmd=["cat", "/www/index.html"])
    assert (r["exit_code"], r["stdout"]) == (0, "hello\n")
    r = await cmd(state, "exec", app, mid, cmd=["sh", "-c", "echo oops >&2; exit 4"])
    assert (r["exit_code"], r["stderr"]) == (4, "oops\n")
    r = await cmd(state, "exec", app, mid, cmd=["sh", "-c", 'echo "$PLAIN $DB_PASSWORD"'])
    assert r["stdout"] == "yes s3cret value\n"  # secrets unsealed into the environment
    r = await cmd(state, "exec", app, mid, cmd=["sh", "-c", "exit 125"])
    assert r["exit_code"] == 125  # the command's own code, not taken for the agent's failure
    listed = (await cmd(state, "list", app, mid))["machines"]
    assert [m["id"] for m in listed] == [mid]

    await put(state, record(app, mid, web_config(image), desired="stopped"))
    await cmd(state, "stop", app, mid)
    r = await state.request(schema.agent_subject("local", "exec"), {"app": app, "id": mid, "cmd": ["true"]})
    assert r["ok"] is False and "not running" in r["error"], r

    # destroy
    await put(state, record(app, mid, web_config(image), desired="destroyed"))
    st = (await cmd(state, "destroy", app, mid))["status"]
    assert st["state"] == "destroyed"
    from taxiway import machines

    assert [m for m in machines.all_machines() if m.name == f"tw-{mid}"] == []
    evs = [e["type"] for e in await state.fetch_stream(schema.events_subject(app, mid))]
    for t in ("launch", "create", "start", "stop", "exit", "destroy"):
        assert t in evs, evs
    assert evs.index("launch") < evs.index("start") < evs.index("exit") < evs.index("destroy")

    # bad input: one clear error
    r = await state.request(schema.agent_subject("local", "start"), {"app": app, "id": "00000000000000"})
    assert r["ok"] is False and "no machine" in r["error"]
    await put(state, record(app, "11111111111111", {"image": "localhost/none/such:1", "cmd": ["true"]}))
    r = await state.request(schema.agent_subject("local", "create"), {"app": app, "id": "11111111111111"}, timeout=120)
    assert r["ok"] is False and r["error"]
    assert (await status(state, app, "11111111111111"))["state"] == "failed"


async def _and(coro, pred):
    v = await coro
    return v if v and pred(v) else None


async def _lines(state, app, mid, want: int = 1):
    got = await state.fetch_stream(schema.logs_subject(app, "local", mid))
    return got if len(got) >= want else None


async def test_restart_policy_on_failure_with_limit(state, agent, image):
    agent()
    await until(lambda: ping(state), what="the agent")
    app, mid = "crash", schema.new_machine_id()
    cfg = {"image": image, "cmd": ["sh", "-c", "echo run; exit 3"],
           "restart": {"policy": "on-failure", "max_retries": 2}}
    await put(state, record(app, mid, cfg))
    await cmd(state, "create", app, mid)
    s = await until(lambda: _and(status(state, app, mid),
                                 lambda s: s["state"] == "stopped" and s["restarts"] == 2), what="retries used up")
    assert s["exit_code"] == 3
    evs = await until(lambda: _events(state, app, mid, "restart", 2), what="restart events")
    assert [e["attempt"] for e in evs if e["type"] == "restart"] == [1, 2]
    logs = await until(lambda: _lines(state, app, mid, 3), what="three runs' logs")
    assert [x["line"] for x in logs] == ["run"] * 3
    await asyncio.sleep(1.5)  # the agent itself does not start it again: the policy gave up
    assert (await status(state, app, mid))["restarts"] == 2


async def _events(state, app, mid, typ, n):
    evs = await state.fetch_stream(schema.events_subject(app, mid))
    return evs if sum(e["type"] == typ for e in evs) >= n else None


# -- kill -9 and adoption ----------------------------------------------------------------------------


async def test_kill9_agent_machines_keep_running_and_are_adopted(state, agent, image):
    a = agent()
    await until(lambda: ping(state), what="the agent")
    app, mid = "keep", schema.new_machine_id()
    await put(state, record(app, mid, web_config(image)))
    st = (await cmd(state, "create", app, mid))["status"]
    pid, port = st["pid"], st["ports"]["8080"]
    await until(lambda: _and(status(state, app, mid),
                             lambda s: s["checks"].get("servicecheck-00-00", {}).get("status") == "passing"),
                what="check passing")
    a.kill9()
    os.kill(pid, 0)  # still running
    assert httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False, timeout=10).text == "hello\n"
    before = await status(state, app, mid)

    agent()
    await until(lambda: ping(state), what="the restarted agent")
    s = await status(state, app, mid)
    assert (s["state"], s["pid"], s["restarts"]) == ("started", pid, 0)  # adopted, not restarted
    assert "adopted" in [e["type"] for e in await state.fetch_stream(schema.events_subject(app, mid))]
    # its checks run again and keep reporting
    await until(lambda: _and(status(state, app, mid),
                             lambda s: s["checks"]["servicecheck-00-00"]["updated_at"]
                             > before["checks"]["servicecheck-00-00"]["updated_at"]
                             and s["checks"]["servicecheck-00-00"]["status"] == "passing"),
                what="checks after adoption")
    # the new agent reports what happens next, and commands work on the adopted machine
    os.kill(pid, signal.SIGKILL)  # the machine's own process dies: its status follows
    await until(lambda: _and(status(state, app, mid), lambda s: s["state"] == "stopped"), what="stopped")
    await put(state, record(app, mid, web_config(image)))  # asked again: the watch starts it
    s = await until(lambda: _and(status(state, app, mid), lambda s: s["state"] == "started" and s["pid"] != pid),
                    what="started again by the watch")
    logs = [x["line"] for x in await state.fetch_stream(schema.logs_subject(app, "local", mid))]
    assert logs.count("serving") == 2  # once per run: nothing shipped twice across the agent restart


async def test_reconcile_many_after_restart(state, agent, image):
    """Records written while no agent runs: started ones are created and started, stopped ones only
    created, destroyed ones removed; after a kill -9 and restart every running one is adopted."""
    n = int(os.environ.get("TAXIWAY_TEST_AGENT_MACHINES", "12"))
    app = "many"
    ids = [schema.new_machine_id() for _ in range(n)]
    sleep = {"image": image, "cmd": ["sleep", "3600"], "stop_timeout": 1}
    for i, mid in enumerate(ids):
        await put(state, record(app, mid, sleep, desired="stopped" if i % 4 == 3 else "started"))
    a = agent()
    await until(lambda: ping(state), timeout=600, what="the first reconcile")
    sts = {mid: await status(state, app, mid) for mid in ids}
    assert {mid for mid, s in sts.items() if s["state"] == "started"} == {m for i, m in enumerate(ids) if i % 4 != 3}
    assert {mid for mid, s in sts.items() if s["state"] == "created"} == {m for i, m in enumerate(ids) if i % 4 == 3}
    pids = {mid: s["pid"] for mid, s in sts.items()}

    a.kill9()
    await put(state, record(app, ids[0], sleep, desired="destroyed"))
    agent()
    r = await until(lambda: ping(state), timeout=600, what="the second reconcile")
    assert r["machines"] == n - 1
    assert (await status(state, app, ids[0]))["state"] == "destroyed"
    for mid in ids[1:]:
        s = await status(state, app, mid)
        assert s["pid"] == pids[mid] and s["restarts"] == 0, (mid, s)


async def test_nats_server_restart_agent_carries_on(nats_server, agent, image):
    """nats-server stopped and started again (same store): the agent reconnects, its watch and its
    commands work again, and the machine kept running meanwhile."""
    from taxiway.platform.state import State

    st = await State.connect(nats_server.url)
    try:
        agent()
        await until(lambda: ping(st), what="the agent")
        app, mid = "steady", schema.new_machine_id()
        await put(st, record(app, mid, {"image": image, "cmd": ["sleep", "3600"], "stop_timeout": 1}))
        pid = (await cmd(st, "create", app, mid))["status"]["pid"]
    finally:
        await st.close()
    nats_server.stop()
    os.kill(pid, 0)
    nats_server.start()
    st = await State.connect(nats_server.url)
    try:
        await until(lambda: ping(st), what="the agent after the restart")
        await put(st, record(app, mid, {"image": image, "cmd": ["sleep", "3600"], "stop_timeout": 1}, desired="stopped"))
        s = await until(lambda: _and(status(st, app, mid), lambda s: s["state"] == "stopped"), what="the watch")
        assert s["exit_code"] is not None
        st2 = (await cmd(st, "start", app, mid))["status"]
        assert st2["state"] == "started" and st2["pid"] != pid
    finally:
        await st.close()


async def test_create_pulls_a_missing_image_from_the_registry(state, agent, registry, platform_home, tmp_path):
    """An image not in the local store is pulled first (loopback registry, credentials from the agent's file)."""
    import json

    from helpers.layout import busybox_entries, make_layer, skopeo_push, write_layout

    ref = f"{registry.address}/agent-test/busybox:{schema.new_machine_id()}"
    write_layout(tmp_path / "layout", [make_layer(busybox_entries())], "t")
    skopeo_push(tmp_path / "layout", "t", ref)
    auth = platform_home / "platform" / "agent" / "registry-auth.json"
    auth.parent.mkdir(parents=True, exist_ok=True)
    # the older file shape: one org's credential, used for that org's machines only (record() is org personal)
    auth.write_text(json.dumps({"auths": {registry.address: {"username": "personal", "password": "pull"}}}))
    auth.chmod(0o600)
    agent()
    await until(lambda: ping(state), what="the agent")
    app, mid = "pulled", schema.new_machine_id()
    await put(state, record(app, mid, {"image": ref, "cmd": ["sleep", "3600"], "stop_timeout": 1}))
    assert (await cmd(state, "create", app, mid))["status"]["state"] == "started"
    r = await cmd(state, "exec", app, mid, cmd=["echo", "pulled"])
    assert (r["exit_code"], r["stdout"]) == (0, "pulled\n")  # ran inside the pulled image
    from taxiway.oci.store import Store

    # now in the local store, under the org's own name (another org's machine never finds it there)
    Store().image(ref.replace(f"{registry.address}/", f"{registry.address}/personal/"))


async def test_new_instance_recreates_keeping_volume_and_port(state, agent, image, platform_home):
    """A new instance_id (a deploy, a secrets change) recreates the machine with the new config:
    same platform id and host port, a new process, the volume's files kept."""
    agent()
    await until(lambda: ping(state), what="the agent")
    app, mid = "vol", schema.new_machine_id()
    vid = "vol_0123456789abcdef"  # only a volume of the app's own may be mounted
    await state.put(schema.VOLUMES, schema.volume_key(app, vid), {"id": vid, "app": app, "name": "data",
                                                                  "size": 1 << 30, "host": "local"})
    cfg = web_config(image, mounts=[{"volume": vid, "path": "/data"}])
    await put(state, record(app, mid, cfg))
    st = (await cmd(state, "create", app, mid))["status"]
    r = await cmd(state, "exec", app, mid, cmd=["sh", "-c", "echo kept > /data/f"])
    assert r["exit_code"] == 0, r
    # the volume is an ext4 file mounted inside the machine only (tests/platform/test_volumes.py)
    assert (platform_home / "platform/volumes/vol/vol_0123456789abcdef.img").is_file()

    await put(state, record(app, mid, web_config(image, env={"V": "2"}, mounts=cfg["mounts"]), instance="i2"))
    new = (await cmd(state, "restart", app, mid, update=True))["status"]
    assert new["instance_id"] == "i2" and new["state"] == "started"
    assert new["pid"] != st["pid"] and new["local_id"] != st["local_id"]
    assert new["ports"] == st["ports"]
    r = await cmd(state, "exec", app, mid, cmd=["sh", "-c", 'cat /data/f; echo "$V"'])
    assert r["stdout"] == "kept\n2\n"
    evs = [e["type"] for e in await state.fetch_stream(schema.events_subject(app, mid))]
    assert "update" in evs
