"""Buildpacks as the CNB buildpack spec defines them: a folder with buildpack.toml, bin/detect, bin/build.

Also the pure parsers of what buildpacks write: ``<layer>.toml`` (types and
metadata) and ``launch.toml`` (processes). Malformed files are user errors
that name the file and what is wrong.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput, NotFound

BUNDLED_PREFIX = "taxiway/"
_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/-]*$")
#: A version becomes a folder name (/cnb/buildpacks/<id>/<version>): one name, never a path.
_VERSION = re.compile(r"^(?!\.+$)[A-Za-z0-9._+-]{1,64}$")


def valid_id(bid: object) -> bool:
    """A buildpack id: letters, digits, ``. _ / -``; each ``/`` part a plain name (no ``..``, no empty part)."""
    if not isinstance(bid, str) or len(bid) > 128 or not _ID.fullmatch(bid) or bid in ("app", "config", "launcher", "sbom"):
        return False
    return all(part and part.strip(".") for part in bid.split("/"))


def valid_version(ver: object) -> bool:
    """A buildpack version: one semver-like name (``1.2.3``, ``0.1.0-rc.1+b2``), never ``/``, ``.`` or ``..``."""
    return isinstance(ver, str) and bool(_VERSION.fullmatch(ver))


def load_toml(path: Path, what: str, text: str | None = None) -> dict[str, Any]:
    """Parse a TOML file (or ``text`` read from it elsewhere); InvalidInput naming the file on a syntax error."""
    try:
        return tomllib.loads(path.read_text() if text is None else text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"malformed {what} {path}: {e}", "fix the TOML syntax") from e
    except UnicodeDecodeError as e:
        raise InvalidInput(f"malformed {what} {path}: not UTF-8 text", "fix the file") from e


@dataclass(frozen=True)
class Buildpack:
    """A component buildpack on disk."""

    id: str
    version: str
    api: str
    path: Path
    name: str = ""
    description: str = ""
    homepage: str = ""
    clear_env: bool = False

    @property
    def dirname(self) -> str:
        """Its folder name under /layers (``/`` escaped as the spec says)."""
        return self.id.replace("/", "_")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "version": self.version, "api": self.api}
        if self.homepage:
            d["homepage"] = self.homepage
        return d


def load_buildpack(path: Path) -> Buildpack:
    """Read and check a buildpack folder; errors say which file and which field."""
    path = Path(path)
    toml_path = path / "buildpack.toml"
    if not toml_path.is_file():
        raise NotFound(f"{path} has no buildpack.toml", "a buildpack is a folder with buildpack.toml, bin/detect and bin/build")
    doc = load_toml(toml_path, "buildpack.toml")
    api = doc.get("api")
    bp = doc.get("buildpack")
    if not isinstance(api, str) or not re.fullmatch(r"\d+\.\d+", api):
        raise InvalidInput(f"malformed buildpack.toml {toml_path}: `api` must be a string like \"0.10\"", "set api = \"0.10\" at the top")
    if not isinstance(bp, dict):
        raise InvalidInput(f"malformed buildpack.toml {toml_path}: no [buildpack] table", "add [buildpack] with id and version")
    bid, ver = bp.get("id"), bp.get("version")
    if not valid_id(bid):
        raise InvalidInput(f"malformed buildpack.toml {toml_path}: [buildpack] id {bid!r} is missing or invalid",
                           "use an id like \"example/my-buildpack\" (letters, digits, . _ / -)")
    if not isinstance(ver, str) or not ver:
        raise InvalidInput(f"malformed buildpack.toml {toml_path}: [buildpack] version is missing", "add version = \"0.0.1\"")
    if not valid_version(ver):
        # It names a folder the host makes: "/tmp/x" or "../.." would put the buildpack anywhere.
        raise InvalidInput(f"malformed buildpack.toml {toml_path}: [buildpack] version {ver!r} is invalid",
                           "use a version like \"1.2.3\" (letters, digits, . _ + -; no '/', not . or ..)")
    if "order" in doc:
        raise InvalidInput(f"{toml_path} is a composite buildpack ([[order]])", "pass its component buildpacks with --buildpack, in order")
    for exe in ("detect", "build"):
        p = path / "bin" / exe
        if not p.is_file():
            raise InvalidInput(f"buildpack {bid} has no bin/{exe}", f"add an executable {path}/bin/{exe}")
        if not os.access(p, os.X_OK):
            raise InvalidInput(f"buildpack {bid}: bin/{exe} is not executable", f"chmod +x {p}")
    return Buildpack(id=bid, version=ver, api=api, path=path.resolve(), name=str(bp.get("name", "")),
                     description=str(bp.get("description", "")), homepage=str(bp.get("homepage", "")),
                     clear_env=bool(bp.get("clear-env", False)))


def bundled_root() -> Path:
    """Where the bundled buildpacks live (inside the package)."""
    return Path(__file__).resolve().parent / "buildpacks"


def bundled() -> dict[str, Buildpack]:
    """The bundled buildpacks by id."""
    out = {}
    for d in sorted(bundled_root().iterdir()):
        if (d / "buildpack.toml").is_file():
            bp = load_buildpack(d)
            out[bp.id] = bp
    return out


@dataclass(frozen=True)
class GroupEntry:
    buildpack: Buildpack
    optional: bool = False


#: The builder's order: the first group whose required buildpacks all pass detection wins.
DEFAULT_ORDER: list[list[tuple[str, bool]]] = [
    [("taxiway/python", False), ("taxiway/procfile", True)],
    [("taxiway/node", False), ("taxiway/procfile", True)],
    [("taxiway/deno", False)],
    [("taxiway/static", False)],
    [("taxiway/procfile", False)],
]


def default_order() -> list[list[GroupEntry]]:
    bps = bundled()
    return [[GroupEntry(bps[i], opt) for i, opt in group] for group in DEFAULT_ORDER]


def resolve(spec: str) -> Buildpack:
    """A ``--buildpack`` argument: a folder path, or the id of a bundled buildpack (``python`` or ``taxiway/python``)."""
    p = Path(spec)
    if p.is_dir():
        bp = load_buildpack(p)
        shipped = Path(__file__).resolve().parent.parent  # buildpacks inside taxiway itself (publish's datasette)
        if bp.id.startswith(BUNDLED_PREFIX) and not bp.path.resolve().is_relative_to(shipped):
            # The bundled ids are the builder's: a lookalike would share (and poison) their cache and name.
            raise InvalidInput(f"buildpack {spec} claims the id {bp.id!r}; ids starting with {BUNDLED_PREFIX!r} "
                               "are reserved for the bundled buildpacks", "give your buildpack an id of your own, like \"me/static\"")
        return bp
    bps = bundled()
    for cand in (spec, BUNDLED_PREFIX + spec):
        if cand in bps:
            return bps[cand]
    raise NotFound(f"no buildpack {spec!r}: not a folder and not a bundled buildpack",
                   f"pass a folder with buildpack.toml, or one of: {', '.join(sorted(bps))}")


# -- what buildpacks write --------------------------------------------------------------------


@dataclass
class LayerMeta:
    """A ``<layer>.toml``: its types and metadata."""

    launch: bool = False
    build: bool = False
    cache: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_layer_toml(path: Path, text: str | None = None) -> LayerMeta:
    """A ``<layer>.toml`` at ``path`` (or its ``text``, read safely by the caller)."""
    doc = load_toml(path, "layer metadata", text)
    types = doc.get("types", {})
    if not isinstance(types, dict):
        raise InvalidInput(f"malformed layer metadata {path}: [types] must be a table", "write [types] launch = true ...")
    for k in ("launch", "build", "cache"):
        if k in types and not isinstance(types[k], bool):
            raise InvalidInput(f"malformed layer metadata {path}: types.{k} must be true or false", "fix the buildpack")
    # Buildpack API < 0.6 put the flags at the top level.
    flags = {k: bool(types.get(k, doc.get(k, False))) for k in ("launch", "build", "cache")}
    meta = doc.get("metadata", {})
    if not isinstance(meta, dict):
        raise InvalidInput(f"malformed layer metadata {path}: [metadata] must be a table", "fix the buildpack")
    return LayerMeta(metadata=meta, **flags)


@dataclass(frozen=True)
class Process:
    """A process from launch.toml."""

    type: str
    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    default: bool = False
    working_dir: str = ""
    direct: bool = True
    buildpack_id: str = ""

    def argv(self) -> list[str]:
        """The argv the image runs: direct exec, or through a shell for the old string form."""
        if self.direct:
            return [*self.command, *self.args]
        return ["/bin/sh", "-c", " ".join([*self.command, *self.args])]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "command": list(self.command), "args": list(self.args), "direct": self.direct,
                "default": self.default, "buildpackID": self.buildpack_id,
                **({"working-dir": self.working_dir} if self.working_dir else {})}


#: A process type is a file name under /cnb/process: ASCII, and never ``.`` or ``..``.
_PTYPE = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]+$")


def valid_process_type(name: str) -> bool:
    return bool(_PTYPE.fullmatch(name))


def parse_launch_toml(path: Path, buildpack_id: str, text: str | None = None) -> tuple[list[Process], list[dict[str, Any]]]:
    """Processes and labels from a buildpack's launch.toml (or its ``text``)."""
    doc = load_toml(path, "launch.toml", text)
    procs = []
    raw = doc.get("processes", [])
    if not isinstance(raw, list):
        raise InvalidInput(f"malformed launch.toml {path}: processes must be an array of tables ([[processes]])", "fix the buildpack")
    for i, p in enumerate(raw):
        where = f"malformed launch.toml {path}: processes[{i}]"
        if not isinstance(p, dict):
            raise InvalidInput(f"{where} is not a table", "use [[processes]] tables")
        ptype = p.get("type")
        if not isinstance(ptype, str) or not valid_process_type(ptype):
            raise InvalidInput(f"{where}: type {ptype!r} is missing or invalid", "use a name like \"web\" (ASCII letters, digits, . _ -; not . or ..)")
        cmd = p.get("command")
        direct = p.get("direct", isinstance(cmd, list))
        if isinstance(cmd, str) and cmd:
            command: tuple[str, ...] = (cmd,)
        elif isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd):
            command = tuple(cmd)
        else:
            raise InvalidInput(f"{where} ({ptype}): command must be a non-empty string or array of strings", "fix the buildpack")
        args = p.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidInput(f"{where} ({ptype}): args must be an array of strings", "fix the buildpack")
        wd = p.get("working-dir", "")
        if not isinstance(wd, str):
            raise InvalidInput(f"{where} ({ptype}): working-dir must be a string", "fix the buildpack")
        procs.append(Process(ptype, command, tuple(args), bool(p.get("default", False)), wd, bool(direct), buildpack_id))
    labels = doc.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, dict) and isinstance(x.get("key"), str) for x in labels):
        raise InvalidInput(f"malformed launch.toml {path}: labels must be [[labels]] with key and value", "fix the buildpack")
    return procs, labels


def toml_dumps(doc: dict[str, Any]) -> str:
    """TOML text for the lifecycle's own files (plan, metadata)."""
    import tomli_w

    return tomli_w.dumps(doc)
