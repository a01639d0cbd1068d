"""The platform's egress proxy: every machine's only way out, one ACL per app.

    python -m taxiway.platform.egressd --nats URL [--fabric] [--listen 127.0.0.1:PORT]
                                       [--resolver HOST:PORT] [--allow-range CIDR]...

The proxy core is :mod:`taxiway.egress.server` (the same hot path as ``taxiway
egress serve``); this module only feeds it the platform's state:

- the **role** of a request is the app of the machine whose private address
  (``STATUS.private_ip``) the connection comes from; an unknown address is
  denied (403). The private network's anti-spoofing makes the address an identity.
- the **ACL** of a role is the ``[egress]`` of the app's current release
  (:mod:`taxiway.platform.egresspolicy`); the address policy denies every
  private and internal address class for everyone, after resolving the name
  once and pinning the answer (so DNS rebinding gets nothing).
- each **denial** (and each request a ``mode = "report"`` app would have had
  denied) becomes a line of the app's log, ``logs.<app>.<region>.<machine>``,
  so ``taxiway logs`` shows it beside the app's own output.

The state is mirrored from NATS KV watches (STATUS and RELEASES), never polled.
It listens on the private network's fdaa::3 port 3128 (``--fabric``, through
:func:`taxiway.platform.fabric.listen_socket`) and on ``--listen`` (loopback:
the supervisor's readiness check, /metrics and /healthz; loopback clients are
no machine, so they are denied).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from taxiway.errors import TaxiwayError
from taxiway.platform import schema
from taxiway.platform.egresspolicy import Directory, denial_line

FABRIC_ADDRESS = "fdaa::3"
FABRIC_PORT = 3128
LOG_QUEUE = 10_000  # denial lines waiting for NATS; past that they are counted and dropped
# Denial lines per machine: a burst of LOG_BURST, then LOG_RATE a second. A machine that loops on a
# denied URL must not fill the shared log stream (and push other apps' lines out of it); the lines
# it does not get are counted into its next one.
LOG_RATE = 10.0
LOG_BURST = 100
WATCHED = (schema.STATUS, schema.RELEASES)


class LogShipper:
    """Publishes denial lines to the apps' logs from one task, so the proxy's hot path only
    appends to a bounded queue (a flood of denials never blocks or grows memory)."""

    def __init__(self, state: Any, directory: Directory, log: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.directory, self.log = state, directory, log
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(LOG_QUEUE)
        self.dropped = 0
        self.task: asyncio.Task | None = None
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # machine id -> [tokens, last refill, lines held back]

    def _admit(self, machine: str) -> tuple[bool, int]:
        """(log this line?, lines held back before it): a token bucket per machine."""
        now = self.clock()
        b = self._buckets.get(machine)
        if b is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            b = self._buckets[machine] = [float(LOG_BURST), now, 0]
        b[0] = min(float(LOG_BURST), b[0] + (now - b[1]) * LOG_RATE)
        b[1] = now
        if b[0] < 1:
            b[2] += 1
            return False, 0
        b[0] -= 1
        held, b[2] = int(b[2]), 0
        return True, held

    def offer(self, fields: dict[str, Any]) -> None:
        """The proxy's ``on_decision`` hook: denials and reports go to the app's log."""
        if fields.get("decision") not in ("deny", "report"):
            return
        client = str(fields.get("client") or "")
        m = self.directory.machine_of(client.rpartition(":")[0].strip("[]"))
        if m is None:  # not a machine: nobody's log to write to (the proxy's own log has it)
            return
        ok, held = self._admit(m.id)
        if not ok:
            return
        line = denial_line(fields)
        if held:
            line += f" ({held} more egress lines of this machine were not logged: over {LOG_RATE:g}/s)"
        record = {"at": time.time(), "stream": "egress", "line": line, "machine": m.id,
                  "app": m.app, "region": m.region, "source": "egress", "decision": fields.get("decision"),
                  "host": fields.get("requested_host"), "reason": fields.get("reason"),
                  "status": fields.get("status")}
        try:
            self.queue.put_nowait((schema.logs_subject(m.app, m.region, m.id), record))
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        while True:
            subject, record = await self.queue.get()
            for attempt in range(3):
                try:
                    await self.state.publish(subject, record)
                    break
                except Exception as e:  # NATS away for a moment: the client reconnects by itself
                    if attempt == 2:
                        self.log(msg="log publish failed", subject=subject, error=f"{type(e).__name__}: {e}")
                    else:
                        await asyncio.sleep(0.5)
            if self.dropped:
                self.log(msg="denial lines dropped", count=self.dropped, reason=f"more than {LOG_QUEUE} waiting")
                self.dropped = 0


class Egressd:
    """The proxy plus the mirrors of the platform state it decides with."""

    def __init__(self, proxy: Any, state: Any) -> None:
        self.proxy, self.state = proxy, state
        self.directory = Directory()
        self.shipper = LogShipper(state, self.directory, proxy.log)
        self._ready = {b: asyncio.Event() for b in WATCHED}
        self._mirrors: list[asyncio.Task] = []
        self._stopping = False
        proxy.role_by_address = self.directory.role_of
        proxy.acl_for = self.directory.acl_for
        proxy.on_decision = self.shipper.offer

    async def start(self, sockets: list[socket.socket], ready_timeout: float = 30.0) -> None:
        """Mirror the state (complete before the first request is decided), then listen."""
        self._start_mirrors()
        self.state.on_reconnect(self._start_mirrors)
        try:
            async with asyncio.timeout(ready_timeout):
                await asyncio.gather(*(e.wait() for e in self._ready.values()))
        except TimeoutError:
            raise TaxiwayError(f"the machines did not load from NATS within {ready_timeout:.0f} s",
                               "check that nats-server is healthy ('taxiway up')") from None
        self.shipper.task = asyncio.create_task(self.shipper.run())
        await self.proxy.start(sockets)

    def _start_mirrors(self) -> None:
        """(Re)start the watches: at start and after NATS reconnected (a restarted server
        forgets their consumers, and the old watches would wait forever)."""
        if self._stopping:
            return
        for t in self._mirrors:
            t.cancel()
        self._mirrors = [asyncio.create_task(self._mirror(b)) for b in WATCHED]

    async def _mirror(self, bucket: str) -> None:
        apply = self.directory.status if bucket == schema.STATUS else self.directory.release
        mirrored: set[str] = set()
        while True:
            ready = asyncio.Event()
            seen: set[str] = set()

            async def prune(ready: asyncio.Event = ready, seen: set[str] = seen) -> None:
                await ready.wait()
                for key in mirrored - seen:  # deleted while the watch was down
                    apply(key, None)
                    mirrored.discard(key)
                self._ready[bucket].set()

            pruner = asyncio.create_task(prune())
            try:
                async for key, value, _ in self.state.watch(bucket, ">", ready=ready):
                    seen.add(key)
                    (mirrored.add if value is not None else mirrored.discard)(key)
                    apply(key, value)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # NATS went away: the client reconnects; watch again
                self.proxy.log(msg="watch failed", bucket=bucket, error=f"{type(e).__name__}: {e}")
            finally:
                pruner.cancel()
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        self._stopping = True
        tasks = [*self._mirrors, *([self.shipper.task] if self.shipper.task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def fabric_exists() -> bool:
    """Whether this host's private network fabric is up ($TAXIWAY_HOME/platform/net/fabric)."""
    try:
        from taxiway.platform import fabric
    except ImportError:
        return False
    fab = fabric.host_fabric()  # None: the private network is off (TAXIWAY_PRIVATE_NETWORK=0) or impossible
    return fab is not None and fab.exists()


