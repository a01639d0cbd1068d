"""The egress proxy server: asyncio streams around the pure policy modules.

One task per client connection reads request heads; a request is decided by
:meth:`EgressProxy.decide` (role, ACL, one DNS resolution, address policy on
every answer) and the pinned, allowed address is dialled. A CONNECT tunnel
from a plain-TCP client is handed to :mod:`.splice` (bytes stay in the
kernel); from a TLS client it is relayed by :mod:`.relay`'s two protocols,
which write straight into each other's transports with flow control. Absolute-form
requests are forwarded with their bodies streamed as framed, and the upstream
connection is kept for the client's next request when it may be.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import itertools
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import orjson

from taxiway.egress import http, is_loopback_name, splice
from taxiway.egress.acl import Acl, Decision, Result, load_acl
from taxiway.egress.addresses import AddressPolicy, AddressVerdict, Range
from taxiway.egress.hosts import IPAddress, shown
from taxiway.egress.metrics import Metrics
from taxiway.egress.relay import ProtocolTunnel
from taxiway.egress.resolver import ResolveError, Resolver
from taxiway.egress.roles import Authenticator, cert_common_name, load_users, parse_basic
from taxiway.listen import DEFAULT_HOST, Listen

READ_SIZE = 256 * 1024
LOG_TEXT = 500  # at most this much of any client-chosen text in a log line
T = TypeVar("T")


@dataclass
class EgressConfig:
    """Everything ``taxiway egress serve`` takes; the platform builds one too."""

    listen: tuple[str, int] = (DEFAULT_HOST, 4750)
    acl_path: Path | None = None
    allow_ranges: list[Range] = field(default_factory=list)
    deny_ranges: list[Range] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    resolver: tuple[str, int] | None = None
    users_path: Path | None = None
    disabled_actions: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    total_timeout: float = 0.0  # 0: no limit on a tunnel's lifetime
    header_timeout: float = 30.0  # for each request head, from its first byte to its blank line
    dns_timeout: float = 5.0
    max_tunnels: int = 10_000
    # Open client connections; each may hold up to max_header_bytes of a half-sent head,
    # so this also bounds that memory (10,000 x 64 KiB = 640 MiB at worst).
    max_connections: int = 10_000
    max_header_bytes: int = 64 * 1024
    drain_timeout: float = 30.0


# Out of descriptors or memory: accepting again at once would only fail again.
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Acceptor:
    """Accepts on a listening socket and says when it cannot.

    asyncio's server reports running out of file descriptors only to the loop's
    exception handler, and uvloop (libuv) accepts and closes such connections
    without a word. Here a failed accept calls ``on_error`` and accepting pauses
    with a growing delay (5 ms to 1 s), as Go's http.Server (Smokescreen's) does;
    the connections waiting in the backlog are served once descriptors free up.
    """

    def __init__(self, sock: socket.socket, on_socket: Callable[[socket.socket], None],
                 on_error: Callable[[OSError, float], None]) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.on_socket, self.on_error = on_socket, on_error
        self.delay = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(256):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _ACCEPT_RESOURCE_ERRORS:
                    continue  # ECONNABORTED and the like: that one client gave up
                self.delay = min(max(self.delay * 2, 0.005), 1.0)
                self.loop.remove_reader(self.sock.fileno())
                self._retry = self.loop.call_later(self.delay, self._resume)
                self.on_error(e, self.delay)
                return
            self.delay = 0.0
            self.on_socket(conn)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Denied(Exception):
    """A request the proxy answers itself (403, 407, 502, 503, 504)."""

    def __init__(self, status: int, host: str, reason: str, decision: str = "deny", detail: str = ""):
        super().__init__(reason)
        self.status, self.host, self.reason, self.decision = status, host, reason, decision
        self.detail = detail  # said to the client after the reason, not logged as part of it
        self.outcome: Outcome | None = None


@dataclass
class Outcome:
    """What deciding a request produced, for the log line and the dial."""

    target: http.Target
    role: str | None = None
    acl: Decision | None = None
    addresses: list[AddressVerdict] = field(default_factory=list)
    dns_ms: float = 0.0

    def allowed_as(self) -> tuple[str, str]:
        """("allow" or "report", the ACL's reason) for a request that goes through."""
        if self.acl is None:
            return "allow", "egress ACL is not configured"
        return ("report" if self.acl.result is Result.ALLOW_AND_REPORT else "allow"), self.acl.reason


class EgressProxy:
    """The proxy: configuration, live policy (reloadable), metrics and connections."""

    def __init__(self, config: EgressConfig, log: IO[bytes] | None = None):
        self.config = config
        self.log_out = log or sys.stdout.buffer
        self.acl: Acl | None = load_acl(config.acl_path, config.disabled_actions) if config.acl_path else None
        users = load_users(config.users_path) if config.users_path else {}
        self.auth = Authenticator.from_env(users, client_certs=config.client_ca is not None)
        self.policy = AddressPolicy(tuple(config.allow_ranges), tuple(config.deny_ranges))
        self.resolver = Resolver(config.resolver, config.dns_timeout)
        self._bcrypt_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="egress-bcrypt")
        self.metrics = _metrics()
        self.active_tunnels = 0
        self.connections: set[asyncio.Task] = set()
        self.idle: set[asyncio.Task] = set()
        self.draining = False
        self._ids = itertools.count(1)
        self._flush_pending = False
        self._pending: set[asyncio.Task] = set()  # one per open client connection
        self._refusing = False
        self._judged: dict[tuple[IPAddress, int], AddressVerdict] = {}
        self._servers: list[_Acceptor] = []
        self._ssl: ssl.SSLContext | None = None
        self._stopped: asyncio.Event | None = None
        # Hooks for an embedding server (the platform's egressd); None keeps the behaviour above.
        # role_by_address(client IP) -> role: who is asking is where the connection comes from
        # (a network that makes spoofing impossible); None there means an unknown client: 403.
        self.role_by_address: Callable[[str], str | None] | None = None
        # acl_for(role) -> the ACL to decide that role's requests with, instead of self.acl.
        self.acl_for: Callable[[str | None], Acl | None] | None = None
        # on_decision(fields): each decision's log fields, after they are logged (must not block).
        self.on_decision: Callable[[dict[str, object]], None] | None = None

    # -- logging -----------------------------------------------------------------
    def log(self, **fields: object) -> None:
        fields.setdefault("time", time.time())
        self.log_out.write(orjson.dumps(fields, default=str) + b"\n")
        if not self._flush_pending:
            # One flush per loop iteration, however many lines it wrote.
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        with contextlib.suppress(Exception):
            self.log_out.flush()

    def _warn_acl(self, acl: Acl | None) -> None:
        for warning in acl.warnings if acl is not None else ():
            self.log(msg="acl warning", acl=str(self.config.acl_path), warning=warning)

    def judge(self, addr: IPAddress, port: int) -> AddressVerdict:
        """The address policy's verdict, memoized (the policy is fixed for the process)."""
        key = (addr, port)
        v = self._judged.get(key)
        if v is None:
            if len(self._judged) > 50_000:
                self._judged.clear()
            v = self._judged[key] = self.policy.judge(addr, port)
        return v

    # -- reload --------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the ACL and users file; keep the old ones if the new ones are broken."""
        try:
            acl = load_acl(self.config.acl_path, self.config.disabled_actions) if self.config.acl_path else None
            users = load_users(self.config.users_path) if self.config.users_path else {}
        except Exception as e:
            self.metrics.inc("taxiway_egress_reloads_total", result="error")
            self.log(msg="reload", ok=False, error=str(e))
            return False
        self.acl = acl
        self._warn_acl(acl)
        self.auth = Authenticator(self.auth.password, users, self.auth.client_certs)
        self.metrics.inc("taxiway_egress_reloads_total", result="ok")
        self.log(msg="reload", ok=True, acl=str(self.config.acl_path or ""))
        return True

    # -- serving -------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if not c.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(c.tls_cert), str(c.tls_key) if c.tls_key else None)
        if c.client_ca:
            ctx.load_verify_locations(str(c.client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def start(self, sockets: list[socket.socket] | None = None) -> tuple[str, int]:
        """Listen on ``config.listen``, or on ``sockets`` (bound and listening already, e.g.
        inside another network namespace); returns the (first) bound (host, port)."""
        host, port = self.config.listen
        self._ssl = self._ssl_context()
        if not sockets:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sockets = [socket.create_server((host, port), family=family, backlog=4096)]
            except OSError as e:
                from taxiway.errors import TaxiwayError

                raise TaxiwayError(f"cannot listen on {Listen(host, port)}: {e.strerror or e}",
                                   "pick another address with --listen") from None
        own: list[tuple[IPAddress, int]] = []
        any_port = None
        for sock in sockets:
            self._servers.append(_Acceptor(sock, self._accepted, self._accept_failed))
            bound = sock.getsockname()
            addrs, p = _own_addresses(bound[0].split("%")[0], bound[1])
            own += addrs
            any_port = any_port or p
            self.log(msg="listening", address=str(Listen(bound[0], bound[1])), tls=bool(self.config.tls_cert),
                     acl=str(self.config.acl_path or ""), auth_required=self.auth.required)
        first = sockets[0].getsockname()
        self.config.listen = (first[0], first[1])
        self.policy = self.policy.with_own(own, any_port)
        self._judged.clear()
        self._stopped = asyncio.Event()
        self._warn_acl(self.acl)
        return self.config.listen

    def _accept_failed(self, e: OSError, delay: float) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.metrics.inc("taxiway_egress_accept_errors_total", error=name)
        if delay <= 0.005 or self.metrics.value("taxiway_egress_accept_errors_total", error=name) % 60 == 0:
            # A line when an episode starts, then one a minute while it lasts.
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.log(msg="accept failed", error=f"{name}: {e.strerror}", open_connections=len(self.connections),
                     active_tunnels=self.active_tunnels, nofile_limit=soft, retry_in_s=delay,
                     fix="raise the file descriptor limit (ulimit -n, LimitNOFILE=) or lower --max-tunnels")

    def _accepted(self, sock: socket.socket) -> None:
        if len(self._pending) >= self.config.max_connections:
            self._refuse_connection(sock)
            return
        self._refusing = False
        task = asyncio.get_running_loop().create_task(self._serve_socket(sock))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _refuse_connection(self, sock: socket.socket) -> None:
        """Past --max-connections: a 503 if the socket takes it at once (plain TCP only), then close."""
        limit = self.config.max_connections
        self.metrics.inc("taxiway_egress_connections_refused_total")
        if self._ssl is None:  # a TLS client would read plain text as a broken handshake: just close
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(http.simple_response(503, f"too many client connections ({limit})\n",
                                               [("Retry-After", "1")]))
        sock.close()
        refused = self.metrics.value("taxiway_egress_connections_refused_total")
        if not self._refusing or refused % 1000 == 0:
            # A line when an episode starts, then one per thousand refusals while it lasts.
            self._refusing = True
            self.log(msg="connection refused", reason=f"{limit} client connections open (--max-connections)",
                     open_connections=len(self._pending), refused_total=int(refused),
                     fix="raise --max-connections (and the file descriptor limit), or add proxies")

    async def _serve_socket(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.config.max_header_bytes)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self.config.header_timeout):
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=self._ssl)
        except (OSError, TimeoutError, ssl.SSLError):
            sock.close()  # a failed TLS handshake, or a client already gone
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._handle(reader, writer)

    async def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT (drain) ; SIGHUP reloads the ACL."""
        loop = asyncio.get_running_loop()
        await self.start()
        assert self._stopped is not None
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        await self.drain()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def drain(self) -> None:
        """Stop accepting, close idle keep-alive connections, wait for the rest, then cut them."""
        self.draining = True
        for server in self._servers:
            server.close()
        for t in list(self.idle):
            t.cancel()
        self.log(msg="draining", connections=len(self.connections))
        if self.connections:
            _, pending = await asyncio.wait(list(self.connections), timeout=self.config.drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self._bcrypt_pool.shutdown(wait=False, cancel_futures=True)
        self.log(msg="stopped")
        self._flush()

    # -- one client connection -------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        self.metrics.inc("taxiway_egress_client_connections_total")
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else "?"
        sslobj = writer.get_extra_info("ssl_object")
        cert_role = cert_common_name(sslobj.getpeercert()) if sslobj is not None else None
        # /metrics and /healthz: with roles by address (the platform's proxy, which tenants reach),
        # only for loopback clients: the metrics' labels name every tenant's roles.
        local_ok = True
        if cert_role is None and self.role_by_address is not None and peer:
            # Looked up once per connection: a connection comes from one machine for its life.
            cert_role = self.role_by_address(peer[0])
            local_ok = _is_loopback(peer[0])
        conn = _ClientState()
        try:
            first = True
            while not self.draining:
                self.idle.add(task)
                try:
                    lead = b""
                    if not first:
                        # Between requests a connection may idle; once a head starts it
                        # must end within header_timeout, like the first one (slowloris).
                        async with asyncio.timeout(self.config.idle_timeout):
                            lead = await reader.read(1)
                        if not lead:
                            break
                        self.idle.discard(task)
                    async with asyncio.timeout(self.config.header_timeout):
                        raw = lead + await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                except asyncio.LimitOverrunError:
                    writer.write(http.simple_response(431, "request head too large\n"))
                    break
                finally:
                    self.idle.discard(task)
                first = False
                try:
                    head = http.parse_request_head(raw)
                except http.ProtocolError as e:
                    self._refuse(writer, "request", client, raw.split(b"\r\n", 1)[0], e)
                    break
                if head.method == "CONNECT":
                    await self._connect(head, reader, writer, client, cert_role)
                    return
                if head.target.startswith("/"):
                    if not local_ok:
                        writer.write(http.simple_response(403, "this is a proxy: send absolute-form or CONNECT requests\n"))
                        break
                    if not await self._local(head, writer):
                        break
                    continue
                if not await self._forward(head, reader, writer, client, cert_role, conn):
                    break
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bug must not take the server down, but must be seen
            self.log(msg="error", client=client, error=repr(e))
        finally:
            self.connections.discard(task)
            self._release(conn.upstream)
            with contextlib.suppress(Exception):
                await _close(writer)

    async def _local(self, head: http.RequestHead, writer: asyncio.StreamWriter) -> bool:
        """Origin-form requests to the proxy itself: /metrics and /healthz; True to keep the connection."""
        path = head.target.split("?")[0]
        keep = http.keeps_alive(head) and not self.draining
        if path == "/metrics" and head.method == "GET":
            self.metrics.set("taxiway_egress_tunnels_active", self.active_tunnels)
            self.metrics.set("taxiway_egress_connections_open", len(self.connections))
            writer.write(http.simple_response(200, self.metrics.render(), close=not keep,
                                              content_type="text/plain; version=0.0.4"))
            return keep
        if path == "/healthz":
            writer.write(http.simple_response(200, "ok\n", close=not keep))
            return keep
        writer.write(http.simple_response(400, "this is a proxy: send absolute-form or CONNECT requests\n"))
        return False

    # -- deciding --------------------------------------------------------------------
    async def _role(self, head: http.RequestHead, cert_role: str | None, host: str) -> str | None:
        if cert_role is not None:
            return cert_role
        if self.role_by_address is not None:
            raise Denied(403, host, "the client's address belongs to no known machine")
        creds = parse_basic(head.get(b"proxy-authorization"))
        role = None
        if creds is not None:
            known, role = self.auth.cached(*creds)
            if not known:
                # bcrypt (~0.1-1 s) runs in threads of its own: it releases the GIL, and a flood
                # of wrong passwords must not take the loop's default executor (getaddrinfo).
                role = await asyncio.get_running_loop().run_in_executor(
                    self._bcrypt_pool, self.auth.role_from_password, *creds)
        if role is None and self.auth.required:
            why = "wrong proxy credentials" if creds else "proxy credentials required"
            raise Denied(407, host, why, "unauthenticated")
        return role

    async def decide(self, head: http.RequestHead, target: http.Target, cert_role: str | None) -> Outcome:
        """Role, ACL, one resolution, address policy: raises Denied or returns what to dial."""
        out = Outcome(target)
        try:
            return await self._decide(head, target, cert_role, out)
        except Denied as d:
            d.outcome = out
            raise

    async def _decide(self, head: http.RequestHead, target: http.Target, cert_role: str | None,
                      out: Outcome) -> Outcome:
        host = str(target)
        out.role = await self._role(head, cert_role, host)
        acl = self.acl if self.acl_for is None else self.acl_for(out.role)
        if acl is not None:
            out.acl = acl.decide(out.role, target.host.name)
            if not out.acl.allowed:
                raise Denied(403, host, out.acl.reason, detail=f" (role {out.role or 'none'})")
        if target.host.ip is not None:
            addrs: list[IPAddress] = [target.host.ip]
        else:
            name = target.host.name
            if is_loopback_name(name):
                raise Denied(403, host, f"{name} is a loopback name")
            t0 = time.perf_counter()
            try:
                addrs = await self.resolver.resolve(name)
            except ResolveError as e:
                raise Denied(504 if e.timeout else 502, host, str(e), "error") from None
            finally:
                out.dns_ms = (time.perf_counter() - t0) * 1000
                self.metrics.observe("taxiway_egress_dns_seconds", out.dns_ms / 1000)
        out.addresses = [self.judge(a, target.port) for a in addrs]
        if not any(v.allowed for v in out.addresses):
            raise Denied(403, host, out.addresses[0].reason)
        return out

    def _log_decision(self, kind: str, client: str, target: http.Target, out: Outcome | None,
                      status: int | None, reason: str, decision: str, dialled: str | None = None,
                      connect_ms: float | None = None, conn_id: int = 0) -> None:
        acl = out.acl if out else None
        self.metrics.inc("taxiway_egress_decisions_total", decision=decision, proxy_type=kind,
                         role=(out.role if out else None) or "", project=acl.project if acl else "")
        fields: dict[str, object] = dict(
            msg="decision", id=conn_id, proxy_type=kind, client=client,
            role=out.role if out else None, project=acl.project if acl else None,
            requested_host=str(target), resolved_address=dialled,
            candidates=[str(v.address) for v in out.addresses] if out else [],
            decision=decision, allow=decision in ("allow", "report"), reason=reason,
            enforce_would_deny=bool(acl and acl.would_deny), status=status,
            dns_ms=round(out.dns_ms, 3) if out else None,
            connect_ms=round(connect_ms, 3) if connect_ms is not None else None,
        )
        self.log(**fields)
        if self.on_decision is not None:
            self.on_decision(fields)

    def _deny(self, writer: asyncio.StreamWriter, kind: str, client: str, target: http.Target,
              d: Denied, out: Outcome | None, conn_id: int) -> None:
        msg = f"egress to {d.host} denied: {d.reason}{d.detail}" if d.status in (403, 407) else \
              f"egress to {d.host} failed: {d.reason}{d.detail}"
        headers = [("X-Taxiway-Egress-Error", msg)]
        if d.status == 407:
            headers.append(("Proxy-Authenticate", 'Basic realm="taxiway egress"'))
        if d.status == 503:
            headers.append(("Retry-After", "1"))
        self.metrics.inc("taxiway_egress_responses_total", status=str(d.status), proxy_type=kind)
        self._log_decision(kind, client, target, out or d.outcome, d.status, d.reason, d.decision,
                           conn_id=conn_id)
        writer.write(http.simple_response(d.status, msg + "\n", headers))

    def _refuse(self, writer: asyncio.StreamWriter, kind: str, client: str, target: str | bytes,
                e: http.ProtocolError, conn_id: int = 0) -> None:
        """Answer a request that could not be read (bad head, host or framing); one log line, bounded."""
        if isinstance(target, bytes):
            target = target.decode("latin-1")
        self.metrics.inc("taxiway_egress_responses_total", status=str(e.status), proxy_type=kind)
        self.log(msg="refused", id=conn_id, proxy_type=kind, client=client, status=e.status,
                 error=str(e)[:LOG_TEXT], target=shown(target))
        writer.write(http.simple_response(e.status, f"{e}\n", [("X-Taxiway-Egress-Error", str(e))]))

    async def _open(self, out: Outcome, dial: Callable[[str, int], Awaitable[T]]
                    ) -> tuple[T, AddressVerdict, float]:
        """Dial the allowed, pinned addresses in order; the first that answers wins."""
        if self.active_tunnels >= self.config.max_tunnels:
            raise Denied(503, str(out.target), f"too many open tunnels ({self.config.max_tunnels})", "error")
        last: Denied | None = None
        t0 = time.perf_counter()
        for v in out.addresses:
            if not v.allowed:
                continue
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    conn = await dial(str(v.address), out.target.port)
            except TimeoutError:
                last = Denied(504, str(out.target), f"connecting to {v.address} timed out", "error")
            except OSError as e:
                last = Denied(502, str(out.target), f"connecting to {v.address} failed: "
                              f"{e.strerror or e}", "error")
            else:
                ms = (time.perf_counter() - t0) * 1000
                self.metrics.observe("taxiway_egress_connect_seconds", ms / 1000)
                return conn, v, ms
        assert last is not None
        raise last

    # -- CONNECT ---------------------------------------------------------------------
    async def _connect(self, head: http.RequestHead, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, client: str, cert_role: str | None) -> None:
        conn_id = next(self._ids)
        try:
            target = http.parse_connect_target(head.target)
        except http.ProtocolError as e:
            self._refuse(writer, "connect", client, head.target, e, conn_id)
            return
        out = None
        tunnel = ProtocolTunnel()
        # Plain-TCP clients get a splice(2) relay; TLS clients need the bytes in Python.
        use_splice = splice.AVAILABLE and writer.get_extra_info("ssl_object") is None
        try:
            out = await self.decide(head, target, cert_role)
            if use_splice:
                upstream_sock, verdict, connect_ms = await self._open(out, splice.dial_socket)
            else:
                (transport, _), verdict, connect_ms = await self._open(
                    out, lambda host, port: asyncio.get_running_loop().create_connection(
                        lambda: tunnel.upstream, host, port))
        except Denied as d:
            self._deny(writer, "connect", client, target, d, out, conn_id)
            return
        decision, reason = out.allowed_as()
        self._log_decision("connect", client, target, out, 200, f"{reason}; {verdict.reason}", decision,
                           str(verdict.address), connect_ms, conn_id)
        self.metrics.inc("taxiway_egress_responses_total", status="200", proxy_type="connect")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        # Bytes the client sent after the CONNECT head (a TLS hello, often) go first.
        pending = bytes(reader._buffer)  # noqa: SLF001
        reader._buffer.clear()  # noqa: SLF001
        if use_splice:
            client_sock = await splice.detach(writer)
            if pending:
                await asyncio.get_running_loop().sock_sendall(upstream_sock, pending)
            st = splice.SpliceTunnel(asyncio.get_running_loop(), client_sock, upstream_sock)
            st.client.count += len(pending)
            st.start()
            await self._watch(st, out, target, client, conn_id, str(verdict.address), "connect")
            return
        await self._relay(tunnel, writer.transport, transport, pending, out, target, client, conn_id,
                          str(verdict.address), "connect")

    async def _relay(self, tunnel: ProtocolTunnel, client_t: asyncio.Transport,
                     upstream_t: asyncio.Transport,
                     pending: bytes, out: Outcome, target: http.Target, client: str, conn_id: int,
                     dialled: str, kind: str) -> None:
        tunnel.client.transport = client_t
        client_t.set_protocol(tunnel.client)
        if pending:
            tunnel.client.data_received(pending)
        tunnel.client.attach(upstream_t)
        tunnel.upstream.attach(client_t)
        client_t.resume_reading()
        await self._watch(tunnel, out, target, client, conn_id, dialled, kind)

    async def _watch(self, tunnel: ProtocolTunnel | splice.SpliceTunnel, out: Outcome, target: http.Target,
                     client: str, conn_id: int, dialled: str, kind: str) -> None:
        """Wait for a tunnel to end, enforcing idle and total timeouts; log its close."""
        started = time.monotonic()
        self.active_tunnels += 1
        ended = "closed"
        try:
            while not tunnel.done.done():
                now = time.monotonic()
                limit = self.config.idle_timeout - (now - tunnel.last)
                if self.config.total_timeout:
                    limit = min(limit, self.config.total_timeout - (now - started))
                if limit <= 0:
                    ended = "timeout"
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(tunnel.done), timeout=min(limit, 30))
        except asyncio.CancelledError:
            ended = "drained"
        finally:
            if not tunnel.done.done():
                tunnel.close()
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(tunnel.done), 2)
                if not tunnel.done.done():
                    tunnel.abort()
            self.active_tunnels -= 1
            up, down = tunnel.client.count, tunnel.upstream.count
            self.metrics.inc("taxiway_egress_bytes_total", up, direction="out")
            self.metrics.inc("taxiway_egress_bytes_total", down, direction="in")
            self.log(msg="close", id=conn_id, proxy_type=kind, client=client, role=out.role,
                     requested_host=str(target), resolved_address=dialled, bytes_out=up, bytes_in=down,
                     duration_ms=round((time.monotonic() - started) * 1000, 3), ended=ended)

    # -- absolute-form HTTP ----------------------------------------------------------
    async def _open_http(self, out: Outcome) -> _Upstream:
        reader = asyncio.StreamReader(limit=self.config.max_header_bytes)
        (transport, proto), verdict, ms = await self._open(
            out, lambda host, port: asyncio.get_running_loop().create_connection(
                lambda: asyncio.StreamReaderProtocol(reader), host, port))
        writer = asyncio.StreamWriter(transport, proto, reader, asyncio.get_running_loop())
        self.active_tunnels += 1
        return _Upstream(str(out.target), verdict, reader, writer, ms)

    def _release(self, up: _Upstream | None) -> None:
        if up is not None and not up.released:
            up.released = True
            self.active_tunnels -= 1
            up.writer.close()

    async def _forward(self, head: http.RequestHead, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, client: str, cert_role: str | None,
                       conn: _ClientState) -> bool:
        """Proxy one absolute-form request; True if the client connection stays open.

        The upstream connection is kept for the client's next request to the same
        host:port, but only if that request, decided afresh, allows the pinned address.
        """
        conn_id = next(self._ids)
        try:
            target = http.parse_absolute_target(head.target)
            framing = http.request_framing(head)
        except http.ProtocolError as e:
            self._refuse(writer, "http", client, head.target, e, conn_id)
            return False
        out = None
        up = conn.upstream
        conn.upstream = None
        try:
            out = await self.decide(head, target, cert_role)
            reusable = (up is not None and up.key == str(target) and not up.writer.transport.is_closing()
                        and any(v.allowed and v.address == up.verdict.address for v in out.addresses))
            if not reusable:
                self._release(up)
                up = None
                up = await self._open_http(out)
            else:
                up.connect_ms = 0.0
        except Denied as d:
            self._release(up)
            self._deny(writer, "http", client, target, d, out, conn_id)
            return False
        assert up is not None
        decision, reason = out.allowed_as()
        self._log_decision("http", client, target, out, None, f"{reason}; {up.verdict.reason}", decision,
                           str(up.verdict.address), up.connect_ms, conn_id)
        keep = http.keeps_alive(head) and not self.draining
        started = time.monotonic()
        counts = [0, 0, 0]  # body bytes out, body bytes in, response bytes sent to the client
        status = 0
        try:
            for attempt in (0, 1):
                try:
                    status, keep_client, keep_upstream = await self._exchange(
                        head, target, framing, up, reader, writer, keep, counts, out, client, conn_id)
                    break
                except _Stale:
                    # A kept upstream connection the server had closed: retry once, fresh.
                    self._release(up)
                    if attempt or framing[0] != "none":
                        raise ConnectionResetError("upstream closed the connection") from None
                    try:
                        up = await self._open_http(out)
                    except Denied as d:
                        self._deny(writer, "http", client, target, d, out, conn_id)
                        return False
            if keep_client and keep_upstream:
                conn.upstream = up
            else:
                self._release(up)
            return keep_client
        except _BadBody as e:
            self._release(up)
            status = 400
            msg = f"bad request body for {target}: {e}"
            writer.write(http.simple_response(400, msg + "\n", [("X-Taxiway-Egress-Error", msg)]))
            return False
        except (http.ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            self._release(up)
            if not counts[2]:
                status = 502
                msg = f"egress to {target} failed: bad response from upstream: {e}"
                writer.write(http.simple_response(502, msg + "\n", [("X-Taxiway-Egress-Error", msg)]))
            return False
        except (TimeoutError, ConnectionError, OSError) as e:
            self._release(up)
            if not counts[2]:
                status = 504 if isinstance(e, TimeoutError) else 502
                msg = f"egress to {target} failed: upstream " + ("timed out" if status == 504 else "reset")
                writer.write(http.simple_response(status, msg + "\n", [("X-Taxiway-Egress-Error", msg)]))
            return False
        finally:
            self.metrics.inc("taxiway_egress_responses_total", status=str(status), proxy_type="http")
            self.metrics.inc("taxiway_egress_bytes_total", counts[0], direction="out")
            self.metrics.inc("taxiway_egress_bytes_total", counts[1], direction="in")
            self.log(msg="close", id=conn_id, proxy_type="http", client=client, role=out.role,
                     requested_host=str(target), resolved_address=str(up.verdict.address), status=status,
                     bytes_out=counts[0], bytes_in=counts[1],
                     duration_ms=round((time.monotonic() - started) * 1000, 3))

    async def _exchange(self, head: http.RequestHead, target: http.Target, framing: tuple[str, int],
                        up: _Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        keep: bool, counts: list[int], out: Outcome, client: str, conn_id: int
                        ) -> tuple[int, bool, bool]:
        """One request/response over ``up``: (status, keep client, keep upstream)."""
        request_head = http.serialize_request(head, target, keep_alive=keep)
        body = None
        expect = (head.get(b"expect") or b"").strip().lower() == b"100-continue"
        if framing[0] == "chunked" and not expect:
            # The head goes with the first chunk that parsed: a body that is garbage from
            # its first byte never puts a request in front of the upstream.
            body = asyncio.create_task(_copy_body(reader, up.writer, framing, counts, 0, prefix=request_head))
        else:
            up.writer.write(request_head)
            if framing[0] != "none":
                body = asyncio.create_task(_copy_body(reader, up.writer, framing, counts, 0))
        idle = self.config.idle_timeout
        try:
            # One timer per exchange, pushed back whenever bytes move (an idle timeout).
            async with asyncio.timeout(idle) as timer:
                while True:
                    try:
                        raw = await _response_head(up.reader, body)
                    except (asyncio.IncompleteReadError, ConnectionError) as e:
                        if up.used and counts[0] == 0 and not (isinstance(e, asyncio.IncompleteReadError)
                                                                and e.partial):
                            raise _Stale() from None
                        raise
                    rhead = http.parse_response_head(raw)
                    if 100 <= rhead.status < 200 and rhead.status != 101:
                        writer.write(raw)
                        counts[2] = 1
                        continue
                    break
                up.used = True
                rframing = http.response_framing(rhead, head.method)
                if rhead.status == 101:
                    timer.reschedule(None)
                    counts[2] = 1
                    writer.write(http.serialize_response_head(rhead, True))
                    if body is not None:
                        await body
                    tunnel = ProtocolTunnel()
                    transport = up.writer.transport
                    tunnel.upstream.transport = transport
                    transport.set_protocol(tunnel.upstream)
                    leftover = bytes(up.reader._buffer)  # noqa: SLF001
                    if leftover:
                        writer.write(leftover)
                    pending = bytes(reader._buffer)  # noqa: SLF001
                    reader._buffer.clear()  # noqa: SLF001
                    await self._relay(tunnel, writer.transport, transport, pending, out, target, client,
                                      conn_id, str(up.verdict.address), "http-upgrade")
                    return 101, False, False
                rtokens = http.connection_tokens(rhead.headers)
                keep_up = rframing[0] != "close" and b"close" not in rtokens and rhead.version == b"HTTP/1.1"
                keep = keep and rframing[0] != "close"
                rhead_bytes = http.serialize_response_head(rhead, keep)
                counts[2] = 1
                kind, length = rframing
                if kind == "length" and length <= len(up.reader._buffer):  # noqa: SLF001
                    # A small body that already arrived: one write for head and body.
                    writer.write(rhead_bytes + await up.reader.readexactly(length))
                    counts[1] += length
                else:
                    writer.write(rhead_bytes)
                    await _copy_body(up.reader, writer, rframing, counts, 1, timer, idle)
                if body is not None and not body.done():
                    if keep:
                        await body
                    else:
                        body.cancel()
            body_ok = body is None or (body.done() and not body.cancelled())
            return rhead.status, keep, keep_up and body_ok
        finally:
            if body is not None:
                if not body.done():
                    body.cancel()
                elif not body.cancelled():
                    body.exception()  # retrieved: the failure was answered or is moot


class _Stale(Exception):
    """A reused upstream connection turned out to be closed before answering."""


class _BadBody(Exception):
    """The client's request body broke its framing (or stopped) before the upstream answered."""


