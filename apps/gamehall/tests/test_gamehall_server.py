"""A real single gamehall node, driven over real websockets and HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import pytest
import websockets
from gamehall_testing import Player, gamehall_node

pytestmark = pytest.mark.timeout(120)


async def seated_pair(node, game="tictactoe", **opts):
    code = node.create(game, **opts)
    a, b = Player(node, code), Player(node, code)
    await a.connect()
    await b.connect()
    assert (await a.do("join", name="Ann"))["seat"] == 0
    assert (await b.do("join", name="Bob"))["seat"] == 1
    return code, a, b


def test_create_join_play_to_a_win_then_rematch(node):
    async def main():
        code, a, b = await seated_pair(node)
        assert re.fullmatch(r"[BCDFGHJKMNPRSTWXZ]{4}", code)
        assert "Wait until" not in str(await a.do("start"))
        await b.view_where(lambda v: v["status"] == "playing")
        for player, cell in [(a, 1), (b, 4), (a, 2), (b, 5)]:
            assert await player.do("move", move=cell) == {"ok": True}
        assert (await a.do("move", move=3)) == {"ok": True}
        v = await b.view_where(lambda v: v["status"] == "over")
        assert v["result"] == {"winner": 0, "reason": "three in a row"}
        assert v["message"] == "Ann wins: three in a row."
        assert node.game(code)["move_list"] == [[0, 1], [1, 4], [0, 2], [1, 5], [0, 3]]
        # Rematch with the same code: Bob now has seat 0 and moves first.
        assert await b.do("rematch") == {"ok": True}
        v = await a.view_where(lambda v: v["round"] == 2)
        assert v["status"] == "playing" and v["you"] == 1 and v["seats"][0]["name"] == "Bob"
        assert (await a.do("move", move=5))["error"] == "It is not your turn."
        assert await b.do("move", move=5) == {"ok": True}
        for p in (a, b):
            await p.ws.close()

    asyncio.run(main())


def test_illegal_and_out_of_turn_moves_are_refused(node):
    async def main():
        code, a, b = await seated_pair(node)
        assert (await a.do("move", move=0))["error"] == "The game hasn't started yet."
        await a.do("start")
        assert (await b.do("move", move=0))["error"] == "It is not your turn."
        await a.do("move", move=5)  # the centre: cells are 1 to 9, as the page numbers them
        assert (await b.do("move", move=5))["error"] == "Cell 5 is already taken."
        assert (await b.do("move", move=0))["error"] == (
            "There is no cell 0; cells are 1 to 9, row by row from the top left."
        )
        assert "no cell 42" in (await b.do("move", move=42))["error"]
        assert "must be a number" in (await b.do("move", move="<b>4</b>"))["error"]
        spectator = await Player(node, code).connect()
        assert "not playing" in (await spectator.do("move", move=1))["error"]
        assert node.game(code)["move_list"] == [[0, 5]]
        for p in (a, b, spectator):
            await p.ws.close()

    asyncio.run(main())


def test_full_game_leave_and_reconnect(node):
    async def main():
        code, a, b = await seated_pair(node)
        c = await Player(node, code).connect()
        assert "full" in (await c.do("join", name="Cy"))["error"]
        await a.do("start")
        await a.do("move", move=1)
        # Bob reloads the page: a new socket with the same token keeps the seat.
        await b.ws.close()
        b2 = await Player(node, code, token=b.token).connect()
        v = await b2.view_where(lambda v: True)
        assert v["you"] == 1 and v["your_turn"] and v["legal"] == list(range(2, 10))
        assert (await b2.do("join", name="Bob again"))["seat"] == 1  # joining again is a reconnect
        await b2.do("move", move=9)
        # Ann leaves mid-game: Bob wins, and the seat opens up.
        await a.do("leave")
        v = await b2.view_where(lambda v: v["status"] == "over")
        assert v["result"]["winner"] == 1 and "Ann left" in v["message"]
        assert v["seats"][0]["name"] is None
        for p in (a, b2, c):
            await p.ws.close()

    asyncio.run(main())


def test_spectators_and_other_games_see_only_their_game(node):
    async def main():
        code, a, b = await seated_pair(node, "connect4")
        other, x, y = await seated_pair(node)
        watcher = await Player(node, code).connect()
        await a.do("start")
        await a.do("move", move=4)
        v = await watcher.view_where(lambda v: v["moves"] == 1)
        assert v["you"] is None and v["legal"] == []
        assert v["board"]["rows"][-1][3]["colour"] == "red"
        assert node.game(other)["moves"] == 0 and node.game(other)["status"] == "lobby"
        for p in (a, b, x, y, watcher):
            await p.ws.close()

    asyncio.run(main())


def test_battleship_view_hides_the_other_fleet_over_the_wire(node):
    async def main():
        code, a, b = await seated_pair(node, "battleship")
        await a.do("start")
        va = await a.view_where(lambda v: v["status"] == "playing")
        theirs = va["board"]["seas"][1]["cells"]
        assert not any(c["ship"] for c in theirs)
        assert sum(c["ship"] for c in va["board"]["seas"][0]["cells"]) == 10
        public = node.game(code)
        assert not any(c["ship"] for sea in public["board"]["seas"] for c in sea["cells"])
        assert "ships" not in json.dumps(public)
        for p in (a, b):
            await p.ws.close()

    asyncio.run(main())


def test_bot_seat_plays_its_turns(node):
    async def main():
        code = node.create("tictactoe")
        a = await Player(node, code).connect()
        await a.do("join", name="Solo")
        await a.do("bot")
        await a.do("start")
        while True:
            v = await a.view_where(lambda v: v["your_turn"] or v["status"] == "over")
            if v["status"] == "over":
                break
            await a.do("move", move=v["legal"][0])
        assert v["seats"][1]["bot"] and v["result"] is not None
        await a.ws.close()

    asyncio.run(main())


def test_turn_timer_forfeit_and_auto_move_and_idle_timeout(node):
    async def main():
        code, a, b = await seated_pair(node, turn_seconds=1)
        await a.do("start")
        v = await b.view_where(lambda v: v["status"] == "over", timeout=5)
        assert v["result"]["winner"] == 1 and "Ann ran out of time" in v["message"]

        code2, c, d = await seated_pair(node, turn_seconds=1, on_timeout="auto")
        await c.do("start")
        v = await d.view_where(lambda v: v["moves"] >= 2, timeout=6)
        assert "random move" in v["message"] or v["moves"] >= 2

        code3 = node.create("tictactoe", idle_seconds=1)
        e = await Player(node, code3).connect()
        v = await e.view_where(lambda v: v["status"] == "closed", timeout=5)
        assert "idle" in v["message"]
        for p in (a, b, c, d, e):
            await p.ws.close()
        await asyncio.sleep(0.2)
        status, _ = node.get(f"/api/games/{code3}")
        assert status == 404

    asyncio.run(main())


def test_bad_input_gets_clear_messages_and_harms_no_one(node):
    async def main():
        code, a, b = await seated_pair(node)
        await a.do("start")
        # Malformed frames.
        await a.ws.send("{not json")
        assert "could not be read" in (await a.reply())["error"]
        await a.ws.send("[1, 2]")
        assert "JSON object" in (await a.reply())["error"]
        await a.send("dance")
        assert "Unknown action" in (await a.reply())["error"]
        # A big message gets a message; a huge frame closes only that socket.
        await a.send("move", move=1, pad="x" * 5000)
        assert "too large" in (await a.reply())["error"]
        rogue = await Player(node, code).connect()
        await rogue.ws.send("x" * 200_000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await rogue.until(lambda m: False)
        assert closed.value.rcvd.code == 1009
        # A flood from one socket is rate limited, then cut off.
        flood = await Player(node, code).connect()
        for _ in range(400):
            try:
                await flood.ws.send(json.dumps({"action": "move", "move": 2}))
            except websockets.ConnectionClosed:
                break
        msgs = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                msgs.append(json.loads(await asyncio.wait_for(flood.ws.recv(), 10)))
        assert any("too fast" in m.get("error", "") for m in msgs)
        assert closed.value.rcvd.code == 1008
        # The game itself is untouched and still plays.
        assert await a.do("move", move=1) == {"ok": True}
        assert node.game(code)["move_list"] == [[0, 1]]
        for p in (a, b):
            await p.ws.close()

    asyncio.run(main())


def test_unknown_and_malformed_codes(node):
    async def main():
        ws = await websockets.connect(f"ws://127.0.0.1:{node.port}/ws/ZZZZ?format=json")
        assert "no game with code ZZZZ" in json.loads(await ws.recv())["error"]
        await ws.close()
        ws = await websockets.connect(f"ws://127.0.0.1:{node.port}/ws/A%3Cb%3E")
        html = await ws.recv()
        assert "is not a game code" in html and "<b>" not in html and "&lt;b&gt;" in html
        await ws.close()

    asyncio.run(main())
    status, body = node.get("/g/ZZZZ")
    assert status == 404 and "There is no game with code ZZZZ" in body
    status, body = node.get("/join?code=%3Cscript%3E")
    assert status == 400 and "&lt;script&gt;" in body and "<script>" not in body.split("</main>")[0]
    status, body = node.get("/join?code=zzzz")
    assert status == 404 and "no game with code ZZZZ" in body
    status, body = node.get("/join?code=KXTO")  # O is not a code letter: say which are
    assert status == 400 and "the letter O is not used in codes" in body
    assert "Codes use only these letters: B C D F G H J K M N P R S T W X Z." in body
    status, body = node.get("/api/games/KXTO")
    assert status == 400 and "letter O" in json.loads(body)["error"]
    status, body = node.post("/api/games", {"game": "chess"})
    assert status == 400 and "Unknown game" in body["error"]


def test_html_pages_escape_names_and_render_live_fragments(node):
    async def main():
        code = node.create("tictactoe")
        page = await Player(node, code, html=True).connect()
        first = await page.until(lambda m: 'id="room"' in m)
        assert 'data-version="0"' in first and 'id="join-form"' in first
        await page.send("join", name="<script>x('y')</script>")
        frag = await page.until(lambda m: 'data-version="1"' in m)
        assert "&lt;script&gt;x(&#39;y&#39;)&lt;/script&gt;" in frag
        assert "<script>" not in frag
        other = await Player(node, code, html=True).connect()
        await other.send("join", name="   ")
        note = await other.until(lambda m: 'id="notice"' in m and "name" in m)
        assert "Enter a name of 1 to 24 characters." in note
        for p in (page, other):
            await p.ws.close()
        return code

    code = asyncio.run(main())
    status, body = node.get(f"/g/{code}")
    assert status == 200 and "&lt;script&gt;" in body and "x('y')</script>" not in body


def test_http_form_create_redirects_to_the_game_page(node):
    req = urllib.request.Request(
        node.url + "/new", data=b"game=connect4&turn_seconds=30&on_timeout=auto"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert re.search(r"/g/[A-Z]{4}$", r.url)
        body = r.read().decode()
    assert "Connect four" in body and 'aria-label="Drop a disc in column 1"' in body
    code = r.url.rsplit("/", 1)[1]
    v = node.game(code)
    assert v["options"]["turn_seconds"] == 30 and v["options"]["on_timeout"] == "auto"


def test_node_idle_timeout_applies_to_games_created_over_the_api(tmp_path):
    with gamehall_node(tmp_path, "--idle-seconds", "1") as short:
        code = short.create("tictactoe")
        assert short.game(code)["options"]["idle_seconds"] == 1

        async def main():
            watcher = await Player(short, code).connect()
            v = await watcher.view_where(lambda v: v["status"] == "closed", timeout=10)
            assert "idle" in v["message"]
            await watcher.ws.close()

        asyncio.run(main())


def test_creating_with_a_name_seats_you_and_private_games_stay_out_of_the_lobby(node):
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(node.url + "/new", data=b"game=tictactoe&name=Zed", timeout=10) as r:
        body = r.read().decode()
        code = r.url.rsplit("/", 1)[1]
    assert "Zed (you)" in body and "You play X and move first" in body
    assert [c.name for c in jar] == ["gh_token"]
    with opener.open(node.url + "/new", data=b"game=connect4&name=Zed&unlisted=1", timeout=10) as r:
        private = r.url.rsplit("/", 1)[1]
    status, body = node.post("/api/games", {"game": "battleship", "listed": False})
    assert status == 201
    lobby = json.loads(node.get("/api/lobby")[1])
    listed = [g["code"] for g in lobby["open"]]
    assert code in listed and private not in listed and body["code"] not in listed
    assert node.game(private)["options"]["listed"] is False
    # A bad name is refused before any game is made for it.
    req = urllib.request.Request(node.url + "/new", data=b"game=tictactoe&name=" + b"x" * 30)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "Enter a name of 1 to 24 characters." in e.value.read().decode()


def test_favicon_and_lobby_fragment(node):
    with urllib.request.urlopen(node.url + "/favicon.ico", timeout=10) as r:
        assert r.headers["content-type"] == "image/x-icon" and r.read(4) == b"\x00\x00\x01\x00"
    status, body = node.get("/lobby")
    assert status == 200 and body.startswith('<div id="lobby"')
