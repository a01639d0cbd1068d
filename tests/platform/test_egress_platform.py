"""The platform's egress proxy end to end on loopback (issue 17): real nats-server, the real
``python -m taxiway.platform.egressd``, the real API and ``taxiway logs``, curl and Python
clients, a loopback "internet" (127.0.0.2, reached by test names through a test DNS server)
and trap servers on the internal addresses that must never see a connection.

Machines are stood in for by loopback source addresses: each STATUS record here says
``private_ip`` 127.0.0.1x, and the clients bind to it (curl --interface, source_address),
exactly as a machine's packets carry its fdaa:: address on the private network. The same
proxy inside the private network, from real machines: test_egress_fabric.py.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from egress.conftest import ALLOWED, LoopbackDNS, Traps, Upstream
from helpers.servers import Server, free_port, serve

from taxiway.platform import api, appconfig, schema
from taxiway.platform.nats import NatsServer
from taxiway.platform.state import State, Unavailable

# app -> (machine id, its "private" address, taxiway.toml [egress] or None)
MACHINES = {
    "dflt": ("00000000000011", "127.0.0.11", None),
    "strict": ("00000000000012", "127.0.0.12", '[egress]\nallowed_domains = ["ok.test"]\n'),
    "watch": ("00000000000013", "127.0.0.13", '[egress]\nallowed_domains = ["ok.test"]\nmode = "report"\n'),
    "blocky": ("00000000000014", "127.0.0.14", '[egress]\nblocked_domains = ["www.ok.test"]\n'),
}
STRANGER = "127.0.0.19"  # no machine has this address


@dataclass
class Platform:
    nats: NatsServer
    proxy: Server
    api: Server
    token: str
    upstream: Upstream
    traps: Traps
    dns: LoopbackDNS

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


def run(coro):
    return asyncio.run(coro)


async def _with_state(url: str, fn):
    st = await State.connect(url)
    try:
        return await fn(st)
    finally:
        await st.close()


def _release(app: str, version: int, egress_toml: str | None, status: str = "complete") -> dict:
    cfg = appconfig.parse(f'app = "{app}"\n' + (egress_toml or ""))[0]
    return {"app": app, "version": version, "image": "example:1", "config": cfg, "status": status,
            "created_at": time.time()}


async def _seed(st: State) -> str:
    _, token = await api.new_org(st, "acme")
    for app, (mid, ip, egress) in MACHINES.items():
        await st.put(schema.APPS, app, {"name": app, "org": "acme", "created_at": 0, "config": {}}, revision=0)
        await st.put(schema.STATUS, schema.machine_key(app, mid),
                     {"id": mid, "app": app, "host": "local", "region": "local", "state": "started",
                      "private_ip": ip, "updated_at": time.time()})
        if egress is not None:
            await st.put(schema.RELEASES, schema.release_key(app, 1), _release(app, 1, egress))
    return token


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    d = tmp_path_factory.mktemp("egressd")
    home = d / "home"
    home.mkdir(mode=0o700)
    env = {"TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(d / "config")}
    upstream, traps, dns = _loopback_internet()
    nats = NatsServer(d / "nats").start()
    try:
        token = run(_with_state(nats.url, _seed))
        port = free_port()
        argv = [sys.executable, "-m", "taxiway.platform.egressd", "--nats", nats.address,
                "--listen", f"127.0.0.1:{port}", "--resolver", dns.address, "--allow-range", f"{ALLOWED}/32"]
        with serve(argv, port, log=d / "egressd.log", env={**env, "TAXIWAY_NATS_URL": nats.url_for("egress")}) as px:
            api_port = free_port()
            with serve([sys.executable, "-m", "taxiway.platform.api", "--nats", nats.address, "--listen",
                        f"127.0.0.1:{api_port}"], api_port, log=d / "api.log",
                       env={**env, "TAXIWAY_NATS_URL": nats.url_for("api")}) as apis:
                yield Platform(nats, px, apis, token, upstream, traps, dns)
    finally:
        nats.stop()
        traps.close()
        upstream.close()
        dns.close()


def _loopback_internet() -> tuple[Upstream, Traps, LoopbackDNS]:
    for _ in range(20):
        u = Upstream(ALLOWED)
        try:
            t = Traps(u.port)
        except RuntimeError:
            u.close()
            continue
        return u, t, LoopbackDNS()
    raise RuntimeError("no port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 at once")


# -- clients ------------------------------------------------------------------------------------

CLEAN_ENV = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy",
                                                                       "all_proxy")}


def curl(p: Platform, source: str, url: str, *, tunnel: bool = False) -> tuple[int, str]:
    """(status, body) of ``url`` through the proxy from ``source``; with ``tunnel``, CONNECT's status."""
    args = ["curl", "-sS", "--max-time", "20", "--interface", source, "-x", p.proxy_url, "-w", "\n@@%{http_code} %{http_connect}"]
    if tunnel:
        args.append("--proxytunnel")
    r = subprocess.run([*args, url], capture_output=True, text=True, env=CLEAN_ENV, timeout=60)
    body, _, codes = r.stdout.rpartition("\n@@")
    code, connect = (int(x) for x in codes.split())
    return (connect if tunnel and connect != 200 else code), body


