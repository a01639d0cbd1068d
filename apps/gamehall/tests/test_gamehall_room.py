"""The room's rules (seats, lifecycle, timers, idle timeout) as pure logic, no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gamehall import codes
from gamehall.room import CLOSED, LOBBY, OVER, PLAYING, Options, Room, RoomError


def new_room(game="tictactoe", **opts) -> Room:
    room = Room.new("BCDF", game, 1, Options(**opts), now=0.0)
    room.join("a", "Ann", 0.0)
    room.join("b", "Bob", 0.0)
    return room


def test_codes_are_four_unambiguous_letters():
    for _ in range(200):
        code = codes.new_code()
        assert len(code) == 4 and not set(code) & set("AEIOULQV0125")
    assert codes.normalize("  bcdf ") == "BCDF"
    assert codes.normalize("BCD") is None and codes.normalize("BCDI") is None
    assert codes.normalize("<b>x") is None


def test_lifecycle_and_snapshot_round_trip():
    room = new_room()
    assert room.status == LOBBY
    with pytest.raises(RoomError, match="not playing"):
        room.start("zed", 1.0)
    room.start("a", 1.0)
    assert room.status == PLAYING
    room.move("a", 4, 2.0)
    copy = Room.from_dict(json.loads(json.dumps(room.to_dict())))
    assert copy == room
    with pytest.raises(RoomError, match="rematch"):
        room.rematch("a", 3.0)


def test_timer_forfeit_auto_move_and_idle():
    room = new_room(turn_seconds=10)
    room.start("a", 0.0)
    assert room.next_wakeup(0.4) == 10.0
    assert not room.tick(9.9)
    assert room.tick(10.0) and room.status == OVER and room.result["winner"] == 1

    room = new_room(turn_seconds=10, on_timeout="auto")
    room.start("a", 0.0)
    assert room.tick(10.0) and room.status == PLAYING and len(room.moves) == 1
    assert room.turn_deadline == 20.0 and "random move" in room.message

    room = new_room(idle_seconds=60)
    assert room.next_wakeup(0.4) == 60.0
    assert room.tick(60.0) and room.status == CLOSED
    with pytest.raises(RoomError, match="closed"):
        room.join("c", "Cy", 61.0)


@settings(max_examples=40, deadline=None)
@given(game=st.sampled_from(["tictactoe", "connect4", "battleship"]), data=st.data())
def test_random_rooms_with_bots_and_timers_always_finish(game, data):
    """Random commands from random people never break a room; bots and timers finish games."""
    room = Room.new("BCDF", game, data.draw(st.integers(0, 1000)), Options(turn_seconds=5), now=0.0)
    now = 0.0
    people = ["a", "b", "c"]
    for _ in range(60):
        now += data.draw(st.floats(0, 3))
        who = data.draw(st.sampled_from(people))
        action = data.draw(
            st.sampled_from(["join", "bot", "start", "move", "leave", "rematch", "tick"])
        )
        before = room.to_dict()
        try:
            if action == "join":
                room.join(who, who.upper(), now)
            elif action == "bot":
                room.add_bot(who, now)
            elif action == "start":
                room.start(who, now)
            elif action == "move":
                room.move(who, data.draw(st.integers(-1, 40)), now)
            elif action == "leave":
                room.leave(who, now)
            elif action == "rematch":
                room.rematch(who, now)
            else:
                room.tick(now)
        except RoomError:
            assert room.to_dict() == before  # a refused command changes nothing
        assert room.status in (LOBBY, PLAYING, OVER, CLOSED)
        assert (room.result is not None) == (room.status == OVER)
        json.dumps(room.to_dict())
        for token in [*people, None]:
            room.view(token)
    # Fill the seats with bots and let time run: every game ends with a result.
    if room.status == LOBBY:
        for i, s in enumerate(room.seats):
            if s is None:
                room.seats[i] = {"token": f"bot{i}", "name": f"Bot {i}", "bot": True}
        room.start(room.seats[0]["token"], now)
    while room.status == PLAYING:
        now += 5
        assert room.tick(now)
    assert room.status in (OVER, CLOSED)


@pytest.mark.parametrize("game", ["tictactoe", "connect4", "battleship"])
def test_every_board_renders_for_players_and_spectators_with_names_escaped(game):
    from gamehall import render

    room = Room.new("BCDF", game, 3, Options(), now=0.0)
    room.join("a", "<b>Ann</b>", 0.0)
    room.join("b", "Bob & <i>co</i>", 0.0)
    room.start("a", 0.0)
    for token in ("a", "b", None):
        html = render.room_fragment(Room.from_dict(room.to_dict()), token)
        assert "<b>" not in html and "<i>" not in html
        assert "&lt;b&gt;Ann&lt;/b&gt;" in html and "Bob &amp; &lt;i&gt;co&lt;/i&gt;" in html
        assert ('data-move="' in html) == (token == "a")
    page = render.game_page(room, "a")
    assert page.count('id="room"') == 1 and "<b>Ann" not in page


def test_code_problems_name_the_letters_allowed():
    letters = "B C D F G H J K M N P R S T W X Z"
    assert codes.problem("KXTO") == (
        f"“KXTO” is not a game code: the letter O is not used in codes. "
        f"Codes use only these letters: {letters}."
    )
    assert "the letters A, E are not used" in codes.problem("baek")
    assert "the characters 1, O are not used" in codes.problem("K1TO")
    assert codes.problem("KXT") == "“KXT” is not a game code: codes are 4 letters long (this has 3)."
    assert codes.problem("  ").startswith("Enter a game code: 4 letters")
    for _ in range(50):
        assert codes.normalize(codes.new_code().lower())  # every code it makes is valid


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_every_rejected_code_gets_a_reason(text):
    if codes.normalize(text) is None:
        reason = codes.problem(text)
        assert reason and "\n" not in reason


def test_the_lobby_lists_open_and_live_games_never_tokens_or_private_ones():
    from gamehall.lobby import FINISHED_SHOWN, lobby

    def snap(code, status, seats, last, listed=True):
        room = Room.new(code, "tictactoe", 1, Options(listed=listed), now=last)
        room.status = status
        room.seats = seats
        return room.to_dict()

    ann = {"token": "secret-a", "name": "Ann", "bot": False}
    bot = {"token": "secret-b", "name": "Bot 1", "bot": True}
    now = 10_000.0
    got = lobby(
        [
            snap("BBBB", "lobby", [ann, None], now - 5),
            snap("CCCC", "lobby", [ann, bot], now - 4),  # full, not started: not open
            snap("DDDD", "playing", [ann, bot], now - 3),
            snap("FFFF", "over", [ann, bot], now - FINISHED_SHOWN - 1),  # finished long ago
            snap("GGGG", "closed", [None, None], now),
            snap("HHHH", "lobby", [None, None], now - 1, listed=False),  # private
            snap("JJJJ", "lobby", [None, None], now - 1),
        ],
        now,
    )
    assert [g["code"] for g in got["open"]] == ["JJJJ", "BBBB"]  # newest first
    assert [g["code"] for g in got["live"]] == ["DDDD"]
    assert got["open"][1]["players"] == ["Ann"] and got["open"][1]["open_seats"] == 1
    assert got["live"][0]["players"] == ["Ann", "Bot 1 (bot)"]
    assert "secret" not in json.dumps(got)


def test_the_turn_banner_says_what_is_going_on_for_each_viewer():
    from gamehall.render import banner

    room = Room.new("BCDF", "connect4", 1, Options(), now=0.0)
    room.join("a", "Ann", 0.0)
    assert banner(room.view("a")) == (
        "lobby",
        "Waiting for an opponent: share the code or the link, or add a bot. "
        "You play red and move first.",
    )
    assert banner(room.view(None))[1] == "Waiting for players: enter your name to join, or watch."
    room.join("b", "Bob", 0.0)
    assert banner(room.view("b"))[1] == "Everyone is here: press Start. You play yellow; Ann moves first."
    room.start("a", 0.0)
    assert banner(room.view("a")) == ("mine", "Your turn: you play red")
    assert banner(room.view("b")) == ("theirs", "Waiting for Ann (red) to move")
    assert banner(room.view(None)) == ("theirs", "Ann (red) to move")
    for col in (1, 2, 1, 2, 1, 2, 1):
        room.move("a" if room.rules.to_move(room.state) == 0 else "b", col, 1.0)
    assert banner(room.view("a")) == ("won", "You won: four in a line")
    assert banner(room.view("b")) == ("lost", "You lost: Ann (red) won: four in a line")
    assert banner(room.view(None)) == ("over", "Ann (red) won: four in a line")
    ship = Room.new("BCDF", "battleship", 1, Options(), now=0.0)
    ship.join("a", "Ann", 0.0)
    ship.join("b", "Bob", 0.0)
    ship.start("a", 0.0)
    assert banner(ship.view("a")) == ("mine", "Your turn")  # no pieces in battleship
    assert banner(ship.view("b")) == ("theirs", "Waiting for Ann to move")
