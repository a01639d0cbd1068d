"""Battleship on a 6x6 sea: fleets are placed at random from the seed, players take
turns firing at the other's sea, and sinking every ship wins. Where the other
fleet lies is hidden information: a player's view shows only their own fleet
and the results of their shots.

Moves are cells 1 to 36, row by row from the top left; the page names them as
on a paper grid, rows A to F and columns 1 to 6 (cell 8 is B2).
"""

from __future__ import annotations

import random
from typing import Any

from .base import Alternating, IllegalMove, Move, Result, State, check_turn

SIZE = 6
FLEET = (3, 3, 2, 2)


def place_fleet(rng: random.Random) -> list[list[int]]:
    """Non-overlapping ships (lists of cell indexes) on a SIZE x SIZE sea."""
    taken: set[int] = set()
    ships = []
    for length in FLEET:
        while True:
            horizontal = rng.random() < 0.5
            r = rng.randrange(SIZE if horizontal else SIZE - length + 1)
            c = rng.randrange(SIZE - length + 1 if horizontal else SIZE)
            cells = [
                (r * SIZE + c + k) if horizontal else ((r + k) * SIZE + c) for k in range(length)
            ]
            if not taken.intersection(cells):
                taken.update(cells)
                ships.append(cells)
                break
    return ships


ROWS = "ABCDEFGHIJ"[:SIZE]


def cell_name(move: int) -> str:
    """The grid name of a cell (1-based): 1 is A1, 8 is B2."""
    return f"{ROWS[(move - 1) // SIZE]}{(move - 1) % SIZE + 1}"


def _sunk(ship: list[int], shots: set[int]) -> bool:
    return all(cell in shots for cell in ship)


class Battleship(Alternating):
    name = "battleship"
    title = "Battleship"
    seats = 2
    pieces = None

    def initial(self, seed: int) -> State:
        rng = random.Random(seed)
        return {"ships": [place_fleet(rng), place_fleet(rng)], "shots": [[], []], "turn": 0}

    def result(self, state: State) -> Result | None:
        for seat in (0, 1):
            shots = set(state["shots"][seat])
            if all(_sunk(ship, shots) for ship in state["ships"][1 - seat]):
                return Result(seat, "sank the whole fleet")
        return None

    def open_moves(self, state: State) -> list[Move]:
        fired = set(state["shots"][state["turn"]])
        return [i + 1 for i in range(SIZE * SIZE) if i not in fired]

    def apply(self, state: State, seat: int, move: Move) -> State:
        check_turn(self, state, seat, move)
        n = SIZE * SIZE
        if not 1 <= move <= n:
            raise IllegalMove(
                f"There is no cell {move}; cells are 1 ({cell_name(1)}) to {n} ({cell_name(n)}), "
                "row by row from the top left."
            )
        if move - 1 in state["shots"][seat]:
            raise IllegalMove(f"You already fired at cell {move} ({cell_name(move)}).")
        shots = [list(s) for s in state["shots"]]
        shots[seat].append(move - 1)
        return {"ships": state["ships"], "shots": shots, "turn": 1 - seat}

    def _sea(
        self, ships: list[list[int]], shots: list[int], show_ships: bool
    ) -> list[dict[str, Any]]:
        """One sea as cells: what was fired at it, and (if shown) where ships lie."""
        ship_at = {cell: i for i, ship in enumerate(ships) for cell in ship}
        fired = set(shots)
        sunk = {i for i, ship in enumerate(ships) if _sunk(ship, fired)}
        cells = []
        for i in range(SIZE * SIZE):
            hit = i in fired and i in ship_at
            cells.append(
                {
                    "index": i,
                    "move": i + 1,
                    "name": cell_name(i + 1),
                    "row": i // SIZE,
                    "col": i % SIZE,
                    "shot": "hit" if hit else ("miss" if i in fired else ""),
                    "sunk": hit and ship_at[i] in sunk,
                    "ship": show_ships and i in ship_at,
                }
            )
        return cells

    def view(self, state: State, seat: int | None) -> dict[str, Any]:
        over = self.result(state) is not None
        legal = (
            set(self.legal_moves(state))
            if seat is not None and self.to_move(state) == seat
            else set()
        )
        seas = []
        # Sea k holds seat k's fleet and the shots fired at it by the other seat.
        for k in (0, 1):
            cells = self._sea(
                state["ships"][k], state["shots"][1 - k], show_ships=over or seat == k
            )
            for cell in cells:
                cell["legal"] = k != seat and cell["move"] in legal
            seas.append(
                {
                    "owner": k,
                    "cells": cells,
                    "afloat": sum(
                        not _sunk(s, set(state["shots"][1 - k])) for s in state["ships"][k]
                    ),
                }
            )
        return {"size": SIZE, "rows": ROWS, "seas": seas}
