"""Lay out a Datasette app directory from the user's files and options.

The directory is what the builder's Datasette buildpack builds: the databases
under ``data/``, ``metadata.json``, ``requirements.txt`` (Datasette and the
``--install``ed plugins) and ``datasette.toml`` saying how to serve them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput
from taxiway.publish import convert

_APP_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_PLUGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?((==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!-]+)?$")

DEFAULT_MEMORY = 1 << 30
DEFAULT_CPUS = 1.0
DEFAULT_PIDS = 512

#: The app machine's limit options, as both ``taxiway publish`` and ``datasette publish taxiway``
#: offer them: (flag, default, help). The commands build their options from this; :func:`parse_limits` checks them.
LIMIT_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--memory", f"{DEFAULT_MEMORY >> 20}m", "Memory the app may use (e.g. 512m, 2g)."),
    ("--cpus", DEFAULT_CPUS, "CPUs the app may use."),
    ("--pids", DEFAULT_PIDS, "Most processes and threads the app may run."),
)


def parse_limits(memory: str, cpus: float, pids: int) -> dict[str, Any]:
    """PublishSpec's ``memory``, ``cpus`` and ``pids`` from the limit options; InvalidInput on a bad one."""
    from taxiway.machines.config import parse_memory

    if not 0.01 <= cpus <= (os.cpu_count() or 1):
        raise InvalidInput(f"--cpus {cpus:g} is not between 0.01 and this host's {os.cpu_count()} CPUs",
                           "pass --cpus 1 (or 0.5, 2...)")
    if pids < 16:
        raise InvalidInput(f"--pids {pids} is too few for Datasette to start", "pass --pids 64 or more")
    return {"memory": parse_memory(memory), "cpus": cpus, "pids": pids}


