"""The platform's HTTP edge: ``<app>.localhost`` to a started, healthy machine of the app.

    python -m taxiway.platform.edge --nats nats://127.0.0.1:4222 --listen 127.0.0.1:8180

Shaped like the egress proxy: the policy is pure (:mod:`taxiway.platform.balance`
decides which machines are routable and which one gets a request), the HTTP/1.1
is sans-I/O (:mod:`taxiway.egress.http`: heads, framing, a strict chunked
scanner, so smuggling tricks are refused the same way there and here; and
:mod:`taxiway.platform.edgehttp`: the head a machine gets, the fast path's
parsing), and this module only moves bytes:

- **Routes** mirror the APPS, MACHINES and STATUS buckets through
  :meth:`State.watch` (no polling); the edge listens only once its mirror is
  complete, and a machine leaves the routes the moment it is cordoned, set to
  stop, stops, or fails a check.
- **Requests** go to the least-loaded routable machine. A backend that refuses
  the connection is skipped (and avoided for a moment) and the request goes to
  another; a request without a body whose backend died before answering is
  retried on another too, when it is idempotent. So a machine that stops in the
  middle of a deploy fails no request while another is healthy.
- **Bodies stream** both ways (Content-Length and chunked, re-framed); clients
  keep their connections alive, and backend connections are pooled per machine.
- **Draining**: in-flight requests are counted per machine. ``edge.inflight``
  (request/reply) answers ``{machine id: n}``; ``edge.drain`` with
  ``{"machines": [...], "timeout": s}`` answers once none of them is routed and
  none has a request in flight, so a deployer stops a machine only after that
  (:func:`drain` is the deployer's side).
- **Limits**: a request head must arrive whole within ``header_timeout`` (a
  slowloris client is cut off without holding anything else up), heads are at
  most ``max_header_bytes``, bodies at most ``max_body_bytes``, an exchange
  idles at most ``read_timeout``, and at most ``max_connections`` clients are
  served at once.

Two paths, one behaviour: a client connection starts on the **fast path**
(:class:`_FastClient`: protocol callbacks, no task or timer per request), which
answers bodiless requests, the great majority; the first request with a body or
an Upgrade hands the connection to the **stream path** (:meth:`Edge._client`,
asyncio streams), where body streaming, ``100-continue`` and WebSockets are
written once. Both use :meth:`Edge._plan` for the head sent to a machine, the
same balancer, retries and in-flight counts. bench/edge.py measures them against
nginx (bench/RESULTS.md, "Platform edge").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson

from taxiway.egress import http, splice
from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.listen import DEFAULT_HOST, parse_listen
from taxiway.platform import edgehttp, schema
from taxiway.platform.balance import Backend, Balancer, Routes, machines_to_stop
from taxiway.platform.edgehttp import (
    IDEMPOTENT,
    REPLAY,
    REQUEST_ID,
    Plan,
    WsFrames,
    forward_response_head,
    parse_replay,
    parse_response_head,
    plan_request,
    replay_head,
    ws_close_frame,
)
from taxiway.platform.edgehttp import parse_request_head as parse_request_head_fast

if TYPE_CHECKING:
    from taxiway.platform.state import State

# {} -> {"ok", "edge", "inflight": {machine: n}, "routes": {app: [machines]}};
# {"machine": id} -> {"ok", "edge", "inflight": n, "routed": bool}
INFLIGHT_SUBJECT = "edge.inflight"
DRAIN_SUBJECT = "edge.drain"        # {"machines": [...], "timeout": s} -> {"ok", "drained", "inflight", "routed"}

READ_SIZE = 256 * 1024


@dataclass
class EdgeConfig:
    """Everything ``python -m taxiway.platform.edge`` takes; ``taxiway up`` builds one too."""

    nats: str = "nats://127.0.0.1:4222"
    listen: tuple[str, int] = ("127.0.0.1", 8180)
    domain: str = "localhost"
    header_timeout: float = 10.0    # a request head, from its first byte to its blank line
    idle_timeout: float = 75.0      # a client's keep-alive connection between requests
    connect_timeout: float = 3.0    # to a backend on loopback: it answers at once or is gone
    read_timeout: float = 120.0     # no byte moved either way on an exchange
    queue_timeout: float = 10.0     # a request waiting for a machine under its hard_limit
    retry_window: float = 10.0      # a request whose every machine failed tries again this long
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 1 << 30   # 0: no limit
    max_connections: int = 10_000
    max_idle_per_backend: int = 64
    ready_timeout: float = 30.0     # for the first complete copy of the routes
    drain_timeout: float = 30.0     # at SIGTERM, for in-flight requests to finish
    autostop_after: float = 300.0   # auto_stop_machines: a machine idle this long is stopped
    wake_timeout: float = 60.0      # auto_start_machines: a request waits this long for a stopped machine
    ws_close_timeout: float = 5.0   # a drained WebSocket: for the client's close frame after ours
    workers: int = 1                # processes serving the HTTP port (SO_REUSEPORT): one per core
    worker: int = 0                 # 0: the primary (answers edge.*, stops idle machines, TCP services)
    primary: str = ""               # a worker's primary edge name (its subjects are edge.<primary>.w<n>.*)
    argv: list[str] | None = None   # the command line, to start workers with
    fast: bool = True               # bodiless requests by protocol callbacks (see _FastClient)
    # E1 (TLS): the HTTPS listener of platform.edgetls, off when None
    https: tuple[str, int] | None = None
    ca: str | None = None           # taxiway's CA directory (default: the CA's default place)
    tls_dir: str | None = None      # issued certificates, ACME account and certificates (0600 files)


class _Retry(Exception):
    """The backend failed before anything reached the client: try another (or a fresh connection)."""

    def __init__(self, reason: str, backend_failed: bool) -> None:
        super().__init__(reason)
        self.backend_failed = backend_failed


class _Replay(Exception):
    """The machine answered with taxiway-replay: send the request to ``target`` instead."""

    def __init__(self, target: dict[str, str]) -> None:
        super().__init__(str(target))
        self.target = target


# Request bodies up to this size are read whole before the request is sent, so that a replay
# (or a retry on a stale pooled connection) can send them again; larger ones stream.
REPLAY_BODY_BYTES = 64 * 1024


def _expects_continue(head: http.RequestHead) -> bool:
    return any(k.lower() == b"expect" for k, _ in head.headers)


def _replay_targets(backends: tuple[Backend, ...], replay: dict[str, str], origin: str) -> tuple[Backend, ...]:
    """The routed machines a replay may go to: the named instance, the region's, or any other."""
    if replay.get("instance"):
        return tuple(b for b in backends if b.machine == replay["instance"])
    if replay.get("region"):
        return tuple(b for b in backends if b.region == replay["region"])
    return tuple(b for b in backends if b.machine != origin)


def _replay_unavailable(app: str, replay: dict[str, str], request_id: str, close: bool) -> bytes:
    where = (f"instance {replay['instance']}" if replay.get("instance") else
             f"region {replay['region']}" if replay.get("region") else "another machine")
    return http.simple_response(503, f"app {app} asked to replay this request on {http.header_safe(where)}, "
                                     "which has no routable machine; try again\n",
                                [("Retry-After", "1"), ("taxiway-request-id", request_id)], close=close)


class _ClientGone(Exception):
    """The client closed or broke its side; nothing more can be said to it."""


class _BadBody(Exception):
    """The client's request body broke its framing or went over the size limit."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Conn:
    """A connection to one backend; pooled between requests while the backend keeps it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False
    on_close: Callable[[], None] | None = None  # the balancer's count of open connections

    def usable(self) -> bool:
        return not (self.writer.transport.is_closing() or self.reader.at_eof()
                    or self.reader._buffer)  # noqa: SLF001 - bytes nobody asked for: a broken backend

    def close(self) -> None:
        self.writer.close()
        if self.on_close is not None:
            done, self.on_close = self.on_close, None
            done()


_UNSEEN = object()
_MAX_ATTEMPTS = 64  # connects per request, whatever the retry window


def _backoff(attempt: int) -> float:
    """Seconds before trying every machine again: from 20 ms, doubling to 1 s (a machine just
    started, or woken for this request, usually listens within tens of milliseconds)."""
    return min(0.01 * 2 ** min(attempt, 7), 1.0)

_SWEEP = 0.25  # seconds between passes over waiting clients (timeouts are this much coarse)


@dataclass(slots=True, eq=False)
class _Client:
    """A client connection's place in the request loop, for the sweeper."""

    reader: asyncio.StreamReader
    task: asyncio.Task
    since: float              # loop time it began waiting for a head
    head_seen: float = 0.0    # loop time the head's first bytes were seen (0: none yet)
    waiting: bool = False     # waiting for a head (the only time the sweeper may cut it)
    expired: bool = False


