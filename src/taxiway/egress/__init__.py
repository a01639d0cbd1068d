"""The SSRF-safe egress proxy: roles, Smokescreen ACLs, address policy, the server.

Pure cores: :mod:`.hosts` (host normalization), :mod:`.addresses` (address
classes and policy), :mod:`.acl` (Smokescreen v1 ACLs), :mod:`.roles`,
:mod:`.http` (sans-I/O HTTP/1.1). I/O: :mod:`.resolver`, :mod:`.server`.
:func:`check` answers "would this request be allowed?" without sending anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from taxiway.egress.acl import Acl, Decision, Result
from taxiway.egress.addresses import AddressPolicy, AddressVerdict
from taxiway.egress.http import Target


@dataclass(frozen=True)
class CheckResult:
    target: Target
    acl: Decision | None
    address: AddressVerdict | None  # only for IP-literal hosts: names are resolved when connecting

    @property
    def allowed(self) -> bool:
        if self.acl is not None and self.acl.result is Result.DENY:
            return False
        return self.address is None or self.address.allowed

    @property
    def decision(self) -> str:
        if not self.allowed:
            return "deny"
        return "report" if self.acl is not None and self.acl.result is Result.ALLOW_AND_REPORT else "allow"

    @property
    def reason(self) -> str:
        if self.acl is not None and self.acl.result is Result.DENY:
            return self.acl.reason
        if self.address is not None and not self.address.allowed:
            return self.address.reason
        parts = [self.acl.reason if self.acl else "egress ACL is not configured"]
        if self.address is not None:
            parts.append(self.address.reason)
        else:
            parts.append("the name's addresses are checked when the proxy resolves it")
        return "; ".join(parts)


def is_loopback_name(name: str) -> bool:
    """``localhost`` and names under it always mean this machine (RFC 6761)."""
    return name == "localhost" or name.endswith(".localhost")


def check(acl: Acl | None, role: str | None, target: Target, policy: AddressPolicy) -> CheckResult:
    """The proxy's decision for ``role`` reaching ``target``, without resolving or dialling."""
    decision = acl.decide(role, target.host.name) if acl is not None else None
    verdict = None
    if target.host.ip is not None:
        verdict = policy.judge(target.host.ip, target.port)
    elif is_loopback_name(target.host.name):
        import ipaddress

        from taxiway.egress.addresses import classify

        lo = ipaddress.ip_address("127.0.0.1")
        verdict = AddressVerdict(False, f"{target.host.name} is a loopback name", lo, classify(lo))
    return CheckResult(target, decision, verdict)
