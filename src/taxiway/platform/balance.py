"""Which machine gets a request: the edge's routes and backend choice, pure (no I/O).

The edge (:mod:`taxiway.platform.edge`) mirrors three KV buckets into a
:class:`Routes` snapshot, one entry at a time as its watches deliver them, and
asks a :class:`Balancer` for a backend per request. Nothing here touches a
socket, a clock or NATS: time comes in as ``now``, so every rule is tested by
feeding records (tests/platform/test_balance.py, with hypothesis).

A machine gets requests (is *routable*) only when all of these hold:

- its MACHINES record (desired state, the API's) says ``desired: "started"`` and
  is not ``cordoned``: a deployer cordons a machine, or sets it to stop, to drain it;
- its STATUS record (observed, the agent's) says ``state: "started"``;
- every check in STATUS.checks is ``passing``; a machine whose config declares
  checks but has no results yet is not routable (a new machine in a deploy gets
  traffic only once its checks passed);
- STATUS.ports maps the http service's ``internal_port`` to a host port.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
PASSING = "passing"


@dataclass(frozen=True)
class Backend:
    """One routable machine: where to connect and how much it may take at once."""

    machine: str
    app: str
    port: int
    host: str = LOOPBACK
    soft_limit: int | None = None  # above it only when every machine is (Fly's concurrency)
    hard_limit: int | None = None  # never above it
    concurrency: str = "requests"  # what the limits count: in-flight "requests" or open "connections"
    region: str = ""


def split_key(key: str) -> tuple[str, str]:
    """``"<app>.<machine id>"`` -> ``(app, machine id)`` (app names never hold a dot)."""
    app, _, mid = key.partition(".")
    return app, mid


def http_service(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The service the edge routes HTTP to, from a machine config's ``services``.

    The first service with an ``http`` handler on one of its ports (Fly's
    machine config shape), else the first one marked ``"http": true``, else the
    first service; None when the config has no services.
    """
    services = [s for s in (config or {}).get("services") or [] if isinstance(s, Mapping)]
    for s in services:
        for p in s.get("ports") or []:
            if isinstance(p, Mapping) and "http" in (p.get("handlers") or []):
                return s
    for s in services:
        if s.get("http") is True:
            return s
    return services[0] if services else None


def _limits(service: Mapping[str, Any] | None) -> tuple[int | None, int | None, str]:
    conc = (service or {}).get("concurrency") or {}
    if not isinstance(conc, Mapping):
        return None, None, "requests"

    def limit(name: str) -> int | None:
        v = conc.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    kind = "connections" if conc.get("type") == "connections" else "requests"
    return limit("soft_limit"), limit("hard_limit"), kind


def tcp_services(config: Mapping[str, Any] | None) -> list[tuple[int, int, bool]]:
    """The machine's plain TCP services (no ``http`` handler on any port, Fly's ``[[services]]``
    for databases, game servers...): ``[(edge port, internal_port, proxy_proto)]``, where
    ``proxy_proto`` means the machine wants a PROXY protocol v2 header first (the
    ``proxy_proto`` handler). Ports with a ``tls`` handler are E1's (the TLS edge)."""
    out = []
    for s in (config or {}).get("services") or []:
        if not isinstance(s, Mapping) or s.get("protocol", "tcp") != "tcp":
            continue
        ports = [p for p in s.get("ports") or [] if isinstance(p, Mapping)]
        if any("http" in (p.get("handlers") or []) for p in ports):
            continue
        internal = s.get("internal_port")
        if not _valid_port(internal):
            continue
        for p in ports:
            handlers = p.get("handlers") or []
            if _valid_port(p.get("port")) and "tls" not in handlers:
                out.append((p["port"], internal, "proxy_proto" in handlers))
    return out


def _valid_port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536


def declares_checks(config: Mapping[str, Any] | None) -> bool:
    """Whether the machine's config asks for health checks (top-level or per service)."""
    config = config or {}
    if config.get("checks"):
        return True
    return any(isinstance(s, Mapping) and s.get("checks") for s in config.get("services") or [])


def why_not_routable(machine: Mapping[str, Any] | None, status: Mapping[str, Any] | None) -> str | None:
    """None when the machine may get requests, else the reason it may not (for logs and tests)."""
    if not machine:
        return "no machine record"
    if machine.get("desired") != "started":
        return f"desired state is {machine.get('desired')!r}"
    if machine.get("cordoned"):
        return "cordoned"
    if not status:
        return "no status from the agent yet"
    if status.get("state") != "started":
        return f"state is {status.get('state')!r}"
    checks = status.get("checks") or {}
    if not isinstance(checks, Mapping):
        return "malformed checks"
    for name, result in checks.items():
        if not isinstance(result, Mapping) or result.get("status") != PASSING:
            got = result.get("status") if isinstance(result, Mapping) else result
            return f"check {name!r} is {got!r}"
    if not checks and declares_checks(machine.get("config")):
        return "checks have not passed yet"
    if _port(machine, status) is None:
        return "no host port for the http service"
    return None