class Edge:
    """The edge server: routes mirrored from the KV, a balancer, a pool, one task per client."""

    def __init__(self, config: EdgeConfig, state: State | None = None, log: IO[bytes] | None = None) -> None:
        self.config = config
        self.state = state
        self._own_state = state is None
        self.log_out = log or sys.stdout.buffer
        self.routes = Routes()
        self.balancer = Balancer()
        self.name = f"edge-{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._rid = self.name[5:] + "-"  # request ids: <edge>-<hex counter>
        self._pool: dict[str, list[_Conn]] = {}
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._mirrors: list[asyncio.Task] = []
        self._host_apps: dict[str, str | None] = {}  # Host header -> app (or None), as parsed once
        self._subs: list[Any] = []
        self._ready = {b: asyncio.Event() for b in (schema.APPS, schema.MACHINES, schema.STATUS)}
        self._clients: dict[asyncio.Task, _Client] = {}
        self._fast: set[_FastClient] = set()
        self._fpool: dict[str, list[_FastBackend]] = {}
        self._bg: set[asyncio.Task] = set()  # connects and queued requests of the fast path
        self._change = asyncio.Event()
        self._waiters = 0
        # scale to zero: when each routed machine was last busy (loop time), wakes and stops under way
        self._last_active: dict[str, float] = {}
        self._waking: dict[str, asyncio.Future] = {}
        self._autostops: dict[str, set[asyncio.Task]] = {}
        self._tunnels: dict[str, set[Any]] = {}  # machine -> open tunnels (WebSocket, TCP): drained last
        self._tcp: dict[int, _TcpListener] = {}  # plain TCP services: edge port -> listener
        self._workers: list[subprocess.Popen] = []
        self._tcp_failed: set[int] = set()
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._loop: Any = None  # the running loop, once started (its clock is read per request)
        self.address: tuple[str, int] | None = None
        self.tls: Any = None  # E1: platform.edgetls.EdgeTLS when config.https (HTTPS, HTTP/2, ACME)
        self.hostnames: dict[str, str] = {}  # E1: custom hostname -> app (CERTS bucket, via set_hostnames)

    # -- logging -------------------------------------------------------------------------
    def log(self, **fields: object) -> None:
        fields.setdefault("time", round(time.time(), 3))
        with contextlib.suppress(Exception):
            self.log_out.write(orjson.dumps(fields, default=str) + b"\n")
            self.log_out.flush()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        """Connect, mirror the routes, answer drain requests, then listen; returns (host, port)."""
        from taxiway.platform.state import State

        if self.state is None:
            _log_nats_into(self)
            self.state = await State.connect(self.config.nats, name=self.name)
        self._stopped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._start_mirrors()
        self.state.on_reconnect(self._start_mirrors)
        self._tasks.append(asyncio.create_task(self._sweep()))
        self._tasks.append(asyncio.create_task(self._autostop_loop()))
        try:
            async with asyncio.timeout(self.config.ready_timeout):
                await asyncio.gather(*(e.wait() for e in self._ready.values()))
        except TimeoutError:
            await self.close()
            raise TaxiwayError(f"the routes did not load from NATS within {self.config.ready_timeout:.0f} s",
                               "check that nats-server is healthy ('taxiway up')") from None
        if self.config.worker:  # a worker answers its primary only, which merges every worker's answer
            prefix = worker_subject(self.config.primary, self.config.worker)
            self._subs.append(await self.state.serve(prefix + "inflight", self._answer_inflight))
            self._subs.append(await self.state.serve(prefix + "drain", self._answer_drain, concurrent=True))
        else:
            self._subs.append(await self.state.serve(INFLIGHT_SUBJECT, self._answer_all_inflight))
            self._subs.append(await self.state.serve(DRAIN_SUBJECT, self._answer_all_drain, concurrent=True))
        host, port = self.config.listen
        shared = self.config.workers > 1 or self.config.worker > 0  # SO_REUSEPORT: the kernel spreads clients
        try:
            if self.config.fast:
                self._server = await asyncio.get_running_loop().create_server(
                    lambda: _FastClient(self), host, port, backlog=1024, reuse_address=True, reuse_port=shared)
            else:
                self._server = await asyncio.start_server(self._client, host, port, backlog=1024,
                                                          limit=self.config.max_header_bytes, reuse_address=True,
                                                          reuse_port=shared)
        except OSError as e:
            await self.close()
            raise TaxiwayError(f"cannot listen on {host}:{port}: {e.strerror}",
                               "pick a free port with --listen HOST:PORT") from None
        self.address = self._server.sockets[0].getsockname()[:2]
        self._sync_tcp()
        if not self.config.worker and self.config.workers > 1:
            self._start_workers()
        if self.config.https is not None:  # E1: the TLS side lives in platform.edgetls
            from taxiway.platform.edgetls import EdgeTLS

            try:
                self.tls = EdgeTLS(self)
                await self.tls.start()
            except BaseException:
                await self.close()
                raise
        self.log(msg="listening", edge=self.name, address=f"{self.address[0]}:{self.address[1]}",
                 domain=self.config.domain, routes=self.routes.table())
        return self.address

    async def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then finish in-flight requests (up to drain_timeout)."""
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
        """Stop listening, close idle clients, let in-flight requests finish, then cut the rest."""
        self._stopping = True
        self._notify()  # drains waiting on this edge answer now
        for listener in self._tcp.values():
            listener.close()
        self._tcp.clear()
        for w in self._workers:  # they finish their own in-flight requests (SIGTERM), as this one does
            with contextlib.suppress(ProcessLookupError):
                w.terminate()
        for tunnels in list(self._tunnels.values()):
            for t in list(tunnels):
                t.going_away()
        if self.tls is not None:  # E1
            await self.tls.close()
        if self._server is not None:
            self._server.close()
        for c in list(self._clients.values()):
            if c.waiting and not c.reader._buffer:  # noqa: SLF001 - idle between requests
                c.task.cancel()
        for f in list(self._fast):
            if not f.busy:
                f.close()
        gone = [f.gone for f in self._fast if f.gone is not None]
        if gone:
            await asyncio.wait(gone, timeout=self.config.drain_timeout)
            for f in list(self._fast):
                f.abort()
        if self._clients:
            _, pending = await asyncio.wait(list(self._clients), timeout=self.config.drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for t in list(self._bg):
            t.cancel()
        for pool in (self._pool, self._fpool):
            for conns in pool.values():
                for c in conns:
                    c.close()
            pool.clear()
        for w in self._workers:
            try:
                await asyncio.wait_for(asyncio.to_thread(w.wait), self.config.drain_timeout + 10)
            except TimeoutError:
                w.kill()
        if self._own_state and self.state is not None:
            await self.state.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.log(msg="stopped", edge=self.name)

    # -- routes: a mirror of three buckets -------------------------------------------------
    def _start_mirrors(self) -> None:
        """(Re)start the three watches: at start, and after NATS reconnected (a restarted
        server forgot their consumers, and the old watches would wait forever)."""
        if self._stopping:
            return
        for t in self._mirrors:
            t.cancel()
        self._mirrors = [asyncio.create_task(self._mirror(bucket)) for bucket in self._ready]
        self._tasks += self._mirrors
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _mirror(self, bucket: str) -> None:
        """Keep ``bucket``'s part of the routes current; after a broken watch, start again and
        drop the keys that were deleted meanwhile (the new watch's initial values are the truth)."""
        assert self.state is not None
        while True:
            ready = asyncio.Event()
            seen: set[str] = set()

            async def prune(ready: asyncio.Event = ready, seen: set[str] = seen) -> None:
                await ready.wait()
                for key in self._mirrored(bucket) - seen:
                    self._apply(bucket, key, None)
                self._ready[bucket].set()

            pruner = asyncio.create_task(prune())
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

    def _mirrored(self, bucket: str) -> set[str]:
        if bucket == schema.APPS:
            return set(self.routes.apps)
        return set(self.routes.machines if bucket == schema.MACHINES else self.routes.status)

    def _apply(self, bucket: str, key: str, value: Any) -> None:
        if bucket == schema.APPS:
            self.routes.set_app(key, value)
            return
        app = key.partition(".")[0]
        before = {b.machine for b in self.routes.backends(app)}
        if bucket == schema.MACHINES:
            self.routes.set_machine(key, value)
            self._sync_tcp()
        else:
            self.routes.set_status(key, value)
        self._routes_changed(app, before)

    def _routes_changed(self, app: str, before: set[str]) -> None:
        """After ``app``'s routes may have changed: close pooled connections to machines that
        left them, log, and wake whoever waits for a route (queued requests, drains, wakes)."""
        after = {b.machine for b in self.routes.backends(app)}
        if before != after:
            gone = before - after
            for mid in gone:
                for c in self._pool.pop(mid, []):
                    c.close()
                for fc in self._fpool.pop(mid, []):
                    fc.close()
                self.balancer.idle.pop(mid, None)
                self._last_active.pop(mid, None)
            self.balancer.forget(gone)
            self.log(msg="routes", app=app, machines=sorted(after))
            self._notify()
        else:
            self._notify()  # a stopped machine appeared (one to wake), or a status a drain waits for

    def _notify(self) -> None:
        """Wake whoever waits for a route change or a finished request (drains, queued requests)."""
        if self._waiters:
            self._change.set()
            self._change = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        self._waiters += 1
        try:
            await asyncio.wait_for(self._change.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1

    # -- drain, for deployers ----------------------------------------------------------------
    async def _answer_inflight(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("machine"):  # one machine: {"inflight": n, "routed": bool}
            mid = str(req["machine"])
            return {"ok": True, "edge": self.name, "inflight": self.balancer.inflight.get(mid, 0),
                    "routed": self.routes.routable(mid)}
        now = asyncio.get_running_loop().time()
        return {"ok": True, "edge": self.name, "inflight": self.balancer.counts(), "routes": self.routes.table(),
                "idle": {m: round(now - t, 3) for m, t in self._last_active.items()}}

    # -- workers (SO_REUSEPORT processes on the same port) ----------------------------------------
    def _start_workers(self) -> None:
        """Start workers 1..n-1: the same edge on the same port, their NATS mirror their own."""
        host, port = self.address  # type: ignore[misc]
        argv = _without(self.config.argv or [], ("--https", "--ca", "--tls-dir", "--workers", "--listen"))
        for i in range(1, self.config.workers):
            cmd = [sys.executable, "-m", "taxiway.platform.edge", *argv, "--listen",
                   f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                   "--workers", str(self.config.workers), "--worker", str(i), "--primary", self.name]
            self._workers.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
        self.log(msg="workers", edge=self.name, workers=self.config.workers)
        self._tasks.append(asyncio.create_task(self._watch_workers()))

    async def _watch_workers(self) -> None:
        """A worker that died is started again (after a second), so the port keeps every core."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for i, w in enumerate(self._workers):
                if w.poll() is not None and not self._stopping:
                    self.log(msg="worker exited", worker=i + 1, code=w.returncode)
                    self._workers[i] = subprocess.Popen(w.args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    async def _ask_workers(self, verb: str, payload: dict[str, Any], timeout: float = 2.0) -> list[dict[str, Any]]:
        """Every worker's answer to ``verb`` (those that do not answer are left out)."""
        if self.config.worker or self.config.workers <= 1 or self.state is None:
            return []
        replies = await asyncio.gather(*(self.state.request(worker_subject(self.name, i) + verb, payload,
                                                            timeout=timeout)
                                         for i in range(1, self.config.workers)), return_exceptions=True)
        return [r for r in replies if isinstance(r, dict) and r.get("ok")]

    async def _answer_all_inflight(self, req: dict[str, Any]) -> dict[str, Any]:
        """``edge.inflight`` for the whole edge: this process's counts plus every worker's."""
        mine = await self._answer_inflight(req)
        for w in await self._ask_workers("inflight", req):
            if req.get("machine"):
                mine["inflight"] += w.get("inflight") or 0
                mine["routed"] = mine["routed"] or bool(w.get("routed"))
            else:
                for mid, n in (w.get("inflight") or {}).items():
                    mine["inflight"][mid] = mine["inflight"].get(mid, 0) + n
        mine.pop("idle", None)
        return mine

    async def _answer_all_drain(self, req: dict[str, Any]) -> dict[str, Any]:
        """``edge.drain`` for the whole edge: every worker drains too; drained when all are."""
        timeout = req.get("timeout", 30.0)
        try:
            wait = min(max(float(timeout), 0.0), 600.0) + 5
        except (TypeError, ValueError):
            wait = 35.0
        mine, *theirs = await asyncio.gather(self._answer_drain(req), self._ask_workers("drain", req, timeout=wait))
        for w in theirs[0]:
            mine["drained"] = mine["drained"] and bool(w.get("drained"))
            for mid, n in (w.get("inflight") or {}).items():
                mine["inflight"][mid] = mine["inflight"].get(mid, 0) + n
            mine["routed"] = sorted(set(mine["routed"]) | set(w.get("routed") or []))
        return mine

    async def _answer_drain(self, req: dict[str, Any]) -> dict[str, Any]:
        machines = [str(m) for m in req.get("machines") or []]
        try:
            timeout = min(max(float(req.get("timeout", 30.0)), 0.0), 600.0)
        except (TypeError, ValueError):
            raise InvalidInput("edge.drain: timeout must be a number of seconds", "send e.g. 30") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            counts = {m: self.balancer.inflight.get(m, 0) for m in machines}
            routed = [m for m in machines if self.routes.routable(m)]
            for m in machines:  # WebSockets go last: once the machine's requests are done
                tunnels = self._tunnels.get(m)
                if tunnels and m not in routed and counts[m] <= len(tunnels):
                    for t in list(tunnels):
                        t.going_away()
            busy = {m: n for m, n in counts.items() if n}
            left = deadline - loop.time()
            if (not routed and not busy) or left <= 0 or self._stopping:
                return {"ok": True, "edge": self.name, "drained": not routed and not busy,
                        "inflight": busy, "routed": routed}
            await self._wait_change(left)

    # -- one client connection ----------------------------------------------------------------
    async def _sweep(self) -> None:
        """Cut clients that idle too long between requests, or take too long over a head.

        One pass every quarter second over the waiting clients instead of a timer per
        request: arming and cancelling two timers per request cost more than the
        rest of a small request's Python work (measured with bench/edge.py).
        """
        loop = asyncio.get_running_loop()
        header, idle = self.config.header_timeout, self.config.idle_timeout
        while True:
            await asyncio.sleep(_SWEEP)
            now = loop.time()
            for c in list(self._clients.values()):
                if not c.waiting:
                    continue
                buffered = c.reader._buffer  # noqa: SLF001 - bytes of a head not yet complete
                if not c.head_seen and buffered:
                    c.head_seen = now
                late = now - c.head_seen > header if c.head_seen else now - c.since > idle
                if late and b"\r\n\r\n" not in buffered:  # a whole head: its reader is about to run
                    c.waiting, c.expired = False, True
                    c.task.cancel()
            for f in list(self._fast):
                if f.busy:
                    if f.req is not None and now - f.req.progress > self.config.read_timeout:
                        f.req.timed_out()
                    continue
                if not f.head_seen and f.buf:
                    f.head_seen = now
                late = now - f.head_seen > header if f.head_seen else now - f.since > idle
                if late:
                    f.expire()

    def _at_capacity(self) -> bool:
        return len(self._clients) + len(self._fast) >= self.config.max_connections or self._stopping

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      first: bytes | None = None) -> None:
        """One client connection on the stream path; ``first``: a head the fast path read
        before handing the connection over (a request with a body, or an upgrade)."""
        task = asyncio.current_task()
        assert task is not None
        if first is None and self._at_capacity():
            writer.write(http.simple_response(503, "the edge is at its connection limit; try again\n",
                                              [("Retry-After", "1")]))
            await _close(writer)
            return
        loop = asyncio.get_running_loop()
        # The first head must arrive whole within header_timeout of connecting; later ones
        # within header_timeout of their first byte, after up to idle_timeout of quiet.
        c = _Client(reader, task, since=loop.time(), head_seen=loop.time())
        self._clients[task] = c
        peer = writer.get_extra_info("peername")
        client_ip = peer[0] if peer else "?"
        try:
            while not self._stopping or first is not None:
                c.waiting = True
                try:
                    if first is not None:
                        raw, first = first, None
                    else:
                        raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(http.simple_response(431, "request head too large\n"))
                    break
                except asyncio.CancelledError:
                    if not c.expired:
                        raise
                    task.uncancel()
                    if reader._buffer:  # noqa: SLF001 - a head was started: say why it ends
                        writer.write(http.simple_response(408, "request head not received in time\n"))
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                finally:
                    c.waiting = False
                if not await self._request(raw, reader, writer, client_ip):
                    break
                c.since, c.head_seen = loop.time(), 0.0
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bug must not take the server down, but must be seen
            self.log(msg="error", client=client_ip, error=repr(e))
        finally:
            del self._clients[task]
            await _close(writer)

    async def _request(self, raw: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       client_ip: str) -> bool:
        """Answer one request; True if the client connection stays open for another."""
        try:
            head = http.parse_request_head(raw)
            framing = http.request_framing(head)
            proto = b"https" if writer.get_extra_info("sslcontext") is not None else b"http"
            plan = self._plan(head, client_ip, proto)
        except http.ProtocolError as e:
            writer.write(http.simple_response(e.status, f"bad request: {e}\n"))
            return False
        if self.tls is not None and (early := self.tls.intercept(head, plan, proto)) is not None:  # E1
            writer.write(early)
            return False
        app, host, keep = plan.app, plan.host, plan.keep
        has_body = framing[0] != "none" and framing != ("length", 0)
        if app is None or not self.routes.known(app):
            # Says nothing about what does exist: the name asked for is the caller's own.
            writer.write(http.simple_response(404, f"no app is served at {http.header_safe(host)}\n",
                                              close=not keep or has_body))
            return keep and not has_body
        limit = self.config.max_body_bytes
        if limit and framing[0] == "length" and framing[1] > limit:
            writer.write(http.simple_response(413, f"request body over {limit} bytes\n"))
            return False
        return await self._proxy(app, plan, head, framing, reader, writer)

    async def handle(self, raw: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     client_ip: str) -> bool:
        """Answer one request head (its body read from ``reader``) on ``writer``, as the stream
        path does; the entry point of HTTP/2 streams (E1: platform.edgeh2)."""
        return await self._request(raw, reader, writer, client_ip)

    def _plan(self, head: http.RequestHead, client_ip: str, proto: bytes = b"http") -> Plan:
        """:func:`edgehttp.plan_request` with the app resolved (once per distinct Host) and a new request id."""
        plan = plan_request(head, client_ip, f"{self._rid}{next(self._ids):x}", proto)
        app = self._host_apps.get(plan.host, _UNSEEN) if plan.host else None
        if app is _UNSEEN:
            app = self._app_for_host(plan.host)
            if len(self._host_apps) >= 4096:  # bounded: clients choose the Host header
                self._host_apps.clear()
            self._host_apps[plan.host] = app
        plan.app = app  # type: ignore[assignment]
        plan.keep = plan.keep and not self._stopping
        return plan

    def set_hostnames(self, hostnames: dict[str, str]) -> None:
        """Route these custom hostnames to their apps (E1: edgetls mirrors them from CERTS)."""
        self.hostnames = dict(hostnames)
        self._host_apps.clear()

    def client_protocol(self) -> asyncio.BaseProtocol:
        """A protocol serving one HTTP/1.1 client connection, for another listener (E1: the TLS one)."""
        if self.config.fast:
            return _FastClient(self)
        reader = asyncio.StreamReader(limit=self.config.max_header_bytes)
        return asyncio.StreamReaderProtocol(reader, self._client)

    def _app_for_host(self, authority: str) -> str | None:
        name = authority.strip().lower()
        if not name.startswith("["):
            host_part, sep, port = name.rpartition(":")
            if sep and port.isdigit():
                name = host_part
        name = name.rstrip(".")
        if name in self.hostnames:  # E1: custom hostnames ('taxiway certs add')
            return self.hostnames[name]
        suffix = "." + self.config.domain
        if name.endswith(suffix):
            label = name[: -len(suffix)]
            if schema.valid_app_name(label):
                return label
        return None

    async def _proxy(self, app: str, plan: Plan, head: http.RequestHead, framing: tuple[str, int],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        loop = asyncio.get_running_loop()
        request_id, keep = plan.request_id, plan.keep
        has_body = framing[0] != "none" and framing != ("length", 0)
        body: bytes | None = None
        if framing[0] == "length" and 0 < framing[1] <= REPLAY_BODY_BYTES and not _expects_continue(head):
            # A small body is read whole first: one write to the machine, and a replay or a retry
            # can send it again. (Not with Expect: 100-continue: that client waits for the machine.)
            try:
                async with asyncio.timeout(self.config.read_timeout):
                    body = await reader.readexactly(framing[1])
            except (asyncio.IncompleteReadError, ConnectionError):
                return False
            except TimeoutError:
                writer.write(http.simple_response(408, "request body not received in time\n"))
                return False
            framing, has_body = ("none", 0), False
        tried: set[str] = set()
        fresh_only: set[str] = set()  # machines whose pooled connection was stale: dial anew
        queue_deadline = loop.time() + self.config.queue_timeout
        last_error = ""
        retry_deadline = loop.time() + self.config.retry_window
        attempt = 0
        woke = False
        replay: dict[str, str] | None = None  # where a machine asked this request to go (taxiway-replay)
        origin = ""
        while attempt < _MAX_ATTEMPTS:  # connects and retry rounds; waits for a slot are not counted
            backends = self.routes.backends(app)
            if replay is not None:
                backends = _replay_targets(backends, replay, origin)
                if not backends:
                    break
            elif not backends and not woke and self._wants_wake(app):
                woke = True  # auto_start_machines: start a stopped machine, hold the request meanwhile
                await self.wake(app)
                continue
            backend = self.balancer.choose(backends, tried, loop.time())
            attempt += 1
            if backend is None:
                if backends and self.balancer.full([b for b in backends if b.machine not in tried]) \
                        and loop.time() < queue_deadline:
                    await self._wait_change(queue_deadline - loop.time())  # a slot, or new routes
                    attempt -= 1
                    continue
                if tried and backends and loop.time() < retry_deadline:
                    # Every machine failed: one just started may not listen yet, or the routes are
                    # about to change. Nothing was sent, so trying again is safe; back off a little.
                    await asyncio.sleep(_backoff(attempt))
                    tried.clear()
                    continue
                break
            self.balancer.acquire(backend)
            if backend.soft_limit is not None:
                self._wake_more(app, backends)
            try:
                conn = await self._connect(backend, fresh=backend.machine in fresh_only)
            except (OSError, TimeoutError) as e:
                self._released(backend)
                self.balancer.mark_failed(backend, loop.time())
                tried.add(backend.machine)
                last_error = f"connect to machine {backend.machine} failed: {type(e).__name__}"
                self.log(msg="backend failed", app=app, machine=backend.machine, error=last_error,
                         request_id=request_id, retry=True)
                continue
            try:
                keep_client, keep_conn = await self._exchange(head, plan, framing, conn, reader, writer,
                                                              backend.machine, body)
            except _Retry as r:
                conn.close()
                if r.backend_failed:
                    self.balancer.mark_failed(backend, loop.time())
                    tried.add(backend.machine)
                else:
                    fresh_only.add(backend.machine)
                last_error = f"machine {backend.machine}: {r}"
                self.log(msg="backend failed", app=app, machine=backend.machine, error=str(r),
                         request_id=request_id, retry=True)
                continue
            except _Replay as r:
                conn.close()
                replay, origin = r.target, backend.machine
                plan.out = replay_head(plan.out, backend.machine, backend.region, replay.get("state"))
                plan.replayed = True
                tried.clear()
                self.log(msg="replay", app=app, machine=backend.machine, to=replay, request_id=request_id)
                continue
            except BaseException:
                conn.close()
                raise
            finally:
                self._released(backend)
            if keep_conn:
                self._put_back(backend, conn)
            else:
                conn.close()
            return keep_client
        close = not keep or has_body
        if replay is not None and not tried:
            writer.write(_replay_unavailable(app, replay, request_id, close))
        else:
            writer.write(self._no_answer(app, tried, last_error, request_id, close=close))
        return not close

    def _no_answer(self, app: str, tried: set[str], last_error: str, request_id: str, close: bool) -> bytes:
        """502 when machines were tried and failed, else 503 (none routable, or all at hard_limit)."""
        headers = [("Retry-After", "1"), ("taxiway-request-id", request_id)]
        if tried:
            return http.simple_response(502, f"no machine of app {app} could answer ({last_error}); try again\n",
                                        headers, close=close)
        msg = (f"every machine of app {app} is at its hard_limit; try again\n" if self.routes.backends(app) else
               f"app {app} has no healthy machine right now; try again shortly (see 'taxiway status')\n")
        return http.simple_response(503, msg, headers, close=close)

    async def _connect(self, backend: Backend, fresh: bool = False) -> _Conn:
        mid = backend.machine
        pooled = self._pool.get(mid)
        while pooled and not fresh:
            conn = pooled.pop()
            self._count_idle(mid)
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        async with asyncio.timeout(self.config.connect_timeout):
            r, w = await asyncio.open_connection(backend.host, backend.port, limit=self.config.max_header_bytes)
        self.balancer.opened(mid)
        return _Conn(r, w, on_close=lambda: self.balancer.closed(mid))

    def _put_back(self, backend: Backend, conn: _Conn) -> None:
        if not self.routes.routable(backend.machine) or not conn.usable():
            conn.close()
            return
        pooled = self._pool.setdefault(backend.machine, [])
        if len(pooled) >= self.config.max_idle_per_backend:
            conn.close()
        else:
            pooled.append(conn)
            self._count_idle(backend.machine)

    def _count_idle(self, mid: str) -> None:
        """Tell the balancer how many idle pooled connections ``mid`` has (concurrency "connections")."""
        n = len(self._pool.get(mid) or ()) + len(self._fpool.get(mid) or ())
        if n:
            self.balancer.idle[mid] = n
        else:
            self.balancer.idle.pop(mid, None)

    def _released(self, backend: Backend) -> None:
        """A request or stream of ``backend`` ended: count it out, note the machine was busy now."""
        self.balancer.release(backend)
        self._last_active[backend.machine] = self._loop.time()
        self._notify()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                      body: asyncio.Task | None, machine: str, ws: bool) -> None:
        """After a 101: relay both ways, registered under ``machine`` so a drain can end it last."""
        t = _WsTunnel(reader, writer, conn, ws, self.config.ws_close_timeout)
        self._tunnels.setdefault(machine, set()).add(t)
        try:
            if self._stopping:
                t.going_away()
            await t.run(body)
        finally:
            tunnels = self._tunnels.get(machine)
            if tunnels is not None:
                tunnels.discard(t)
                if not tunnels:
                    del self._tunnels[machine]

    # -- plain TCP services ([[services]] without an http handler) --------------------------------
    def _sync_tcp(self) -> None:
        """Listen on every plain TCP service's port (on the edge's host), stop listening on gone ones."""
        if self.address is None or self._stopping or self.config.worker:
            return  # start() calls this once the HTTP listener is up; workers serve HTTP only
        want = self.routes.tcp_listeners()
        for port in [p for p in self._tcp if p not in want]:
            self._tcp.pop(port).close()
            self.log(msg="tcp service closed", port=port)
        self._tcp_failed &= set(want)
        for port, spec in want.items():
            if port in self._tcp:
                self._tcp[port].spec = spec
                continue
            if port in self._tcp_failed:
                continue
            host = self.config.listen[0]
            try:
                sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                            backlog=1024, reuse_port=False)
            except OSError as e:
                self._tcp_failed.add(port)  # said once; tried again when the services change
                self.log(msg="tcp service cannot listen", app=spec[0], port=port, error=e.strerror)
                continue
            sock.setblocking(False)
            listener = _TcpListener(self, port, spec, sock)
            self._tcp[port] = listener
            listener.task = self._spawn(listener.serve())
            self.log(msg="tcp service", app=spec[0], port=port, internal_port=spec[1], proxy_proto=spec[2])

    async def _tcp_client(self, listener: _TcpListener, client: socket.socket, peer: tuple) -> None:
        """One client of a TCP service: the least-loaded machine, PROXY v2 header if asked, then
        bytes both ways by splice(2) (no byte enters Python)."""
        loop = asyncio.get_running_loop()
        app, internal, proxy_proto = listener.spec
        tried: set[str] = set()
        woke = False
        try:
            for _ in range(_MAX_ATTEMPTS):
                backends = tuple(self.routes.tcp_backends(app, internal))
                if not backends and not woke and self._wants_wake(app):
                    woke = True
                    await self.wake(app)
                    continue
                backend = self.balancer.choose(backends, tried, loop.time())
                if backend is None:
                    break
                self.balancer.acquire(backend)
                try:
                    async with asyncio.timeout(self.config.connect_timeout):
                        up = await splice.dial_socket(backend.host, backend.port)
                except (OSError, TimeoutError):
                    self._released(backend)
                    self.balancer.mark_failed(backend, loop.time())
                    tried.add(backend.machine)
                    continue
                self.balancer.opened(backend.machine)
                tunnel = splice.SpliceTunnel(loop, client, up)
                client = None  # the tunnel closes it
                handle = _TcpTunnel(tunnel)
                self._tunnels.setdefault(backend.machine, set()).add(handle)
                try:
                    if proxy_proto:
                        local = tunnel.socks[0].getsockname()
                        await loop.sock_sendall(up, edgehttp.proxy_v2_header(peer[:2], local[:2]))
                    tunnel.start()
                    await tunnel.done
                except OSError:
                    pass
                finally:
                    tunnel.close()
                    self.balancer.closed(backend.machine)
                    self._released(backend)
                    tunnels = self._tunnels.get(backend.machine)
                    if tunnels is not None:
                        tunnels.discard(handle)
                        if not tunnels:
                            del self._tunnels[backend.machine]
                return
            self.log(msg="tcp service has no machine", app=app, port=listener.port)
        except Exception as e:  # a bug must not pass unseen
            self.log(msg="error", app=app, port=listener.port, error=repr(e))
        finally:
            if client is not None:
                client.close()

    # -- scale to zero ---------------------------------------------------------------------------
    def _wants_wake(self, app: str) -> bool:
        """No machine routable, but one may be started (or one is being stopped, to start again)."""
        return bool(self._autostops.get(app)) or bool(self.routes.sleeping(app))

    async def wake(self, app: str, more: bool = False) -> bool:
        """Start a stopped machine of ``app`` (auto_start_machines) and wait until it is routable,
        up to wake_timeout; one wake per app at a time, shared by every request that waits.
        ``more``: even though the app has routed machines (they are all above soft_limit).
        True when the app has a routable machine after it."""
        fut = self._waking.get(app)
        if fut is None:
            fut = asyncio.ensure_future(self._wake(app, more))
            self._waking[app] = fut
            fut.add_done_callback(lambda _: self._waking.pop(app, None))
        return await asyncio.shield(fut)

    async def _wake(self, app: str, more: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + self.config.wake_timeout
        stopping = list(self._autostops.get(app, ()))
        if stopping:  # a stop for idleness is under way: let it end, then start a machine again
            await asyncio.wait(stopping, timeout=self.config.wake_timeout)
        sleeping = self.routes.sleeping(app)
        if (self.routes.backends(app) and not more) or not sleeping or self.state is None:
            return bool(self.routes.backends(app))
        mid = sleeping[0]
        host = (self.routes.record(app, mid) or {}).get("host") or schema.DEFAULT_HOST
        self.log(msg="autostart", app=app, machine=mid)
        try:
            reply = await self.state.request(schema.agent_subject(host, "start"), {"app": app, "id": mid},
                                             timeout=max(deadline - loop.time(), 1.0))
        except TaxiwayError as e:
            self.log(msg="autostart failed", app=app, machine=mid, error=e.message)
            return bool(self.routes.backends(app))
        if not reply.get("ok"):
            self.log(msg="autostart failed", app=app, machine=mid, error=reply.get("error"))
        agent = loop.time() - t0  # the agent's share: it answers once the machine runs
        while (mid not in {b.machine for b in self.routes.backends(app)} if more else
               not self.routes.backends(app)) and loop.time() < deadline:
            await self._wait_change(deadline - loop.time())
        routed = bool(self.routes.backends(app))
        self.log(msg="awake" if routed else "autostart timed out", app=app, machine=mid,
                 seconds=round(loop.time() - t0, 3), agent_seconds=round(agent, 3))
        return routed

    def _wake_more(self, app: str, backends: tuple[Backend, ...]) -> None:
        """Every routed machine is at its soft_limit: start a stopped one too (Fly does), in the background."""
        if app not in self._waking and self.balancer.above_soft(backends) and self.routes.sleeping(app):
            self._spawn(self.wake(app, more=True))

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def _autostop_loop(self) -> None:
        """Stop machines idle for autostop_after (auto_stop_machines), down to min_machines_running."""
        if self.config.worker:
            return  # the primary decides, with every worker's activity
        loop = asyncio.get_running_loop()
        after = self.config.autostop_after
        while True:
            await asyncio.sleep(min(max(after / 4, 0.05), 5.0))
            now = loop.time()
            apps = [app for app in self.routes.table() if any(on for _, on, _ in self.routes.autostop(app))]
            if not apps:
                continue
            inflight = dict(self.balancer.inflight)
            for w in await self._ask_workers("inflight", {}):  # what the workers serve counts too
                for mid, n in (w.get("inflight") or {}).items():
                    inflight[mid] = inflight.get(mid, 0) + n
                for mid, idle in (w.get("idle") or {}).items():
                    self._last_active[mid] = max(self._last_active.get(mid, 0.0), now - float(idle))
            for app in apps:
                cands = self.routes.autostop(app)
                for mid, _, _ in cands:
                    self._last_active.setdefault(mid, now)  # idle from when it was first routed
                for mid in machines_to_stop(cands, inflight, self._last_active, now, after):
                    task = self._spawn(self._stop_idle(app, mid))
                    self._autostops.setdefault(app, set()).add(task)
                    task.add_done_callback(lambda t, app=app: self._autostops.get(app, set()).discard(t))

    async def _stop_idle(self, app: str, mid: str) -> None:
        """Take an idle machine out of the routes, then ask its agent to stop it (it keeps desired
        "started": stopped for idleness, so the next request starts it again)."""
        before = {b.machine for b in self.routes.backends(app)}
        self.routes.hold(app, mid)
        self._routes_changed(app, before)
        host = (self.routes.record(app, mid) or {}).get("host") or schema.DEFAULT_HOST
        self.log(msg="autostop", app=app, machine=mid, idle=self.config.autostop_after)
        try:
            assert self.state is not None
            reply = await self.state.request(schema.agent_subject(host, "stop"), {"app": app, "id": mid}, timeout=60)
            if not reply.get("ok"):
                self.log(msg="autostop failed", app=app, machine=mid, error=reply.get("error"))
            else:  # until the STATUS watch tells it stopped, it must stay out of the routes
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                key = schema.machine_key(app, mid)
                while (self.routes.status.get(key) or {}).get("state") == "started" and loop.time() < deadline:
                    await self._wait_change(deadline - loop.time())
        except TaxiwayError as e:
            self.log(msg="autostop failed", app=app, machine=mid, error=e.message)
        finally:
            before = {b.machine for b in self.routes.backends(app)}
            self.routes.hold(app, mid, False)
            self._last_active.pop(mid, None)
            self._routes_changed(app, before)

    async def _exchange(self, head: http.RequestHead, plan: Plan, framing: tuple[str, int], conn: _Conn,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, machine: str = "",
                        body_bytes: bytes | None = None) -> tuple[bool, bool]:
        """One request and its response over ``conn``: (keep the client, keep the backend connection).

        ``body_bytes``: the whole request body, read already (``framing`` is then "none").
        Raises :class:`_Retry` when the backend failed before a byte reached the client
        and sending the request again elsewhere is safe, :class:`_Replay` when the machine
        asked for the request to go elsewhere (taxiway-replay) and it can be sent again.
        """
        loop = asyncio.get_running_loop()
        idle = self.config.read_timeout
        keep, request_id = plan.keep, plan.request_id
        retry_ok = framing[0] == "none" and (head.method in IDEMPOTENT or conn.reused)
        answered = False  # a byte reached the client: from here on, failures can only close it
        body: asyncio.Task | None = None
        try:
            async with asyncio.timeout(idle) as timer:
                def progress() -> None:
                    timer.reschedule(loop.time() + idle)

                try:
                    conn.writer.write(plan.out + body_bytes if body_bytes else plan.out)
                except (ConnectionError, RuntimeError) as e:
                    raise _Retry(f"send failed: {e}", not conn.reused) from None
                if framing[0] != "none":
                    body = asyncio.create_task(_copy_body(reader, conn.writer, framing, progress,
                                                          self.config.max_body_bytes, client_side=True))
                while True:
                    try:
                        raw = await _response_head(conn.reader, body)
                    except (asyncio.IncompleteReadError, ConnectionError) as e:
                        if retry_ok and not (isinstance(e, asyncio.IncompleteReadError) and e.partial
                                             and head.method not in IDEMPOTENT):
                            raise _Retry("closed before answering", not conn.reused) from None
                        raise
                    rhead = parse_response_head(raw)
                    if 100 <= rhead.status < 200 and rhead.status != 101:
                        if head.version == b"HTTP/1.1":
                            writer.write(raw)
                            answered = True
                        continue
                    break
                replay = [v for k, v in rhead.headers if k.lower() == REPLAY]
                if replay:
                    rhead.headers = [(k, v) for k, v in rhead.headers if k.lower() != REPLAY]
                    if plan.replayed:  # a loop: cut after one replay
                        raise http.ProtocolError("asked to replay a request that was replayed already", 502)
                    if framing[0] != "none":
                        raise http.ProtocolError(f"asked to replay a request whose body (over "
                                                 f"{REPLAY_BODY_BYTES} bytes, or chunked) was not kept", 502)
                    raise _Replay(parse_replay(replay[-1]))
                rframing = http.response_framing(rhead, head.method)
                rtokens = http.connection_tokens(rhead.headers)
                if rhead.status == 101:
                    rhead.headers.append((REQUEST_ID, request_id.encode()))
                    writer.write(http.serialize_response_head(rhead, True))
                    answered = True
                    timer.reschedule(None)
                    ws = any(k.lower() == b"upgrade" and v.strip().lower() == b"websocket" for k, v in head.headers)
                    await self._tunnel(reader, writer, conn, body, machine, ws)
                    return False, False
                keep_conn = (rframing[0] != "close" and b"close" not in rtokens
                             and rhead.version == b"HTTP/1.1")
                keep = keep and rframing[0] != "close"
                rhead.headers.append((REQUEST_ID, request_id.encode()))
                rhead_bytes = http.serialize_response_head(rhead, keep)
                kind, length = rframing
                answered = True
                if kind == "length" and length <= len(conn.reader._buffer):  # noqa: SLF001
                    # A small body that already arrived: one write for head and body.
                    writer.write(rhead_bytes + await conn.reader.readexactly(length))
                else:
                    writer.write(rhead_bytes)
                    await _copy_body(conn.reader, writer, rframing, progress, 0)
                await _drain(writer)
                if body is not None and not body.done():
                    # The backend answered before taking the whole request body: the client
                    # connection cannot be reused (the rest of its body is still coming).
                    body.cancel()
                    return False, False
                if body is not None and body.exception() is not None:
                    return False, False
                return keep, keep_conn
        except _BadBody as e:
            if not answered:
                writer.write(http.simple_response(e.status, f"bad request body: {e}\n",
                                                  [("taxiway-request-id", request_id)]))
            return False, False
        except _ClientGone:
            return False, False
        except (http.ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, TimeoutError, OSError) as e:
            if not answered:
                status = 504 if isinstance(e, TimeoutError) else 502
                what = "timed out" if status == 504 else f"failed ({type(e).__name__})"
                if isinstance(e, http.ProtocolError):
                    what = f"failed ({e})"
                writer.write(http.simple_response(status, f"the app's machine {what}\n",
                                                  [("taxiway-request-id", request_id)]))
            return False, False
        finally:
            if body is not None:
                if not body.done():
                    body.cancel()
                with contextlib.suppress(BaseException):
                    await body


# -- the fast path: bodiless requests by protocol callbacks ----------------------------------------
#
# Most requests through an edge have no body (GET, HEAD, DELETE...). For those, a
# client connection is an asyncio.Protocol: heads are parsed in data_received and the
# response is relayed from the backend's own protocol callbacks, with no task, stream
# or timer per request; timeouts come from the sweeper. Measured on bench/edge.py this
# cost about half the CPU per small request of the stream path. A request with a body,
# or an upgrade, hands its connection to the stream path (Edge._client) for good, so
# body streaming, 100-continue and WebSockets are written once, there.

_IDLE, _HEAD, _BODY = 0, 1, 2
_NONE: frozenset = frozenset()  # an empty set shared by requests that never add to it


class _FastClient(asyncio.Protocol):
    """A client connection on the fast path."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False           # a request is being answered
        self.closed = False         # closed, or handed over to the stream path
        self.half_closed = False    # the client sent EOF: close once the answer is out
        self.reading_paused = False
        self.writing_paused = False
        self.since = 0.0            # as _Client: for the sweeper
        self.head_seen = 0.0
        self.client_ip = "?"
        self.req: _FastRequest | None = None
        self.gone: asyncio.Future | None = None

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - uvloop's are not asyncio.Transport
        edge = self.edge
        if edge._at_capacity():
            transport.write(http.simple_response(503, "the edge is at its connection limit; try again\n",
                                                 [("Retry-After", "1")]))
            self.closed = True
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "?"
        self.proto = b"https" if transport.get_extra_info("sslcontext") is not None else b"http"  # E1
        loop = asyncio.get_running_loop()
        # The first head must arrive whole within header_timeout of connecting.
        self.since = self.head_seen = loop.time()
        self.gone = loop.create_future()
        edge._fast.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy or self.closed:
            if len(self.buf) > self.edge.config.max_header_bytes and not self.reading_paused:
                self.reading_paused = True  # pipelined requests pile up: wait for this answer
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        self._next()

    def eof_received(self) -> bool:
        self.half_closed = True
        return self.busy  # keep the transport open to finish the answer in progress

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.edge._fast.discard(self)
        if self.req is not None:
            self.req.client_gone()
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.req is not None and self.req.conn is not None:
            self.req.conn.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.req is not None and self.req.conn is not None:
            self.req.conn.resume()

    # -- requests
    def _next(self) -> None:
        edge = self.edge
        limit = edge.config.max_header_bytes
        while not self.busy and not self.closed:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0 or i + 4 > limit:
                if len(self.buf) > limit:
                    self.reply(http.simple_response(431, "request head too large\n"), close=True)
                elif self.half_closed:
                    self.close()
                return
            raw = bytes(self.buf[: i + 4])
            del self.buf[: i + 4]
            try:
                head = parse_request_head_fast(raw)
                plan = edge._plan(head, self.client_ip, self.proto)
            except http.ProtocolError as e:
                self.reply(http.simple_response(e.status, f"bad request: {e}\n"), close=True)
                return
            if edge.tls is not None and (early := edge.tls.intercept(head, plan, self.proto)) is not None:  # E1
                self.reply(early, close=True)
                return
            if plan.body or plan.upgrade:  # framing checked, bodies streamed: the stream path's job
                self._handoff(raw)
                return
            if plan.app is None or not edge.routes.known(plan.app):
                self.reply(http.simple_response(404, f"no app is served at {http.header_safe(plan.host)}\n",
                                                close=not plan.keep), close=not plan.keep)
                self._idle()
                continue
            self.busy = True
            self.req = _FastRequest(self, head, plan)
            self.req.start()

    def _idle(self) -> None:
        self.since, self.head_seen = asyncio.get_running_loop().time(), 0.0

    def reply(self, data: bytes, close: bool = False) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]
            if close:
                self.close()

    def finish(self, keep: bool) -> None:
        """The answer is out: read the next request, or close."""
        self.req = None
        self.busy = False
        if self.closed:
            return
        if not keep or self.edge._stopping or (self.half_closed and not self.buf):
            self.close()
            return
        self._idle()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.buf:
            self._next()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        """The sweeper's verdict: idle too long, or a head too slow (408 if one was started)."""
        if self.buf:
            self.reply(http.simple_response(408, "request head not received in time\n"))
        self.close()

    def _handoff(self, raw: bytes) -> None:
        """Give the connection to the stream path, with the head just read and what follows it."""
        edge = self.edge
        loop = asyncio.get_running_loop()
        self.closed = True
        edge._fast.discard(self)
        transport = self.transport
        assert transport is not None
        reader = asyncio.StreamReader(limit=edge.config.max_header_bytes, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buf:
            reader.feed_data(bytes(self.buf))
            self.buf.clear()
        if self.half_closed:
            reader.feed_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        task = loop.create_task(edge._client(reader, writer, first=raw))
        edge._bg.add(task)
        task.add_done_callback(edge._bg.discard)
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)


class _FastRequest:
    """One bodiless request on the fast path: backend choice, retries, the answer's end."""

    # slots: one of these is made per request, and its fields are read on every callback
    __slots__ = ("edge", "client", "head", "plan", "app", "keep", "request_id", "tried", "fresh", "attempts",
                 "backend", "conn", "answered", "progress", "queue_deadline", "retry_deadline", "last_error",
                 "idempotent", "woke", "replay", "origin")

    def __init__(self, client: _FastClient, head: http.RequestHead, plan: Plan) -> None:
        edge = client.edge
        self.edge, self.client, self.head, self.plan = edge, client, head, plan
        self.app, self.keep, self.request_id = plan.app or "", plan.keep, plan.request_id
        self.tried: set[str] = _NONE  # a real set only once a machine failed (rare)
        self.fresh: set[str] = _NONE  # machines whose pooled connection was stale: dial anew
        self.attempts = 0
        self.backend: Backend | None = None
        self.conn: _FastBackend | None = None
        self.answered = False  # a byte reached the client
        self.progress = now = edge._loop.time()
        self.queue_deadline = now + edge.config.queue_timeout
        self.retry_deadline = now + edge.config.retry_window
        self.last_error = ""
        self.idempotent = head.method in IDEMPOTENT
        self.woke = False
        self.replay: dict[str, str] | None = None  # where a machine asked this request to go
        self.origin = ""

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.edge._bg.add(task)
        task.add_done_callback(self.edge._bg.discard)

    def start(self) -> None:
        """Send to the least-loaded routable machine (again, after a failure)."""
        edge, client = self.edge, self.client
        if client.closed:
            return
        self.attempts += 1
        backends = edge.routes.backends(self.app)
        if self.replay is not None:
            backends = _replay_targets(backends, self.replay, self.origin)
            if not backends:
                self.client.reply(_replay_unavailable(self.app, self.replay, self.request_id, not self.keep))
                self.client.finish(self.keep)
                return
        elif not backends and not self.woke and edge._wants_wake(self.app):
            self.woke = True  # auto_start_machines: start a stopped machine, hold the request meanwhile
            self._spawn(self._wake())
            return
        now = asyncio.get_running_loop().time()
        more = self.attempts <= _MAX_ATTEMPTS
        backend = edge.balancer.choose(backends, self.tried, now) if more else None
        if backend is None:
            if backends and more and now < self.queue_deadline \
                    and edge.balancer.full([b for b in backends if b.machine not in self.tried]):
                self.attempts -= 1  # waiting for a slot is no attempt
                self._spawn(self._queue())  # every machine at its hard_limit: wait for a slot
                return
            if backends and more and self.tried and now < self.retry_deadline:
                self._spawn(self._again())  # every machine failed: as the stream path, try again
                return
            self._give_up()
            return
        edge.balancer.acquire(backend)
        self.backend = backend
        if backend.soft_limit is not None:
            edge._wake_more(self.app, backends)
        if backend.machine not in self.fresh:
            pooled = edge._fpool.get(backend.machine)
            while pooled:
                conn = pooled.pop()
                edge._count_idle(backend.machine)
                if conn.usable():
                    conn.begin(self, reused=True)
                    return
                conn.close()
        self._spawn(self._connect(backend))

    async def _wake(self) -> None:
        self.attempts -= 1  # waiting for a machine to start is no attempt
        await self.edge.wake(self.app)
        self.start()

    def replay_to(self, target: dict[str, str]) -> None:
        """The machine answered with taxiway-replay: send the request where it says (once)."""
        backend = self.backend
        self._release()
        self.conn = None
        assert backend is not None
        self.replay, self.origin = target, backend.machine
        self.plan.out = replay_head(self.plan.out, backend.machine, backend.region, target.get("state"))
        self.plan.replayed = True
        self.tried = set()
        self.edge.log(msg="replay", app=self.app, machine=backend.machine, to=target, request_id=self.request_id)
        self.start()

    async def _again(self) -> None:
        await asyncio.sleep(_backoff(self.attempts))
        self.tried = set()
        self.start()

    async def _queue(self) -> None:
        await self.edge._wait_change(self.queue_deadline - asyncio.get_running_loop().time())
        self.start()

    async def _connect(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.edge.config.connect_timeout):
                _, conn = await loop.create_connection(lambda: _FastBackend(self.edge, backend),
                                                       backend.host, backend.port)
        except (OSError, TimeoutError) as e:
            self.backend_failed(f"connect to machine {backend.machine} failed: {type(e).__name__}", mark=True)
            return
        if self.client.closed or self.backend is not backend:
            conn.close()
            self._release()
            return
        conn.begin(self, reused=False)

    def _release(self) -> None:
        if self.backend is not None:
            self.edge._released(self.backend)
            self.backend = None

    def backend_failed(self, reason: str, mark: bool) -> None:
        """The machine failed before a byte reached the client: try another one."""
        backend = self.backend
        self._release()
        self.conn = None
        if backend is not None:
            if mark:
                self.edge.balancer.mark_failed(backend, asyncio.get_running_loop().time())
                self.tried = self.tried | {backend.machine}
            else:
                self.fresh = self.fresh | {backend.machine}
            self.edge.log(msg="backend failed", app=self.app, machine=backend.machine, error=reason,
                          request_id=self.request_id, retry=True)
        self.last_error = f"machine {backend.machine if backend else '?'}: {reason}"
        self.start()

    def _give_up(self) -> None:
        self.client.reply(self.edge._no_answer(self.app, self.tried, self.last_error, self.request_id,
                                               close=not self.keep))
        self.client.finish(self.keep)

    def error(self, status: int, message: str) -> None:
        """The machine failed this request and it cannot be retried: say so and close."""
        self._release()
        self.conn = None
        self.client.reply(http.simple_response(status, message, [("taxiway-request-id", self.request_id)]))
        self.client.finish(False)

    def complete(self, keep_client: bool) -> None:
        self._release()
        self.conn = None
        self.client.finish(keep_client)

    def broken(self) -> None:
        """The answer broke off after it started: the client connection must end too."""
        self._release()
        self.conn = None
        self.client.finish(False)

    def client_gone(self) -> None:
        if self.conn is not None:
            self.conn.abandon()
            self.conn = None
        self._release()

    def timed_out(self) -> None:
        if self.conn is not None:
            self.conn.abandon()
        if self.answered:
            self.broken()
        else:
            self.error(504, "the app's machine timed out\n")


class _FastBackend(asyncio.Protocol):
    """A connection to one machine on the fast path; pooled between requests."""

    __slots__ = ("edge", "backend", "transport", "req", "state", "buf", "reused", "got_any", "closed", "paused",
                 "kind", "left", "scanner", "keep_conn", "keep_client")

    def __init__(self, edge: Edge, backend: Backend) -> None:
        self.edge, self.backend = edge, backend
        self.transport: asyncio.Transport | None = None
        self.req: _FastRequest | None = None
        self.state = _IDLE
        self.buf = bytearray()
        self.reused = False
        self.got_any = False
        self.closed = False
        self.paused = False
        self.kind, self.left = "none", 0
        self.scanner: http.ChunkedScanner | None = None
        self.keep_conn = self.keep_client = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - uvloop's are not asyncio.Transport
        self.edge.balancer.opened(self.backend.machine)

    def usable(self) -> bool:
        return not self.closed and self.state == _IDLE and not self.transport.is_closing()  # type: ignore[union-attr]

    def begin(self, req: _FastRequest, reused: bool) -> None:
        self.req, req.conn = req, self
        self.reused, self.got_any, self.state = reused, False, _HEAD
        self.buf.clear()
        self.transport.write(req.plan.out)  # type: ignore[union-attr]
        if req.client.writing_paused:
            self.pause()

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None:  # bytes nobody asked for, from an idle pooled connection: a broken machine
            self.close()
            return
        req.progress = asyncio.get_running_loop().time()
        self.got_any = True
        if self.state == _HEAD:
            self.buf += data
            while True:
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self.buf) > self.edge.config.max_header_bytes:
                        self._bad("response head too large")
                    return
                raw = bytes(self.buf[: i + 4])
                del self.buf[: i + 4]
                try:
                    status, head_bytes, framing, self.keep_conn, self.keep_client, replay = forward_response_head(
                        raw, req.head.method, req.keep, req.request_id)
                    if replay is not None and status >= 200:
                        if req.plan.replayed:
                            raise http.ProtocolError("asked to replay a request that was replayed already", 502)
                        target = parse_replay(replay)
                        self.req = None  # its response is not wanted: neither is this connection
                        self.close()
                        req.replay_to(target)
                        return
                except http.ProtocolError as e:
                    self._bad(str(e))
                    return
                if 100 <= status < 200:
                    if status == 101:
                        self._bad("101 Switching Protocols to a request without Upgrade")
                        return
                    if req.head.version == b"HTTP/1.1":
                        req.client.reply(raw)
                        req.answered = True
                    continue
                break
            self.kind, self.left = framing
            self.scanner = http.ChunkedScanner() if self.kind == "chunked" else None
            self.state = _BODY
            req.answered = True
            data = bytes(self.buf)
            self.buf.clear()
            if self.kind == "length" and len(data) >= self.left:  # the whole body is here: one write
                req.client.reply(head_bytes + data[: self.left])
                if len(data) > self.left:
                    self.keep_conn = False  # bytes past the response: not a connection to reuse
                self._done()
                return
            req.client.reply(head_bytes)
            if self.kind == "none":
                if data:
                    self.keep_conn = False
                self._done()
                return
            if not data:
                return
        self._body(data)

    def _body(self, data: bytes) -> None:
        req = self.req
        assert req is not None
        if self.kind == "length":
            if len(data) >= self.left:
                req.client.reply(data[: self.left])
                if len(data) > self.left:
                    self.keep_conn = False
                self.left = 0
                self._done()
            else:
                req.client.reply(data)
                self.left -= len(data)
        elif self.kind == "chunked":
            assert self.scanner is not None
            try:
                used = self.scanner.feed(data)
            except http.ProtocolError:
                self._bad("malformed chunked body")
                return
            out = self.scanner.take()
            if out:
                req.client.reply(out)
            if self.scanner.done:
                if used < len(data):
                    self.keep_conn = False
                self._done()
        else:  # read until the machine closes
            req.client.reply(data)

    def _done(self) -> None:
        req = self.req
        assert req is not None
        self.req, self.state = None, _IDLE
        self.resume()
        if self.keep_conn and not self.closed and self.edge.routes.routable(self.backend.machine):
            pool = self.edge._fpool.setdefault(self.backend.machine, [])
            if len(pool) < self.edge.config.max_idle_per_backend:
                pool.append(self)
                self.edge._count_idle(self.backend.machine)
            else:
                self.close()
        else:
            self.close()
        req.complete(self.keep_client)

    def _bad(self, reason: str) -> None:
        req = self.req
        self.req = None
        self.close()
        if req is None:
            return
        if req.answered:
            req.broken()
        else:
            req.error(502, f"the app's machine failed (bad response: {http.header_safe(reason)})\n")

    def abandon(self) -> None:
        """The request ended elsewhere (client gone, timeout): this connection is no use."""
        self.req = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.edge.balancer.closed(self.backend.machine)
        pool = self.edge._fpool.get(self.backend.machine)
        if pool and self in pool:
            pool.remove(self)
            self.edge._count_idle(self.backend.machine)
        req = self.req
        self.req = None
        if req is None:
            return
        if self.state == _HEAD and not req.answered:
            if req.idempotent or (self.reused and not self.got_any):
                req.backend_failed("closed before answering", mark=not self.reused)
            else:
                req.error(502, "the app's machine failed (closed before answering)\n")
        elif self.state == _BODY and self.kind == "close":
            self.keep_client = False
            req.complete(False)
        else:
            req.broken()


async def _response_head(src: asyncio.StreamReader, body: asyncio.Task | None) -> bytes:
    """The backend's response head, unless sending the request body fails first.

    A malformed or oversized body from the client ends the exchange at once (400 or
    413), rather than leaving the backend waiting for a body that never completes.
    """
    if body is None:
        return await src.readuntil(b"\r\n\r\n")
    read = asyncio.ensure_future(src.readuntil(b"\r\n\r\n"))
    try:
        while not read.done():
            await asyncio.wait({read, body} if not body.done() else {read}, return_when=asyncio.FIRST_COMPLETED)
            if body.done() and not body.cancelled() and isinstance(body.exception(), (_BadBody, _ClientGone)):
                raise body.exception()  # type: ignore[misc]
        return read.result()
    finally:
        if not read.done():
            read.cancel()


async def _copy_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, framing: tuple[str, int],
                     progress: Callable[[], None], limit: int, client_side: bool = False) -> None:
    """Copy one message body as framed (a chunked one re-framed canonically), calling
    ``progress`` as bytes move. ``client_side``: ``src`` is the client, so its failures
    are the client's (400 / 413 / gone), and ``limit`` bounds the body."""
    kind, length = framing

    async def read(n: int) -> bytes:
        try:
            data = await src.read(n)
        except ConnectionError:
            data = b""
        if not data and client_side:
            raise _ClientGone()
        if not data and kind != "close":
            raise asyncio.IncompleteReadError(b"", None)
        return data

    async def write(data: bytes) -> None:
        try:
            dst.write(data)
            await dst.drain()
        except (ConnectionError, RuntimeError):
            if not client_side:
                raise _ClientGone() from None
            raise ConnectionResetError("the backend closed while receiving the body") from None
        progress()

    if kind == "none":
        return
    if kind == "length":
        left = length
        while left > 0:
            data = await read(min(left, READ_SIZE))
            left -= len(data)
            await write(data)
        return
    if kind == "chunked":
        scanner = http.ChunkedScanner()
        total = 0
        while not scanner.done:
            data = await read(READ_SIZE)
            try:
                used = scanner.feed(data)
            except http.ProtocolError as e:
                if client_side:
                    raise _BadBody(str(e)) from None
                raise
            if used < len(data):
                # Bytes past the body belong to the next message: give them back.
                src._buffer[:0] = data[used:]  # noqa: SLF001
            total += used
            if client_side and limit and total > limit:
                raise _BadBody(f"request body over {limit} bytes", 413)
            out = scanner.take()
            if out:
                await write(out)
        return
    while True:  # read until the backend closes
        data = await read(READ_SIZE)
        if not data:
            return
        await write(data)


