"""The platform's DNS server with real clients: dig against ``python -m taxiway.platform.dnsserver``
on loopback, a real nats-server as the state, a loopback DNS server as the upstream.

Who asks is the query's source address: on loopback ``dig -b 127.0.0.2`` is org "acme" and
``-b 127.0.0.3`` org "other" (``--org-of``); inside the fabric it is the machine's private
address (tests/platform/test_dns_fabric.py and the pure tests in test_dns.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.dns_upstream import UPSTREAM_A, Upstream

from taxiway.platform import schema
from taxiway.platform.nats import NatsServer, free_port
from taxiway.platform.state import NATS_URL_ENV, State

ACME, OTHER, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def ip(org: int, machine: int) -> str:
    return str(ipaddress.IPv6Address((0xFDAA << 112) | (org << 80) | (1 << 64) | machine))


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


class Platform:
    """nats-server + the DNS server process; ``put``/``delete`` write the state as the API and agent do."""

    def __init__(self, tmp: Path, upstream: Upstream) -> None:
        self.nats = NatsServer(tmp / "nats").start()
        self.tmp, self.upstream = tmp, upstream
        self.proc: subprocess.Popen | None = None

    def start_dns(self, *extra: str, dead: bool = True) -> None:
        """Start the server; it listens once it has mirrored what the state holds now."""
        tmp, upstream = self.tmp, self.upstream
        self.dead = free_port()   # an upstream nobody serves: tried first, then the live one
        if not dead:   # (the kernel rate-limits the ICMP that makes the dead one fail fast)
            self.dead = upstream.port
        self.log = open(tmp / "dns.log", "wb")
        env = {**os.environ, NATS_URL_ENV: self.nats.url_for("dns")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taxiway.platform.dnsserver", "--nats", self.nats.address,
             "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{self.dead}",
             "--upstream", f"127.0.0.1:{upstream.port}",
             "--org-of", f"{ACME}/32=acme", "--org-of", f"{OTHER}/32=other", *extra],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = json.loads(self.proc.stdout.readline())   # {"msg": "listening", "addresses": [...]}
        assert line["msg"] == "listening", line
        self.port = int(line["addresses"][0].rpartition(":")[2])

    async def _put(self, items: list[tuple[str, str, dict | None]]) -> None:
        async with await State.connect(self.nats.url) as st:
            for bucket, key, value in items:
                if value is None:
                    await st.delete(bucket, key)
                else:
                    await st.put(bucket, key, value)

    def put(self, *items: tuple[str, str, dict | None]) -> None:
        run(self._put(list(items)))

    def machine(self, app: str, mid: str, org: int, n: int, region: str = "ams", group: str = "app",
                state: str = "started") -> None:
        key = schema.machine_key(app, mid)
        self.put((schema.MACHINES, key, {"id": mid, "app": app, "region": region, "process_group": group,
                                         "desired": "started", "config": {}}),
                 (schema.STATUS, key, {"id": mid, "app": app, "state": state, "private_ip": ip(org, n)}))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.log.close()
        self.nats.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("dns"), upstream)
    try:
        p.put((schema.APPS, "web", {"name": "web", "org": "acme"}),
              (schema.APPS, "db", {"name": "db", "org": "acme"}),
              (schema.APPS, "rival", {"name": "rival", "org": "other"}))
        p.machine("web", "0000000000000a", 1, 10, "ams")
        p.machine("web", "0000000000000b", 1, 11, "ord")
        p.machine("web", "0000000000000c", 1, 12, "ams", group="worker")
        p.machine("db", "000000000000d1", 1, 20, "ord")
        p.machine("rival", "000000000000e1", 2, 5, "ams")
        p.start_dns()
        yield p
    finally:
        p.close()


def dig(platform: Platform, name: str, qtype: str = "AAAA", source: str = ACME, *extra: str) -> tuple[str, list[str]]:
    """dig's status (NOERROR, NXDOMAIN...) and its answer lines' data."""
    out = subprocess.run(["dig", "-b", source, "@127.0.0.1", "-p", str(platform.port), name, qtype,
                          "+tries=1", "+time=5", "+nocookie", *extra],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    status = out.stdout.split("status: ", 1)[1].split(",", 1)[0]
    answers = []
    section = False
    for line in out.stdout.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = True
        elif section and not line.strip():
            section = False
        elif section:
            answers.append(line)
    return status, answers


def data(answers: list[str]) -> list[str]:
    return [a.split(None, 4)[4] for a in answers]


def wait_for(check, what: str, timeout: float = 20.0):  # noqa: ANN001, ANN201
    """Poll ``check()`` until it returns something truthy (a deadline, never a sleep-as-assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def test_every_name_and_record_type(platform: Platform) -> None:
    status, ans = dig(platform, "web.internal")
    assert status == "NOERROR"
    assert data(ans) == [ip(1, 10), ip(1, 11), ip(1, 12)]
    assert all(a.split()[1] == "5" for a in ans)   # TTL 5 s
    assert data(dig(platform, "ams.web.internal")[1]) == [ip(1, 10), ip(1, 12)]
    assert data(dig(platform, "0000000000000b.vm.web.internal")[1]) == [ip(1, 11)]
    assert data(dig(platform, "worker.process.web.internal")[1]) == [ip(1, 12)]
    assert data(dig(platform, "top1.nearest.of.db.internal")[1]) == [ip(1, 20)]
    # an asker outside the fabric has no region: by region, then id
    assert data(dig(platform, "top2.nearest.of.web.internal")[1]) == [ip(1, 10), ip(1, 12)]
    assert data(dig(platform, "vms.web.internal", "TXT")[1]) == ['"0000000000000a ams,0000000000000b ord,0000000000000c ams"']
    assert data(dig(platform, "regions.web.internal", "TXT")[1]) == ['"ams,ord"']
    assert data(dig(platform, "_apps.internal", "TXT")[1]) == ['"db,web"']
    inst = data(dig(platform, "_instances.internal", "TXT")[1])
    assert f'"instance=000000000000d1,app=db,ip={ip(1, 20)},region=ord"' in inst and len(inst) == 4
    # no IPv4 on the private network: the name exists, without A records (NODATA + the SOA)
    status, ans = dig(platform, "web.internal", "A")
    assert (status, ans) == ("NOERROR", [])
    status, _ = dig(platform, "nothing.internal")
    assert status == "NXDOMAIN"


def test_names_are_case_insensitive_and_echoed_as_asked(platform: Platform) -> None:
    _, ans = dig(platform, "WeB.InTeRnAl")
    assert [a.split()[0] for a in ans] == ["WeB.InTeRnAl."] * 3
    assert data(ans) == [ip(1, 10), ip(1, 11), ip(1, 12)]


def test_another_org_sees_nxdomain_and_a_stranger_is_refused(platform: Platform) -> None:
    assert dig(platform, "web.internal", "AAAA", OTHER)[0] == "NXDOMAIN"
    assert dig(platform, "vms.web.internal", "TXT", OTHER)[0] == "NXDOMAIN"
    assert data(dig(platform, "rival.internal", "AAAA", OTHER)[1]) == [ip(2, 5)]
    assert data(dig(platform, "_apps.internal", "TXT", OTHER)[1]) == ['"rival"']
    assert dig(platform, "rival.internal", "AAAA", ACME)[0] == "NXDOMAIN"
    assert dig(platform, "web.internal", "AAAA", STRANGER)[0] == "REFUSED"


def test_answers_follow_machines_starting_and_stopping(platform: Platform) -> None:
    key = schema.machine_key("web", "0000000000000b")
    platform.put((schema.STATUS, key, {"id": "0000000000000b", "app": "web", "state": "stopped",
                                       "private_ip": ip(1, 11)}))
    wait_for(lambda: data(dig(platform, "web.internal")[1]) == [ip(1, 10), ip(1, 12)], "the stopped machine left")
    assert dig(platform, "0000000000000b.vm.web.internal")[1] == []
    assert data(dig(platform, "regions.web.internal", "TXT")[1]) == ['"ams"']
    platform.machine("web", "0000000000000f", 1, 15, "syd")
    platform.put((schema.STATUS, key, {"id": "0000000000000b", "app": "web", "state": "started",
                                       "private_ip": ip(1, 11)}))
    wait_for(lambda: data(dig(platform, "web.internal")[1]) == [ip(1, 10), ip(1, 11), ip(1, 12), ip(1, 15)],
             "both machines answered")
    # a destroyed machine (records purged) is gone, name and all
    k2 = schema.machine_key("web", "0000000000000f")
    platform.put((schema.STATUS, k2, None), (schema.MACHINES, k2, None))
    wait_for(lambda: dig(platform, "0000000000000f.vm.web.internal")[0] == "NXDOMAIN", "the destroyed machine left")
    assert data(dig(platform, "web.internal")[1]) == [ip(1, 10), ip(1, 11), ip(1, 12)]


def test_other_names_are_forwarded_to_the_upstream(platform: Platform, upstream: Upstream) -> None:
    # the first upstream is dead (nothing listens): the server goes on to the live one
    status, ans = dig(platform, "example.test", "A", OTHER)
    assert status == "NOERROR" and data(ans) == [UPSTREAM_A]
    # a source that is no machine and no --org-of forwards nothing (no open resolver)
    before = len(upstream.queries)
    assert dig(platform, "stranger.test", "A", STRANGER)[0] == "REFUSED"
    assert "stranger.test" not in upstream.queries[before:]
    status, ans = dig(platform, "example.test", "A", ACME, "+tcp")
    assert status == "NOERROR" and data(ans) == [UPSTREAM_A]
    assert dig(platform, "missing.test", "A")[0] == "NXDOMAIN"
    assert upstream.queries.count("example.test") >= 2
    # the private network's reverse names are never asked outside
    before = len(upstream.queries)
    assert dig(platform, "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.1.0.0.0.0.0.0.0.a.a.d.f.ip6.arpa", "PTR")[0] == "NXDOMAIN"
    assert len(upstream.queries) == before


def test_large_answers_fall_back_to_tcp(platform: Platform) -> None:
    platform.put((schema.APPS, "big", {"name": "big", "org": "acme"}))
    for n in range(60):
        platform.machine("big", f"{n:014x}", 1, 100 + n, "ams")
    wait_for(lambda: len(dig(platform, "big.internal", "AAAA", ACME, "+tcp")[1]) == 60, "60 machines")
    # over UDP (no EDNS: 512 bytes) the answer is truncated; dig retries over TCP and gets all 60
    out = subprocess.run(["dig", "-b", ACME, "@127.0.0.1", "-p", str(platform.port), "big.internal", "AAAA",
                          "+noedns", "+tries=1", "+time=5"], capture_output=True, text=True, timeout=60)
    assert "Truncated, retrying in TCP mode" in out.stdout
    assert out.stdout.count("\tAAAA\t") == 60
    status, ans = dig(platform, "big.internal", "AAAA", ACME, "+noedns", "+ignore")
    assert ans == [] and status == "NOERROR"
    # EDNS (dig's default 1232 bytes) fits 60 AAAA? no: 60 x 28 bytes > 1232, so TCP again
    _, ans = dig(platform, "big.internal")
    assert len(ans) == 60
    # a long TXT answer forwarded from upstream goes the same way
    out = subprocess.run(["dig", "-b", ACME, "@127.0.0.1", "-p", str(platform.port), "long.test", "TXT",
                          "+noedns", "+tries=1", "+time=5"], capture_output=True, text=True, timeout=60)
    assert "Truncated, retrying in TCP mode" in out.stdout and out.stdout.count("\tTXT\t") == 12


def test_the_dns_user_cannot_write_state(platform: Platform) -> None:
    async def go() -> str:
        async with await State.connect(platform.nats.url_for("dns"), setup=False) as st:
            try:
                await st.put(schema.APPS, "forged", {"name": "forged", "org": "acme"})
            except Exception as e:  # noqa: BLE001 - the permission error's type is nats-py's
                return type(e).__name__
            return "written"

    assert run(go()) != "written"
    assert dig(platform, "forged.internal")[0] == "NXDOMAIN"


def test_answers_follow_the_state_after_nats_server_restarts(platform: Platform) -> None:
    platform.nats.stop()
    platform.nats.start()
    platform.machine("db", "000000000000d2", 1, 21, "ams")
    wait_for(lambda: data(dig(platform, "db.internal")[1]) == [ip(1, 20), ip(1, 21)], "the watch came back")


def test_bad_arguments_are_one_clear_line() -> None:
    for args, words in ((["--listen", "nowhere"], "--listen"), (["--listen", ":0", "--upstream", "x.y"], "--upstream"),
                        (["--listen", ":0", "--org-of", "10.0.0.0/8"], "--org-of"), ([], "nothing to listen on")):
        out = subprocess.run([sys.executable, "-m", "taxiway.platform.dnsserver", "--nats", "nats://127.0.0.1:1", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert out.stderr.startswith("error: ") and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
