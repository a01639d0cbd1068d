"""Subject alternative names: parse, classify, validate and order them.

Pure functions, no cryptography import, so the CLI can reject bad input before
paying for the heavy imports. The rules follow what browsers and OpenSSL
accept, with mkcert's conventions where they exist:

* an argument with ``://`` is a URI, one with ``@`` an email address, one that
  parses as an IPv4/IPv6 address (or looks numeric like one) an IP address, and
  anything else a DNS name;
* DNS names are lower-cased ASCII (non-ASCII names must be given in their
  IDNA ``xn--`` form), labels of letters, digits, ``-`` and ``_``;
* a wildcard is a whole leftmost ``*`` label over at least two more labels
  (``*.app.internal`` yes; ``*``, ``*.com``, ``foo*.bar.com`` no);
* IPv6 zone IDs (``fe80::1%eth0``) are refused: an IP SAN is the bare 16
  bytes, so the zone would silently vanish from the certificate;
* SANs are ordered by kind (DNS, IP, email, URI), each kind in the order given,
  duplicates dropped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from taxiway.errors import InvalidInput

KINDS = ("dns", "ip", "email", "uri")

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_V4 = re.compile(r"^[0-9.]+$")
# A last label that is a number (decimal, octal, 0x hex) makes browsers parse the whole
# host as an IPv4 address (WHATWG URL), so "0x7f.0.0.1" is 127.0.0.1 to them: refuse it.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


@dataclass(frozen=True)
class Name:
    """One SAN: its kind (``dns``, ``ip``, ``email``, ``uri``) and normalized value."""

    kind: str
    value: str


@dataclass
class Names:
    """A certificate's names, grouped by kind in SAN order."""

    dns: list[str] = field(default_factory=list)
    ip: list[str] = field(default_factory=list)
    email: list[str] = field(default_factory=list)
    uri: list[str] = field(default_factory=list)

    def ordered(self) -> list[Name]:
        """All names, DNS first, then IP addresses, emails, URIs."""
        return [Name(k, v) for k in KINDS for v in getattr(self, k)]

    def values(self) -> list[str]:
        return [n.value for n in self.ordered()]

    def __len__(self) -> int:
        return len(self.dns) + len(self.ip) + len(self.email) + len(self.uri)

    @property
    def server_names(self) -> bool:
        """True when a name makes the certificate a server one (DNS, IP or URI)."""
        return bool(self.dns or self.ip or self.uri)


def _idna_hint(name: str) -> str:
    try:
        return "use its IDNA form " + name.encode("idna").decode("ascii")
    except UnicodeError:
        return "use its IDNA (xn--) form"


def check_dns(name: str, *, what: str = "name", allow_wildcard: bool = True) -> str:
    """Validate a DNS name (or wildcard) and return it normalized (lower case, no trailing dot)."""
    orig = name
    if not name:
        raise InvalidInput("empty name", "give a host name, an IP address, an email or a URI")
    if not name.isascii():
        raise InvalidInput(f"{what} {orig!r} is not ASCII", _idna_hint(name.rstrip(".")))
    name = name.lower()
    if name.endswith(".") and name != ".":
        name = name[:-1]
    if name == "*":
        raise InvalidInput(f"{what} '*' matches every host", "name a domain, like '*.example.test'")
    if len(name) > 253:
        raise InvalidInput(f"{what} {orig!r} is longer than 253 characters", "use a shorter name")
    labels = name.split(".")
    if "*" in name:
        if not allow_wildcard:
            raise InvalidInput(f"{what} {orig!r} may not be a wildcard", "give a plain domain")
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            raise InvalidInput(f"invalid wildcard {orig!r}", "a wildcard is a whole leftmost label, like '*.example.test'")
        if len(labels) < 3:
            raise InvalidInput(
                f"wildcard {orig!r} covers a whole top-level domain",
                f"browsers reject it; name a domain under it, like '*.example{'.' + labels[1] if len(labels) > 1 else ''}'",
            )
        labels = labels[1:]
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidInput(
                f"invalid {what} {orig!r}",
                "labels are 1-63 letters, digits, '-' or '_', not starting or ending with '-'",
            )
    if _NUMERIC_V4.match(name) or _NUMERIC_LABEL.match(labels[-1]):
        raise InvalidInput(f"malformed IP address {orig!r} (a numeric last label makes it an address to browsers)",
                           "write IPv4 as four decimal numbers 0-255, like 10.0.0.1")
    for label in labels:
        if label.startswith("xn--"):
            _check_alabel(orig, label, what)
    return name


