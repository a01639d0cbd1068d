"""The edge's TLS side: HTTPS (HTTP/1.1 and HTTP/2) with certificates issued on first use.

:class:`EdgeTLS` is started by :class:`taxiway.platform.edge.Edge` when its config
has ``https`` (``taxiway up`` listens on 127.0.0.1:8443). For each connection it
**peeks** at the ClientHello before any TLS work (:func:`parse_client_hello`, pure),
so it knows the server name (SNI) and the offered ALPN protocols, and then:

- ``<app>.<domain>`` of an app that exists, or a custom hostname of an app
  (``taxiway certs add APP HOST``, the CERTS bucket): the handshake completes with
  that host's certificate (:class:`CertStore`: issued by taxiway's CA on first use,
  cached in memory and as 0600 files, renewed a third of its lifetime before
  expiry; or the host's ACME certificate once :mod:`taxiway.platform.acme` got
  one). ALPN ``h2`` goes to :mod:`taxiway.platform.edgeh2`, anything else to the
  edge's own HTTP/1.1 protocol, with ``X-Forwarded-Proto: https``.
- ``acme-tls/1`` offered for a name with a pending TLS-ALPN-01 challenge: the
  challenge certificate (RFC 8737), then the connection ends.
- Any other name, or none: a fatal ``unrecognized_name`` alert, as nginx's
  ``ssl_reject_handshake`` does; nothing of what exists is revealed, and no
  certificate is made for names a scanner makes up.

On the plain listener, :meth:`EdgeTLS.intercept` answers
``/.well-known/acme-challenge/<token>`` (HTTP-01) and redirects apps whose http
service says ``force_https`` (301 to the HTTPS listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taxiway.egress import http
from taxiway.platform import schema
from taxiway.platform.balance import http_service

if TYPE_CHECKING:
    from taxiway.platform.edge import Edge
    from taxiway.platform.edgehttp import Plan

ACME_TLS_ALPN = "acme-tls/1"
CERTS_SUBJECT = "edge.certs"  # request/reply: {} -> {"ok", "edge", "https", "hosts": {hostname: {...}}}
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
MAX_HELLO = 16 * 1024 + 5      # one TLS record: every ClientHello a real client sends fits
_ALERT_UNRECOGNIZED_NAME = bytes([21, 3, 3, 0, 2, 2, 112])  # fatal alert 112, TLS record
_PLAIN_TO_TLS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ")


# -- the ClientHello, sans I/O -----------------------------------------------------------------------

class NotTLS(ValueError):
    """The bytes are not the start of a TLS ClientHello."""


@dataclass(frozen=True)
class Hello:
    """What a ClientHello says before any cryptography: the server name and the ALPN offer."""

    server_name: str | None
    alpn: tuple[str, ...] = ()


def _valid_hostname(name: str) -> bool:
    if not 0 < len(name) <= 253:
        return False
    labels = name.split(".")
    return all(0 < len(label) <= 63 and label.isascii() and not label.startswith("-") and not label.endswith("-")
               and all(c.isalnum() or c in "-_" for c in label) for label in labels)


def parse_client_hello(data: bytes) -> Hello | None:
    """The server name and ALPN protocols of the ClientHello at the start of ``data``.

    None while more bytes are needed; :class:`NotTLS` when the bytes cannot be one
    (other protocol, broken lengths, over :data:`MAX_HELLO`). A server name that is
    not a valid DNS name reads as None (unknown).
    """
    hs = bytearray()
    i = 0
    need = -1
    while need < 0 or len(hs) < need:
        if len(data) < i + 5:
            if i + 5 > MAX_HELLO:
                raise NotTLS("ClientHello too large")
            return None
        ctype, major, rlen = data[i], data[i + 1], int.from_bytes(data[i + 3:i + 5], "big")
        if ctype != 22 or major != 3 or rlen == 0 or rlen > 16384:
            raise NotTLS("not a TLS handshake record")
        if i + 5 + rlen > MAX_HELLO:
            raise NotTLS("ClientHello too large")
        if len(data) < i + 5 + rlen:
            return None
        hs += data[i + 5:i + 5 + rlen]
        i += 5 + rlen
        if need < 0 and len(hs) >= 4:
            if hs[0] != 1:
                raise NotTLS("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
    return _hello_body(bytes(hs[4:need]))


def _hello_body(b: bytes) -> Hello:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(b):
            raise NotTLS("truncated ClientHello")
        out = b[pos:pos + n]
        pos += n
        return out

    def vec(size: int) -> bytes:
        return take(int.from_bytes(take(size), "big"))

    take(2 + 32)        # legacy_version, random
    vec(1)              # legacy_session_id
    vec(2)              # cipher_suites
    vec(1)              # legacy_compression_methods
    name: str | None = None
    alpn: list[str] = []
    if pos == len(b):
        return Hello(None, ())
    exts = vec(2)
    j = 0
    while j < len(exts):
        if j + 4 > len(exts):
            raise NotTLS("truncated extension")
        etype = int.from_bytes(exts[j:j + 2], "big")
        elen = int.from_bytes(exts[j + 2:j + 4], "big")
        edata = exts[j + 4:j + 4 + elen]
        if len(edata) != elen:
            raise NotTLS("truncated extension")
        j += 4 + elen
        if etype == 0 and len(edata) >= 2:  # server_name: a list of (type, name); host_name is 0
            lst = edata[2:2 + int.from_bytes(edata[:2], "big")]
            k = 0
            while k + 3 <= len(lst):
                ntype, nlen = lst[k], int.from_bytes(lst[k + 1:k + 3], "big")
                raw = lst[k + 3:k + 3 + nlen]
                k += 3 + nlen
                if ntype == 0 and name is None:
                    with contextlib.suppress(UnicodeDecodeError):
                        text = raw.decode("ascii").lower().rstrip(".")
                        name = text if _valid_hostname(text) else None
        elif etype == 16 and len(edata) >= 2:  # ALPN: a list of length-prefixed protocol names
            lst = edata[2:2 + int.from_bytes(edata[:2], "big")]
            k = 0
            while k < len(lst):
                plen = lst[k]
                alpn.append(lst[k + 1:k + 1 + plen].decode("latin-1"))
                k += 1 + plen
    return Hello(name, tuple(alpn))


# -- policy, sans I/O ---------------------------------------------------------------------------------

def app_for_server_name(name: str | None, domain: str, hostnames: Mapping[str, Mapping[str, Any]],
                        known: Any) -> str | None:
    """The app a TLS server name belongs to: ``<app>.<domain>`` of an app ``known(app)`` says
    exists, or a custom hostname of the CERTS bucket; None for anything else."""
    if not name:
        return None
    rec = hostnames.get(name)
    if rec is not None:
        return str(rec.get("app")) if rec.get("app") else None
    suffix = "." + domain
    if name.endswith(suffix):
        label = name[: -len(suffix)]
        if schema.valid_app_name(label) and known(label):
            return label
    return None


def redirect_to_https(head: http.RequestHead, host: str, https_port: int) -> bytes:
    """A 301 to the same target on the HTTPS listener (the port left out when it is 443)."""
    name = host.strip()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    else:
        name = name.rpartition(":")[0] if ":" in name else name
    target = head.target if head.target.startswith("/") else "/"
    authority = name if https_port == 443 else f"{name}:{https_port}"
    location = f"https://{authority}{target}"
    return http.simple_response(301, f"moved to {location}\n", [("Location", location)])


def wants_force_https(machine_configs: list[Mapping[str, Any] | None]) -> bool:
    """Whether the app's http service says ``force_https`` on any of its ports (any machine)."""
    for cfg in machine_configs:
        svc = http_service(cfg)
        for p in (svc or {}).get("ports") or []:
            if isinstance(p, Mapping) and p.get("force_https"):
                return True
    return False


