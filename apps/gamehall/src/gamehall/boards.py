"""The board of each game as HTML, written in Python because it is the hot path:
every move re-renders a board for every page (Jinja took ~8x longer for these loops).

Each function takes a room view (:meth:`gamehall.room.Room.view`) and returns
Markup. Values from the games are numbers and fixed words; anything a person
typed (player names) goes through ``escape``.

A button's ``value`` and ``data-move`` are the move as the game numbers it (from 1,
as the page shows it); ``data-cols`` on a board tells the page's keyboard support
how the buttons are laid out (arrow keys move by row and column).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from markupsafe import Markup, escape

View = dict[str, Any]


def tictactoe(v: View) -> Markup:
    mine = v["your_turn"]  # only the page whose turn it is gets live buttons
    out = [
        '<form data-ws class="board ttt" data-cols="3" aria-label="Board">\n',
        '<input type="hidden" name="action" value="move">\n',
    ]
    for c in v["board"]["cells"]:
        i, n, mark = c["index"], c["move"], c["mark"]
        cls = "cell" + (" win" if c["win"] else "") + (f" mark-{mark}" if mark else "")
        act = f'data-move="{n}"' if c["legal"] and mine else "disabled"
        label = f"Cell {n}, row {i // 3 + 1}, column {i % 3 + 1}: {mark or 'empty'}"
        # The cell number is drawn by CSS from data-n, so the button's text is just its mark.
        out.append(
            f'<button type="submit" name="move" value="{n}" id="cell-{n}" class="{cls}" '
            f'data-n="{n}" {act} aria-label="{label}">{mark}</button>\n'
        )
    out.append("</form>\n")
    return Markup("".join(out))


def connect4(v: View) -> Markup:
    mine = v["your_turn"]
    out = [
        '<form data-ws class="board c4" data-cols="7" aria-label="Board">\n',
        '<input type="hidden" name="action" value="move">\n<div class="drops">\n',
    ]
    for c in v["board"]["columns"]:
        n = c["move"]
        act = f'data-move="{n}"' if c["legal"] and mine else "disabled"
        out.append(
            f'<button type="submit" name="move" value="{n}" id="col-{n}" class="drop" '
            f'{act} aria-label="Drop a disc in column {n}">{n}</button>\n'
        )
    out.append('</div>\n<div class="grid" role="img" aria-label="Discs on the board">\n')
    for row in v["board"]["rows"]:
        for cell in row:
            win = " win" if cell["win"] else ""
            out.append(f'<span class="hole {cell["colour"]}{win}"></span>')
        out.append("\n")
    out.append("</div>\n</form>\n")
    return Markup("".join(out))


_MARKS = {"hit": "✕", "miss": "●"}  # noqa: RUF001 (a miss is a solid dot, drawn large by CSS)


def battleship(v: View) -> Markup:
    you, mine = v["you"], v["your_turn"]
    size, rows = v["board"]["size"], v["board"]["rows"]
    out = ['<div class="seas">\n']
    for sea in v["board"]["seas"]:
        k = sea["owner"]
        name = v["seats"][k]["name"]
        if you == k:
            label = heading = "Your fleet"
        else:
            label = f"{escape(name or f'Seat {k + 1}')}'s sea"
            heading = (
                "Enemy waters" if you is not None else f"{escape(name or 'Open seat')}'s fleet"
            )
        out.append(
            f'<form data-ws class="board sea" data-cols="{size}" aria-label="{label}">\n'
            f"<h2>{heading} <small>{sea['afloat']} ships afloat</small></h2>\n"
            '<input type="hidden" name="action" value="move">\n'
            f'<div class="grid" style="--n: {size}">\n<span class="lab corner"></span>'
        )
        # Column numbers across the top, row letters down the side: cells read as "B3".
        out.extend(f'<span class="lab col">{c + 1}</span>' for c in range(size))
        for c in sea["cells"]:
            if c["col"] == 0:
                out.append(f'\n<span class="lab row">{rows[c["row"]]}</span>')
            n, cname = c["move"], c["name"]
            if c["legal"] and mine:
                out.append(
                    f'<button type="submit" name="move" value="{n}" id="sea-{k}-{n}" '
                    f'class="cell" data-move="{n}" data-name="{cname}" '
                    f'aria-label="Fire at {cname}"></button>'
                )
            else:
                shot = c["shot"]
                cls = (
                    "cell"
                    + (" ship" if c["ship"] else "")
                    + (f" {shot}" if shot else "")
                    + (" sunk" if c["sunk"] else "")
                )
                what = ("sunk" if c["sunk"] else shot) or ("ship" if c["ship"] else "water")
                out.append(
                    f'<span class="{cls}" id="sea-{k}-{n}" title="{cname}: {what}" '
                    f'aria-label="{cname}: {what}">{_MARKS.get(shot, "")}</span>'
                )
        out.append("\n</div>\n</form>\n")
    out.append("</div>\n")
    return Markup("".join(out))


BOARDS: dict[str, Callable[[View], Markup]] = {
    "tictactoe": tictactoe,
    "connect4": connect4,
    "battleship": battleship,
}
