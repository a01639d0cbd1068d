"""Image commands: pull, push, tag, login, logout, images, and ``image ...``.

Heavy modules (httpx, the store, the pipelines) are imported inside the
command functions so ``taxiway --help`` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from taxiway.cli.main import exit_now
from taxiway.cli.output import emit_json, is_tty, progress, table


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _per_blob(p: Any, verb: str) -> Callable[[Any, int], None]:
    """The oci parts' ``progress(descriptor, n)`` callback, drawn as one bar per blob on ``p`` (rich's Progress)."""
    tasks: dict[str, Any] = {}

    def advance(desc: Any, n: int) -> None:
        if desc.digest not in tasks:
            what = "config" if "config" in desc.media_type else desc.digest[7:19]
            tasks[desc.digest] = p.add_task(f"{verb} {what}", total=desc.size)
        p.advance(tasks[desc.digest], n)

    return advance


def _fs_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a full disk or a permission problem into one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import errno

        from taxiway.errors import TaxiwayError

        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = e.filename or "the store"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TaxiwayError(f"no space left on the device writing {where}",
                                   "free some space (`taxiway image prune` removes unreferenced blobs); the store is unchanged") from e
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise TaxiwayError(f"cannot write {where} ({e.strerror})", "check the permissions of $TAXIWAY_HOME") from e
            raise

    return wrapper


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(n)


@click.command()
@click.argument("reference")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", help="Platform to pull from a multi-platform image (default: this host).")
@click.option("--all-platforms", is_flag=True, help="Pull every platform of a multi-platform image.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS (always allowed for loopback registries).")
@click.option("-j", "--jobs", default=4, show_default=True, help="Layers downloaded at once.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@click.option("--json", "as_json", is_flag=True, help="Print what was pulled as JSON.")
@_fs_errors
def pull(reference: str, platform_: str | None, all_platforms: bool, insecure: bool, jobs: int, quiet: bool,
         as_json: bool) -> None:
    """Pull REFERENCE (registry/name[:tag][@digest]) into the local store."""
    from taxiway.errors import InvalidInput
    from taxiway.oci.image import Platform
    from taxiway.oci.pull import pull as do_pull

    if platform_ and all_platforms:
        raise InvalidInput("--platform and --all-platforms exclude each other", "pass one of them")
    plat = Platform.parse(platform_) if platform_ else None
    with progress(False if (quiet or as_json) else None) as p:
        result = do_pull(reference, platform=plat, all_platforms=all_platforms, insecure=insecure,
                         progress=_per_blob(p, "pull"),
                         log=_warn, jobs=jobs, notice=_warn if is_tty() else None)
    if as_json:
        emit_json({"name": result.name, "digest": result.descriptor.digest, "media_type": result.descriptor.media_type,
                   "platforms": [{"platform": pl, "digest": dg} for pl, dg in result.manifests],
                   "fetched": result.fetched, "fetched_bytes": result.fetched_bytes, "present": result.present,
                   "warnings": result.warnings})
    elif quiet:
        click.echo(result.descriptor.digest)
    else:
        if len(result.manifests) > 1:
            for plat_s, dg in result.manifests:
                click.echo(f"  {plat_s}: {dg}", err=True)
        click.echo(f"pulled {result.name} ({result.descriptor.digest}): {result.fetched} blobs fetched "
                   f"({_human(result.fetched_bytes)}), {result.present} already present")
    exit_now(0, "pull")


@click.command()
@click.argument("reference")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS (always allowed for loopback registries).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@_fs_errors
def push(reference: str, insecure: bool, quiet: bool) -> None:
    """Push REFERENCE from the local store to its registry."""
    from taxiway.oci.push import push as do_push

    with progress(None if not quiet else False) as p:
        result = do_push(reference, insecure=insecure, progress=_per_blob(p, "push"))
    if quiet:
        click.echo(result.digest)
        return
    click.echo(f"pushed {result.name} ({result.digest}): {result.uploaded} blobs uploaded ({_human(result.uploaded_bytes)}), "
               f"{result.mounted} mounted, {result.existing} already there")


@click.command()
@click.argument("source")
@click.argument("target")
@_fs_errors
def tag(source: str, target: str) -> None:
    """Name the image SOURCE also TARGET (both are full references)."""
    from taxiway.oci.store import Store, normalize_name

    store = Store()
    desc = store.resolve(source)
    store.tag(target, desc)
    click.echo(f"tagged {normalize_name(target)} -> {desc.digest}")


@click.command()
@click.argument("registry")
@click.option("-u", "--username", help="User name (prompted if missing).")
@click.option("-p", "--password", help="Password (insecure on the command line; prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Try the credentials on the registry before saving them.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS for the check.")
@_fs_errors
def login(registry: str, username: str | None, password: str | None, password_stdin: bool, verify: bool,
          insecure: bool) -> None:
    """Check and save credentials for REGISTRY (host[:port]); used by pull and push."""
    from taxiway.errors import InvalidInput
    from taxiway.oci.auth import save_credentials

    registry = _registry_host(registry)
    if password_stdin:
        if password:
            raise InvalidInput("--password and --password-stdin exclude each other", "pass one of them")
        password = sys.stdin.read().rstrip("\r\n")
    if not username:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise InvalidInput("empty user name or password", "pass -u USER and the password on stdin with --password-stdin")
    if verify:
        from taxiway.oci.auth import Credentials
        from taxiway.oci.client import RegistryClient, Unreachable

        try:
            with RegistryClient(registry, insecure=insecure, credentials=Credentials(username, password)) as client:
                if not client.check_login():
                    _warn(f"{registry} lets anyone in; the credentials are saved for when it asks")
        except Unreachable as e:
            _warn(f"{e.message}; saving the credentials without checking them")
    path = save_credentials(registry, username, password)
    click.echo(f"credentials for {registry} saved in {path}")


@click.command()
@click.argument("registry")
@_fs_errors
def logout(registry: str) -> None:
    """Forget the credentials saved for REGISTRY."""
    from taxiway.errors import NotFound
    from taxiway.oci.auth import remove_credentials

    registry = _registry_host(registry)
    if not remove_credentials(registry):
        raise NotFound(f"no credentials saved for {registry}", "nothing to do")
    click.echo(f"removed credentials for {registry}")


def _registry_host(s: str) -> str:
    from taxiway.errors import InvalidInput

    host = s.strip()
    for prefix in ("https://", "http://"):
        host = host.removeprefix(prefix)
    host = host.rstrip("/")
    if not host or "/" in host or " " in host:
        raise InvalidInput(f"invalid registry {s!r}", "give a host[:port], e.g. 127.0.0.1:5000")
    return host


def _image_rows(store: Any) -> list[dict[str, Any]]:
    from taxiway.oci import mediatypes as mt

    rows = []
    for name, desc in store.images():
        row: dict[str, Any] = {"name": name, "digest": desc.digest, "media_type": desc.media_type}
        try:
            if desc.media_type in mt.INDEX_TYPES:
                from taxiway.oci.store import parse_json

                idx = parse_json(store.read_blob(desc.digest), name)
                plats = [m.get("platform") for m in idx.get("manifests", []) if m.get("platform")]
                row["platforms"] = [f"{p.get('os')}/{p.get('architecture')}" + (f"/{p['variant']}" if p.get("variant") else "") for p in plats]
                blobs: dict[str, int] = {}
                for m in idx.get("manifests", []):
                    if store.has_blob(m["digest"]):
                        child = store.image(m["digest"])
                        for d in [child.config_descriptor(), *child.layers()]:
                            blobs[d.digest] = d.size
                row["size"] = sum(blobs.values())  # every platform present, shared layers counted once
                row["platform"] = ",".join(row["platforms"])
            else:
                img = store.image(name)
                cfg = img.config()
                row["size"] = sum(layer.size for layer in img.layers()) + img.config_descriptor().size
                row["platform"] = f"{cfg.get('os', '?')}/{cfg.get('architecture', '?')}" + (f"/{cfg['variant']}" if cfg.get("variant") else "")
                row["created"] = cfg.get("created")
                row["layers"] = len(img.layers())
        except Exception as e:  # noqa: BLE001 - a broken entry must not hide the others
            row["error"] = str(e)
        rows.append(row)
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fs_errors
def images(as_json: bool) -> None:
    """List images in the local store."""
    from taxiway.oci.store import Store

    rows = _image_rows(Store())
    if as_json:
        emit_json(rows)
        return
    table([{**r, "digest": r["digest"][7:19], "size": _human(r.get("size", 0))} for r in rows],
          ["name", "digest", "platform", "size"])


@click.group()
def image() -> None:
    """Inspect, export, scan, remove, load and save images in the local store."""


def _platform(s: str | None) -> Any:
    from taxiway.oci.image import Platform

    return Platform.parse(s) if s else None


@image.command()
@click.argument("reference")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", help="Which image of a multi-platform index.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (manifest, config, layers, history).")
@click.option("--remote", is_flag=True, help="Read the image from its registry instead of the store (nothing is pulled).")
@click.option("--insecure", is_flag=True, help="With --remote: allow plain HTTP and unverified TLS.")
@_fs_errors
def inspect(reference: str, platform_: str | None, as_json: bool, remote: bool, insecure: bool) -> None:
    """Show an image's manifest, config, layers, sizes and history."""
    import json

    from taxiway.oci.image import Descriptor
    from taxiway.oci.store import Store

    store = Store()
    if remote:
        from taxiway.oci.pull import RemoteImage

        img: Any = RemoteImage.fetch(reference, platform=_platform(platform_), insecure=insecure)
        top_digest = img.digest()
    else:
        top_digest = store.resolve(reference).digest
        img = store.image(reference, _platform(platform_))
    cfg = img.config()
    layers = img.layers()
    config_desc = Descriptor.from_json(img.manifest()["config"])
    diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
    info = {
        "name": reference if reference != top_digest else None,
        "digest": img.digest(),
        "index_digest": top_digest if top_digest != img.digest() else None,
        "media_type": img.media_type(),
        "platform": f"{cfg.get('os')}/{cfg.get('architecture')}" + (f"/{cfg['variant']}" if cfg.get("variant") else ""),
        "created": cfg.get("created"),
        "size": sum(layer.size for layer in layers) + config_desc.size,
        "config_digest": config_desc.digest,
        "config": cfg.get("config") or {},
        "layers": [{**layer.to_json(), "diff_id": diff_ids[i] if i < len(diff_ids) else None,
                    "present": store.has_blob(layer.digest)} for i, layer in enumerate(layers)],
        "history": cfg.get("history") or [],
        "manifest": img.manifest(),
    }
    if remote:
        img.close()
    if as_json:
        emit_json(info)
        return
    c = info["config"]
    click.echo(f"Name:      {info['name'] or '-'}")
    click.echo(f"Digest:    {info['digest']}" + (f"  (index {info['index_digest']})" if info["index_digest"] else ""))
    click.echo(f"Type:      {info['media_type']}")
    click.echo(f"Platform:  {info['platform']}")
    click.echo(f"Created:   {info['created'] or '-'}")
    click.echo(f"Size:      {_human(info['size'])} in {len(layers)} layers")
    for key, label in (("Entrypoint", "Entrypoint"), ("Cmd", "Cmd"), ("WorkingDir", "Workdir"), ("User", "User")):
        if c.get(key):
            value = c[key]
            click.echo(f"{label + ':':<10} {json.dumps(value) if isinstance(value, list) else value}")
    for env in c.get("Env") or []:
        click.echo(f"Env:       {env}")
    if c.get("ExposedPorts"):
        click.echo(f"Ports:     {', '.join(c['ExposedPorts'])}")
    click.echo("Layers:")
    for layer in info["layers"]:
        flag = "" if layer["present"] or remote else "  (missing)"
        click.echo(f"  {layer['digest'][7:19]}  {_human(layer['size']):>9}  {layer['mediaType']}{flag}")
    if info["history"]:
        click.echo("History:")
        for h in info["history"]:
            mark = " (empty)" if h.get("empty_layer") else ""
            click.echo(f"  {h.get('created', '-'):<25} {(h.get('created_by') or h.get('comment') or '')[:90]}{mark}")


