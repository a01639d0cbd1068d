"""Fixtures for the CA tests: a fresh CA per test (API) and helpers around openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def ca_dir(taxiway_home, tmp_path, monkeypatch) -> Path:
    """$TAXIWAY_CAROOT pointing at an empty directory (the CLI and the API both use it)."""
    d = tmp_path / "caroot"
    monkeypatch.setenv("TAXIWAY_CAROOT", str(d))
    return d


@pytest.fixture
def ca(ca_dir):
    """An initialized CA (ECDSA P-256, no name constraints)."""
    from taxiway.pki import CA

    the_ca, created = CA.init(ca_dir)
    assert created
    return the_ca


def openssl(*args: str, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the openssl CLI and capture its output as text."""
    return subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=timeout)


def verify(root: Path, chain: Path, *extra: str, purpose: str | None = "sslserver") -> subprocess.CompletedProcess:
    """``openssl verify -CAfile root -untrusted chain chain`` (the chain file carries the intermediate)."""
    args = ["verify", "-CAfile", str(root), "-untrusted", str(chain)]
    if purpose:
        args += ["-purpose", purpose]
    return openssl(*args, *extra, str(chain))
