"""The ``.internal`` names, as a pure function of the platform's state (no I/O, no DNS library).

:mod:`taxiway.platform.dnsserver` mirrors the APPS, MACHINES and STATUS buckets
into a :class:`Snapshot` and asks :func:`resolve` for every question; this module
decides what each name means, for whom:

==========================================  =====  ==============================================
name                                        type   answer
==========================================  =====  ==============================================
``<app>.internal``                          AAAA   every started machine of the app
``<region>.<app>.internal``                 AAAA   the app's started machines in that region
``<id>.vm.<app>.internal``                  AAAA   that machine (while it is started)
``<process>.process.<app>.internal``        AAAA   the started machines of a process group
``top<N>.nearest.of.<app>.internal``        AAAA   N started machines, the asker's region first
``vms.<app>.internal``                      TXT    ``"<id> <region>,..."`` of the started machines
``regions.<app>.internal``                  TXT    ``"<region>,..."`` where the app has started machines
``_apps.internal``                          TXT    ``"<app>,..."`` every app of the asker's org
``_instances.internal``                     TXT    one ``instance=..,app=..,ip=..,region=..`` each
==========================================  =====  ==============================================

Who asks is decided by the query's source address (:func:`asker_for`): a
machine's private address names its machine, hence its app, org and region; the
fabric's anti-spoofing rules make that address trustworthy. An asker only ever
sees its own org: another org's app is NXDOMAIN, exactly as an app that does not
exist, so names do not leak. An unknown source gets REFUSED for ``.internal``.

Names are matched case-insensitively (the reply echoes the question as asked, so
resolvers that randomise case, "0x20", accept it). Every answer, negative ones
included (through the SOA's minimum), has a TTL of :data:`TTL` seconds: short,
as Fly's are, because a machine that stops must leave clients' caches quickly;
the server itself follows the state within a second. Orders are deterministic
(by machine id; nearest: the asker's region first, then by region), so an answer
is a function of the snapshot alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from taxiway.platform import network, schema

TTL = 5                     # seconds, positive and negative answers alike
ZONE = "internal"
MAX_NEAREST = 64            # top<N>: more than this is answered as this many
TXT_CHUNK = 255             # one DNS character-string; longer TXT values are split, clients join them

NOERROR, NXDOMAIN, SERVFAIL, REFUSED = 0, 3, 2, 5

_TOP = re.compile(r"^top([1-9][0-9]{0,3})$")


@dataclass(frozen=True)
class Machine:
    """What DNS needs of a machine: from its MACHINES record (desired) and STATUS (observed)."""

    id: str
    app: str
    region: str = schema.DEFAULT_REGION
    process_group: str = schema.DEFAULT_PROCESS
    state: str = "created"
    private_ip: str | None = None

    @property
    def started(self) -> bool:
        return self.state == "started" and self.private_ip is not None


@dataclass(frozen=True)
class Asker:
    """Who sent a query: an org (whose names it sees) and, for a machine, its region and id."""

    org: str
    region: str | None = None
    machine: str | None = None


@dataclass(frozen=True)
class Record:
    """One resource record; ``value`` is an IPv6 address (AAAA) or a tuple of strings (TXT)."""

    type: str
    value: Any
    ttl: int = TTL


@dataclass(frozen=True)
class Answer:
    """The reply to one question: rcode plus records (empty with NOERROR = NODATA)."""

    rcode: int = NOERROR
    records: tuple[Record, ...] = ()

    @property
    def nodata(self) -> bool:
        return self.rcode == NOERROR and not self.records


@dataclass
class Snapshot:
    """The platform's state as DNS sees it, indexed once per change for quick questions.

    ``apps`` maps an app to its org; ``machines`` are every machine with a MACHINES
    record (a STATUS without one is a machine being destroyed: not named).
    """

    apps: Mapping[str, str]
    machines: Iterable[Machine] = ()
    networks: Mapping[int, str] = field(default_factory=dict)   # org network number -> org (tw_networks)
    by_app: dict[str, list[Machine]] = field(init=False)
    by_ip: dict[ipaddress.IPv6Address, Machine] = field(init=False)
    org_nets: dict[ipaddress.IPv6Network, str] = field(init=False)

    def __post_init__(self) -> None:
        self.apps = dict(self.apps)
        self.by_app = {}
        self.by_ip = {}
        self.org_nets = {}
        for m in sorted(self.machines, key=lambda m: (m.app, m.id)):
            if m.app not in self.apps:
                continue
            self.by_app.setdefault(m.app, []).append(m)
            ip = _ip6(m.private_ip)
            if ip is not None:
                self.by_ip[ip] = m
                # Every machine of an org network shares its /48 (the contract's layout): a
                # source in that /48 is of that org even before its own STATUS names it.
                self.org_nets.setdefault(ipaddress.IPv6Network((ip, 48), strict=False), self.apps[m.app])
        self.machines = tuple(m for ms in self.by_app.values() for m in ms)

    @classmethod
    def from_records(cls, apps: Mapping[str, Any], machines: Mapping[str, Any],
                     status: Mapping[str, Any], networks: Mapping[str, Any] | None = None) -> Snapshot:
        """Build from the buckets' values: APPS ``{app: rec}``, MACHINES and STATUS ``{"<app>.<id>": rec}``,
        the org networks' ``{"net.<n>": {"org", "network"}}``."""
        nets = {}
        for key, rec in (networks or {}).items():
            if key.startswith("net.") and isinstance(rec, dict) and isinstance(rec.get("network"), int):
                nets[rec["network"]] = str(rec.get("org"))
        orgs = {name: str(rec.get("org") or schema.DEFAULT_ORG) for name, rec in apps.items()
                if isinstance(rec, dict)}
        out = []
        for key, rec in machines.items():
            if not isinstance(rec, dict):
                continue
            app, _, mid = key.partition(".")
            st = status.get(key)
            st = st if isinstance(st, dict) else {}
            meta = (rec.get("config") or {}).get("metadata") or {} if isinstance(rec.get("config"), dict) else {}
            group = rec.get("process_group") or meta.get("process_group") or schema.DEFAULT_PROCESS
            state = st.get("state") or "created"
            if rec.get("desired") == "destroyed":
                state = "destroyed"
            out.append(Machine(id=mid.lower(), app=app.lower(), region=str(rec.get("region") or schema.DEFAULT_REGION).lower(),
                               process_group=str(group).lower(), state=state,
                               private_ip=_address(st.get("private_ip"))))
        return cls({a.lower(): o for a, o in orgs.items()}, out, nets)

    def started(self, app: str) -> list[Machine]:
        return [m for m in self.by_app.get(app, ()) if m.started]

    def org_apps(self, org: str) -> list[str]:
        return sorted(a for a, o in self.apps.items() if o == org)


