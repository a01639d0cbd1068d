"""The interface every turn-based game implements, as pure functions over plain data.

A game never touches I/O. Its state is JSON-shaped (dicts, lists, ints, strings)
so it can be stored, published between nodes and replayed from the move log.
Moves are ints (a cell, a column): they travel in HTML forms and JSON alike. They are
numbered from 1, as the pages show them (cell 1 is the top left, column 1 the leftmost),
so a move a person or a bot sends and every message about it use one numbering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

State = dict[str, Any]
Move = int


class IllegalMove(ValueError):
    """A move the rules reject; ``str(e)`` is a reason a player can read."""


@dataclass(frozen=True)
class Result:
    """How a game ended: ``winner`` is a seat, or None for a draw."""

    winner: int | None
    reason: str


class Game(Protocol):
    """One turn-based game. Seats are numbered 0..seats-1."""

    name: str  # short slug used in URLs and storage
    title: str  # shown to people
    seats: int
    pieces: tuple[str, ...] | None  # what each seat plays with ("X", "O"), shown before the first move

    def initial(self, seed: int) -> State:
        """The state a new game starts from; ``seed`` drives any randomness (dealing, placement)."""

    def to_move(self, state: State) -> int | None:
        """The seat whose turn it is, or None once the game is over."""

    def legal_moves(self, state: State) -> list[Move]:
        """Every move the seat to move may make now (empty when over)."""

    def apply(self, state: State, seat: int, move: Move) -> State:
        """The state after ``seat`` plays ``move``; raises IllegalMove with a reason."""

    def result(self, state: State) -> Result | None:
        """The result once the game is over, else None."""

    def view(self, state: State, seat: int | None) -> dict[str, Any]:
        """What ``seat`` may see (None: a spectator). Hidden information stays out."""


class Alternating:
    """The parts shared by games whose seats take turns, with ``state["turn"]`` the seat to move.

    A subclass writes ``result`` and ``open_moves`` (the moves available if the game
    is not over); whose turn it is and the legal moves follow.
    """

    def result(self, state: State) -> Result | None:
        raise NotImplementedError

    def open_moves(self, state: State) -> list[Move]:
        raise NotImplementedError

    def to_move(self, state: State) -> int | None:
        return None if self.result(state) else state["turn"]

    def legal_moves(self, state: State) -> list[Move]:
        return [] if self.result(state) else self.open_moves(state)


def check_turn(game: Game, state: State, seat: int, move: Any) -> None:
    """The checks every game shares: not over, the seat's turn, a well-formed move."""
    if game.result(state) is not None:
        raise IllegalMove("The game is over.")
    if seat != game.to_move(state):
        raise IllegalMove("It is not your turn.")
    if isinstance(move, bool) or not isinstance(move, int):
        raise IllegalMove(f"A move must be a number, not {move!r}.")
