"""Where rooms are stored, who owns which game, and how nodes talk.

Two implementations of one small interface:

* :class:`MemoryBackend`: a single node with no Redis; everything in process.
* :class:`RedisBackend`: a cluster. ``gh:owner:CODE`` names the node that owns a
  game (SET NX with a TTL the owner renews), ``gh:room:CODE`` holds the last
  snapshot, the stream ``gh:log:CODE`` the moves, channel ``gh:game:CODE`` carries
  every snapshot to the other nodes that show the game (the owner does not listen to
  its own games), ``gh:node:NODE`` carries commands and replies to one node, and the
  sorted set ``gh:games`` lists every game by its last activity (the hall's lobby).

A save is one Lua script that checks ownership, stores the snapshot, appends the
move and publishes, so a node that lost its game can never write to it again. The
same script publishes the answer to a command forwarded by another node, after the
snapshot, so a clustered move costs one round trip on the owner.

With a ``redis://`` URL the hot path (saves, messages to nodes, pub/sub) goes through
:mod:`gamehall.resp`: one pipelined connection and one pub/sub connection, parsed by
hiredis, instead of a redis-py pool checkout per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from . import resp

log = logging.getLogger("gamehall")

# on_message(kind, key, payload): kind "game" (key: code) or "node" (key: this node).
OnMessage = Callable[[str, str, dict[str, Any]], Awaitable[None] | None]


class Backend(Protocol):
    """What a :class:`~gamehall.hall.Hall` needs from its storage and messaging."""

    node_id: str
    clustered: bool
    owner_ttl: int

    async def start(self, on_message: OnMessage) -> None: ...
    async def close(self) -> None: ...
    async def reserve(self, code: str, snapshot: dict[str, Any]) -> bool:
        """Store a new game under a code nobody uses yet, owned by this node."""

    async def claim(self, code: str) -> bool:
        """Become the owner of a stored game that has no owner."""

    async def steal(self, code: str, dead_node: str) -> bool:
        """Become the owner of a game whose owner ``dead_node`` no longer listens."""

    async def owner(self, code: str) -> str | None: ...
    async def owners(self, codes: list[str]) -> list[str | None]: ...
    async def renew(self, codes: list[str]) -> list[str]:
        """Extend our ownership of these games; returns the ones we no longer own."""

    async def release(self, code: str) -> None: ...
    async def forget(self, code: str) -> None: ...
    async def save(
        self,
        code: str,
        snapshot: dict[str, Any],
        move: Any = None,
        reply: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Store a change (and its moves) and publish it to the other nodes, if we still own
        the game; False if not. The saving node shows the change to its own pages itself.
        ``reply`` (node, message) is then sent to that node, after the change."""

    async def load(self, code: str) -> dict[str, Any] | None: ...
    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """Snapshots of the games changed most recently, newest first (for the lobby)."""

    async def move_log(self, code: str) -> list[Any]: ...
    async def subscribe(self, code: str) -> None: ...
    async def unsubscribe(self, code: str) -> None: ...
    def listening(self, code: str) -> bool:
        """Is this node's subscription to the game's changes confirmed (and still up)?"""

    async def send(self, node: str, message: dict[str, Any]) -> int: ...