def _port(machine: Mapping[str, Any], status: Mapping[str, Any], internal: int | None = None) -> int | None:
    ports = status.get("ports") or {}
    if not isinstance(ports, Mapping):
        return None
    service = http_service(machine.get("config")) if internal is None else {"internal_port": internal}
    if service is not None:
        port = ports.get(str(service.get("internal_port")))
    elif len(ports) == 1:
        port = next(iter(ports.values()))  # no services declared: the one port there is
    else:
        return None
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port
    return None


def backend_for(machine: Mapping[str, Any] | None, status: Mapping[str, Any] | None, key: str = ""
                ) -> Backend | None:
    """The machine as a :class:`Backend`, or None if it is not routable; ``key`` is its KV key."""
    if why_not_routable(machine, status) is not None:
        return None
    assert machine is not None and status is not None
    port = _port(machine, status)
    assert port is not None
    soft, hard, kind = _limits(http_service(machine.get("config")))
    app, mid = split_key(key) if key else (machine.get("app") or "", machine.get("id") or "")
    return Backend(str(mid), str(app), port, LOOPBACK, soft, hard, kind, str(machine.get("region") or ""))


def can_autostart(machine: Mapping[str, Any] | None, status: Mapping[str, Any] | None) -> bool:
    """Whether the edge may start this machine for a request (Fly's ``auto_start_machines``).

    Only a machine that should run (desired ``started``, not cordoned) but is stopped: one
    the edge stopped for idleness, or that exited. A machine a user stopped (desired
    ``stopped``) stays stopped; the agent would stop it again at its next reconcile anyway.
    """
    if not machine or not status or machine.get("desired") != "started" or machine.get("cordoned"):
        return False
    if status.get("state") not in ("stopped", "suspended"):
        return False
    service = http_service(machine.get("config"))
    return service is not None and service.get("autostart", True) is not False


def autostop_of(machine: Mapping[str, Any] | None) -> tuple[bool, int]:
    """(may the edge stop it when idle, min_machines_running) from the http service's config."""
    service = http_service((machine or {}).get("config"))
    if service is None:
        return False, 0
    mode = service.get("autostop", "off")
    n = service.get("min_machines_running", 0)
    return mode in ("stop", "suspend", True), n if isinstance(n, int) and n >= 0 else 0


def machines_to_stop(candidates: Iterable[tuple[str, bool, int]], inflight: Mapping[str, int],
                     last_active: Mapping[str, float], now: float, idle_after: float) -> list[str]:
    """Which running machines of one app to stop for idleness (``auto_stop_machines``).

    ``candidates``: every routed machine as (id, autostop allowed, min_machines_running).
    A machine goes when autostop is on for it, it has nothing in flight and has been idle
    ``idle_after`` seconds; the longest idle go first, and at least the largest
    ``min_machines_running`` of the app keep running.
    """
    cands = list(candidates)
    keep = max((m for _, _, m in cands), default=0)
    idle = sorted((last_active.get(mid, now), mid) for mid, on, _ in cands
                  if on and not inflight.get(mid) and now - last_active.get(mid, now) >= idle_after)
    room = max(len(cands) - keep, 0)
    return [mid for _, mid in idle[:room]]


