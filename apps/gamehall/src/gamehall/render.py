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
        html = cache[seat] = env.get_template("room.html").render(
            v=v, board=BOARDS[room.game](v), now=time.time()
        )
    return html


def game_page(room: Room, token: str | None, link: str = "") -> str:
    """The whole page of a game, as first loaded (the websocket keeps it live after);
    ``link`` is the address to share (the page's script sets its own location there)."""
    v = room.view(token)
    return page(
        "game.html",
        v=v,
        board=BOARDS[room.game](v),
        now=time.time(),
        text="",
        kind="",
        link=link or f"/g/{room.code}",
    )


def notice(text: str, kind: str = "error") -> str:
    return env.get_template("notice.html").render(text=text, kind=kind)
