"""Two gamehall nodes and a real redis-server on loopback: a game created on node A
is played from node B, then A is killed mid-game and B carries on with no move lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
import websockets
from gamehall_testing import Player, gamehall_node, redis_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path):
    with redis_server(tmp_path) as url:
        common = ["--redis", url, "--owner-ttl", "3", "--bot-delay", "0.1"]
        with (
            gamehall_node(tmp_path, *common, "--node-id", "a") as a,
            gamehall_node(tmp_path, *common, "--node-id", "b") as b,
        ):
            yield a, b, url


def test_game_created_on_a_is_played_from_b_and_survives_a_dying(cluster):
    node_a, node_b, redis_url = cluster

    async def main():
        code = node_a.create("connect4")
        assert node_a.post("/api/games", {"game": "connect4"})[1]["code"] != code
        ann = await Player(node_a, code).connect()  # Ann's page is on A, the owner
        bob = await Player(node_b, code).connect()  # Bob's page is on B
        assert (await bob.do("join", name="Bob"))["seat"] == 0
        assert (await ann.do("join", name="Ann"))["seat"] == 1
        await bob.do("start")
        played = []
        for col in [4, 4, 5, 5, 3]:
            player = bob if len(played) % 2 == 0 else ann
            other = ann if player is bob else bob
            assert await player.do("move", move=col) == {"ok": True}
            played.append([len(played) % 2, col])
            # Every page sees every move, on both nodes.
            n = len(played)
            await other.view_where(lambda v, n=n: v["moves"] == n)
        assert node_b.game(code)["move_list"] == played
        assert node_a.get("/healthz")[1].count('"games":') == 1

        # Node A, which owns the game, dies mid-game.
        node_a.kill()
        t0 = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await ann.until(lambda m: False, timeout=5)
        # Ann's page reconnects, to B this time, and keeps her seat.
        await ann.connect(node_b)
        v = await ann.view_where(lambda v: True)
        assert v["you"] == 1 and v["moves"] == len(played) and v["your_turn"]
        # Her move goes through B, which takes the game over from Redis.
        assert await ann.do("move", move=3) == {"ok": True}
        played.append([1, 3])
        took_over = time.monotonic() - t0
        await bob.view_where(lambda v: v["moves"] == len(played))
        for col in [2]:
            player = bob if len(played) % 2 == 0 else ann
            assert await player.do("move", move=col) == {"ok": True}
            played.append([len(played) % 2, col])
        v = await bob.view_where(lambda v: v["status"] == "over")
        assert v["result"] == {"winner": 0, "reason": "four in a line"}
        game = node_b.game(code)
        assert game["move_list"] == played
        # The move log in Redis holds every move exactly once, in order.
        logged = [m for entry in game["log"] for m in entry["moves"]]
        assert logged == played
        assert took_over < 10
        for p in (ann, bob):
            await p.ws.close()

    asyncio.run(main())
    assert json.loads(node_b.get("/healthz")[1])["node"] == "b"


def test_timers_keep_running_after_the_owner_dies(cluster):
    node_a, node_b, _ = cluster

    async def main():
        code = node_a.create("tictactoe", turn_seconds=2)
        ann = await Player(node_b, code).connect()
        await ann.do("join", name="Ann")
        await ann.do("bot")  # the bot seat is run by the owner, A
        await ann.do("start")
        await ann.do("move", move=5)
        await ann.view_where(lambda v: v["your_turn"] and v["moves"] == 2)
        node_a.kill()
        # Nobody sends a command: B notices the game has no owner, adopts it, and
        # its turn timer still ends the game.
        v = await ann.view_where(lambda v: v["status"] == "over", timeout=15)
        assert "Ann ran out of time" in v["message"]
        await ann.ws.close()

    asyncio.run(main())


def test_commands_forwarded_without_a_page_on_the_sending_node(cluster):
    """B has no page of the game: the owner A answers B's forwarded commands with a message
    to B (not inside the published change, which B does not listen to)."""
    node_a, node_b, _ = cluster
    code = node_a.create("tictactoe")
    status, reply = node_b.post(
        f"/api/games/{code}/commands", {"token": "t1", "action": "join", "name": "Ann"}
    )
    assert (status, reply) == (200, {"ok": True, "seat": 0})
    status, reply = node_b.post(f"/api/games/{code}/commands", {"token": "t1", "action": "bot"})
    assert status == 200 and reply["seat"] == 1
    assert node_b.post(f"/api/games/{code}/commands", {"token": "t1", "action": "start"}) == (
        200,
        {"ok": True},
    )
    assert node_b.post(f"/api/games/{code}/commands", {"token": "t2", "action": "start"})[0] == 409
    assert node_b.post(
        f"/api/games/{code}/commands", {"token": "t1", "action": "move", "move": 5}
    ) == (
        200,
        {"ok": True},
    )
    assert node_b.game(code)["move_list"][0] == [0, 5]


def test_a_node_that_lost_a_game_follows_its_new_owner(tmp_path):
    """The owner is not sent its own changes back through Redis, so when its ownership
    lapses (a stalled node) and another node runs the game, it must notice, stop its
    actor, and show its pages the new owner's changes from then on."""
    import redis as sync_redis

    from gamehall.backends import RedisBackend
    from gamehall.hall import Hall

    with redis_server(tmp_path) as url:

        async def main():
            a = Hall(RedisBackend(url, "a", owner_ttl=1))
            b = Hall(RedisBackend(url, "b", owner_ttl=1))
            await a.start()
            await b.start()
            try:
                code = await a.create("tictactoe")
                page_a = await a.watch(code, "t1")
                page_b = await b.watch(code, "t2")
                assert not a.backend.listening(code) and b.backend.listening(code)
                assert (await b.command(code, {"action": "join", "token": "t1", "name": "A"}))["ok"]
                assert (await b.command(code, {"action": "join", "token": "t2", "name": "B"}))["ok"]
                await b.command(code, {"action": "start", "token": "t1"})
                assert await b.command(code, {"action": "move", "token": "t1", "move": 1}) == {
                    "ok": True
                }
                assert page_a.room.moves == [[0, 1]]
                # A stalls: its ownership lapses and B takes the game.
                sync_redis.Redis.from_url(url).delete(f"gh:owner:{code}")
                assert await b._take(code)
                await asyncio.sleep(0.2)  # B stops listening to the game it now runs
                assert code in b.actors and not b.backend.listening(code)
                assert await b.command(code, {"action": "move", "token": "t2", "move": 5}) == {
                    "ok": True
                }
                # A's next renewal finds the game is not its own, stops its actor, and
                # its page catches up and follows B.
                for _ in range(50):
                    if page_a.room.moves == [[0, 1], [1, 5]]:
                        break
                    await asyncio.sleep(0.1)
                assert page_a.room.moves == [[0, 1], [1, 5]]
                assert code not in a.actors and a.backend.listening(code)
                assert await a.command(code, {"action": "move", "token": "t1", "move": 9}) == {
                    "ok": True
                }
                assert page_a.room.moves[-1] == [0, 9] and page_b.room.moves[-1] == [0, 9]
            finally:
                await a.close()
                await b.close()

        asyncio.run(main())