@dataclass
class Routes:
    """A mirror of APPS, MACHINES and STATUS, with each app's routable backends.

    Feed it entries as the watches deliver them (``value`` None for a deleted
    key); ``backends(app)`` is recomputed for the app an entry belongs to only.
    """

    apps: set[str] = field(default_factory=set)
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    _routes: dict[str, tuple[Backend, ...]] = field(default_factory=dict)
    _routed: dict[str, str] = field(default_factory=dict)  # machine id -> app, of routed machines
    _keys: dict[str, set[str]] = field(default_factory=dict)  # app -> machine keys seen in either bucket
    held: set[str] = field(default_factory=set)  # machine ids kept out of the routes (being auto-stopped)

    def set_app(self, name: str, value: Any) -> None:
        if value is None:
            self.apps.discard(name)
        else:
            self.apps.add(name)

    def set_machine(self, key: str, value: Any) -> str:
        """Record a MACHINES entry; returns the app whose routes were recomputed."""
        return self._set(self.machines, key, value)

    def set_status(self, key: str, value: Any) -> str:
        """Record a STATUS entry; returns the app whose routes were recomputed."""
        return self._set(self.status, key, value)

    def replace(self, bucket: str, entries: Iterable[tuple[str, Any]]) -> None:
        """Swap one bucket's whole mirror (after a watch restarted from the beginning)."""
        entries = [(k, v) for k, v in entries if v is not None]
        if bucket == "apps":
            self.apps = {k for k, _ in entries}
            return
        table = self.machines if bucket == "machines" else self.status
        touched = {split_key(k)[0] for k in table}
        table.clear()
        for k, v in entries:
            if isinstance(v, dict):
                table[k] = v
        touched |= {split_key(k)[0] for k in table}
        self._keys = {}
        for k in itertools.chain(self.machines, self.status):
            self._keys.setdefault(split_key(k)[0], set()).add(k)
        for app in touched:
            self._recompute(app)

    def _set(self, table: dict[str, dict[str, Any]], key: str, value: Any) -> str:
        app, _ = split_key(key)
        if isinstance(value, dict):
            table[key] = value
            self._keys.setdefault(app, set()).add(key)
        else:
            table.pop(key, None)
            if key not in self.machines and key not in self.status:
                self._keys.get(app, set()).discard(key)
        self._recompute(app)
        return app

    def hold(self, app: str, machine: str, held: bool = True) -> None:
        """Keep ``machine`` out of ``app``'s routes whatever its records say (or let it back)."""
        if held:
            self.held.add(machine)
        else:
            self.held.discard(machine)
        self._recompute(app)

    def _recompute(self, app: str) -> None:
        for b in self._routes.get(app, ()):
            self._routed.pop(b.machine, None)
        out = []
        for key in sorted(self._keys.get(app, ())):
            b = backend_for(self.machines.get(key), self.status.get(key), key)
            if b is not None and b.machine not in self.held:
                out.append(b)
        if out:
            self._routes[app] = tuple(out)
            self._routed.update((b.machine, app) for b in out)
        else:
            self._routes.pop(app, None)
        if not self._keys.get(app):
            self._keys.pop(app, None)

    def known(self, app: str) -> bool:
        """Whether ``app`` exists (an APPS record or any machine): 503, not 404, when it has no backend."""
        return app in self.apps or app in self._keys

    def backends(self, app: str) -> tuple[Backend, ...]:
        return self._routes.get(app, ())

    def routable(self, machine: str) -> bool:
        """Whether any app routes to ``machine`` now (a drain waits until it does not)."""
        return machine in self._routed  # asked once per request: a lookup, not a scan

    def record(self, app: str, machine: str) -> dict[str, Any] | None:
        """The machine's MACHINES record, as mirrored."""
        return self.machines.get(f"{app}.{machine}")

    def sleeping(self, app: str) -> list[str]:
        """Machines of ``app`` the edge may start for a request (see :func:`can_autostart`)."""
        return [split_key(k)[1] for k in sorted(self._keys.get(app, ()))
                if can_autostart(self.machines.get(k), self.status.get(k))]

    def autostop(self, app: str) -> list[tuple[str, bool, int]]:
        """Every routed machine of ``app`` as (id, autostop on, min_machines_running)."""
        return [(b.machine, *autostop_of(self.machines.get(f"{app}.{b.machine}"))) for b in self.backends(app)]

    def tcp_listeners(self) -> dict[int, tuple[str, int, bool]]:
        """``{edge port: (app, internal_port, proxy_proto)}`` of every live machine's plain TCP
        services; when apps claim the same port, the first app by name keeps it."""
        out: dict[int, tuple[str, int, bool]] = {}
        for key in sorted(self.machines):
            rec = self.machines[key]
            if rec.get("desired") == "destroyed":
                continue
            for port, internal, pp in tcp_services(rec.get("config")):
                out.setdefault(port, (split_key(key)[0], internal, pp))
        return out

    def tcp_backends(self, app: str, internal_port: int) -> list[Backend]:
        """The routable machines of ``app`` with ``internal_port`` published (a TCP service)."""
        out = []
        for key in sorted(self._keys.get(app, ())):
            m, st = self.machines.get(key), self.status.get(key)
            b = backend_for(m, st, key)
            port = _port(m, st, internal_port) if b is not None else None  # type: ignore[arg-type]
            if b is not None and port is not None:
                soft, hard, kind = _limits(next((s for s in (m or {}).get("config", {}).get("services") or []
                                                 if isinstance(s, Mapping) and s.get("internal_port") == internal_port),
                                                None))
                out.append(Backend(b.machine, app, port, LOOPBACK, soft, hard, kind, b.region))
        return out

    def table(self) -> dict[str, list[str]]:
        """``{app: [machine ids]}`` of every routed app (for ``edge.inflight`` and logs)."""
        return {app: [b.machine for b in bs] for app, bs in sorted(self._routes.items())}


