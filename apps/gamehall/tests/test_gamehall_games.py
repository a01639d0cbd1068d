"""The game rules: unit tests per game, and hypothesis playing random legal games to the end."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gamehall.games import GAMES, IllegalMove
from gamehall.games.battleship import FLEET, SIZE, Battleship
from gamehall.games.connect4 import ConnectFour
from gamehall.games.tictactoe import TicTacToe


def play(game, state, moves):
    seat = 0
    for m in moves:
        seat = game.to_move(state)
        state = game.apply(state, seat, m)
    return state


def test_tictactoe_row_wins():
    g = TicTacToe()
    s = play(g, g.initial(0), [1, 4, 2, 5, 3])
    assert g.result(s).winner == 0
    assert g.to_move(s) is None and g.legal_moves(s) == []
    assert [c["win"] for c in g.view(s, None)["cells"]][:3] == [True, True, True]


def test_tictactoe_draw_and_rejections():
    g = TicTacToe()
    s = g.initial(0)
    with pytest.raises(IllegalMove, match="not your turn"):
        g.apply(s, 1, 1)
    s = g.apply(s, 0, 5)  # the centre: cells are 1 to 9, as the page numbers them
    assert g.view(s, None)["cells"][4]["mark"] == "X"
    with pytest.raises(IllegalMove, match="^Cell 5 is already taken.$"):
        g.apply(s, 1, 5)
    for bad in (0, 10):
        with pytest.raises(IllegalMove, match=f"^There is no cell {bad}; cells are 1 to 9"):
            g.apply(s, 1, bad)
    with pytest.raises(IllegalMove, match="number"):
        g.apply(s, 1, "4")
    s = play(g, g.initial(0), [1, 2, 3, 5, 4, 6, 8, 7, 9])
    assert g.result(s).winner is None
    with pytest.raises(IllegalMove, match="over"):
        g.apply(s, 0, 1)


def test_connect4_vertical_and_diagonal_and_full_column():
    g = ConnectFour()
    s = play(g, g.initial(0), [4, 5, 4, 5, 4, 5, 4])
    assert g.result(s).winner == 0
    s = play(g, g.initial(0), [1, 2, 2, 3, 3, 4, 3, 4, 4, 7, 4])
    assert g.result(s).winner == 0 and g.result(s).reason == "four in a line"
    s = play(g, g.initial(0), [1, 1, 1, 1, 1, 1])
    assert 1 not in g.legal_moves(s) and g.legal_moves(s) == [2, 3, 4, 5, 6, 7]
    with pytest.raises(IllegalMove, match="^Column 1 is full.$"):
        g.apply(s, g.to_move(s), 1)
    with pytest.raises(IllegalMove, match="^There is no column 0; columns are 1 to 7"):
        g.apply(s, g.to_move(s), 0)


def test_battleship_hides_the_other_fleet():
    g = Battleship()
    s = g.initial(42)
    assert sorted(len(ship) for ship in s["ships"][0]) == sorted(FLEET)
    for seat in (0, 1):
        v = g.view(s, seat)
        mine, theirs = v["seas"][seat], v["seas"][1 - seat]
        assert sum(c["ship"] for c in mine["cells"]) == sum(FLEET)
        assert not any(c["ship"] for c in theirs["cells"])
    assert not any(c["ship"] for sea in g.view(s, None)["seas"] for c in sea["cells"])
    s = g.apply(s, 0, 8)
    with pytest.raises(IllegalMove, match="not your turn"):
        g.apply(s, 0, 9)
    s = g.apply(s, 1, 1)
    with pytest.raises(IllegalMove, match=r"^You already fired at cell 8 \(B2\).$"):
        g.apply(s, 0, 8)
    with pytest.raises(IllegalMove, match=r"^There is no cell 37; cells are 1 \(A1\) to 36 \(F6\)"):
        g.apply(s, 0, 37)
    assert [c["name"] for c in g.view(s, 0)["seas"][0]["cells"][:8:7]] == ["A1", "B2"]


def test_battleship_sinking_every_ship_wins():
    g = Battleship()
    s = g.initial(1)
    targets = [c + 1 for ship in s["ships"][1] for c in ship]
    misses = iter(range(1, SIZE * SIZE + 1))
    for cell in targets:
        s = g.apply(s, 0, cell)
        if g.result(s):
            break
        s = g.apply(s, 1, next(misses))
    assert g.result(s).winner == 0
    assert all(c["sunk"] for c in g.view(s, 0)["seas"][1]["cells"] if c["shot"] == "hit")


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(GAMES)), seed=st.integers(0, 2**31), data=st.data())
def test_random_legal_games_end_with_a_result(name, seed, data):
    game = GAMES[name]
    state = game.initial(seed)
    for _ in range(200):
        if game.result(state) is not None:
            break
        seat = game.to_move(state)
        legal = game.legal_moves(state)
        assert seat is not None and legal
        # An illegal move (someone else's turn, or a cell not on offer) never changes anything.
        before = json.dumps(state, sort_keys=True)
        with pytest.raises(IllegalMove):
            game.apply(state, 1 - seat, legal[0])
        bad = data.draw(
            st.integers(-3, 50).filter(lambda m, legal=legal: m not in legal), label="illegal"
        )
        with pytest.raises(IllegalMove):
            game.apply(state, seat, bad)
        assert json.dumps(state, sort_keys=True) == before
        move = data.draw(st.sampled_from(legal), label="move")
        state = game.apply(state, seat, move)
        json.loads(json.dumps(state))  # always storable
        for viewer in (0, 1, None):
            game.view(state, viewer)
    result = game.result(state)
    assert result is not None and result.winner in (0, 1, None)
    assert game.to_move(state) is None and game.legal_moves(state) == []
