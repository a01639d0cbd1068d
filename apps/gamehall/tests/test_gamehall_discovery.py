"""Finding nodes through DNS (libcluster's DNS poll): the pure parsing, a poller against a
small DNS server on loopback (dnslib; never the system resolver), and two gamehall nodes
that name themselves from the answer and take over a node's games once DNS drops it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import threading

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import DNSLogger, DNSServer
from gamehall_testing import Player, free_port, gamehall_node, redis_server
from hypothesis import given
from hypothesis import strategies as st

from gamehall import discovery

pytestmark = pytest.mark.timeout(90)


class Zone:
    """What the test DNS server answers: name -> addresses; changed by the test."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def set(self, name: str, addrs: list[str]) -> None:
        with self.lock:
            self.records[name.rstrip(".")] = list(addrs)

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        with self.lock:
            addrs = self.records.get(name)
        if addrs is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for a in addrs:
            v6 = ipaddress.ip_address(a).version == 6
            if request.q.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=AAAA(a) if v6 else A(a), ttl=5))
        return reply


@contextlib.contextmanager
def dns_server(zone: Zone):
    port = free_port()
    server = DNSServer(zone, address="127.0.0.1", port=port, logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    try:
        yield ("127.0.0.1", port)
    finally:
        server.stop()
        server.server.server_close()


def test_parse_server_and_resolv_conf():
    assert discovery.parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert discovery.parse_server("[::1]:5353") == ("::1", 5353)
    assert discovery.parse_server("fdaa::3") == ("fdaa::3", 53)
    assert discovery.parse_server("127.0.0.1") == ("127.0.0.1", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "[::1]:70000"):
        with pytest.raises(ValueError):
            discovery.parse_server(bad)
    conf = "# generated\nsearch internal\nnameserver fdaa:0:1::3 # the platform's\nnameserver 1.1.1.1\n"
    assert discovery.nameserver(conf) == "fdaa:0:1::3"
    assert discovery.nameserver("search x\n") is None


def test_node_ids_and_who_is_gone():
    assert discovery.node_address("gamehall@fdaa::5") == "fdaa::5"
    assert discovery.node_address("gamehall@127.0.0.2") == "127.0.0.2"
    assert discovery.node_address("host-8080") is None and discovery.node_address("a@b") is None
    nodes = ["fdaa::5", "fdaa::6"]
    assert not discovery.gone("gamehall@fdaa::5", nodes)
    assert discovery.gone("gamehall@fdaa::7", nodes)
    assert not discovery.gone("host-8080", nodes)  # not named by address: unknown, not gone
    assert not discovery.gone("gamehall@fdaa::7", None) and not discovery.gone("gamehall@fdaa::7", [])


@given(st.lists(st.ip_addresses(v=6), max_size=8), st.lists(st.ip_addresses(v=4), max_size=4))
def test_parse_answer_keeps_only_the_asked_type_sorted_and_unique(v6, v4):
    query = discovery.build_query("gamehall.internal", "AAAA")
    reply = query.reply()
    for a in [*v6, *v6[:2]]:
        reply.add_answer(RR("gamehall.internal", QTYPE.AAAA, rdata=AAAA(tuple(a.packed))))
    for a in v4:
        reply.add_answer(RR("gamehall.internal", QTYPE.A, rdata=A(tuple(a.packed))))
    got = discovery.parse_answer(query, reply.pack())
    assert got == sorted({str(a) for a in v6}, key=lambda s: ipaddress.ip_address(s).packed)


def test_parse_answer_refuses_replies_it_cannot_trust():
    query = discovery.build_query("gamehall.internal", "AAAA")
    other = DNSRecord.question("gamehall.internal", "AAAA").reply()
    other.header.id = (query.header.id + 1) % 65536
    with pytest.raises(discovery.DiscoveryError, match="another query"):
        discovery.parse_answer(query, other.pack())
    failed = query.reply()
    failed.header.rcode = RCODE.SERVFAIL
    with pytest.raises(discovery.DiscoveryError, match="SERVFAIL"):
        discovery.parse_answer(query, failed.pack())
    nx = query.reply()
    nx.header.rcode = RCODE.NXDOMAIN
    assert discovery.parse_answer(query, nx.pack()) == []
    with pytest.raises(discovery.DiscoveryError, match="unreadable"):
        discovery.parse_answer(query, b"\x00\x01")


def test_poller_follows_the_answer_and_keeps_it_through_a_dns_outage():
    zone = Zone()
    zone.set("gamehall.internal", ["fdaa::5", "fdaa::6"])
    changes = []

    async def main(server):
        poller = discovery.Poller("gamehall.internal", server, interval=0.2,
                                  on_change=lambda before, after: changes.append((before, after)))
        await poller.start()
        try:
            assert poller.nodes == ["fdaa::5", "fdaa::6"] and poller.error is None
            zone.set("gamehall.internal", ["fdaa::6", "fdaa::7"])
            for _ in range(100):
                if poller.nodes == ["fdaa::6", "fdaa::7"]:
                    break
                await asyncio.sleep(0.05)
            assert changes == [(["fdaa::5", "fdaa::6"], ["fdaa::6", "fdaa::7"])]
            return poller
        finally:
            await poller.close()

    with dns_server(zone) as server:
        poller = asyncio.run(main(server))
    # The server is gone: a poll fails, says why, and keeps the last good list.
    assert asyncio.run(poller.poll()) == ["fdaa::6", "fdaa::7"]
    assert "127.0.0.1 port" in poller.error
    assert poller.status()["nodes"] == ["fdaa::6", "fdaa::7"]


def test_nodes_name_themselves_from_dns_and_take_over_a_node_dns_dropped(tmp_path):
    """Two nodes on 127.0.0.2 and 127.0.0.3 (loopback), listed as A records of
    gamehall.internal by a test DNS server. Each names itself gamehall@ADDRESS; when the
    node owning a game dies and DNS drops it, the other adopts the game it shows at once,
    though its ownership key would hold for another minute."""
    import redis as sync_redis

    zone = Zone()
    zone.set("gamehall.internal", ["127.0.0.2", "127.0.0.3"])
    with dns_server(zone) as (dns_host, dns_port), redis_server(tmp_path) as url:
        env = {
            "GAMEHALL_REDIS_URL": url,
            "GAMEHALL_DNS_NAME": "gamehall.internal",
            "GAMEHALL_DNS_SERVER": f"{dns_host}:{dns_port}",
            "GAMEHALL_DNS_RECORD": "A",
            "GAMEHALL_DNS_INTERVAL": "0.3",
        }
        common = ("--owner-ttl", "60")
        with (
            gamehall_node(tmp_path, *common, env=env, host="127.0.0.2") as a,
            gamehall_node(tmp_path, *common, env=env, host="127.0.0.3") as b,
        ):
            cluster = json.loads(a.get("/api/cluster")[1])
            assert cluster["node"] == "gamehall@127.0.0.2"
            assert cluster["discovery"]["nodes"] == ["127.0.0.2", "127.0.0.3"]
            assert json.loads(b.get("/api/cluster")[1])["node"] == "gamehall@127.0.0.3"
            r = sync_redis.Redis.from_url(url)

            async def main():
                code = a.create("tictactoe")
                ann = await Player(b, code).connect()  # her page is on B; A runs the game
                assert (await ann.do("join", name="Ann"))["seat"] == 0
                assert r.get(f"gh:owner:{code}") == b"gamehall@127.0.0.2"
                a.kill()
                zone.set("gamehall.internal", ["127.0.0.3"])
                for _ in range(200):
                    if r.get(f"gh:owner:{code}") == b"gamehall@127.0.0.3":
                        break
                    await asyncio.sleep(0.05)
                assert r.get(f"gh:owner:{code}") == b"gamehall@127.0.0.3"
                assert (await ann.do("bot"))["seat"] == 1  # and the game goes on, on B
                await ann.ws.close()

            asyncio.run(main())
            assert json.loads(b.get("/api/cluster")[1])["discovery"]["nodes"] == ["127.0.0.3"]