def load_metadata(text: str, source: str) -> dict[str, Any]:
    """A Datasette metadata file (JSON or YAML) as a dict; InvalidInput naming ``source`` when it is neither or not an object."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            meta = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise InvalidInput(f"{source}: neither JSON nor YAML ({e})", "fix the metadata file") from None
    if not isinstance(meta, dict):
        raise InvalidInput(f"{source}: metadata must be an object", "see Datasette's metadata documentation")
    return meta


@dataclass
class PublishSpec:
    """Everything ``taxiway publish`` and ``datasette publish taxiway`` accept."""

    files: list[Path]
    name: str | None = None
    table: str | None = None
    install: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    source: str | None = None
    source_url: str | None = None
    license: str | None = None
    license_url: str | None = None
    about: str | None = None
    about_url: str | None = None
    fts: list[str] = field(default_factory=list)
    encoding: str = "utf-8"
    delimiter: str | None = None
    plugin_secrets: list[tuple[str, str, str]] = field(default_factory=list)
    static: list[tuple[str, str]] = field(default_factory=list)
    version_note: str | None = None
    extra_options: str | None = None
    template_dir: Path | None = None
    plugins_dir: Path | None = None
    port: int | None = None
    #: The app machine's limits (bytes, CPUs, tasks): one app can't take the host's memory.
    memory: int = DEFAULT_MEMORY
    cpus: float = DEFAULT_CPUS
    pids: int = DEFAULT_PIDS
    #: The largest CSV field accepted, in characters.
    max_field: int = convert.MAX_FIELD
    #: DATASETTE_SECRET, which signs cookies (None: the app's own, kept across releases).
    secret: str | None = None

    def app_name(self) -> str:
        """The app's name: ``--name``, else the first file's stem, made DNS-safe."""
        raw = self.name if self.name is not None else convert.table_name_for(self.files[0]).split(".")[0]
        if self.name is None:
            raw = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:40] or "data"
        if not _APP_NAME.match(raw):
            raise InvalidInput(f"invalid app name {raw!r}", "use 1-40 lowercase letters, digits and dashes, e.g. --name my-data")
        return raw


def validate(spec: PublishSpec) -> None:
    """Check files and options before any work starts."""
    if not spec.files:
        raise InvalidInput("no files to publish", "give one or more .csv, .tsv, .json, .db files")
    for f in spec.files:
        if not f.exists():
            raise InvalidInput(f"{f}: no such file", "check the path")
        if not f.is_file():
            raise InvalidInput(f"{f}: not a regular file", "give a file (not a folder, device or pipe), or a copy of it")
        convert.kind_of(f)
    if spec.port is not None and not 1 <= spec.port <= 65535:
        raise InvalidInput(f"--port {spec.port} is not a TCP port", "pass a port from 1 to 65535, or leave --port out")
    if spec.table is not None:
        convert.check_table_name(spec.table, "--table")
    for p in spec.install:
        if not _PLUGIN.match(p):
            raise InvalidInput(f"--install {p!r} is not a package name", "give a PyPI name such as datasette-cluster-map")
    spec.app_name()


def merged_metadata(spec: PublishSpec, generated: dict) -> dict:
    """User metadata + the title/license/source/about options + generated plugin config."""
    meta: dict[str, Any] = json.loads(json.dumps(spec.metadata or {}))
    for key in ("title", "license", "license_url", "source", "source_url", "about", "about_url"):
        value = getattr(spec, key)
        if value:
            meta[key] = value
    for db, dbmeta in generated.get("databases", {}).items():
        target = meta.setdefault("databases", {}).setdefault(db, {}).setdefault("tables", {})
        for table, tmeta in dbmeta.get("tables", {}).items():
            t = target.setdefault(table, {})
            plugins = t.setdefault("plugins", {})
            for plugin, conf in tmeta.get("plugins", {}).items():
                plugins.setdefault(plugin, {})
                for k, v in conf.items():
                    plugins[plugin].setdefault(k, v)  # the user's own settings win
    env: dict[str, str] = {}
    for plugin, setting, value in spec.plugin_secrets:
        var = f"{plugin}_{setting}".upper().replace("-", "_")
        env[var] = value
        meta.setdefault("plugins", {}).setdefault(plugin, {})[setting] = {"$env": var}
    return meta


def prepare(spec: PublishSpec, workdir: Path) -> tuple[Path, list[convert.TableInfo], dict[str, str]]:
    """Write the app directory; returns (dir, tables, secret env vars)."""
    validate(spec)
    app = workdir / "app"
    if app.exists():
        shutil.rmtree(app)
    (app / "data").mkdir(parents=True)
    infos: list[convert.TableInfo] = []
    generated: dict = {}
    to_convert = [f for f in spec.files if convert.kind_of(f) != "sqlite"]
    dbs = [f for f in spec.files if convert.kind_of(f) == "sqlite"]
    if spec.fts and dbs and not to_convert:
        raise InvalidInput("--fts applies to converted CSV/JSON files", "enable FTS in your .db with sqlite-utils enable-fts")
    names: set[str] = set()
    if to_convert:
        dbname = spec.app_name().replace("-", "_")
        t = convert.build_database(to_convert, app / "data" / f"{dbname}.db", table=spec.table, fts=spec.fts,
                                   encoding=spec.encoding, delimiter=spec.delimiter, max_field=spec.max_field)
        for info in t:
            info.database = dbname
        infos += t
        generated = _merge(generated, convert.cluster_map_metadata(dbname, t))
        names.add(dbname)
    for db in dbs:
        stem = db.name.rsplit(".", 1)[0]
        if stem in names:
            raise InvalidInput(f"{db}: a second database named {stem!r}", "rename one of the files")
        names.add(stem)
        # A backup-API copy, not the file: a linked or copied .db would lose what is still in its -wal.
        convert.copy_sqlite(db, app / "data" / db.name)
        t = convert.describe_sqlite(app / "data" / db.name, source=db)
        for info in t:
            info.database = stem
        infos += t
        generated = _merge(generated, convert.cluster_map_metadata(stem, t))
    meta = merged_metadata(spec, generated)
    (app / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    import datasette

    reqs = [f"datasette=={datasette.__version__}", *spec.install]
    (app / "requirements.txt").write_text("\n".join(reqs) + "\n")
    options: list[str] = []
    for mount, path in spec.static:
        dest = app / "static" / mount
        copy_folder(Path(path), dest, f"--static {mount}:{path}")
        options += ["--static", f"{mount}:static/{mount}"]
    if spec.template_dir:
        copy_folder(spec.template_dir, app / "templates", f"--template-dir {spec.template_dir}")
        options += ["--template-dir", "templates"]
    if spec.plugins_dir:
        copy_folder(spec.plugins_dir, app / "plugins", f"--plugins-dir {spec.plugins_dir}")
    else:
        (app / "plugins").mkdir()
    # Datasette takes one --plugins-dir: taxiway's own limits plugin goes beside the user's plugins.
    shutil.copy(Path(__file__).with_name("sqlite_limits.py"), app / "plugins" / "taxiway_sqlite_limits.py")
    options += ["--plugins-dir", "plugins"]
    if spec.version_note:
        options += ["--version-note", spec.version_note]
    if spec.extra_options:
        import shlex

        options += shlex.split(spec.extra_options)
    (app / "datasette.json").write_text(json.dumps({
        "databases": sorted(p.name for p in (app / "data").iterdir()),
        "metadata": "metadata.json",
        "options": options,
    }, indent=2, sort_keys=True))
    env = {f"{p}_{s}".upper().replace("-", "_"): v for p, s, v in spec.plugin_secrets}
    return app, infos, env


def copy_folder(src: Path, dest: Path, option: str) -> None:
    """Copy a folder the user named into the app without following a symbolic link out of it.

    Files are copied; a link whose target is inside ``src`` stays a (relative) link; a link leading
    outside, a dangling one, or anything that is not a file, folder or link is refused, as
    ``datasette serve --static`` refuses to serve files outside its folder.
    """
    if not src.is_dir():
        raise InvalidInput(f"{option}: {src} is not a folder", "give a folder")
    root = os.path.realpath(src)
    dest.mkdir(parents=True)
    for here, dirs, files in os.walk(root):
        rel = os.path.relpath(here, root)
        out = dest / rel
        for name in [*dirs, *files]:
            p = os.path.join(here, name)
            shown = os.path.normpath(os.path.join(src, rel, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(p)
                if not os.path.exists(target) or os.path.commonpath([root, target]) != root or target == root:
                    raise InvalidInput(f"{option}: {shown} is a symbolic link to {os.readlink(p)}, outside the folder",
                                       "copy the file into the folder instead of linking to it")
                os.symlink(os.path.relpath(target, here), out / name)
            elif stat.S_ISDIR(st.st_mode):
                (out / name).mkdir()
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(p, out / name, follow_symlinks=False)
            else:
                raise InvalidInput(f"{option}: {shown} is not a regular file, folder or link",
                                   "remove it from the folder")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(here, d))]


def _merge(a: dict, b: dict) -> dict:
    for db, v in b.get("databases", {}).items():
        a.setdefault("databases", {}).setdefault(db, {}).setdefault("tables", {}).update(v.get("tables", {}))
    return a


def content_hash(app: Path) -> str:
    """A digest of the app directory's content (names, modes, bytes)."""
    h = hashlib.sha256()
    for p in sorted(app.rglob("*")):
        rel = p.relative_to(app).as_posix()
        h.update(rel.encode() + b"\0")
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()
