"""The CNB lifecycle, in-process: restore, detect, build, export (and rebase).

Phases follow the CNB platform and buildpack specs:

- restore: the per-image cache keeps ``/layers`` between builds; layers typed
  ``cache`` come back whole, ``launch``-only layers come back as their
  ``<layer>.toml`` only (so a buildpack whose metadata still matches leaves the
  layer alone and the exporter reuses the previous blob), the rest go.
- detect: groups in order; the first group whose required buildpacks all exit
  0 wins (100 is "not me", anything else an error).
- build: each buildpack of the group, in the build image, with the CNB_*
  variables and the positional arguments of older buildpack APIs.
- export: the run image's layers, then each launch layer (least changing
  first, in group order), then the app at ``/workspace``. Unchanged layers are
  not even re-tarred: a layer whose content fingerprint (``layer.fingerprint``:
  every file's bytes, reread only when its stat key changed) matches the
  previous export reuses its blob. The image is tagged only once every blob is
  stored, so a failed build exports nothing; ``--timeout`` holds up to the tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.builder import assemble, egress, fdcopy, reaper, safefs, stack
from taxiway.builder import buildpack as bpmod
from taxiway.builder import env as envmod
from taxiway.builder import layer as lyr
from taxiway.builder.buildpack import Buildpack, GroupEntry, LayerMeta, Process
from taxiway.builder.machine import BUILD_GID, BUILD_UID, TRUST_ENV, BuildMachine, check_root
from taxiway.builder.project import copy_source, load_project
from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Descriptor, append_layers, set_config, write_image
from taxiway.oci.image import rebase as image_rebase

BASE_PATH = stack.PATH
SPECIAL_TOMLS = {"launch.toml", "build.toml", "store.toml"}
LOG_TAIL = 20
#: Which run image a group gets, by the first buildpack that names one.
RUN_IMAGE_FOR = {"taxiway/python": "run-python", "taxiway/node": "run-node"}


class BuildFailed(TaxiwayError):
    """A buildpack failed; ``log_tail`` holds the end of its output."""

    def __init__(self, message: str, hint: str, log_tail: list[str]):
        super().__init__(message, hint)
        self.log_tail = log_tail


@dataclass
class BuildOptions:
    source: Path
    tag: str
    buildpacks: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    run_image: str | None = None
    platform: str = "linux/amd64"
    timeout: float = 1800.0  # the whole build (detect and build); detect steps have 120 s each at most


DETECT_TIMEOUT = 120.0


@dataclass
class BuildResult:
    tag: str
    descriptor: Descriptor
    group: list[Buildpack]
    processes: list[Process]
    written: list[str]  # layer names whose blobs were (re)written this build
    reused: list[str]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _chown_tree(root: Path) -> None:
    """Hand a tree to the build user (never following a link; the tree may be a previous build's).

    What the build user owns already is left alone: a chown sets the ctime even when
    nothing changes, and an unchanged ctime is how export knows a kept file needs no rehash.
    """
    def own(path: str) -> None:
        st = os.lstat(path)
        if st.st_uid != BUILD_UID or st.st_gid != BUILD_GID:
            os.lchown(path, BUILD_UID, BUILD_GID)

    own(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            own(os.path.join(dirpath, n))


#: Terminal escape sequences (CSI, OSC, other ESC forms), then any control character left but tab.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: A line of build output shown on the terminal keeps at most its last this many characters.
LINE_MAX = 2048


def terminal_safe(line: str, limit: int = LINE_MAX) -> str:
    """One line of build output as the operator's terminal may show it: no escape or control characters
    (a build must not retitle, clear or rewrite the operator's screen), at most its last ``limit`` characters."""
    line = _CONTROLS.sub("", _ESCAPES.sub("", line))
    return line if len(line) <= limit else "..." + line[-limit:]


def _tail(text: str, n: int = LOG_TAIL) -> list[str]:
    """The last ``n`` non-blank lines of build output, made safe to print (see terminal_safe)."""
    lines = [terminal_safe(line) for line in re.split(r"\r\n|\n|\r", text)]
    return [line for line in lines if line.strip()][-n:]


# -- the cache --------------------------------------------------------------------------------


def cache_dir(tag: str) -> Path:
    """The build cache of one image name: the kept /layers and what the last export wrote."""
    from taxiway.oci.store import normalize_name

    key = hashlib.sha256(normalize_name(tag).encode()).hexdigest()[:20]
    return build_home() / "cache" / key


def discard(d: Path) -> None:
    """Remove a folder off the critical path: rename it aside now, delete it in a detached ``rm``.

    A dependency layer holds thousands of files; deleting them inline would cost
    a rebuild more than everything else it does.
    """
    trash = d.parent.parent.parent / "trash"
    trash.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=trash))
    os.rename(d, aside / "x")
    subprocess.Popen(["rm", "-rf", "--one-file-system", str(aside)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def restore_layers(layers: Path, exported: dict[str, str]) -> None:
    """Prune the kept /layers as the spec's restorer would leave it.

    ``exported`` maps the launch layers (``<bp dir>/<layer>``) of the previous
    image to the hash of the ``<layer>.toml`` they were exported with: only
    those keep their metadata without their content. (A build that failed after
    a buildpack rewrote a toml must not pass the old layer off as the new one.)
    A previous build wrote this tree: links and odd files are removed as
    entries, never followed.
    """
    if not layers.is_dir():
        return
    for bpname, k in safefs.entries(layers):
        bpdir = layers / bpname
        if k != "dir":
            os.unlink(bpdir)
            continue
        names = dict(safefs.entries(layers, bpname))
        tomls = {n[:-5] for n, kk in names.items() if n.endswith(".toml") and n not in SPECIAL_TOMLS}
        for n, kk in names.items():
            if n in ("launch.toml", "build.toml") or (kk != "dir" and not n.endswith(".toml")):
                os.unlink(bpdir / n)
            elif kk == "dir" and n not in tomls:
                discard(bpdir / n)
        for name in tomls:
            rel = f"{bpname}/{name}.toml"
            try:
                text = safefs.read_text(layers, rel, "layer metadata")
                meta = bpmod.parse_layer_toml(bpdir / f"{name}.toml", text or "")
            except InvalidInput:
                text, meta = None, LayerMeta()
            kind = names.get(name)
            if meta.cache and kind in (None, "dir"):
                continue
            if kind == "dir":
                discard(bpdir / name)
            elif kind is not None:
                os.unlink(bpdir / name)
            if text is None or not meta.launch or exported.get(f"{bpname}/{name}") != _text_hash(text):
                os.unlink(bpdir / f"{name}.toml")


def build_home() -> Path:
    """$TAXIWAY_HOME/build (cache, tmp, buildpacks), made 0700: builds of other users' apps live there."""
    from taxiway.paths import home

    d = home() / "build"
    d.mkdir(parents=True, exist_ok=True)
    if os.stat(d).st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def staging_path(root: Path, bp: Buildpack) -> Path:
    """``root/<id dir>/<version>``, refused unless it is exactly two plain names below ``root``.

    The id and version come from a user's buildpack.toml: checked when loaded, and here again,
    because this path is where root copies the buildpack to.
    """
    parts = (bp.dirname, bp.version)
    if not bpmod.valid_id(bp.id) or not bpmod.valid_version(bp.version) or any(
            not p or p in (".", "..") or "/" in p or "\0" in p for p in parts):
        raise InvalidInput(f"buildpack {bp.id!r} version {bp.version!r} does not name a folder",
                           "use an id like \"me/bp\" and a version like \"1.2.3\"")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()) or target.resolve().parent.parent != root.resolve():
        raise InvalidInput(f"buildpack {bp.id!r} version {bp.version!r} leads outside the buildpacks folder",
                           "use an id like \"me/bp\" and a version like \"1.2.3\"")
    return target


def bp_digest(bp: Buildpack) -> str:
    """A buildpack's identity for its cache: id, version and every byte of its folder."""
    fp = lyr.fingerprint(bp.path).hexdigest()
    return hashlib.sha256(f"{bp.id}\0{bp.version}\0{fp}".encode()).hexdigest()[:20]


#: A staged buildpacks folder no build used for this long (and none uses now) is removed.
BUILDPACKS_KEEP = 86400.0


def _lock_use(root: Path, name: str, exclusive: bool) -> int | None:
    """A flock on ``root/.locks/name``: shared while a build uses that folder, exclusive to remove it.

    None when ``exclusive`` and a build holds it. The lock file is checked to still be the one at
    its path once locked (a pruner may have removed it meanwhile).
    """
    import fcntl

    locks = root / ".locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    while True:
        fd = os.open(locks / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(locks / name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def prune_buildpacks(root: Path, keep: float = BUILDPACKS_KEEP, now: float | None = None) -> list[str]:
    """Remove staged buildpack folders (and leftover temps) unused for ``keep`` seconds and not in use now."""
    import time

    now = time.time() if now is None else now
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for e in list(os.scandir(root)):
        if e.name == ".locks" or not e.is_dir(follow_symlinks=False):
            continue
        if e.stat(follow_symlinks=False).st_mtime > now - keep:
            continue
        if e.name.startswith("."):  # a temp a killed build left
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.name)
            continue
        fd = _lock_use(root, e.name, exclusive=True)
        if fd is None:  # a build uses it
            continue
        try:
            if os.stat(e.path, follow_symlinks=False).st_mtime > now - keep:
                continue  # used again since the listing
            aside = root / f".old-{e.name}"
            os.rename(e.path, aside)
            shutil.rmtree(aside, ignore_errors=True)
            os.unlink(root / ".locks" / e.name)
            removed.append(e.name)
        finally:
            os.close(fd)
    return removed


def buildpacks_dir(bps: list[Buildpack], warn: Callable[[str], None] | None = None,
                   locks: list[int] | None = None) -> Path:
    """/cnb/buildpacks/<id>/<version> for these buildpacks, made once per content and shared by builds.

    With ``locks``, a shared lock on the folder is added to it (closing it ends the use): while held,
    ``prune_buildpacks`` leaves the folder alone. Each use marks the folder's mtime.
    """

    unique = list({bp.id: bp for bp in bps}.values())
    lib = bpmod.bundled_root() / "_lib"
    h = hashlib.sha256()
    for bp in unique:
        h.update(f"{bp.id}\0{bp.version}\0{bp.path}\0{lyr.fingerprint(bp.path).hexdigest()}\n".encode())
    h.update(lyr.fingerprint(lib).hexdigest().encode())
    root = build_home() / "buildpacks"
    dest = root / h.hexdigest()[:20]
    root.mkdir(parents=True, exist_ok=True)
    if locks is not None:
        fd = _lock_use(root, dest.name, exclusive=False)
        assert fd is not None  # a shared lock waits, never fails
        locks.append(fd)
    if dest.is_dir():
        os.utime(dest)  # in use: not pruned for another BUILDPACKS_KEEP
        return dest
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".new-"))
    try:
        for bp in unique:
            target = staging_path(tmp, bp)
            if target.exists():  # two ids with one folder name ("a/b" and "a_b")
                raise InvalidInput(f"buildpacks {bp.id} and another one in this build share the folder {bp.dirname}/{bp.version}",
                                   "give each buildpack its own id")
            target.parent.mkdir(parents=True, exist_ok=True)
            skipped = fdcopy.copy_tree(bp.path, target, what=f"buildpack {bp.id} ({bp.path})")
            if skipped and warn is not None:
                warn(f"warning: skipped {len(skipped)} special file(s) in buildpack {bp.id} (device, fifo or socket): "
                     + ", ".join(skipped[:10]))
        fdcopy.copy_tree(lib, tmp / "_lib", what="the bundled buildpack library")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, dest)
        except OSError:  # another build made it first
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# -- detect -----------------------------------------------------------------------------------


