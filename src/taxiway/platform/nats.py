"""Run a loopback nats-server with JetStream, its store under a directory we own.

Debian's ``nats-server`` package is the one state and message engine of the
platform (DESIGN.md): this module only starts, finds and stops it. Nothing here
speaks the protocol; :mod:`taxiway.platform.state` does, through nats-py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from taxiway.errors import TaxiwayError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class NatsServer:
    """One nats-server process: ``start()``, ``url``, ``stop()``; also a context manager.

    The store (``<dir>/jetstream``), config and log live under ``dir`` (mode 0700).
    ``port=None`` picks a free loopback port.
    """

    def __init__(self, dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 name: str = "taxiway") -> None:
        self.dir = Path(dir)
        self.host = host
        self.port = port
        self.name = name
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _config(self) -> str:
        store = self.dir / "jetstream"
        # JSON is valid nats-server config syntax, and quoting paths this way is safe.
        import json

        return "\n".join([
            f"server_name: {json.dumps(self.name)}",
            f"listen: {json.dumps(f'{self.host}:{self.port}')}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(store))}",
            "  max_memory_store: 256MB",
            "  max_file_store: 8GB",
            "}",
            "max_payload: 8MB",
            "",
        ])

    def start(self, timeout: float = 15.0) -> NatsServer:
        exe = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
        if not exe:
            raise TaxiwayError("nats-server is not installed", "install it: apt-get install nats-server")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        if self.port is None:
            self.port = free_port(self.host)
        conf = self.dir / "nats.conf"
        from taxiway.fsutil import atomic_write

        with atomic_write(conf, binary=False, fsync=False) as f:  # written anew at each start: no fsync
            f.write(self._config())
        log = open(self.dir / "nats.log", "ab")
        try:
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not _listening(self.host, self.port):
            if self.proc.poll() is not None:
                tail = (self.dir / "nats.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise TaxiwayError(f"nats-server exited at start ({tail[0] if tail else 'no log'})",
                                   f"see {self.dir / 'nats.log'}; is port {self.port} free?")
            if time.monotonic() > deadline:
                self.stop()
                raise TaxiwayError(f"nats-server did not listen on {self.host}:{self.port} within {timeout:.0f} s",
                                   f"see {self.dir / 'nats.log'}")
            time.sleep(0.02)
        (self.dir / "nats.pid").write_text(str(self.proc.pid))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (nats-server flushes JetStream and exits), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "nats.pid").unlink()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of recovery)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
