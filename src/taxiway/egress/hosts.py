"""Host names as a proxy must see them: one canonical spelling per destination.

Pure functions, no I/O. Every spelling a client can send (percent-encoding,
IDNA, full-width digits, trailing dots, the legacy ``127.1`` / ``0x7f.1`` /
``2130706433`` IPv4 forms that ``inet_aton`` and browsers accept) is turned
into either an IP address or a lower-case ASCII DNS name, so that the ACL and
the address policy judge the destination that will really be dialled.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_VALID_DNS = re.compile(r"^[a-z0-9._-]*$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9a-fA-F]*)$")


# RFC 1035: a name is at most 253 characters written out (without the root's dot), a
# label at most 63. Checked before any matching or DNS: longer names resolve nowhere,
# and work per name must stay linear in what a client sends.
MAX_NAME = 253
MAX_LABEL = 63
# The longest raw spelling of a valid name: every character percent-encoded UTF-8 (12x).
_MAX_RAW = MAX_NAME * 12
_SHOW = 80


class HostError(ValueError):
    """A host that cannot name any destination (the request is malformed)."""


def shown(text: str, limit: int = _SHOW) -> str:
    """``repr(text)`` cut to a bounded prefix, so errors never echo a whole client input."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_name_shape(name: str) -> str:
    """``name`` without its one trailing dot, if its labels are non-empty and within RFC 1035's limits.

    ``a..b``, ``.a``, ``a..`` (two trailing dots) and ``..`` are refused; so are
    names over 253 characters or with a label over 63.
    """
    bare = name[:-1] if name.endswith(".") and len(name) > 1 else name
    if len(bare) > MAX_NAME:
        raise HostError(f"host name of {len(bare)} characters (at most {MAX_NAME}): {shown(name)}")
    labels = bare.split(".")
    if not bare or "" in labels:
        raise HostError(f"invalid host {shown(name)}: empty label")
    if max(len(label) for label in labels) > MAX_LABEL:
        raise HostError(f"invalid host {shown(name)}: a label is longer than {MAX_LABEL} characters")
    return bare


@dataclass(frozen=True)
class Host:
    """A normalized destination host: a DNS name or an IP address, never both."""

    name: str
    ip: IPAddress | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    def __str__(self) -> str:
        return self.name


def _label_to_ascii(label: str) -> str:
    if label.isascii():
        return label.lower()
    import idna

    try:
        return idna.alabel(label).decode("ascii")
    except idna.IDNAError:
        # Go's lenient lookup profile (which Smokescreen uses) accepts labels
        # IDNA 2008 forbids, such as emoji; plain Punycode gives the same A-label.
        try:
            return "xn--" + label.encode("punycode").decode("ascii")
        except UnicodeError as e:
            raise HostError(f"invalid domain label {shown(label)}") from e


def normalize_name(s: str) -> str:
    """Smokescreen's NormalizeHost: canonical IP text, or lower-case Punycode name.

    Raises HostError for names with characters outside ``a-z 0-9 . - _``
    (the shape of the name is :func:`check_name_shape`'s job).
    """
    if len(s) > _MAX_RAW:
        raise HostError(f"host name of {len(s)} characters (at most {MAX_NAME}): {shown(s)}")
    ip = _parse_ip_literal(s)
    if ip is not None:
        return ip_text(ip)
    if not s.isascii():
        import idna

        try:
            s = idna.uts46_remap(s, std3_rules=False, transitional=False)
        except (idna.IDNAError, ValueError) as e:
            raise HostError(f"invalid domain {shown(s)}: {e}") from e
        labels = [_label_to_ascii(label) for label in s.split(".")]
        s = ".".join(labels)
    s = s.lower()
    if not _VALID_DNS.match(s):
        bad = next(c for c in s if not _VALID_DNS.match(c))
        raise HostError(f"invalid domain {shown(s)}: disallowed character {bad!r}")
    return s


def ip_text(ip: IPAddress) -> str:
    """The address as text, the same on every Python: IPv4-mapped IPv6 in RFC 5952's dotted form.

    (Python 3.13 prints ``::ffff:127.0.0.1``; 3.11 and 3.12 print ``::ffff:7f00:1``.)
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _parse_ip_literal(s: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def _legacy_ipv4_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not all(c in "01234567" for c in part):
            raise HostError(f"invalid octal IPv4 part {part!r}")
        return int(part, 8)
    return int(part, 10)


def parse_legacy_ipv4(s: str) -> ipaddress.IPv4Address | None:
    """The WHATWG/inet_aton IPv4 reading of ``s``, or None if it is not numeric.

    ``127.1``, ``0177.0.0.1``, ``0x7f000001`` and ``2130706433`` all read as
    127.0.0.1. A name whose last label is numeric but is not a valid IPv4
    address raises HostError (resolvers and browsers would refuse it too).
    """
    parts = s.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if not parts or not _NUMERIC_LABEL.match(parts[-1]):
        return None
    if len(parts) > 4 or any(not _NUMERIC_LABEL.match(p) for p in parts):
        raise HostError(f"invalid IPv4 address {shown(s)}")
    nums = [_legacy_ipv4_part(p) for p in parts]
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise HostError(f"invalid IPv4 address {shown(s)}")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@functools.lru_cache(maxsize=8192)
def parse_host(raw: str) -> Host:
    """Normalize a host from a request target or CONNECT authority (no port).

    Accepts ``[v6]`` brackets, percent-encoding and IDNA; rejects zone ids,
    empty hosts and characters that cannot be in a DNS name.
    """
    if not raw:
        raise HostError("empty host")
    if len(raw) > _MAX_RAW:
        raise HostError(f"host name of {len(raw)} characters (at most {MAX_NAME}): {shown(raw)}")
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise HostError(f"unterminated IPv6 literal {shown(raw)}")
        inner = unquote(raw[1:-1])
        if "%" in inner:
            raise HostError(f"IPv6 zone identifiers are not allowed: {shown(raw)}")
        try:
            ip = ipaddress.IPv6Address(inner)
        except ValueError as e:
            raise HostError(f"invalid IPv6 literal {shown(raw)}") from e
        return Host(ip_text(ip), ip)
    if "%" in raw:
        try:
            raw = unquote(raw, errors="strict")
        except UnicodeDecodeError as e:
            raise HostError(f"invalid percent-encoding in host {shown(raw)}") from e
    if any(c in raw for c in "[]/\\@:?#% \t\r\n\x00"):
        raise HostError(f"invalid character in host {shown(raw)}")
    # A dot-free name could still be an IP after IDNA mapping (full-width digits).
    name = check_name_shape(normalize_name(raw))
    ip = _parse_ip_literal(name) or parse_legacy_ipv4(name)
    if ip is not None:
        return Host(ip_text(ip), ip)
    return Host(name)


def split_authority(authority: str) -> tuple[str, int]:
    """Split CONNECT's ``host:port`` (the port is required), host not normalized."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            raise HostError(f"CONNECT needs host:port, got {shown(authority)}")
        host, port_s = authority[: end + 1], authority[end + 2 :]
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep or ":" in host:
            raise HostError(f"CONNECT needs host:port, got {shown(authority)}")
    return host, parse_port(port_s)


def parse_port(s: str) -> int:
    if not s.isdigit() or len(s) > 5 or not 0 < int(s) < 65536:
        raise HostError(f"invalid port {shown(s)}")
    return int(s)
