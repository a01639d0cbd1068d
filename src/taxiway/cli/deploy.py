"""The app commands: launch, deploy, releases, scale, secrets, logs (flyctl's workflow).

They talk only to the platform API (platform.client). The app is ``-a/--app``, else
the ``app`` of the folder's taxiway.toml. A deploy builds with the builder, pushes
to the platform's registry with a token the API hands out for the app, records a
release and follows it until it is deployed, failed or rolled back (non-zero exit
for the last two).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from taxiway.errors import InvalidInput, TaxiwayError

TOML = "taxiway.toml"
FLY_TOML = "fly.toml"
FINAL = ("complete", "failed", "rolled_back")


def _client():  # noqa: ANN202 - platform.client.Client, imported lazily
    from taxiway.platform.client import Client

    return Client.from_config()


def _say(msg: str) -> None:
    click.echo(msg, err=True)


app_option = click.option("-a", "--app", "app", help="The app [default: 'app' in the folder's taxiway.toml].")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _app_name(app: str | None, folder: Path = Path(".")) -> str:
    """``-a APP``, else the ``app`` of FOLDER/taxiway.toml (read through the config parser: errors name the line)."""
    if app:
        return app
    path = folder / TOML
    if path.is_file():
        from taxiway.platform import appconfig

        cfg, _ = appconfig.load(path)
        if cfg["app"]:
            return cfg["app"]
        raise InvalidInput(f"{path} has no 'app' key", "add app = \"NAME\", or pass -a APP")
    raise InvalidInput("no app given", f"pass -a APP, or run in a folder with a {TOML}")


# -- following a release ---------------------------------------------------------------------------------

def follow_release(client: Any, app: str, version: int, poll: float = 0.25, wait: float = 20.0) -> dict[str, Any]:
    """Print a release's progress lines as they come; return it once it is complete, failed or rolled back.

    Each read is a long poll (the API answers when the release changes), so the command returns
    the moment the deploy ends; ``poll`` only paces an API that answers at once anyway.
    """
    last: str | None = None
    seen: Any = None
    while True:
        rel = client.release(app, version, wait=wait, after=seen)
        if seen is not None and rel.get("updated_at") == seen and rel.get("status") not in FINAL:
            time.sleep(poll)  # no change (the wait ran out, or an API without long polls)
        seen = rel.get("updated_at")
        steps = rel.get("steps") or []
        # The release keeps its newest lines only: print what follows the last line we printed.
        start = 0
        if last is not None and last in steps:
            start = len(steps) - steps[::-1].index(last)
        for line in steps[start:]:
            _say(f"  {line}")
        if steps:
            last = steps[-1]
        if rel.get("status") in FINAL:
            return rel
        if rel.get("warning"):
            raise TaxiwayError(rel["warning"], "the platform cannot deploy yet")


def _finish(rel: dict[str, Any], app: str) -> None:
    status, version = rel.get("status"), rel.get("version")
    if status == "complete":
        click.echo(f"v{version} of {app} is deployed")
        return
    if status == "rolled_back":
        raise TaxiwayError(f"v{version} of {app} was rolled back: {rel.get('error') or 'its machines failed'}",
                           "see 'taxiway logs' for why the new machines failed their checks")
    raise TaxiwayError(f"v{version} of {app} failed: {rel.get('error') or 'see its steps'}",
                       "see 'taxiway releases' and 'taxiway logs'")


# -- build and push ----------------------------------------------------------------------------------------

def _buildpacks(specs: list[str]) -> list[str]:
    """The [build] buildpacks this builder can use: bundled ids and local folders; others (Fly's paketo
    images) are skipped with a warning, and detection picks among the bundled ones."""
    from taxiway.builder.buildpack import bundled

    ours = bundled()
    out = []
    for s in specs:
        if s in ours or Path(s).is_dir():
            out.append(s)
        else:
            _say(f"[build] ignoring buildpack {s!r} (not bundled, not a folder); detecting among taxiway's own")
    return out


def build_and_push(client: Any, app: str, folder: Path, cfg: dict[str, Any]) -> str:
    """Build FOLDER with the builder, push it to the platform registry; returns the image reference."""
    from taxiway.builder import lifecycle
    from taxiway.oci.auth import Credentials
    from taxiway.oci.client import RegistryClient
    from taxiway.oci.push import push
    from taxiway.oci.store import Store

    token = client.registry_token(app)
    ref = f"{token['registry']}/{token['repository']}:deployment-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
    store = Store()
    # The builder keeps its cache (dependency layers, the last export) per image name, tag included:
    # build under one name per app, so a redeploy reuses what did not change (a new name per deploy
    # made every deploy a cold build: pip install again), then give the image this deploy's tag.
    build_ref = f"localhost/taxiway-deploy/{token.get('stored_as') or token['repository']}:latest"
    opts = lifecycle.BuildOptions(source=folder, tag=build_ref, buildpacks=_buildpacks(cfg["build"]["buildpacks"]),
                                  env=dict(cfg["build"].get("args") or {}))
    try:
        result = lifecycle.build(opts, store)
    except lifecycle.BuildFailed as e:
        for line in e.log_tail:
            _say(f"  | {line}")
        raise
    store.tag(ref, result.descriptor)
    _say(f"[export] wrote {', '.join(result.written) or 'no new layer'}; reused {', '.join(result.reused) or 'none'}")
    creds = Credentials(token["username"], token["password"])
    with RegistryClient(token["registry"], credentials=creds, use_stored_credentials=False) as rc:
        pushed = push(ref, store=store, client=rc)
    _say(f"[push] {ref} ({pushed.digest[:19]})")
    return ref


def push_local(client: Any, app: str, image: str) -> str:
    """An image of this host's store that is not on the platform registry is pushed there first
    (into the app's org): machines run only images of their own org on the platform registry.
    Anything else is returned as it is (the API says what is wrong with it)."""
    from taxiway.oci.reference import Reference
    from taxiway.oci.store import Store

    if Reference.parse(image).registry != "localhost":
        return image
    try:
        Store().image(image)
    except TaxiwayError:
        # nothing to deploy: say so before a release is recorded (its machines could only fail)
        raise InvalidInput(f"no image {image} in this host's image store",
                           "build it first (taxiway build), or name an image of the platform's registry") from None
    try:
        token = client.registry_token(app)
    except TaxiwayError:
        return image  # a platform without a registry: machines run local-store images as they are
    from taxiway.oci.auth import Credentials
    from taxiway.oci.client import RegistryClient
    from taxiway.oci.push import push

    ref = f"{token['registry']}/{token['repository']}:deployment-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
    creds = Credentials(token["username"], token["password"])
    with RegistryClient(token["registry"], credentials=creds, use_stored_credentials=False) as rc:
        pushed = push(ref, source=image, client=rc)
    _say(f"[push] {image} as {ref} ({pushed.digest[:19]})")
    return ref


def run_deploy(client: Any, app: str, folder: Path, cfg: dict[str, Any], image: str | None,
               strategy: str | None) -> dict[str, Any]:
    """Build (unless an image is given), push, record the release, follow it; raises unless it is deployed."""
    image = image or cfg["build"].get("image")
    if not image:
        image = build_and_push(client, app, folder, cfg)
    else:
        image = push_local(client, app, image)
    cfg = {**cfg, "app": app}
    rel = client.create_release(app, image, cfg, strategy=strategy)
    _say(f"release v{rel['version']} of {app}: {image}")
    if rel.get("warning"):
        raise TaxiwayError(rel["warning"], "the platform cannot deploy yet")
    rel = follow_release(client, app, rel["version"])
    _finish(rel, app)
    return rel


def _load_config(folder: Path) -> tuple[dict[str, Any], Path]:
    from taxiway.platform import appconfig

    for name in (TOML, FLY_TOML):
        path = folder / name
        if path.is_file():
            cfg, ignored = appconfig.load(path)
            if ignored:
                _say(f"{path}: ignoring keys taxiway does not use: {', '.join(ignored)}")
            return cfg, path
    raise InvalidInput(f"no {TOML} in {folder.resolve()}", "run 'taxiway launch' there first")


@click.command()
@click.argument("folder", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@app_option
@click.option("--image", help="Deploy this image instead of building FOLDER.")
@click.option("--strategy", type=click.Choice(["rolling", "bluegreen", "canary", "immediate"]),
              help="How machines are replaced [default: [deploy] strategy, else rolling].")
def deploy(folder: Path, app: str | None, image: str | None, strategy: str | None) -> None:
    """Build FOLDER, push it and roll it out; exit non-zero if it fails or is rolled back.

    \b
      taxiway deploy                      # the app in this folder (taxiway.toml)
      taxiway deploy --image 127.0.0.1:5000/web:v2 --strategy bluegreen
    """
    cfg, _ = _load_config(folder)
    name = app or cfg["app"]
    if not name:
        raise InvalidInput(f"{folder / TOML} has no 'app' key", "add app = \"NAME\", or pass -a APP")
    with _client() as client:
        client.app(name)  # a clear "no app" before building anything
        run_deploy(client, name, folder, cfg, image, strategy)


# -- launch ----------------------------------------------------------------------------------------------

def detect(folder: Path) -> list[str]:
    """The builder's detection (its bundled buildpacks' bin/detect, in its order): the winning group's ids.

    These scripts are taxiway's own and only test which files exist, so they run here,
    without the build sandbox that untrusted buildpacks get; ``taxiway build`` runs them
    again inside it.
    """
    import subprocess

    from taxiway.builder.buildpack import DEFAULT_ORDER, bundled

    bps = bundled()
    results: dict[str, int] = {}
    looked: dict[str, str] = {}

    def run(bid: str) -> int:
        if bid not in results:
            bp = bps[bid]
            script = Path(bp.path) / "bin" / "detect"
            p = subprocess.run(["/bin/sh", str(script)], cwd=folder, capture_output=True, timeout=30,
                               env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            results[bid] = p.returncode
            looked[bid] = p.stdout.decode(errors="replace").strip()
        return results[bid]

    for group in DEFAULT_ORDER:
        passed = []
        ok = True
        for bid, optional in group:
            rc = run(bid)
            if rc == 0:
                passed.append(bid)
            elif not optional:
                ok = False
                break
        if ok and passed:
            return passed
    why = "; ".join(f"{b}: {w or 'did not apply'}" for b, w in looked.items())
    raise InvalidInput(f"no buildpack detected an app in {folder}: {why}",
                       "add the file your language's buildpack looks for, or write taxiway.toml with [build] image")


def _default_name(folder: Path) -> str:
    import re

    from taxiway.platform import schema

    raw = folder.resolve().name.lower()
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")
    if not name or not name[0].isalpha():
        name = f"app-{name}".strip("-")
    name = name[:63].rstrip("-")
    if not schema.valid_app_name(name):
        raise InvalidInput(f"cannot make an app name from the folder name {raw!r}", "pass --name NAME")
    return name


def launch_config(name: str, groups: list[str], port: int = 8080) -> dict[str, Any]:
    """The taxiway.toml launch writes for a detected app: one http service with a TCP check on its port."""
    from taxiway.platform import appconfig

    return appconfig.validate({
        "app": name, "primary_region": "local", "kill_signal": "SIGINT", "kill_timeout": "5s",
        "build": {"buildpacks": []},
        "http_service": {"internal_port": port, "force_https": False, "auto_stop_machines": "off",
                         "auto_start_machines": True, "min_machines_running": 0},
        # Listening is the least every web app does; a check makes deploys wait for it. No grace period:
        # a check that fails before the app listens only means "not yet" to the deployer and the edge
        # (retried after interval), while a grace period would add itself to every deploy.
        "checks": {"alive": {"type": "tcp", "port": port, "interval": "1s", "timeout": "2s", "grace_period": "0s"}},
        "deploy": {"strategy": "rolling"},
        "vm": [{"memory": 256, "cpus": 1}],
    })


@click.command()
@click.argument("folder", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="The app's name [default: the fly.toml's app, else the folder's name].")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="The port the app listens on ($PORT is set to it).")
@click.option("--no-deploy", is_flag=True, help="Write taxiway.toml and create the app, but do not deploy.")
def launch(folder: Path, name: str | None, port: int, no_deploy: bool) -> None:
    """Detect the app in FOLDER, write taxiway.toml, create the app and deploy it.

    A folder with a fly.toml is adopted: its keys are kept where they mean the same
    in taxiway, and the ones taxiway ignores are listed.
    """
    from taxiway.fsutil import atomic_write
    from taxiway.platform import appconfig, schema

    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder", "pass the folder of your app")
    target = folder / TOML
    if target.exists():
        raise InvalidInput(f"{target} already exists", "deploy it with 'taxiway deploy', or remove it to launch again")
    fly = folder / FLY_TOML
    if fly.is_file():
        cfg, ignored = appconfig.load(fly)
        _say(f"adopting {fly}" + (f"; ignoring keys taxiway does not use: {', '.join(ignored)}" if ignored else ""))
        name = name or cfg["app"] or _default_name(folder)
        cfg = {**cfg, "app": name}
    else:
        groups = detect(folder)
        _say(f"[detect] {', '.join(groups)}")
        name = name or _default_name(folder)
        cfg = launch_config(name, groups, port)
    if not schema.valid_app_name(name):
        raise InvalidInput(f"invalid app name {name!r}", "lowercase letters, digits and '-', starting with a letter")
    with _client() as client:
        client.create_app(name)  # first: an API that refuses (name taken, no platform) leaves the folder as it was
        with atomic_write(target, mode=0o644, binary=False) as f:
            f.write(f"# taxiway.toml for {name} (fly.toml's keys; see the README, Platform)\n")
            f.write(appconfig.to_toml(cfg))
        click.echo(f"created app {name} and wrote {target}")
        if no_deploy:
            click.echo("deploy it with 'taxiway deploy'")
            return
        run_deploy(client, name, folder, cfg, None, None)


# -- releases ----------------------------------------------------------------------------------------------

@click.command()
@app_option
@json_option
def releases(app: str | None, as_json: bool) -> None:
    """List the app's releases, newest first."""
    name = _app_name(app)
    with _client() as client:
        rows = client.releases(name)
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json(rows)
        return
    from taxiway.cli.output import table

    table([{"version": f"v{r.get('version')}", "status": r.get("status"),
            "strategy": r.get("strategy", ""), "image": r.get("image", ""),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"])) if r.get("created_at") else "",
            "description": r.get("description") or r.get("error") or ""} for r in rows],
          ["version", "status", "strategy", "created", "image", "description"])