@dataclass
class Balancer:
    """Least-loaded choice, as Fly's proxy makes it.

    A backend's *load* is what its ``concurrency.type`` counts: in-flight requests
    (``requests``, the default; a WebSocket or TCP stream counts while open) or the
    edge's open connections to it (``connections``: in use plus idle in the pool).
    Tiers, best first: under ``soft_limit``, then under ``hard_limit``; never a new
    request that would take a backend above its hard limit (for ``connections``, an
    idle pooled connection may still be reused: that opens none). Inside a tier the
    least load wins; ties rotate, so equal machines share requests evenly. A backend
    whose connection just failed is avoided for ``penalty`` seconds, unless it is the
    only one left (the agent's STATUS update that it stopped follows shortly).
    """

    penalty: float = 2.0
    inflight: dict[str, int] = field(default_factory=dict)
    conns: dict[str, int] = field(default_factory=dict)  # open connections to each machine
    idle: dict[str, int] = field(default_factory=dict)   # of which idle in the edge's pool
    failed_until: dict[str, float] = field(default_factory=dict)
    _turn: int = 0

    def load(self, b: Backend) -> int:
        """What ``b``'s limits are compared with (see the class)."""
        return (self.conns if b.concurrency == "connections" else self.inflight).get(b.machine, 0)

    def _at_hard(self, b: Backend) -> bool:
        if b.hard_limit is None or self.load(b) < b.hard_limit:
            return False
        return not (b.concurrency == "connections" and self.idle.get(b.machine, 0) > 0)

    def choose(self, backends: Iterable[Backend], exclude: Iterable[str] = (), now: float = 0.0
               ) -> Backend | None:
        """The backend for the next request, or None when every one is excluded or full."""
        skip = set(exclude)
        candidates = [b for b in backends if b.machine not in skip]
        if not candidates:
            return None
        fresh = [b for b in candidates if self.failed_until.get(b.machine, 0.0) <= now]
        pool = fresh or candidates
        best: list[Backend] = []
        best_rank: tuple[int, int] | None = None
        for b in pool:
            if self._at_hard(b):
                continue
            n = self.load(b)
            tier = 0 if b.soft_limit is None or n < b.soft_limit else 1
            rank = (tier, n)
            if best_rank is None or rank < best_rank:
                best, best_rank = [b], rank
            elif rank == best_rank:
                best.append(b)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]

    def full(self, backends: Iterable[Backend]) -> bool:
        """Whether every backend is at its hard limit (a request may wait for a slot)."""
        bs = list(backends)
        return bool(bs) and all(self._at_hard(b) for b in bs)

    def above_soft(self, backends: Iterable[Backend]) -> bool:
        """Whether every backend is at or above its soft limit (time to wake a stopped machine)."""
        bs = list(backends)
        return bool(bs) and all(b.soft_limit is not None and self.load(b) >= b.soft_limit for b in bs)

    def acquire(self, backend: Backend) -> None:
        self.inflight[backend.machine] = self.inflight.get(backend.machine, 0) + 1

    def release(self, backend: Backend) -> None:
        _dec(self.inflight, backend.machine)

    def opened(self, machine: str) -> None:
        """A connection to ``machine`` was opened (it counts until :meth:`closed`)."""
        self.conns[machine] = self.conns.get(machine, 0) + 1

    def closed(self, machine: str) -> None:
        _dec(self.conns, machine)

    def pooled(self, machine: str, n: int = 1) -> None:
        """``n`` connections to ``machine`` went idle into the pool (negative: taken out)."""
        if n > 0:
            self.idle[machine] = self.idle.get(machine, 0) + n
        else:
            _dec(self.idle, machine, -n)

    def mark_failed(self, backend: Backend, now: float) -> None:
        for m in [m for m, t in self.failed_until.items() if t <= now]:
            del self.failed_until[m]  # expired marks: the dict stays as small as the failures
        self.failed_until[backend.machine] = now + self.penalty

    def forget(self, machines: Iterable[str]) -> None:
        """Drop failure marks of machines no longer routed (their ids are never reused)."""
        for m in machines:
            self.failed_until.pop(m, None)

    def counts(self) -> dict[str, int]:
        """``{machine id: in-flight requests}`` for every machine with any."""
        return dict(self.inflight)


def _dec(table: dict[str, int], key: str, n: int = 1) -> None:
    v = table.get(key, 0) - n
    if v > 0:
        table[key] = v
    else:
        table.pop(key, None)