def _check_alabel(orig: str, label: str, what: str) -> None:
    """Refuse an ``xn--`` label that is not valid IDNA 2008 (browsers refuse those hosts)."""
    import idna

    try:
        ok = idna.encode(idna.decode(label)).decode("ascii") == label
    except (idna.IDNAError, UnicodeError):
        ok = False
    if not ok:
        raise InvalidInput(f"invalid {what} {orig!r}: {label!r} is not a valid IDNA A-label",
                           "give the name's IDNA form as `idna.encode('name')` or a browser produces it")


def classify(arg: str) -> Name:
    """Classify one command-line name and normalize it; raise InvalidInput if it is invalid."""
    if not isinstance(arg, str) or not arg.strip():
        raise InvalidInput("empty name", "give a host name, an IP address, an email or a URI")
    arg = arg.strip()
    if "://" in arg:
        return Name("uri", _check_uri(arg))
    if "@" in arg:
        return Name("email", _check_email(arg))
    ip = _parse_ip(arg)
    if ip is not None:
        return Name("ip", ip)
    return Name("dns", check_dns(arg))


def _parse_ip(arg: str) -> str | None:
    """The normalized address if ``arg`` is (or is obviously meant as) an IP address."""
    candidate = arg[1:-1] if arg.startswith("[") and arg.endswith("]") else arg
    if "%" in candidate and ":" in candidate:
        _refuse_zone(arg, candidate)
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    if ":" in candidate or _NUMERIC_V4.match(candidate):
        raise InvalidInput(
            f"malformed IP address {arg!r}",
            "write IPv4 as four numbers 0-255 (10.0.0.1) and IPv6 in RFC 4291 form (fdaa::1)",
        )
    return None


def _refuse_zone(arg: str, text: str) -> None:
    """Refuse an IPv6 zone ID (``fe80::1%eth0``): the SAN is 16 bytes and cannot carry one."""
    addr, _, zone = text.partition("%")
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        return  # not an address with a zone: the caller says it is malformed
    raise InvalidInput(
        f"IP address {arg!r} has a zone ID (%{zone})",
        f"a certificate cannot carry one; give the address alone: {addr}",
    )


def _check_email(arg: str) -> str:
    local, _, domain = arg.rpartition("@")
    if not arg.isascii():
        raise InvalidInput(f"email {arg!r} is not ASCII", "certificates carry ASCII emails; use the IDNA form of the domain")
    if not local or not _EMAIL_LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidInput(f"invalid email address {arg!r}", "write it as user@example.test")
    try:
        domain = check_dns(domain, what="email domain", allow_wildcard=False)
    except InvalidInput as e:
        raise InvalidInput(f"invalid email address {arg!r}: {e.message}", e.hint) from None
    return f"{local}@{domain}"


def _check_uri(arg: str) -> str:
    if not arg.isascii() or any(c.isspace() for c in arg):
        raise InvalidInput(f"URI {arg!r} has spaces or non-ASCII characters", "percent-encode them (RFC 3986)")
    try:
        parts = urlsplit(arg)
    except ValueError as e:
        raise InvalidInput(f"invalid URI {arg!r}: {e}", "write it as scheme://host/path") from None
    if not re.match(r"^[a-z][a-z0-9+.-]*$", parts.scheme or "", re.I) or not parts.netloc:
        raise InvalidInput(f"invalid URI {arg!r}", "write it as scheme://host/path, like spiffe://taxiway/app/web")
    return arg