# -- scale -------------------------------------------------------------------------------------------------

@click.group()
def scale() -> None:
    """Scale the app's machines: how many (count) and how big (memory)."""


def _group_machines(client: Any, app: str, group: str) -> list[dict[str, Any]]:
    return [m for m in client.machines(app) if m.get("process_group") == group and m.get("state") != "destroyed"]


@scale.command("count")
@click.argument("count", type=click.IntRange(0, 100))
@click.option("--process", "group", default=None, help="The process group [default: app].")
@app_option
def scale_count(count: int, group: str | None, app: str | None) -> None:
    """Run COUNT machines of a process group (new ones copy the newest machine's config)."""
    from taxiway.platform import schema

    name = _app_name(app)
    group = group or schema.DEFAULT_PROCESS
    with _client() as client:
        ms = _group_machines(client, name, group)
        if count > len(ms):
            if not ms:
                raise InvalidInput(f"{name} has no machine in process group {group!r} to copy",
                                   "deploy the app first, or name a group it has with --process")
            model = max(ms, key=lambda m: ((m.get("release") or 0), m.get("created_at") or 0))
            cfg = model["config"]
            if any("volume" in mt for mt in cfg.get("mounts") or []):
                raise InvalidInput(f"process group {group} keeps volumes (one machine each)",
                                   "create a volume per new machine with 'taxiway volumes create' and deploy")
            for _ in range(count - len(ms)):
                m = client.create_machine(name, cfg, region=model.get("region"))
                client.wait(name, m["id"], "started", timeout=120)
                click.echo(f"created {m['id']} (v{m.get('release')})")
        elif count < len(ms):
            # Old releases and machines that are not running go first.
            order = sorted(ms, key=lambda m: (m.get("state") == "started", m.get("release") or 0, m.get("created_at") or 0))
            for m in order[: len(ms) - count]:
                client.machine_action(name, m["id"], "cordon")
                client.destroy_machine(name, m["id"], force=True)
                click.echo(f"destroyed {m['id']}")
        click.echo(f"{name} runs {count} machine{'s' if count != 1 else ''} in process group {group}")


