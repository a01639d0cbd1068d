"""Start real servers on 127.0.0.1 with a free port and stop them after.

Every fixture server goes through :func:`serve`, so none outlives its test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class Server:
    host: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def serve(argv: list[str], port: int, host: str = "127.0.0.1", log: Path | None = None,
          env: dict[str, str] | None = None, timeout: float = 30.0, cwd: str | None = None) -> Iterator[Server]:
    """Run ``argv`` (which must listen on host:port), yield a Server, then stop it."""
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"server-{port}.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd, start_new_session=True)
    try:
        try:
            wait_for_port(host, port, timeout, proc)
        except Exception as e:
            raise RuntimeError(f"{argv[0]} did not start: {e}\n{log.read_text(errors='replace')[-2000:]}") from e
        yield Server(host, port, proc, log)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def docker_registry(root: Path, port: int | None = None, delete: bool = True) -> Iterator[Server]:
    """Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, storing under ``root``."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"  delete:\n    enabled: {'true' if delete else 'false'}\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "  secret: taxiway-tests\n"
    )
    with serve([binary, "serve", str(cfg)], port, log=root / "registry.log") as s:
        yield s
