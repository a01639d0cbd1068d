"""Fixtures shared by the platform's tests (issue #16): a real nats-server, a State, a home.

Async tests use anyio's pytest plugin (shipped with anyio, which httpx needs):
mark them ``@pytest.mark.anyio`` (or ``pytestmark = pytest.mark.anyio``) and
request ``state``; the backend is asyncio only (nats-py is asyncio).

Owners may append fixtures at the end of this file (see /tmp/platform-contract.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from taxiway.platform.nats import NatsServer
from taxiway.platform.state import State


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only."""
    return "asyncio"


@pytest.fixture
def platform_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh $TAXIWAY_HOME and $TAXIWAY_CONFIG under tmp; returns the home.

    The API URL and token variables are cleared so nothing from the caller's
    environment leaks into a test.
    """
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    config = tmp_path / "config"
    config.mkdir(mode=0o700)
    monkeypatch.setenv("TAXIWAY_HOME", str(home))
    monkeypatch.setenv("TAXIWAY_CONFIG", str(config))
    monkeypatch.delenv("TAXIWAY_API_URL", raising=False)
    monkeypatch.delenv("TAXIWAY_API_TOKEN", raising=False)
    yield home
    from taxiway.platform import fabric

    fabric.release_all(home)  # the private network's namespace files, if the test's agent made them


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free loopback port, its store under tmp; stopped after."""
    srv = NatsServer(tmp_path / "nats").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def state(nats_server: NatsServer) -> AsyncIterator[State]:
    """A State connected to ``nats_server`` with every bucket and stream created."""
    st = await State.connect(nats_server.url)
    try:
        yield st
    finally:
        await st.close()
