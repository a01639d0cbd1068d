"""Which addresses the proxy may dial: classification and the address policy.

Pure and table-driven. :func:`classify` names the special-purpose range an
address falls in (IPv4-mapped and IPv4-compatible IPv6 addresses are
unwrapped and judged as the IPv4 address they carry; NAT64, 6to4 and Teredo
addresses are denied and name the IPv4 address they embed).
:class:`AddressPolicy` adds the operator's ranges on top. Unlike Smokescreen
(its issue 236), a ``--deny-range`` wins over an ``--allow-range`` that also
matches, and the proxy's own listening address is never dialled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from taxiway.egress.hosts import IPAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# (class name, networks); the first match wins, so narrower ranges come first.
IPV4_CLASSES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", _nets("0.0.0.0/32")),
    ("this-network", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8")),
    ("link-local", _nets("169.254.0.0/16")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("cgnat", _nets("100.64.0.0/10")),
    ("ietf-protocol", _nets("192.0.0.0/24")),
    ("documentation", _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")),
    ("6to4-relay", _nets("192.88.99.0/24")),
    ("benchmarking", _nets("198.18.0.0/15")),
    ("multicast", _nets("224.0.0.0/4")),
    ("broadcast", _nets("255.255.255.255/32")),
    ("reserved", _nets("240.0.0.0/4")),
)

IPV6_CLASSES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", _nets("::/128")),
    ("loopback", _nets("::1/128")),
    ("ipv4-mapped", _nets("::ffff:0:0/96")),
    ("ipv4-compatible", _nets("::/96")),
    ("nat64", _nets("64:ff9b::/96", "64:ff9b:1::/48")),
    ("discard", _nets("100::/64")),
    ("teredo", _nets("2001::/32")),
    ("documentation", _nets("2001:db8::/32", "3fff::/20")),
    ("6to4", _nets("2002::/16")),
    ("unique-local", _nets("fc00::/7")),
    ("link-local", _nets("fe80::/10")),
    ("site-local", _nets("fec0::/10")),
    ("multicast", _nets("ff00::/8")),
    ("ietf-protocol", _nets("2001::/23")),
)

# Outside 2000::/3 nothing is global unicast (yet): deny what no row names.
_IPV6_GLOBAL = ipaddress.ip_network("2000::/3")
EMBEDDING_CLASSES = frozenset({"nat64", "6to4", "teredo"})


@dataclass(frozen=True)
class AddressClass:
    """The special-purpose range an address is in; ``public`` when it is in none."""

    name: str
    address: IPAddress
    # The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo).
    embedded: ipaddress.IPv4Address | None = None
    # For mapped/compatible addresses, the class of the IPv4 they were unwrapped to.
    inner: AddressClass | None = None

    @property
    def public(self) -> bool:
        return self.name == "public"

    def describe(self) -> str:
        """``a loopback address``, ``an ipv4-mapped address of 127.0.0.1 (loopback)``."""
        article = "an" if self.name[0] in "aeiou" else "a"
        if self.inner is not None:
            return f"{article} {self.name} address of {self.inner.address} ({self.inner.name})"
        if self.embedded is not None:
            return f"{article} {self.name} address embedding {self.embedded}"
        return f"{article} {self.name} address"


def embedded_ipv4(addr: ipaddress.IPv6Address, kind: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64, 6to4, Teredo, mapped or compatible address carries."""
    n = int(addr)
    if kind in ("nat64", "ipv4-mapped", "ipv4-compatible"):
        # For the RFC 8215 local-use /48 this assumes the common /96 layout.
        return ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if kind == "6to4":
        return ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    if kind == "teredo":
        # The client's address is stored inverted in the last 32 bits.
        return ipaddress.IPv4Address(~n & 0xFFFFFFFF)
    return None