def tls_tcp_services(config: Mapping[str, Any] | None) -> list[tuple[int, int, bool]]:
    """A machine's TCP services whose port has a ``tls`` handler and no ``http`` one (Fly's
    ``handlers = ["tls"]``: the edge terminates TLS, the machine gets plain TCP):
    ``[(edge port, internal_port, proxy_proto)]``. (Those without ``tls`` are the edge's own.)"""
    out = []
    for svc in (config or {}).get("services") or []:
        if not isinstance(svc, Mapping) or svc.get("protocol", "tcp") != "tcp":
            continue
        ports = [p for p in svc.get("ports") or [] if isinstance(p, Mapping)]
        internal = svc.get("internal_port")
        if any("http" in (p.get("handlers") or []) for p in ports) or not _port_number(internal):
            continue
        for p in ports:
            handlers = p.get("handlers") or []
            if "tls" in handlers and _port_number(p.get("port")):
                out.append((p["port"], internal, "proxy_proto" in handlers))
    return out


def _port_number(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536


def tls_tcp_listeners(machines: Mapping[str, Mapping[str, Any]]) -> dict[int, tuple[str, int, bool]]:
    """``{edge port: (app, internal_port, proxy_proto)}`` over MACHINES records (key ``<app>.<id>``);
    when apps claim one port, the first app by name keeps it."""
    out: dict[int, tuple[str, int, bool]] = {}
    for key in sorted(machines):
        rec = machines[key]
        if rec.get("desired") == "destroyed":
            continue
        for port, internal, pp in tls_tcp_services(rec.get("config")):
            out.setdefault(port, (key.partition(".")[0], internal, pp))
    return out


def due(not_after: datetime, lifetime: timedelta, now: datetime | None = None) -> bool:
    """Whether a certificate should be renewed now: in the last third of its lifetime."""
    now = now or datetime.now(UTC)
    return not_after - now < lifetime / 3


# -- certificates -------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    context: ssl.SSLContext
    not_after: datetime
    lifetime: timedelta
    source: str  # "ca" | "acme"
    context_of: ssl.SSLContext | None = None  # a TCP service's copy: of which HTTPS context


@dataclass
class CertStore:
    """Server certificates per hostname: taxiway CA leaves made on first use, or ACME ones.

    Files: ``<dir>/ca/<host>.pem`` and ``<dir>/acme/<host>.pem`` (key and chain, 0600).
    Contexts are kept in memory (at most ``max_cached``, least recently used first out).
    """

    directory: Path
    ca_dir: str | None = None
    validity: timedelta = timedelta(days=30)
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    max_cached: int = 10_000
    clock: Any = None  # () -> aware datetime; tests move time forward
    _cache: OrderedDict[str, _Loaded] = field(default_factory=OrderedDict)
    _ca: Any = None

    def __post_init__(self) -> None:
        for sub in ("ca", "acme"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)

    @property
    def ca(self) -> Any:
        if self._ca is None:
            from taxiway.pki.ca import CA

            self._ca = CA.load(self.ca_dir)
        return self._ca

    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    def path(self, source: str, host: str) -> Path:
        return self.directory / source / f"{host}.pem"

    def new_context(self, pem_path: Path | None = None, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn != ():
            ctx.set_alpn_protocols(list(alpn if alpn is not None else self.alpn))
        if pem_path is not None:
            ctx.load_cert_chain(pem_path)
        return ctx

    def context_for(self, host: str, acme: bool = False, tcp: bool = False) -> ssl.SSLContext:
        """The context serving ``host``: cached, else from its file, else newly issued by the CA.

        ``acme``: the host's ACME certificate when one is on disk and current; until
        then (and if it lapses) a CA certificate keeps the host reachable.
        """
        if tcp:  # a TCP service: the same certificate, no ALPN offered (the protocol is the app's)
            ctx = self.context_for(host, acme)
            key = host + "\0tcp"
            got = self._cache.get(key)
            if got is None or got.context_of is not ctx:
                path = self.path(self._cache[host].source, host)
                got = _Loaded(self.new_context(path, alpn=()), self._cache[host].not_after,
                              self._cache[host].lifetime, self._cache[host].source, context_of=ctx)
                self._cache[key] = got
            return got.context
        got = self._cache.get(host)
        if got is not None and not due(got.not_after, got.lifetime, self.now()) and (got.source == "acme" or not acme
                                                                           or not self._acme_ready(host)):
            self._cache.move_to_end(host)
            return got.context
        loaded = (self._load("acme", host) if acme else None) or self._load("ca", host) or self._issue(host)
        self._cache[host] = loaded
        self._cache.move_to_end(host)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return loaded.context

    def forget(self, host: str) -> None:
        self._cache.pop(host, None)
        self._cache.pop(host + "\0tcp", None)

    def cached(self) -> dict[str, dict[str, Any]]:
        return {h: {"source": c.source, "not_after": c.not_after.isoformat()} for h, c in self._cache.items()
                if "\0" not in h}

    def _acme_ready(self, host: str) -> bool:
        info = read_pem_info(self.path("acme", host))
        return info is not None and not due(info[0], info[1], self.now())

    def _load(self, source: str, host: str) -> _Loaded | None:
        path = self.path(source, host)
        info = read_pem_info(path)
        if info is None or due(info[0], info[1], self.now()):
            return None
        try:
            ctx = self.new_context(path)
        except (ssl.SSLError, OSError):
            return None
        return _Loaded(ctx, info[0], info[1], source)

    def _issue(self, host: str) -> _Loaded:
        from taxiway.fsutil import atomic_write

        leaf = self.ca.issue([host], validity=self.validity, record=False)
        path = self.path("ca", host)
        assert leaf.key_pem is not None
        with atomic_write(path, mode=0o600) as f:
            f.write(leaf.key_pem + leaf.chain_pem)
        return _Loaded(self.new_context(path), leaf.not_after, leaf.not_after - leaf.not_before, "ca")

    def renew_due(self) -> list[str]:
        """Re-issue every cached CA certificate that is due (the next handshake would anyway)."""
        renewed = []
        for host, got in list(self._cache.items()):
            if "\0" in host:
                continue
            if due(got.not_after, got.lifetime, self.now()):
                self._cache.pop(host, None)
                if got.source == "ca":
                    self.context_for(host)
                renewed.append(host)
        return renewed


def read_pem_info(path: Path) -> tuple[datetime, timedelta] | None:
    """(not_after, lifetime) of the first certificate in a PEM file; None if absent or unreadable."""
    from cryptography import x509

    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificates(data)[0]
    except (OSError, ValueError, IndexError):
        return None
    return cert.not_valid_after_utc, cert.not_valid_after_utc - cert.not_valid_before_utc


# -- the listener -------------------------------------------------------------------------------------

class EdgeTLS:
    """The HTTPS listener of an :class:`Edge`, its certificates and its ACME answers."""

    def __init__(self, edge: Edge) -> None:
        cfg = edge.config
        assert cfg.https is not None
        self.edge = edge
        self.listen = cfg.https
        if cfg.tls_dir:
            directory = Path(cfg.tls_dir)
        else:
            from taxiway.paths import home

            directory = home() / "platform" / "edge-tls"
        try:
            import h2  # noqa: F401 - HTTP/2 is offered only where the h2 library is installed
            alpn: tuple[str, ...] = ("h2", "http/1.1")
        except ImportError:
            alpn = ("http/1.1",)
        self.certs = CertStore(directory, cfg.ca, alpn=alpn)
        self.hostnames: dict[str, dict[str, Any]] = {}   # CERTS bucket: hostname -> record
        self.http_tokens: dict[str, str] = {}             # HTTP-01: token -> key authorization
        self.alpn_challenges: dict[str, ssl.SSLContext] = {}  # TLS-ALPN-01: hostname -> challenge context
        self.address: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._pending: dict[socket.socket, float] = {}    # accepted, ClientHello not read yet: deadline
        self._pending_tcp: dict[socket.socket, int] = {}  # ...of those, accepted on a TLS TCP service's port
        self._tcp: dict[int, socket.socket] = {}          # TLS TCP services: edge port -> listening socket
        self._tcp_specs: dict[int, tuple[str, int, bool]] = {}  # edge port -> (app, internal_port, proxy_proto)
        self._tcp_failed: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._conns: set[Any] = set()                     # HTTP/2 connections (closed at stop)
        self._force: dict[str, tuple[tuple, bool]] = {}
        self._mirror: asyncio.Task | None = None
        self._subs: list[Any] = []
        self._ready = asyncio.Event()
        self.acme: Any = None
        self.handshakes = 0

    # -- lifecycle
    async def start(self) -> tuple[str, int]:
        """Load the custom hostnames, then listen; returns (host, port)."""
        from taxiway.errors import TaxiwayError

        loop = asyncio.get_running_loop()
        self.certs.ca  # noqa: B018 - a missing CA is an error at start, not at the first handshake
        self._start_mirror()
        assert self.edge.state is not None
        self.edge.state.on_reconnect(self._start_mirror)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.edge.config.ready_timeout)
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as e:
            sock.close()
            raise TaxiwayError(f"cannot listen for HTTPS on {host}:{port}: {e.strerror}",
                               "pick a free port with --https HOST:PORT") from None
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        loop.add_reader(sock.fileno(), self._accept)
        self._spawn(self._sweep())
        self._sync_tcp()
        from taxiway.platform.acme import AcmeManager

        self.acme = AcmeManager(self)
        self._spawn(self.acme.run())
        self._subs.append(await self.edge.state.serve(CERTS_SUBJECT, self._answer_certs))
        self.edge.log(msg="listening https", address=f"{self.address[0]}:{self.address[1]}",
                      alpn=list(self.certs.alpn), hostnames=sorted(self.hostnames))
        return self.address

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for s in list(self._pending):
            self._drop(s)
        for port in list(self._tcp):
            self._close_tcp(port)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for c in list(self._conns):
            with contextlib.suppress(Exception):
                c.shutdown()
        if self._mirror is not None:
            self._mirror.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _answer_certs(self, req: dict[str, Any]) -> dict[str, Any]:
        """``edge.certs``: for each hostname served, its certificate's source and expiry, ACME state."""
        cached = self.certs.cached()
        hosts: dict[str, Any] = {}
        for host in sorted(set(self.hostnames) | set(cached)):
            info = dict(cached.get(host) or {})
            if self.acme is not None and host in self.acme.status:
                info["acme"] = self.acme.status[host]
            hosts[host] = info
        return {"ok": True, "edge": self.edge.name, "hosts": hosts,
                "https": f"{self.address[0]}:{self.address[1]}" if self.address else None}

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- custom hostnames: a mirror of the CERTS bucket
    def _start_mirror(self) -> None:
        if self._mirror is not None:
            self._mirror.cancel()
        self._mirror = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        assert self.edge.state is not None
        while True:
            ready = asyncio.Event()
            seen: dict[str, dict[str, Any]] = {}
            waiter = asyncio.get_running_loop().create_task(ready.wait())

            def publish(seen: dict[str, dict[str, Any]] = seen) -> None:
                self.hostnames = dict(seen)
                self.edge.set_hostnames({h: str(r.get("app")) for h, r in seen.items() if r.get("app")})
                if self.acme is not None:
                    self.acme.wake()
                self._ready.set()

            waiter.add_done_callback(lambda t: None if t.cancelled() else publish())
            try:
                async for key, value, _ in self.edge.state.watch(schema.CERTS, ">", ready=ready):
                    if isinstance(value, dict):
                        seen[key] = value
                    else:
                        seen.pop(key, None)
                        self.certs.forget(key)
                    if ready.is_set():
                        publish()
            except asyncio.CancelledError:
                waiter.cancel()
                raise
            except Exception as e:  # NATS went away: watch again (on_reconnect restarts us too)
                self.edge.log(msg="watch failed", bucket=schema.CERTS, error=f"{type(e).__name__}: {e}")
            waiter.cancel()
            await asyncio.sleep(0.5)

    # -- accepting: peek at the ClientHello, then hand the socket to asyncio's TLS
    def _accept(self, sock: socket.socket | None = None, port: int | None = None) -> None:
        """Accept on the HTTPS listener, or (``port``) on a TLS TCP service's."""
        loop = asyncio.get_running_loop()
        sock = sock or self._sock
        assert sock is not None
        for _ in range(64):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.edge.log(msg="accept failed", error=str(e))
                return
            if self.edge._at_capacity() or len(self._pending) >= self.edge.config.max_connections:  # noqa: SLF001
                conn.close()  # one limit for both listeners; ClientHellos not read yet count too
                continue
            conn.setblocking(False)
            self._pending[conn] = loop.time() + self.edge.config.header_timeout
            if port is not None:
                self._pending_tcp[conn] = port
            loop.add_reader(conn.fileno(), self._peek, conn)

    def _drop(self, conn: socket.socket, data: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        self._pending_tcp.pop(conn, None)
        if self._pending.pop(conn, None) is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(conn.fileno())
        if data:
            with contextlib.suppress(OSError):
                conn.send(data)
        conn.close()

    def _peek(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = conn.recv(MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        try:
            hello = parse_client_hello(data)
        except NotTLS:
            if data.startswith(_PLAIN_TO_TLS):
                self._drop(conn, http.simple_response(400, "this port speaks HTTPS; use https://\n"))
            else:
                self._drop(conn)
            return
        if hello is None:
            # Part of a ClientHello: the socket stays readable while bytes wait, so look again shortly.
            loop.remove_reader(conn.fileno())
            loop.call_later(0.01, self._repeek, conn)
            return
        loop.remove_reader(conn.fileno())
        deadline = self._pending.pop(conn)
        port = self._pending_tcp.pop(conn, None)
        spec = self._tcp_specs.get(port) if port is not None else None
        if port is not None:
            ctx = self.tcp_context_for(hello, spec[0]) if spec is not None else None
        else:
            ctx = self.context_for(hello)
        if ctx is None:
            self.edge.log(msg="tls refused", server_name=hello.server_name, port=port)
            self._drop(conn, _ALERT_UNRECOGNIZED_NAME)
            return
        self.handshakes += 1
        if spec is not None:
            try:
                peer = conn.getpeername()[:2]
            except OSError:  # gone already
                conn.close()
                return
            factory: Any = lambda: _TcpRelay(self, spec, peer)  # noqa: E731
        else:
            factory = lambda: _Dispatch(self)  # noqa: E731
        self._spawn(self._handshake(conn, ctx, max(deadline - loop.time(), 0.5), factory))

    def _repeek(self, conn: socket.socket) -> None:
        if conn in self._pending and conn.fileno() >= 0:
            asyncio.get_running_loop().add_reader(conn.fileno(), self._peek, conn)

    async def _handshake(self, conn: socket.socket, ctx: ssl.SSLContext, timeout: float, factory: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(factory, conn, ssl=ctx, ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            self.edge.log(msg="tls handshake failed", error=f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):
                conn.close()

    async def _sweep(self) -> None:
        """Cut connections whose ClientHello did not arrive in time; renew certificates when due."""
        loop = asyncio.get_running_loop()
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            self._sync_tcp()
            now = loop.time()
            for conn, deadline in list(self._pending.items()):
                if now > deadline:
                    self._drop(conn)
            if time.monotonic() - last_renew > 3600:
                last_renew = time.monotonic()
                renewed = self.certs.renew_due()
                if renewed:
                    self.edge.log(msg="certificates renewed", hosts=renewed)

    def context_for(self, hello: Hello) -> ssl.SSLContext | None:
        """The context a ClientHello gets (None: refuse the handshake)."""
        name = hello.server_name
        if name is None:
            return None
        if ACME_TLS_ALPN in hello.alpn:
            return self.alpn_challenges.get(name)
        app = app_for_server_name(name, self.edge.config.domain, self.hostnames, self.edge.routes.known)
        if app is None:
            return None
        rec = self.hostnames.get(name) or {}
        try:
            return self.certs.context_for(name, acme=bool(rec.get("acme")))
        except Exception as e:  # a CA that refuses the name (constraints), a damaged file: refuse it
            self.edge.log(msg="certificate failed", server_name=name, error=f"{type(e).__name__}: {e}")
            return None

    # -- TCP services with a "tls" handler: TLS ends here, the machine gets plain TCP
    def tcp_context_for(self, hello: Hello, app: str) -> ssl.SSLContext | None:
        """The port names the app: its certificate for the name asked (one of the app's), else for
        ``<app>.<domain>`` (clients of TCP protocols often send no SNI); never another app's."""
        name = hello.server_name
        if name is None or app_for_server_name(name, self.edge.config.domain, self.hostnames,
                                               self.edge.routes.known) != app:
            name = f"{app}.{self.edge.config.domain}"
        rec = self.hostnames.get(name) or {}
        try:
            return self.certs.context_for(name, acme=bool(rec.get("acme")), tcp=True)
        except Exception as e:
            self.edge.log(msg="certificate failed", server_name=name, error=f"{type(e).__name__}: {e}")
            return None

    def _sync_tcp(self) -> None:
        """Listen on every TLS TCP service's port (on the edge's host), stop on gone ones."""
        loop = asyncio.get_running_loop()
        want = tls_tcp_listeners(self.edge.routes.machines)
        for port in [p for p in self._tcp if p not in want]:
            self._close_tcp(port)
            self.edge.log(msg="tls tcp service closed", port=port)
        self._tcp_failed &= set(want)
        for port, spec in want.items():
            self._tcp_specs[port] = spec
            if port in self._tcp or port in self._tcp_failed:
                continue
            host = self.listen[0]
            try:
                sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                            backlog=1024)
            except OSError as e:
                self._tcp_failed.add(port)  # said once; tried again when the services change
                self.edge.log(msg="tls tcp service cannot listen", app=spec[0], port=port, error=e.strerror)
                continue
            sock.setblocking(False)
            self._tcp[port] = sock
            loop.add_reader(sock.fileno(), self._accept, sock, port)
            self.edge.log(msg="tls tcp service", app=spec[0], port=port, internal_port=spec[1], proxy_proto=spec[2])

    def _close_tcp(self, port: int) -> None:
        sock = self._tcp.pop(port, None)
        self._tcp_specs.pop(port, None)
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    # -- the plain listener's part
    def intercept(self, head: http.RequestHead, plan: Plan, proto: bytes) -> bytes | None:
        """An answer the edge gives itself instead of routing: ACME HTTP-01, force_https."""
        if proto != b"http":
            return None
        if head.target.startswith(CHALLENGE_PREFIX):
            answer = self.http_tokens.get(head.target[len(CHALLENGE_PREFIX):])
            if answer is not None:
                return http.simple_response(200, answer, content_type="application/octet-stream")
        app = plan.app
        if app is None or self.address is None or head.method == "CONNECT":
            return None
        if self._force_https(app):
            return redirect_to_https(head, plan.host, self.address[1])
        return None

    def _force_https(self, app: str) -> bool:
        routes = self.edge.routes
        backends = routes.backends(app)
        cached = self._force.get(app)
        if cached is not None and cached[0] is backends:
            return cached[1]
        configs = [(routes.machines.get(f"{app}.{b.machine}") or {}).get("config") for b in backends]
        verdict = wants_force_https(configs)
        if len(self._force) > 4096:
            self._force.clear()
        self._force[app] = (backends, verdict)
        return verdict


class _Dispatch:
    """The first protocol of a TLS connection: once the handshake is done, ALPN decides who serves it."""

    def __init__(self, tls: EdgeTLS) -> None:
        self.tls = tls

    def connection_made(self, transport: Any) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if alpn == ACME_TLS_ALPN:  # the validation only needed the handshake
            transport.close()
            return
        if alpn == "h2":
            from taxiway.platform.edgeh2 import H2Connection

            proto: Any = H2Connection(self.tls.edge, self.tls._conns)  # noqa: SLF001 - ours
        else:
            proto = self.tls.edge.client_protocol()
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: connection_made replaced this protocol
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _TcpRelay(asyncio.Protocol):
    """A TLS TCP service's client (TLS already ended) relayed to the least-loaded machine in plain TCP."""

    def __init__(self, tls: EdgeTLS, spec: tuple[str, int, bool], peer: tuple[str, int]) -> None:
        self.tls, self.spec, self.peer = tls, spec, peer
        self.transport: Any = None
        self.up: _TcpUpstream | None = None
        self.backend: Any = None
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()
        self.tls._spawn(self._connect())  # noqa: SLF001 - its owner's tasks

    async def _connect(self) -> None:
        edge = self.tls.edge
        loop = asyncio.get_running_loop()
        app, internal, proxy_proto = self.spec
        tried: set[str] = set()
        while not self.closed:
            backend = edge.balancer.choose(edge.routes.tcp_backends(app, internal), tried, loop.time())
            if backend is None:
                edge.log(msg="tls tcp service has no machine", app=app, internal_port=internal)
                self.transport.close()
                return
            edge.balancer.acquire(backend)
            try:
                async with asyncio.timeout(edge.config.connect_timeout):
                    _, up = await loop.create_connection(lambda: _TcpUpstream(self), backend.host, backend.port)
            except (OSError, TimeoutError):
                edge.balancer.release(backend)
                edge.balancer.mark_failed(backend, loop.time())
                tried.add(backend.machine)
                continue
            self.backend = backend
            edge.balancer.opened(backend.machine)
            self.up = up
            if proxy_proto:
                from taxiway.platform.edgehttp import proxy_v2_header

                local = self.transport.get_extra_info("sockname")
                up.transport.write(proxy_v2_header(self.peer, local[:2]))
            if self.buf:
                up.transport.write(bytes(self.buf))
                self.buf.clear()
            if self.closed:
                up.transport.close()
            else:
                self.transport.resume_reading()
            return

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.transport.write(data)
        else:
            self.buf += data

    def eof_received(self) -> bool:
        if self.up is not None and self.up.transport.can_write_eof():
            self.up.transport.write_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None:
            self.up.transport.close()
        if self.backend is not None:
            edge = self.tls.edge
            edge.balancer.closed(self.backend.machine)
            edge.balancer.release(self.backend)
            self.backend = None

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.transport.resume_reading()


class _TcpUpstream(asyncio.Protocol):
    """The machine's side of a :class:`_TcpRelay`."""

    def __init__(self, relay: _TcpRelay) -> None:
        self.relay = relay
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.relay.transport.write(data)

    def eof_received(self) -> bool:
        self.relay.transport.close()  # TLS cannot half-close: the machine is done, so is the client
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.relay.closed:
            self.relay.transport.close()

    def pause_writing(self) -> None:
        self.relay.transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.transport.resume_reading()
