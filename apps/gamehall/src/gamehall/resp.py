"""A small pipelined Redis link for the hot path of a clustered move.

redis-py costs a connection checkout (a lock and a timeout), a write syscall and a
parse per command, which made Redis the largest cost of a clustered move. This
link keeps one connection, queues every command issued in the same event-loop
turn and writes them in one syscall (automatic pipelining), and parses replies
with hiredis straight from ``data_received``. A :class:`Subscriber` does the same
for pub/sub: one connection, messages handed to a callback as they are parsed.

Only what gamehall needs: RESP2 over TCP or TLS (``rediss://``, with a client
certificate for Redis's ``tls-auth-clients``), AUTH and SELECT from the URL, and
reconnecting after a lost connection (pending commands fail with
``ConnectionError``; a subscriber subscribes to its channels again).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlunparse

import hiredis

log = logging.getLogger("gamehall")


# redis-py's URL parameters for TLS files; read here, so both clients use the same files.
TLS_PARAMS = {"ssl_ca_certs": "ca", "ssl_certfile": "cert", "ssl_keyfile": "key"}


@dataclass(frozen=True)
class TLSFiles:
    """What a ``rediss://`` connection trusts and presents: the CA that signed Redis's
    certificate (None: the system's trust store), and a client certificate and key for
    a Redis that requires them (``tls-auth-clients yes``)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context: verifies Redis's certificate (and its name), presents ours."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = check_hostname
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def redis_py(self) -> dict[str, Any]:
        """The same settings as redis-py's connection arguments."""
        return {
            "ssl_ca_certs": self.ca,
            "ssl_certfile": self.cert,
            "ssl_keyfile": self.key,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }


def split_tls(url: str, tls: TLSFiles | None = None) -> tuple[str, TLSFiles | None]:
    """The URL without its TLS file parameters, and the TLS settings (None for ``redis://``).

    Files named in ``tls`` win over those in the URL (``?ssl_ca_certs=...``, as redis-py
    takes them)."""
    u = urlparse(url)
    query = parse_qsl(u.query, keep_blank_values=True)
    found = {TLS_PARAMS[k]: v for k, v in query if k in TLS_PARAMS and v}
    rest = [(k, v) for k, v in query if k not in TLS_PARAMS]
    clean = urlunparse(u._replace(query=urlencode(rest)))
    if u.scheme != "rediss":
        return clean, None
    given = tls or TLSFiles()
    return clean, TLSFiles(
        given.ca or found.get("ca"), given.cert or found.get("cert"), given.key or found.get("key")
    )


def parse_url(url: str) -> dict[str, Any] | None:
    """host, port, db, username, password, tls of a ``redis://`` or ``rediss://`` URL;
    None if not TCP."""
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss"):
        return None
    db = 0
    path = (u.path or "/").strip("/")
    if path:
        db = int(path)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 6379,
        "db": db,
        "username": unquote(u.username) if u.username else None,
        "password": unquote(u.password) if u.password else None,
        "tls": u.scheme == "rediss",
    }


def _arg(a: Any) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, (int, float)):
        return repr(a).encode()
    raise TypeError(f"cannot send {type(a).__name__} to Redis")


