"""The private network's address layout (pure: no I/O).

Every machine gets an IPv6 unique-local address under ``fdaa::/16``, in three fields as
Fly's 6PN does::

    fdaa : OOOO:OOOO : HHHH : MMMM:MMMM:MMMM:MMMM
           org network  host   machine field
           (32 bits)    (16)   (64 bits)

- an org network is ``fdaa:OOOO:OOOO::/48`` (the org's network number, never 0; the default
  org "personal" is 1);
- a host's share of it is ``fdaa:OOOO:OOOO:HHHH::/64`` (the host number, never 0; the single
  host of ``taxiway up`` is 1);
- a machine's address is a /128 in it, with a non-zero 64-bit machine field that the host's
  agent allocates and keeps per platform machine id.

The platform's services answer on every host at :data:`SERVICE_ADDRESS` (``fdaa::3``, as
Fly's DNS): DNS on :data:`DNS_PORT`, the egress proxy on :data:`PROXY_PORT`, the Machines API
on :data:`API_PORT`. Network number 0 is never an org's, so ``fdaa::/48`` (which holds
fdaa::3) lies outside every org network.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

PLATFORM_PREFIX = ipaddress.IPv6Network("fdaa::/16")
SERVICE_ADDRESS = ipaddress.IPv6Address("fdaa::3")
GATEWAY = ipaddress.IPv6Address("fe80::1")  # every machine's next hop: the fabric's end of its veth
DNS_PORT = 53
PROXY_PORT = 3128
API_PORT = 4280
SERVICE_PORTS = ((DNS_PORT, "udp"), (DNS_PORT, "tcp"), (PROXY_PORT, "tcp"), (API_PORT, "tcp"))

DEFAULT_ORG_NETWORK = 1  # org "personal"
DEFAULT_HOST = 1         # the single host of `taxiway up`
MAX_ORG = (1 << 32) - 1
MAX_HOST = (1 << 16) - 1
MAX_FIELD = (1 << 64) - 1

_BASE = int(PLATFORM_PREFIX.network_address)


class Address(NamedTuple):
    """A machine address split into its fields."""

    org: int
    host: int
    field: int


def _check(name: str, value: int, top: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= top:
        raise ValueError(f"{name} must be an integer in 1..{top}, not {value!r}")


def org_prefix(org: int) -> ipaddress.IPv6Network:
    """The org network ``fdaa:OOOO:OOOO::/48`` of network number ``org``."""
    _check("org network number", org, MAX_ORG)
    return ipaddress.IPv6Network((_BASE | org << 80, 48))


def host_prefix(org: int, host: int) -> ipaddress.IPv6Network:
    """Host ``host``'s /64 of org network ``org``."""
    _check("org network number", org, MAX_ORG)
    _check("host number", host, MAX_HOST)
    return ipaddress.IPv6Network((_BASE | org << 80 | host << 64, 64))


def machine_address(org: int, host: int, field: int) -> ipaddress.IPv6Address:
    """The /128 of machine field ``field`` on host ``host`` of org network ``org``."""
    _check("org network number", org, MAX_ORG)
    _check("host number", host, MAX_HOST)
    _check("machine field", field, MAX_FIELD)
    return ipaddress.IPv6Address(_BASE | org << 80 | host << 64 | field)


def parse(addr: str | ipaddress.IPv6Address) -> Address | None:
    """The fields of a machine address, or None for anything that is not one (fdaa::3, ::1, IPv4...)."""
    try:
        a = ipaddress.IPv6Address(addr.split("%", 1)[0] if isinstance(addr, str) else addr)
    except ValueError:
        return None
    n = int(a)
    if n >> 112 != _BASE >> 112:
        return None
    org, host, field = n >> 80 & MAX_ORG, n >> 64 & MAX_HOST, n & MAX_FIELD
    if not (org and host and field):
        return None
    return Address(org, host, field)


def org_of(addr: str | ipaddress.IPv6Address) -> int | None:
    """The org network number a machine address belongs to (None: not a machine address)."""
    a = parse(addr)
    return a.org if a else None


def format_address(a: Address) -> str:
    """The compressed text of an address (what STATUS.private_ip holds)."""
    return str(machine_address(*a))


def no_proxy(org: int) -> str:
    """NO_PROXY for a machine of org network ``org``: internal names, loopback and the org's /48."""
    return f".internal,localhost,127.0.0.1,::1,{org_prefix(org)}"


def proxy_url() -> str:
    return f"http://[{SERVICE_ADDRESS}]:{PROXY_PORT}"


def machine_env(org: int, address: str) -> dict[str, str]:
    """The environment the agent gives a machine on the private network (overrides the tenant's)."""
    url, skip = proxy_url(), no_proxy(org)
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": skip, "no_proxy": skip, "FLY_PRIVATE_IP": address, "TAXIWAY_PRIVATE_IP": address}


def searches(app: str) -> list[str]:
    """Search domains of a machine of ``app``: ``peer`` finds ``peer.internal``, ``<id>.vm`` its app's machine."""
    return [f"{app}.internal", "internal"]


def resolv_conf(app: str) -> str:
    """/etc/resolv.conf of a machine of ``app`` (the namespace runtime renders :func:`dns_config` so)."""
    return f"nameserver {SERVICE_ADDRESS}\nsearch {' '.join(searches(app))}\n"


def dns_config(app: str, address: str, names: tuple[str, ...] | list[str] = ()) -> dict[str, object]:
    """MachineConfig.dns for a machine of ``app`` at ``address``, ``names`` of it in /etc/hosts
    (see taxiway.machines.config)."""
    out: dict[str, object] = {"nameservers": [str(SERVICE_ADDRESS)], "searches": searches(app)}
    if names:
        out["hosts"] = [[address, *names]]
    return out


def veth_name(field: int) -> str:
    """The fabric-side interface of a machine (interface names have at most 15 characters)."""
    _check("machine field", field, MAX_FIELD)
    name = f"tw{field:x}"
    if len(name) <= 15:
        return name
    import hashlib

    return "th" + hashlib.sha256(str(field).encode()).hexdigest()[:13]  # "th": never a short name
