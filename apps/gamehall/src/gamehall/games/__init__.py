"""The games gamehall ships, each a small module implementing :class:`base.Game`."""

from __future__ import annotations

from .base import Game, IllegalMove, Move, Result, State
from .battleship import Battleship
from .connect4 import ConnectFour
from .tictactoe import TicTacToe

GAMES: dict[str, Game] = {g.name: g for g in (TicTacToe(), ConnectFour(), Battleship())}

__all__ = ["GAMES", "Game", "IllegalMove", "Move", "Result", "State"]