def fabric_socket() -> socket.socket:
    """A listening TCP socket on fdaa::3 port 3128 inside the host's fabric namespace."""
    try:
        from taxiway.platform import fabric
    except ImportError:
        raise TaxiwayError("the private network (taxiway.platform.fabric) is not installed",
                           "run without --fabric") from None
    return fabric.listen_socket(socket.AF_INET6, socket.SOCK_STREAM, FABRIC_ADDRESS, FABRIC_PORT, backlog=4096)


def _listen_socket(text: str) -> socket.socket:
    from taxiway.listen import parse_listen

    host, port = parse_listen(text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=4096)
    except OSError as e:
        raise TaxiwayError(f"cannot listen on {text}: {e.strerror or e}", "pick another address with --listen") from None


def _ranges(values: list[str], flag: str) -> list[Any]:
    from taxiway.egress.addresses import Range
    from taxiway.errors import InvalidInput

    out = []
    for v in values:
        try:
            out.append(Range.parse(v, flag))
        except ValueError as e:
            raise InvalidInput(f"{flag} {v!r}: {e}", "use a CIDR like 10.0.0.0/8, or IP[:PORT]") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m taxiway.platform.egressd", description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", default=None, help="NATS URL (credentials from $TAXIWAY_NATS_URL)")
    p.add_argument("--fabric", nargs="?", const="on", default="off", choices=("on", "auto", "off"),
                   help=f"listen on [{FABRIC_ADDRESS}]:{FABRIC_PORT} in the private network (auto: if it exists)")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="also listen here (repeatable; loopback: health, metrics)")
    p.add_argument("--resolver", metavar="HOST:PORT", help="DNS server to resolve names with (default: system)")
    p.add_argument("--allow-range", action="append", default=[], metavar="CIDR",
                   help="allow dialling this internal range (tests: the loopback stand-in for the internet)")
    p.add_argument("--deny-range", action="append", default=[], metavar="CIDR", help="deny this range too")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--idle-timeout", type=float, default=300.0)
    return p.parse_args(argv)


async def serve(a: argparse.Namespace) -> None:
    """Run until SIGTERM/SIGINT, then drain the proxy's connections."""
    from taxiway.egress.resolver import Resolver
    from taxiway.egress.server import EgressConfig, EgressProxy
    from taxiway.platform.state import State

    if a.fabric == "auto":
        a.fabric = "on" if fabric_exists() else "off"
    if a.fabric == "off" and not a.listen:
        raise TaxiwayError("nowhere to listen", "pass --fabric and/or --listen 127.0.0.1:PORT")
    config = EgressConfig(
        allow_ranges=_ranges(a.allow_range, "--allow-range"),
        deny_ranges=_ranges(a.deny_range, "--deny-range"),
        resolver=Resolver.parse_server(a.resolver) if a.resolver else None,
        connect_timeout=a.connect_timeout, idle_timeout=a.idle_timeout)
    sockets = [_listen_socket(x) for x in a.listen]
    if a.fabric == "on":
        sockets.append(fabric_socket())
    proxy = EgressProxy(config)
    state = await State.connect(a.nats, name="taxiway-egressd")
    d = Egressd(proxy, state)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await d.start(sockets)
        await stopped.wait()
        await proxy.drain()
    finally:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
        await d.close()
        await state.close()


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(serve(a))
    except TaxiwayError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
