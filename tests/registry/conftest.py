"""Fixtures for the registry: taxiway's own registry server with two orgs, on loopback."""

from __future__ import annotations

import base64
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers.servers import Server, free_port, serve


def tx(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, text=True,
                          check=check, timeout=120)


@dataclass
class Registry:
    server: Server
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def address(self) -> str:
        return self.server.address

    def bearer(self, org: str, *scopes: str) -> str:
        """A bearer token for ``org`` from the token endpoint (the Docker token flow)."""
        basic = base64.b64encode(f"anyuser:{self.tokens[org]}".encode()).decode()
        r = httpx.get(f"{self.url}/v2/token", params=[("service", "taxiway")] + [("scope", s) for s in scopes],
                      headers={"Authorization": f"Basic {basic}"})
        r.raise_for_status()
        return r.json()["token"]

    def client(self, org: str, *names: str, actions: str = "pull,push,delete") -> httpx.Client:
        scopes = [f"repository:{n}:{actions}" for n in names] + ["registry:catalog:*"]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.bearer(org, *scopes)}"},
                            timeout=60)


def start_registry(root: Path, orgs=("acme", "other"), extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    toks = {}
    for org in orgs:
        tx("registry", "org", "create", org, "--root", str(root))
        toks[org] = tx("registry", "token", "create", "--org", org, "--root", str(root)).stdout.strip()
    port = free_port()
    cm = serve([sys.executable, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{port}",
                "--root", str(root), *extra], port, log=root.parent / f"registry-{port}.log", env=env)
    return cm, toks


@contextlib.contextmanager
def running(root: Path, orgs=("acme",), extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Iterator[Registry]:
    """A registry serving ``root`` with a push token per org, stopped on exit."""
    cm, toks = start_registry(root, orgs, extra, env)
    with cm as s:
        yield Registry(s, root, toks)


@pytest.fixture(scope="module")
def txreg(tmp_path_factory):
    """taxiway's registry with orgs ``acme`` and ``other`` (push tokens), for one test module."""
    with running(tmp_path_factory.mktemp("txreg") / "root", orgs=("acme", "other")) as reg:
        yield reg
