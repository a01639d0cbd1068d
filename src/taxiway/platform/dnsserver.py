"""The platform's DNS server: ``.internal`` names from the state, everything else forwarded.

    python -m taxiway.platform.dnsserver --nats nats://127.0.0.1:4223 --listen 127.0.0.1:4253 [--fabric]

Thin I/O around :mod:`taxiway.platform.dns` (which decides every answer):

- **State**: the APPS, MACHINES, STATUS (and org networks) buckets are mirrored through
  :meth:`State.watch` (no polling), restarted from :meth:`State.on_reconnect`
  as the edge does; a change drops the indexed snapshot and the answer cache,
  so a machine that starts or stops is in (or out of) the answers at once. The
  server listens only once the mirror is complete.
- **Who asks** is the query's source address (:func:`dns.asker_for`): inside the
  fabric a machine's private address, which the fabric's anti-spoofing rules
  vouch for. ``--org-of CIDR=ORG`` names the org of other sources (e.g. the
  host's loopback for an operator's ``dig``, or tests).
- **UDP and TCP** on every listen address (same port), plus pre-bound sockets
  (``--fabric``: fdaa::3 port 53 inside the host's fabric netns, made by
  :func:`taxiway.platform.fabric.listen_socket`). A UDP answer larger than the
  client's EDNS size (512 without EDNS) is sent truncated (TC), and the client
  asks again over TCP.
- **Other names** are forwarded unchanged to the upstream resolvers (``--upstream``,
  default the host's /etc/resolv.conf nameservers), over the transport the client
  used; no answer from any upstream is SERVFAIL. Reverse names of fdaa::/16 stay
  here (NXDOMAIN): the private network's addresses are never asked outside.
  Only machines (and ``--org-of`` sources) forward, only class IN and ordinary types
  (:func:`dns.forward_refusal`), and a machine whose app's current release has
  ``[egress] mode = "enforce"`` only the names its egress ACL allows (RELEASES is
  mirrored for that, through :mod:`taxiway.platform.egresspolicy`): the rest is REFUSED
  (not NXDOMAIN: the name may well exist, this client may not look it up).
- **Limits**: every source address has a token bucket (``--rate-limit``, default 200
  queries/s, burst 400) checked before a query is parsed, so one tenant's flood is
  dropped cheaply and others are still answered; at most 32 forwarded queries of one
  source are in flight (512 in all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import orjson

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.listen import Listen, parse_listen
from taxiway.platform import dns, egresspolicy, schema

if TYPE_CHECKING:
    from taxiway.platform.state import State

FABRIC_ADDRESS = "fdaa::3"    # the contract's DNS address, inside every host's fabric
UDP_MAX = 1232                # the largest UDP answer we send, whatever EDNS offers (DNS flag day 2020)
UPSTREAM_TIMEOUT = 3.0        # per upstream server, then the next one
TCP_IDLE = 10.0               # seconds a TCP client may keep a connection without a query
MAX_TCP_CLIENTS = 256
CACHE_MAX = 8192              # answers kept between state changes
REVERSE_ZONE = "a.a.d.f.ip6.arpa"   # fdaa::/16


MAX_FORWARDS = 512            # forwarded UDP queries in flight; past it a query is dropped (the client retries)
MAX_FORWARDS_PER_SOURCE = 32  # of those, per source address: one machine cannot take every slot
RATE = 200.0                  # queries per second per source address (token bucket), then dropped
BURST = 400                   # the bucket's size: a program's start-up burst of lookups passes
RATE_SOURCES_MAX = 65536      # buckets kept; past it the full (idle) ones are forgotten


def _buckets() -> tuple[str, ...]:
    """What the answers are made of; NETWORKS: the org network numbers (platform.orgnet writes them)."""
    return (schema.APPS, schema.MACHINES, schema.STATUS, schema.NETWORKS, schema.RELEASES)


@dataclass
class DNSConfig:
    """Everything ``python -m taxiway.platform.dnsserver`` takes."""

    nats: str | None = None
    listen: list[Listen] = field(default_factory=list)
    upstream: list[tuple[str, int]] = field(default_factory=list)
    org_of: dict[Any, str] = field(default_factory=dict)   # ip_network -> org, for sources outside the fabric
    fabric: str = "no"          # "yes": listen inside the fabric; "auto": when this host has one; "no"
    rate: float = RATE          # queries/s per source address; 0: no limit
    burst: int = BURST
    ready_timeout: float = 30.0


def system_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf (read only), skipping fdaa::3 (ourselves, inside a machine)."""
    out = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] != FABRIC_ADDRESS:
                out.append((parts[1].split("%")[0], 53))
    return out


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        server = self.server
        if not server.admit(addr[0]):  # over its rate: dropped before any parsing
            return
        out = server.answer(data, addr[0], udp=True)
        if isinstance(out, bytes):
            self.transport.sendto(out, addr)  # type: ignore[union-attr]
        elif (out is not None and len(server._bg) < MAX_FORWARDS
              and server._inflight.get(addr[0], 0) < MAX_FORWARDS_PER_SOURCE):  # forward, off the hot path
            server._inflight[addr[0]] = server._inflight.get(addr[0], 0) + 1
            server._spawn(self._forward(data, addr))

    async def _forward(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            out = await self.server.forward(data, udp=True)
        finally:
            left = self.server._inflight.pop(addr[0], 1) - 1
            if left > 0:
                self.server._inflight[addr[0]] = left
        if out and len(out) > 512:  # an upstream may send more than this client takes over UDP
            out = _fit_udp(data, out)
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:  # an ICMP error for an earlier reply: nothing to do
        pass


class _Forward(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes, done: asyncio.Future[bytes]) -> None:
        self.qid, self.done = qid, done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:2] == self.qid and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