def test_nodes_reconnect_after_redis_restarts(tmp_path):
    """The pipelined link and the pub/sub connection come back after Redis restarts:
    commands are forwarded and answered, and pages on the other node see the change."""
    from gamehall_testing import free_port

    from gamehall.backends import RedisBackend
    from gamehall.hall import Hall

    port = free_port()

    async def play(a, b):
        code = await a.create("tictactoe")
        page = await b.watch(code, "t1")
        reply = await b.command(code, {"action": "join", "token": "t1", "name": "Ann"})
        assert reply == {"ok": True, "seat": 0}
        for _ in range(50):
            if page.room.seats[0]:
                break
            await asyncio.sleep(0.05)
        assert page.room.seats[0]["name"] == "Ann"

    async def main():
        with redis_server(tmp_path, port) as url:
            a = Hall(RedisBackend(url, "a"))
            b = Hall(RedisBackend(url, "b"))
            await a.start()
            await b.start()
            await play(a, b)
        await asyncio.sleep(0.5)  # Redis is down: both nodes lost their connections
        try:
            with redis_server(tmp_path, port):
                await asyncio.sleep(1.5)  # the subscribers reconnect and listen again
                for h in (a, b):  # redis-py's pool fails once on a connection Redis closed
                    with contextlib.suppress(Exception):
                        await h.backend.redis.ping()
                await play(a, b)
        finally:
            for h in (a, b):
                with contextlib.suppress(Exception):
                    await h.close()

    asyncio.run(main())
