"""Health checks of a machine (HTTP and TCP), as Fly's machine checks.

Two halves, as the egress part is built:

- a pure core: :func:`parse` turns a MACHINES config into :class:`Check`
  definitions, :class:`Schedule` decides which checks are due (grace period,
  interval) and turns results into the ``STATUS.checks`` entries. No sockets,
  no clock of its own: the caller passes ``now``, so it is tested without servers.
- the runners: :func:`run_http` (httpx) and :func:`run_tcp`
  (``asyncio.open_connection``) against ``127.0.0.1:<host port>``, and
  :func:`run_checks`, the loop the agent runs per started machine.

Statuses are Consul's (and Fly's): ``passing``, ``warning``, ``critical``. A check
reads ``critical`` with output "waiting for grace period" until its first result, so
a deployer that counts passing checks never sees a machine as healthy too early
(contract decision: one entry per configured check from the start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from taxiway.errors import InvalidInput

DEFAULT_INTERVAL = 15.0
DEFAULT_TIMEOUT = 2.0
MIN_INTERVAL = 0.1      # a check cannot be scheduled tighter than this (a zero interval would spin)
OUTPUT_MAX = 512        # the body excerpt kept in STATUS (the KV record stays small)
WAITING = "waiting for grace period"
# Until a check first passes in a machine's run, a failure is tried again soon instead of after a
# whole interval: a new machine is usually failing only because its app is still starting, and a
# deploy waits on that first pass (with launch's 1 s interval, up to a second of every deploy was
# spent waiting for the next try). The delay grows (x1.25 per failure: 0.05 s, then ~1 s after 4 s
# of failures) up to the interval, so a machine that never comes up is soon probed at its interval
# again (Kubernetes' startupProbe plays the same part).
FIRST_RETRY = 0.05
FIRST_RETRY_GROWTH = 1.25


@dataclass(frozen=True)
class Check:
    """One configured check: where (the machine's internal ``port``), how and how often (seconds)."""

    name: str
    type: str                 # "http" | "tcp"
    port: int                 # the port inside the machine; the agent maps it to a host port
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    grace_period: float = 0.0
    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    protocol: str = "http"    # "http" | "https" (https is tried without verification: a machine's own cert)


def _seconds(v: Any, what: str) -> float:
    """Seconds as a number (the contract), or Fly's duration strings ("10s", "500ms", "1m") when handed one."""
    if v is None:
        raise InvalidInput(f"{what} is missing", "give a number of seconds")
    if isinstance(v, bool):
        raise InvalidInput(f"{what} is {v!r}, not a duration", "give a number of seconds")
    if isinstance(v, (int, float)):
        if v < 0:
            raise InvalidInput(f"{what} is negative ({v})", "give a number of seconds >= 0")
        return float(v)
    if isinstance(v, str):
        import re

        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", v)
        if m:
            return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    raise InvalidInput(f"{what} is {v!r}, not a duration", "give a number of seconds, e.g. 10 or \"10s\"")


def _one(name: str, d: dict[str, Any], port: int | None) -> Check:
    if not isinstance(d, dict):
        raise InvalidInput(f"check {name} is not a table", "write it as {type = \"http\", port = 8080, ...}")
    typ = d.get("type", "tcp" if not d.get("path") else "http")
    if typ not in ("http", "tcp"):
        raise InvalidInput(f"check {name} has type {typ!r}", "use type \"http\" or \"tcp\"")
    p = d.get("port", port)
    if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
        raise InvalidInput(f"check {name} has no valid port ({p!r})", "set port to the machine's internal port")
    method = str(d.get("method") or "GET").upper()
    path = d.get("path") or "/"
    if not str(path).startswith("/"):
        raise InvalidInput(f"check {name} has path {path!r}", "start the path with '/'")
    headers = {str(k): (v[0] if isinstance(v, list) and v else str(v)) for k, v in (d.get("headers") or {}).items()}
    return Check(name=name, type=typ, port=p,
                 interval=max(MIN_INTERVAL, _seconds(d.get("interval", DEFAULT_INTERVAL), f"check {name} interval")),
                 timeout=max(0.05, _seconds(d.get("timeout", DEFAULT_TIMEOUT), f"check {name} timeout")),
                 grace_period=_seconds(d.get("grace_period", 0), f"check {name} grace_period"),
                 method=method, path=str(path), headers=headers, protocol=str(d.get("protocol") or "http"))


def service_check_name(service: int, check: int) -> str:
    """The STATUS.checks name of a service's check (contract: the deployer counts them)."""
    return f"servicecheck-{service:02d}-{check:02d}"


def parse(config: dict[str, Any]) -> list[Check]:
    """Every check of a machine config: top-level ``checks`` {name: def} and each service's ``checks`` [def].

    A service check's port defaults to the service's ``internal_port``.
    """
    out: list[Check] = []
    for name, d in sorted((config.get("checks") or {}).items()):
        out.append(_one(str(name), d, None))
    for si, svc in enumerate(config.get("services") or []):
        for ci, d in enumerate(svc.get("checks") or []):
            out.append(_one(service_check_name(si, ci), d, svc.get("internal_port")))
    return out


def ports(config: dict[str, Any]) -> list[int]:
    """The internal ports a machine's checks need reachable from the host (each gets a host port)."""
    return sorted({c.port for c in parse(config)})


# -- the pure scheduler ------------------------------------------------------------------------


@dataclass
class _Slot:
    check: Check
    next_at: float
    status: str = "critical"
    output: str = WAITING
    updated_at: float = 0.0
    running: bool = False
    passed: bool = False  # passed at least once in this run (then: every interval, as configured)
    failures: int = 0     # failures before the first pass (they set the retry delay)


class Schedule:
    """Which checks are due, and what their results mean, for one machine run.

    ``started_at`` is when the machine (this run of it) started; each check first
    runs at ``started_at + grace_period``, then every ``interval`` after it began. Until
    it first passes, a failure is retried after :func:`retry_delay` instead (shorter).
    """

    def __init__(self, checks: list[Check], started_at: float) -> None:
        self.started_at = started_at
        self.slots = {c.name: _Slot(c, started_at + c.grace_period, updated_at=started_at) for c in checks}

    def due(self, now: float) -> list[Check]:
        """Checks to start now (each is marked running until :meth:`record`); none twice at once."""
        out = []
        for s in self.slots.values():
            if not s.running and now >= s.next_at:
                s.running = True
                s.next_at = now + s.check.interval
                out.append(s.check)
        return out

    def next_due(self) -> float | None:
        """When the next check is due (None: every check is running)."""
        waiting = [s.next_at for s in self.slots.values() if not s.running]
        return min(waiting) if waiting else None

    def record(self, name: str, ok: bool, output: str, now: float) -> bool:
        """Store a result; True if the check's status or output changed (worth writing to STATUS)."""
        s = self.slots[name]
        s.running = False
        if ok:
            s.passed = True
        elif not s.passed:
            s.next_at = min(s.next_at, now + retry_delay(s.check, s.failures))
            s.failures += 1
        status = "passing" if ok else "critical"
        output = output[:OUTPUT_MAX]
        changed = (status, output) != (s.status, s.output)
        s.status, s.output, s.updated_at = status, output, now
        return changed

    def statuses(self) -> dict[str, dict[str, Any]]:
        """``STATUS.checks``: {name: {"status", "output", "updated_at"}}."""
        return {n: {"status": s.status, "output": s.output, "updated_at": s.updated_at}
                for n, s in sorted(self.slots.items())}


def retry_delay(check: Check, failures: int) -> float:
    """Seconds before a check that has not passed yet (``failures`` times failed) is tried again."""
    return min(check.interval, FIRST_RETRY * FIRST_RETRY_GROWTH ** min(failures, 64))


def healthy(statuses: dict[str, dict[str, Any]], expected: int) -> bool:
    """All ``expected`` checks present and passing (no checks: healthy)."""
    return len(statuses) >= expected and all(v.get("status") == "passing" for v in statuses.values())


# -- runners ------------------------------------------------------------------------------------


async def run_http(check: Check, host_port: int, host: str = "127.0.0.1") -> tuple[bool, str]:
    """One HTTP check: passes on a 2xx or 3xx answer within the timeout (redirects not followed)."""
    import httpx

    url = f"{check.protocol}://{host}:{host_port}{check.path}"
    try:
        # trust_env=False: never through a proxy from the environment; loopback only
        async with httpx.AsyncClient(timeout=check.timeout, trust_env=False, verify=False,
                                     follow_redirects=False) as c:
            r = await c.request(check.method, url, headers=check.headers)
    except httpx.TimeoutException:
        return False, f"timed out after {check.timeout:g} s ({check.method} {check.path})"
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e or 'connection failed'} ({check.method} {check.path})"
    body = r.text[:200].strip() if r.content else ""
    ok = 200 <= r.status_code < 400
    return ok, f"{r.status_code} {r.reason_phrase}" + (f": {body}" if body else "")