@dataclass
class Detected:
    entry: GroupEntry
    code: int
    output: str
    plan: dict[str, Any]


def _plan_sections(plan: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """provides/requires of a detect plan (the first alternative when [[or]] is used)."""
    provides = list(plan.get("provides", []) or [])
    requires = list(plan.get("requires", []) or [])
    if not provides and not requires and plan.get("or"):
        alt = plan["or"][0]
        provides, requires = list(alt.get("provides", []) or []), list(alt.get("requires", []) or [])
    return provides, requires


class Lifecycle:
    """One build: its folders, sandbox and phases."""

    def __init__(self, opts: BuildOptions, store, say: Callable[[str], None] = _say):
        self.opts = opts
        self.store = store
        self.say = say
        self.source = Path(opts.source).resolve()
        if not self.source.is_dir():
            raise NotFound(f"source folder {opts.source} does not exist", "pass the folder of your app")
        self.project = load_project(self.source)
        # project.toml's build env, overridden by --env.
        opts.env = {**self.project.env, **opts.env}
        self.cache = cache_dir(opts.tag)
        self.layers = self.cache / "layers"

    # -- setup ----------------------------------------------------------------------------

    def _prepare(self, work: Path, bps: list[Buildpack]) -> None:
        self.work = work
        self.workspace = work / "workspace"
        hashes: dict[str, str] = {}
        copy_source(self.source, self.workspace, self.project, warn=lambda m: self.say(f"[prepare] {m}"),
                    hashes=hashes, check=self._left)
        _chown_tree(self.workspace)
        # What the copy hashed, keyed by each file's stat after the chown: export rehashes only what the build changed.
        self.workspace_known = {}
        for rel, sha in hashes.items():
            with contextlib.suppress(OSError):
                self.workspace_known[rel] = [*lyr.stat_key(os.lstat(self.workspace / rel)), sha]
        self.platform = work / "platform"
        (self.platform / "env").mkdir(parents=True)
        for k, v in self.opts.env.items():
            # Names were checked where they came from; checked again here, because this one becomes a path.
            envmod.check_name(k, "the build env")
            fd = os.open(self.platform / "env" / k, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(v)
        self.bpdir = buildpacks_dir(bps, warn=lambda m: self.say(f"[prepare] {m}"), locks=self.bp_locks)
        # What the host hands in is written before any build code runs, in folders the build cannot write.
        self.plans = work / "plans"
        self.plans.mkdir()
        self.out = work / "out"
        self.out.mkdir()
        self.parked = self.cache / "parked"
        if self.opts.no_cache:
            for d in (self.layers, self.parked):
                if d.exists():
                    shutil.rmtree(d)
        self.layers.mkdir(parents=True, exist_ok=True)
        self.parked.mkdir(exist_ok=True)
        self._prune_links()  # what a build killed before its own sweep left
        self._park_all()
        for bp in bps:
            (self.out / bp.dirname).mkdir(exist_ok=True)
        _chown_tree(self.out)
        _chown_tree(self.layers)
        self.log = work / "build.log"
        self.sandbox = BuildMachine(self.rootfs, work, binds={"/workspace": self.workspace, "/layers": self.layers,
                                                              "/cnb/work": self.out},
                                    ro_binds={"/platform": self.platform, "/cnb/buildpacks": self.bpdir, "/cnb/plans": self.plans},
                                    proxy=self.proxy)

    # -- the cache of each buildpack ------------------------------------------------------
    #
    # A buildpack's cache is its own: kept as parked/<id dir>@<content digest>, and only the folders of the
    # group that detected go into /layers (after detection, before the first build step). Another buildpack
    # with the same id but other content never sees (or writes) it, and no build sees another buildpack's.

    def _digest(self, bp: Buildpack) -> str:
        memo = self.__dict__.setdefault("_digests", {})
        if bp.path not in memo:
            memo[bp.path] = bp_digest(bp)
        return memo[bp.path]

    def _owners(self) -> dict[str, str]:
        """Which buildpack (by content digest) each folder now in /layers belongs to."""
        try:
            owners = json.loads((self.cache / "owners.json").read_text())
        except (OSError, ValueError):
            return {}
        return owners if isinstance(owners, dict) else {}

    def _park_all(self) -> None:
        """Move every buildpack folder out of /layers into parked/ (what is not known to be whose goes)."""
        owners = self._owners()
        for name, kind in safefs.entries(self.layers):
            src = self.layers / name
            digest = owners.get(name)
            if kind != "dir" or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{20}", digest):
                if kind == "dir":
                    discard(src)
                else:
                    os.unlink(src)
                continue
            dst = self.parked / f"{name}@{digest}"
            if os.path.lexists(dst):
                discard(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.unlink(dst)
            os.rename(src, dst)
        with contextlib.suppress(FileNotFoundError):
            (self.cache / "owners.json").unlink()

    def _unpark(self, group: list[Buildpack]) -> None:
        """Put the group's own cache folders into /layers, then prune them as the spec's restorer would."""
        from taxiway.fsutil import write_bytes_atomic

        owners = {bp.dirname: self._digest(bp) for bp in group}
        write_bytes_atomic(self.cache / "owners.json", json.dumps(owners, sort_keys=True).encode())
        for bp in group:
            src = self.parked / f"{bp.dirname}@{owners[bp.dirname]}"
            dst = self.layers / bp.dirname
            if os.path.isdir(src) and not os.path.islink(src):
                os.rename(src, dst)
            else:
                dst.mkdir()
        record = self.cache / "export.json"
        prev = json.loads(record.read_text()) if record.exists() else {}
        prev_owners = prev.get("owners") or {}
        # A kept launch layer's metadata counts only when this very buildpack exported it.
        exported = {k: v.get("toml", "") for k, v in (prev.get("layers") or {}).items()
                    if prev_owners.get(k.split("/", 1)[0]) == owners.get(k.split("/", 1)[0])}
        restore_layers(self.layers, exported)
        _chown_tree(self.layers)

    def _left(self, cap: float | None = None) -> float:
        """Seconds this step may run: what is left of --timeout (at most ``cap``)."""
        import time

        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TaxiwayError(f"the build ran longer than {self.opts.timeout:.0f}s and was stopped "
                               f"(while {self.phase}); nothing was tagged",
                               "raise the limit with --timeout, or make the build faster")
        return min(left, cap) if cap else left

    def _prune_links(self) -> None:
        """Take out of the cache every link that leads outside it, and every odd file (see ``prune_cache_links``)."""
        removed = prune_cache_links(self.layers)
        if removed:
            shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
            self.say(f"[cache] warning: removed {len(removed)} symlink(s) leading outside /layers or special file(s) "
                     f"from the build cache: {shown}")

    def _base_env(self, bp: Buildpack) -> dict[str, str]:
        env = {"PATH": BASE_PATH, "HOME": "/home/cnb", "LANG": "C.UTF-8",
               "SOURCE_DATE_EPOCH": str(lyr.source_date_epoch()),
               "CNB_PLATFORM_DIR": "/platform", "CNB_BUILDPACK_DIR": f"/cnb/buildpacks/{bp.dirname}/{bp.version}",
               "CNB_TARGET_OS": "linux", "CNB_TARGET_ARCH": self.opts.platform.split("/")[1],
               "CNB_TARGET_DISTRO_NAME": "debian", "CNB_TARGET_DISTRO_VERSION": "12",
               "CNB_STACK_ID": f"io.taxiway.stacks.{stack.SUITE}", **TRUST_ENV}
        if not bp.clear_env:
            env.update(self.opts.env)
        return env

    # -- detect ---------------------------------------------------------------------------

    def detect(self, order: list[list[GroupEntry]]) -> list[tuple[Buildpack, dict[str, Any]]]:
        """The first group that passes, with each buildpack's plan; errors list what each one looked for."""
        results: dict[str, Detected] = {}
        for group in order:
            passed: list[Detected] = []
            ok = True
            for entry in group:
                bp = entry.buildpack
                det = results.get(bp.id) or self._detect_one(entry)
                results[bp.id] = det
                if det.code == 0:
                    passed.append(Detected(entry, 0, det.output, det.plan))
                elif not entry.optional:
                    ok = False
                    break
            if ok and passed:
                chosen = self._resolve_plan(passed)
                if chosen is not None:
                    for d in passed:
                        self.say(f"[detect] {d.entry.buildpack.id}@{d.entry.buildpack.version}")
                    return chosen
        looked = []
        for bid, det in results.items():
            why = terminal_safe(" ".join(_tail(det.output, 3)), 512) or "did not apply"
            looked.append(f"{bid}: {why}")
        raise TaxiwayError(f"no buildpack detected an app in {self.source}: " + "; ".join(looked),
                           "add the file a buildpack looks for, or pass --buildpack")

    def _detect_one(self, entry: GroupEntry) -> Detected:
        bp = entry.buildpack
        plan_path = f"/cnb/work/{bp.dirname}/plan.toml"
        env = self._base_env(bp) | {"CNB_BUILD_PLAN_PATH": plan_path}
        p = self.sandbox.run([f"{env['CNB_BUILDPACK_DIR']}/bin/detect", "/platform", plan_path], env, timeout=self._left(DETECT_TIMEOUT))
        out = (p.stdout or b"").decode(errors="replace") + (p.stderr or b"").decode(errors="replace")
        if p.returncode not in (0, 100):
            raise BuildFailed(f"buildpack {bp.id} failed to detect (exit {p.returncode})",
                              "fix the buildpack's bin/detect; its output is above", _tail(out))
        plan: dict[str, Any] = {}
        if p.returncode == 0:
            text = safefs.read_text(self.out, f"{bp.dirname}/plan.toml", f"the build plan of {bp.id}") or ""
            if text.strip():
                plan = bpmod.load_toml(Path(f"({bp.id}'s build plan)"), "build plan", text)
        return Detected(entry, p.returncode, out, plan)

    def _resolve_plan(self, passed: list[Detected]) -> list[tuple[Buildpack, dict[str, Any]]] | None:
        """Each buildpack's plan entries: the requirements (of any buildpack) it provides."""
        provided: set[str] = set()
        required: list[dict] = []
        for d in passed:
            prov, req = _plan_sections(d.plan)
            provided |= {p.get("name") for p in prov if isinstance(p, dict)}
            required += [r for r in req if isinstance(r, dict)]
        for r in required:
            if r.get("name") not in provided:
                return None  # a requirement nobody provides: the group fails
        out = []
        for d in passed:
            prov, _ = _plan_sections(d.plan)
            names = {p.get("name") for p in prov if isinstance(p, dict)}
            entries = [{"name": r["name"], "metadata": r.get("metadata", {})} for r in required if r.get("name") in names]
            out.append((d.entry.buildpack, {"entries": entries}))
        return out

    # -- build ----------------------------------------------------------------------------

    def build(self, group: list[tuple[Buildpack, dict[str, Any]]]) -> list[Process]:
        self.labels: dict[str, str] = {}  # from launch.toml [[labels]]
        build_env: dict[str, str] = {}
        processes: dict[str, Process] = {}
        for bp, plan in group:
            self.say(f"[build] {bp.id}@{bp.version}")
            if not safefs.is_dir(self.layers, bp.dirname):  # made in _prepare; an earlier buildpack removed it
                raise InvalidInput(f"/layers/{bp.dirname} was removed during the build",
                                   "a buildpack must write only its own layers folder")
            plan_host = self.plans / f"{bp.dirname}.toml"
            plan_host.write_text(bpmod.toml_dumps(plan))
            plan_path = f"/cnb/plans/{bp.dirname}.toml"
            env = self._base_env(bp)
            for k, v in build_env.items():
                env[k] = v
            env |= {"CNB_LAYERS_DIR": f"/layers/{bp.dirname}", "CNB_BP_PLAN_PATH": plan_path}
            start = self.log.stat().st_size if self.log.exists() else 0
            p = self.sandbox.run([f"{env['CNB_BUILDPACK_DIR']}/bin/build", f"/layers/{bp.dirname}", "/platform", plan_path],
                                 env, log=self.log, timeout=self._left())
            if p.returncode != 0:
                with open(self.log, "rb") as f:
                    f.seek(start)
                    out = f.read().decode(errors="replace")
                tail = _tail(out)
                if self.proxy is not None and self.proxy.error is not None:
                    tail.append(f"error: the build's egress proxy could not start: {self.proxy.error}")
                last = terminal_safe(tail[-1].removeprefix("error: ")) if tail else "no output"
                raise BuildFailed(f"buildpack {bp.id} failed to build (exit {p.returncode}): {last}; nothing was exported",
                                  "fix the error (the end of the build log is above) and build again", tail)
            with open(self.log, "rb") as f:  # a buildpack's warnings reach the user even when it succeeds
                f.seek(start)
                for line in f.read().decode(errors="replace").splitlines():
                    if line.startswith("warning: "):
                        self.say(f"[build] {bp.id}: {terminal_safe(line)}")
            launch = safefs.read_text(self.layers, f"{bp.dirname}/launch.toml", f"{bp.id}'s launch.toml")
            if launch is not None:
                procs, labels = bpmod.parse_launch_toml(Path(f"(buildpack {bp.id})"), bp.id, launch)
                for proc in procs:
                    if proc.working_dir:
                        proc = dataclasses.replace(proc, working_dir=_working_dir(
                            proc.working_dir, f"{bp.id}'s launch.toml process {proc.type}"))
                    processes[proc.type] = proc
                for label in labels:
                    if label["key"].startswith("io.buildpacks."):
                        # The platform's own namespace: a buildpack must not rewrite the lifecycle's metadata.
                        self.say(f"[build] {bp.id}: warning: label {label['key']} is in the io.buildpacks. namespace "
                                 "reserved for the lifecycle; dropped")
                        continue
                    self.labels[label["key"]] = str(label.get("value", ""))
            # Later buildpacks see this one's build layers.
            for name, meta in self._layer_metas(bp):
                if meta.build and safefs.is_dir(self.layers, f"{bp.dirname}/{name}"):
                    merged = {"PATH": env.get("PATH", BASE_PATH), **build_env}
                    rec = _env_files(self.layers, f"{bp.dirname}/{name}", "build")
                    envmod.apply_recorded(merged, rec, f"/layers/{bp.dirname}/{name}", "build")
                    build_env = merged
        return list(processes.values())

    def _layer_metas(self, bp: Buildpack) -> list[tuple[str, LayerMeta]]:
        out = []
        for n, _kind in safefs.entries(self.layers, bp.dirname):
            if not n.endswith(".toml") or n in SPECIAL_TOMLS:
                continue
            text = safefs.read_text(self.layers, f"{bp.dirname}/{n}", f"{bp.id}'s layer metadata") or ""
            out.append((n[:-5], bpmod.parse_layer_toml(Path(f"{bp.id}'s {n}"), text)))
        return out

    # -- export ---------------------------------------------------------------------------

    def export(self, group: list[Buildpack], processes: list[Process]) -> BuildResult:
        record_path = self.cache / "export.json"
        prev = json.loads(record_path.read_text()) if record_path.exists() and not self.opts.no_cache else {}
        # Only this very buildpack's previous layers can be reused: another one with the same id
        # (other content) writing a matching <layer>.toml must not get them.
        now = {bp.dirname: self._digest(bp) for bp in group}
        prev_owners = prev.get("owners") or {}
        prev_layers: dict[str, Any] = {k: v for k, v in prev.get("layers", {}).items()
                                       if prev_owners.get(k.split("/", 1)[0]) == now.get(k.split("/", 1)[0])}
        run_name = self.opts.run_image
        if run_name is None:
            run_key = next((RUN_IMAGE_FOR[bp.id] for bp in group if bp.id in RUN_IMAGE_FOR), "run-base")
            stack.import_stack(self.store, run_key)
            run_name = stack.RECIPES[run_key].ref
        run = self.store.image(run_name)
        run_cfg = run.config()
        env = envmod.parse_env_list((run_cfg.get("config") or {}).get("Env") or [f"PATH={BASE_PATH}"])

        new_layers: list[tuple[str, lyr.Layer]] = []
        record: dict[str, Any] = {}
        written, reused = [], []
        bp_meta = []
        for bp in group:
            layers_md: dict[str, Any] = {}
            for name, meta in self._layer_metas(bp):
                if not meta.launch:
                    continue
                key = f"{bp.dirname}/{name}"
                d = self.layers / bp.dirname / name
                inside = f"/layers/{bp.dirname}/{name}"
                has_content = safefs.is_dir(self.layers, key)  # the restorer removes launch-only folders; present means (re)written
                old = prev_layers.get(key)
                files: dict[str, list] = {}
                if has_content:
                    tree = None
                    if old and self.store.has_blob(old["digest"]):
                        # Bytes, not sizes and mtimes: an edit that keeps both must not ship the old layer.
                        tree = lyr.fingerprint(d, old.get("files"), self._left)
                    if tree is not None and old and old.get("fingerprint") == tree.hexdigest():
                        layer, envfiles = _layer_from(old), old["env"]
                        reused.append(key)
                    else:
                        fresh = lyr.TreeHash(inside.lstrip("/"))
                        layer = lyr.store_dir_layer(self.store, d, inside.lstrip("/"), stack.CNB_UID, stack.CNB_GID,
                                                    tree=fresh if tree is None else None, check=self._left)
                        tree = tree or fresh
                        envfiles = _env_files(self.layers, key, "launch")
                        written.append(key)
                    fp = tree.hexdigest()
                    if meta.cache:  # kept for the next build: its unchanged files need not be read again
                        files = tree.files
                elif old and self.store.has_blob(old["digest"]):
                    fp, layer, envfiles = old.get("fingerprint"), _layer_from(old), old["env"]
                    files = old.get("files") or {}
                    reused.append(key)
                else:
                    raise TaxiwayError(f"buildpack {bp.id} kept launch layer {name!r} but there is no previous image layer to reuse",
                                       "build again with --no-cache")
                envmod.apply_recorded(env, envfiles, inside)
                record[key] = {"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.descriptor.size,
                               "fingerprint": fp, "env": envfiles, "files": files,
                               "toml": _text_hash(safefs.read_text(self.layers, f"{key}.toml", "layer metadata") or "")}
                new_layers.append((f"buildpack {bp.id} layer {name}", layer))
                layers_md[name] = {"sha": layer.diff_id, "data": meta.metadata, "launch": True,
                                   "build": meta.build, "cache": meta.cache}
            bp_meta.append({"key": bp.id, "version": bp.version, "layers": layers_md})

        processes_record: dict[str, str] = {}
        if processes:
            # /cnb/process/<type>: run any declared process (`--entrypoint /cnb/process/worker`), as pack's launcher allows.
            entries = [*lyr.parents("cnb/process")]
            entries += [lyr.Entry(f"cnb/process/{p.type}", "file", 0o755, data=process_script(p).encode())
                        for p in sorted(processes, key=lambda p: p.type)]
            plyr = lyr.store_layer(self.store, entries, 0, 0, check=self._left)
            old_p = prev.get("processes", {}).get("digest")
            (reused if old_p == plyr.digest else written).append("processes")
            new_layers.append(("process types at /cnb/process", plyr))
            processes_record = {"digest": plyr.digest}

        # The copy hashed the source; only files the build changed since are read again.
        fp = lyr.fingerprint(self.workspace, self.workspace_known, self._left).hexdigest()
        old = prev.get("app")
        if old and old.get("fingerprint") == fp and self.store.has_blob(old["digest"]):
            app = _layer_from(old)
            reused.append("app")
        else:
            app = lyr.store_dir_layer(self.store, self.workspace, "workspace", stack.CNB_UID, stack.CNB_GID,
                                      check=self._left)
            written.append("app")
        new_layers.append(("application source at /workspace", app))
        app_record = {"digest": app.digest, "diff_id": app.diff_id, "size": app.descriptor.size, "fingerprint": fp}

        default = _default_process(processes)
        run_diffs = (run_cfg.get("rootfs") or {}).get("diff_ids") or []
        lifecycle_md = {
            "app": [{"sha": app.diff_id}],
            "buildpacks": bp_meta,
            "runImage": {"topLayer": run_diffs[-1] if run_diffs else "", "reference": run.digest(), "image": run_name},
            "stack": {"runImage": {"image": run_name}},
        }
        build_md = {
            "buildpacks": [bp.to_json() for bp in group],
            "processes": [p.to_json() for p in processes],
            "launcher": {"version": "none"},  # the default process is the image's own entrypoint
            "bom": [],
        }
        labels = dict((run_cfg.get("config") or {}).get("Labels") or {})
        labels.update({k: v for k, v in getattr(self, "labels", {}).items() if not k.startswith("io.buildpacks.")})
        labels.update(git_labels(self.source))
        # The lifecycle's own labels last: nothing a buildpack wrote replaces them.
        labels[assemble.LIFECYCLE_LABEL] = json.dumps(lifecycle_md, sort_keys=True, separators=(",", ":"))
        labels[assemble.BUILD_LABEL] = json.dumps(build_md, sort_keys=True, separators=(",", ":"))
        img = append_layers(run, *(layer.addendum(h) for h, layer in new_layers))
        cfg = img.config()
        cfg["created"] = assemble.CREATED
        c = cfg.setdefault("config", {})
        env.setdefault("PORT", "8080")
        c["Env"] = [f"{k}={v}" for k, v in env.items()]
        c["User"] = f"{stack.CNB_UID}:{stack.CNB_GID}"
        c["WorkingDir"] = (default.working_dir if default and default.working_dir else "/workspace")
        c["Labels"] = labels
        c["ExposedPorts"] = {"8080/tcp": {}}
        c.pop("Cmd", None)
        c.pop("Entrypoint", None)
        if default:
            c["Entrypoint"] = default.argv()
        else:
            self.say("[export] no default process: the image has no entrypoint (add a Procfile or launch.toml process)")
        desc = write_image(self.store, set_config(img, cfg))
        self._left()  # the last moment --timeout can stop the build: the tag is the one change users see
        assemble.tag_if_changed(self.store, self.opts.tag, desc)
        from taxiway.fsutil import write_bytes_atomic

        write_bytes_atomic(record_path, json.dumps({"layers": record, "app": app_record, "digest": desc.digest,
                                                    "processes": processes_record, "owners": now},
                                                   sort_keys=True, indent=1).encode())
        return BuildResult(self.opts.tag, desc, group, processes, written, reused)

    # -- all phases -----------------------------------------------------------------------

    def run(self) -> BuildResult:
        import time

        check_root()
        self.deadline = time.monotonic() + self.opts.timeout
        self.phase = "preparing"
        self.proxy: egress.Upstream | None = None
        stack.import_stack(self.store, stack.BUILD)
        self.rootfs = stack.rootfs_for(self.store, stack.RECIPES[stack.BUILD].ref)
        if self.opts.buildpacks:
            order = [[GroupEntry(bpmod.resolve(s)) for s in self.opts.buildpacks]]
        else:
            order = bpmod.default_order()
        all_bps = [e.buildpack for g in order for e in g]

        tmp_root = build_home() / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        reaper.sweep(tmp_root)  # what builds killed with -9 (and their watchers) left
        with contextlib.suppress(OSError):  # staged buildpacks nobody used for a day; never worth failing a build
            prune_buildpacks(build_home() / "buildpacks")
        self.bp_locks: list[int] = []
        self.phase = "waiting for another build of this image to finish"
        with stack.locked(self.cache / "lock", self._left):
            work = Path(tempfile.mkdtemp(dir=tmp_root, prefix="build-"))
            reaper.claim(work)
            with reaper.watched(work):  # if this process dies, the watcher stops the steps and removes work
                try:
                    with egress.proxy(work) as self.proxy:
                        self.phase = "preparing"
                        self._prepare(work, all_bps)
                        self.phase = "detecting"
                        group = self.detect(order)
                        self._unpark([bp for bp, _ in group])
                        self.phase = "building"
                        processes = self.build(group)
                    self.phase = "exporting the image"
                    result = self.export([bp for bp, _ in group], processes)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                    for fd in self.bp_locks:  # the build's steps are gone: the buildpacks folder is free to prune
                        os.close(fd)
                    self.bp_locks.clear()
                    # The steps are gone: nothing can plant another link. A failure here must not hide
                    # the build's own error; the next build's prepare sweeps again (and says why it cannot).
                    with contextlib.suppress(OSError, InvalidInput):
                        self._prune_links()
        return result


def prune_cache_links(layers: Path) -> list[str]:
    """Keep no link in the build cache that leads outside it, and nothing but files, folders and links.

    Run when a build ends (and before the next restores, for a build killed
    first). Layer folders that are not ``cache`` layers are discarded (the next
    restore would drop them anyway). In ``cache`` layers, a symlink is judged
    as the build machine sees it, where this folder is ``/layers``: targets that
    stay below it are kept (a layer may link inside itself), ``/etc/shadow`` or
    ``../../..`` are removed. A launch+cache layer that held such a link loses
    its folder but keeps its ``<layer>.toml``: the next build treats it as a
    launch-only layer (the previous image's blob is reused while the metadata
    matches), so no image ever ships a layer with a link cut out. The host never
    follows a link either way (it walks by file descriptors, no-follow); this
    keeps the cache from holding links at host paths between builds. Returns
    what was removed (paths relative to ``layers``) but for the silent discards.
    """
    import posixpath
    import stat as st_

    removed: list[str] = []

    def inside(rel_dir: str, target: str) -> bool:
        base = posixpath.join("/layers", rel_dir)
        norm = posixpath.normpath(target if target.startswith("/") else posixpath.join(base, target))
        return norm == "/layers" or norm.startswith("/layers/")

    def visit(fd: int, rel_dir: str) -> bool:
        """Prune the folder open as ``fd``; True when something in it was removed."""
        hit = False
        for name in sorted(os.listdir(fd)):
            rel = f"{rel_dir}/{name}"
            try:
                m = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if st_.S_ISDIR(m):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    hit = visit(sub, rel) or hit
                finally:
                    os.close(sub)
            elif (st_.S_ISLNK(m) and not inside(rel_dir, os.readlink(name, dir_fd=fd))) or not (
                    st_.S_ISLNK(m) or st_.S_ISREG(m)):
                os.unlink(name, dir_fd=fd)
                removed.append(rel)
                hit = True
        return hit

    # Outside layer folders (in /layers itself and in each buildpack's folder) only folders and files belong.
    for bpname, kind in safefs.entries(layers):
        if kind in ("link", "other"):
            os.unlink(layers / bpname)
            removed.append(bpname)
            continue
        if kind != "dir":
            continue
        names = dict(safefs.entries(layers, bpname))
        for name, k in names.items():
            if k in ("link", "other"):
                os.unlink(layers / bpname / name)
                removed.append(f"{bpname}/{name}")
        for name, k in names.items():
            if k != "dir":
                continue
            rel = f"{bpname}/{name}"
            try:
                text = safefs.read_text(layers, f"{rel}.toml", "layer metadata") if names.get(f"{name}.toml") == "file" else None
                meta = bpmod.parse_layer_toml(layers / f"{rel}.toml", text) if text is not None else LayerMeta()
            except InvalidInput:
                meta = LayerMeta()
            if not meta.cache:
                discard(layers / rel)
                continue
            fd = safefs.open_dir(layers, rel)
            if fd is None:
                continue
            try:
                hit = visit(fd, rel)
            finally:
                os.close(fd)
            if hit and meta.launch:
                discard(layers / rel)
                removed.append(f"{rel}/ (a launch layer: the next build reuses its image layer while its metadata matches)")
    return removed


def _layer_from(rec: dict[str, Any]) -> lyr.Layer:
    return lyr.Layer(Descriptor(mt.OCI_LAYER_GZIP, rec["digest"], rec["size"]), rec["diff_id"])


def _env_files(layers: Path, rel: str, phase: str) -> dict[str, Any]:
    """What a layer contributes to the ``phase`` environment, read without following links.

    Recorded at export, so a reused layer contributes the same.
    """
    out: dict[str, Any] = {"bin": safefs.is_dir(layers, f"{rel}/bin"), "lib": safefs.is_dir(layers, f"{rel}/lib"),
                           "files": {}}
    for sub in ("env", f"env.{phase}"):
        for name, kind in safefs.entries(layers, f"{rel}/{sub}"):
            if kind in ("link", "other"):
                safefs.is_dir(layers, f"{rel}/{sub}/{name}")  # raises: a link is refused, not read
            if kind == "file":
                out["files"][f"{sub}/{name}"] = safefs.read_text(layers, f"{rel}/{sub}/{name}", "a layer env file") or ""
    return out


def process_script(p: Process) -> str:
    """A tiny launcher for one process type: its working dir, its argv, and any extra arguments."""
    import shlex

    wd = p.working_dir or "/workspace"
    return f"#!/bin/sh\n# {p.type} (from {p.buildpack_id})\ncd {shlex.quote(wd)} && exec {shlex.join(p.argv())} \"$@\"\n"


def _working_dir(wd: str, where: str) -> str:
    """A process's working dir as an absolute, normalized path: a relative one is below /workspace; ``..`` is refused."""
    import posixpath

    if "\0" in wd or ".." in wd.split("/"):
        raise InvalidInput(f"{where}: working-dir {wd!r} must not contain '..'",
                           "use an absolute path (like /workspace/app) or one relative to /workspace")
    return posixpath.normpath(wd if wd.startswith("/") else f"/workspace/{wd}")


def _default_process(processes: list[Process]) -> Process | None:
    for p in processes:
        if p.default:
            return p
    for p in processes:
        if p.type == "web":
            return p
    return processes[0] if len(processes) == 1 else None


_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def git_labels(source: Path) -> dict[str, str]:
    """org.opencontainers.image.source and .revision from the app's own ``.git`` folder.

    Read as plain files, without running git (a hostile checkout's config can
    make git run commands) and only from ``SOURCE/.git`` itself: a ``.git``
    file or link (``gitdir: /elsewhere``) or a repository above the source is
    someone else's. Credentials in the remote URL never reach a label.
    """
    try:
        if safefs.kind(source, ".git") != "dir":
            return {}
        head = (safefs.read_text(source, ".git/HEAD", "git HEAD") or "").strip()
        if head.startswith("ref: "):
            ref = head[5:].strip()
            if not ref.startswith("refs/") or ".." in ref.split("/"):
                return {}
            rev = (safefs.read_text(source, f".git/{ref}", "git ref") or "").strip()
            if not rev:
                for line in (safefs.read_text(source, ".git/packed-refs", "git packed-refs") or "").splitlines():
                    sha, _, name = line.partition(" ")
                    if name.strip() == ref:
                        rev = sha
        else:
            rev = head
        if not _SHA.fullmatch(rev):
            return {}
        labels = {"org.opencontainers.image.revision": rev}
        url = _origin_url(safefs.read_text(source, ".git/config", "git config") or "")
        if url:
            labels["org.opencontainers.image.source"] = url
        return labels
    except (InvalidInput, OSError, ValueError):
        return {}


def git_config_entries(text: str) -> list[tuple[str, str, str]]:
    """(section[.subsection], key, value) of a git config's text, as git reads it.

    Enough of git-config(1)'s syntax that nothing leaks through a misparse:
    ``[section "sub"]`` and ``[section.sub]`` headers (a key may follow on the
    same line), ``#``/``;`` comments outside quotes, ``"..."`` quoting, the
    escapes ``\\" \\\\ \\n \\t \\b``, and a backslash at the end of a line
    continuing the value on the next. Section and key names are lowercased, a
    quoted subsection keeps its case; a key without ``=`` is ``true``.
    """
    out: list[tuple[str, str, str]] = []
    n, i, section = len(text), 0, ""

    def skip_line(j: int) -> int:
        k = text.find("\n", j)
        return n if k < 0 else k + 1

    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c in "#;":
            i = skip_line(i)
        elif c == "[":
            end = text.find("]", i)
            nl = text.find("\n", i)
            if end < 0 or (0 <= nl < end):
                section, i = "", skip_line(i)  # a broken header: what follows belongs to no section we know
                continue
            head = text[i + 1:end].strip()
            name, sp, rest = head.partition(" ")
            rest = rest.strip()
            if sp and rest.startswith('"') and rest.endswith('"') and len(rest) >= 2:
                sub = re.sub(r"\\(.)", r"\1", rest[1:-1])
                section = f"{name.lower()}.{sub}"
            else:
                base, dot, sub = head.partition(".")
                section = f"{base.lower()}.{sub.lower()}" if dot else head.lower()
            i = end + 1
        else:
            m = re.compile(r"[A-Za-z][A-Za-z0-9-]*").match(text, i)
            if not m:
                i = skip_line(i)
                continue
            key, i = m.group().lower(), m.end()
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] == "=":
                value, i = _git_value(text, i + 1)
            elif i >= n or text[i] in "\r\n#;":
                value = "true"
            else:
                i = skip_line(i)
                continue
            out.append((section, key, value))
    return out


_GIT_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", '"': '"', "\\": "\\"}


def _git_value(text: str, i: int) -> tuple[str, int]:
    """The value starting at ``text[i]`` (after ``=``) and where the next line starts."""
    n = len(text)
    buf: list[str] = []
    pending = ""  # whitespace outside quotes: kept only if something follows it
    quoted = False
    while i < n and text[i] in " \t":
        i += 1
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1:i + 2]
            if nxt == "\n":  # a continuation: the value goes on on the next line
                i += 2
                continue
            if text[i + 1:i + 3] == "\r\n":
                i += 3
                continue
            buf.append(pending + _GIT_ESCAPES.get(nxt, nxt))
            pending = ""
            i += 2
        elif c == "\n" or (c == "\r" and text[i + 1:i + 2] == "\n"):
            break
        elif c == '"':
            quoted = not quoted
            buf.append(pending)
            pending = ""
            i += 1
        elif not quoted and c in "#;":
            break
        elif not quoted and c in " \t":
            pending += c
            i += 1
        else:
            buf.append(pending + c)
            pending = ""
            i += 1
    nl = text.find("\n", i)
    return "".join(buf), (n if nl < 0 else nl + 1)


def _origin_url(config: str) -> str:
    """remote.origin.url from a git config's text, with any user:password@, query and fragment removed."""
    for section, key, value in git_config_entries(config):
        if section == "remote.origin" and key == "url":
            # Userinfo is stripped from the value as git joined it (continuations, quotes); a URL with
            # control characters or spaces left is not one to show.
            url = strip_userinfo(value.strip())
            return url if url and not re.search(r"[\x00-\x20\x7f]", url) else ""
    return ""


def strip_userinfo(url: str) -> str:
    """``https://user:token@host/x?token=t#f`` -> ``https://host/x``; other forms lose a password, query and fragment."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" in url:
        try:
            parts = urlsplit(url)
            netloc = parts.netloc.rpartition("@")[2]
            # The query and fragment go too: ?private_token=... is a credential as much as user:token@ is.
            return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        except ValueError:
            return ""
    url = url.split("?", 1)[0].split("#", 1)[0]
    user, at, rest = url.partition("@")  # scp-like user@host:path: a user name, but never a password
    return f"{user.partition(':')[0]}@{rest}" if at and ":" in user else url


def build(opts: BuildOptions, store=None, say: Callable[[str], None] = _say) -> BuildResult:
    """Build ``opts.source`` into an image tagged ``opts.tag`` in the local store."""
    from taxiway.oci.store import Store

    store = store or Store()
    return Lifecycle(opts, store, say).run()


def rebase(store, ref: str, run_image: str, tag: str | None = None) -> Descriptor:
    """Put an app's layers on another run image without rebuilding; the app layers keep their digests."""
    img = store.image(ref)
    cfg = img.config()
    labels = (cfg.get("config") or {}).get("Labels") or {}
    if assemble.LIFECYCLE_LABEL not in labels:
        raise InvalidInput(f"{ref} was not built by buildpacks (no {assemble.LIFECYCLE_LABEL} label)", "rebase only images taxiway build made")
    md = json.loads(labels[assemble.LIFECYCLE_LABEL])
    top = md.get("runImage", {}).get("topLayer", "")
    diffs = (cfg.get("rootfs") or {}).get("diff_ids") or []
    if top not in diffs:
        raise InvalidInput(f"{ref}'s run image top layer {top} is not among its layers", "the image is corrupt; build it again")
    n = diffs.index(top) + 1
    if run_image in stack.RECIPES:
        stack.import_stack(store, run_image)
        run_image = stack.RECIPES[run_image].ref
    new_run = store.image(run_image)
    run_diffs = (new_run.config().get("rootfs") or {}).get("diff_ids") or []
    md["runImage"] = {"topLayer": run_diffs[-1] if run_diffs else "", "reference": new_run.digest(), "image": run_image}
    md["stack"] = {"runImage": {"image": run_image}}
    rebased = image_rebase(img, n, new_run)  # the app layers keep their digests and history entries
    new_cfg = rebased.config()
    new_cfg["config"]["Labels"][assemble.LIFECYCLE_LABEL] = json.dumps(md, sort_keys=True, separators=(",", ":"))
    desc = write_image(store, set_config(rebased, new_cfg))
    store.tag(tag or ref, desc)
    return desc