async def _response_head(src: asyncio.StreamReader, body: asyncio.Task | None) -> bytes:
    """The upstream's response head, unless the request body being sent fails first.

    A malformed chunk from the client must end the exchange with a 400 at once,
    not leave the upstream waiting for a body that will never be complete.
    """
    if body is None or body.done():
        if body is not None and not body.cancelled() and isinstance(body.exception(), http.ProtocolError):
            raise _BadBody(str(body.exception()))
        return await src.readuntil(b"\r\n\r\n")
    read = asyncio.ensure_future(src.readuntil(b"\r\n\r\n"))
    try:
        await asyncio.wait({read, body}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done() and not body.cancelled():
            e = body.exception()
            if isinstance(e, (http.ProtocolError, asyncio.IncompleteReadError)):
                raise _BadBody(str(e) if isinstance(e, http.ProtocolError)
                               else "the request body ended early") from e
        return await read
    finally:
        if not read.done():
            read.cancel()


@dataclass
class _Upstream:
    key: str
    verdict: AddressVerdict
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    connect_ms: float
    used: bool = False
    released: bool = False


@dataclass
class _ClientState:
    upstream: _Upstream | None = None


async def _copy_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, framing: tuple[str, int],
                     counts: list[int], index: int, timer: asyncio.Timeout | None = None,
                     idle: float = 0.0, prefix: bytes = b"") -> None:
    """Copy one message body as framed; pushes ``timer`` back by ``idle`` on progress.

    A chunked body is re-framed (:class:`http.ChunkedScanner`); ``prefix`` (the
    request head) is written with its first canonical bytes.
    """
    kind, length = framing
    loop = asyncio.get_running_loop()

    def progress(n: int) -> None:
        counts[index] += n
        if timer is not None:
            timer.reschedule(loop.time() + idle)

    if kind == "none":
        return
    if kind == "length":
        left = length
        while left > 0:
            data = await src.read(min(left, READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            progress(len(data))
            dst.write(data)
            await dst.drain()
        return
    if kind == "chunked":
        scanner = http.ChunkedScanner()
        while not scanner.done:
            data = await src.read(READ_SIZE)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            used = scanner.feed(data)
            if used < len(data):
                # Bytes past the body belong to the next message: give them back.
                src._buffer[:0] = data[used:]  # noqa: SLF001
            progress(used)
            out = scanner.take()
            if out:
                dst.write(prefix + out)
                prefix = b""
                await dst.drain()
        return
    while True:  # read until close
        data = await src.read(READ_SIZE)
        if not data:
            return
        progress(len(data))
        dst.write(data)
        await dst.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    if writer.transport.is_closing():
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), 5)
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _own_addresses(host: str, port: int) -> tuple[list[tuple[IPAddress, int]], int | None]:
    ip = ipaddress.ip_address(host)
    if not ip.is_unspecified:
        return [(ip, port)], None
    own: list[tuple[IPAddress, int]] = []
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    with contextlib.suppress(ValueError):
                        own.append((ipaddress.ip_address(a.address.split("%")[0]), port))
    except ImportError:
        pass
    return own, port


