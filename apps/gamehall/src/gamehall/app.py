"""The Starlette app: the hall page, game pages, the live websocket and the JSON API.

Handlers stay thin: they parse input, call the :class:`~gamehall.hall.Hall` and
render. Every error a person can cause comes back as a clear message on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from . import codes, render
from .games import GAMES
from .hall import Hall
from .room import Options, Room, RoomError, clean_name

COOKIE = "gh_token"
MAX_MESSAGE = 2048  # bytes in one websocket message from a page; uvicorn drops far larger frames
RATE, BURST = 8.0, 16  # messages per second per socket, and the burst allowed
FLOOD_CLOSE = 200  # dropped messages after which the socket is closed


class TokenBucket:
    """Rate limit for one socket: ``burst`` messages at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _token(request) -> str | None:
    return request.query_params.get("token") or request.cookies.get(COOKIE)


def _html(body: str, status: int = 200, token: str | None = None) -> HTMLResponse:
    resp = HTMLResponse(body, status_code=status)
    if token:
        resp.set_cookie(COOKIE, token, max_age=30 * 86400, httponly=True, samesite="lax")
    return resp


def _error_page(title: str, error: str, status: int) -> HTMLResponse:
    return _html(render.page("error.html", title=title, error=error), status)


def _code_or_error(raw: str) -> tuple[str | None, str | None]:
    code = codes.normalize(raw)
    if code is None:
        return None, codes.problem(raw)
    return code, None


def _hall_page(lobby: dict[str, Any], **context: Any) -> str:
    return render.page(
        "hall.html", lobby=lobby, alphabet=codes.ALPHABET, code_length=codes.LENGTH, **context
    )


def _public_base(request: Request) -> str:
    """The address people use to reach this app: behind a proxy (the edge), its Host and
    X-Forwarded-Proto; the page's script puts its own location there anyway."""
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    if proto not in ("http", "https"):
        proto = request.url.scheme
    host = request.headers.get("host") or request.url.netloc
    return f"{proto}://{host}"


def _favicon() -> bytes:
    return (files("gamehall") / "static" / "favicon.ico").read_bytes()


def _options(data: Any, defaults: Options) -> Options:
    """A new game's options from a form or JSON; the node's defaults fill the gaps."""
    try:
        turn = max(0, min(3600, int(data.get("turn_seconds") or 0)))
        listed = data.get("listed", True)
        listed = listed not in (False, 0, "0", "false", "no", "off", "")
        idle_raw = data.get("idle_seconds")
        idle = max(1, min(86400, int(idle_raw))) if idle_raw else defaults.idle_seconds
    except (TypeError, ValueError):
        raise RoomError("Timer settings must be whole numbers of seconds.") from None
    on_timeout = data.get("on_timeout") or "forfeit"
    if on_timeout not in ("forfeit", "auto"):
        raise RoomError(
            "When time runs out, the player either forfeits or a random move is played."
        )
    return Options(turn, on_timeout, idle, listed)


def tune_gc() -> None:
    """Collect cycles less often: with thousands of sockets and games alive, Python's
    default thresholds run full collections that stall every page for a long moment."""
    gc.freeze()  # everything loaded at startup lives forever: never scan it again
    raw = os.environ.get("GAMEHALL_GC_THRESHOLD", "50000,20,100")
    gc.set_threshold(*(int(x) for x in raw.split(",")))


