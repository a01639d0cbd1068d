"""``taxiway certs``: the custom hostnames an app is served at over HTTPS by the edge.

``<app>.localhost`` needs nothing: the edge issues its certificate from taxiway's
CA on the first handshake. A custom hostname (``www.example.com``) is added here;
the edge then routes it to the app on both listeners and serves it with a CA
certificate, or, with ``--acme DIRECTORY_URL``, with one from that ACME server
(RFC 8555; the edge answers the http-01 or tls-alpn-01 challenge itself).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from taxiway.cli.platform import app_option, json_option, resolve_app
from taxiway.errors import InvalidInput


def _client():  # noqa: ANN202 - platform.client.Client, imported lazily
    from taxiway.platform.client import Client

    return Client.from_config()


def _app_and_host(args: tuple[str, ...], app: str | None) -> tuple[str, str]:
    """``APP HOST`` or ``HOST`` (the app from -a or ./taxiway.toml)."""
    if len(args) == 2:
        if app and app != args[0]:
            raise InvalidInput(f"two apps given ({args[0]} and -a {app})", "give the app once")
        return args[0], args[1]
    if len(args) == 1:
        return resolve_app(app), args[0]
    raise InvalidInput("expected [APP] HOSTNAME", "e.g. 'taxiway certs add web www.example.com'")


def _served(rec: dict[str, Any]) -> str:
    served = rec.get("served") or {}
    acme = served.get("acme") or {}
    if acme.get("state") == "failed":
        return f"acme failed: {acme.get('error', '')}"[:80]
    if served.get("source"):
        return f"{served['source']} until {served.get('not_after', '')[:10]}"
    if rec.get("acme"):
        return "acme: " + (acme.get("state") or "pending")
    return "issued on first use"


@click.group()
def certs() -> None:
    """Custom hostnames of an app, with their TLS certificates (taxiway CA or ACME)."""


@certs.command("ls")
@click.argument("app_arg", metavar="[APP]", required=False)
@app_option
@json_option
def certs_ls(app_arg: str | None, app: str | None, as_json: bool) -> None:
    """List the app's custom hostnames and what the edge serves for them."""
    name = app_arg or resolve_app(app)
    with _client() as c:
        rows = c.request("GET", f"/v1/apps/{name}/certificates")
    if as_json:
        from taxiway.cli.output import emit_json

        return emit_json(rows)
    from taxiway.cli.output import table

    table([{"hostname": r["hostname"], "issuer": "acme" if r.get("acme") else "taxiway CA",
            "challenge": r.get("challenge") or "", "status": _served(r)} for r in rows],
          ["hostname", "issuer", "challenge", "status"])


@certs.command("add")
@click.argument("args", nargs=-1, metavar="[APP] HOSTNAME")
@app_option
@click.option("--acme", "directory", metavar="DIRECTORY_URL",
              help="Get the certificate from this ACME server (RFC 8555) instead of taxiway's CA.")
@click.option("--challenge", type=click.Choice(["http-01", "tls-alpn-01"]), default="http-01", show_default=True,
              help="The ACME challenge the edge answers (http-01 on the HTTP port, tls-alpn-01 on the HTTPS one).")
@json_option
def certs_add(args: tuple[str, ...], app: str | None, directory: str | None, challenge: str, as_json: bool) -> None:
    """Serve the app at HOSTNAME too (routes and a certificate); point its DNS at the edge."""
    name, host = _app_and_host(args, app)
    body: dict[str, Any] = {"hostname": host}
    if directory:
        body.update(acme=directory, challenge=challenge)
    with _client() as c:
        rec = c.request("POST", f"/v1/apps/{name}/certificates", json_body=body)
    if as_json:
        from taxiway.cli.output import emit_json

        return emit_json(rec)
    how = f"ACME ({rec['acme']}, {rec['challenge']})" if rec.get("acme") else "taxiway's CA"
    click.echo(f"{rec['hostname']} now serves app {name}; certificate from {how}")


@certs.command("rm")
@click.argument("args", nargs=-1, metavar="[APP] HOSTNAME")
@app_option
def certs_rm(args: tuple[str, ...], app: str | None) -> None:
    """Stop serving the app at HOSTNAME."""
    name, host = _app_and_host(args, app)
    with _client() as c:
        c.request("DELETE", f"/v1/apps/{name}/certificates/{quote(host, safe='')}")
    click.echo(f"removed {host} from {name}")
