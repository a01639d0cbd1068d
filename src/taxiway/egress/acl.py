"""Smokescreen's egress ACL (YAML ``version: v1``), read unchanged, decided the same way.

Pure: :func:`parse_acl` takes the YAML text, :meth:`Acl.decide` takes a role
and a host and returns a :class:`Decision` whose ``reason`` strings are
Smokescreen's own, so logs and tooling written for Smokescreen keep working.
Decision order (Smokescreen's): the rule's allowed domains, then the global
deny list, then the global allow list, then the rule's action; a role with no
rule of its own uses ``default``, and with no default it is denied.
"""

from __future__ import annotations

import difflib
import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.egress.hosts import HostError, check_name_shape, normalize_name
from taxiway.errors import InvalidInput


class AclError(InvalidInput):
    """An ACL file Smokescreen would refuse to load."""


class Policy(enum.Enum):
    OPEN = "open"
    REPORT = "report"
    ENFORCE = "enforce"


class Result(enum.Enum):
    ALLOW = "allow"
    ALLOW_AND_REPORT = "allow-and-report"
    DENY = "deny"


def policy_from_action(action: Any) -> Policy:
    try:
        return Policy(action)
    except ValueError:
        raise AclError(f"unknown action {action}") from None


@dataclass(frozen=True)
class MitmDomain:
    domain: str
    add_headers: Mapping[str, str] = field(default_factory=dict)
    detailed_http_logs: bool = False
    detailed_http_logs_full_headers: Sequence[str] = ()


@dataclass(frozen=True)
class Rule:
    project: str
    policy: Policy
    domain_globs: Sequence[str] = ()
    mitm_domains: Sequence[MitmDomain] = ()
    external_proxy_globs: Sequence[str] = ()

    @functools.cached_property
    def domains(self) -> DomainSet:
        """``domain_globs`` compiled once (a frozen rule's globs never change)."""
        return DomainSet(self.domain_globs)

    @functools.cached_property
    def external_proxies(self) -> DomainSet:
        return DomainSet(self.external_proxy_globs)


@dataclass(frozen=True)
class Decision:
    result: Result
    reason: str
    project: str = ""
    role: str | None = None
    default: bool = False

    @property
    def allowed(self) -> bool:
        return self.result is not Result.DENY

    @property
    def would_deny(self) -> bool:
        """True when an ``enforce`` rule would have denied what was let through or denied."""
        return self.result is not Result.ALLOW


def validate_glob(svc: str, glob: Any) -> None:
    """Smokescreen's domain-glob rules: a leading ``*.`` only, in normalized (Punycode) form."""
    if not isinstance(glob, str) or glob == "":
        raise AclError(f"{svc}: glob cannot be empty")
    if glob in ("*", "*."):
        raise AclError(f"{svc}: {glob}: domain glob must not match everything")
    if glob.startswith("*") and not glob.startswith("*."):
        raise AclError(f"{svc}: {glob}: domain glob must represent a full prefix (sub)domain")
    domain = glob.removeprefix("*.")
    if "*" in domain:
        raise AclError(f"{svc}: {glob}: domain globs are only supported as prefix")
    try:
        normalized = normalize_name(domain)
        check_name_shape(normalized)
    except HostError as e:
        raise AclError(f"{svc}: {glob}: incorrect ACL entry: {e}") from None
    if normalized != domain:
        if glob.startswith("*."):
            normalized = "*." + normalized
        raise AclError(f'{svc}: {glob}: incorrect ACL entry; use "{normalized}"')


@functools.lru_cache(maxsize=8192)
def _canonical(host: str) -> str | None:
    """Normalized and without its one trailing dot, or None (also for ``a..``); cached, since hosts repeat."""
    try:
        return check_name_shape(normalize_name(host))
    except HostError:
        return None


