"""The platform's state over NATS JetStream: KV buckets, streams, request/reply.

One small async API every platform module uses (API server, agent, deployer,
edge), so none of them speaks nats-py directly:

    st = await State.connect(url)
    value, rev = await st.get(schema.APPS, "myapp") or (None, 0)
    rev = await st.put(schema.APPS, "myapp", {...}, revision=rev)   # compare-and-set
    async for key, value, rev in st.watch(schema.STATUS, "myapp.*"): ...
    await st.publish(schema.events_subject(app, mid), {...})
    reply = await st.request(schema.agent_subject(host, "start"), {...})

Values are JSON objects. ``revision`` semantics of :meth:`State.put`:
``None`` writes unconditionally, ``0`` creates (fails if the key exists), ``n``
updates only if the key's last revision is still ``n``. A lost race raises
:class:`Conflict`, so callers re-read and retry.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from taxiway.errors import TaxiwayError
from taxiway.platform import schema

if TYPE_CHECKING:
    import nats.aio.client
    import nats.js


class Conflict(TaxiwayError):
    """A compare-and-set write lost: the key changed (or exists) since it was read."""

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"{bucket}/{key} was changed by someone else", "read it again and retry")
        self.bucket, self.key = bucket, key


class Unavailable(TaxiwayError):
    """NATS could not be reached, or did not answer in time."""


class NoReply(Unavailable):
    """A request reached a responder (e.g. an agent) that did not answer in time: unlike
    "nobody serves it", the request may still be acted on."""


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _load(data: bytes | None) -> Any:
    return json.loads(data) if data else None


NATS_URL_ENV = "TAXIWAY_NATS_URL"


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def credentialed_url(url: str | None) -> str:
    """``url``, or ``$TAXIWAY_NATS_URL`` when ``url`` is None or has no userinfo and the
    variable names the same server (so ``--nats nats://127.0.0.1:PORT`` plus the variable
    from the supervisor gives a component its credentials without putting them in argv)."""
    from urllib.parse import urlsplit

    env = os.environ.get(NATS_URL_ENV, "")
    if not url:
        if not env:
            raise Unavailable("no NATS URL given", f"pass --nats URL or set {NATS_URL_ENV}")
        return env
    if "@" in urlsplit(url).netloc or not env:
        return url
    a, b = urlsplit(url), urlsplit(env)
    if (a.hostname, a.port) == (b.hostname, b.port):
        return env
    return url


class State:
    """A connection to the platform's NATS: buckets (KV), streams and requests."""

    def __init__(self, nc: nats.aio.client.Client, js: nats.js.JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self._kv: dict[str, Any] = {}
        self._on_reconnect: list[Callable[[], None]] = []

    # -- connection --------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str | None = None, *, name: str = "taxiway", timeout: float = 5.0,
                      setup: bool = True) -> State:
        """Connect; with ``setup`` (the default) create the buckets and streams if missing.

        The platform's nats-server requires a user and password: give them in the URL's
        userinfo (``nats://user:password@127.0.0.1:4223``), or give a bare URL (or None)
        and set ``$TAXIWAY_NATS_URL`` to the URL with credentials. The supervisor does
        the latter, so no secret shows in a component's argv (``ps``).
        """
        import nats

        url = credentialed_url(url)
        shown = redact(url)

        made: list[State] = []

        async def reconnected() -> None:
            for callback in list(made[0]._on_reconnect) if made else []:
                callback()

        try:
            # With reconnects allowed forever, nats-py also retries the first connect forever:
            # bound it, so "nobody there" is an error instead of a hang.
            nc = await asyncio.wait_for(
                nats.connect(url, name=name, connect_timeout=timeout, max_reconnect_attempts=-1,
                             reconnect_time_wait=0.5, allow_reconnect=True, reconnected_cb=reconnected),
                timeout)
        except TimeoutError:
            raise Unavailable(f"cannot reach NATS at {shown} (no connection within {timeout:g} s)",
                              "start the platform with 'taxiway up'") from None
        except Exception as e:  # nats-py raises several unrelated types for "nobody there"
            if "authorization" in str(e).lower():
                raise Unavailable(f"NATS at {shown} refused the credentials ({e})",
                                  "pass the URL with user:password (see $TAXIWAY_HOME/platform/nats/auth.json) "
                                  "or set TAXIWAY_NATS_URL") from None
            raise Unavailable(f"cannot reach NATS at {shown} ({type(e).__name__}: {e})",
                              "start the platform with 'taxiway up'") from None
        st = cls(nc, nc.jetstream(timeout=timeout))
        made.append(st)
        if setup:
            await st.setup()
        return st

    async def setup(self, replicas: int = 1) -> None:
        """Create every bucket and stream (idempotent); ``replicas`` 3 on a cluster."""
        from nats.js.api import StorageType, StreamConfig

        for b in schema.BUCKETS:
            await self._bucket(b, create=True, replicas=replicas)
        for name, subjects, max_bytes in ((schema.EVENTS_STREAM, ["events.>"], 256 << 20),
                                          (schema.LOGS_STREAM, ["logs.>"], 1 << 30)):
            cfg = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, max_bytes=max_bytes,
                               num_replicas=replicas)
            try:
                await self.js.add_stream(cfg)
            except Exception:
                await self.js.update_stream(cfg)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time the connection to NATS is made again.

        A restarted nats-server forgets the consumers behind :meth:`watch` and
        :meth:`subscribe_stream`, and those iterators then wait forever without an
        error: whoever holds one for long (the edge's routes, an agent) starts it
        again from here.
        """
        self._on_reconnect.append(callback)

    async def close(self) -> None:
        with _suppress():
            await self.nc.drain()

    async def __aenter__(self) -> State:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _bucket(self, bucket: str, create: bool = False, replicas: int = 1) -> Any:
        kv = self._kv.get(bucket)
        if kv is not None:
            return kv
        from nats.js.errors import BucketNotFoundError

        try:
            kv = await self.js.key_value(bucket)
        except BucketNotFoundError:
            if not create:
                raise
            kv = await self.js.create_key_value(bucket=bucket, history=5, replicas=replicas)
        self._kv[bucket] = kv
        return kv

    # -- KV ----------------------------------------------------------------------------

    async def get(self, bucket: str, key: str) -> tuple[Any, int] | None:
        """``(value, revision)``, or None if the key is absent or deleted."""
        from nats.js.errors import KeyNotFoundError

        kv = await self._bucket(bucket)
        try:
            e = await kv.get(key)
        except KeyNotFoundError:  # also raised for deleted and purged keys
            return None
        return _load(e.value), e.revision

    async def put(self, bucket: str, key: str, value: dict[str, Any], revision: int | None = None) -> int:
        """Write; compare-and-set when ``revision`` is given (0: create only). Returns the new revision."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        kv = await self._bucket(bucket)
        data = _dump(value)
        try:
            if revision is None:
                return await kv.put(key, data)
            if revision == 0:
                return await kv.create(key, data)
            return await kv.update(key, data, last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(bucket, key) from None
        except APIError as e:
            if getattr(e, "err_code", None) == 10071:  # wrong last sequence, from create()
                raise Conflict(bucket, key) from None
            raise

    async def purge(self, bucket: str, key: str) -> None:
        """Delete ``key`` with its history (a purge marker): no old value stays readable, e.g.
        an app's secrets once the app is destroyed and its name may go to another org."""
        kv = await self._bucket(bucket)
        await kv.purge(key)

    async def purge_subject(self, stream: str, subject: str) -> None:
        """Remove every message of ``stream`` on ``subject`` (wildcards allowed), e.g. a
        destroyed app's logs and events."""
        await self.js.purge_stream(stream, subject=subject)

    async def delete(self, bucket: str, key: str, revision: int | None = None) -> None:
        """Delete (a tombstone, so watchers see it); compare-and-set with ``revision``."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        kv = await self._bucket(bucket)
        try:
            await kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(bucket, key) from None
        except APIError as e:
            if getattr(e, "err_code", None) == 10071:
                raise Conflict(bucket, key) from None
            raise

    async def update(self, bucket: str, key: str, change: Callable[[Any], Any], attempts: int = 20) -> Any:
        """Read-modify-write with compare-and-set, retried on conflict.

        ``change(old_value_or_None)`` returns the new value (None: leave as is).
        """
        for _ in range(attempts):
            got = await self.get(bucket, key)
            old, rev = got if got else (None, 0)
            new = change(old)
            if new is None:
                return old
            try:
                await self.put(bucket, key, new, revision=rev)
                return new
            except Conflict:
                await asyncio.sleep(0.01)
        raise Conflict(bucket, key)

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Live keys (deleted ones excluded), those starting with ``prefix``, sorted."""
        from nats.js.errors import NoKeysError

        kv = await self._bucket(bucket)
        try:
            ks = await kv.keys()
        except NoKeysError:
            return []
        return sorted(k for k in ks if k.startswith(prefix))

    async def items(self, bucket: str, prefix: str = "") -> list[tuple[str, Any, int]]:
        """``(key, value, revision)`` for each live key starting with ``prefix``."""
        out = []
        for k in await self.keys(bucket, prefix):
            got = await self.get(bucket, k)
            if got is not None:
                out.append((k, got[0], got[1]))
        return out

    async def snapshot(self, bucket: str, keys: str = ">") -> list[tuple[str, Any, int]]:
        """``(key, value, revision)`` of every live key matching ``keys`` (a subject pattern), sorted.

        One watcher delivers them all, so it is far quicker than :meth:`items` (two requests
        per key) for many keys: the API lists 1,000 machines this way.
        """
        kv = await self._bucket(bucket)
        w = await kv.watch(keys, include_history=False)
        out = []
        try:
            async for e in w:
                if e is None:  # every current value was delivered
                    break
                if e.operation not in ("DEL", "PURGE"):
                    out.append((e.key, _load(e.value), e.revision))
        finally:
            with _suppress():
                await w.stop()
        return sorted(out, key=lambda t: t[0])

    async def watch(self, bucket: str, keys: str = ">", *, initial: bool = True,
                    ready: asyncio.Event | None = None) -> AsyncIterator[tuple[str, Any, int]]:
        """Yield ``(key, value or None when deleted, revision)`` as keys change.

        With ``initial`` the current values come first. ``keys`` is a NATS subject
        pattern over keys (``myapp.*``, ``>``). ``ready`` is set once every value the
        bucket held at the start was yielded (at once for an empty bucket), so a
        watcher that mirrors a bucket knows when its copy is complete.
        """
        kv = await self._bucket(bucket)
        w = await kv.watch(keys, include_history=False)
        live = False
        try:
            async for e in w:
                if e is None:  # the marker between the initial values and live updates
                    live = True
                    if ready is not None:
                        ready.set()
                    continue
                if not (initial or live):
                    continue
                if e.operation in ("DEL", "PURGE"):
                    yield e.key, None, e.revision
                else:
                    yield e.key, _load(e.value), e.revision
        finally:
            with _suppress():
                await w.stop()

    # -- streams and requests -------------------------------------------------------------

    async def publish(self, subject: str, payload: dict[str, Any]) -> None:
        """Publish to a stream (events, logs): acknowledged by JetStream."""
        await self.js.publish(subject, _dump(payload))

    async def request(self, subject: str, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Request/reply (commands to an agent); raises :class:`Unavailable` if nobody answers."""
        from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

        try:
            msg = await self.nc.request(subject, _dump(payload), timeout=timeout)
        except NoRespondersError:
            raise Unavailable(f"nobody serves {subject}", "is the host agent running? ('taxiway up')") from None
        except NatsTimeout:
            raise NoReply(f"no answer on {subject} within {timeout:.0f} s",
                          "check the host agent's log") from None
        return _load(msg.data) or {}

    async def serve(self, subject: str, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                    queue: str = "", *, concurrent: bool = False) -> Any:
        """Answer requests on ``subject`` with ``handler(payload) -> reply``; returns the subscription.

        A handler's :class:`TaxiwayError` becomes ``{"ok": false, "error", "fix"}``.
        nats-py runs one subscription's callbacks one after another, so a handler that
        waits (the edge's ``edge.drain``) would hold up every later request on the
        subject: with ``concurrent`` each request is answered in a task of its own.
        """
        tasks: set[asyncio.Task] = set()

        async def on(msg: Any) -> None:
            if concurrent:
                t = asyncio.create_task(answer(msg))
                tasks.add(t)  # a reference, so the task is not collected mid-way
                t.add_done_callback(tasks.discard)
            else:
                await answer(msg)

        async def answer(msg: Any) -> None:
            try:
                reply = await handler(_load(msg.data) or {})
            except TaxiwayError as e:
                reply = {"ok": False, "error": e.message, "fix": e.hint}
            except Exception as e:  # never leave a requester waiting for a timeout
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "fix": "see the agent's log"}
            if msg.reply:
                await msg.respond(_dump(reply))

        return await self.nc.subscribe(subject, queue=queue, cb=on)

    async def subscribe_stream(self, subject: str, *, deliver_new: bool = False, last: int | None = None
                               ) -> AsyncIterator[dict[str, Any]]:
        """Yield payloads published on a stream subject (logs, events): from the start,
        the last ``last`` messages (approximately: by stream sequence), or only new ones."""
        from nats.js.api import DeliverPolicy

        policy = DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=policy)
        try:
            async for msg in sub.messages:
                yield _load(msg.data)
        finally:
            with _suppress():
                await sub.unsubscribe()

    async def fetch_stream(self, subject: str, limit: int = 1000) -> list[dict[str, Any]]:
        """What a stream holds for ``subject`` now (oldest first, at most ``limit``; the newest kept)."""
        from nats.js.api import DeliverPolicy

        out: list[dict[str, Any]] = []
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.3)
                except Exception:
                    break
                out.append(_load(msg.data))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with _suppress():
                await sub.unsubscribe()
        return out[-limit:]


class _suppress:
    """contextlib.suppress(Exception) that also works as an async context manager."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, e: object, tb: object) -> bool:
        return et is not None and issubclass(et, Exception)  # type: ignore[arg-type]
