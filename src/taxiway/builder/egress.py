"""The build's only way out: taxiway's egress proxy, allowing the package indexes.

Builds install dependencies (pip from PyPI, npm and Deno from the npm
registry), so the build machine's relay leads to an egress proxy: the one
named by ``$TAXIWAY_BUILD_EGRESS`` (``host:port`` of a running
``taxiway egress serve``), or else one started in this process for the
build's duration on a free loopback port. Its ACL allows only the hosts in
``$TAXIWAY_BUILD_ALLOW`` (default: the package indexes the bundled
buildpacks use); its address policy denies loopback and private addresses, so
a build can reach no service of the host or its network. Where an allowed
index itself resolves to a non-public address (a mirror on the local network,
as on CI machines), exactly those addresses are allowed, as
``--allow-range ADDR/32`` would; loopback and link-local never are. The
decisions go to ``egress.log`` in the build's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from taxiway.errors import InvalidInput

DEFAULT_ALLOW = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org")


def _external() -> tuple[str, int] | None:
    v = os.environ.get("TAXIWAY_BUILD_EGRESS", "").strip()
    if not v:
        return None
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"TAXIWAY_BUILD_EGRESS={v!r} is not host:port", "set it to the address of `taxiway egress serve`")
    return host.strip("[]"), int(port)


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


@contextlib.contextmanager
def proxy(work: Path) -> Iterator[tuple[str, int]]:
    """(host, port) of the egress proxy the build's relay connects to, for the ``with`` block."""
    ext = _external()
    if ext is not None:
        yield ext
        return
    from taxiway.egress.server import EgressConfig, EgressProxy

    allow = [d.strip() for d in os.environ.get("TAXIWAY_BUILD_ALLOW", ",".join(DEFAULT_ALLOW)).split(",") if d.strip()]
    acl = work / "egress-acl.yaml"
    acl.write_text(acl_text(allow))
    log = open(work / "egress.log", "ab")  # noqa: SIM115 - closed below, after the loop stops
    from taxiway.egress.addresses import Range

    cfg = EgressConfig(listen=("127.0.0.1", 0), acl_path=acl,
                       allow_ranges=[Range.parse(r, "--allow-range") for r in index_ranges(allow)])
    server = EgressProxy(cfg, log=log)
    loop = asyncio.new_event_loop()
    started: list[tuple[str, int] | BaseException] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            started.append(await server.start())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            started.append(e)
            ready.set()
            return
        ready.set()
        await stop.wait()
        await server.drain()

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True, name="build-egress")
    t.start()
    ready.wait()
    if isinstance(started[0], BaseException):
        log.close()
        raise started[0]
    try:
        yield started[0]
    finally:
        cfg.drain_timeout = 1.0
        loop.call_soon_threadsafe(stop.set)
        t.join(10)
        log.close()