@scale.command("memory")
@click.argument("mb", type=click.IntRange(64, 1 << 20))
@click.option("--process", "group", default=None, help="Only this process group [default: all].")
@app_option
def scale_memory(mb: int, group: str | None, app: str | None) -> None:
    """Give the app's machines MB megabytes of memory (each is replaced, one at a time)."""
    name = _app_name(app)
    with _client() as client:
        ms = [m for m in client.machines(name) if (group is None or m.get("process_group") == group)]
        if not ms:
            raise InvalidInput(f"{name} has no machines" + (f" in process group {group}" if group else ""),
                               "deploy it first")
        for m in ms:
            cfg = {**m["config"], "guest": {**(m["config"].get("guest") or {}), "memory": mb << 20}}
            new = client.update_machine(name, m["id"], cfg, current_version=m.get("version"))
            if m.get("state") == "started":
                client.wait(name, m["id"], "started", timeout=120, instance_id=new.get("instance_id"))
            click.echo(f"{m['id']}: {mb} MB")
    _say("the next deploy uses taxiway.toml's [[vm]] memory: set it there to keep this size")


# -- secrets -----------------------------------------------------------------------------------------------

@click.group()
def secrets() -> None:
    """Set, list and unset the app's secrets (sealed at rest; values are never shown)."""


