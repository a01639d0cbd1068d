"""Run a loopback nats-server with JetStream, its store under a directory we own.

Debian's ``nats-server`` package is the one state and message engine of the
platform (DESIGN.md): this module only starts, finds and stops it. Nothing here
speaks the protocol; :mod:`taxiway.platform.state` does, through nats-py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from taxiway.errors import TaxiwayError

# One NATS user per component, so a leaked edge credential cannot write state or run
# commands (the attack in the red team's C1: an open nats-server let any local user
# forge tokens and exec in machines). "admin" = the supervisor and tests.
USERS = ("admin", "api", "agent", "edge", "egress", "dns")

# Subjects each restricted user may never publish to. nats-py reads KV through
# $JS.API.DIRECT.GET / STREAM.MSG.GET and writes through $KV.<bucket>.<key>.
# (stream CREATE/UPDATE stay allowed: every State.connect makes the buckets if missing, idempotently)
_NO_ADMIN_JS = ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>"]


def _no_read(bucket: str) -> list[str]:
    """The JetStream API subjects that read KV ``bucket`` (direct get, message get, consumers)."""
    s = f"KV_{bucket}"
    return [f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>", f"$JS.API.STREAM.MSG.GET.{s}",
            f"$JS.API.CONSUMER.*.{s}", f"$JS.API.CONSUMER.*.{s}.>", f"$JS.API.CONSUMER.*.*.{s}.>"]


# The agent verbs the edge may request: it starts a stopped machine for a request and stops idle ones.
EDGE_AGENT_VERBS = ("start", "stop")


def deny_publish() -> dict[str, list[str]]:
    """Subjects each restricted user may never publish to (KV writes go to $KV.<bucket>.<key>)."""
    from taxiway.platform import schema

    return {
        # the edge only reads buckets and answers edge.*: no KV writes, no events/logs, no stream
        # admin, no token records or secrets at all; of the agent commands only start and stop
        # (scale to zero: auto_start/auto_stop_machines), never create, exec, destroy...
        "edge": ["$KV.>", "agent.*", "agent.*.*.>",
                 *(f"agent.*.{v}" for v in schema.AGENT_VERBS if v not in EDGE_AGENT_VERBS),
                 "events.>", "logs.>", *_NO_ADMIN_JS, *_no_read(schema.TOKENS), *_no_read(schema.SECRETS)],
        # the agent writes STATUS, events and logs; never tokens, orgs or apps, and reads no tokens
        "agent": [f"$KV.{schema.TOKENS}.>", f"$KV.{schema.ORGS}.>", f"$KV.{schema.APPS}.>", *_NO_ADMIN_JS,
                  *_no_read(schema.TOKENS)],
        # the egress proxy (egressd) reads STATUS and RELEASES and writes denial lines into the
        # apps' logs: no KV writes, no agent commands or events, no stream admin, no tokens or secrets
        "egress": ["$KV.>", "agent.>", "events.>", *_NO_ADMIN_JS,
                   *_no_read(schema.TOKENS), *_no_read(schema.SECRETS)],
        # the DNS server only reads apps, machines, status, org networks and releases (an app's
        # [egress] decides which names it may forward): it publishes nothing but its reads, and
        # reads no tokens, secrets, deploys or leases
        "dns": ["$KV.>", "agent.>", "events.>", "logs.>", "edge.>", *_NO_ADMIN_JS,
                *(r for b in (schema.TOKENS, schema.SECRETS, schema.DEPLOYS, schema.LEASES)
                  for r in _no_read(b))],
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def deny_subscribe() -> dict[str, list[str]]:
    """Subjects each restricted user may never subscribe to: agent commands (an edge that
    subscribed to agent.> would receive every exec's command, and could answer it) and the
    live writes of the token records."""
    from taxiway.platform import schema

    return {
        "edge": ["agent.>", f"$KV.{schema.TOKENS}.>", f"$KV.{schema.SECRETS}.>"],
        "agent": [f"$KV.{schema.TOKENS}.>"],
        "egress": ["agent.>", f"$KV.{schema.TOKENS}.>", f"$KV.{schema.SECRETS}.>"],
        # DNS: no commands, no drain requests, no live logs or events, no raw KV writes (its
        # watches get their values through consumers on its own inbox)
        "dns": ["agent.>", "edge.>", "logs.>", "events.>", "$KV.>"],
    }


def _pdeathsig() -> None:
    """In the child: SIGTERM when the parent dies, even by kill -9 (Linux prctl PR_SET_PDEATHSIG).

    SIGTERM, not SIGKILL: nats-server then flushes JetStream and exits cleanly.
    """
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class NatsServer:
    """One nats-server process: ``start()``, ``url``, ``stop()``; also a context manager.

    The store (``<dir>/jetstream``), config and log live under ``dir`` (mode 0700).
    ``port=None`` picks a free loopback port. Clients must authenticate: one password
    per user of :data:`USERS`, made at the first start and kept in ``<dir>/auth.json``
    (0600); ``url`` carries the admin's, :meth:`url_for` another user's, ``address``
    none (for logs, argv and up.json). ``pdeathsig``: the server gets SIGTERM (a clean
    JetStream flush) when the process that started it dies, even by kill -9.
    """

    def __init__(self, dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 name: str = "taxiway", pdeathsig: bool = False) -> None:
        self.dir = Path(dir)
        self.host = host
        self.port = port
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.pdeathsig = pdeathsig
        self._users: dict[str, str] | None = None

    @property
    def address(self) -> str:
        """The URL without credentials (safe to log, to put in argv or up.json)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL with the admin's credentials (full access: supervisor, tests)."""
        return self.url_for("admin")

    def url_for(self, user: str) -> str:
        """The URL with ``user``'s credentials in its userinfo (nats-py reads them from there)."""
        return f"nats://{user}:{self.users()[user]}@{self.host}:{self.port}"

    def users(self) -> dict[str, str]:
        """{user: password}, made once (0600 file) and reused by every later start."""
        if self._users is not None:
            return self._users
        path = self.dir / "auth.json"
        try:
            users = json.loads(path.read_text())
        except FileNotFoundError:
            users = {}
        except ValueError:
            raise TaxiwayError(f"{path} is not valid JSON", "delete it; the next start makes new credentials") from None
        if not all(isinstance(users.get(u), str) and users.get(u) for u in USERS):
            users = {u: users.get(u) or secrets.token_hex(24) for u in USERS}
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            from taxiway.fsutil import atomic_write

            with atomic_write(path, mode=0o600, binary=False) as f:
                f.write(json.dumps(users, indent=1))
        os.chmod(path, 0o600)
        self._users = users
        return users

    def _config(self) -> str:
        store = self.dir / "jetstream"
        # JSON is valid nats-server config syntax, and quoting paths and passwords this way is safe.
        users = []
        deny, deny_sub = deny_publish(), deny_subscribe()
        for user, password in self.users().items():
            entry: dict = {"user": user, "password": password}
            if user in deny:
                entry["permissions"] = {"publish": {"deny": deny[user]}, "subscribe": {"deny": deny_sub[user]}}
            users.append(entry)
        return "\n".join([
            "authorization {",
            f"  users: {json.dumps(users)}",
            "}",
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

        # 0600: it holds every user's password; written anew at each start: no fsync
        with atomic_write(conf, mode=0o600, binary=False, fsync=False) as f:
            f.write(self._config())
        os.chmod(conf, 0o600)
        log = open(self.dir / "nats.log", "ab")
        try:
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_pdeathsig if self.pdeathsig else None)
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