_FORWARD = object()  # answer(): "not ours, forward it"
_OPT = 41
_OPT_RR = b"\x00" + struct.pack("!HHIH", _OPT, UDP_MAX, 0, 0)   # EDNS0: our UDP size, no options


def _question_end(data: bytes) -> int:
    """Where the (one, already parsed) question of a query ends: its labels, type and class."""
    i = 12
    while data[i]:
        if data[i] & 0xC0:  # a pointer ends a name (queries do not use them, but may)
            return i + 6
        i += data[i] + 1
    return i + 5


def _name(text: str) -> bytes:
    return b"".join(_string(label) for label in text.split(".") if label) + b"\x00"


def _string(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def _rr(rtype: int, ttl: int, rdata: bytes) -> bytes:
    """An answer record owned by the question's name (a pointer to offset 12)."""
    return b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def _soa_rr() -> bytes:
    mname, rname, *times = dns.soa()
    rdata = _name(mname) + _name(rname) + struct.pack("!5I", *times)
    return _name(dns.ZONE) + struct.pack("!HHIH", 6, 1, dns.TTL, len(rdata)) + rdata


_SOA = _soa_rr()   # with NXDOMAIN and NODATA: resolvers cache the negative answer for TTL only


def _message(qid: bytes, flags: int, question: bytes, answers: list[bytes], auth: list[bytes],
             extra: list[bytes]) -> bytes:
    return (qid + struct.pack("!HHHHH", flags, 1, len(answers), len(auth), len(extra)) + question
            + b"".join(answers) + b"".join(auth) + b"".join(extra))


class DNSServer:
    """Mirror of the state, the answer cache, UDP and TCP listeners, the forwarder."""

    def __init__(self, config: DNSConfig, state: State | None = None, log: IO[bytes] | None = None,
                 sockets: Iterable[socket.socket] = ()) -> None:
        self.config = config
        self.state = state
        self._own_state = state is None
        self.log_out = log or sys.stdout.buffer
        self.sockets = list(sockets)
        self._records: dict[str, dict[str, Any]] = {b: {} for b in _buckets()}
        self._ready = {b: asyncio.Event() for b in self._records}
        self._snap: dns.Snapshot | None = None
        self._cache: dict[tuple[Any, ...], bytes] = {}
        # source address -> (asker, who forwards), until the state changes
        self._askers: dict[str, tuple[dns.Asker | None, str | None]] = {}
        self._egress = egresspolicy.Directory()   # machines' apps and their [egress], for forwarding
        self._buckets: dict[str, list[float]] = {}  # source address -> [tokens, last refill]
        self._inflight: dict[str, int] = {}         # source address -> forwarded UDP queries in flight
        self.dropped = 0                              # queries over a source's rate
        self._mirrors: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tcp_clients = 0
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self.addresses: list[tuple[str, int]] = []
        self.changes = 0  # state changes applied (tests wait on answers, not on this)

    # -- logging ----------------------------------------------------------------------------
    def log(self, **fields: object) -> None:
        fields.setdefault("time", round(time.time(), 3))
        with contextlib.suppress(Exception):
            self.log_out.write(orjson.dumps(fields, default=str) + b"\n")
            self.log_out.flush()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> list[tuple[str, int]]:
        """Connect, mirror the state, then listen; returns the (host, port) of every listener."""
        from taxiway.platform.state import State

        if self.state is None:
            self.state = await State.connect(self.config.nats, name="taxiway-dns")
        self._stopped = asyncio.Event()
        self._start_mirrors()
        self.state.on_reconnect(self._start_mirrors)
        try:
            async with asyncio.timeout(self.config.ready_timeout):
                await asyncio.gather(*(e.wait() for e in self._ready.values()))
        except TimeoutError:
            await self.close()
            raise TaxiwayError(f"the DNS records did not load from NATS within {self.config.ready_timeout:.0f} s",
                               "check that nats-server is healthy ('taxiway up')") from None
        try:
            for where in self.config.listen:
                await self._listen(where)
            for sock in self.sockets:
                await self._adopt(sock)
        except OSError as e:
            await self.close()
            raise TaxiwayError(f"cannot listen for DNS: {e.strerror or e}",
                               "pick a free port with --listen HOST:PORT") from None
        self.log(msg="listening", addresses=[str(Listen(h, p)) for h, p in self.addresses],
                 upstream=[f"{h}:{p}" for h, p in self.config.upstream])
        return self.addresses

    async def _listen(self, where: Listen) -> None:
        family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
        for _ in range(20):  # port 0: UDP picks a port, TCP must get the same one
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((where.host, where.port))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((where.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if where.port:
                    raise
                continue
            await self._adopt(udp)
            await self._adopt(tcp)
            return
        raise OSError(f"no port free for both UDP and TCP on {where.host}")

    async def _adopt(self, sock: socket.socket) -> None:
        """Serve on a bound socket (ours, or one made inside the fabric netns)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.type == socket.SOCK_DGRAM:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=sock)
            self._udp.append(transport)
            self.addresses.append(sock.getsockname()[:2])
        else:
            self._tcp.append(await asyncio.start_server(self._tcp_client, sock=sock, backlog=256))

    async def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        await self.start()
        assert self._stopped is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        await self.close()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def close(self) -> None:
        self._stopping = True
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        for t in [*self._mirrors, *self._bg]:
            t.cancel()
        if self._mirrors or self._bg:
            await asyncio.wait([*self._mirrors, *self._bg], timeout=5)
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)
        if self._own_state and self.state is not None:
            await self.state.close()
        self.log(msg="stopped")

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # -- the mirror ---------------------------------------------------------------------------
    def _start_mirrors(self) -> None:
        """(Re)start the watches: at start, and after NATS reconnected (a restarted server
        forgot their consumers, and the old watches would wait forever)."""
        if self._stopping:
            return
        for t in self._mirrors:
            t.cancel()
        self._mirrors = [asyncio.get_running_loop().create_task(self._mirror(b)) for b in self._records]

    async def _mirror(self, bucket: str) -> None:
        assert self.state is not None
        while True:
            ready = asyncio.Event()
            seen: set[str] = set()

            async def prune(ready: asyncio.Event = ready, seen: set[str] = seen) -> None:
                await ready.wait()  # the new watch's initial values are the truth: drop what vanished meanwhile
                for key in set(self._records[bucket]) - seen:
                    self._apply(bucket, key, None)
                self._ready[bucket].set()

            pruner = asyncio.get_running_loop().create_task(prune())
            try:
                async for key, value, _ in self.state.watch(bucket, ">", ready=ready):
                    seen.add(key)
                    self._apply(bucket, key, value)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # NATS went away: the client reconnects; watch again
                self.log(msg="watch failed", bucket=bucket, error=f"{type(e).__name__}: {e}")
            finally:
                pruner.cancel()
            await asyncio.sleep(0.5)

    def _apply(self, bucket: str, key: str, value: Any) -> None:
        if bucket == schema.STATUS:
            self._egress.status(key, value)
        elif bucket == schema.RELEASES:
            self._egress.release(key, value)
        if value is None:
            if self._records[bucket].pop(key, None) is None:
                return
        else:
            self._records[bucket][key] = value
        self._snap = None
        self._cache.clear()
        self._askers.clear()
        self.changes += 1

    @property
    def snapshot(self) -> dns.Snapshot:
        """The state as DNS sees it, indexed once per change."""
        if self._snap is None:
            r = self._records
            self._snap = dns.Snapshot.from_records(r[schema.APPS], r[schema.MACHINES], r[schema.STATUS],
                                                   r[schema.NETWORKS])
        return self._snap

    # -- answers ------------------------------------------------------------------------------
    def answer(self, data: bytes, source: str, udp: bool) -> bytes | object | None:
        """The reply to one query, ``_FORWARD`` when it is not ours, None to drop it (garbage).

        Replies are kept until the state changes, keyed by the asker and the query minus its
        id, so the usual query (the same names, again and again) costs two dict lookups.
        """
        snap = self.snapshot
        who = self._askers.get(source)
        if who is None:
            if len(self._askers) >= CACHE_MAX:
                self._askers.clear()
            who = self._askers[source] = self._who(snap, source)
        asker, forwarder = who
        key = (asker, forwarder, udp, data[2:])
        hit = self._cache.get(key)
        if hit is not None:
            return data[:2] + hit
        from dnslib import DNSRecord

        try:
            req = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - dnslib raises several types on garbage; no reply is owed
            return None
        if req.header.qr or len(req.questions) != 1 or len(data) < 12:
            return None
        out = self._local(data, req, asker, udp)
        if out is None:
            q = req.q
            acl = self._egress.acl_for(forwarder[2:]) if forwarder and forwarder.startswith("m:") else None
            rcode = dns.forward_refusal(q.qclass, q.qtype, str(q.qname), forwarder is not None, acl,
                                        forwarder[2:] if acl is not None else None)
            if rcode is None:
                return _FORWARD
            out = _message(data[:2], 0x8000 | (req.header.rd << 8) | 0x0080 | rcode,
                           data[12:_question_end(data)], [], [], [])
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = out[2:]
        return out

    def _who(self, snap: dns.Snapshot, source: str) -> tuple[dns.Asker | None, str | None]:
        """The asker of ``.internal`` names and who forwards: "m:<app>" for a machine (its app's
        [egress] decides), "operator" for a source named by ``--org-of``, None (no forwarding)
        for anyone else."""
        asker = dns.asker_for(snap, source, self.config.org_of)
        machine = self._egress.machine_of(source)
        if machine is not None:
            return asker, "m:" + machine.app
        if self.config.org_of and dns.asker_for(_EMPTY, source, self.config.org_of) is not None:
            return asker, "operator"
        return asker, None

    def admit(self, source: str) -> bool:
        """The per-source token bucket: False (drop the query) when ``source`` is over its rate.
        One dict lookup and a clock read per query, so a flood costs little before it is dropped."""
        rate = self.config.rate
        if rate <= 0:
            return True
        now = time.monotonic()
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= RATE_SOURCES_MAX:   # forget the idle ones (full buckets)
                burst = self.config.burst
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * rate < burst}
            b = self._buckets[source] = [float(self.config.burst), now]
        else:
            b[0] = min(float(self.config.burst), b[0] + (now - b[1]) * rate)
            b[1] = now
        if b[0] < 1.0:
            self.dropped += 1
            if self.dropped % 10000 == 1:
                self.log(msg="rate limited", source=source, dropped=self.dropped)
            return False
        b[0] -= 1.0
        return True

    def _local(self, data: bytes, req: Any, asker: dns.Asker | None, udp: bool) -> bytes | None:
        """Our reply to ``req`` (parsed from ``data``), written straight to the wire (dnslib's
        record objects cost ~1 ms for ten addresses); None when the name is not ours."""
        q = req.q
        name = str(q.qname)
        lname = name.rstrip(".").lower()
        opt = next((r for r in req.ar if r.rtype == _OPT), None)
        limit = min(max(512, opt.rclass), UDP_MAX) if (opt is not None and udp) else (512 if udp else 65535)
        question = data[12:_question_end(data)]  # as asked: its case is echoed (0x20 resolvers check it)
        flags = 0x8000 | (req.header.opcode << 11) | 0x0400 | (req.header.rd << 8) | 0x0080  # QR AA RD? RA
        rrs: list[bytes] = []
        auth: list[bytes] = []
        if req.header.opcode != 0:
            rcode = 4  # NOTIMP
        elif lname.endswith("." + REVERSE_ZONE) or lname == REVERSE_ZONE:
            rcode = dns.NXDOMAIN
        elif not dns.is_internal(name):
            return None
        elif q.qclass not in (1, 255):  # IN or ANY: other classes have no .internal names
            rcode = dns.REFUSED
        else:
            from dnslib import QTYPE

            ans = dns.resolve(self.snapshot, asker, name, QTYPE.get(q.qtype, str(q.qtype)))
            rcode = ans.rcode
            for r in ans.records:
                if r.type == "AAAA":
                    rrs.append(_rr(28, r.ttl, socket.inet_pton(socket.AF_INET6, r.value)))
                else:
                    rrs.append(_rr(16, r.ttl, b"".join(_string(x) for x in r.value)))
            if rcode in (dns.NOERROR, dns.NXDOMAIN) and not rrs:
                auth.append(_SOA)
        if rcode == dns.REFUSED:
            flags &= ~0x0400  # not authoritative for a stranger
        extra = [_OPT_RR] if opt is not None else []
        out = _message(data[:2], flags | rcode, question, rrs, auth, extra)
        if len(out) > limit:  # too big for UDP: the question and TC, the client asks over TCP
            out = _message(data[:2], flags | 0x0200 | rcode, question, [], [], extra)
        return out

    # -- forwarding ---------------------------------------------------------------------------
    async def forward(self, data: bytes, udp: bool) -> bytes | None:
        """Ask the upstreams in turn (same transport as the client); SERVFAIL when none answers."""
        for host, port in self.config.upstream:
            try:
                async with asyncio.timeout(UPSTREAM_TIMEOUT):
                    if udp:
                        return await self._forward_udp(data, host, port)
                    return await self._forward_tcp(data, host, port)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.log(msg="upstream failed", upstream=f"{host}:{port}", error=f"{type(e).__name__}: {e}")
        return _servfail(data)

    async def _forward_udp(self, data: bytes, host: str, port: int) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(lambda: _Forward(data[:2], done),
                                                           remote_addr=(host, port), family=family)
        try:
            transport.sendto(data)
            return await done
        finally:
            transport.close()

    async def _forward_tcp(self, data: bytes, host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            return await reader.readexactly(size)
        finally:
            writer.close()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else ""
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                if not self.admit(source):
                    break   # over its rate: the connection is closed
                out = self.answer(data, source, udp=False)
                if out is None:
                    break
                if not isinstance(out, bytes):
                    out = await self.forward(data, udp=False)
                    if out is None:
                        break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()


def _fit_udp(query: bytes, answer: bytes) -> bytes | None:
    """``answer`` if it fits the UDP size ``query`` offers (EDNS, else 512), else TC with the question."""
    from dnslib import EDNS0, QTYPE, DNSHeader, DNSRecord

    try:
        req = DNSRecord.parse(query)
    except Exception:  # noqa: BLE001 - garbage gets no answer
        return None
    opt = next((r for r in req.ar if r.rtype == QTYPE.OPT), None)
    if len(answer) <= (min(max(512, opt.rclass), UDP_MAX) if opt is not None else 512):
        return answer
    h = req.header
    tc = DNSRecord(DNSHeader(id=h.id, qr=1, ra=1, rd=h.rd, tc=1), q=req.q)
    if opt is not None:
        tc.add_ar(EDNS0(udp_len=UDP_MAX))
    return bytes(tc.pack())


_EMPTY = dns.Snapshot.from_records({}, {}, {}, {})   # asker_for() with --org-of alone


def _servfail(data: bytes) -> bytes | None:
    """SERVFAIL for ``data``'s question (None when it does not parse)."""
    from dnslib import RCODE, DNSRecord

    try:
        req = DNSRecord.parse(data)
    except Exception:  # noqa: BLE001 - garbage gets no answer
        return None
    reply = req.reply(aa=0)
    reply.header.rcode = RCODE.SERVFAIL
    return bytes(reply.pack())


# -- command line -----------------------------------------------------------------------------

def parse_org_of(items: Iterable[str]) -> dict[Any, str]:
    """``CIDR=ORG`` strings (``--org-of 127.0.0.1/32=personal``) -> {network: org}."""
    out: dict[Any, str] = {}
    for item in items:
        net, sep, org = item.partition("=")
        try:
            network = ipaddress.ip_network(net.strip(), strict=False)
        except ValueError:
            network = None
        if not sep or network is None or not schema.valid_org_name(org.strip()):
            raise InvalidInput(f"--org-of {item!r} is not CIDR=ORG", "e.g. --org-of 127.0.0.1/32=personal")
        out[network] = org.strip()
    return out


def parse_upstreams(items: Iterable[str]) -> list[tuple[str, int]]:
    from taxiway.egress.resolver import Resolver

    out = []
    for item in items:
        try:
            host, port = Resolver.parse_server(item)
            ipaddress.ip_address(host)
            if not 0 < port < 65536:
                raise ValueError(port)
        except ValueError:
            raise InvalidInput(f"--upstream {item!r} is not an address", "use IP, IP:PORT or [IPV6]:PORT") from None
        out.append((host, port))
    return out


def config_from_args(argv: list[str] | None = None) -> DNSConfig:
    p = argparse.ArgumentParser(prog="python -m taxiway.platform.dnsserver",
                                description="The platform's DNS: .internal names per org, other names forwarded.")
    p.add_argument("--nats", required=True, help="NATS URL of the platform (nats://127.0.0.1:PORT)")
    p.add_argument("--listen", action="append", default=[],
                   help="HOST:PORT or [IPV6]:PORT to answer on, UDP and TCP (repeatable)")
    p.add_argument("--fabric", nargs="?", const="yes", default="no", choices=("yes", "auto", "no"),
                   help=f"also answer on [{FABRIC_ADDRESS}]:53 inside this host's private network fabric "
                        "(auto: when the host has one)")
    p.add_argument("--upstream", action="append", default=[],
                   help="resolver for names outside .internal, IP[:PORT] (repeatable; default: /etc/resolv.conf's)")
    p.add_argument("--org-of", action="append", default=[], metavar="CIDR=ORG",
                   help="queries from these sources see ORG's names (sources outside the fabric)")
    p.add_argument("--rate-limit", default=f"{RATE:g}/{BURST}", metavar="QPS[/BURST]",
                   help="queries per second each source address may send (burst: how many at once); "
                        "the excess is dropped. 0: no limit")
    a = p.parse_args(argv)
    rate, _, burst = a.rate_limit.partition("/")
    try:
        qps = float(rate)
        size = int(burst) if burst else max(1, int(2 * qps))
        if qps < 0 or size < 1 or qps != qps:
            raise ValueError(a.rate_limit)
    except ValueError:
        raise InvalidInput(f"--rate-limit {a.rate_limit!r} is not QPS[/BURST]",
                           "e.g. --rate-limit 200/400 (or 0: no limit)") from None
    if not a.listen and a.fabric == "no":
        raise InvalidInput("nothing to listen on", "give --listen HOST:PORT and/or --fabric")
    upstream = parse_upstreams(a.upstream) if a.upstream else system_upstreams()
    return DNSConfig(nats=a.nats, listen=[parse_listen(x) for x in a.listen], upstream=upstream,
                     org_of=parse_org_of(a.org_of), fabric=a.fabric, rate=qps, burst=size)


def fabric_sockets(mode: str = "yes") -> list[socket.socket]:
    """UDP and TCP sockets on fdaa::3 port 53, bound inside the host's fabric netns
    (none with ``mode`` "auto" when the host has no fabric)."""
    if mode == "no":
        return []
    try:
        from taxiway.platform import fabric
    except ImportError:
        if mode == "auto":
            return []
        raise TaxiwayError("--fabric: the private network (taxiway.platform.fabric) is not installed",
                           "leave out --fabric") from None
    if mode == "auto":  # the platform's one switch (TAXIWAY_PRIVATE_NETWORK=0, tools missing), then the netns
        fab = fabric.host_fabric()
        if fab is None or not fab.exists():
            return []
    return [fabric.listen_socket(socket.AF_INET6, socket.SOCK_DGRAM, FABRIC_ADDRESS, 53),
            fabric.listen_socket(socket.AF_INET6, socket.SOCK_STREAM, FABRIC_ADDRESS, 53)]


def _run(main: Callable[[], Any]) -> None:
    try:
        import uvloop  # fewer system calls per datagram than asyncio's selector loop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        sockets = fabric_sockets(config.fabric)
        _run(DNSServer(config, sockets=sockets).serve_forever)
    except TaxiwayError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
