"""The one ``--listen`` parser: ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT``, loopback unless told otherwise.

Every server taxiway starts (``registry serve``, ``egress serve``, the publish
router) takes its address through here, so they agree on the spelling, on the
default (loopback: nothing is reachable from other machines unless a user
names an address) and on what a bad value says.
"""

from __future__ import annotations

from typing import NamedTuple

from taxiway.errors import InvalidInput

DEFAULT_HOST = "127.0.0.1"  # ``:PORT`` and an empty host mean loopback, never every interface


class Listen(NamedTuple):
    """A parsed listen address: ``host`` is an IP literal (IPv6 without brackets), ``port`` 0-65535 (0: any free one)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, flag: str = "--listen") -> Listen:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (loopback); InvalidInput names ``flag`` on anything else.

    ``flag`` is a command-line flag (``--listen``) or an environment variable's name.

    HOST is an IPv4 or IPv6 address, or ``localhost`` (taken as 127.0.0.1): a bind
    address is never looked up in DNS.
    """
    eq = " " if flag.startswith("-") else "="  # a flag or an environment variable
    hint = f"use HOST:PORT, [IPV6]:PORT or :PORT (loopback), e.g. {flag}{eq}{DEFAULT_HOST}:5000"
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise InvalidInput(f"{flag}{eq}{text!r} is not HOST:PORT", hint)
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"{flag}{eq}{text!r}: the port must be a number from 0 to 65535", hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise InvalidInput(f"{flag}{eq}{text!r}: brackets are for IPv6 addresses", hint)
    elif ":" in host:
        raise InvalidInput(f"{flag}{eq}{text!r}: an IPv6 address goes in brackets", f"write it as [{host}]:{port}")
    if host in ("", "localhost"):
        host = DEFAULT_HOST
    import ipaddress  # here, not at the top: the CLI modules import DEFAULT_HOST for their option defaults

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(f"{flag}{eq}{text!r}: {host!r} is not an IP address", hint) from None
    return Listen(str(addr), int(port))