def _after_change(client: Any, app: str, out: dict[str, Any]) -> None:
    rel = out.get("release")
    if not rel:
        return
    if rel.get("warning"):
        raise TaxiwayError(rel["warning"], "the platform cannot deploy yet")
    _say(f"release v{rel['version']} restarts the machines with the new secrets")
    _finish(follow_release(client, app, rel["version"]), app)


@secrets.command("set")
@click.argument("pairs", nargs=-1, required=True, metavar="NAME=VALUE...")
@click.option("--stage", is_flag=True, help="Store only; machines get them at the next deploy or restart.")
@app_option
def secrets_set(pairs: tuple[str, ...], stage: bool, app: str | None) -> None:
    """Set secrets (NAME=VALUE; NAME=- reads the value from stdin); machines restart unless --stage."""
    from taxiway.platform.secrets import check_name

    values: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise InvalidInput(f"{p!r} is not NAME=VALUE", "write e.g. DATABASE_URL=postgres://...")
        check_name(k)
        values[k] = sys.stdin.read().rstrip("\n") if v == "-" else v
    name = _app_name(app)
    with _client() as client:
        out = client.set_secrets(name, values, stage=stage)
        click.echo(f"set {', '.join(sorted(values))} on {name}" + (" (staged)" if stage else ""))
        _after_change(client, name, out)


