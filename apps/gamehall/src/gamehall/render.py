"""Server-side HTML: the hall page, the game page and the fragments sent over the websocket.

Jinja2 autoescapes every value, so names and messages typed by players are shown
as text, never as markup.
"""

from __future__ import annotations

import time
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from .games import GAMES
from .room import Room

env = Environment(loader=PackageLoader("gamehall", "templates"), autoescape=select_autoescape(default=True),
                  trim_blocks=True, lstrip_blocks=True, auto_reload=False)


def page(name: str, **context: Any) -> str:
    return env.get_template(name).render(games=GAMES, **context)


def room_fragment(room: Room, token: str | None) -> str:
    """The live part of a game page for one viewer (replaced by id on every change)."""
    return env.get_template("room.html").render(v=room.view(token), now=time.time())


def notice(text: str, kind: str = "error") -> str:
    return env.get_template("notice.html").render(text=text, kind=kind)
