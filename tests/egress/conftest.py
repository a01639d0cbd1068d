"""Real servers for the egress tests, all on loopback.

- ``upstream``: an HTTP/1.1 keep-alive server on 127.0.0.2 (the stand-in for
  "the internet", allowed with ``--allow-range 127.0.0.2/32``).
- ``trap``: servers on 127.0.0.1 and 127.0.0.3 that must never get a connection
  (the stand-ins for internal services).
- ``dns``: a dnslib server on 127.0.0.1 mapping test names to those addresses,
  including one that alternates answers (rebinding) and a CNAME to an internal name.
- ``start_proxy``: ``taxiway egress serve`` as a subprocess, with ``--resolver``
  pointing at ``dns``, so nothing is ever resolved or dialled outside loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.servers import Server, free_port, serve

# The proxies started here inherit this environment; a password set outside must not leak in
# (an empty one is refused by `egress serve`).
os.environ.pop("PROXY_PASSWORD", None)

ALLOWED = "127.0.0.2"
INTERNAL = "127.0.0.3"


class Upstream:
    """A tiny asyncio HTTP/1.1 server in a thread; counts the connections it accepts."""

    def __init__(self, host: str, port: int = 0, ssl=None):  # noqa: ANN001
        self.host = host
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def main() -> None:
            self.server = await asyncio.start_server(self._handle, host, port, ssl=ssl)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(main, ready), daemon=True)
        self.thread.start()
        ready.wait(10)
        if not self.port:
            raise RuntimeError(f"test upstream on {host}:{port} did not start: {self.error!r}")

    def _run(self, main, ready: threading.Event) -> None:  # noqa: ANN001
        try:
            self.loop.run_until_complete(main())
        except BaseException as e:
            self.error = e
            ready.set()
            return
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                self.requests.append((method, path, headers))
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                if path.startswith("/big/"):
                    payload = b"x" * int(path.split("/")[2])
                elif path.startswith("/slow/"):
                    await asyncio.sleep(float(path.split("/")[2]))
                    payload = b"slow\n"
                else:
                    payload = f"{method} {path} host={headers.get('host')}\n".encode() + body
                close = headers.get("connection", "").lower() == "close"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Upstream: %s\r\n%s\r\n" % (
                    len(payload), self.host.encode(), b"Connection: close\r\n" if close else b"") + payload)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def _servers() -> Iterator[tuple[Upstream, Traps]]:
    """The upstream and the traps on one port (retried if another process holds it)."""
    for _ in range(20):
        u = Upstream(ALLOWED)
        try:
            t = Traps(u.port)
        except RuntimeError:
            u.close()
            continue
        yield u, t
        t.close()
        u.close()
        return
    raise RuntimeError("no port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 at once")


@pytest.fixture(scope="session")
def upstream(_servers) -> Upstream:
    return _servers[0]


class Traps:
    """Servers on internal loopback addresses; any connection to them is a failure."""

    def __init__(self, port: int) -> None:
        # Same port as the allowed upstream: a proxy dialling the wrong address would land here.
        self.port = port
        self.servers: list[Upstream] = []
        try:
            for host in ("127.0.0.1", INTERNAL):
                self.servers.append(Upstream(host, port))
        except RuntimeError:
            self.close()
            raise

    @property
    def connections(self) -> int:
        return sum(s.connections for s in self.servers)

    def close(self) -> None:
        for s in self.servers:
            s.close()


@pytest.fixture(scope="session")
def traps(_servers) -> Traps:
    return _servers[1]


class LoopbackDNS:
    """A DNS server for test names; everything else is NXDOMAIN."""

    def __init__(self) -> None:
        from dnslib import AAAA, CNAME, QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSServer

        self.flip = itertools.count()
        self.queries: list[str] = []
        outer = self

        table = {
            "ok.test": [("A", ALLOWED)],
            "www.ok.test": [("A", ALLOWED)],
            "xn--e1aybc.test": [("A", ALLOWED)],  # тест.test
            "internal.test": [("A", INTERNAL)],
            "localhost.test": [("A", "127.0.0.1")],
            "metadata.test": [("A", "169.254.169.254")],
            "private.test": [("A", "10.0.0.1")],
            "mapped.test": [("AAAA", "::ffff:127.0.0.3")],
            "nat64.test": [("AAAA", "64:ff9b::7f00:3")],
            "ula.test": [("AAAA", "fdaa::1")],
            "unspecified.test": [("A", "0.0.0.0")],
            "cname.test": [("CNAME", "internal.test"), ("A@internal.test", INTERNAL)],
            "cname-ok.test": [("CNAME", "ok.test"), ("A@ok.test", ALLOWED)],
            "mixed.test": [("A", INTERNAL), ("A", ALLOWED)],
        }

        class Resolver(BaseResolver):
            def resolve(self, request, handler):  # noqa: ANN001
                reply = request.reply()
                qname = str(request.q.qname).rstrip(".").lower()
                qtype = QTYPE[request.q.qtype]
                outer.queries.append(f"{qname}/{qtype}")
                if qname == "rebind.test":
                    # Alternates between the allowed and an internal address, TTL 0.
                    if qtype == "A":
                        addr = ALLOWED if next(outer.flip) % 2 == 0 else INTERNAL
                        reply.add_answer(RR(qname, QTYPE.A, rdata=A(addr), ttl=0))
                    return reply
                records = table.get(qname)
                if records is None:
                    reply.header.rcode = 3  # NXDOMAIN
                    return reply
                for kind, value in records:
                    owner = qname
                    if "@" in kind:
                        kind, owner = kind.split("@")
                    if kind == "CNAME":
                        reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(value), ttl=0))
                    elif kind == qtype == "A":
                        reply.add_answer(RR(owner, QTYPE.A, rdata=A(value), ttl=0))
                    elif kind == qtype == "AAAA":
                        reply.add_answer(RR(owner, QTYPE.AAAA, rdata=AAAA(tuple(ipaddress.IPv6Address(value).packed)), ttl=0))
                return reply

        self.port = free_port()
        self.server = DNSServer(Resolver(), port=self.port, address="127.0.0.1", tcp=False,
                                logger=_QuietLogger())
        self.server.start_thread()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop()


class _QuietLogger:
    def __getattr__(self, name):  # noqa: ANN001
        return lambda *a, **k: None


@pytest.fixture(scope="session")
def dns() -> Iterator[LoopbackDNS]:
    d = LoopbackDNS()
    yield d
    d.close()


@contextlib.contextmanager
def proxy_server(log_dir: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> Iterator[Server]:
    """``taxiway egress serve --listen 127.0.0.1:PORT ARGS`` until the block ends."""
    port = port or free_port()
    argv = [sys.executable, "-m", "taxiway", "egress", "serve", "--listen", f"127.0.0.1:{port}", *args]
    env = dict(env or {})
    with serve(argv, port, log=log_dir / f"egress-{port}.log", env=env) as s:
        yield s


@pytest.fixture
def start_proxy(tmp_path, dns):
    """``start_proxy(*args, env=...)``: a proxy with --resolver and --allow-range 127.0.0.2/32."""
    with contextlib.ExitStack() as stack:
        def start(*args: str, env: dict[str, str] | None = None, allow: bool = True) -> Server:
            base = ["--resolver", dns.address] + (["--allow-range", f"{ALLOWED}/32"] if allow else [])
            return stack.enter_context(proxy_server(tmp_path, *base, *args, env=env))
        yield start


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory, dns):
    """One plain proxy (no auth, no ACL) for the many read-only tests of a module."""
    d = tmp_path_factory.mktemp("egress")
    with proxy_server(d, "--resolver", dns.address, "--allow-range", f"{ALLOWED}/32") as s:
        yield s


def raw_request(proxy: Server, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` to the proxy and read until it closes (or answers a complete response)."""
    import socket

    with socket.create_connection((proxy.host, proxy.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except TimeoutError:
                break
            if not c:
                break
            chunks.append(c)
            buf = b"".join(chunks)
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    break
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0