def stdlib(p: Platform, source: str, url: str) -> tuple[int, str]:
    """Python's http.client through the proxy: the absolute URL goes to the proxy exactly as written."""
    c = http.client.HTTPConnection("127.0.0.1", p.proxy.port, timeout=20, source_address=(source, 0))
    try:
        c.request("GET", url)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def requests_get(p: Platform, source: str, url: str) -> tuple[int, str]:
    """Python requests through the proxy, its connections from ``source`` (a machine's address)."""
    import requests
    from requests.adapters import HTTPAdapter

    class FromSource(HTTPAdapter):
        def proxy_manager_for(self, proxy, **kw):  # noqa: ANN001, ANN003
            return super().proxy_manager_for(proxy, source_address=(source, 0), **kw)

    with requests.Session() as s:
        s.trust_env = False
        s.mount("http://", FromSource())
        s.mount("https://", FromSource())
        r = s.get(url, proxies={"http": p.proxy_url, "https": p.proxy_url}, timeout=20)
        return r.status_code, r.text


def wait_until(fn, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


# -- who is asking -----------------------------------------------------------------------------

def test_an_app_without_egress_reaches_public_names_with_every_client(platform):
    p = platform
    url = f"http://ok.test:{p.upstream.port}/hello"
    mid, ip, _ = MACHINES["dflt"]
    assert curl(p, ip, url) == (200, f"GET /hello host=ok.test:{p.upstream.port}\n")
    assert curl(p, ip, f"http://www.ok.test:{p.upstream.port}/", tunnel=True)[0] == 200  # CONNECT
    assert stdlib(p, ip, url)[0] == 200
    assert requests_get(p, ip, url)[0] == 200


def test_an_address_no_machine_has_is_denied(platform):
    p = platform
    status, body = curl(p, STRANGER, f"http://ok.test:{p.upstream.port}/")
    assert status == 403 and "belongs to no known machine" in body
    assert curl(p, STRANGER, f"http://ok.test:{p.upstream.port}/", tunnel=True)[0] == 403


# -- the SSRF battery, from an app with the default policy -------------------------------------

def battery(port: int) -> list[str]:
    return [
        # private ranges, literally
        f"http://10.0.0.1:{port}/", f"http://172.16.5.4:{port}/", f"http://192.168.1.1:{port}/",
        f"http://100.64.0.1:{port}/",
        # loopback, by address and by name
        f"http://127.0.0.1:{port}/", f"http://127.0.0.3:{port}/", f"http://localhost:{port}/",
        f"http://localhost.test:{port}/", f"http://internal.test:{port}/", f"http://cname.test:{port}/",
        # metadata services
        "http://169.254.169.254/latest/meta-data/", "http://metadata.test/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        # IPv6 forms and odd IPv4 spellings of loopback
        f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://[::ffff:7f00:3]:{port}/",
        f"http://[::127.0.0.1]:{port}/", f"http://[64:ff9b::7f00:1]:{port}/", f"http://mapped.test:{port}/",
        f"http://2130706433:{port}/", f"http://0177.0.0.1:{port}/", f"http://0x7f000001:{port}/",
        f"http://127.1:{port}/", f"http://0:{port}/",
        # the private network itself and the platform's own services: never through the proxy
        "http://[fdaa::3]:4280/v1/apps", "http://[fdaa:0:1:1::2]:8080/", f"http://ula.test:{port}/",
    ]


def test_the_ssrf_battery_is_denied_for_every_client(platform):
    p = platform
    _, ip, _ = MACHINES["dflt"]
    before = p.traps.connections
    for url in battery(p.upstream.port):
        for client in (curl, stdlib):
            status, body = client(p, ip, url)
            assert status in (400, 403), (client.__name__, url, status, body)
    for url in battery(p.upstream.port)[:12]:
        assert requests_get(p, ip, url)[0] == 403, url
        assert curl(p, ip, url, tunnel=True)[0] in (400, 403), url  # CONNECT host:port
    assert p.traps.connections == before


def test_dns_rebinding_gets_nothing_internal(platform):
    """rebind.test answers the loopback internet and an internal address in turn, TTL 0: each
    request resolves once, judges that answer and dials exactly it."""
    p = platform
    _, ip, _ = MACHINES["dflt"]
    before = p.traps.connections
    seen = set()
    for _ in range(6):
        status, body = curl(p, ip, f"http://rebind.test:{p.upstream.port}/")
        seen.add(status)
        if status == 200:
            assert body.startswith("GET / host=rebind.test")
    assert seen == {200, 403}
    assert p.traps.connections == before


# -- per-app ACLs and the app's logs -----------------------------------------------------------

def taxiway_logs(p: Platform, app: str) -> str:
    env = {**CLEAN_ENV, "TAXIWAY_API_URL": p.api.url, "TAXIWAY_API_TOKEN": p.token}
    r = subprocess.run([sys.executable, "-m", "taxiway", "logs", "-a", app], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_allowed_domains_enforced_and_the_denial_is_in_taxiway_logs(platform):
    p = platform
    mid, ip, _ = MACHINES["strict"]
    assert curl(p, ip, f"http://ok.test:{p.upstream.port}/")[0] == 200
    status, body = curl(p, ip, f"http://www.ok.test:{p.upstream.port}/secret")
    assert status == 403 and "rule has enforce policy" in body
    assert requests_get(p, ip, f"http://www.ok.test:{p.upstream.port}/")[0] == 403
    want = f"egress denied: HTTP www.ok.test:{p.upstream.port}: rule has enforce policy"
    out = wait_until(lambda: o if want in (o := taxiway_logs(p, "strict")) else None, "the denial in taxiway logs")
    line = next(x for x in out.splitlines() if want in x)
    assert mid in line and "[egress]" in line
    # an app with the default policy: a private address is denied with the address policy's reason
    assert curl(p, MACHINES["dflt"][1], "http://169.254.169.254/")[0] == 403
    wait_until(lambda: "169.254.169.254:80: 169.254.169.254 is a link-local address" in taxiway_logs(p, "dflt"),
               "metadata denial")
    # nothing of it went to another app's log
    assert "www.ok.test" not in taxiway_logs(p, "dflt")


def test_report_mode_lets_through_and_logs(platform):
    p = platform
    _, ip, _ = MACHINES["watch"]
    assert curl(p, ip, f"http://www.ok.test:{p.upstream.port}/")[0] == 200
    wait_until(lambda: "egress allowed, reported: HTTP www.ok.test" in taxiway_logs(p, "watch"), "the report line")
    assert curl(p, ip, "http://10.0.0.1/")[0] == 403  # the address policy does not report: it denies


def test_blocked_domains(platform):
    p = platform
    _, ip, _ = MACHINES["blocky"]
    assert curl(p, ip, f"http://ok.test:{p.upstream.port}/")[0] == 200
    status, body = curl(p, ip, f"http://www.ok.test:{p.upstream.port}/")
    assert status == 403 and "blocked_domains" in body


def test_policy_and_machines_follow_the_state(platform):
    """A new release's [egress] applies without a restart; a removed machine's address is unknown."""
    p = platform
    mid, ip, _ = MACHINES["strict"]
    url = f"http://www.ok.test:{p.upstream.port}/"
    assert curl(p, ip, url)[0] == 403

    async def release2(st: State) -> None:
        await st.put(schema.RELEASES, schema.release_key("strict", 2),
                     _release("strict", 2, '[egress]\nallowed_domains = ["ok.test", "www.ok.test"]\n', "running"))
    run(_with_state(p.nats.url, release2))
    wait_until(lambda: curl(p, ip, url)[0] == 200, "the new release's ACL")

    async def gone(st: State) -> None:
        await st.delete(schema.STATUS, schema.machine_key("strict", mid))
    run(_with_state(p.nats.url, gone))
    wait_until(lambda: curl(p, ip, url)[0] == 403, "the removed machine denied")
    assert "belongs to no known machine" in curl(p, ip, url)[1]


def test_the_egress_nats_user_only_reads_and_writes_logs(platform):
    """The proxy's NATS user reads the state and writes logs; a denied publish is a timeout
    (nats-server drops it and says so only in an async error)."""
    async def go() -> None:
        st = await State.connect(platform.nats.url_for("egress"), timeout=2)
        try:
            assert await st.get(schema.STATUS, schema.machine_key("dflt", MACHINES["dflt"][0]))
            await st.publish(schema.logs_subject("dflt", "local", MACHINES["dflt"][0]), {"line": "ok"})
            with pytest.raises(TimeoutError):
                await st.put(schema.STATUS, "dflt.forged", {"private_ip": STRANGER, "app": "dflt"})
            with pytest.raises(TimeoutError):
                await st.publish(schema.events_subject("dflt", "forged"), {"type": "exit"})
            with pytest.raises(Unavailable):
                await st.request(schema.agent_subject("local", "exec"), {"app": "dflt"}, timeout=1)
        finally:
            await st.close()
    run(go())
    assert run(_with_state(platform.nats.url, lambda st: st.get(schema.STATUS, "dflt.forged"))) is None


def test_machines_and_policies_follow_after_a_nats_server_restart(platform):
    """A restarted nats-server forgets the proxy's watches: they are started again on reconnect,
    so a machine made afterwards is known (and its app's [egress] applied) without a proxy restart."""
    p = platform
    p.nats.stop()
    p.nats.start()
    ip, mid = "127.0.0.15", "00000000000015"

    async def later(st: State) -> None:
        await st.put(schema.APPS, "late", {"name": "late", "org": "acme", "created_at": 0, "config": {}})
        await st.put(schema.RELEASES, schema.release_key("late", 1),
                     _release("late", 1, '[egress]\nallowed_domains = ["www.ok.test"]\n'))
        await st.put(schema.STATUS, schema.machine_key("late", mid),
                     {"id": mid, "app": "late", "host": "local", "region": "local", "state": "started",
                      "private_ip": ip, "updated_at": time.time()})
    run(_with_state(p.nats.url, later))  # start() returned once the server listens
    wait_until(lambda: curl(p, ip, f"http://www.ok.test:{p.upstream.port}/")[0] == 200, "the new machine allowed")
    assert curl(p, ip, f"http://ok.test:{p.upstream.port}/")[0] == 403
    # and its denial still reaches its log
    wait_until(lambda: "egress denied: HTTP ok.test" in taxiway_logs(p, "late"), "the denial after the restart")
