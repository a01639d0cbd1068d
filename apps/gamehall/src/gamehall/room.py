"""A game room: seats, lifecycle, timers and the move log around one game, as pure logic.

The room takes commands with the current time and either changes (the caller
then stores and publishes its snapshot) or raises :class:`RoomError` with a
message for the page. It never does I/O, so the actor that owns it stays thin
and the rules of the hall are tested without sockets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .games import GAMES, IllegalMove

NAME_MAX = 24
LOBBY, PLAYING, OVER, CLOSED = "lobby", "playing", "over", "closed"


class RoomError(Exception):
    """A command the room refuses; ``str(e)`` is shown to the player."""


@dataclass
class Options:
    turn_seconds: int = 0  # 0: no turn timer
    on_timeout: str = "forfeit"  # or "auto": a random legal move is played for the player
    idle_seconds: int = 900  # a game with no command for this long is closed
    listed: bool = True  # shown in the hall's lobby; else found only by its code

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Options:
        return cls(
            int(d.get("turn_seconds", 0)),
            str(d.get("on_timeout", "forfeit")),
            int(d.get("idle_seconds", 900)),
            bool(d.get("listed", True)),
        )


def clean_name(name: Any) -> str:
    """A player's display name, trimmed; raises RoomError if empty or too long."""
    text = " ".join(str(name or "").split())
    if not text or len(text) > NAME_MAX:
        raise RoomError(f"Enter a name of 1 to {NAME_MAX} characters.")
    return text