class _Side(asyncio.Protocol):
    """One end of a relayed connection: bytes it receives go to the other end's transport."""

    def __init__(self, tunnel: _WsTunnel, down: bool) -> None:
        self.t, self.down = tunnel, down
        self.transport: Any = None
        self.peer: _Side | None = None
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.t.relay(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.t.on_eof(self)
        return True  # keep our writing side open until the other end finishes

    def connection_lost(self, exc: Exception | None) -> None:
        self.t.finish()

    def pause_writing(self) -> None:  # our peer sends faster than we can pass on: stop reading it
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class _WsTunnel:
    """An upgraded connection (WebSocket...) relayed both ways until either side closes, by
    protocol callbacks on both transports (no task or stream per message: a small WebSocket
    message costs a callback and a write each way).

    The edge can end it as a drain wants (:meth:`going_away`): for a WebSocket, a close
    frame 1001 to the client, put between two of the machine's frames (never inside one,
    :class:`edgehttp.WsFrames` tracks them), then the connection ends once the client
    answers with its own close frame (or after ws_close_timeout).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                 ws: bool, close_timeout: float) -> None:
        self.reader, self.writer, self.conn, self.ws = reader, writer, conn, ws
        self.close_timeout = close_timeout
        self.down_frames, self.up_frames = WsFrames(), WsFrames()
        self.closing = False
        self.sent_close = False
        self.started = False
        self.done: asyncio.Future | None = None
        self.client = _Side(self, down=False)   # the client's transport: what it sends goes up
        self.machine = _Side(self, down=True)   # the machine's: what it sends goes down

    async def run(self, body: asyncio.Task | None) -> None:
        if body is not None:
            await body
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        client_t, machine_t = self.writer.transport, self.conn.writer.transport
        self.client.transport, self.machine.transport = client_t, machine_t
        self.client.peer, self.machine.peer = self.machine, self.client
        up_early = bytes(self.reader._buffer)  # noqa: SLF001 - sent right after the upgrade request
        down_early = bytes(self.conn.reader._buffer)  # noqa: SLF001 - sent right after the 101
        client_t.set_protocol(self.client)
        machine_t.set_protocol(self.machine)
        self.started = True
        if up_early:
            self.relay(self.client, up_early)
        if down_early:
            self.relay(self.machine, down_early)
        if self.reader.at_eof():
            self.on_eof(self.client)
        if self.conn.reader.at_eof():
            self.on_eof(self.machine)
        if self.closing:  # a drain came while the request body was still going up
            self.closing = False
            self.going_away()
        try:
            await self.done
        finally:
            self.conn.close()
            self.writer.close()

    def relay(self, side: _Side, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        if side.down:  # machine -> client
            if self.sent_close:
                return  # after our close frame the machine has nothing more to say to the client
            if self.closing and self.ws:
                n = self.down_frames.boundary_in(data)
                if n is not None:  # the machine's frame in progress ends here: ours goes next
                    self.client.transport.write(data[:n])
                    self._send_close()
                    return
            if self.ws:
                self.down_frames.feed(data)
            self.client.transport.write(data)
        else:  # client -> machine
            if self.ws and WS_CLOSE_OPCODE in self.up_frames.feed(data) and self.sent_close:
                self.finish()  # the client answered our close frame: the end
                return
            self.machine.transport.write(data)

    def on_eof(self, side: _Side) -> None:
        peer = side.peer
        if peer is not None and not peer.transport.is_closing():
            with contextlib.suppress(Exception):
                if peer.transport.can_write_eof():
                    peer.transport.write_eof()
        if self.client.eof and self.machine.eof or (self.sent_close and not side.down):
            self.finish()

    def finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _send_close(self) -> None:
        if not self.sent_close:
            self.sent_close = True
            with contextlib.suppress(Exception):
                self.client.transport.write(ws_close_frame())
            loop = asyncio.get_running_loop()
            loop.call_later(self.close_timeout, self.finish)  # a client that never answers

    def going_away(self) -> None:
        """End it for a drain (see the class); idempotent."""
        if self.closing:
            return
        self.closing = True
        if not self.started:
            return  # run() acts on it once the relay is set up
        if not self.ws:
            self.finish()
        elif self.down_frames.at_boundary:
            self._send_close()  # nothing of a frame is half sent: close now


WS_CLOSE_OPCODE = 0x8


class _TcpTunnel:
    """A TCP service's spliced connection, as a drain sees it: ended last, without a word."""

    def __init__(self, tunnel: splice.SpliceTunnel) -> None:
        self.tunnel = tunnel

    def going_away(self) -> None:
        self.tunnel.close()


class _TcpListener:
    """The edge's listening socket of one plain TCP service port; ``spec`` = (app, internal_port, proxy_proto)."""

    def __init__(self, edge: Edge, port: int, spec: tuple[str, int, bool], sock: socket.socket) -> None:
        self.edge, self.port, self.spec, self.sock = edge, port, spec, sock
        self.task: asyncio.Task | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, peer = await loop.sock_accept(self.sock)
            except OSError:
                if self.sock.fileno() < 0:
                    return  # closed
                await asyncio.sleep(0.1)  # EMFILE and the like: never a busy loop
                continue
            if self.edge._at_capacity():
                client.close()
                continue
            client.setblocking(False)
            self.edge._spawn(self.edge._tcp_client(self, client, peer))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.sock.close()


async def _drain(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except (ConnectionError, RuntimeError):
        raise _ClientGone() from None


async def _close(writer: asyncio.StreamWriter) -> None:
    if writer.transport.is_closing():
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), 5)
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


