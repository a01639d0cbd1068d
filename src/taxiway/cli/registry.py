"""``taxiway registry``: serve the multi-tenant OCI registry; manage orgs, tokens and GC."""

from __future__ import annotations

from pathlib import Path

import click

from taxiway.listen import DEFAULT_HOST


def _root(root: str | None) -> Path:
    if root:
        return Path(root)
    from taxiway.paths import home

    return home() / "registry"


def _tenants(root: str | None):
    from taxiway.registry.tenants import Tenants

    return Tenants(_root(root) / "tenants.db")


root_option = click.option("--root", envvar="TAXIWAY_REGISTRY_ROOT", type=click.Path(file_okay=False),
                           help="Registry storage directory [default: $TAXIWAY_HOME/registry].")


@click.group()
def registry() -> None:
    """Serve a multi-tenant OCI registry; manage orgs, tokens and garbage collection."""


@registry.command()
@click.option("--listen", default=f"{DEFAULT_HOST}:5000", show_default=True, metavar="HOST:PORT",
              help="Address to listen on: HOST:PORT, [IPV6]:PORT or :PORT (loopback).")
@root_option
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option("--no-auth", is_flag=True, help="No tokens, no orgs, no name rewriting (a private dev registry).")
@click.option("--no-delete", is_flag=True, help="Refuse DELETE of manifests, tags and blobs.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Server processes.")
@click.option("--realm", help="Token endpoint URL to advertise [default: from the request's Host].")
@click.option("--max-upload-sessions", default=200, show_default=True, type=click.IntRange(1),
              help="Open upload sessions an organisation may have; more get 429 TOOMANYREQUESTS.")
@click.option("--max-upload-bytes", default="10g", show_default=True,
              help="Bytes an organisation's open upload sessions may hold (so also its largest blob), e.g. 500m.")
def serve(listen, root, tls_cert, tls_key, no_auth, no_delete, workers, realm, max_upload_sessions,
          max_upload_bytes) -> None:
    """Serve the OCI distribution API (pull, push, referrers, deletes)."""
    from taxiway.errors import InvalidInput
    from taxiway.listen import parse_listen
    from taxiway.machines.config import parse_size
    from taxiway.registry.server import serve as run

    address = parse_listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise InvalidInput("--tls-cert and --tls-key go together", "pass both, or neither for plain HTTP")
    r = _root(root)
    click.echo(f"taxiway registry on {'https' if tls_cert else 'http'}://{address} storing in {r}", err=True)
    run(r, address, tls_cert=tls_cert, tls_key=tls_key, auth=not no_auth, delete=not no_delete,
        workers=workers, realm=realm, max_upload_sessions=max_upload_sessions,
        max_upload_bytes=parse_size(max_upload_bytes))


@registry.command()
@root_option
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--untagged", is_flag=True, help="Also remove manifests no tag reaches.")
@click.option("--grace", default="1h", show_default=True,
              help="Spare anything written more recently than this (keeps in-flight pushes safe).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def gc(root, dry_run, untagged, grace, as_json) -> None:
    """Mark and sweep unreferenced blobs (and untagged manifests); safe while serving."""
    from taxiway.registry.gc import collect
    from taxiway.registry.tenants import parse_duration

    seconds = 0 if grace in ("0", "0s") else parse_duration(grace)
    report = collect(_root(root), dry_run=dry_run, untagged=untagged, grace=seconds)
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json(report)
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {len(report['manifests'])} manifests and {len(report['blobs'])} blobs "
                   f"({report['bytes']} bytes); kept {report['kept_blobs']} blobs")


@registry.group()
def org() -> None:
    """Organisations: each has its own namespace of repositories."""


@org.command("create")
@click.argument("name")
@root_option
def org_create(name, root) -> None:
    """Create an organisation."""
    _tenants(root).create_org(name)
    click.echo(f"created org {name}")


@org.command("ls")
@root_option
@click.option("--json", "as_json", is_flag=True)
def org_ls(root, as_json) -> None:
    """List organisations."""
    rows = _tenants(root).orgs()
    if as_json:
        from taxiway.cli.output import emit_json

        return emit_json(rows)
    from taxiway.cli.output import table

    table(rows, ["name", "tokens"])


@registry.group()
def token() -> None:
    """Org tokens: the password for `podman login` and the token endpoint."""


@token.command("create")
@click.option("--org", "org_name", required=True, help="The organisation the token acts for.")
@click.option("--scope", type=click.Choice(["pull", "push"]), default="push", show_default=True,
              help="pull: read only; push: read, write and delete.")
@click.option("--expires", help="Lifetime such as 30d, 12h, at most 3650d [default: never].")
@root_option
@click.option("--json", "as_json", is_flag=True)
def token_create(org_name, scope, expires, root, as_json) -> None:
    """Create a token; it is printed once, only its hash is stored."""
    from taxiway.registry.tenants import parse_duration

    tok, secret = _tenants(root).create_token(org_name, scope, parse_duration(expires) if expires else None)
    if as_json:
        from taxiway.cli.output import emit_json

        return emit_json({**tok.to_json(), "token": secret})
    click.echo(secret)


@token.command("ls")
@click.option("--org", "org_name", help="Only this organisation's tokens.")
@root_option
@click.option("--json", "as_json", is_flag=True)
def token_ls(org_name, root, as_json) -> None:
    """List tokens (never their secrets)."""
    import time

    rows = [t.to_json() for t in _tenants(root).tokens(org_name)]
    if as_json:
        from taxiway.cli.output import emit_json

        return emit_json(rows)
    from taxiway.cli.output import table

    def when(ts):
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "never"

    table([{**r, "created": when(r["created"]), "expires": when(r["expires"]),
            "state": "active" if r["active"] else ("revoked" if r["revoked"] else "expired")} for r in rows],
          ["id", "org", "scope", "created", "expires", "state"])


@token.command("revoke")
@click.argument("token_id")
@root_option
def token_revoke(token_id, root) -> None:
    """Revoke a token by id; it stops working at once, bearer tokens included."""
    _, newly = _tenants(root).revoke(token_id)
    click.echo(f"revoked {token_id}" if newly else f"{token_id} was already revoked")