def parse_names(args: list[str] | tuple[str, ...]) -> Names:
    """Classify every argument, drop duplicates and group them by kind."""
    out = Names()
    seen: set[tuple[str, str]] = set()
    for arg in args:
        n = classify(arg)
        if (n.kind, n.value) in seen:
            continue
        seen.add((n.kind, n.value))
        getattr(out, n.kind).append(n.value)
    return out


def file_stem(names: Names, client: bool = False) -> str:
    """The default file name stem for a certificate, as mkcert picks it: ``example.test+2``."""
    values = names.values()
    if not values:
        return "cert"
    stem = values[0].replace(":", "_").replace("*", "_wildcard").replace("/", "_")
    if len(values) > 1:
        stem += f"+{len(values) - 1}"
    if client:
        stem += "-client"
    return stem


def parse_constraint(arg: str) -> Name:
    """A name constraint: a DNS domain (``example.test``, ``.internal``) or an IP network (``10.0.0.0/8``)."""
    arg = arg.strip()
    if "/" not in arg and (":" in arg or _NUMERIC_V4.match(arg)):
        raise InvalidInput(f"IP name constraint {arg!r} has no /prefix",
                           f"give a network: {arg}/{128 if ':' in arg else 32} for one address, or like 10.0.0.0/8")
    if "/" in arg:
        if "%" in arg:
            raise InvalidInput(f"IP network constraint {arg!r} has a zone ID",
                               "a certificate cannot carry one; give the network alone, like fe80::/10")
        try:
            return Name("ip", str(ipaddress.ip_network(arg, strict=True)))
        except ValueError as e:
            raise InvalidInput(f"invalid IP network constraint {arg!r}: {e}", "write it as 10.0.0.0/8 or fdaa::/16") from None
    domain = arg[1:] if arg.startswith(".") else arg
    if "*" in domain:
        raise InvalidInput(f"name constraint {arg!r} has a wildcard", "give the domain itself: 'internal' permits every *.internal name")
    if "." not in domain and not domain.isascii():
        raise InvalidInput(f"name constraint {arg!r} is not ASCII", _idna_hint(domain))
    # A single label (like "internal") is a fine constraint even though it is not a fine wildcard.
    return Name("dns", check_dns(domain, what="name constraint", allow_wildcard=False))


def within_constraints(name: Name, permitted: list[Name]) -> bool:
    """True when ``name`` falls inside the permitted subtrees (RFC 5280 4.2.1.10).

    A constrained CA constrains both DNS names and IP addresses: with subtrees of
    one kind only, the other kind is refused (and excluded in the certificate, see
    ``profile``). Emails and URIs are never constrained.
    """
    if name.kind in ("email", "uri") or not permitted:
        return True
    same_kind = [p for p in permitted if p.kind == name.kind]
    if not same_kind:
        return False
    if name.kind == "ip":
        addr = ipaddress.ip_address(name.value)
        return any(addr in ipaddress.ip_network(p.value) for p in same_kind)
    host = name.value[2:] if name.value.startswith("*.") else name.value
    return any(host == p.value or host.endswith("." + p.value) for p in same_kind)


_HOSTLIKE_CN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.?$")


def cn_as_dns(cn: str | None, names: Names) -> Name | None:
    """The CN as a DNS name that must obey name constraints, if it looks like a host name.

    OpenSSL checks a host-like CN (dotted labels) against DNS constraints when
    the certificate has no DNS SANs, and legacy clients match host names
    against the CN, so a host-like CN must be one of the SANs or lie within
    the constraints. A CN like ``app-worker`` is a role, not a host.
    """
    if not cn or not _HOSTLIKE_CN.match(cn):
        return None
    host = cn.lower().rstrip(".")
    if host in names.dns or host in names.ip:
        return None
    return Name("dns", host)
