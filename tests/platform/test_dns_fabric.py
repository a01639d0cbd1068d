"""``.internal`` names from inside real machines on the private network (issue 17).

The real agent makes the machines and plugs them into the fabric; the DNS server answers on
[fdaa::3]:53 inside the fabric (sockets from ``fabric.listen_socket``, as ``taxiway up``
does) and knows who asks by the machine's source address only. Each machine runs the host's
own CPython (the binary, its libraries and the few stdlib modules ``socket`` needs, copied
into an image layer), so the names go through glibc's resolver and Python's
``socket.getaddrinfo``, as an app's would. Names outside ``.internal`` go to a loopback
upstream on the host, never to the system resolver.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.dns_upstream import UPSTREAM_A, Upstream
from helpers.layout import Entry
from machines.conftest import make_image

from taxiway.platform import fabric, schema
from taxiway.platform.dnsserver import DNSConfig, DNSServer

pytestmark = pytest.mark.anyio

PYTHON = "/usr/bin/python3"

# Each instance of "web" serves its address on port 7000 and, twice a second, looks up
# web.internal, connects to every other address there and keeps what they answered in /tmp/peers.
PEER = b"""
import os, socket, threading, time
me = os.environ["FLY_PRIVATE_IP"]
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 7000))
srv.listen(16)


def serve():
    while True:
        c, _ = srv.accept()
        with c:
            c.sendall(me.encode())


threading.Thread(target=serve, daemon=True).start()
found = set()
while True:
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo("web.internal", 7000, socket.AF_INET6, socket.SOCK_STREAM)}
    except socket.gaierror:
        addrs = set()
    for a in sorted(addrs - {me}):
        try:
            with socket.create_connection((a, 7000), timeout=2) as s:
                found.add(s.recv(100).decode())
        except OSError:
            continue
        with open("/tmp/peers.new", "w") as f:
            f.write("\\n".join(sorted(found)))
        os.rename("/tmp/peers.new", "/tmp/peers")
    time.sleep(0.3)
"""

RESOLVE = ("import socket, sys\n"
           "try:\n"
           "    print(' '.join(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, 0, socket.SOCK_STREAM)})))\n"
           "except socket.gaierror as e:\n"
           "    print('gaierror', e.args[0])\n")


def python_entries() -> list[Entry]:
    """The host's CPython as an image layer: the binary, the shared libraries it links and the
    stdlib modules that ``socket``, ``os``, ``threading``, ``time`` and the idna codec (getaddrinfo encodes names
    with it) load, found by asking it."""
    out = subprocess.run([PYTHON, "-S", "-c", "import socket, os, sys, threading, time\n'x'.encode('idna')\nprint('\\n'.join(sorted("
                          "{m.__file__ for m in sys.modules.values() if getattr(m, '__file__', None)})))"],
                         capture_output=True, text=True, check=True).stdout.split()
    libs = [ln.split("=>")[-1].split("(")[0].strip() for ln in subprocess.run(
        ["ldd", PYTHON], capture_output=True, text=True, check=True).stdout.splitlines() if "/" in ln]
    real = str(Path(PYTHON).resolve())
    files = {real: 0o755, **{lib: 0o755 for lib in libs}, **{f: 0o644 for f in out}}
    dirs = {str(Path(f).parent) for f in files} | {str(Path(real).parent / "../lib/python3.11/lib-dynload")}
    dirs = {str(Path(d).resolve()) if ".." in d else d for d in dirs}
    every = set()
    for d in dirs:
        p = Path(d)
        while str(p) != "/":
            every.add(str(p))
            p = p.parent
    entries = [Entry(d.lstrip("/"), "dir") for d in sorted(every)]
    entries += [Entry(f.lstrip("/"), "file", Path(f).read_bytes(), mode=mode) for f, mode in sorted(files.items())]
    entries.append(Entry(PYTHON.lstrip("/"), "symlink", linkname=Path(real).name))
    entries += [Entry("app", "dir"), Entry("app/peer.py", "file", PEER, mode=0o644)]
    return entries


class AgentProc:
    """``python -m taxiway.platform.agent`` as a child process (its log in tmp)."""

    def __init__(self, url: str, logdir: Path):
        self.url, self.logdir = url, logdir

    def __enter__(self) -> AgentProc:
        self.log = open(self.logdir / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", self.url,
                                      "--poll", "0.2"], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def until(fn, timeout: float = 90.0, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``fn`` (sync or async) until it returns something truthy; a deadline, not a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {got!r})")
        await asyncio.sleep(0.1)


async def _ping(state):  # noqa: ANN001, ANN202
    try:
        r = await state.request(schema.agent_subject("local", "ping"), {}, timeout=2)
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return r if r.get("reconciled_at") else None


async def _status(state, app: str, mid: str, want: str = "started"):  # noqa: ANN001, ANN202
    got = await state.get(schema.STATUS, schema.machine_key(app, mid))
    st = got[0] if got else {}
    return st if st.get("state") == want and (want != "started" or st.get("private_ip")) else None


async def sh(state, app: str, mid: str, cmd: list[str]) -> tuple[int, str]:  # noqa: ANN001
    r = await state.request(schema.agent_subject("local", "exec"),
                            {"app": app, "id": mid, "cmd": cmd, "timeout": 30}, timeout=60)
    assert r.get("ok"), r
    return r["exit_code"], r["stdout"] + r["stderr"]


async def resolve(state, app: str, mid: str, name: str) -> str:  # noqa: ANN001
    """What Python's socket.getaddrinfo(name) gives inside machine ``mid``: addresses or 'gaierror N'."""
    rc, out = await sh(state, app, mid, [PYTHON, "-S", "-c", RESOLVE, name])
    assert rc == 0, out
    return out.strip()


