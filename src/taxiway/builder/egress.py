"""The build's only way out: taxiway's egress proxy, allowing the package indexes.

Builds install dependencies (pip from PyPI, npm and Deno from the npm
registry), so the build machine's relay leads to an egress proxy: the one
named by ``$TAXIWAY_BUILD_EGRESS`` (``host:port`` of a running
``taxiway egress serve``), or else one started in this process when the
build first connects, and stopped with the build. That one listens on
loopback in a network namespace of its own, which holds nothing else: no
process of the host (another tenant's build, a machine with host networking, a
local user) can reach it, only this build's relay, which makes its connections
there. (Where it listened on the host's loopback, any local process could use
the build's way out for the length of a build.)
Its ACL allows only the hosts in ``$TAXIWAY_BUILD_ALLOW`` (default: the package indexes the bundled
buildpacks use); its address policy denies loopback and private addresses, so
a build can reach no service of the host or its network. Where an allowed
index itself resolves to a non-public address (a mirror on the local network,
as on CI machines), exactly those addresses are allowed, as
``--allow-range ADDR/32`` would; loopback and link-local never are. The
decisions go to ``egress.log`` in the build's folder.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput

if TYPE_CHECKING:
    import socket

DEFAULT_ALLOW = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org")


def _external() -> tuple[str, int] | None:
    """The address in ``$TAXIWAY_BUILD_EGRESS``, spelt as ``taxiway egress serve --listen`` takes it; None if unset."""
    v = os.environ.get("TAXIWAY_BUILD_EGRESS", "").strip()
    if not v:
        return None
    from taxiway.listen import parse_listen

    # An IP literal, as the proxy listens on one: the build never asks a resolver where its only way out is.
    addr = parse_listen(v, "TAXIWAY_BUILD_EGRESS")
    if addr.port == 0:  # "any free port" means something to a server, nothing to a client
        raise InvalidInput(f"TAXIWAY_BUILD_EGRESS={v!r} names port 0", "set it to the address `taxiway egress serve` listens on")
    return addr


def acl_text(allow: list[str]) -> str:
    import json

    return ("version: v1\nservices: []\ndefault:\n  project: build\n  action: enforce\n"
            f"  allowed_domains: {json.dumps(allow)}\n")


def index_ranges(allow: list[str]) -> list[str]:
    """/32 (/128) ranges for the non-public addresses the allowed hosts resolve to now (never loopback or link-local)."""
    import ipaddress
    import socket

    out = []
    for host in allow:
        if "*" in host:
            continue
        try:
            infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for *_, sa in infos:
            ip = ipaddress.ip_address(sa[0].split("%")[0])
            if not ip.is_global and not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast):
                out.append(f"{ip}/{ip.max_prefixlen}")
    return sorted(set(out))


class _Netns:
    """A network namespace holding only loopback, kept open by an fd; sockets are made in it one thread at a time."""

    def __init__(self) -> None:
        from taxiway.machines import linux as L

        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.unshare(L.CLONE_NEWNET)  # this thread only, until the setns below
            try:
                L.loopback_up()
                self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                L.setns(own, L.CLONE_NEWNET)
        finally:
            os.close(own)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread in the namespace for the block (sockets made in it stay there), then back where it was."""
        from taxiway.machines import linux as L

        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.setns(self.fd, L.CLONE_NEWNET)
            try:
                yield
            finally:
                L.setns(own, L.CLONE_NEWNET)
        finally:
            os.close(own)

    def close(self) -> None:
        os.close(self.fd)


class Upstream:
    """Where the build's relay connects: the external proxy, or one started here on the first connection.

    Started lazily because most rebuilds install nothing: they then pay neither for
    importing the proxy (asyncio, yaml: ~60 ms) nor for starting it.
    """

    def __init__(self, work: Path, external: tuple[str, int] | None):
        self.work, self._addr = work, external
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None
        self._netns: _Netns | None = None
        self.error: BaseException | None = None

    def address(self) -> tuple[str, int]:
        """(host, port) of the proxy, starting it on the first call; raises what starting raised."""
        with self._lock:
            if self._addr is None:
                if self.error is not None:
                    raise self.error
                try:
                    self._addr, self._stop, self._netns = _start(self.work)
                except BaseException as e:
                    self.error = e
                    raise
            return self._addr

    def connect(self, timeout: float = 10) -> socket.socket:
        """A connection to the proxy (in its own namespace when it is the in-process one), starting it if needed."""
        import socket

        addr = self.address()
        if self._netns is None:
            return socket.create_connection(addr, timeout=timeout)
        with self._netns.entered():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(addr)
        except BaseException:
            s.close()
            raise
        return s

    def close(self) -> None:
        with self._lock:
            if self._stop is not None:
                self._stop()
                self._stop = None
            if self._netns is not None:
                self._netns.close()
                self._netns = None


@contextlib.contextmanager
def proxy(work: Path) -> Iterator[Upstream]:
    """The egress proxy the build's relay connects to, for the ``with`` block (started when first used)."""
    up = Upstream(work, _external())
    try:
        yield up
    finally:
        up.close()


def _start(work: Path) -> tuple[tuple[str, int], Callable[[], None], _Netns]:
    """Start the in-process proxy on a free loopback port of a namespace of its own.

    Returns its address (in that namespace), the function that stops it, and the namespace.
    Only its listening socket lives there: its connections out are made in the host's.
    """
    import asyncio

    from taxiway.egress.addresses import Range
    from taxiway.egress.server import EgressConfig, EgressProxy

    allow = [d.strip() for d in os.environ.get("TAXIWAY_BUILD_ALLOW", ",".join(DEFAULT_ALLOW)).split(",") if d.strip()]
    acl = work / "egress-acl.yaml"
    acl.write_text(acl_text(allow))
    log = open(work / "egress.log", "ab")  # noqa: SIM115 - closed by stop(), after the loop stops
    cfg = EgressConfig(listen=("127.0.0.1", 0), acl_path=acl,
                       allow_ranges=[Range.parse(r, "--allow-range") for r in index_ranges(allow)])
    server = EgressProxy(cfg, log=log)
    netns = _Netns()
    loop = asyncio.new_event_loop()
    started: list[tuple[str, int] | BaseException] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            # start() makes its listening socket without awaiting anything: only that socket is
            # made in the namespace (no executor thread is started meanwhile, so none inherits it).
            with netns.entered():
                addr = await server.start()
            started.append(addr)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            started.append(e)
            ready.set()
            return
        ready.set()
        await stop.wait()
        await server.drain()

    async def _settle(tasks: set[asyncio.Task]) -> None:
        # gather() inside the loop: called outside it with no tasks, it looks
        # for this thread's current loop, and there is none
        await asyncio.gather(*tasks, return_exceptions=True)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        finally:  # a connection accepted just before the stop still has a task: end it here, not at GC
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(_settle(pending))
            loop.close()

    t = threading.Thread(target=run, daemon=True, name="build-egress")
    t.start()
    ready.wait()
    if isinstance(started[0], BaseException):
        log.close()
        netns.close()
        raise started[0]

    def stop_it() -> None:
        cfg.drain_timeout = 1.0
        loop.call_soon_threadsafe(stop.set)
        t.join(10)
        log.close()

    return started[0], stop_it, netns