def classify(addr: IPAddress) -> AddressClass:
    """Name the range ``addr`` is in; ``public`` if dialling it is fine by default."""
    if isinstance(addr, ipaddress.IPv4Address):
        for name, nets in IPV4_CLASSES:
            if any(addr in n for n in nets):
                return AddressClass(name, addr)
        return AddressClass("public", addr)
    for name, nets in IPV6_CLASSES:
        if any(addr in n for n in nets):
            v4 = embedded_ipv4(addr, name)
            if name in ("ipv4-mapped", "ipv4-compatible"):
                assert v4 is not None
                return AddressClass(name, addr, v4, classify(v4))
            return AddressClass(name, addr, v4)
    if addr not in _IPV6_GLOBAL:
        return AddressClass("reserved", addr)
    return AddressClass("public", addr)


def dial_address(addr: IPAddress) -> IPAddress:
    """The address actually dialled: mapped and compatible IPv6 become their IPv4."""
    if isinstance(addr, ipaddress.IPv6Address):
        c = classify(addr)
        if c.inner is not None:
            return c.inner.address
    return addr


@dataclass(frozen=True)
class Range:
    """An operator range: a network and, optionally, one port."""

    network: Network
    port: int | None = None
    source: str = ""

    @classmethod
    def parse(cls, text: str, flag: str = "--deny-range") -> Range:
        """Parse ``CIDR``, ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
        spec, port = text.strip(), None
        if spec.startswith("["):
            inner, _, rest = spec[1:].partition("]")
            spec, port = inner, int(rest[1:]) if rest.startswith(":") else None
        elif spec.count(":") == 1:
            spec, port_s = spec.split(":")
            port = int(port_s)
        network = ipaddress.ip_network(spec, strict=False)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"invalid port in {text!r}")
        return cls(network, port, f"{flag} {text}")

    def matches(self, addr: IPAddress, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        return addr.version == self.network.version and addr in self.network


@dataclass(frozen=True)
class AddressVerdict:
    allowed: bool
    reason: str
    address: IPAddress  # the address to dial (mapped/compatible unwrapped)
    klass: AddressClass


@dataclass(frozen=True)
class AddressPolicy:
    """Built-in classes, adjusted by operator ranges; deny beats allow.

    Order: the proxy's own listening addresses, then ``deny`` ranges, then
    ``allow`` ranges, then the built-in classes (only ``public`` passes).
    """

    allow: Sequence[Range] = ()
    deny: Sequence[Range] = ()
    own: Sequence[tuple[IPAddress, int]] = field(default=())
    # When the proxy listens on 0.0.0.0 or ::, every local address at its port is "own".
    own_any_port: int | None = None

    def with_own(self, own: Iterable[tuple[IPAddress, int]], any_port: int | None = None) -> AddressPolicy:
        return AddressPolicy(self.allow, self.deny, tuple(own), any_port)

    def judge(self, addr: IPAddress, port: int) -> AddressVerdict:
        """Decide whether dialling ``addr:port`` is allowed, and why."""
        klass = classify(addr)
        target = dial_address(addr)
        for own, own_port in self.own:
            if target == own and port == own_port:
                return AddressVerdict(False, f"{target} port {port} is the proxy itself", target, klass)
        if self.own_any_port == port and classify(target).name in ("loopback", "unspecified"):
            return AddressVerdict(False, f"{target} port {port} is the proxy itself", target, klass)
        checked = {addr, target}
        for r in self.deny:
            if any(r.matches(a, port) for a in checked):
                return AddressVerdict(False, f"{target} is denied by {r.source}", target, klass)
        for r in self.allow:
            if any(r.matches(a, port) for a in checked):
                return AddressVerdict(True, f"{target} is allowed by {r.source}", target, klass)
        effective = klass.inner if klass.inner is not None else klass
        if effective.public:
            return AddressVerdict(True, f"{target} is a public address", target, klass)
        return AddressVerdict(False, f"{addr} is {klass.describe()}", target, klass)
