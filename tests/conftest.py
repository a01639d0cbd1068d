"""Fixtures shared by every part's tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers.servers import docker_registry, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture
def taxiway_home(tmp_path, monkeypatch) -> Path:
    """A fresh $TAXIWAY_HOME (and config dir) for one test."""
    home = tmp_path / "taxiway-home"
    home.mkdir()
    monkeypatch.setenv("TAXIWAY_HOME", str(home))
    monkeypatch.setenv("TAXIWAY_CONFIG", str(tmp_path / "taxiway-config"))
    return home


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real docker-registry on 127.0.0.1 for the whole session."""
    with docker_registry(tmp_path_factory.mktemp("docker-registry")) as s:
        yield s


def run_taxiway(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
                check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``taxiway`` CLI in a subprocess (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "taxiway", *args],
        env={**os.environ, **(env or {})}, input=input, capture_output=True, timeout=timeout, check=check,
    )


@pytest.fixture
def taxiway():
    """``taxiway(*args)`` runs the CLI and returns the CompletedProcess."""
    return run_taxiway


_HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")


def _device_ids() -> dict[str, tuple[int, int] | None]:
    import stat

    out: dict[str, tuple[int, int] | None] = {}
    for path in _HOST_DEVICES:
        try:
            st = os.lstat(path)
        except OSError:
            out[path] = None
            continue
        out[path] = (st.st_rdev, st.st_ino) if stat.S_ISCHR(st.st_mode) else None
    return out


@pytest.fixture(autouse=True)
def _host_devices_untouched():
    """No test may remove or replace the host's /dev/null (and its siblings).

    A test once left /dev/null a regular file, which later machines read as stdin.
    Checked around every test, so the one that does it is named.
    """
    before = _device_ids()
    yield
    after = _device_ids()
    changed = [p for p in _HOST_DEVICES if before[p] != after[p]]
    assert not changed, f"this test removed or replaced the host's {', '.join(changed)}"


# Long end-to-end files: real Datasette apps in machines, builds of every example, micro-VMs under
# TCG, 200-cycle leak checks, the platform from `taxiway up` to deploys. `make test` (the full suite,
# on the default Python) runs them; `make test-fast` / `make test-python` (the second interpreter in
# CI) leave them out so that CI's two runs fit its 45-minute budget. Each part keeps unit and
# integration tests in the fast set, so every part is exercised on both interpreters.
SLOW_FILES = frozenset({
    "builder/test_build.py", "builder/test_examples.py",
    "machines/test_cycles.py", "machines/test_vm.py", "machines/test_vm_hostile.py", "machines/test_vm_parity.py",
    "platform/test_deploy.py", "platform/test_deploy_cli.py", "platform/test_deploy_e2e.py",
    "platform/test_deploy_failures.py", "platform/test_up.py", "platform/test_app_destroy.py",
    "publish/test_publish.py", "publish/test_hostile.py",
    "egress/test_clients.py", "registry/test_clients.py", "platform/test_network_vm.py",
    # the private network, DNS, egress and TLS edge with real machines and servers (issue 17, 18)
    "platform/test_network_matrix.py", "platform/test_dns_fabric.py", "platform/test_egress_fabric.py",
    "platform/test_dns_up.py", "platform/test_edge_tls.py", "platform/test_edge_tls_api.py",
    "platform/test_volumes.py", "platform/test_bad_input_cli.py", "platform/test_fabric.py",
    "platform/test_egress_platform.py", "platform/test_dns_server.py", "platform/test_nats_auth.py",
    "platform/test_edge_scale.py", "platform/test_deploy_rollback.py", "platform/test_checks_agent.py",
})


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        try:
            rel = Path(str(item.fspath)).resolve().relative_to(here).as_posix()
        except ValueError:
            continue
        if rel in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _no_private_network_left(tmp_path_factory):
    """The platform's network namespace files (private network fabric, machines' netns) that a test's
    home still holds at the end are released, so a failed test leaves no namespace behind."""
    yield
    from taxiway.platform import fabric

    fabric.release_all(tmp_path_factory.getbasetemp())
