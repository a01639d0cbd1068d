"""``taxiway up`` / ``taxiway down``: start, watch and stop the platform's processes on loopback.

One supervisor process per $TAXIWAY_HOME holds ``platform/supervisor.lock``
(flock) for its whole life, so "is it running?" never trusts a pid file alone:
after a ``kill -9`` the lock is free and the next ``up`` cleans what the dead
supervisor left (the children recorded in up.json) and starts again.

Children, in order: nats-server (JetStream, store under platform/nats), the
registry, the egress proxy, the API, the host agent, the edge. A component
whose module is not installed yet is skipped with a warning. A child that dies
is restarted with a backoff. Stopping the platform never stops machines: they
run detached under their own supervisors and the agent adopts them at start.

Files (platform/): up.json (atomically replaced), logs/<component>.log,
supervisor.lock; $TAXIWAY_CONFIG/platform.json (0600) {"api_url", "token"}.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.errors import TaxiwayError
from taxiway.process import pid_alive

DEFAULT_PORTS = {"nats": 4223, "api": 4280, "registry": 4281, "egress": 4750, "edge": 8180, "dns": 4253,
                 "edge_https": 8443}
READY_TIMEOUT = 60.0
BACKOFF_MAX = 30.0


def platform_dir() -> Path:
    from taxiway.paths import home

    d = home() / "platform"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def up_json_path() -> Path:
    return platform_dir() / "up.json"


def read_up() -> dict[str, Any] | None:
    """up.json, or None if absent or unreadable."""
    try:
        return json.loads(up_json_path().read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    from taxiway.fsutil import atomic_write

    with atomic_write(path, mode=mode, binary=False) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a bind to it succeeds)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.3):
        return True
    return False


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- the lock ---------------------------------------------------------------------------------------

class Lock:
    """The supervisor's flock: held while a supervisor of this home runs."""

    def __init__(self) -> None:
        self.path = platform_dir() / "supervisor.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def running() -> dict[str, Any] | None:
    """up.json of the supervisor running for this home, or None if none runs."""
    lock = Lock()
    if lock.try_acquire():
        lock.release()
        return None
    return read_up() or {}


# -- children ------------------------------------------------------------------------------------------

