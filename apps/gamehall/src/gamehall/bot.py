"""A bot player: joins a game over the websocket (JSON views) and plays random legal moves.

Used by ``gamehall bot``, the tests and the load benchmark.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import urllib.request
from typing import Any

import websockets


def http_json(url: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST ``data`` to) a gamehall JSON endpoint."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def ws_url(base: str, code: str, token: str) -> str:
    return base.replace("http://", "ws://", 1).rstrip("/") + f"/ws/{code}?format=json&token={token}"


class Bot:
    """One seat played at random; ``view`` is the newest view the server sent."""

    def __init__(
        self, base: str, code: str, name: str, seed: int | None = None, think: float = 0.06
    ) -> None:
        self.base, self.code, self.name = base, code, name
        self.token = secrets.token_urlsafe(12)
        self.rng = random.Random(seed)
        self.view: dict[str, Any] | None = None
        self.errors: list[str] = []
        self.think = think  # seconds before each move: the server rate-limits every socket

    async def play(
        self, start: bool = False, rounds: int = 1, timeout: float = 60
    ) -> dict[str, Any]:
        """Join, optionally start, and play until ``rounds`` rounds are over; returns the last view."""
        async with websockets.connect(
            ws_url(self.base, self.code, self.token), max_size=2**20
        ) as ws:
            await ws.send(json.dumps({"action": "join", "name": self.name}))
            acted = -1
            async with asyncio.timeout(timeout):
                async for raw in ws:
                    msg = json.loads(raw)
                    if "error" in msg:
                        self.errors.append(msg["error"])
                        acted = -1  # dropped or refused: act again on the newest view
                        await asyncio.sleep(0.25)
                        if self.view is None:
                            continue
                        msg = {"view": self.view}
                    v = msg.get("view")
                    if v is None:
                        continue
                    self.view = v
                    if v["status"] == "over" and v["round"] >= rounds:
                        return v
                    if v["status"] == "closed":
                        return v
                    if (
                        v["status"] == "lobby"
                        and start
                        and all(s["name"] for s in v["seats"])
                        and v["you"] is not None
                        and acted != v["version"]
                    ):
                        acted = v["version"]
                        await ws.send(json.dumps({"action": "start"}))
                    elif v["status"] == "over" and start and acted != v["version"]:
                        acted = v["version"]
                        await ws.send(json.dumps({"action": "rematch"}))
                    elif v["your_turn"] and v["legal"] and acted != v["version"]:
                        acted = v["version"]
                        if self.think:
                            await asyncio.sleep(self.think)
                        await ws.send(
                            json.dumps({"action": "move", "move": self.rng.choice(v["legal"])})
                        )
        return self.view or {}


async def play_pair(base: str, game: str = "tictactoe", rounds: int = 1) -> dict[str, Any]:
    """Create a game on ``base`` and let two bots play it; returns a short summary."""
    code = (await asyncio.to_thread(http_json, base.rstrip("/") + "/api/games", {"game": game}))[
        "code"
    ]
    a, b = Bot(base, code, "Bot A"), Bot(base, code, "Bot B")
    va, _ = await asyncio.gather(a.play(start=True, rounds=rounds), b.play(rounds=rounds))
    return {"code": code, "moves": va["moves"], "message": va["message"], "result": va["result"]}
