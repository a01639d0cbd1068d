"""The platform's commands: up, down, status, platform status, apps, machine, volumes, open.

They talk only to the API (platform.client), except ``up``/``down``/``platform
status``, which manage the local processes (platform.supervisor). The app is
``-a/--app`` or the ``app`` key of ./taxiway.toml, as flyctl does with fly.toml.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from taxiway.errors import InvalidInput, TaxiwayError


def _client():  # noqa: ANN202 - platform.client.Client, imported lazily
    from taxiway.platform.client import Client

    return Client.from_config()


def resolve_app(app: str | None) -> str:
    """``-a APP``, else the ``app`` of ./taxiway.toml; one clear error when neither gives one."""
    if app:
        return app
    path = Path("taxiway.toml")
    if path.is_file():
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
            raise InvalidInput(f"cannot read {path.resolve()} ({e})", "fix the file, or pass -a APP") from None
        name = data.get("app")
        if isinstance(name, str) and name:
            return name
        raise InvalidInput(f"{path.resolve()} has no 'app' key", "add app = \"NAME\", or pass -a APP")
    raise InvalidInput("no app given", "pass -a APP, or run in a folder with a taxiway.toml "
                       "('taxiway platform status' shows the platform itself)")


app_option = click.option("-a", "--app", "app", help="The app [default: 'app' in ./taxiway.toml].")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _emit(obj: Any) -> None:
    from taxiway.cli.output import emit_json

    emit_json(obj)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    from taxiway.cli.output import table

    table(rows, cols)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else ""


# -- up / down / platform status ---------------------------------------------------------------------------

def _print_up(up: dict[str, Any], already: bool = False) -> None:
    from taxiway.platform.client import config_path

    head = "the platform is up"
    if already:
        head = "the platform is already running" if up.get("ready") else "the platform is starting"
    click.echo(f"{head} (supervisor pid {up.get('pid')})")
    for key in ("api", "edge", "edge_https", "registry", "nats", "egress"):
        if up.get(key):
            click.echo(f"  {key.replace('edge_https', 'https'):<9}{up[key]}")
    for name in up.get("skipped") or []:
        click.echo(f"  {name:<9}not installed (skipped)")
    if not already:
        click.echo(f"  token    {config_path()} (org admin of 'personal')")


@click.command()
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once the API answers.")
@click.option("--free-ports", is_flag=True, hidden=True, help="Pick free loopback ports (tests).")
@click.option("--edge-port", "--http", "edge_port", type=click.IntRange(1, 65535),
              help="Port of the edge's plain HTTP listener on 127.0.0.1 [default: 8180].")
@click.option("--https", "https_port", type=click.IntRange(1, 65535),
              help="Port of the edge's HTTPS (and HTTP/2) listener on 127.0.0.1 [default: 8443].")
def up(detach: bool, free_ports: bool, edge_port: int | None, https_port: int | None) -> None:
    """Start the platform on loopback: nats, registry, egress, API, agent, edge (Ctrl-C stops it)."""
    from taxiway.platform import supervisor

    already = supervisor.running()
    if already is not None:
        _print_up(already, already=True)
        return
    # A port asked for by name must be ours: a taken default gives way to a free port, but a taken
    # --edge-port left the edge restarting in a loop behind "the platform is up".
    for flag, port in (("--edge-port", edge_port), ("--https", https_port)):
        if port and not supervisor.port_free(port):
            from taxiway.errors import InvalidInput

            raise InvalidInput(f"port {port} ({flag}) is in use on 127.0.0.1",
                               f"pick another with {flag}, or stop what listens there; nothing was started")
    if detach:
        try:
            up_json = supervisor.start_detached(free_ports=free_ports, edge_port=edge_port, https_port=https_port)
        except supervisor.AlreadyRunning:
            _print_up(supervisor.read_up() or {}, already=True)
            return
        _print_up(up_json)
        click.echo("stop it with 'taxiway down' (machines keep running)")
        return

    def ready(up_json: dict[str, Any]) -> None:
        _print_up(up_json)
        click.echo("press Ctrl-C to stop (machines keep running)")

    supervisor.serve(free_ports=free_ports, edge_port=edge_port, https_port=https_port, on_ready=ready)


@click.command()
def down() -> None:
    """Stop the platform's processes; machines keep running (the agent adopts them at the next up)."""
    from taxiway.platform import supervisor

    if supervisor.stop():
        click.echo("the platform is stopped (machines keep running)")
    else:
        click.echo("the platform is not running")


