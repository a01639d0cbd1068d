"""Server-side HTML: the hall page, the game page and the fragments sent over the websocket.

Jinja2 autoescapes every value, so names and messages typed by players are shown
as text, never as markup.
"""

from __future__ import annotations

import time
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from .boards import BOARDS
from .games import GAMES
from .room import Room

env = Environment(
    loader=PackageLoader("gamehall", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)


def page(name: str, **context: Any) -> str:
    return env.get_template(name).render(games=GAMES, **context)


def _who(v: dict[str, Any], seat: int) -> str:
    pieces = v["pieces"]
    name = v["seats"][seat]["name"] or f"Seat {seat + 1}"
    return f"{name} ({pieces[seat]})" if pieces else name


def banner(v: dict[str, Any]) -> tuple[str, str]:
    """The one line that says what is going on for this viewer: (css class, text)."""
    you, status, pieces, result = v["you"], v["status"], v["pieces"], v["result"]
    plays = f": you play {pieces[you]}" if pieces and you is not None else ""
    if status == "playing":
        if v["your_turn"]:
            return "mine", "Your turn" + plays
        who = _who(v, v["to_move"])
        return "theirs", (f"{who} to move" if you is None else f"Waiting for {who} to move")
    if status == "over" and result:
        if result["winner"] is None:
            return "draw", f"Draw: {result['reason']}"
        if result["winner"] == you:
            return "won", f"You won: {result['reason']}"
        won = f"{_who(v, result['winner'])} won: {result['reason']}"
        return ("lost", "You lost: " + won) if you is not None else ("over", won)
    if status == "closed":
        return "over", "This game is closed. Start a new one from the hall."
    open_seat = any(s["name"] is None for s in v["seats"])
    if you is None:
        if open_seat:
            return "lobby", "Waiting for players: enter your name to join, or watch."
        return "lobby", "Waiting for the players to start."
    first = v["first"]
    side = ""
    if pieces:
        side = f" You play {pieces[you]}" + (
            " and move first." if first == you else f"; {v['seats'][first]['name']} moves first."
        )
    if open_seat:
        return "lobby", "Waiting for an opponent: share the code or the link, or add a bot." + side
    return "lobby", "Everyone is here: press Start." + side


def _render(v: dict[str, Any], board: Any, now: float) -> str:
    cls, text = banner(v)
    open_seat = any(s["name"] is None for s in v["seats"])
    return env.get_template("room.html").render(
        v=v, board=board, now=now, banner_cls=cls, banner=text, open_seat=open_seat
    )


def room_fragment(room: Room, token: str | None) -> str:
    """The live part of a game page for one viewer (replaced by id on every change).

    What a page shows depends only on its seat, so one render per seat is shared by
    every page of that seat (all the spectators, a player's several tabs).
    """
    seat = room.seat_of(token)
    cache = room.__dict__.setdefault("_rendered", {})
    html = cache.get(seat)
    if html is None:
        v = room.view(token)
        html = cache[seat] = _render(v, BOARDS[room.game](v), time.time())
    return html


def game_page(room: Room, token: str | None, link: str = "") -> str:
    """The whole page of a game, as first loaded (the websocket keeps it live after);
    ``link`` is the address to share (the page's script sets its own location there)."""
    v = room.view(token)
    cls, text = banner(v)
    return page(
        "game.html",
        v=v,
        board=BOARDS[room.game](v),
        now=time.time(),
        text="",
        kind="",
        link=link or f"/g/{room.code}",
        banner_cls=cls,
        banner=text,
        open_seat=any(s["name"] is None for s in v["seats"]),
    )


def notice(text: str, kind: str = "error") -> str:
    return env.get_template("notice.html").render(text=text, kind=kind)