class DomainSet:
    """Domain globs compiled once: exact names in one set, ``*.x`` bases in another.

    ``matches`` normalizes the host once and then costs one set lookup per
    label, whatever the number of globs; it agrees with :func:`host_matches_glob`
    applied to every glob (the tests check this on random names and globs).
    """

    __slots__ = ("exact", "below")

    def __init__(self, globs: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.below: set[str] = set()  # "*.x" is stored as "x"
        for glob in globs:
            if not isinstance(glob, str):
                continue
            wildcard = glob.startswith("*.")
            g = _canonical(glob.removeprefix("*.") if wildcard else glob)
            if g is not None:
                (self.below if wildcard else self.exact).add(g)

    def __len__(self) -> int:
        return len(self.exact) + len(self.below)

    def matches(self, host: str) -> bool:
        if not host or not (self.exact or self.below):
            return False
        return self.matches_canonical(_canonical(host))

    def matches_canonical(self, h: str | None) -> bool:
        """``matches`` for a host already passed through ``_canonical``."""
        if h is None:
            return False
        if h in self.exact:
            return True
        if self.below:
            i = h.find(".")
            while i >= 0:
                if h[i + 1:] in self.below:
                    return True
                i = h.find(".", i + 1)
        return False


def host_matches_glob(host: str, glob: str) -> bool:
    """Match after IDNA, lower-casing and dropping one trailing dot; ``*.x`` matches below x only."""
    if not host:
        return False
    h = _canonical(host)
    wildcard = glob.startswith("*.")
    g = _canonical(glob.removeprefix("*.") if wildcard else glob)
    if h is None or g is None:
        return False
    return h.endswith("." + g) if wildcard else h == g


@dataclass
class Acl:
    rules: dict[str, Rule] = field(default_factory=dict)
    default: Rule | None = None
    global_deny: Sequence[str] = ()
    global_allow: Sequence[str] = ()
    disabled: set[Policy] = field(default_factory=set)
    # Keys read (Smokescreen has them) but not applied by taxiway's proxy, one line per key.
    warnings: tuple[str, ...] = ()
    _compiled: dict[str, tuple[Sequence[str], DomainSet]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def _global(self, which: str) -> DomainSet:
        """The global deny or allow list, compiled once (again only if it is replaced)."""
        globs = self.global_deny if which == "deny" else self.global_allow
        hit = self._compiled.get(which)
        if hit is None or hit[0] is not globs:
            hit = self._compiled[which] = (globs, DomainSet(globs))
        return hit[1]

    def compile(self) -> None:
        """Compile every glob list now, so that the first request is as fast as the rest."""
        for r in [*self.rules.values(), *([self.default] if self.default else [])]:
            _ = r.domains, r.external_proxies
        self._global("deny")
        self._global("allow")

    def rule(self, role: str | None) -> Rule | None:
        """The role's rule, or the default rule."""
        if role is not None and role in self.rules:
            return self.rules[role]
        return self.default

    def project(self, role: str) -> str:
        rule = self.rule(role)
        if rule is None:
            raise AclError(f"no rule for service: {role}")
        return rule.project

    def _check_enabled(self, svc: str, policy: Policy) -> None:
        if policy in self.disabled:
            raise AclError(f"rule for svc:{svc} utilizes a disabled policy:{policy.value}")

    def validate_rule(self, svc: str, r: Rule) -> None:
        for g in r.domain_globs:
            validate_glob(svc, g)
        for m in r.mitm_domains:
            validate_glob(svc, m.domain)
            if m.domain not in r.domain_globs:
                raise AclError(
                    f"domain {m.domain} was added to mitm_domains but is missing in allowed_domains")
        for g in r.external_proxy_globs:
            validate_glob(svc, g)

    def add(self, svc: str, r: Rule) -> None:
        self._check_enabled(svc, r.policy)
        self.validate_rule(svc, r)
        if svc in self.rules:
            raise AclError(f"rule already exists for service {svc}")
        self.rules[svc] = r

    def validate(self) -> None:
        for svc, r in self.rules.items():
            self.validate_rule(svc, r)
            self._check_enabled(svc, r.policy)
        if self.default is not None:
            self.validate_rule("default_rule", self.default)
            self._check_enabled("default_rule", self.default.policy)
        for g in self.global_deny:
            validate_glob("global_deny_list", g)
        for g in self.global_allow:
            validate_glob("global_allow_list", g)

    def decide(self, role: str | None, host: str, connect_proxy_host: str = "") -> Decision:
        """Smokescreen's decision for ``role`` asking to reach ``host``."""
        rule = self.rule(role)
        if rule is None:
            return Decision(Result.DENY, "no rule matched", "", role)
        is_default = rule is self.default and (role is None or role not in self.rules)

        def d(result: Result, reason: str) -> Decision:
            return Decision(result, reason, rule.project, role, is_default)

        if connect_proxy_host and not rule.external_proxies.matches(connect_proxy_host):
            return d(Result.DENY, "connect proxy host not allowed in rule")
        # Normalized once; each list is then a few set lookups, however long it is.
        deny, allow = self._global("deny"), self._global("allow")
        h = _canonical(host) if host and (rule.domains or deny or allow) else None
        if rule.domains.matches_canonical(h):
            return d(Result.ALLOW, "host matched allowed domain in rule")
        if deny.matches_canonical(h):
            return d(Result.DENY, "host matched rule in global deny list")
        if allow.matches_canonical(h):
            return d(Result.ALLOW, "host matched rule in global allow list")
        result, reason = {
            Policy.REPORT: (Result.ALLOW_AND_REPORT, "rule has allow and report policy"),
            Policy.ENFORCE: (Result.DENY, "rule has enforce policy"),
            Policy.OPEN: (Result.ALLOW, "rule has open enforcement policy"),
        }[rule.policy]
        return d(result, "default rule policy used" if is_default else reason)


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise AclError(f"{what} must be a list")
    return [str(v) if isinstance(v, (int, float)) else v for v in value]


class UnknownKeyError(AclError):
    """A key Smokescreen's v1 format does not have (a typo, most often); names the file itself."""


# The fields of Smokescreen's YAMLConfig, YAMLRule and YAMLMitmDomain (acl/v1/yaml_loader.go).
TOP_KEYS = ("version", "services", "default", "global_deny_list", "global_allow_list")
RULE_KEYS = ("name", "project", "action", "allowed_domains", "allowed_external_proxies", "mitm_domains")
MITM_KEYS = ("domain", "add_headers", "detailed_http_logs", "detailed_http_logs_full_headers")


def _check_keys(raw: dict, known: Sequence[str], what: str, source: str) -> None:
    """Refuse keys Smokescreen would silently ignore: a typo there loosens or tightens a rule unseen."""
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownKeyError(f"unknown key '{key}' in {source}{hint}",
                              f"{what} may only have {', '.join(known)}")


# Smokescreen keys taxiway loads and validates but does not act on (no MITM, no
# CONNECT-to-external-proxy checks): said once per key, so nobody relies on them unknowingly.
UNSUPPORTED_RULE_KEYS = ("mitm_domains", "allowed_external_proxies")


def _unsupported(rules: Sequence[Any]) -> tuple[str, ...]:
    out = []
    for key in UNSUPPORTED_RULE_KEYS:
        where = [str(r.get("name") or "default") for r in rules if isinstance(r, dict) and r.get(key)]
        if where:
            out.append(f"'{key}' is not supported by taxiway egress and has no effect"
                       f" (used by {', '.join(where[:5])}{', ...' if len(where) > 5 else ''})")
    return tuple(out)


def _rule(raw: Any, what: str, source: str = "the ACL") -> Rule:
    if not isinstance(raw, dict):
        raise AclError(f"{what} must be a mapping")
    _check_keys(raw, RULE_KEYS, what, source)
    mitm = []
    for m in raw.get("mitm_domains") or []:
        if not isinstance(m, dict):
            raise AclError(f"{what}: mitm_domains entries must be mappings")
        _check_keys(m, MITM_KEYS, f"{what}: mitm_domains entries", source)
        mitm.append(MitmDomain(
            domain=m.get("domain") or "",
            add_headers=dict(m.get("add_headers") or {}),
            detailed_http_logs=bool(m.get("detailed_http_logs")),
            detailed_http_logs_full_headers=tuple(m.get("detailed_http_logs_full_headers") or ()),
        ))
    return Rule(
        project=str(raw.get("project") or ""),
        policy=policy_from_action(raw.get("action")),
        domain_globs=tuple(_str_list(raw.get("allowed_domains"), f"{what}: allowed_domains")),
        mitm_domains=tuple(mitm),
        external_proxy_globs=tuple(
            _str_list(raw.get("allowed_external_proxies"), f"{what}: allowed_external_proxies")),
    )


def parse_acl(text: str, disabled_actions: Iterable[str] = (), source: str = "the ACL") -> Acl:
    """Parse and validate an ACL, raising AclError where Smokescreen's loader fails.

    Also refuses keys the v1 format does not have (Smokescreen ignores them),
    after Smokescreen's own checks so its files fail with its messages.
    """
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AclError(f"invalid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(doc, dict):
        doc = {}
    version = doc.get("version")
    if version != "v1":
        raise AclError(f'expected version "v1" got "{version or ""}"')
    services = doc.get("services")
    if services is None:
        raise AclError("Top level list 'services' is missing")
    if not isinstance(services, list):
        raise AclError("'services' must be a list")
    _check_keys(doc, TOP_KEYS, "the top level", source)
    acl = Acl()
    acl.warnings = _unsupported([*services, doc.get("default")])
    for i, svc in enumerate(services):
        name = str(svc.get("name") or "") if isinstance(svc, dict) else ""
        acl.add(name, _rule(svc, f"services[{i}]", source))
    if doc.get("default") is not None:
        acl.default = _rule(doc["default"], "default", source)
    acl.global_allow = tuple(_str_list(doc.get("global_allow_list"), "global_allow_list"))
    acl.global_deny = tuple(_str_list(doc.get("global_deny_list"), "global_deny_list"))
    for a in disabled_actions:
        acl.disabled.add(policy_from_action(a))
    acl.validate()
    acl.compile()
    return acl


def load_acl(path: str | Path, disabled_actions: Iterable[str] = ()) -> Acl:
    """Read an ACL file; errors name the file and say how to check it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AclError(f"cannot read ACL {path}: {e.strerror}", "pass an existing file to --acl") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AclError(f"ACL {path} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line}",
                       "save the file as UTF-8 (YAML files are UTF-8)") from None
    try:
        return parse_acl(text, disabled_actions, str(path))
    except UnknownKeyError:
        raise
    except AclError as e:
        raise AclError(f"ACL {path}: {e.message}",
                       "fix the file (Smokescreen v1 YAML) and try again") from None
