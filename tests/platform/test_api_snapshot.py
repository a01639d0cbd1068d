"""State.snapshot (what the API lists machines and apps with): live keys only, and no hang on no match."""

from __future__ import annotations

import asyncio

import pytest

from taxiway.platform import schema

pytestmark = pytest.mark.anyio


async def test_snapshot_lists_live_keys_and_returns_on_no_match(state):
    assert await asyncio.wait_for(state.snapshot(schema.MACHINES, "x.*"), 10) == []  # empty bucket
    await state.put(schema.MACHINES, "a.1", {"v": 1})
    await state.put(schema.MACHINES, "a.2", {"v": 2})
    await state.put(schema.MACHINES, "a.1", {"v": 3})
    await state.delete(schema.MACHINES, "a.2")
    assert await asyncio.wait_for(state.snapshot(schema.MACHINES, "x.*"), 10) == []  # a bucket with other keys
    got = await asyncio.wait_for(state.snapshot(schema.MACHINES, "a.*"), 10)
    assert [(k, v) for k, v, _ in got] == [("a.1", {"v": 3})]
    assert got[0][2] == (await state.get(schema.MACHINES, "a.1"))[1]