def _pdeathsig() -> None:
    """In the child: get SIGTERM when the supervisor dies, even by kill -9 (Linux prctl)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    port: int | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 1.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self, logdir: Path) -> None:
        log = open(logdir / f"{self.name}.log", "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True,
                                         preexec_fn=_pdeathsig)
        finally:
            log.close()
        self.started_at = time.time()

    def stop(self, timeout: float = 15.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.proc = None


class Supervisor:
    """Starts the components, restarts those that die, stops them all on SIGTERM/SIGINT."""

    def __init__(self, free_ports: bool = False, edge_port: int | None = None,
                 https_port: int | None = None) -> None:
        self.dir = platform_dir()
        self.logdir = self.dir / "logs"
        self.logdir.mkdir(exist_ok=True, mode=0o700)
        self.free_ports = free_ports
        self.edge_port = edge_port
        self.https_port = https_port  # the edge's HTTPS listener (E1: platform.edgetls)
        self.edge_https: int | None = None
        self.nats: Any = None
        self.children: list[Child] = []
        self.skipped: list[str] = []
        self.stopping = False
        self.started_at = time.time()
        self.ca_dir: str | None = None

    # -- ports ------------------------------------------------------------------------------------------

    def _port(self, name: str) -> int:
        from taxiway.platform.nats import free_port

        if name == "edge" and self.edge_port:
            return self.edge_port
        if name == "edge_https" and self.https_port:
            return self.https_port
        # The default ports keep URLs stable across restarts; a taken one gives way to a free port.
        if not self.free_ports and port_free(DEFAULT_PORTS[name]):
            return DEFAULT_PORTS[name]
        return free_port()

    # -- start ------------------------------------------------------------------------------------------

    def start(self) -> None:
        from taxiway.platform.nats import NatsServer

        self._log("starting the platform")
        self.write_up(ready=False)  # so 'up' and 'status' meanwhile name this supervisor, not a stale one
        # pdeathsig: a kill -9'd supervisor takes nats-server along (SIGTERM: JetStream flushes)
        self.nats = NatsServer(self.dir / "nats", port=self._port("nats"), pdeathsig=True).start()
        self._bootstrap_ca()
        self._bootstrap_registry()
        self._private_network()
        py = sys.executable
        reg_root = str(self._registry_root())
        plan = [
            ("registry", "taxiway.cli.registry",
             lambda p: [py, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{p}", "--root", reg_root]),
            # the platform's egress proxy: machines' only way out, on [fdaa::3]:3128 in the private
            # network when there is one (the loopback port: readiness, /metrics, /healthz)
            ("egress", "taxiway.platform.egressd",
             lambda p: [py, "-m", "taxiway.platform.egressd", "--nats", self.nats.address, "--listen", f"127.0.0.1:{p}",
                        "--fabric", "auto"]),
            # .internal DNS for machines on [fdaa::3]:53 when the host has a fabric (loopback: readiness)
            ("dns", "taxiway.platform.dnsserver",
             lambda p: [py, "-m", "taxiway.platform.dnsserver", "--nats", self.nats.address,
                        "--listen", f"127.0.0.1:{p}", "--fabric", "auto"]),
            ("api", "taxiway.platform.api", None),
            ("agent", "taxiway.platform.agent", None),
            ("edge", "taxiway.platform.edge",
             lambda p: [py, "-m", "taxiway.platform.edge", "--nats", self.nats.address, "--listen", f"127.0.0.1:{p}",
                        *self._edge_tls_args()]),
        ]
        ports: dict[str, int] = {}
        for name, module, argv in plan:
            if not module_available(module):
                self.skipped.append(name)
                self._log(f"warning: {name} skipped: {module} is not installed")
                continue
            port = None if name == "agent" else self._port(name)
            if name == "api":
                args = [py, "-m", "taxiway.platform.api", "--nats", self.nats.address, "--listen", f"127.0.0.1:{port}",
                        "--registry-root", reg_root]
                if "registry" in ports:
                    args += ["--registry", f"127.0.0.1:{ports['registry']}"]
            elif name == "agent":
                args = [py, "-m", "taxiway.platform.agent", "--nats", self.nats.address]
            else:
                args = argv(port)
            child = Child(name, args, port)
            if name in ("api", "agent", "edge", "egress", "dns"):
                # NATS credentials through the environment, never argv (ps shows argv to every user)
                from taxiway.platform.state import NATS_URL_ENV

                child.env[NATS_URL_ENV] = self.nats.url_for(name)
            child.start(self.logdir)
            self.children.append(child)
            if port:
                ports[name] = port
                self._wait_port(child)
        self._bootstrap_token()
        self._agent_registry_auth()
        self._api_on_private_network(ports.get("api"))
        self.write_up(ready=True)
        self._log("platform ready: " + ", ".join(f"{c.name} {c.port or c.proc.pid}" for c in self.children))

    def _edge_tls_args(self) -> list[str]:
        """The edge's HTTPS listener (certificates from the platform's CA); none without a CA."""
        if not self.ca_dir:
            return []
        self.edge_https = self._port("edge_https")
        return ["--https", f"127.0.0.1:{self.edge_https}", "--ca", self.ca_dir, "--tls-dir", str(self.dir / "edge-tls")]

    def _registry_root(self) -> Path:
        from taxiway.paths import home

        return home() / "registry"

    def _bootstrap_ca(self) -> None:
        """The platform's CA ($TAXIWAY_CAROOT or $TAXIWAY_HOME/ca), created once; never trusted by the host here."""
        if not module_available("taxiway.pki.ca"):
            self.skipped.append("ca")
            return
        from taxiway.pki.ca import CA

        try:
            the_ca, created = CA.init(None)
        except TaxiwayError as e:
            self._log(f"warning: the CA is unusable ({e})")
            return
        self.ca_dir = str(the_ca.dir)
        if created:
            self._log(f"created the platform's CA in {the_ca.dir}")

    def _bootstrap_registry(self) -> None:
        """One registry org per platform org (the default one now; others when they first ask for a token)."""
        if not module_available("taxiway.registry.tenants"):
            return
        from taxiway.platform import schema
        from taxiway.registry.tenants import Tenants

        root = self._registry_root()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        t = Tenants(root / "tenants.db")
        try:
            if not t.has_org(schema.DEFAULT_ORG):
                t.create_org(schema.DEFAULT_ORG)
        finally:
            t.close()

    def _agent_registry_auth(self) -> None:
        """platform/agent/registry-auth.json (0600): where the agent finds the platform registry and
        its tenants database, {"registry": "127.0.0.1:PORT", "tenants": ".../tenants.db"}.

        The agent mints a short-lived pull token of each machine's OWN org there when it pulls (it
        runs on this host, as the registry does): one org's token for every pull let any org run
        another's private images, and made other orgs' names resolve inside the default org.
        """
        reg = self.child("registry")
        if reg is None:
            return
        path = self.dir / "agent" / "registry-auth.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_json(path, {"registry": f"127.0.0.1:{reg.port}",
                           "tenants": str(self._registry_root() / "tenants.db")}, mode=0o600)

    def _wait_port(self, child: Child) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _listening(child.port):
            if child.proc.poll() is not None:
                tail = _tail(self.logdir / f"{child.name}.log")
                raise TaxiwayError(f"{child.name} exited at start ({tail})",
                                   f"see {self.logdir / (child.name + '.log')}")
            if time.monotonic() > deadline:
                raise TaxiwayError(f"{child.name} did not listen on 127.0.0.1:{child.port} within "
                                   f"{READY_TIMEOUT:.0f} s", f"see {self.logdir / (child.name + '.log')}")
            time.sleep(0.05)

    def _bootstrap_token(self) -> None:
        """Org "personal" and a platform admin token in platform.json, kept while it still works."""
        import asyncio

        from taxiway.platform import client, schema, tokens
        from taxiway.platform.state import Conflict, State

        api = self.child("api")
        if api is None:
            return
        path = client.config_path()
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}

        async def go() -> str:
            st = await State.connect(self.nats.url, name="taxiway-up")
            try:
                with contextlib.suppress(Conflict):
                    await st.put(schema.ORGS, schema.DEFAULT_ORG, {"name": schema.DEFAULT_ORG,
                                                                   "created_at": time.time()}, revision=0)
                if old.get("token"):
                    rec = await tokens.authenticate(st, old["token"])
                    if rec and rec.get("platform"):
                        return old["token"]
                _, tok = await tokens.create(st, schema.DEFAULT_ORG, "admin", name="taxiway up", platform=True)
                return tok
            finally:
                await st.close()

        token = asyncio.run(go())
        _write_json(path, {"api_url": f"http://127.0.0.1:{api.port}", "token": token}, mode=0o600)
        os.chmod(path, 0o600)

    # -- state -------------------------------------------------------------------------------------------

    def child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)

    def write_up(self, ready: bool) -> None:
        def url(name: str, scheme: str = "http") -> str | None:
            c = self.child(name)
            return f"{scheme}://127.0.0.1:{c.port}" if c and c.port else None

        from taxiway.process import start_time

        npid = self.nats.proc.pid if self.nats and self.nats.proc else None
        comps = {"nats": {"pid": npid, "port": self.nats.port if self.nats else None,
                          "argv": _cmdline(npid) if npid else [], "started": start_time(npid) if npid else None}}
        for c in self.children:
            pid = c.proc.pid if c.proc else None
            # start time and argv beside each pid: a reused pid is never taken for our child
            comps[c.name] = {"pid": pid, "port": c.port, "restarts": c.restarts, "argv": c.argv,
                             "started": start_time(pid) if pid else None}
        data = {"pid": os.getpid(), "nats": self.nats.address if self.nats else None, "api": url("api"),
                "edge": url("edge"), "edge_https": f"https://127.0.0.1:{self.edge_https}" if self.edge_https else None,
                "registry": f"127.0.0.1:{self.child('registry').port}"
                if self.child("registry") else None, "egress": url("egress"), "started_at": self.started_at,
                "ready": ready, "components": comps, "ca": self.ca_dir, "skipped": self.skipped,
                "ports": {**{c.name: c.port for c in self.children if c.port},
                          "nats": self.nats.port if self.nats else None}}
        _write_json(self.dir / "up.json", data)

    # -- watch --------------------------------------------------------------------------------------------

    def watch_once(self) -> None:
        """Restart whatever died (nats first), with a per-child backoff."""
        changed = False
        now = time.time()
        if self.nats and (self.nats.proc is None or self.nats.proc.poll() is not None):
            self._log("nats-server died; restarting it")
            self.nats.proc = None
            try:
                self.nats.start()
                changed = True
            except (OSError, subprocess.SubprocessError, TaxiwayError) as e:  # e.g. EMFILE: try again next tick
                self._log(f"warning: could not restart nats-server ({e}); retrying")
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                if now - c.started_at > 60:
                    c.backoff = 1.0  # it ran a while: the next crash restarts quickly again
                continue
            if c.proc is not None:
                self._log(f"{c.name} exited with {c.proc.returncode}; restarting in {c.backoff:.0f} s")
                c.proc = None
                c.next_start = now + c.backoff
                c.backoff = min(c.backoff * 2, BACKOFF_MAX)
            if now >= c.next_start:
                c.restarts += 1
                try:
                    c.start(self.logdir)
                    changed = True
                except (OSError, subprocess.SubprocessError) as e:
                    # One component that cannot be (re)started (out of file descriptors, its log not
                    # writable...) must never take the supervisor, and every other component, down.
                    self._log(f"warning: could not start {c.name} ({e}); retrying in {c.backoff:.0f} s")
                    c.proc = None
                    c.next_start = now + c.backoff
                    c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        if changed:
            try:
                self.write_up(ready=True)
            except OSError as e:
                self._log(f"warning: could not write up.json ({e}); retrying at the next change")

    def stop(self) -> None:
        """Stop the children in reverse order, nats last; machines keep running."""
        self.stopping = True
        for c in reversed(self.children):
            c.stop()
        if self.nats:
            self.nats.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "up.json").unlink()
        if getattr(self, "api_relay", None) is not None:
            self.api_relay.close()
        self._private_network_down()
        self._log("platform stopped (machines keep running)")

    def _private_network(self) -> None:
        """The host's private network fabric (fdaa::3 and the machines' veths), before the DNS server,
        egress proxy and agent start: they bind or plug into it. Off with TAXIWAY_PRIVATE_NETWORK=0."""
        from taxiway.errors import TaxiwayError
        from taxiway.platform.fabric import host_fabric

        fab = host_fabric(self.dir.parent)
        if fab is not None:
            try:
                fab.ensure()
            except TaxiwayError as e:  # the platform still runs; machines then fail to create, saying why
                self._log(f"no private network: {e.message}")

    def _api_on_private_network(self, port: int | None) -> None:
        """Machines reach the Machines API at [fdaa::3]:4280 (as Fly's _api.internal:4280): relayed to
        its loopback port by this process (a restarted API keeps its port, so the relay holds)."""
        from taxiway.errors import TaxiwayError
        from taxiway.platform import fabric, network

        fab = fabric.host_fabric(self.dir.parent)
        if port is None or fab is None or not fab.exists():
            return
        try:
            self.api_relay = fabric.relay(network.API_PORT, ("127.0.0.1", port), fab=fab)
        except TaxiwayError as e:
            self._log(f"the API is not on the private network: {e.message}")

    def _private_network_down(self) -> None:
        """Remove the fabric once no machine is plugged into it; machines that still run keep it
        (and their network) until the next ``taxiway up`` adopts them."""
        from taxiway.platform.fabric import Fabric

        fab = Fabric.for_home(self.dir.parent)
        if fab.exists() and not fab.plugged():
            try:
                fab.teardown()
            except OSError as e:
                self._log(f"could not remove the private network fabric: {e}")

    def _log(self, msg: str) -> None:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} taxiway up: {msg}\n")
        sys.stderr.flush()