def _metrics() -> Metrics:
    m = Metrics()
    m.describe("taxiway_egress_decisions_total", "counter", "Egress decisions by outcome.")
    m.describe("taxiway_egress_responses_total", "counter", "Responses by status code.")
    m.describe("taxiway_egress_bytes_total", "counter", "Bytes relayed (out: to upstream, in: from it).")
    m.describe("taxiway_egress_client_connections_total", "counter", "Client connections accepted.")
    m.describe("taxiway_egress_tunnels_active", "gauge", "Open upstream connections.")
    m.describe("taxiway_egress_connections_open", "gauge", "Open client connections.")
    m.describe("taxiway_egress_reloads_total", "counter", "ACL reloads (SIGHUP) by result.")
    m.describe("taxiway_egress_connections_refused_total", "counter",
               "Client connections closed at once because --max-connections were open.")
    m.describe("taxiway_egress_accept_errors_total", "counter",
               "Failed accepts by errno (EMFILE: out of file descriptors); accepting backs off.")
    m.describe("taxiway_egress_dns_seconds", "histogram", "Time to resolve a name.")
    m.describe("taxiway_egress_connect_seconds", "histogram", "Time to connect upstream.")
    return m


def run(config: EgressConfig) -> None:
    """Run the proxy until SIGTERM or SIGINT, on uvloop when it is installed."""
    proxy = EgressProxy(config)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(proxy.serve_forever())