def worker_subject(primary: str, worker: int) -> str:
    """The subject prefix a worker of edge ``primary`` answers on (``inflight``, ``drain``)."""
    return f"edge.{primary}.w{worker}."


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and their values (``--f v`` and ``--f=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            out.append(arg)
    return out


def _die_with_parent() -> None:
    """In a worker, before exec: SIGTERM when the primary dies, even by kill -9 (PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _log_nats_into(edge: Edge) -> None:
    """nats-py reports reconnects and failed connects through ``logging`` (tracebacks on
    stderr by default): make them one line each of the edge's own log."""
    import logging

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            exc = record.exc_info[1] if record.exc_info else None
            edge.log(msg="nats", level=record.levelname.lower(), text=record.getMessage(),
                     error=f"{type(exc).__name__}: {exc}" if exc else None)

    logger = logging.getLogger("nats")
    logger.handlers[:] = [Handler()]
    logger.propagate = False


# -- the deployer's side -----------------------------------------------------------------------

async def drain(state: State, machines: list[str], timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the edge routes none of ``machines`` and none has a request in flight.

    Cordon the machines (MACHINES ``cordoned: true``) or set them to stop first; then
    call this, then stop them. Returns the edge's answer ``{"drained": bool,
    "inflight": {machine: n}, "routed": [...]}``; with no edge running nothing routes
    to any machine, so that is ``{"drained": true, "edge": None}``.
    """
    from taxiway.platform.state import Unavailable

    try:
        return await state.request(DRAIN_SUBJECT, {"machines": machines, "timeout": timeout},
                                   timeout=timeout + 5)
    except Unavailable as e:
        if "nobody serves" in e.message:
            return {"ok": True, "drained": True, "edge": None, "inflight": {}, "routed": []}
        raise


# -- command line ---------------------------------------------------------------------------------

def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    if not num.isdigit():
        raise InvalidInput(f"invalid size {text!r}", "use bytes or a size like 64k, 100m, 1g (0: no limit)")
    return int(num) * mult


def config_from_args(argv: list[str] | None = None) -> EdgeConfig:
    p = argparse.ArgumentParser(prog="python -m taxiway.platform.edge",
                                description="The platform's HTTP edge: <app>.<domain> to the app's healthy machines.")
    p.add_argument("--nats", required=True, help="NATS URL of the platform (nats://127.0.0.1:PORT)")
    p.add_argument("--listen", default=f"{DEFAULT_HOST}:8180",
                   help="HOST:PORT, [IPV6]:PORT or :PORT (loopback) to serve HTTP on (default %(default)s)")
    p.add_argument("--domain", default="localhost", help="apps are served at <app>.<domain> (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a whole request head")
    p.add_argument("--idle-timeout", type=float, default=75.0, help="seconds a keep-alive client may idle")
    p.add_argument("--read-timeout", type=float, default=120.0, help="seconds an exchange may make no progress")
    p.add_argument("--max-body", default="1g", help="largest request body (default %(default)s; 0: no limit)")
    p.add_argument("--max-connections", type=int, default=10_000, help="clients served at once")
    p.add_argument("--workers", type=int, default=1,
                   help="processes serving the port (SO_REUSEPORT), e.g. one per core (default %(default)s)")
    p.add_argument("--autostop-after", type=float, default=300.0,
                   help="seconds without a request before an auto_stop_machines machine is stopped")
    p.add_argument("--wake-timeout", type=float, default=60.0,
                   help="seconds a request waits for a stopped machine to start (auto_start_machines)")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--primary", default="", help=argparse.SUPPRESS)
    # E1: the TLS side (platform.edgetls)
    p.add_argument("--https", help="HOST:PORT or :PORT to serve HTTPS (and HTTP/2) on; off when not given")
    p.add_argument("--ca", help="taxiway CA directory for app certificates (default: the CA's default place)")
    p.add_argument("--tls-dir", help="where issued certificates are kept (0600 files)")
    a = p.parse_args(argv)
    domain = a.domain.strip(".").lower()
    if not domain or any(not schema.valid_app_name(label) and not label.isdigit() for label in domain.split(".")):
        raise InvalidInput(f"invalid --domain {a.domain!r}", "use a DNS name such as localhost or apps.example.org")
    for name in ("header_timeout", "idle_timeout", "read_timeout"):
        if getattr(a, name) <= 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be more than 0", "give a number of seconds")
    if a.max_connections <= 0:
        raise InvalidInput("--max-connections must be more than 0", "e.g. 10000")
    if not 1 <= a.workers <= 64:
        raise InvalidInput("--workers must be 1 to 64", "e.g. the number of cores")
    for name in ("autostop_after", "wake_timeout"):
        if getattr(a, name) <= 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be more than 0", "give a number of seconds")
    return EdgeConfig(nats=a.nats, listen=parse_listen(a.listen), domain=domain, header_timeout=a.header_timeout,
                      idle_timeout=a.idle_timeout, read_timeout=a.read_timeout, max_body_bytes=_size(a.max_body),
                      max_connections=a.max_connections, workers=a.workers, worker=a.worker, primary=a.primary,
                      autostop_after=a.autostop_after, wake_timeout=a.wake_timeout,
                      argv=list(argv) if argv is not None else sys.argv[1:],
                      https=parse_listen(a.https) if a.https else None, ca=a.ca, tls_dir=a.tls_dir)


def _run(main: Callable[[], Awaitable[None]]) -> None:
    try:
        import uvloop  # libuv's loop: fewer system calls per request than asyncio's selector loop
    except ImportError:
        asyncio.run(main())  # type: ignore[arg-type]
    else:
        uvloop.run(main())  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        _run(Edge(config).serve_forever)
    except TaxiwayError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
