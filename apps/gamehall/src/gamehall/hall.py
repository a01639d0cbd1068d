"""One gamehall node: an actor per game it owns, routing of commands to the owner
(here or on another node), and fan-out of every change to the pages it shows.

The rules live in :mod:`gamehall.room` and :mod:`gamehall.games`; this module only
serialises commands, stores and publishes snapshots, and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from typing import Any

from . import codes, discovery, lobby
from .room import CLOSED, Options, Room, RoomError

log = logging.getLogger("gamehall")

NO_GAME = "There is no game with code {code}. Check the code, or create a new game."


class Actor:
    """The one authority for a game: commands go through its queue, one at a time."""

    def __init__(self, hall: Hall, room: Room) -> None:
        self.hall = hall
        self.room = room
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future, dict | None]] = (
            asyncio.Queue()
        )
        self.task = asyncio.create_task(self._run(), name=f"game-{room.code}")

    async def ask(self, cmd: dict[str, Any], reply_to: dict | None = None) -> dict[str, Any]:
        """Run a command. ``reply_to`` ({"node", "id", "embed"}): it was forwarded by that node,
        which gets the answer with the saved change (the reply then carries "_replied")."""
        if self.task.done():  # it just stopped: the caller looks the game up again
            return {"retry": True}
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((cmd, fut, reply_to))
        return await fut

    async def _run(self) -> None:
        code = self.room.code
        try:
            while self.room.status != CLOSED:
                wake = self.room.next_wakeup(self.hall.bot_delay)
                timeout = None if wake is None else max(0.0, wake - time.time())
                try:
                    cmd, fut, reply_to = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    try:
                        await self._change(lambda now: self.room.tick(now, self.hall.bot_delay))
                    except RoomError:  # storage failed; the timer fires again shortly
                        await asyncio.sleep(1.0)
                    continue
                try:
                    reply = await self._change(lambda now, cmd=cmd: self._apply(cmd, now), reply_to)
                except RoomError as e:
                    reply = {"error": str(e)}
                except LostGame:
                    fut.set_result({"retry": True})
                    raise
                if not fut.done():
                    fut.set_result(_answer(reply))
        except LostGame:
            log.warning("game %s: another node owns it now; stopping here", code)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("game %s: actor failed", code)
        finally:
            self.hall._actor_done(self)
            while not self.queue.empty():
                _, fut, _ = self.queue.get_nowait()
                if not fut.done():
                    fut.set_result({"retry": True})

    def _apply(self, cmd: dict[str, Any], now: float) -> dict[str, Any]:
        room, token, action = self.room, str(cmd.get("token") or ""), cmd.get("action")
        if action == "join":
            return {"ok": True, "seat": room.join(token, cmd.get("name"), now)}
        if action == "bot":
            return {"ok": True, "seat": room.add_bot(token, now)}
        if action == "start":
            room.start(token, now)
        elif action == "move":
            room.move(token, cmd.get("move"), now)
        elif action == "leave":
            room.leave(token, now)
        elif action == "rematch":
            room.rematch(token, now)
        else:
            raise RoomError(f"Unknown action {action!r}.")
        return {"ok": True}

    async def _change(self, step, reply_to: dict | None = None) -> Any:
        """Run one step on the room; if it changed, store and publish before answering.

        For a command forwarded by another node (``reply_to``), the answer travels with
        the change: inside the published snapshot when that node listens to the game
        ("embed"), else as a message to that node sent by the same save."""
        before = self.room.to_dict()
        try:
            out = step(time.time())
        except RoomError:
            self.room = Room.from_dict(before)
            raise
        if self.room.version == before["version"]:
            return out
        snapshot = self.room.to_dict()
        new_moves = (
            snapshot["moves"][len(before["moves"]) :]
            if snapshot["round"] == before["round"]
            else []
        )
        move = (
            {"round": snapshot["round"], "version": snapshot["version"], "moves": new_moves}
            if new_moves
            else None
        )
        snapshot["by"] = self.hall.node_id  # nodes skip their own changes coming back from Redis
        reply = None
        if reply_to is not None:
            answer = {"t": "reply", "id": reply_to["id"], "reply": _answer(out)}
            if reply_to.get("embed"):
                snapshot["reply"] = {"node": reply_to["node"], **answer}
            else:
                reply = (reply_to["node"], answer)
        try:
            saved = await self.hall.backend.save(self.room.code, snapshot, move, reply)
        except Exception as e:
            self.room = Room.from_dict(before)
            log.exception("game %s: could not store a change", self.room.code)
            raise RoomError("The game could not be saved just now; try again.") from e
        if not saved:
            raise LostGame()
        self.hall._fan_out(self.room.code, snapshot)
        if reply_to is not None:
            return {**_answer(out), "_replied": True}
        return out


def _answer(out: Any) -> dict[str, Any]:
    return out if isinstance(out, dict) else {"ok": True}


class LostGame(Exception):
    """Another node owns this game now (our ownership lapsed)."""


class Viewer:
    """A page (or bot) showing one game: keeps only the newest room to render."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.room: Room | None = None
        self.changed = asyncio.Event()

    def push(self, room: Room) -> None:
        if self.room is None or room.version >= self.room.version:
            self.room = room
            self.changed.set()