def listening_in(netns_pid: int | None, port: int) -> bool | None:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``netns_pid``
    (its /proc/PID/net/tcp and tcp6); None when that can't be told (no pid, no such process)."""
    if not netns_pid:
        return None
    want = f"{port:04X}"
    seen = False
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{netns_pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN
            if len(fields) > 3 and fields[3] == "0A" and fields[1].rpartition(":")[2] == want:
                return True
    return False if seen else None


async def run_tcp(check: Check, host_port: int, host: str = "127.0.0.1",
                  netns_pid: int | None = None) -> tuple[bool, str]:
    """One TCP check: passes when a connection opens within the timeout.

    A machine's port is published by a forwarder that accepts on the host before the
    machine listens, so an accepted connection is not enough: a forwarder closes it at
    once (EOF) when nothing listens inside. So we wait a moment for EOF as well, unless
    the machine's own network namespace (``netns_pid``: a process in it) shows a listener
    on the port: then the check passes at once (the wait was on every deploy's path).
    """
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, host_port), check.timeout)
    except TimeoutError:
        return False, f"connect timed out after {check.timeout:g} s"
    except OSError as e:
        return False, f"connect failed: {e.strerror or e}"
    try:
        if listening_in(netns_pid, check.port):
            return True, "connection open"
        try:
            data = await asyncio.wait_for(r.read(1), min(0.2, check.timeout))
            if data == b"":
                return False, "connection closed at once (nothing listens in the machine)"
        except TimeoutError:
            pass  # open and quiet: a listener that waits for the client to speak
        except OSError as e:
            return False, f"connection reset: {e.strerror or e}"
        return True, "connection open"
    finally:
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass


async def run_one(check: Check, host_port: int, netns_pid: int | None = None) -> tuple[bool, str]:
    """Run ``check`` once against ``127.0.0.1:host_port`` (``netns_pid``: see :func:`run_tcp`)."""
    if check.type == "http":
        return await run_http(check, host_port)
    return await run_tcp(check, host_port, netns_pid=netns_pid)


async def run_checks(checks: list[Check], host_ports: dict[int, int], started_at: float,
                     on_change: Callable[[dict[str, dict[str, Any]]], Awaitable[None]],
                     clock: Callable[[], float] = time.time, netns_pid: int | None = None) -> None:
    """Run ``checks`` until cancelled, calling ``on_change(statuses)`` first and whenever a result changes.

    ``host_ports`` maps each internal port to its host port on 127.0.0.1; a check whose
    port is not published is critical. Checks run concurrently; each at most once at a time.
    ``netns_pid`` is the machine's main process, if known (TCP checks look at its listeners).
    """
    sched = Schedule(checks, started_at)
    await on_change(sched.statuses())
    done: asyncio.Queue[tuple[str, bool, str]] = asyncio.Queue()

    async def one(c: Check) -> None:
        hp = host_ports.get(c.port)
        if hp is None:
            ok, out = False, f"port {c.port} is not published by the machine"
        else:
            try:
                ok, out = await run_one(c, hp, netns_pid)
            except Exception as e:  # a runner bug must not stop the other checks
                ok, out = False, f"{type(e).__name__}: {e}"
        await done.put((c.name, ok, out))

    async with asyncio.TaskGroup() as tg:
        while True:
            for c in sched.due(clock()):
                tg.create_task(one(c))
            nxt = sched.next_due()
            wait = None if nxt is None else max(0.0, nxt - clock())
            try:
                name, ok, out = await asyncio.wait_for(done.get(), wait)
            except TimeoutError:
                continue
            if sched.record(name, ok, out, clock()):
                await on_change(sched.statuses())
