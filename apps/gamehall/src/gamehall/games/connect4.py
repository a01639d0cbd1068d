"""Connect four: drop discs into 7 columns of 6; four in a line wins. Seat 0 (red) moves first.

Moves are columns 1 to 7 from the left, as the page labels them.
"""

from __future__ import annotations

from typing import Any

from .base import Alternating, IllegalMove, Move, Result, State, check_turn

COLS, ROWS = 7, 6
COLOURS = ("red", "yellow")


def _winning_cells(cols: list[list[int]]) -> list[tuple[int, int]]:
    def at(c: int, r: int) -> int:
        return cols[c][r] if 0 <= c < COLS and 0 <= r < len(cols[c]) else -1

    for c in range(COLS):
        for r in range(len(cols[c])):
            who = cols[c][r]
            for dc, dr in ((1, 0), (0, 1), (1, 1), (1, -1)):
                cells = [(c + k * dc, r + k * dr) for k in range(4)]
                if all(at(x, y) == who for x, y in cells):
                    return cells
    return []


class ConnectFour(Alternating):
    name = "connect4"
    title = "Connect four"
    seats = 2
    pieces = ("red", "yellow")

    def initial(self, seed: int) -> State:
        return {"cols": [[] for _ in range(COLS)], "turn": 0}

    def result(self, state: State) -> Result | None:
        win = _winning_cells(state["cols"])
        if win:
            c, r = win[0]
            return Result(state["cols"][c][r], "four in a line")
        if all(len(col) == ROWS for col in state["cols"]):
            return Result(None, "the board is full")
        return None

    def open_moves(self, state: State) -> list[Move]:
        return [c + 1 for c in range(COLS) if len(state["cols"][c]) < ROWS]

    def apply(self, state: State, seat: int, move: Move) -> State:
        check_turn(self, state, seat, move)
        if not 1 <= move <= COLS:
            raise IllegalMove(
                f"There is no column {move}; columns are 1 to {COLS}, from the left."
            )
        if len(state["cols"][move - 1]) >= ROWS:
            raise IllegalMove(f"Column {move} is full.")
        cols = [list(col) for col in state["cols"]]
        cols[move - 1].append(seat)
        return {"cols": cols, "turn": 1 - seat}

    def view(self, state: State, seat: int | None) -> dict[str, Any]:
        cols = state["cols"]
        win = set(_winning_cells(cols))
        legal = (
            set(self.legal_moves(state))
            if seat is not None and seat == self.to_move(state)
            else set()
        )
        rows = []
        for r in reversed(range(ROWS)):
            rows.append(
                [
                    {
                        "col": c,
                        "colour": COLOURS[cols[c][r]] if r < len(cols[c]) else "",
                        "win": (c, r) in win,
                    }
                    for c in range(COLS)
                ]
            )
        return {
            "rows": rows,
            "columns": [{"col": c, "move": c + 1, "legal": c + 1 in legal} for c in range(COLS)],
            "colours": COLOURS,
        }