@image.command()
@click.argument("reference")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", help="Which image of a multi-platform index.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written, layer by layer, as JSON.")
@_fs_errors
def export(reference: str, dest: str, platform_: str | None, as_json: bool) -> None:
    """Unpack an image's layers, in order, into the root filesystem DEST."""
    from pathlib import Path

    from taxiway.oci.store import Store
    from taxiway.oci.unpack import export as do_export

    img = Store().image(reference, _platform(platform_))
    with progress(False if as_json else None) as p:
        advance = _per_blob(p, "unpack")
        stats = do_export(img, Path(dest), progress=advance)
    for w in stats.warnings[:20]:
        _warn(w)
    if as_json:
        emit_json(stats.to_json())
    else:
        click.echo(f"exported {reference} ({img.digest()}) to {dest}: {stats.total('files')} files, {stats.total('dirs')} dirs, "
                   f"{stats.total('symlinks')} symlinks, {_human(stats.total('bytes'))}"
                   + (f", {stats.total('skipped')} entries skipped" if stats.total("skipped") else ""))
    exit_now(0, "export")


@image.command()
@click.argument("reference")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", help="Which image of a multi-platform index.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--fail-on-secrets", is_flag=True, help="Exit non-zero when a hidden file looks like a secret.")
@_fs_errors
def scan(reference: str, platform_: str | None, as_json: bool, fail_on_secrets: bool) -> None:
    """List files a later layer deletes or overwrites, flagging ones that look like secrets."""
    from taxiway.errors import TaxiwayError
    from taxiway.oci.scan import scan as do_scan
    from taxiway.oci.store import Store

    img = Store().image(reference, _platform(platform_))
    with progress(False if as_json else None) as p:
        advance = _per_blob(p, "scan")
        result = do_scan(img, progress=advance)
    if as_json:
        emit_json(result.to_json())
    else:
        rows = result.rows()
        if rows:
            table(rows, ["path", "added", "hidden", "size", "secret"])
        click.echo(f"{len(result.hidden)} files hidden by later layers, {len(result.secrets)} look like secrets"
                   + (" (their bytes are still in the image: rebuild without them)" if result.has_secrets else ""))
    if fail_on_secrets and result.has_secrets:
        raise TaxiwayError(f"{reference} hides {len(result.secrets)} likely secrets in lower layers",
                           "rebuild the image so the secrets are never added; deleting them later does not remove them",
                           exit_code=3)