class Hall:
    """A gamehall node."""

    def __init__(
        self,
        backend,
        bot_delay: float = 0.4,
        reply_timeout: float = 5.0,
        defaults: Options | None = None,
        peers: discovery.Poller | None = None,
    ) -> None:
        """``peers``: the node list from DNS; nodes it shows gone lose their games at once."""
        self.backend = backend
        self.peers = peers
        self.node_id = backend.node_id
        self.bot_delay = bot_delay
        self.reply_timeout = reply_timeout
        self.defaults = defaults or Options()
        self.actors: dict[str, Actor] = {}
        self.viewers: dict[str, set[Viewer]] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._owners: dict[str, str] = {}  # last known owner of games run elsewhere
        self._tasks: set[asyncio.Task] = set()
        self._housekeeper: asyncio.Task | None = None
        self._following: set[str] = set()  # games whose changes we asked the backend for
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start(self._on_message)
        if self.peers is not None:
            self.peers.on_change = lambda before, after: self._spawn(self._adopt_now())
            await self.peers.start()
        if self.backend.clustered:
            self._housekeeper = asyncio.create_task(self._housekeep(), name="gamehall-housekeeper")

    async def close(self) -> None:
        self._closing = True
        if self.peers is not None:
            await self.peers.close()
        if self._housekeeper:
            self._housekeeper.cancel()
        actors = list(self.actors.values())
        for a in actors:
            a.task.cancel()
        for t in [
            *(a.task for a in actors),
            *self._tasks,
            *([self._housekeeper] if self._housekeeper else []),
        ]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for a in actors:
            with contextlib.suppress(Exception):
                await self.backend.release(a.room.code)
        await self.backend.close()

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _actor_done(self, actor: Actor) -> None:
        code = actor.room.code
        if self.actors.get(code) is actor:
            del self.actors[code]
            if actor.room.status == CLOSED:
                self._spawn(self.backend.forget(code))
            if code in self.viewers and not self._closing:
                self._spawn(self._catch_up(code))

    async def _follow(self, code: str) -> None:
        """Listen to a game's changes from other nodes exactly when pages here show it and
        another node runs it: the owner shows its own changes to its pages itself, so it
        is not sent them back through Redis."""
        while True:
            want = code in self.viewers and code not in self.actors
            if want == (code in self._following):
                return
            if want:
                self._following.add(code)
                await self.backend.subscribe(code)
            else:
                self._following.discard(code)
                await self.backend.unsubscribe(code)

    async def _catch_up(self, code: str) -> None:
        """Our actor for a game stopped (another node runs it now): listen to the game and
        show its pages the stored state, which may be newer than what they show."""
        try:
            await self._follow(code)
            if code in self.viewers:
                snapshot = await self.backend.load(code)
                if snapshot is not None:
                    self._fan_out(code, snapshot)
        except Exception:
            log.exception("game %s: could not follow it from another node", code)

    async def _housekeep(self) -> None:
        """Renew ownership of our games; adopt watched games whose owner vanished."""
        period = max(0.5, self.backend.owner_ttl / 3)
        while True:
            await asyncio.sleep(period)
            try:
                if self.actors:
                    for code in await self.backend.renew(list(self.actors)):
                        actor = self.actors.get(code)
                        if actor is not None:  # our ownership lapsed: another node may run it
                            log.warning("game %s: no longer ours; stopping here", code)
                            actor.task.cancel()
                await self._adopt_orphans()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed")

    def _gone(self, owner: str) -> bool:
        return self.peers is not None and discovery.gone(owner, self.peers.nodes)

    async def _adopt_now(self) -> None:
        """The node list changed: adopt what its departed nodes ran, without waiting."""
        try:
            await self._adopt_orphans()
        except Exception:
            log.exception("could not take over the games of departed nodes")

    async def _adopt_orphans(self) -> None:
        """Run the watched games whose owner lapsed, or left the DNS node list."""
        watched = [c for c in self.viewers if c not in self.actors]
        for code, owner in zip(watched, await self.backend.owners(watched), strict=True):
            if owner is not None and owner != self.node_id and self._gone(owner):
                log.warning("node %s left the node list; taking over game %s", owner, code)
                await self.backend.steal(code, owner)
                owner = None
            if owner is None:
                await self._take(code)

    # -- games ----------------------------------------------------------------------

    async def create(self, game: str, options: Options | None = None) -> str:
        """Create a game in the lobby and return its code (unique across the cluster)."""
        for _ in range(50):
            code = codes.new_code()
            room = Room.new(code, game, secrets.randbits(31), options or self.defaults, time.time())
            if await self.backend.reserve(code, room.to_dict()):
                self.actors[code] = Actor(self, room)
                return code
        raise RoomError("Could not find a free game code; try again.")

    async def lobby(self) -> dict[str, Any]:
        """The games to list in the hall: open ones to join, live ones to watch."""
        return lobby.lobby(await self.backend.recent(4 * lobby.LIMIT), time.time())

    async def snapshot(self, code: str) -> dict[str, Any] | None:
        actor = self.actors.get(code)
        if actor:
            return actor.room.to_dict()
        return await self.backend.load(code)

    async def command(
        self, code: str, cmd: dict[str, Any], forwarded: bool = False, reply_to: dict | None = None
    ) -> dict[str, Any]:
        """Run ``cmd`` on the game's owner, wherever it is; the reply is {"ok"...} or {"error"}."""
        for _ in range(4):
            actor = self.actors.get(code)
            if actor:
                reply = await actor.ask(cmd, reply_to)
                if reply.get("retry"):
                    continue
                return reply
            owner = self._owners.get(code) or await self.backend.owner(code)
            if owner is None or owner == self.node_id:
                if await self._take(code):
                    continue
                snapshot = await self.backend.load(code)
                if snapshot is None:
                    return {"error": NO_GAME.format(code=code)}
                if snapshot["status"] == CLOSED:
                    return {"error": "This game was closed after being idle; create a new one."}
                continue
            if forwarded:
                return {"retry": True}
            if self._gone(owner):  # DNS says that node is no more: don't wait on it
                self._owners.pop(code, None)
                log.warning("node %s left the node list; taking over game %s", owner, code)
                await self.backend.steal(code, owner)
                continue
            reply = await self._remote(owner, code, cmd)
            if reply is None:  # the owner no longer listens: its node is gone
                self._owners.pop(code, None)
                log.warning("node %s is gone; taking over game %s", owner, code)
                await self.backend.steal(code, owner)
                continue
            if reply.get("retry"):  # it no longer runs the game: look the owner up again
                self._owners.pop(code, None)
                await asyncio.sleep(0.05)
                continue
            if len(self._owners) > 100_000:
                self._owners.clear()
            self._owners[code] = owner
            return reply
        return {"error": "The server for this game is not answering; try again in a moment."}

    async def _take(self, code: str) -> bool:
        """Become the owner of a stored game and start its actor from the last snapshot."""
        if code in self.actors:
            return True
        if await self.backend.owner(code) != self.node_id and not await self.backend.claim(code):
            return False
        snapshot = await self.backend.load(code)
        if snapshot is None:
            await self.backend.release(code)
            return False
        if code in self.actors:
            return True
        room = Room.from_dict(snapshot)
        if room.status == CLOSED:
            return False
        log.info("node %s now runs game %s from version %s", self.node_id, code, room.version)
        self.actors[code] = Actor(self, room)
        if code in self._following:
            self._spawn(self._follow(code))  # our own changes need not come back from Redis
        return True

    async def _remote(self, node: str, code: str, cmd: dict[str, Any]) -> dict[str, Any] | None:
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        # If this node listens to the game, the owner puts its answer in the published
        # change (one message less); a pin keeps us listening until the answer is in.
        viewers = self.viewers.get(code)
        pin = Viewer(None) if viewers and self.backend.listening(code) else None
        if pin is not None:
            viewers.add(pin)
        msg = {"t": "cmd", "id": rid, "from": self.node_id, "code": code, "cmd": cmd}
        if pin is not None:
            msg["sub"] = True
        try:
            n = await self.backend.send(node, msg)
            if n == 0:
                return None
            try:
                return await asyncio.wait_for(fut, self.reply_timeout)
            except TimeoutError:
                return {"error": "The server for this game is busy; try again in a moment."}
        finally:
            self._pending.pop(rid, None)
            if pin is not None:
                await self.unwatch(code, pin)

    def _on_message(self, kind: str, key: str, payload: dict[str, Any]) -> None:
        if kind == "game":
            if payload.get("by") != self.node_id:
                self._fan_out(key, payload)
            reply = payload.get("reply")
            if reply is not None and reply.get("node") == self.node_id:
                fut = self._pending.get(reply.get("id"))
                if fut and not fut.done():
                    fut.set_result(reply["reply"])
        elif kind == "node" and payload.get("t") == "cmd":
            self._spawn(self._serve_remote(payload))
        elif kind == "node" and payload.get("t") == "reply":
            fut = self._pending.get(payload.get("id"))
            if fut and not fut.done():
                fut.set_result(payload["reply"])

    async def _serve_remote(self, msg: dict[str, Any]) -> None:
        reply_to = {"node": msg["from"], "id": msg["id"], "embed": bool(msg.get("sub"))}
        try:
            reply = await self.command(msg["code"], msg["cmd"], forwarded=True, reply_to=reply_to)
        except Exception:
            log.exception("remote command failed")
            reply = {"error": "The game server failed on that command."}
        if reply.pop("_replied", False):
            return  # the answer went out with the saved change
        await self.backend.send(msg["from"], {"t": "reply", "id": msg["id"], "reply": reply})

    # -- pages ----------------------------------------------------------------------

    def _fan_out(self, code: str, snapshot: dict[str, Any]) -> None:
        viewers = self.viewers.get(code)
        if viewers:
            room = Room.from_dict(snapshot)
            for v in viewers:
                v.push(room)

    async def watch(self, code: str, token: str | None) -> Viewer | None:
        """Follow a game's changes; None if there is no such game."""
        viewer = Viewer(token)
        self.viewers.setdefault(code, set()).add(viewer)
        await self._follow(code)
        snapshot = await self.snapshot(code)
        if snapshot is None:
            await self.unwatch(code, viewer)
            return None
        viewer.push(Room.from_dict(snapshot))
        return viewer

    async def unwatch(self, code: str, viewer: Viewer) -> None:
        viewers = self.viewers.get(code)
        if viewers is None:
            return
        viewers.discard(viewer)
        if not viewers:
            del self.viewers[code]
            with contextlib.suppress(Exception):
                await self._follow(code)
