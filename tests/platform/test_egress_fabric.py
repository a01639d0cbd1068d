"""Egress only through the proxy, from inside real machines on the private network (issue 17).

The real agent makes two machines (apps "open" without [egress], "tight" allowing only
ok.test) plugged into the host's fabric; the real egressd listens on [fdaa::3]:3128 inside it.
Inside the machines: curl and Python's urllib (the host's binaries, their libraries and the
stdlib modules urllib needs, in the image) and busybox wget use the HTTP_PROXY/http_proxy the
agent set. The "internet" is a loopback test server
(127.0.0.2) reached by test names through a loopback test DNS server, which only the proxy
(on the host) can reach; trap servers on internal loopback addresses must never get a
connection, and nothing a machine does without the proxy reaches anything at all.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from egress.conftest import ALLOWED, LoopbackDNS, Traps, Upstream
from helpers.layout import Entry
from helpers.servers import free_port, serve
from machines.conftest import make_image

from taxiway.platform import appconfig, fabric, schema

pytestmark = pytest.mark.anyio

IMAGE = "localhost/egress-test/curl:1"


PYTHON = os.path.realpath("/usr/bin/python3")  # Debian's; its stdlib is under /usr/lib/python3.X
PY_MODULES = "urllib.request, urllib.error, json, site, encodings.idna"


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
        if path.startswith("/"):
            libs.append(path)
    return libs


def clients_layer() -> list[Entry]:
    """The host's curl, and its Python with the stdlib modules urllib needs, each with the shared
    libraries it loads, at the same paths (so they run as they are): real clients in a machine."""
    listing = subprocess.run([PYTHON, "-c", f"import sys, {PY_MODULES}; print('\\n'.join(sorted("
                              "m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None))))"],
                             capture_output=True, text=True, check=True).stdout.split()
    files = ["/usr/bin/curl", PYTHON, *listing]
    for f in ["/usr/bin/curl", PYTHON, *[x for x in listing if x.endswith(".so")]]:
        files += _libs(f)
    entries: dict[str, Entry] = {}
    for path in files:
        p = Path(path)
        for parent in reversed(p.relative_to("/").parents[:-1]):
            entries.setdefault(str(parent), Entry(str(parent), "dir"))
        entries[str(p.relative_to("/"))] = Entry(str(p.relative_to("/")), "file", p.read_bytes(), mode=0o755)
    return list(entries.values())


# urllib inside a machine: the status of each URL (urllib reads HTTP_PROXY/NO_PROXY itself)
URLLIB = """
import sys, urllib.request, urllib.error
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            print(r.status, r.read().decode().strip())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode().strip())
"""


class Agent:
    def __init__(self, url: str, logdir: Path) -> None:
        self.log = open(logdir / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", url, "--poll", "0.2"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def until(fn, what: str, timeout: float = 90.0):
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


async def sh(state, app: str, mid: str, script: str) -> str:
    r = await state.request(schema.agent_subject("local", "exec"),
                            {"app": app, "id": mid, "cmd": ["sh", "-c", script], "timeout": 60}, timeout=90)
    assert r.get("ok"), r
    return r["stdout"] + r["stderr"]


@pytest.fixture
def machines_cleanup():
    yield
    from taxiway import machines

    for m in machines.all_machines():
        machines.destroy(m, force=True)


def battery(port: int) -> list[str]:
    return [f"http://10.0.0.1:{port}/", f"http://172.16.5.4:{port}/", f"http://192.168.1.1:{port}/",
            f"http://127.0.0.1:{port}/", f"http://localhost.test:{port}/", f"http://internal.test:{port}/",
            "http://169.254.169.254/latest/meta-data/", "http://metadata.test/", "http://[fd00:ec2::254]/",
            f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://2130706433:{port}/",
            f"http://0177.0.0.1:{port}/", f"http://mapped.test:{port}/", f"http://cname.test:{port}/",
            "http://[fdaa::3]:4280/", f"http://ula.test:{port}/"]


async def test_machines_reach_out_only_through_the_proxy(state, nats_server, platform_home, tmp_path,
                                                         machines_cleanup):
    upstream = Upstream(ALLOWED)
    traps = Traps(upstream.port)
    dns = LoopbackDNS()
    fab = fabric.Fabric.for_home(platform_home)
    agent = None
    try:
        fab.ensure()  # what `taxiway up` does before it starts the egress proxy
        port = free_port()
        argv = [sys.executable, "-m", "taxiway.platform.egressd", "--nats", nats_server.address,
                "--listen", f"127.0.0.1:{port}", "--fabric", "auto", "--resolver", dns.address,
                "--allow-range", f"{ALLOWED}/32"]
        with serve(argv, port, log=tmp_path / "egressd.log", env={"TAXIWAY_NATS_URL": nats_server.url_for("egress")}):
            image = make_image(tmp_path, IMAGE, [clients_layer()])
            now = time.time()
            tight = appconfig.parse('app = "tight"\n[egress]\nallowed_domains = ["ok.test"]\n')[0]
            await state.put(schema.RELEASES, schema.release_key("tight", 1),
                            {"app": "tight", "version": 1, "image": image, "config": tight, "status": "complete"})
            ids = {}
            for app in ("open", "tight"):
                await state.put(schema.APPS, app, {"name": app, "org": "personal", "created_at": now})
                mid = ids[app] = schema.new_machine_id()
                cfg = {"image": image, "cmd": ["sleep", "100000"], "restart": {"policy": "no"}, "stop_timeout": 1}
                await state.put(schema.MACHINES, schema.machine_key(app, mid),
                                {"id": mid, "name": app, "app": app, "org": None, "region": "local", "host": "local",
                                 "process_group": "app", "release": 1, "config": cfg, "desired": "started",
                                 "instance_id": "i1", "created_at": now, "updated_at": now})
            agent = Agent(nats_server.url, tmp_path)

            async def started(app: str):
                got = await state.get(schema.STATUS, schema.machine_key(app, ids[app]))
                s = got[0] if got else {}
                return s if s.get("state") == "started" and s.get("private_ip") else None

            for app in ids:
                await until(lambda a=app: started(a), f"{app} started")
            up = upstream.port
            code = "curl -sS -o /dev/null -w '%{http_code}\\n' --max-time 20"

            # the proxy variables are set; curl and wget go through them to an allowed name
            out = await sh(state, "open", ids["open"], "env | grep -i _proxy=")
            assert "HTTP_PROXY=http://[fdaa::3]:3128" in out and "http_proxy=http://[fdaa::3]:3128" in out
            out = await sh(state, "open", ids["open"], f"curl -sS --max-time 20 http://ok.test:{up}/from-curl")
            assert out == f"GET /from-curl host=ok.test:{up}\n"
            out = await sh(state, "open", ids["open"], f"wget -q -O - http://ok.test:{up}/from-wget")
            assert out.startswith("GET /from-wget")
            out = await sh(state, "open", ids["open"], f"{code} --proxytunnel http://www.ok.test:{up}/")
            assert out.strip() == "200"  # a CONNECT tunnel
            # Python's urllib, as an app would use it: allowed, then a metadata address and rebinding
            py = f"{PYTHON} -c '{URLLIB}' http://ok.test:{up}/from-python http://169.254.169.254/ " \
                 + " ".join([f"http://rebind.test:{up}/"] * 4)
            out = (await sh(state, "open", ids["open"], py)).splitlines()
            assert out[0] == f"200 GET /from-python host=ok.test:{up}", "\n".join(out)
            assert out[1].startswith("403 egress to 169.254.169.254:80 denied"), out
            assert {line.split()[0] for line in out[2:]} == {"200", "403"}, out

            # the SSRF battery: each denied by the proxy (403), nothing reaches a trap
            # (--noproxy '': loopback forms too go to the proxy, not NO_PROXY's direct way to the
            # machine's own loopback, which holds nothing here and is not the host's anyway)
            script = "; ".join(f"echo \"$({code} --noproxy '' '{u}') {u}\"" for u in battery(up))
            out = await sh(state, "open", ids["open"], script)
            codes = dict(reversed(line.split(" ", 1)) for line in out.strip().splitlines())
            assert set(codes) == set(battery(up)) and set(codes.values()) <= {"403", "400"}, out
            out = await sh(state, "open", ids["open"], f"{code} --proxytunnel http://internal.test:{up}/; true")
            assert "403" in out
            # DNS rebinding: public then private, TTL 0; never dialled when private
            out = await sh(state, "open", ids["open"], "; ".join([f"{code} http://rebind.test:{up}/"] * 4))
            assert set(out.split()) == {"200", "403"}, out
            assert traps.connections == 0
            # the proxy's own /metrics (every app's counters) is for the host, not for tenants
            out = await sh(state, "open", ids["open"], "curl -sS --noproxy '*' --max-time 5 http://[fdaa::3]:3128/metrics")
            assert "this is a proxy" in out and "taxiway_egress" not in out, out

            # nothing bypasses the proxy: without it no address outside the org network answers
            before = upstream.connections
            bypass = [f"curl -sS --noproxy '*' --max-time 5 http://{ALLOWED}:{up}/",
                      f"nc -w 3 {ALLOWED} {up} </dev/null",
                      f"nc -w 3 127.0.0.3 {up} </dev/null",
                      "nc -w 3 2001:db8::1 80 </dev/null",
                      "nc -w 3 fdaa:0:2:1::2 80 </dev/null",
                      f"env -u http_proxy -u HTTP_PROXY wget -q -T 5 -O - http://{ALLOWED}:{up}/",
                      f"curl -sS --noproxy '*' --max-time 5 http://ok.test:{up}/"]
            out = await sh(state, "open", ids["open"], "; ".join(f"{cmd}; echo rc=$?" for cmd in bypass))
            rcs = [line for line in out.splitlines() if line.startswith("rc=")]
            assert len(rcs) == len(bypass) and "rc=0" not in rcs and "GET /" not in out, out
            assert upstream.connections == before and traps.connections == 0

            # the app's [egress]: ok.test only; the denial is a line of the app's log
            out = await sh(state, "tight", ids["tight"], f"{code} http://ok.test:{up}/; {code} http://www.ok.test:{up}/")
            assert out.split() == ["200", "403"], out
            subject = schema.logs_subject("tight", "local", ids["tight"])
            want = f"egress denied: HTTP www.ok.test:{up}: rule has enforce policy"
            lines = await until(lambda: _lines_with(state, subject, want), "the denial in the app's log")
            assert lines[0]["machine"] == ids["tight"] and lines[0]["stream"] == "egress"
    finally:
        if agent is not None:
            agent.stop()
        traps.close()
        upstream.close()
        dns.close()


async def _lines_with(state, subject: str, text: str) -> list[dict]:
    return [x for x in await state.fetch_stream(subject) if text in (x.get("line") or "")]
