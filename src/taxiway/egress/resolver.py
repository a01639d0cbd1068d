"""Resolve a name once, to the addresses the proxy will judge and then dial.

With ``--resolver HOST:PORT`` queries go to that DNS server over UDP (A and
AAAA, CNAME chains followed); otherwise the system resolver is used. Answers
are cached for their TTL (at most a minute); a TTL of 0 is never cached, so a
rebinding server gets asked again, and whatever it says is judged again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time

from taxiway.egress.hosts import IPAddress

MAX_TTL = 60
MAX_CNAME_DEPTH = 8


class ResolveError(Exception):
    """The name has no usable address; ``timeout`` says whether it was a timeout."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class _Query(asyncio.DatagramProtocol):
    def __init__(self, qid: int, done: asyncio.Future[bytes]):
        self.qid, self.done = qid, done

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.qid and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class Resolver:
    """``await resolve(name)`` -> addresses in answer order (IPv4 first)."""

    def __init__(self, server: tuple[str, int] | None = None, timeout: float = 5.0):
        self.server = server
        self.timeout = timeout
        self._cache: dict[str, tuple[float, list[IPAddress]]] = {}

    @staticmethod
    def parse_server(text: str) -> tuple[str, int]:
        """``127.0.0.1:5353``, ``[::1]:53`` or a bare address (port 53)."""
        text = text.strip()
        if text.startswith("["):
            host, _, port = text[1:].partition("]")
            return host, int(port[1:]) if port.startswith(":") else 53
        if text.count(":") == 1:
            host, port = text.split(":")
            return host, int(port)
        return text, 53

    async def resolve(self, name: str) -> list[IPAddress]:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            async with asyncio.timeout(self.timeout):
                if self.server is None:
                    addrs, ttl = await self._system(name), 5
                else:
                    addrs, ttl = await self._dns(name)
        except TimeoutError:
            raise ResolveError(f"DNS lookup of {name} timed out", timeout=True) from None
        if not addrs:
            raise ResolveError(f"{name} has no A or AAAA records")
        if ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[name] = (now + min(ttl, MAX_TTL), addrs)
        return addrs

    async def _system(self, name: str) -> list[IPAddress]:
        import socket

        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ResolveError(f"cannot resolve {name}: {e.strerror}") from None
        out: list[IPAddress] = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if ip not in out:
                out.append(ip)
        return sorted(out, key=lambda a: a.version)

    async def _dns(self, name: str) -> tuple[list[IPAddress], int]:
        v4, v6 = await asyncio.gather(self._chase(name, "A"), self._chase(name, "AAAA"),
                                      return_exceptions=True)
        addrs: list[IPAddress] = []
        ttls: list[int] = []
        errors: list[BaseException] = []
        for r in (v4, v6):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                errors.append(r)
                continue
            addrs += [a for a in r[0] if a not in addrs]
            ttls.append(r[1])
        if not addrs and errors:
            e = errors[0]
            if isinstance(e, TimeoutError):
                raise ResolveError(f"DNS lookup of {name} timed out", timeout=True)
            if isinstance(e, ResolveError):
                raise e
            raise ResolveError(f"DNS lookup of {name} failed: {e}")
        return addrs, min(ttls) if ttls else 0

    async def _chase(self, name: str, qtype: str) -> tuple[list[IPAddress], int]:
        seen = set()
        ttl = MAX_TTL
        for _ in range(MAX_CNAME_DEPTH):
            seen.add(name)
            records = await self._query(name, qtype)
            addrs: list[IPAddress] = []
            target = name
            # Follow the chain inside one answer, as recursive resolvers return it.
            for _ in range(MAX_CNAME_DEPTH):
                nxt = None
                for rname, rtype, rttl, rdata in records:
                    if rname != target:
                        continue
                    if rtype == qtype:
                        addrs.append(ipaddress.ip_address(rdata))
                        ttl = min(ttl, rttl)
                    elif rtype == "CNAME":
                        nxt = rdata
                        ttl = min(ttl, rttl)
                if addrs or nxt is None:
                    break
                target = nxt
            if addrs:
                return addrs, ttl
            if target == name or target in seen:
                return [], ttl
            name = target
        raise ResolveError(f"CNAME chain too long for {name}")

    async def _query(self, name: str, qtype: str) -> list[tuple[str, str, int, str]]:
        from dnslib import QTYPE, RCODE, DNSRecord

        q = DNSRecord.question(name, qtype)
        qid = int.from_bytes(os.urandom(2), "big")
        q.header.id = qid
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        assert self.server is not None
        transport, _ = await loop.create_datagram_endpoint(lambda: _Query(qid, done), remote_addr=self.server)
        try:
            transport.sendto(q.pack())
            data = await done
        finally:
            transport.close()
        reply = DNSRecord.parse(data)
        rcode = reply.header.rcode
        if rcode == RCODE.NXDOMAIN:
            raise ResolveError(f"{name} does not exist (NXDOMAIN)")
        if rcode != RCODE.NOERROR:
            raise ResolveError(f"DNS lookup of {name} failed: {RCODE[rcode]}")
        if reply.header.tc:
            raise ResolveError(f"DNS answer for {name} was truncated")
        return [(str(rr.rname).rstrip(".").lower(), QTYPE[rr.rtype], rr.ttl,
                 str(rr.rdata).rstrip(".").lower() if QTYPE[rr.rtype] == "CNAME" else str(rr.rdata))
                for rr in reply.rr]
