"""``taxiway egress``: serve the SSRF-safe egress proxy, check ACL decisions offline."""

from __future__ import annotations

import sys

import click

from taxiway.listen import DEFAULT_HOST


def _ranges(values: tuple[str, ...], flag: str) -> list:
    from taxiway.egress.addresses import Range
    from taxiway.errors import InvalidInput

    out = []
    for v in values:
        try:
            out.append(Range.parse(v, flag))
        except ValueError as e:
            raise InvalidInput(f"{flag} {v!r}: {e}", "use a CIDR like 10.0.0.0/8, or IP[:PORT]") from None
    return out


range_options = [
    click.option("--allow-range", "allow_range", multiple=True, metavar="CIDR",
                 help="Allow dialling this range even if it is internal (repeatable)."),
    click.option("--deny-range", "deny_range", multiple=True, metavar="CIDR",
                 help="Deny this range; wins over --allow-range (repeatable)."),
    click.option("--deny-address", "deny_address", multiple=True, metavar="IP[:PORT]",
                 help="Deny one address, optionally only one port (repeatable)."),
]


def with_ranges(f):
    for opt in reversed(range_options):
        f = opt(f)
    return f


@click.group()
def egress() -> None:
    """The SSRF-safe egress proxy (Smokescreen-compatible ACLs)."""


@egress.command()
@click.option("--listen", default=f"{DEFAULT_HOST}:4750", show_default=True, metavar="HOST:PORT",
              help="Address to listen on: HOST:PORT, [IPV6]:PORT or :PORT (loopback).")
@click.option("--acl", "acl", type=click.Path(dir_okay=False), help="Smokescreen v1 ACL (YAML).")
@with_ranges
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Serve the proxy over TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False),
              help="Verify client certificates with this CA; their CN is the role.")
@click.option("--users", "users", type=click.Path(dir_okay=False),
              help="Users file: name:bcrypt-hash[:role] per line.")
@click.option("--resolver", metavar="ADDR[:PORT]", help="DNS server to resolve names with (default: system).")
@click.option("--disable-acl-policy-action", "disabled", multiple=True,
              type=click.Choice(["open", "report", "enforce"]), help="Refuse ACLs using this action.")
@click.option("--connect-timeout", default=10.0, show_default=True, help="Seconds to connect upstream.")
@click.option("--dns-timeout", default=5.0, show_default=True, help="Seconds to resolve a name.")
@click.option("--idle-timeout", default=300.0, show_default=True, help="Seconds a connection may be idle.")
@click.option("--header-timeout", default=30.0, show_default=True,
              help="Seconds to send each request head once it starts (the first: from connecting).")
@click.option("--total-timeout", default=0.0, show_default=True, help="Max seconds per tunnel (0: none).")
@click.option("--max-tunnels", default=10_000, show_default=True, help="Open upstream connections; 503 beyond.")
@click.option("--max-connections", default=10_000, show_default=True,
              help="Open client connections; more are answered 503 and closed (logged, counted).")
