"""Tic-tac-toe: three in a row on a 3x3 board. Seat 0 plays X and moves first.

Moves are cells 1 to 9, row by row from the top left (the state keeps 0-based indexes).
"""

from __future__ import annotations

from typing import Any

from .base import Alternating, IllegalMove, Move, Result, State, check_turn

LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]
MARKS = ("X", "O")


class TicTacToe(Alternating):
    name = "tictactoe"
    title = "Tic-tac-toe"
    seats = 2
    pieces = MARKS

    def initial(self, seed: int) -> State:
        return {"board": [-1] * 9, "turn": 0}

    def _line(self, state: State) -> tuple[int, ...] | None:
        b = state["board"]
        for line in LINES:
            if b[line[0]] >= 0 and b[line[0]] == b[line[1]] == b[line[2]]:
                return line
        return None

    def result(self, state: State) -> Result | None:
        line = self._line(state)
        if line is not None:
            return Result(state["board"][line[0]], "three in a row")
        if all(c >= 0 for c in state["board"]):
            return Result(None, "the board is full")
        return None

    def open_moves(self, state: State) -> list[Move]:
        return [i + 1 for i, c in enumerate(state["board"]) if c < 0]

    def apply(self, state: State, seat: int, move: Move) -> State:
        check_turn(self, state, seat, move)
        if not 1 <= move <= 9:
            raise IllegalMove(
                f"There is no cell {move}; cells are 1 to 9, row by row from the top left."
            )
        if state["board"][move - 1] >= 0:
            raise IllegalMove(f"Cell {move} is already taken.")
        board = list(state["board"])
        board[move - 1] = seat
        return {"board": board, "turn": 1 - seat}

    def view(self, state: State, seat: int | None) -> dict[str, Any]:
        line = self._line(state) or ()
        legal = (
            set(self.legal_moves(state))
            if seat is not None and seat == self.to_move(state)
            else set()
        )
        return {
            "cells": [
                {
                    "index": i,
                    "move": i + 1,
                    "mark": MARKS[c] if c >= 0 else "",
                    "legal": i + 1 in legal,
                    "win": i in line,
                }
                for i, c in enumerate(state["board"])
            ],
            "marks": MARKS,
        }