def _address(value: Any) -> str | None:
    """STATUS.private_ip as a canonical IPv6 address; anything else is no address."""
    ip = _ip6(value) if isinstance(value, str) else None
    return str(ip) if ip is not None else None


def _ip6(text: str | None) -> ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return None if ip.ipv4_mapped else ip
    return None


def asker_for(snapshot: Snapshot, source: str,
              static: Mapping[ipaddress.IPv4Network | ipaddress.IPv6Network, str] | None = None) -> Asker | None:
    """The asker behind a query's source address, or None (a stranger).

    A machine's own private address names that machine (org, region); another
    address inside an org network's /48 names the org (a machine whose STATUS is
    not written yet: the network's number from the address, its org from the
    networks bucket or from the machines already there); ``static`` maps other
    sources (e.g. the host's loopback, for an operator's ``dig``) to an org.
    """
    ip = _ip6(source)
    if ip is not None:
        m = snapshot.by_ip.get(ip)
        if m is not None:
            return Asker(snapshot.apps[m.app], m.region, m.id)
        number = network.org_of(ip)
        if number is not None and number in snapshot.networks:
            return Asker(snapshot.networks[number])
        org = snapshot.org_nets.get(ipaddress.IPv6Network((ip, 48), strict=False))
        if org is not None:
            return Asker(org)
    if static:
        try:
            addr = ipaddress.ip_address(source.split("%")[0])
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        best = None
        for net, org in static.items():
            if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0].prefixlen):
                best = (net, org)
        if best is not None:
            return Asker(best[1])
    return None


def is_internal(name: str) -> bool:
    """Whether ``name`` is ours to answer (``internal`` and below); others are forwarded."""
    n = name.rstrip(".").lower()
    return n == ZONE or n.endswith("." + ZONE)


def soa() -> tuple[str, str, int, int, int, int, int]:
    """The zone's SOA (mname, rname, serial, refresh, retry, expire, minimum): sent with
    negative answers so resolvers cache a NXDOMAIN or NODATA for :data:`TTL` only."""
    return ("ns.internal", "hostmaster.internal", 1, 3600, 600, 86400, TTL)


def _aaaa(machines: Iterable[Machine]) -> tuple[Record, ...]:
    return tuple(Record("AAAA", m.private_ip) for m in machines)


def _txt(text: str) -> tuple[Record, ...]:
    data = text.encode()
    chunks = tuple(data[i:i + TXT_CHUNK].decode("utf-8", "replace") for i in range(0, len(data), TXT_CHUNK))
    return (Record("TXT", chunks or ("",)),)


def nearest(machines: Iterable[Machine], region: str | None) -> list[Machine]:
    """Started machines, the ``region``'s first, then by region and id (#19 will weigh distance)."""
    return sorted((m for m in machines if m.started), key=lambda m: (m.region != region, m.region, m.id))