def _tail(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").strip().splitlines() if x.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no log"


# -- what the CLI calls ---------------------------------------------------------------------------------

def clean_stale() -> list[str]:
    """Stop the children a dead supervisor left (pids in up.json whose command line still matches)."""
    up = read_up()
    out = []
    if not up:
        return out
    for name, comp in (up.get("components") or {}).items():
        pid = comp.get("pid")
        argv = comp.get("argv") or []
        if not pid_alive(pid, comp.get("started")):
            continue
        if not argv or _cmdline(pid)[:len(argv)] != argv:
            continue  # the pid was reused by something else: never touch it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.append(name)
    with contextlib.suppress(FileNotFoundError):
        up_json_path().unlink()
    return out


def serve(free_ports: bool = False, edge_port: int | None = None, https_port: int | None = None,
          on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the supervisor in this process until SIGTERM/SIGINT (``taxiway up`` in the foreground)."""
    lock = Lock()
    if not lock.try_acquire():
        raise TaxiwayError("the platform is already running", "see 'taxiway platform status'; 'taxiway down' stops it")
    stale = clean_stale()
    sup = Supervisor(free_ports=free_ports, edge_port=edge_port, https_port=https_port)
    if stale:
        sup._log(f"cleaned up after a supervisor that died: stopped {', '.join(stale)}")
    stop_now = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_now
        stop_now = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        try:
            sup.start()
        except BaseException:
            sup.stop()
            raise
        if on_ready is not None:
            on_ready(read_up() or {})
        while not stop_now:
            time.sleep(0.5)
            if not stop_now:
                try:
                    sup.watch_once()
                except (TaxiwayError, OSError) as e:  # the next tick tries again; the children keep running
                    sup._log(f"warning: {e}")
        sup.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        lock.release()


def start_detached(free_ports: bool = False, edge_port: int | None = None, timeout: float = 120.0,
                   https_port: int | None = None) -> dict[str, Any]:
    """Start a supervisor in the background; return its up.json once the API answers."""
    if running() is not None:
        raise AlreadyRunning()
    logdir = platform_dir() / "logs"
    logdir.mkdir(exist_ok=True, mode=0o700)
    args = [sys.executable, "-m", "taxiway.platform.supervisor"]
    if free_ports:
        args.append("--free-ports")
    if edge_port:
        args += ["--edge-port", str(edge_port)]
    if https_port:
        args += ["--https-port", str(https_port)]
    with open(logdir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            if running() is not None:  # another 'up' won the race for the lock
                raise AlreadyRunning()
            raise TaxiwayError(f"the platform did not start ({_tail(logdir / 'supervisor.log')})",
                               f"see {logdir / 'supervisor.log'}")
        up = read_up()
        if up and up.get("pid") == proc.pid and up.get("ready") and (not up.get("api") or api_ok(up["api"])):
            return up
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            raise TaxiwayError(f"the platform was not ready within {timeout:.0f} s", f"see {logdir}")
        time.sleep(0.1)


class AlreadyRunning(TaxiwayError):
    def __init__(self) -> None:
        super().__init__("the platform is already running", "'taxiway down' stops it")


def api_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/v1/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def stop(timeout: float = 60.0) -> bool:
    """Stop the running supervisor (and so its children); False if none ran. Machines keep running."""
    up = running()
    if up is None:
        clean_stale()  # a supervisor killed -9 may have left children
        return False
    pid = up.get("pid")
    if not pid_alive(pid):
        raise TaxiwayError("the platform's lock is held but up.json names no live supervisor",
                           "wait for a starting 'taxiway up' to finish, then retry")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            clean_stale()
            break
        time.sleep(0.1)
    return True


def status() -> dict[str, Any]:
    """What runs: each component's pid, port and whether it is alive; the API's health."""
    up = running()
    if up is None:
        return {"running": False}
    comps = {n: {**c, "alive": pid_alive(c.get("pid"))} for n, c in (up.get("components") or {}).items()}
    return {"running": True, "pid": up.get("pid"), "api": up.get("api"), "edge": up.get("edge"),
            "nats": up.get("nats"), "registry": up.get("registry"), "egress": up.get("egress"),
            "api_ok": bool(up.get("api")) and api_ok(up["api"]), "components": comps,
            "skipped": up.get("skipped") or [], "started_at": up.get("started_at")}


def main(argv: list[str] | None = None) -> int:
    """``python -m taxiway.platform.supervisor [--free-ports] [--edge-port N]`` (what ``up -d`` detaches)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m taxiway.platform.supervisor")
    p.add_argument("--free-ports", action="store_true", help="pick free loopback ports (tests)")
    p.add_argument("--edge-port", type=int)
    p.add_argument("--https-port", type=int)
    a = p.parse_args(argv)
    try:
        serve(a.free_ports, a.edge_port, a.https_port)
    except TaxiwayError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