@secrets.command("ls")
@app_option
@json_option
def secrets_ls(app: str | None, as_json: bool) -> None:
    """List secret names and digests (a digest changes when the value does)."""
    name = _app_name(app)
    with _client() as client:
        rows = client.secrets(name)
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json(rows)
        return
    from taxiway.cli.output import table

    table([{"name": r["name"], "digest": r.get("digest", ""),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["updated_at"])) if r.get("updated_at") else ""}
           for r in rows], ["name", "digest", "updated"])


@secrets.command("unset")
@click.argument("names", nargs=-1, required=True)
@click.option("--stage", is_flag=True, help="Remove only; machines keep the old value until they restart.")
@app_option
def secrets_unset(names: tuple[str, ...], stage: bool, app: str | None) -> None:
    """Remove secrets; machines restart unless --stage."""
    from taxiway.platform.secrets import check_name

    for n in names:
        check_name(n)
    name = _app_name(app)
    with _client() as client:
        out: dict[str, Any] = {}
        for i, n in enumerate(names):
            # One restart for all of them: every unset but the last is staged.
            out = client.unset_secret(name, n, stage=stage or i < len(names) - 1)
        click.echo(f"unset {', '.join(names)} on {name}" + (" (staged)" if stage else ""))
        _after_change(client, name, out)


# -- logs ----------------------------------------------------------------------------------------------------

def _log_line(rec: dict[str, Any]) -> str:
    at = rec.get("at")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if isinstance(at, int | float) else ""
    return f"{when} {rec.get('machine', '')[:14]} [{rec.get('stream', 'stdout')}] {rec.get('line', '').rstrip()}"


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--machine", help="Only this machine's lines.")
@app_option
@json_option
def logs(follow: bool, machine: str | None, app: str | None, as_json: bool) -> None:
    """Show the app's logs (the newest 1000 lines), or follow them with -f."""
    import json

    name = _app_name(app)
    with _client() as client:
        lines = client.follow_logs(name, machine) if follow else client.logs(name, machine)
        for rec in lines:
            click.echo(json.dumps(rec) if as_json else _log_line(rec))