@pytest.fixture
def machines_cleanup():  # noqa: ANN201
    yield
    from taxiway import machines

    for m in machines.all_machines():
        machines.destroy(m, force=True)


async def test_machines_find_each_other_by_internal_names(state, nats_server, platform_home, tmp_path,
                                                          machines_cleanup):  # noqa: ANN001
    image = make_image(tmp_path, "localhost/dns-test/python:1", [python_entries()])
    now = time.time()
    for app, org in (("web", "personal"), ("evil", "other")):
        await state.put(schema.APPS, app, {"name": app, "org": org, "created_at": now, "network": org})
    fab = fabric.Fabric.for_home(platform_home)
    fab.ensure()   # as `taxiway up` does before it starts the DNS server
    upstream = Upstream()
    log = open(tmp_path / "dns.log", "wb")
    server = DNSServer(DNSConfig(upstream=[("127.0.0.1", upstream.port)]), state=state, log=log,
                       sockets=[fabric.listen_socket(socket.AF_INET6, kind, "fdaa::3", 53, fab=fab)
                                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)])
    await server.start()
    ids = {"w1": schema.new_machine_id(), "w2": schema.new_machine_id(), "e1": schema.new_machine_id()}
    apps = {"w1": "web", "w2": "web", "e1": "evil"}

    async def put_machine(name: str, desired: str = "started") -> None:
        cfg = {"image": image, "cmd": [PYTHON, "-S", "/app/peer.py"] if apps[name] == "web" else ["sleep", "100000"],
               "restart": {"policy": "no"}, "stop_timeout": 1}
        rec = {"id": ids[name], "name": name, "app": apps[name], "org": None, "region": "local", "host": "local",
               "process_group": "app", "release": 1, "config": cfg, "desired": desired, "instance_id": "i1",
               "created_at": now, "updated_at": time.time()}
        await state.put(schema.MACHINES, schema.machine_key(apps[name], ids[name]), rec)

    try:
        with AgentProc(nats_server.url, tmp_path):
            await until(lambda: _ping(state), what="the agent")
            for name in ids:
                await put_machine(name)
            ip = {n: (await until(lambda n=n: _status(state, apps[n], ids[n]), what=f"{n} started"))["private_ip"]
                  for n in ids}

            # getaddrinfo inside a machine: full names, the search list's short ones, the upstream's
            both = " ".join(sorted([ip["w1"], ip["w2"]]))
            assert await resolve(state, "web", ids["w1"], "web.internal") == both
            assert await resolve(state, "web", ids["w1"], "web") == both                    # search: internal
            assert await resolve(state, "web", ids["w1"], f"{ids['w2']}.vm") == ip["w2"]     # search: web.internal
            assert await resolve(state, "web", ids["w1"], "top1.nearest.of.web.internal") in (ip["w1"], ip["w2"])
            assert await resolve(state, "web", ids["w1"], "example.test") == UPSTREAM_A     # forwarded
            # the two instances of web found each other through web.internal, each from its own program
            async def peers(name: str) -> str:
                rc, out = await sh(state, "web", ids[name], ["cat", "/tmp/peers"])
                return out.strip() if rc == 0 else ""

            assert await until(lambda: peers("w1"), what="w1 found w2") == ip["w2"]
            assert await until(lambda: peers("w2"), what="w2 found w1") == ip["w1"]

            # another org: web's names do not exist for evil, its own do
            assert (await resolve(state, "evil", ids["e1"], "web.internal")).startswith("gaierror")
            assert (await resolve(state, "evil", ids["e1"], f"{ids['w1']}.vm.web.internal")).startswith("gaierror")
            assert await resolve(state, "evil", ids["e1"], "evil.internal") == ip["e1"]

            # a stopped instance leaves the answers; started again, it is back
            await put_machine("w2", "stopped")
            await until(lambda: _status(state, "web", ids["w2"], "stopped"), what="w2 stopped")

            async def web_seen_by_w1() -> str:
                return await resolve(state, "web", ids["w1"], "web.internal")

            await until(lambda: _eq(web_seen_by_w1(), ip["w1"]), what="w2 gone from web.internal")
            await put_machine("w2", "started")
            await until(lambda: _eq(web_seen_by_w1(), both), what="w2 back in web.internal")
    except BaseException:
        # what the agent and the DNS server saw, for whoever reads the failure
        for name in ("agent.log", "dns.log"):
            with open(tmp_path / name, "rb") as f:
                print(f"--- {name}", *f.read().decode(errors="replace").splitlines()[-40:], sep="\n")
        raise
    finally:
        await server.close()
        log.close()
        upstream.close()
        fab.teardown()
    assert "example.test" in upstream.queries


async def _eq(coro, want: str) -> bool:  # noqa: ANN001
    return (await coro) == want