def resolve(snapshot: Snapshot, asker: Asker | None, name: str, qtype: str) -> Answer:
    """Answer one question about a ``.internal`` name (see the module's table).

    ``qtype`` is a type's mnemonic ("AAAA", "TXT", "A", "ANY"...). A name that
    exists but has no record of that type is NODATA; an app of another org, or
    one that does not exist, is NXDOMAIN; a stranger (``asker`` None) is REFUSED.
    """
    labels = name.rstrip(".").lower().split(".")
    if labels[-1] != ZONE:
        return Answer(REFUSED)
    if asker is None:
        return Answer(REFUSED)
    qtype = qtype.upper()
    want_aaaa = qtype in ("AAAA", "ANY")
    want_txt = qtype in ("TXT", "ANY")
    rest = labels[:-1]
    if not rest:  # the zone's apex: no records here but the SOA (which the server adds)
        return Answer()
    if len(rest) == 1 and rest[0] in ("_apps", "_instances"):
        apps = snapshot.org_apps(asker.org)
        if not want_txt:
            return Answer()
        if rest[0] == "_apps":
            return Answer(NOERROR, _txt(",".join(apps)))
        return Answer(NOERROR, tuple(
            r for a in apps for m in snapshot.started(a)
            for r in _txt(f"instance={m.id},app={a},ip={m.private_ip},region={m.region}")))
    app = rest[-1]
    if snapshot.apps.get(app) != asker.org:
        return Answer(NXDOMAIN)  # another org's app reads exactly as a missing one
    sub = rest[:-1]
    machines = snapshot.by_app.get(app, [])
    started = [m for m in machines if m.started]
    if not sub:
        return Answer(NOERROR, _aaaa(started) if want_aaaa else ())
    if sub == ["vms"]:
        return Answer(NOERROR, _txt(",".join(f"{m.id} {m.region}" for m in started)) if want_txt else ())
    if sub == ["regions"]:
        return Answer(NOERROR, _txt(",".join(sorted({m.region for m in started}))) if want_txt else ())
    if len(sub) == 1:
        # <region>.<app>.internal: a name while the app has a machine there (NODATA when none is
        # started); another label is NXDOMAIN, so a resolv.conf search of "<app>.internal" moves on
        if not any(m.region == sub[0] and m.state != "destroyed" for m in machines):
            return Answer(NXDOMAIN)
        return Answer(NOERROR, _aaaa(m for m in started if m.region == sub[0]) if want_aaaa else ())
    if len(sub) == 2 and sub[1] == "vm":
        found = [m for m in machines if m.id == sub[0] and m.state != "destroyed"]
        if not found:
            return Answer(NXDOMAIN)
        return Answer(NOERROR, _aaaa(m for m in found if m.started) if want_aaaa else ())
    if len(sub) == 2 and sub[1] == "process":
        return Answer(NOERROR, _aaaa(m for m in started if m.process_group == sub[0]) if want_aaaa else ())
    if len(sub) == 3 and sub[1:] == ["nearest", "of"]:
        top = _TOP.match(sub[0])
        if top is None:
            return Answer(NXDOMAIN)
        n = min(int(top.group(1)), MAX_NEAREST)
        return Answer(NOERROR, _aaaa(nearest(started, asker.region)[:n]) if want_aaaa else ())
    return Answer(NXDOMAIN)


# -- forwarding: what may leave through the host's resolver -------------------------------------

IN = 1
# Record types a program's ordinary lookups use; anything else (ANY, AXFR, NULL, private types,
# meta queries) is how DNS tunnels and resolver probes look, and is REFUSED.
FORWARD_TYPES = frozenset({
    1,    # A
    2,    # NS
    5,    # CNAME
    6,    # SOA
    12,   # PTR (fdaa::/16's reverse names never get here: answered locally)
    15,   # MX
    16,   # TXT
    28,   # AAAA
    33,   # SRV
    64,   # SVCB
    65,   # HTTPS
    257,  # CAA
})


def forward_refusal(qclass: int, qtype: int, name: str, forwarding: bool,
                    acl: Any | None = None, role: str | None = None) -> int | None:
    """None when a query for a name outside ``.internal`` may go to the upstream resolver,
    else the rcode to answer it with (REFUSED).

    ``forwarding``: whether the source may forward at all (a machine, or a source the
    operator named with ``--org-of``; an unknown source may not). Only class IN and
    :data:`FORWARD_TYPES` leave. ``acl``/``role``: the asking machine's egress ACL
    (:func:`taxiway.platform.egresspolicy.app_acl`): a name it denies (mode enforce and
    not in allowed_domains, or in blocked_domains) is REFUSED, the same decision the
    egress proxy makes, so DNS is no way around ``[egress]``.
    """
    if not forwarding or qclass != IN or qtype not in FORWARD_TYPES:
        return REFUSED
    if acl is not None and not acl.decide(role, name.rstrip(".").lower()).allowed:
        return REFUSED
    return None