def pack(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


def _hello(cfg: dict[str, Any]) -> list[tuple[Any, ...]]:
    cmds: list[tuple[Any, ...]] = []
    if cfg["password"]:
        if cfg["username"]:
            cmds.append(("AUTH", cfg["username"], cfg["password"]))
        else:
            cmds.append(("AUTH", cfg["password"]))
    if cfg["db"]:
        cmds.append(("SELECT", cfg["db"]))
    return cmds


class _Protocol(asyncio.Protocol):
    def __init__(self, on_reply: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.on_reply = on_reply
        self.on_lost = on_lost

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            self.on_reply(reply)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.on_lost()


async def _open(cfg: dict[str, Any], ssl_ctx: ssl.SSLContext | None, factory) -> _Protocol:
    """A connection to Redis, over TLS when the URL is ``rediss://``."""
    loop = asyncio.get_running_loop()
    if not cfg["tls"]:
        _, proto = await loop.create_connection(factory, cfg["host"], cfg["port"])
    else:
        _, proto = await loop.create_connection(
            factory, cfg["host"], cfg["port"], ssl=ssl_ctx, server_hostname=cfg["host"]
        )
    return proto


class Link:
    """Commands with automatic pipelining: ``await link.call("PUBLISH", ch, data)``."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext | None = None) -> None:
        cfg = parse_url(url)
        if cfg is None:
            raise ValueError(f"not a redis:// URL: {url}")
        self.cfg = cfg
        self.ssl_ctx = ssl_ctx or (TLSFiles().context() if cfg["tls"] else None)
        self.proto: _Protocol | None = None
        self.pending: collections.deque[asyncio.Future | None] = collections.deque()
        self.buf: list[bytes] = []
        self.flush_scheduled = False
        self.lock = asyncio.Lock()
        self.closed = False

    async def _connect(self) -> _Protocol:
        async with self.lock:
            if self.proto is not None and self.proto.transport is not None:
                return self.proto
            if self.closed:
                raise ConnectionError("link closed")
            proto = await _open(
                self.cfg, self.ssl_ctx, lambda: _Protocol(self._on_reply, self._on_lost)
            )
            self.pending.clear()
            self.buf.clear()
            self.proto = proto
            hello = [self._queue(cmd) for cmd in _hello(self.cfg)]
            for fut in hello:
                await fut  # a bad password or db fails here, loudly
            return proto

    def _on_reply(self, reply: Any) -> None:
        fut = self.pending.popleft() if self.pending else None
        if fut is None or fut.done():
            return
        if isinstance(reply, hiredis.ReplyError):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)

    def _on_lost(self) -> None:
        pending, self.pending = self.pending, collections.deque()
        self.buf.clear()
        for fut in pending:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("lost the connection to Redis"))

    def _queue(self, args: tuple[Any, ...]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.buf.append(pack(args))
        self.pending.append(fut)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.buf:
            return
        data, self.buf = b"".join(self.buf), []
        proto = self.proto
        if proto is None or proto.transport is None:
            self._on_lost()
            return
        proto.transport.write(data)

    async def call(self, *args: Any) -> Any:
        proto = self.proto
        if proto is None or proto.transport is None:
            await self._connect()
        return await self._queue(args)

    async def close(self) -> None:
        self.closed = True
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()


class Subscriber:
    """Pub/sub on one connection: ``on_message(channel, data)`` for every message."""

    def __init__(
        self,
        url: str,
        on_message: Callable[[bytes, bytes], None],
        ssl_ctx: ssl.SSLContext | None = None,
    ) -> None:
        cfg = parse_url(url)
        if cfg is None:
            raise ValueError(f"not a redis:// URL: {url}")
        self.cfg = cfg
        self.ssl_ctx = ssl_ctx or (TLSFiles().context() if cfg["tls"] else None)
        self.on_message = on_message
        self.channels: set[str] = set()  # what we want to listen to
        self.confirmed: set[bytes] = set()  # what Redis confirmed on this connection
        self.proto: _Protocol | None = None
        self.acks: collections.deque[asyncio.Future | None] = collections.deque()
        self.hello = 0  # replies to AUTH/SELECT still expected
        self.closed = False
        self.lock = asyncio.Lock()
        self._keeper: asyncio.Task | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self._connect()
        self._keeper = asyncio.create_task(self._keep(), name="gamehall-redis-subscriber")

    async def _connect(self) -> None:
        async with self.lock:
            proto = await _open(
                self.cfg, self.ssl_ctx, lambda: _Protocol(self._on_reply, self._on_lost)
            )
            self.acks.clear()
            self.confirmed.clear()
            hello = _hello(self.cfg)
            self.hello = len(hello)
            data = [pack(c) for c in hello]
            channels = sorted(self.channels)
            if channels:  # after a reconnect: listen again to everything we listened to
                data.append(pack(("SUBSCRIBE", *(f"gh:{c}" for c in channels))))
                self.acks.extend([None] * len(channels))
            if data:
                proto.transport.write(b"".join(data))
            self.proto = proto
            self.connected.set()

    async def _keep(self) -> None:
        """Reconnect after a lost connection."""
        while not self.closed:
            await self.connected.wait()
            while self.proto is not None and self.proto.transport is not None:
                await asyncio.sleep(0.2)
            if self.closed:
                return
            self.connected.clear()
            log.warning("lost the redis pub/sub connection; reconnecting")
            while not self.closed:
                try:
                    await self._connect()
                    break
                except OSError:
                    await asyncio.sleep(0.5)

    def _on_reply(self, reply: Any) -> None:
        if self.hello:
            self.hello -= 1
            if isinstance(reply, hiredis.ReplyError):
                log.error("redis pub/sub connection: %s", reply)
            return
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                try:
                    self.on_message(reply[1], reply[2])
                except Exception:
                    log.exception("bad message on %s", reply[1])
                return
            if kind in (b"subscribe", b"unsubscribe"):
                if kind == b"subscribe":
                    self.confirmed.add(reply[1])
                else:
                    self.confirmed.discard(reply[1])
                fut = self.acks.popleft() if self.acks else None
                if fut is not None and not fut.done():
                    fut.set_result(True)
                return
        if isinstance(reply, hiredis.ReplyError):
            fut = self.acks.popleft() if self.acks else None
            if fut is not None and not fut.done():
                fut.set_exception(reply)
            log.error("redis pub/sub: %s", reply)

    def _on_lost(self) -> None:
        self.confirmed.clear()
        acks, self.acks = self.acks, collections.deque()
        for fut in acks:
            if fut is not None and not fut.done():
                # the channel set is kept: the reconnect subscribes to it again
                fut.set_result(False)

    async def _command(self, verb: str, key: str) -> None:
        proto = self.proto
        if proto is None or proto.transport is None:
            return  # the reconnect sends the whole channel set
        fut = asyncio.get_running_loop().create_future()
        self.acks.append(fut)
        proto.transport.write(pack((verb, f"gh:{key}")))
        await fut

    def live(self, key: str) -> bool:
        """Does Redis send us ``gh:KEY`` now (subscribed, confirmed, connection up)?"""
        return f"gh:{key}".encode() in self.confirmed and key in self.channels

    async def subscribe(self, key: str) -> None:
        """Listen to ``gh:KEY``; returns once Redis confirmed it."""
        if key in self.channels:
            return
        self.channels.add(key)
        await self._command("SUBSCRIBE", key)

    async def unsubscribe(self, key: str) -> None:
        if key not in self.channels:
            return
        self.channels.discard(key)
        await self._command("UNSUBSCRIBE", key)

    async def close(self) -> None:
        self.closed = True
        if self._keeper:
            self._keeper.cancel()
            try:
                await self._keeper
            except (asyncio.CancelledError, Exception):
                pass
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
