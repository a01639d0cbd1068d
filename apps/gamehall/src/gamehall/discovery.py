"""Finding the app's other nodes through DNS, as libcluster's DNS poll strategy does.

Every ``interval`` seconds the node asks a DNS server for the AAAA (or A) records
of one name (``gamehall.internal`` on taxiway's private network, where each
running machine of the app has one address); the answer is the node list. Nodes
named ``<app>@<address>`` (the default when discovery is on) are known to be gone
as soon as their address leaves the answer, so their games are taken over at once
instead of when their ownership lapses.

The parsing is pure (:func:`parse_answer`, :func:`nameserver`, :func:`parse_server`);
:class:`Poller` is the thin asyncio part. The DNS server is named explicitly or read
from ``/etc/resolv.conf`` (which, on the platform, names the private network's DNS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from dnslib import RCODE, DNSRecord

log = logging.getLogger("gamehall")

QTYPES = ("AAAA", "A")


class DiscoveryError(Exception):
    """The DNS server gave no usable answer (the node list is left as it was)."""


def parse_server(text: str, default_port: int = 53) -> tuple[str, int]:
    """``127.0.0.1:5353``, ``[::1]:5353``, ``fdaa::3`` or ``127.0.0.1`` as (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host, port = text, default_port
    ipaddress.ip_address(host)  # a DNS server is an address: never a name to resolve first
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def nameserver(resolv_conf: str) -> str | None:
    """The first ``nameserver`` of a resolv.conf text."""
    for line in resolv_conf.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1]
    return None


def build_query(name: str, qtype: str) -> DNSRecord:
    return DNSRecord.question(name, qtype)


def parse_answer(query: DNSRecord, data: bytes) -> list[str]:
    """The addresses answering ``query``, sorted; [] for a name with no records."""
    try:
        reply = DNSRecord.parse(data)
    except Exception as e:
        raise DiscoveryError(f"unreadable DNS reply: {e}") from None
    if reply.header.id != query.header.id:
        raise DiscoveryError("DNS reply to another query")
    rcode = reply.header.rcode
    if rcode == RCODE.NXDOMAIN:
        return []
    if rcode != RCODE.NOERROR:
        raise DiscoveryError(f"DNS server answered {RCODE.get(rcode)}")
    want = query.q.qtype
    out = set()
    for rr in reply.rr:
        if rr.rtype == want:
            # from the record's bytes: dnslib's text form of some addresses (e.g. ::ffff:0.0.0.0) does
            # not parse back
            out.add(str(ipaddress.ip_address(bytes(rr.rdata.data))))
    return sorted(out, key=lambda a: ipaddress.ip_address(a).packed)


async def resolve(
    name: str, server: tuple[str, int], qtype: str = "AAAA", timeout: float = 2.0
) -> list[str]:
    """Ask ``server`` (UDP) for ``name``'s records of ``qtype``."""
    query = build_query(name, qtype)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr) -> None:
            if not got.done():
                got.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not got.done():
                got.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=server)
    try:
        transport.sendto(query.pack())
        async with asyncio.timeout(timeout):
            data = await got
    except TimeoutError:
        raise DiscoveryError(f"no answer from the DNS server {server[0]} port {server[1]}") from None
    except OSError as e:
        raise DiscoveryError(f"DNS server {server[0]} port {server[1]}: {e}") from None
    finally:
        transport.close()
    return parse_answer(query, data)


def local_addresses() -> set[str]:
    """This host's IPv6 addresses (from /proc, so no packet is sent to find them)."""
    out = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    return out


def node_address(node_id: str) -> str | None:
    """The address in a node id ``app@address``, if it has one."""
    _, at, addr = node_id.rpartition("@")
    if not at:
        return None
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return None


def gone(owner: str, nodes: list[str] | None) -> bool:
    """Is ``owner`` known to be gone: named by an address the last good answer lacks?"""
    if not nodes:  # no good answer yet (or an empty one, as when DNS lags a deploy): unknown
        return False
    addr = node_address(owner)
    return addr is not None and addr not in nodes


class Poller:
    """Polls one name; ``nodes`` is the last good answer (None before the first)."""

    def __init__(
        self,
        name: str,
        server: tuple[str, int],
        interval: float = 5.0,
        qtype: str = "AAAA",
        on_change: Callable[[list[str], list[str]], None] | None = None,
    ) -> None:
        if qtype not in QTYPES:
            raise ValueError(f"record type must be one of {', '.join(QTYPES)}")
        self.name, self.server, self.interval, self.qtype = name, server, interval, qtype
        self.on_change = on_change
        self.nodes: list[str] | None = None
        self.error: str | None = None
        self.checked: float | None = None
        self._task: asyncio.Task | None = None

    async def poll(self) -> list[str] | None:
        """Ask once; on failure keep the previous list (a lost packet is not a lost node)."""
        try:
            nodes = await resolve(self.name, self.server, self.qtype)
        except DiscoveryError as e:
            if self.error != str(e):
                log.warning("discovery: %s: %s", self.name, e)
            self.error = str(e)
            return self.nodes
        self.error, self.checked = None, time.time()
        before, self.nodes = self.nodes, nodes
        if before != nodes:
            log.info("discovery: %s is %s", self.name, ", ".join(nodes) or "empty")
            if self.on_change is not None and before is not None:
                self.on_change(before, nodes)
        return nodes

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="gamehall-discovery")

    async def _run(self) -> None:
        while True:
            # A little jitter so the nodes of a cluster don't all ask at the same instant.
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))
            await self.poll()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "record": self.qtype,
            "server": f"{self.server[0]} port {self.server[1]}",
            "nodes": self.nodes or [],
            "error": self.error,
            "checked": self.checked,
        }
