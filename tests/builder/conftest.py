"""Fixtures for the builder's tests: one store with the stacks, podman on a private storage root."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.servers import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def run_taxiway(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taxiway", *args], env={**os.environ, **env},
                          capture_output=True, timeout=timeout)


class Builder:
    """Runs `taxiway` against one $TAXIWAY_HOME."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {"TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(home / "config")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        p = run_taxiway(*args, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"taxiway {' '.join(args)} failed ({p.returncode}):\n{p.stderr.decode()[-3000:]}")
        return p

    def store(self):
        from taxiway.oci.store import Store

        return Store(self.home / "store")

    def image(self, ref: str):
        return self.store().image(ref)


@pytest.fixture(scope="session")
def builder(tmp_path_factory) -> Builder:
    """A home with the stack images in its store (mmdebstrap on the first run; cached after)."""
    b = Builder(tmp_path_factory.mktemp("build-home"))
    b("stack", "create", timeout=1800)
    return b


@pytest.fixture
def fresh_builder(tmp_path) -> Builder:
    """An empty home of its own (stacks come from the machine-wide cache when a test needs them)."""
    return Builder(tmp_path / "home")


class Podman:
    """podman with its own --root/--runroot, so tests never touch the machine's containers."""

    def __init__(self, root: Path):
        self.root = root
        self.base = ["podman", "--root", str(root / "root"), "--runroot", str(root / "run"),
                     "--storage-driver", "overlay"]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([*self.base, *args], capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {p.stderr.decode()[-2000:]}")
        return p

    @contextlib.contextmanager
    def serve(self, image: str, *extra: str) -> Iterator[str]:
        """Run ``image`` with --network host and a free $PORT; yields its base URL once it answers."""
        port = free_port()
        name = f"taxiway-build-test-{port}"
        self("run", "-d", "--name", name, "--network", "host", "-e", f"PORT={port}", *extra, image)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, lambda: self("logs", name, check=False).stdout.decode()[-2000:]
                      + self("logs", name, check=False).stderr.decode()[-2000:])
            yield url
        finally:
            self("rm", "-f", "-t", "0", name, check=False)

    def close(self) -> None:
        self("rm", "-a", "-f", "-t", "0", check=False)
        self("rmi", "-a", "-f", check=False)
        self("system", "reset", "-f", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_http(url: str, logs=lambda: "", timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException as e:
            last = e
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout}s ({last}); logs:\n{logs()}")


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Iterator[Podman]:
    p = Podman(Path(tmp_path_factory.mktemp("podman")))
    try:
        yield p
    finally:
        p.close()


def oci_ref(builder: Builder, name: str) -> str:
    """``oci:STORE:REF`` for podman/skopeo (the store is a standard OCI layout)."""
    from taxiway.oci.store import normalize_name

    return f"oci:{builder.home / 'store'}:{normalize_name(name)}"


def copy_example(name: str, dest: Path) -> Path:
    shutil.copytree(EXAMPLES / name, dest)
    return dest


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