def create_app(make_hall: Callable[[], Hall]) -> Starlette:
    """The web app around a hall built by ``make_hall`` at startup."""
    state: dict[str, Any] = {}

    def hall() -> Hall:
        return state["hall"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        h = make_hall()
        await h.start()
        state["hall"] = h
        try:
            yield
        finally:
            await h.close()

    async def index(request: Request) -> Response:
        token = None if request.cookies.get(COOKIE) else secrets.token_urlsafe(16)
        return _html(_hall_page(await hall().lobby()), token=token)

    async def lobby_fragment(request: Request) -> Response:
        return HTMLResponse(render.page("lobby.html", lobby=await hall().lobby()))

    async def api_lobby(request: Request) -> Response:
        return JSONResponse(await hall().lobby())

    async def favicon(request: Request) -> Response:
        return Response(
            state.setdefault("favicon", _favicon()),
            media_type="image/x-icon",
            headers={"cache-control": "public, max-age=86400"},
        )

    async def new_game(request: Request) -> Response:
        form = await request.form()
        game = form.get("game") or "tictactoe"
        if game not in GAMES:
            return _html(
                _hall_page(await hall().lobby(), error=f"There is no game called “{game}”."), 400
            )
        name = str(form.get("name") or "").strip()
        token = request.cookies.get(COOKIE)
        new_token = None if token else secrets.token_urlsafe(16)
        try:
            opts = _options(
                {**form, "idle_seconds": None, "listed": not form.get("unlisted")},
                hall().defaults,
            )
            if name:
                clean_name(name)  # a bad name is refused before a game is made for it
            code = await hall().create(game, opts)
        except RoomError as e:
            return _html(_hall_page(await hall().lobby(), error=str(e)), 400)
        if name:  # the creator takes the first seat at once
            await hall().command(
                code, {"action": "join", "token": token or new_token, "name": name}
            )
        resp = RedirectResponse(f"/g/{code}", status_code=303)
        if new_token:
            resp.set_cookie(COOKIE, new_token, max_age=30 * 86400, httponly=True, samesite="lax")
        return resp

    async def join(request: Request) -> Response:
        raw = request.query_params.get("code", "")
        code, error = _code_or_error(raw)
        if code and await hall().snapshot(code) is None:
            error = f"There is no game with code {code}. Check the code, or create a new game."
        if error:
            page = _hall_page(await hall().lobby(), error=error, code=raw[:8])
            return _html(page, 404 if code else 400)
        return RedirectResponse(f"/g/{code}", status_code=303)

    async def game_page(request: Request) -> Response:
        code, error = _code_or_error(request.path_params["code"])
        if error:
            return _error_page("Not a game code", error, 400)
        snapshot = await hall().snapshot(code)
        if snapshot is None:
            return _error_page(
                "No such game",
                f"There is no game with code {code}. Check the code, or create a new game.",
                404,
            )
        token = request.cookies.get(COOKIE)
        new_token = None if token else secrets.token_urlsafe(16)
        link = f"{_public_base(request)}/g/{code}"
        body = render.game_page(Room.from_dict(snapshot), token or new_token, link)
        return _html(body, token=new_token)

    async def api_create(request: Request) -> Response:
        try:
            data = orjson.loads(await request.body() or b"{}")
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return JSONResponse({"error": 'Send a JSON object like {"game": "tictactoe"}.'}, 400)
        game = data.get("game", "tictactoe")
        if game not in GAMES:
            return JSONResponse(
                {"error": f"Unknown game {game!r}; choose one of {', '.join(GAMES)}."}, 400
            )
        try:
            code = await hall().create(game, _options(data, hall().defaults))
        except RoomError as e:
            return JSONResponse({"error": str(e)}, 400)
        return JSONResponse({"code": code, "url": f"/g/{code}", "ws": f"/ws/{code}"}, 201)

    async def api_game(request: Request) -> Response:
        code, error = _code_or_error(request.path_params["code"])
        if error:
            return JSONResponse({"error": error}, 400)
        snapshot = await hall().snapshot(code)
        if snapshot is None:
            return JSONResponse({"error": f"There is no game with code {code}."}, 404)
        room = Room.from_dict(snapshot)
        view = room.view(request.query_params.get("token"))
        view["move_list"] = room.moves
        view["log"] = await hall().backend.move_log(code)
        return Response(orjson.dumps(view), media_type="application/json")

    async def api_command(request: Request) -> Response:
        """POST a command as JSON ({"token", "action", ...}): the same commands as the websocket."""
        code, error = _code_or_error(request.path_params["code"])
        if error:
            return JSONResponse({"error": error}, 400)
        try:
            cmd = orjson.loads(await request.body())
            if not isinstance(cmd, dict):
                raise ValueError
        except ValueError:
            return JSONResponse(
                {"error": 'Send a JSON object like {"action": "move", "move": 4}.'}, 400
            )
        reply = await hall().command(code, cmd)
        return JSONResponse(reply, 200 if "error" not in reply else 409)

    async def healthz(request: Request) -> Response:
        h = hall()
        return JSONResponse(
            {"ok": True, "node": h.node_id, "games": len(h.actors), "watched": len(h.viewers)}
        )

    async def api_cluster(request: Request) -> Response:
        """This node, and the node list from DNS when discovery is on."""
        h = hall()
        return JSONResponse(
            {
                "node": h.node_id,
                "clustered": h.backend.clustered,
                "discovery": h.peers.status() if h.peers is not None else None,
            }
        )

    async def ws_game(websocket: WebSocket) -> None:
        await websocket.accept()
        as_json = websocket.query_params.get("format") == "json"

        shown = [False]  # is the page showing a notice now (so an OK must clear it)?

        async def send_notice(text: str, kind: str = "error") -> None:
            shown[0] = bool(text)
            if as_json:
                await websocket.send_text(
                    orjson.dumps({"error" if kind == "error" else "info": text}).decode()
                )
            else:
                await websocket.send_text(render.notice(text, kind))

        code, error = _code_or_error(websocket.path_params["code"])
        if error:
            await send_notice(error)
            await websocket.close(1000)
            return
        token = _token(websocket)
        viewer = await hall().watch(code, token)
        if viewer is None:
            await send_notice(
                f"There is no game with code {code}. Check the code, or create a new game."
            )
            await websocket.close(1000)
            return

        async def sender() -> None:
            while True:
                await viewer.changed.wait()
                viewer.changed.clear()
                room = viewer.room
                if as_json:
                    await websocket.send_text(orjson.dumps({"view": room.view(token)}).decode())
                else:
                    await websocket.send_text(render.room_fragment(room, token))

        bucket, dropped = TokenBucket(), 0
        send_task = asyncio.create_task(sender())
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                raw = msg.get("text")
                if raw is None:
                    raw = (msg.get("bytes") or b"").decode("utf-8", "replace")
                if not bucket.take():
                    dropped += 1
                    if dropped >= FLOOD_CLOSE:
                        await websocket.close(1008, "too many messages")
                        break
                    if dropped == 1 or dropped % 50 == 0:
                        await send_notice("You are sending messages too fast; slow down.")
                    continue
                dropped = 0
                if len(raw.encode()) > MAX_MESSAGE:
                    await send_notice(
                        f"That message was too large ({len(raw.encode())} bytes; "
                        f"the limit is {MAX_MESSAGE})."
                    )
                    continue
                try:
                    cmd = orjson.loads(raw)
                    if not isinstance(cmd, dict):
                        raise ValueError
                except ValueError:
                    await send_notice("That message could not be read; it must be a JSON object.")
                    continue
                if not token:
                    await send_notice("Your browser did not send a player id; reload the page.")
                    continue
                cmd = {
                    "action": cmd.get("action"),
                    "move": cmd.get("move"),
                    "name": cmd.get("name"),
                    "token": token,
                }
                reply = await hall().command(code, cmd)
                if as_json:
                    await websocket.send_text(orjson.dumps(reply).decode())
                elif "error" in reply:
                    await send_notice(reply["error"])
                elif shown[0]:
                    await send_notice("", "")
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass  # the page went away (possibly while its command ran)
        finally:
            send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await send_task
            await hall().unwatch(code, viewer)

    static = StaticFiles(directory=str(files("gamehall") / "static"))
    routes = [
        Route("/", index),
        Route("/lobby", lobby_fragment),
        Route("/api/lobby", api_lobby),
        Route("/favicon.ico", favicon),
        Route("/new", new_game, methods=["POST"]),
        Route("/join", join),
        Route("/g/{code}", game_page),
        Route("/api/games", api_create, methods=["POST"]),
        Route("/api/games/{code}", api_game),
        Route("/api/games/{code}/commands", api_command, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/api/cluster", api_cluster),
        WebSocketRoute("/ws/{code}", ws_game),
        Mount("/static", static, name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