@image.command()
@click.argument("references", nargs=-1, required=True)
@_fs_errors
def rm(references: tuple[str, ...]) -> None:
    """Remove image names (or every name of a digest) from the store; blobs go with `taxiway image prune`."""
    from taxiway.errors import NotFound
    from taxiway.oci.store import Store

    store = Store()
    for ref in references:
        try:
            desc = store.untag(ref)
            click.echo(f"untagged {ref} ({desc.digest})")
        except NotFound:
            target = store.resolve(ref)  # a digest or a unique prefix of one; NotFound otherwise
            for name, d in store.images():
                if d.digest == target.digest:
                    store.untag(name)
                    click.echo(f"untagged {name} ({d.digest})")


@image.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fs_errors
def prune(as_json: bool) -> None:
    """Delete blobs that no image name reaches."""
    from taxiway.oci.store import Store

    store = Store()
    before = store.disk_usage()
    removed = store.prune()
    freed = before - store.disk_usage()
    if as_json:
        emit_json({"removed": removed, "freed_bytes": freed})
        return
    click.echo(f"removed {len(removed)} blobs, freed {_human(freed)}")


@image.command()
@click.option("-i", "--input", "input_", required=True, type=click.Path(dir_okay=False, exists=True),
              help="A `docker save` tarball or an OCI archive (optionally gzip/zstd compressed).")
@click.option("--name", help="Name for images the archive leaves unnamed (or names with a bare tag).")
@_fs_errors
def load(input_: str, name: str | None) -> None:
    """Load images from a docker-save or OCI archive tarball into the store."""
    from pathlib import Path

    from taxiway.oci.archive import load as do_load
    from taxiway.oci.store import Store

    loaded = do_load(Path(input_), Store(), name=name)
    for n, desc in loaded:
        click.echo(f"loaded {n} ({desc.digest})")


@image.command()
@click.argument("references", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The tarball to write.")
@click.option("--format", "fmt", type=click.Choice(["docker", "oci"]), default="docker", show_default=True,
              help="docker: the `docker save` layout (manifest.json) that is also an OCI archive; oci: an OCI image layout tarball only.")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", help="Which image of a multi-platform index.")
@_fs_errors
def save(references: tuple[str, ...], output: str, fmt: str, platform_: str | None) -> None:
    """Write images from the store into a tarball."""
    from pathlib import Path

    from taxiway.oci.archive import save as do_save
    from taxiway.oci.store import Store

    do_save(Store(), list(references), Path(output), fmt=fmt, platform=_platform(platform_))
    click.echo(f"saved {', '.join(references)} to {output}")
