"""Limits of the platform's DNS server (red team, issue 17), with dig and raw UDP sockets on loopback.

- A source over its rate (``--rate-limit``) has its excess dropped, while other sources
  keep getting answers: one tenant's flood no longer starves every org.
- Forwarding to the upstream resolver is no way around ``[egress]``: only class IN and
  ordinary types leave, and a machine whose app's current release has ``[egress] mode =
  "enforce"`` forwards only the names its ACL allows; every refusal never reaches the upstream.

On loopback a "machine" is a STATUS record whose private_ip is a 127.0.0.x address that
``dig -b`` sends from (inside the fabric it is the machine's fdaa:: address).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from helpers.dns_upstream import UPSTREAM_A, Upstream
from test_dns_server import ACME, OTHER, Platform, data, dig, wait_for

from taxiway.platform import schema

LOCKED, OPEN_APP = "127.0.0.5", "127.0.0.6"   # machines of an enforce app and of an app without [egress]
RATE, BURST = int(os.environ.get("DNS_TEST_RATE", "10")), 20


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("dnslimits"), upstream)
    try:
        p.put((schema.APPS, "web", {"name": "web", "org": "acme"}),
              (schema.APPS, "locked", {"name": "locked", "org": "acme"}),
              (schema.APPS, "plain", {"name": "plain", "org": "acme"}),
              (schema.RELEASES, "locked.1", {"app": "locked", "version": 1, "status": "complete",
                                             "config": {"egress": {"mode": "enforce",
                                                                   "allowed_domains": ["example.test"]}}}),
              (schema.RELEASES, "plain.1", {"app": "plain", "version": 1, "status": "complete", "config": {}}))
        for app, mid, address in (("locked", "0000000000001a", LOCKED), ("plain", "0000000000002a", OPEN_APP)):
            key = schema.machine_key(app, mid)
            p.put((schema.MACHINES, key, {"id": mid, "app": app, "region": "ams", "process_group": "app",
                                          "desired": "started", "config": {}}),
                  (schema.STATUS, key, {"id": mid, "app": app, "state": "started", "private_ip": address}))
        p.machine("web", "0000000000000a", 1, 10, "ams")
        p.start_dns("--rate-limit", f"{RATE}/{BURST}", dead=False)
        yield p
    finally:
        p.close()


def query(qid: int, name: str = "web.internal", qtype: int = 28, qclass: int = 1) -> bytes:
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, qclass)


def test_a_flooding_source_is_dropped_and_other_sources_still_get_answers(platform: Platform) -> None:
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind((ACME, 0))
    sent, batch = 2000, 100
    answered = 0
    try:
        for start in range(0, sent, batch):
            # a batch at a time, each batch's answers read before the next: no socket buffer on
            # either side drops anything, so without a limit every query would be answered
            for i in range(start, start + batch):
                flood.sendto(query(i), ("127.0.0.1", platform.port))
            flood.settimeout(0.3)
            got = 0
            with contextlib.suppress(TimeoutError):
                while got < batch:
                    flood.recv(4096)
                    got += 1
            answered += got
            if start == sent // 2:   # during the flood another org's lookups are answered
                assert dig(platform, "example.test", "A", OTHER)[0] == "NOERROR"
    finally:
        flood.close()
    # 20 at once plus 10/s: a handful of answers (the loop would have to take ~100 s to reach 1000)
    assert 1 <= answered < sent // 2, answered
    # the other source is untouched, and the flooder gets answers again once under its rate
    wait_for(lambda: dig(platform, "example.test", "A", OTHER)[0] == "NOERROR", "the other source answered")
    wait_for(lambda: dig(platform, "web.internal", "AAAA", ACME)[0] == "NOERROR", "the flooder answered again")


def test_only_class_in_and_ordinary_types_are_forwarded(platform: Platform, upstream: Upstream) -> None:
    # asked from the machine of an app without [egress], not from ACME: the flood test above leaves
    # ACME's bucket (10/s) nearly empty, and a dropped query is a 5 s dig timeout (failed ~1 run in 3)
    before = len(upstream.queries)
    assert dig(platform, "version.bind", "TXT", OPEN_APP, "-c", "CH")[0] == "REFUSED"
    assert dig(platform, "example.test", "ANY", OPEN_APP)[0] == "REFUSED"
    assert dig(platform, "example.test", "TYPE10", OPEN_APP)[0] == "REFUSED"   # NULL: a tunnel's favourite
    assert "version.bind" not in upstream.queries[before:] and "example.test" not in upstream.queries[before:]
    status, ans = dig(platform, "example.test", "A", OPEN_APP)
    assert status == "NOERROR" and data(ans) == [UPSTREAM_A]


def test_an_enforce_app_forwards_only_what_its_egress_allows(platform: Platform, upstream: Upstream) -> None:
    before = len(upstream.queries)
    for name in ("tunnel-0123abcd.evil.test", "evil.test"):
        assert dig(platform, name, "TXT", LOCKED)[0] == "REFUSED"
        assert dig(platform, name, "A", LOCKED, "+tcp")[0] == "REFUSED"
    assert not [q for q in upstream.queries[before:] if q.endswith("evil.test")]
    status, ans = dig(platform, "example.test", "A", LOCKED)
    assert status == "NOERROR" and data(ans) == [UPSTREAM_A]
    # an app without [egress] resolves ordinary names
    assert dig(platform, "evil.test", "A", OPEN_APP)[0] == "NXDOMAIN"   # the upstream's answer
    assert "evil.test" in upstream.queries[before:]
    # a new release that drops [egress] opens the names again, at once
    platform.put((schema.RELEASES, "locked.2", {"app": "locked", "version": 2, "status": "complete", "config": {}}))
    wait_for(lambda: dig(platform, "evil.test", "A", LOCKED)[0] == "NXDOMAIN", "the new release applies")



def test_forward_refusal_is_the_egress_acl_decision() -> None:
    from taxiway.platform import dns
    from taxiway.platform.egresspolicy import app_acl

    enforce = app_acl("a", {"mode": "enforce", "allowed_domains": ["*.example.test"], "blocked_domains": ["x.example.test"]})
    report = app_acl("a", {"mode": "report", "allowed_domains": ["example.test"]})
    assert dns.forward_refusal(1, 1, "api.example.test.", True, enforce, "a") is None
    assert dns.forward_refusal(1, 1, "X.Example.Test.", True, enforce, "a") == dns.REFUSED   # blocked wins
    assert dns.forward_refusal(1, 16, "evil.test.", True, enforce, "a") == dns.REFUSED
    assert dns.forward_refusal(1, 16, "evil.test.", True, report, "a") is None   # report: allowed, logged by the proxy
    assert dns.forward_refusal(1, 1, "evil.test.", True, app_acl("a", None), "a") is None
    assert dns.forward_refusal(3, 16, "version.bind.", True) == dns.REFUSED    # CHAOS
    assert dns.forward_refusal(1, 255, "example.test.", True) == dns.REFUSED   # ANY
    assert dns.forward_refusal(1, 1, "example.test.", False) == dns.REFUSED    # not a machine


def test_a_bad_rate_limit_is_one_clear_line() -> None:
    import subprocess
    import sys

    for bad in ("fast", "-1", "10/0", "10/x"):
        out = subprocess.run([sys.executable, "-m", "taxiway.platform.dnsserver", "--nats", "nats://127.0.0.1:1",
                              "--listen", "127.0.0.1:0", "--rate-limit", bad], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert out.stderr.startswith("error: --rate-limit") and out.stderr.count("\n") == 1, out.stderr