@dataclass
class Room:
    code: str
    game: str
    seed: int
    options: Options = field(default_factory=Options)
    status: str = LOBBY
    seats: list[dict[str, Any] | None] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    moves: list[list[int]] = field(default_factory=list)  # [seat, move] of the current round
    result: dict[str, Any] | None = None
    round: int = 1
    version: int = 0
    turn_deadline: float | None = None
    last_active: float = 0.0
    message: str = ""

    @classmethod
    def new(cls, code: str, game: str, seed: int, options: Options, now: float) -> Room:
        if game not in GAMES:
            raise RoomError(f"Unknown game {game!r}; choose one of {', '.join(GAMES)}.")
        rules = GAMES[game]
        return cls(
            code,
            game,
            seed,
            options,
            seats=[None] * rules.seats,
            state=rules.initial(seed),
            last_active=now,
            message="Waiting for players.",
        )

    @property
    def rules(self):
        return GAMES[self.game]

    # -- storage ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "game": self.game,
            "seed": self.seed,
            "options": vars(self.options).copy(),
            "status": self.status,
            "seats": [dict(s) if s else None for s in self.seats],
            "state": self.state,
            "moves": list(self.moves),
            "result": self.result,
            "round": self.round,
            "version": self.version,
            "turn_deadline": self.turn_deadline,
            "last_active": self.last_active,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Room:
        return cls(
            d["code"],
            d["game"],
            d["seed"],
            Options.from_dict(d["options"]),
            d["status"],
            d["seats"],
            d["state"],
            d["moves"],
            d["result"],
            d["round"],
            d["version"],
            d["turn_deadline"],
            d["last_active"],
            d["message"],
        )

    # -- who is who -------------------------------------------------------------

    def seat_of(self, token: str | None) -> int | None:
        if token:
            for i, s in enumerate(self.seats):
                if s and s.get("token") == token:
                    return i
        return None

    def _seated(self, token: str | None) -> int:
        seat = self.seat_of(token)
        if seat is None:
            raise RoomError("You are not playing in this game; join it first.")
        return seat

    def _name(self, seat: int) -> str:
        s = self.seats[seat]
        return s["name"] if s else f"Seat {seat + 1}"

    def _changed(self, now: float, message: str) -> None:
        self.version += 1
        self.last_active = now
        self.message = message

    def _open(self) -> None:
        if self.status == CLOSED:
            raise RoomError("This game was closed; create a new one from the hall.")

    # -- commands ---------------------------------------------------------------

    def join(self, token: str, name: Any, now: float, bot: bool = False) -> int:
        """Seat a player (or return the seat they already hold: a reconnect)."""
        self._open()
        seat = self.seat_of(token)
        if seat is not None:
            return seat
        name = clean_name(name)
        free = [i for i, s in enumerate(self.seats) if s is None]
        if not free:
            raise RoomError("This game is full; you can watch it as a spectator.")
        if self.status == PLAYING:
            raise RoomError("This game has started; you can watch it as a spectator.")
        seat = free[0]
        self.seats[seat] = {"token": token, "name": name, "bot": bot}
        self._changed(now, f"{name} joined.")
        return seat

    def add_bot(self, token: str, now: float) -> int:
        self._seated(token)
        n = sum(1 for s in self.seats if s and s.get("bot")) + 1
        return self.join(f"bot-{self.round}-{n}-{now}", f"Bot {n}", now, bot=True)

    def start(self, token: str, now: float) -> None:
        self._open()
        self._seated(token)
        if self.status == PLAYING:
            raise RoomError("The game has already started.")
        if self.status == OVER:
            raise RoomError("This round is over; press Rematch to play again.")
        if any(s is None for s in self.seats):
            raise RoomError("Wait until every seat is taken (or add a bot).")
        self.status = PLAYING
        self._arm_timer(now)
        self._changed(now, f"Game on! {self._name(self.rules.to_move(self.state))} to move.")

    def move(self, token: str, move: Any, now: float) -> None:
        self._open()
        seat = self._seated(token)
        if self.status == LOBBY:
            raise RoomError("The game hasn't started yet.")
        if self.status == OVER:
            raise RoomError("This round is over; press Rematch to play again.")
        try:
            self.state = self.rules.apply(self.state, seat, move)
        except IllegalMove as e:
            raise RoomError(str(e)) from None
        self.moves.append([seat, move])
        self._after_move(seat, now)

    def _after_move(self, seat: int, now: float) -> None:
        res = self.rules.result(self.state)
        if res is not None:
            self._finish(res.winner, res.reason, now)
            return
        self._arm_timer(now)
        self._changed(
            now, f"{self._name(seat)} moved; {self._name(self.rules.to_move(self.state))} to move."
        )

    def _finish(self, winner: int | None, reason: str, now: float) -> None:
        self.status = OVER
        self.turn_deadline = None
        self.result = {"winner": winner, "reason": reason}
        text = "Draw: " + reason if winner is None else f"{self._name(winner)} wins: {reason}"
        self._changed(now, text + ".")

    def _arm_timer(self, now: float) -> None:
        self.turn_deadline = now + self.options.turn_seconds if self.options.turn_seconds else None

    def leave(self, token: str, now: float) -> None:
        seat = self._seated(token)
        name = self._name(seat)
        if self.status == PLAYING:
            self.seats[seat] = None
            self._finish(1 - seat if self.rules.seats == 2 else None, f"{name} left the game", now)
            return
        self.seats[seat] = None
        self._changed(now, f"{name} left.")

    def rematch(self, token: str, now: float) -> None:
        """Play again with the same code: a fresh board, and the other seat moves first."""
        self._open()
        self._seated(token)
        if self.status != OVER:
            raise RoomError("You can ask for a rematch once the round is over.")
        self.round += 1
        self.seed += 1
        self.seats = self.seats[1:] + self.seats[:1]
        self.state = self.rules.initial(self.seed)
        self.moves = []
        self.result = None
        self.turn_deadline = None
        if all(self.seats):
            self.status = PLAYING
            self._arm_timer(now)
            self._changed(now, f"Rematch! {self._name(0)} to move.")
        else:
            self.status = LOBBY
            self._changed(now, "Rematch: waiting for players.")

    # -- time -------------------------------------------------------------------

    def next_wakeup(self, bot_delay: float) -> float | None:
        """When :meth:`tick` has something to do next (a timer, a bot's turn, the idle timeout)."""
        if self.status == CLOSED:
            return None
        times = [self.last_active + self.options.idle_seconds]
        if self.status == PLAYING:
            if self.turn_deadline is not None:
                times.append(self.turn_deadline)
            seat = self.rules.to_move(self.state)
            if seat is not None and (self.seats[seat] or {}).get("bot"):
                times.append(self.last_active + bot_delay)
        return min(times)

    def tick(self, now: float, bot_delay: float = 0.4) -> bool:
        """Run what is due at ``now``: bots, turn timers, the idle timeout. True if changed."""
        if self.status == CLOSED:
            return False
        if now >= self.last_active + self.options.idle_seconds:
            self.status = CLOSED
            self.turn_deadline = None
            self._changed(now, "This game was closed after being idle.")
            return True
        if self.status != PLAYING:
            return False
        seat = self.rules.to_move(self.state)
        if seat is None:
            return False
        who = self.seats[seat] or {}
        if who.get("bot") and now >= self.last_active + bot_delay:
            self._auto_move(seat, now)
            return True
        if self.turn_deadline is not None and now >= self.turn_deadline:
            if self.options.on_timeout == "auto":
                self._auto_move(seat, now, timed_out=True)
            else:
                self._finish(1 - seat, f"{self._name(seat)} ran out of time", now)
            return True
        return False

    def _auto_move(self, seat: int, now: float, timed_out: bool = False) -> None:
        rng = random.Random(f"{self.seed}:{len(self.moves)}")
        move = rng.choice(self.rules.legal_moves(self.state))
        self.state = self.rules.apply(self.state, seat, move)
        self.moves.append([seat, move])
        self._after_move(seat, now)
        if timed_out and self.status == PLAYING:
            self.message = (
                f"{self._name(seat)} ran out of time; a random move was played. " + self.message
            )

    # -- what a page shows --------------------------------------------------------

    def view(self, token: str | None) -> dict[str, Any]:
        """Everything a page (or a bot) may know, for the holder of ``token``."""
        seat = self.seat_of(token)
        rules = self.rules
        to_move = rules.to_move(self.state) if self.status == PLAYING else None
        your_turn = seat is not None and to_move == seat
        return {
            "code": self.code,
            "game": self.game,
            "title": rules.title,
            "status": self.status,
            "round": self.round,
            "version": self.version,
            "message": self.message,
            "seats": [
                {
                    "seat": i,
                    "name": s["name"] if s else None,
                    "bot": bool(s and s.get("bot")),
                    "you": seat == i,
                }
                for i, s in enumerate(self.seats)
            ],
            "you": seat,
            "to_move": to_move,
            # Before the first move: who moves first, and what each seat plays with.
            "first": rules.to_move(self.state) if self.status == LOBBY else None,
            "pieces": list(rules.pieces) if rules.pieces else None,
            "your_turn": your_turn,
            "legal": rules.legal_moves(self.state) if your_turn else [],
            "result": self.result,
            "turn_deadline": self.turn_deadline,
            "options": vars(self.options).copy(),
            "moves": len(self.moves),
            "board": rules.view(self.state, seat),
        }
