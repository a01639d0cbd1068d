"""A loopback DNS server (UDP and TCP on one port) standing for the host's resolver in the DNS tests.

It answers ``example.test`` A with :data:`UPSTREAM_A`, ``long.test`` TXT with a 2.6 kB answer
(for TCP fallback), NXDOMAIN for anything else, and records every name asked.
"""

from __future__ import annotations

from taxiway.platform.nats import free_port

UPSTREAM_A = "127.0.0.9"   # what the loopback upstream answers for example.test


class Upstream:
    """A loopback DNS server (UDP and TCP, one port) standing for the host's resolver."""

    def __init__(self) -> None:
        from dnslib import QTYPE, RR, TXT, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        self.queries: list[str] = []
        outer = self

        class Resolver(BaseResolver):
            def resolve(self, request, handler):  # noqa: ANN001
                reply = request.reply()
                name = str(request.q.qname).rstrip(".").lower()
                outer.queries.append(name)
                if name == "example.test" and request.q.qtype == QTYPE.A:
                    reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(UPSTREAM_A), ttl=30))
                elif name == "long.test" and request.q.qtype == QTYPE.TXT:
                    for i in range(12):
                        reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(f"{i:02d}" + "x" * 200), ttl=30))
                elif name != "example.test":
                    reply.header.rcode = 3
                return reply

        class Quiet(DNSLogger):
            def __init__(self) -> None:
                super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")

        for _ in range(20):
            self.port = free_port()
            try:
                self.udp = DNSServer(Resolver(), port=self.port, address="127.0.0.1", logger=Quiet())
                self.tcp = DNSServer(Resolver(), port=self.port, address="127.0.0.1", tcp=True, logger=Quiet())
                break
            except OSError:
                continue
        self.udp.start_thread()
        self.tcp.start_thread()

    def close(self) -> None:
        self.udp.stop()
        self.tcp.stop()