class MemoryBackend:
    """One node, no Redis: rooms in a dict, pub/sub as direct calls."""

    clustered = False
    owner_ttl = 0

    def __init__(self, node_id: str = "local") -> None:
        self.node_id = node_id
        self.rooms: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[Any]] = {}
        self.on_message: OnMessage | None = None
        self.subscribed: set[str] = set()

    async def start(self, on_message: OnMessage) -> None:
        self.on_message = on_message

    async def close(self) -> None:
        pass

    async def reserve(self, code: str, snapshot: dict[str, Any]) -> bool:
        if code in self.rooms:
            return False
        self.rooms[code] = snapshot
        self.logs[code] = []
        return True

    async def claim(self, code: str) -> bool:
        return code in self.rooms

    async def steal(self, code: str, dead_node: str) -> bool:
        return False

    async def owner(self, code: str) -> str | None:
        return self.node_id if code in self.rooms else None

    async def owners(self, codes: list[str]) -> list[str | None]:
        return [self.node_id if c in self.rooms else None for c in codes]

    async def renew(self, codes: list[str]) -> list[str]:
        return []

    async def release(self, code: str) -> None:
        pass

    async def forget(self, code: str) -> None:
        self.rooms.pop(code, None)
        self.logs.pop(code, None)

    async def save(
        self,
        code: str,
        snapshot: dict[str, Any],
        move: Any = None,
        reply: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        self.rooms[code] = snapshot
        if move is not None:
            self.logs.setdefault(code, []).append(move)
        return True  # the hall shows the change to this node's pages itself

    async def load(self, code: str) -> dict[str, Any] | None:
        return self.rooms.get(code)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        rooms = sorted(self.rooms.values(), key=lambda r: r["last_active"], reverse=True)
        return rooms[:limit]

    async def move_log(self, code: str) -> list[Any]:
        return list(self.logs.get(code, []))

    async def subscribe(self, code: str) -> None:
        self.subscribed.add(code)

    async def unsubscribe(self, code: str) -> None:
        self.subscribed.discard(code)

    def listening(self, code: str) -> bool:
        return False

    async def send(self, node: str, message: dict[str, Any]) -> int:
        return 0


GAMES_KEY = "gh:games"  # sorted set: every game's code, scored by its last activity (the lobby)

SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'move', ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
redis.call('ZADD', KEYS[4], ARGV[9], ARGV[10])
redis.call('PUBLISH', ARGV[4], ARGV[2])
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return 1
"""

STEAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""

RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('EXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBackend:
    """A cluster of nodes sharing one Redis."""

    clustered = True

    def __init__(
        self,
        url: str,
        node_id: str,
        owner_ttl: int = 10,
        room_ttl: int = 86400,
        tls: resp.TLSFiles | None = None,
    ) -> None:
        """``url`` is ``redis://`` or ``rediss://`` (TLS); ``tls`` names the CA and the
        client certificate for TLS (else the URL's ``ssl_ca_certs``/``ssl_certfile``/
        ``ssl_keyfile`` parameters, else the system's trust store and no certificate)."""
        import redis.asyncio as aioredis

        url, tls = resp.split_tls(url, tls)
        self.url = url
        self.node_id = node_id
        self.owner_ttl = owner_ttl
        self.room_ttl = room_ttl
        # A blocking pool: under load, callers wait for a free connection instead of failing.
        extra = tls.redis_py() if tls else {}
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=10, **extra
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.on_message: OnMessage | None = None
        self._reader: asyncio.Task | None = None
        self._save = self.redis.register_script(SAVE)
        self._save_sha = hashlib.sha1(SAVE.encode()).hexdigest()
        # The hot path: one pipelined connection and one pub/sub connection of our own.
        fast = resp.parse_url(url) is not None
        ssl_ctx = tls.context() if tls else None  # one context (and one file read) for both
        self.link = resp.Link(url, ssl_ctx) if fast else None
        self.sub = resp.Subscriber(url, self._on_raw, ssl_ctx) if fast else None
        self._steal = self.redis.register_script(STEAL)
        self._release = self.redis.register_script(RELEASE)
        self._renew = self.redis.register_script(RENEW)

    async def start(self, on_message: OnMessage) -> None:
        self.on_message = on_message
        try:
            await self.redis.ping()
        except Exception as e:
            where = resp.parse_url(self.url) or {}
            log.error(
                "cannot use Redis at %s port %s: %s; check GAMEHALL_REDIS_URL and, for TLS, "
                "GAMEHALL_REDIS_CA/CERT/KEY",
                where.get("host"),
                where.get("port"),
                e,
            )
            raise
        if self.sub is not None:
            await self.sub.start()
            await self.sub.subscribe(f"node:{self.node_id}")
            return
        await self.pubsub.subscribe(f"gh:node:{self.node_id}")
        self._reader = asyncio.create_task(self._read(), name="gamehall-redis-reader")

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for fast in (self.sub, self.link):
            if fast is not None:
                with contextlib.suppress(Exception):
                    await fast.close()
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def _on_raw(self, channel: bytes, data: bytes) -> None:
        """A message from the fast subscriber (the hall's handler is synchronous)."""
        _, kind, key = channel.decode().split(":", 2)
        if self.on_message is not None:
            r = self.on_message(kind, key, orjson.loads(data))
            if r is not None:  # an async handler: run it as a task
                asyncio.ensure_future(r)

    async def _read(self) -> None:
        while True:
            try:
                msg = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a lost connection: redis-py reconnects and resubscribes
                log.exception("redis pub/sub read failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            channel = msg["channel"].decode()
            _, kind, key = channel.split(":", 2)
            try:
                payload = orjson.loads(msg["data"])
                r = self.on_message(kind, key, payload) if self.on_message else None
                if r is not None:
                    await r
            except Exception:
                log.exception("bad message on %s", channel)

    async def reserve(self, code: str, snapshot: dict[str, Any]) -> bool:
        ok = await self.redis.set(
            f"gh:room:{code}", orjson.dumps(snapshot), nx=True, ex=self.room_ttl
        )
        if ok:
            await self.redis.set(f"gh:owner:{code}", self.node_id, ex=self.owner_ttl)
            await self.redis.zadd(GAMES_KEY, {code: snapshot["last_active"]})
        return bool(ok)

    async def claim(self, code: str) -> bool:
        if not await self.redis.exists(f"gh:room:{code}"):
            return False
        return bool(
            await self.redis.set(f"gh:owner:{code}", self.node_id, nx=True, ex=self.owner_ttl)
        )

    async def steal(self, code: str, dead_node: str) -> bool:
        """Take a game from a node that no longer listens (compare-and-set on the owner key)."""
        return bool(
            await self._steal(
                keys=[f"gh:owner:{code}"], args=[dead_node, self.node_id, self.owner_ttl]
            )
        )

    async def owner(self, code: str) -> str | None:
        v = await self.redis.get(f"gh:owner:{code}")
        return v.decode() if v else None

    async def owners(self, codes: list[str]) -> list[str | None]:
        """The owner of each game (one MGET per 500 codes)."""
        out: list[str | None] = []
        for i in range(0, len(codes), 500):
            values = await self.redis.mget([f"gh:owner:{c}" for c in codes[i : i + 500]])
            out.extend(v.decode() if v else None for v in values)
        return out

    async def renew(self, codes: list[str]) -> list[str]:
        """Extend our ownership keys (only those still ours); the games we lost are returned."""
        lost: list[str] = []
        for i in range(0, len(codes), 500):
            chunk = codes[i : i + 500]
            gone = await self._renew(
                keys=[f"gh:owner:{c}" for c in chunk], args=[self.node_id, self.owner_ttl]
            )
            lost.extend(chunk[int(j) - 1] for j in gone)
        return lost

    async def release(self, code: str) -> None:
        await self._release(keys=[f"gh:owner:{code}"], args=[self.node_id])

    async def forget(self, code: str) -> None:
        await self.release(code)

    async def save(
        self,
        code: str,
        snapshot: dict[str, Any],
        move: Any = None,
        reply: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        keys = [f"gh:owner:{code}", f"gh:room:{code}", f"gh:log:{code}", GAMES_KEY]
        args = [
            self.node_id,
            orjson.dumps(snapshot),
            self.room_ttl,
            f"gh:game:{code}",
            orjson.dumps(move) if move is not None else b"",
            self.owner_ttl,
            f"gh:node:{reply[0]}" if reply else b"",
            orjson.dumps(reply[1]) if reply else b"",
            snapshot["last_active"],
            code,
        ]
        if self.link is None:
            return bool(await self._save(keys=keys, args=args))
        try:
            ok = await self.link.call("EVALSHA", self._save_sha, 4, *keys, *args)
        except Exception as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            ok = await self.link.call("EVAL", SAVE, 4, *keys, *args)
        return bool(ok)

    async def load(self, code: str) -> dict[str, Any] | None:
        raw = await self.redis.get(f"gh:room:{code}")
        return orjson.loads(raw) if raw else None

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest games of ``gh:games`` (scored by last activity); entries whose room
        expired are dropped from the index as they are found."""
        # A room expires room_ttl after its last save: older entries name no room any more.
        await self.redis.zremrangebyscore(GAMES_KEY, "-inf", time.time() - self.room_ttl)
        names = await self.redis.zrevrange(GAMES_KEY, 0, limit - 1)
        if not names:
            return []
        raws = await self.redis.mget([f"gh:room:{n.decode()}" for n in names])
        gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if gone:
            await self.redis.zrem(GAMES_KEY, *gone)
        return [orjson.loads(raw) for raw in raws if raw is not None]

    async def move_log(self, code: str) -> list[Any]:
        entries = await self.redis.xrange(f"gh:log:{code}")
        return [orjson.loads(fields[b"move"]) for _, fields in entries]

    async def subscribe(self, code: str) -> None:
        if self.sub is not None:
            await self.sub.subscribe(f"game:{code}")
        else:
            await self.pubsub.subscribe(f"gh:game:{code}")

    async def unsubscribe(self, code: str) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe(f"game:{code}")
        else:
            await self.pubsub.unsubscribe(f"gh:game:{code}")

    def listening(self, code: str) -> bool:
        return self.sub is not None and self.sub.live(f"game:{code}")

    async def send(self, node: str, message: dict[str, Any]) -> int:
        """Publish to one node; the count of receivers is 0 when that node is gone."""
        if self.link is not None:
            return int(await self.link.call("PUBLISH", f"gh:node:{node}", orjson.dumps(message)))
        return int(await self.redis.publish(f"gh:node:{node}", orjson.dumps(message)))
