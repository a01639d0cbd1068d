"""``taxiway up`` runs the DNS server as its component "dns": on its loopback port and on
[fdaa::3]:53 inside the host's fabric (where machines ask), with its read-only NATS user."""

from __future__ import annotations

import json
import socket
import subprocess

from taxiway.platform import fabric


def _ask(name: str, qtype: str = "AAAA") -> bytes:
    """A query sent from inside the fabric netns to [fdaa::3]:53 (run through fabric.run_in)."""
    from dnslib import DNSRecord

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(bytes(DNSRecord.question(name, qtype).pack()), ("fdaa::3", 53))
        return s.recv(4096)


def test_taxiway_up_serves_dns_on_loopback_and_in_the_fabric(platform_home, taxiway):
    from dnslib import DNSRecord

    try:
        r = taxiway("up", "-d", "--free-ports", timeout=180)
        assert r.returncode == 0, r.stderr.decode()
        up = json.loads((platform_home / "platform" / "up.json").read_text())
        dns = up["components"]["dns"]
        assert dns["pid"] and dns["port"]
        log = (platform_home / "platform" / "logs" / "dns.log").read_text()
        assert '"[fdaa::3]:53"' in log, log
        # the host is no org's: its .internal questions are refused (names are for machines)
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(dns["port"]), "web.internal", "AAAA", "+tries=1",
                              "+time=5"], capture_output=True, text=True, timeout=60).stdout
        assert "status: REFUSED" in out, out
        # inside the fabric: fdaa::3 answers (the fabric's own address is no machine either)
        fab = fabric.Fabric.for_home(platform_home)
        reply = DNSRecord.parse(fabric.run_in(fab.path, _ask, "web.internal"))
        assert reply.header.rcode == 5   # REFUSED
        # and the reverse names of the private network never go out
        reply = DNSRecord.parse(fabric.run_in(fab.path, _ask, "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0."
                                                              "0.0.0.a.a.d.f.ip6.arpa", "PTR"))
        assert reply.header.rcode == 3   # NXDOMAIN, from here
    finally:
        taxiway("down", timeout=120)
