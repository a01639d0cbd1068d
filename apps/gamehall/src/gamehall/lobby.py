"""The hall's lobby: which games to list, from the stored snapshots of recent games (pure).

A game is listed unless its creator asked otherwise (``Options.listed``): games in
the lobby with a free seat are *open* (join), games being played or just finished
are *live* (watch). Closed games, and finished ones nobody touched for a while,
are left out.
"""

from __future__ import annotations

from typing import Any

from .games import GAMES

FINISHED_SHOWN = 600.0  # seconds a finished game stays listed (for a rematch to be watched)
LIMIT = 30  # games per list: the lobby is a page people read, not an index


def summary(snap: dict[str, Any]) -> dict[str, Any]:
    """What the lobby shows of one game; never a player's token."""
    seats = snap["seats"]
    return {
        "code": snap["code"],
        "game": snap["game"],
        "title": GAMES[snap["game"]].title if snap["game"] in GAMES else snap["game"],
        "status": snap["status"],
        "players": [s["name"] + (" (bot)" if s.get("bot") else "") for s in seats if s],
        "open_seats": sum(1 for s in seats if s is None),
        "moves": len(snap["moves"]),
        "round": snap["round"],
        "last_active": snap["last_active"],
    }


def lobby(snapshots: list[dict[str, Any]], now: float, limit: int = LIMIT) -> dict[str, Any]:
    """{"open": [...], "live": [...]}: newest first, at most ``limit`` each."""
    open_, live = [], []
    for snap in sorted(snapshots, key=lambda s: s["last_active"], reverse=True):
        if not snap.get("options", {}).get("listed", True) or snap["status"] == "closed":
            continue
        s = summary(snap)
        if snap["status"] == "lobby":
            if s["open_seats"] and len(open_) < limit:
                open_.append(s)
        elif snap["status"] == "playing" or now - snap["last_active"] < FINISHED_SHOWN:
            if len(live) < limit:
                live.append(s)
    return {"open": open_, "live": live}
