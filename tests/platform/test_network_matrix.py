"""The private network end to end: real machines made by the real agent, plugged into the fabric.

Two orgs ("personal": apps web and api; "other": app evil), four busybox machines, each
listening on two TCP ports with ``nc``; every probe runs INSIDE a machine (agent exec of busybox
``nc``), so what is tested is what an app sees. The reachability matrix: same org all ports open
both ways (also across apps), another org refused both ways, fdaa::3 open only on 53/3128/4280,
IPv4 to the host refused, and a machine that forges another's source address gets nothing
through. Everything happens inside network namespaces the platform makes under the test's home.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from machines.conftest import BUSYBOX, make_image

from taxiway.platform import fabric, network, schema

pytestmark = pytest.mark.anyio

PORTS = (8080, 31337)
SERVE = ["sh", "-c", "nc -ll -p 8080 -e /bin/echo hi8080 & nc -ll -p 31337 -e /bin/echo hi31337 & exec sleep 100000"]


class AgentProc:
    def __init__(self, url: str, logdir: Path):
        self.url, self.logdir = url, logdir

    def __enter__(self) -> AgentProc:
        self.log = open(self.logdir / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", self.url,
                                      "--poll", "0.2"], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def kill9_and_restart(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def until(fn, timeout: float = 90.0, what: str = "condition"):
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


async def _ping(state):
    try:
        r = await state.request(schema.agent_subject("local", "ping"), {}, timeout=2)
    except Exception:
        return None
    return r if r.get("reconciled_at") else None


async def _started(state, app, mid):
    got = await state.get(schema.STATUS, schema.machine_key(app, mid))
    st = got[0] if got else {}
    return st if st.get("state") == "started" and st.get("private_ip") else None


async def sh(state, app: str, mid: str, script: str) -> tuple[int, str]:
    r = await state.request(schema.agent_subject("local", "exec"),
                            {"app": app, "id": mid, "cmd": ["sh", "-c", script], "timeout": 30}, timeout=60)
    assert r.get("ok"), r
    return r["exit_code"], r["stdout"] + r["stderr"]


async def connect(state, app: str, mid: str, addr: str, port: int) -> str:
    """From inside machine ``mid``: 'open' (the listener answered), 'refused', or the error text."""
    rc, out = await sh(state, app, mid, f"nc -w 5 {addr} {port} </dev/null")
    if rc == 0 and f"hi{port}" in out:
        return "open"
    if "refused" in out.lower():
        return "refused"
    return out.strip() or f"exit {rc}"


async def probe(state, app: str, mid: str, targets: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """:func:`connect` to many targets in one exec (one helper process instead of one per target)."""
    script = "; ".join(f"echo '@@ {addr} {port}'; nc -w 5 {addr} {port} </dev/null 2>&1; echo rc=$?"
                       for addr, port in targets)
    _, out = await sh(state, app, mid, script)
    got = {}
    for chunk in out.split("@@ ")[1:]:
        head, _, body = chunk.partition("\n")
        addr, port = head.split()
        if "rc=0" in body and f"hi{port}" in body:
            got[(addr, int(port))] = "open"
        elif "refused" in body.lower():
            got[(addr, int(port))] = "refused"
        else:
            got[(addr, int(port))] = body.strip()
    return got


@pytest.fixture
def machines_cleanup():
    yield
    from taxiway import machines

    for m in machines.all_machines():
        machines.destroy(m, force=True)


async def test_reachability_matrix(state, nats_server, platform_home, tmp_path, machines_cleanup):
    image = make_image(tmp_path, BUSYBOX)
    now = time.time()
    for app, org in (("web", "personal"), ("api", "personal"), ("evil", "other")):
        await state.put(schema.APPS, app, {"name": app, "org": org, "created_at": now, "network": org})
    layout = {"w1": "web", "w2": "web", "a1": "api", "e1": "evil"}
    ids = {name: schema.new_machine_id() for name in layout}
    host_srv = socket.create_server(("127.0.0.1", 0))  # a host service on loopback: machines must not reach it
    host_port = host_srv.getsockname()[1]
    fab = fabric.Fabric.for_home(platform_home)
    with AgentProc(nats_server.url, tmp_path) as agent, host_srv:
        await until(lambda: _ping(state), what="the agent")
        for name, app in layout.items():
            mid = ids[name]
            cfg = {"image": image, "cmd": SERVE, "env": {"HTTP_PROXY": "http://tenant-choice:1"},
                   "restart": {"policy": "no"}, "stop_timeout": 1}
            rec = {"id": mid, "name": name, "app": app, "org": None, "region": "local", "host": "local",
                   "process_group": "app", "release": 1, "config": cfg, "desired": "started", "instance_id": "i1",
                   "created_at": now, "updated_at": now}
            await state.put(schema.MACHINES, schema.machine_key(app, mid), rec)
        st = {name: await until(lambda n=name: _started(state, layout[n], ids[n]), what=f"{name} started")
              for name in layout}
        ip = {name: s["private_ip"] for name, s in st.items()}

        # addresses follow the layout: org network, host 1, distinct machine fields
        personal = await state.get(schema.NETWORKS, "org.personal")
        other = await state.get(schema.NETWORKS, "org.other")
        assert personal[0]["network"] == 1 and other[0]["network"] not in (None, 1)
        for name, addr in ip.items():
            a = network.parse(addr)
            want = 1 if layout[name] != "evil" else other[0]["network"]
            assert a is not None and a.org == want and a.host == 1, (name, addr)
        assert len({network.parse(a).field for a in ip.values()}) == 4

        # what a machine sees: its address on eth0, no IPv4 but lo, routes only via the fabric,
        # resolv.conf and proxy variables of the platform (the tenant's HTTP_PROXY overridden)
        rc, out = await sh(state, "web", ids["w1"], "ip -6 addr show dev eth0; ip -4 addr; echo ROUTES4; ip -4 route;"
                                                    " echo ROUTES6; ip -6 route; cat /etc/resolv.conf /etc/hosts; env")
        assert rc == 0, out
        assert f"inet6 {ip['w1']}/128" in out
        v4 = out.split("ROUTES4")[0]
        assert "inet 127.0.0.1/8" in v4 and v4.count("inet ") == 1, out
        assert out.split("ROUTES4")[1].split("ROUTES6")[0].strip() == ""
        assert "default via fe80::1 dev eth0" in out
        assert "nameserver fdaa::3" in out and "search web.internal internal" in out
        assert f"{ip['w1']}\t{ids['w1']}" in out
        assert "HTTP_PROXY=http://[fdaa::3]:3128" in out and "tenant-choice" not in out
        assert "NO_PROXY=.internal,localhost,127.0.0.1,::1,fdaa:0:1::/48" in out
        assert f"FLY_PRIVATE_IP={ip['w1']}" in out

        # the matrix (every pair, both directions, two ports each)
        for src in layout:
            targets = [(ip[dst], port) for dst in layout if dst != src for port in PORTS]
            got = await probe(state, layout[src], ids[src], targets)
            assert len(got) == len(targets), got
            for dst in layout:
                same = (layout[src] == "evil") == (layout[dst] == "evil")
                for port in PORTS if dst != src else ():
                    assert got[(ip[dst], port)] == ("open" if same else "refused"), (src, dst, port, got)

        # the platform's address: only 53, 3128, 4280 (services bound inside the fabric here)
        listeners = [fabric.listen_socket(socket.AF_INET6, socket.SOCK_STREAM, "fdaa::3", p, fab=fab)
                     for p in (53, 3128, 4280, 5000)]

        def answer(listener: socket.socket) -> None:  # says hello and hangs up, so nc ends
            while True:
                try:
                    c, _ = listener.accept()
                except OSError:
                    return
                with c:
                    c.sendall(b"hello\n")

        for s in listeners:
            threading.Thread(target=answer, args=(s,), daemon=True).start()
        try:
            for port, want in ((53, True), (3128, True), (4280, True), (5000, False), (22, False), (8080, False)):
                rc, out = await sh(state, "evil", ids["e1"], f"nc -w 5 fdaa::3 {port} </dev/null; echo rc=$?")
                assert ("rc=0" in out) == want and (want or "refused" in out.lower()), (port, out)
        finally:
            for s in listeners:
                s.close()
        # the fabric's own link-local end and other fabric addresses: refused too
        rc, out = await sh(state, "web", ids["w1"], "nc -w 5 fe80::1%eth0 4280 </dev/null; echo rc=$?")
        assert "rc=0" not in out, out

        # IPv4 to the host: the host's loopback service is not the machine's loopback
        rc, out = await sh(state, "web", ids["w1"], f"nc -w 5 127.0.0.1 {host_port} </dev/null; echo rc=$?")
        assert "rc=0" not in out and "refused" in out.lower(), out

        # forging: evil takes w2's address (root on the host does it: a machine has no NET_ADMIN),
        # sends from it to w1 (same org as w2) and gets nothing through; from its own address it is
        # refused as before, and its real address still works for the fabric
        e1_ns = fab.machine_path(ids["e1"])
        subprocess.run(["nsenter", f"--net={e1_ns}", "ip", "addr", "add", f"{ip['w2']}/128", "dev", "eth0", "nodad"],
                       check=True)

        def forged(src: str, dst: str, port: int) -> str:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.bind((src, 0))
                s.connect((dst, port))
                return "connected"
            except TimeoutError:
                return "nothing"
            except OSError as e:
                return e.strerror or str(e)
            finally:
                s.close()

        assert fabric.run_in(e1_ns, forged, ip["w2"], ip["w1"], 8080) == "nothing"
        assert fabric.run_in(e1_ns, forged, ip["w2"], "fdaa::3", 4280) == "nothing"
        assert fabric.run_in(e1_ns, forged, ip["e1"], ip["w1"], 8080) == "Connection refused"
        # w2 itself, unaffected, still reaches w1
        assert await connect(state, "web", ids["w2"], ip["w1"], 8080) == "open"
        subprocess.run(["nsenter", f"--net={e1_ns}", "ip", "addr", "del", f"{ip['w2']}/128", "dev", "eth0"], check=True)

        # a recreate (new instance_id: a deploy's update) keeps the address and the reachability
        rec = (await state.get(schema.MACHINES, schema.machine_key("web", ids["w1"])))[0]
        await state.put(schema.MACHINES, schema.machine_key("web", ids["w1"]), {**rec, "instance_id": "i2"})

        async def recreated():
            s = await _started(state, "web", ids["w1"])
            return s if s and s.get("instance_id") == "i2" else None

        assert (await until(recreated, what="w1 recreated"))["private_ip"] == ip["w1"]
        assert (await probe(state, "api", ids["a1"], [(ip["w1"], 8080)]))[(ip["w1"], 8080)] == "open"

        # kill -9 of the agent: the next one adopts the machines with their network as it was
        agent.kill9_and_restart()
        await until(lambda: _ping(state), what="the restarted agent")
        for name in ("w1", "e1"):
            again = await until(lambda n=name: _started(state, layout[n], ids[n]), what=f"{name} adopted")
            assert again["private_ip"] == ip[name]
        assert await connect(state, "web", ids["w1"], ip["a1"], 8080) == "open"
        assert await connect(state, "evil", ids["e1"], ip["w1"], 8080) == "refused"

        # destroy unplugs: the namespace file, the veth and its rules go
        mid = ids["a1"]
        rec = (await state.get(schema.MACHINES, schema.machine_key("api", mid)))[0]
        await state.put(schema.MACHINES, schema.machine_key("api", mid), {**rec, "desired": "destroyed"})
        await until(lambda: mid not in fab.plugged(), what="a1 unplugged")
        rules = subprocess.run(["nsenter", f"--net={fab.path}", "ip6tables-save"], capture_output=True, text=True).stdout
        assert f"tw:{mid}" not in rules and f"tw:{ids['w1']}" in rules
