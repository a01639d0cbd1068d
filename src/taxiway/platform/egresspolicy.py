"""Who may reach what through the platform's egress proxy (pure: no I/O, no NATS).

The platform's egress proxy (:mod:`taxiway.platform.egressd`) mirrors two buckets
into a :class:`Directory` and asks it two questions per request:

- **who is asking**: :meth:`Directory.machine_of` maps a client address to the
  machine whose ``STATUS.private_ip`` it is (the private network lets no machine
  send with another's address, so the address is the identity); the role is the
  machine's app. An address no machine has is unknown and denied.
- **what may it reach**: :meth:`Directory.acl_for` gives the app's ACL, made by
  :func:`app_acl` from the ``[egress]`` table of the app's current release
  (the newest one that is deploying or deployed). Without ``[egress]``: every
  public name is allowed. Private and internal addresses (RFC 1918, loopback,
  link-local and metadata, ULA including the platform's own fdaa::/16, mapped
  and embedded IPv4 forms) are denied for every app by the proxy's address
  policy (:mod:`taxiway.egress.addresses`), whatever the ACL says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from taxiway.egress.acl import Acl, Decision, DomainSet, Policy, Result, Rule

# Releases whose [egress] applies: a deploy marks its release "running" before it makes any
# machine, so a new machine is never judged by the release it replaces.
LIVE_RELEASE = ("running", "complete")


@dataclass
class AppAcl(Acl):
    """A Smokescreen ACL for one app plus its ``blocked_domains``, which win over everything
    (in Smokescreen a rule's allowed domains come before the global deny list; here a name
    the app blocked stays blocked even when an allowed ``*.`` glob covers it)."""

    blocked: DomainSet = field(default_factory=lambda: DomainSet(()))

    def decide(self, role: str | None, host: str, connect_proxy_host: str = "") -> Decision:
        if self.blocked.matches(host):
            rule = self.rule(role)
            return Decision(Result.DENY, "host matched blocked_domains of the app", rule.project if rule else "",
                            role)
        return super().decide(role, host, connect_proxy_host)


def app_acl(app: str, egress: dict[str, Any] | None) -> AppAcl:
    """The ACL of ``app`` from its normalised ``[egress]`` (see appconfig); None: the default
    (every name allowed: the address policy still denies every private address)."""
    egress = egress or {}
    mode = Policy(egress.get("mode") or "open")
    rule = Rule(project=app, policy=mode, domain_globs=tuple(egress.get("allowed_domains") or ()))
    acl = AppAcl(rules={app: rule}, blocked=DomainSet(egress.get("blocked_domains") or ()))
    acl.compile()
    return acl


@dataclass(frozen=True)
class Machine:
    """A machine as the proxy knows it: enough to name it in the app's logs."""

    id: str
    app: str
    region: str
    address: str


def _canonical_ip(text: str) -> str | None:
    """The compressed form of an IP address (what a socket's peername gives), or None."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return None


class Directory:
    """The platform state the proxy needs, kept current by :meth:`status` and :meth:`release`
    (one call per watched KV change; None for a deleted key)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Machine] = {}       # STATUS key -> machine
        self._by_address: dict[str, Machine] = {}   # private address -> machine
        self._releases: dict[str, dict[int, tuple[str, dict[str, Any] | None]]] = {}  # app -> version -> (status, egress)
        self._acls: dict[str, AppAcl] = {}          # app -> ACL of its current release (made once per change)

    # -- updates (from the watches) --

    def status(self, key: str, record: dict[str, Any] | None) -> None:
        """A STATUS change: the machine's private address, or its removal."""
        old = self._by_key.pop(key, None)
        if old is not None and self._by_address.get(old.address) is old:
            del self._by_address[old.address]
        if not record or record.get("state") == "destroyed":
            return
        address = _canonical_ip(str(record.get("private_ip") or ""))
        app = record.get("app") or key.partition(".")[0]
        if address is None or not app:
            return
        m = Machine(str(record.get("id") or key.partition(".")[2]), str(app), str(record.get("region") or "local"),
                    address)
        self._by_key[key] = m
        self._by_address[address] = m

    def release(self, key: str, record: dict[str, Any] | None) -> None:
        """A RELEASES change (key ``<app>.<version>``): its status and [egress]."""
        app, _, version = key.rpartition(".")
        if not app or not version.isdigit():
            return
        releases = self._releases.setdefault(app, {})
        if record is None:
            releases.pop(int(version), None)
        else:
            releases[int(version)] = (str(record.get("status") or ""), (record.get("config") or {}).get("egress"))
        if not releases:
            del self._releases[app]
        self._acls.pop(app, None)

    # -- questions (from the proxy, per request) --

    def machine_of(self, address: str) -> Machine | None:
        """The machine whose private address ``address`` is, or None."""
        m = self._by_address.get(address)
        if m is None and "%" in address:
            m = self._by_address.get(address.split("%")[0])
        return m

    def role_of(self, address: str) -> str | None:
        """The role (the app) of a client address; None for an unknown one."""
        m = self.machine_of(address)
        return m.app if m is not None else None

    def egress_of(self, app: str) -> dict[str, Any] | None:
        """The [egress] of the app's current release (the newest running or complete one)."""
        live = [(v, egress) for v, (status, egress) in self._releases.get(app, {}).items() if status in LIVE_RELEASE]
        return max(live, key=lambda t: t[0])[1] if live else None

    def acl_for(self, role: str | None) -> Acl | None:
        """The ACL to decide ``role``'s requests with (made once per release change)."""
        if role is None:
            return None
        acl = self._acls.get(role)
        if acl is None:
            acl = self._acls[role] = app_acl(role, self.egress_of(role))
        return acl

    def machines(self) -> Sequence[Machine]:
        return list(self._by_key.values())


def denial_line(fields: dict[str, Any]) -> str:
    """The line the app's log gets for a decision of the proxy (what ``taxiway logs`` shows)."""
    what = "denied" if fields.get("decision") == "deny" else "allowed, reported" \
        if fields.get("decision") == "report" else str(fields.get("decision"))
    kind = "CONNECT" if fields.get("proxy_type") == "connect" else "HTTP"
    line = f"egress {what}: {kind} {fields.get('requested_host')}: {fields.get('reason')}"
    if fields.get("decision") == "report":
        line += " (mode report: enforce would deny it)"
    return line
