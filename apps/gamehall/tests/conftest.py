"""Fixtures for gamehall: real gamehall nodes (subprocesses on 127.0.0.1), a real
redis-server, and a small websocket client that speaks the JSON view protocol."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from gamehall_testing import REPO, Node, gamehall_node


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    """One single-node gamehall (in memory) shared by a test module."""
    with gamehall_node(tmp_path_factory.mktemp("gamehall"), "--bot-delay", "0.1") as n:
        yield n


@pytest.fixture
def artifacts() -> Path:
    path = Path(os.environ.get("TAXIWAY_ARTIFACTS", REPO / "artifacts")) / "gamehall"
    path.mkdir(parents=True, exist_ok=True)
    return path
