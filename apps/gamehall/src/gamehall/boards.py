"""The board of each game as HTML, written in Python because it is the hot path:
every move re-renders a board for every page (Jinja took ~8x longer for these loops).

Each function takes a room view (:meth:`gamehall.room.Room.view`) and returns
Markup. Values from the games are numbers and fixed words; anything a person
typed (player names) goes through ``escape``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from markupsafe import Markup, escape

View = dict[str, Any]


def tictactoe(v: View) -> Markup:
    mine = v["your_turn"]  # only the page whose turn it is gets live buttons
    out = [
        '<form data-ws class="board ttt" aria-label="Board">\n',
        '<input type="hidden" name="action" value="move">\n',
    ]
    for c in v["board"]["cells"]:
        i, mark = c["index"], c["mark"]
        cls = "cell" + (" win" if c["win"] else "") + (f" mark-{mark}" if mark else "")
        act = f'data-move="{i}"' if c["legal"] and mine else "disabled"
        label = f"Row {i // 3 + 1}, column {i % 3 + 1}: {mark or 'empty'}"
        out.append(
            f'<button type="submit" name="move" value="{i}" id="cell-{i}" class="{cls}" '
            f'{act} aria-label="{label}">{mark}</button>\n'
        )
    out.append("</form>\n")
    return Markup("".join(out))


def connect4(v: View) -> Markup:
    mine = v["your_turn"]
    out = [
        '<form data-ws class="board c4" aria-label="Board">\n',
        '<input type="hidden" name="action" value="move">\n<div class="drops">\n',
    ]
    for c in v["board"]["columns"]:
        col = c["col"]
        act = f'data-move="{col}"' if c["legal"] and mine else "disabled"
        out.append(
            f'<button type="submit" name="move" value="{col}" id="col-{col}" class="drop" '
            f'{act} aria-label="Drop a disc in column {col + 1}">{col + 1}</button>\n'
        )
    out.append('</div>\n<div class="grid" role="img" aria-label="Discs on the board">\n')
    for row in v["board"]["rows"]:
        for cell in row:
            win = " win" if cell["win"] else ""
            out.append(f'<span class="hole {cell["colour"]}{win}"></span>')
        out.append("\n")
    out.append("</div>\n</form>\n")
    return Markup("".join(out))


def battleship(v: View) -> Markup:
    you, mine = v["you"], v["your_turn"]
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
            f'<form data-ws class="board sea" aria-label="{label}">\n'
            f"<h2>{heading} <small>{sea['afloat']} ships afloat</small></h2>\n"
            '<input type="hidden" name="action" value="move">\n'
            f'<div class="grid" style="--n: {v["board"]["size"]}">\n'
        )
        for c in sea["cells"]:
            i = c["index"]
            if c["legal"] and mine:
                out.append(
                    f'<button type="submit" name="move" value="{i}" id="sea-{k}-{i}" '
                    f'class="cell" data-move="{i}" '
                    f'aria-label="Fire at row {c["row"] + 1}, column {c["col"] + 1}"></button>'
                )
            else:
                shot = c["shot"]
                cls = (
                    "cell"
                    + (" ship" if c["ship"] else "")
                    + f" {shot}"
                    + (" sunk" if c["sunk"] else "")
                )
                title = shot or ("ship" if c["ship"] else "water")
                text = "×" if shot == "hit" else ("·" if shot == "miss" else "")
                out.append(f'<span class="{cls}" title="{title}">{text}</span>')
        out.append("\n</div>\n</form>\n")
    out.append("</div>\n")
    return Markup("".join(out))


BOARDS: dict[str, Callable[[View], Markup]] = {
    "tictactoe": tictactoe,
    "connect4": connect4,
    "battleship": battleship,
}