@click.option("--max-header-bytes", default=65536, show_default=True, help="Largest request head; 431 beyond.")
@click.option("--drain-timeout", default=30.0, show_default=True, help="Seconds to drain on SIGTERM.")
def serve(listen, acl, allow_range, deny_range, deny_address, tls_cert, tls_key, client_ca, users,
          resolver, disabled, connect_timeout, dns_timeout, idle_timeout, header_timeout, total_timeout, max_tunnels,
          max_connections, max_header_bytes, drain_timeout) -> None:
    """Run the proxy. $PROXY_PASSWORD enables Basic auth (role `authed`); SIGHUP reloads the ACL."""
    import os
    from pathlib import Path

    from taxiway.egress.resolver import Resolver
    from taxiway.egress.server import EgressConfig, run
    from taxiway.errors import InvalidInput
    from taxiway.listen import parse_listen

    address = parse_listen(listen)
    if os.environ.get("PROXY_PASSWORD") == "":
        # Set but empty reads like "a password" and would mean "no authentication".
        raise InvalidInput("PROXY_PASSWORD is set but empty, which would turn proxy authentication off",
                           "set a password in PROXY_PASSWORD, or unset it to run without one")
    if tls_key and not tls_cert or client_ca and not tls_cert:
        raise InvalidInput("--tls-key and --client-ca need --tls-cert", "pass the proxy's certificate too")
    if max_connections < 1:
        raise InvalidInput(f"--max-connections {max_connections} must be at least 1", "e.g. --max-connections 10000")
    config = EgressConfig(
        listen=tuple(address), acl_path=Path(acl) if acl else None,
        allow_ranges=_ranges(allow_range, "--allow-range"),
        deny_ranges=_ranges(deny_range, "--deny-range") + _ranges(deny_address, "--deny-address"),
        tls_cert=Path(tls_cert) if tls_cert else None, tls_key=Path(tls_key) if tls_key else None,
        client_ca=Path(client_ca) if client_ca else None,
        resolver=Resolver.parse_server(resolver) if resolver else None,
        users_path=Path(users) if users else None, disabled_actions=tuple(disabled),
        connect_timeout=connect_timeout, dns_timeout=dns_timeout, idle_timeout=idle_timeout,
        header_timeout=header_timeout, total_timeout=total_timeout,
        max_tunnels=max_tunnels, max_connections=max_connections, max_header_bytes=max_header_bytes,
        drain_timeout=drain_timeout,
    )
    run(config)


@egress.command()
@click.option("--acl", "acl", type=click.Path(dir_okay=False), help="Smokescreen v1 ACL (YAML).")
@click.option("--role", default=None, help="The role asking (a service name in the ACL).")
@with_ranges
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.argument("url")
def check(acl, role, allow_range, deny_range, deny_address, as_json, url) -> None:
    """Print the decision and reason for ROLE reaching URL, without sending anything.

    URL is http://HOST[:PORT]/..., https://HOST[:PORT]/... or HOST:PORT (as CONNECT).
    Exits 0 when allowed (or reported), 1 when denied.
    """
    from taxiway.egress import check as decide
    from taxiway.egress.acl import load_acl
    from taxiway.egress.addresses import AddressPolicy
    from taxiway.egress.http import ProtocolError, parse_absolute_target, parse_connect_target
    from taxiway.errors import InvalidInput

    try:
        if "://" in url:
            target = parse_absolute_target(url, {"http": 80, "https": 443, "ws": 80, "wss": 443})
        else:
            target = parse_connect_target(url)
    except ProtocolError as e:
        raise InvalidInput(f"cannot read {url!r}: {e}", "pass a URL like https://example.com/ or HOST:PORT") from None
    policy = AddressPolicy(tuple(_ranges(allow_range, "--allow-range")),
                           tuple(_ranges(deny_range, "--deny-range") + _ranges(deny_address, "--deny-address")))
    loaded = load_acl(acl) if acl else None
    for warning in loaded.warnings if loaded else ():
        click.echo(f"warning: {acl}: {warning}", err=True)
    result = decide(loaded, role, target, policy)
    if as_json:
        import orjson

        click.echo(orjson.dumps({
            "decision": result.decision, "allow": result.allowed, "reason": result.reason,
            "role": role, "project": result.acl.project if result.acl else None,
            "host": target.host.name, "port": target.port,
            "address": str(result.address.address) if result.address else None,
        }).decode())
    else:
        click.echo(f"{result.decision}: {target} for role {role or '(none)'}"
                   + (f" (project {result.acl.project})" if result.acl and result.acl.project else ""))
        click.echo(f"reason: {result.reason}")
    sys.exit(0 if result.allowed else 1)


@egress.command("hash-password")
@click.option("--rounds", default=12, show_default=True, help="bcrypt cost.")
def hash_password(rounds: int) -> None:
    """Read a password on stdin and print a bcrypt hash for the users file."""
    from taxiway.egress.roles import hash_password as make

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    click.echo(make(password, rounds))