@click.group()
def platform() -> None:
    """The local platform's processes."""


@platform.command("status")
@json_option
def platform_status(as_json: bool) -> None:
    """Show the platform's components: pid, port, alive."""
    from taxiway.platform import supervisor

    st = supervisor.status()
    if as_json:
        return _emit(st)
    if not st["running"]:
        click.echo("the platform is not running; start it with 'taxiway up'")
        return
    click.echo(f"the platform is running (supervisor pid {st['pid']}); API "
               f"{'answers' if st['api_ok'] else 'does NOT answer'} at {st['api']}")
    rows = [{"component": n, "pid": c.get("pid"), "port": c.get("port") or "",
             "state": "running" if c["alive"] else "dead", "restarts": c.get("restarts", 0)}
            for n, c in st["components"].items()]
    rows += [{"component": n, "state": "not installed"} for n in st["skipped"]]
    _table(rows, ["component", "pid", "port", "state", "restarts"])


# -- status (an app's machines) ------------------------------------------------------------------------------

def _machine_rows(machines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in machines:
        checks = m.get("checks") or []
        passing = sum(1 for c in checks if c.get("status") == "passing")
        rows.append({"id": m["id"], "name": m.get("name") or "", "state": m.get("state"),
                     "group": m.get("process_group") or "", "release": f"v{m['release']}" if m.get("release") else "",
                     "checks": f"{passing}/{len(checks)}" if checks else "", "region": m.get("region") or "",
                     "image": m.get("image_ref") or "", "updated": _when(m.get("updated_at"))})
    return rows


@click.command()
@app_option
@json_option
def status(app: str | None, as_json: bool) -> None:
    """Show an app's machines (state, release, checks)."""
    name = resolve_app(app)
    with _client() as c:
        info = c.app(name)
        machines = c.machines(name)
        releases = c.releases(name)
    if as_json:
        return _emit({"app": info, "machines": machines, "release": releases[0] if releases else None})
    rel = releases[0] if releases else None
    click.echo(f"app {name} (org {info.get('org')})"
               + (f", release v{rel['version']} {rel.get('status', '')} ({rel.get('image')})" if rel else
                  ", no release yet"))
    if machines:
        _table(_machine_rows(machines), ["id", "name", "state", "group", "release", "checks", "region"])
    else:
        click.echo("no machines")


# -- apps ---------------------------------------------------------------------------------------------------

@click.group()
def apps() -> None:
    """List, create and destroy apps."""


@apps.command("ls")
@json_option
def apps_ls(as_json: bool) -> None:
    """List the org's apps."""
    with _client() as c:
        rows = c.apps()
    if as_json:
        return _emit(rows)
    _table([{"name": a["name"], "org": a.get("org"), "created": _when(a.get("created_at"))} for a in rows],
           ["name", "org", "created"])


@apps.command("create")
@click.argument("name")
def apps_create(name: str) -> None:
    """Create an app (no machines until the first deploy)."""
    with _client() as c:
        c.create_app(name)
    click.echo(f"created app {name}")


@apps.command("destroy")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def apps_destroy(name: str, yes: bool) -> None:
    """Destroy an app: its machines, releases, secrets and volumes."""
    if not yes and not click.confirm(f"destroy app {name} and all its machines?", default=False):
        raise click.Abort()
    with _client() as c:
        c.destroy_app(name)
    click.echo(f"destroyed app {name}")


# -- machine (the platform's; `taxiway machines` is the local runtime's) --------------------------------------

@click.group()
def machine() -> None:
    """The platform's machines of an app: ls, start, stop, restart, destroy, exec."""


@machine.command("ls")
@app_option
@click.option("--all", "include_deleted", is_flag=True, help="Include destroyed machines.")
@json_option
def machine_ls(app: str | None, include_deleted: bool, as_json: bool) -> None:
    """List the app's machines."""
    name = resolve_app(app)
    with _client() as c:
        rows = c.machines(name, include_deleted=include_deleted)
    if as_json:
        return _emit(rows)
    _table(_machine_rows(rows), ["id", "name", "state", "group", "release", "checks", "region", "image", "updated"])


def _verb(verb: str, doc: str):  # noqa: ANN202 - a click command
    @machine.command(verb, help=doc)
    @click.argument("ids", nargs=-1, required=True)
    @app_option
    @click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the new state.")
    @click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
    def cmd(ids: tuple[str, ...], app: str | None, wait: bool, timeout: float) -> None:
        name = resolve_app(app)
        target = {"start": "started", "stop": "stopped", "restart": "started"}[verb]
        with _client() as c:
            for mid in ids:
                c.machine_action(name, mid, verb)
                if wait:
                    c.wait(name, mid, target, timeout=timeout)
                click.echo(f"{mid} {target if wait else verb + ' requested'}")
    return cmd


_verb("start", "Start machines.")
_verb("stop", "Stop machines.")
_verb("restart", "Restart machines.")


@machine.command("destroy")
@click.argument("ids", nargs=-1, required=True)
@app_option
@click.option("-f", "--force", is_flag=True, help="Destroy even if it runs.")
def machine_destroy(ids: tuple[str, ...], app: str | None, force: bool) -> None:
    """Destroy machines (a running one needs --force)."""
    name = resolve_app(app)
    with _client() as c:
        for mid in ids:
            c.destroy_machine(name, mid, force=force)
            click.echo(f"{mid} destroyed")


@machine.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("mid", metavar="ID")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@app_option
@click.option("--timeout", default=60.0, show_default=True, help="Seconds the command may run.")
def machine_exec(mid: str, command: tuple[str, ...], app: str | None, timeout: float) -> None:
    """Run a command in a machine: taxiway machine exec ID -- CMD ARGS..."""
    import sys

    name = resolve_app(app)
    with _client() as c:
        out = c.exec(name, mid, list(command), timeout=timeout)
    sys.stdout.write(out.get("stdout") or "")
    sys.stderr.write(out.get("stderr") or "")
    sys.stdout.flush()
    code = out.get("exit_code")
    if code:
        sys.exit(code if isinstance(code, int) and 0 < code < 256 else 1)


# -- volumes ------------------------------------------------------------------------------------------------

@click.group()
def volumes() -> None:
    """An app's volumes: create, ls, destroy."""


@volumes.command("create")
@click.argument("name")
@app_option
@click.option("--size", default="1gb", show_default=True, help="Size, e.g. 1gb, 500mb.")
@click.option("--region", help="Region [default: local].")
@json_option
def volumes_create(name: str, app: str | None, size: str, region: str | None, as_json: bool) -> None:
    """Create a volume (mounted by a machine with [[mounts]] source = NAME)."""
    app_name = resolve_app(app)
    with _client() as c:
        vol = c.create_volume(app_name, name, size=size, region=region)
    if as_json:
        return _emit(vol)
    click.echo(f"created volume {vol['id']} ({name}, {vol['size'] >> 20} MB)")


@volumes.command("ls")
@app_option
@json_option
def volumes_ls(app: str | None, as_json: bool) -> None:
    """List the app's volumes."""
    with _client() as c:
        rows = c.volumes(resolve_app(app))
    if as_json:
        return _emit(rows)
    _table([{**v, "size": f"{v['size'] >> 20}MB", "machine": v.get("machine") or "",
             "created": _when(v.get("created_at"))} for v in rows],
           ["id", "name", "size", "region", "machine", "created"])


@volumes.command("destroy")
@click.argument("vid", metavar="ID")
@app_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def volumes_destroy(vid: str, app: str | None, yes: bool) -> None:
    """Destroy a volume (not while a machine uses it)."""
    name = resolve_app(app)
    if not yes and not click.confirm(f"destroy volume {vid} of {name} and its data?", default=False):
        raise click.Abort()
    with _client() as c:
        c.destroy_volume(name, vid)
    click.echo(f"destroyed volume {vid}")


# -- open ---------------------------------------------------------------------------------------------------

@click.command("open")
@app_option
@click.option("--browser/--no-browser", default=False, help="Also open it in a browser.")
def open_(app: str | None, browser: bool) -> None:
    """Print the app's URL (https://<app>.localhost:<port>, trusted once 'taxiway ca install' ran)."""
    from taxiway.platform import supervisor

    name = resolve_app(app)
    with _client() as c:
        c.app(name)  # an unknown app is an error here, not a dead link
    up = supervisor.read_up() or {}
    edge = up.get("edge")
    if not edge:
        raise TaxiwayError("the edge is not running", "start the platform with 'taxiway up'")
    port = edge.rsplit(":", 1)[1]
    url = f"http://{name}.localhost:{port}/"
    if up.get("edge_https"):  # the edge's HTTPS listener (E1): certificates from the platform's CA
        https_port = up["edge_https"].rsplit(":", 1)[1]
        url = f"https://{name}.localhost/" if https_port == "443" else f"https://{name}.localhost:{https_port}/"
    click.echo(url)
    if browser:
        import webbrowser

        webbrowser.open(url)
