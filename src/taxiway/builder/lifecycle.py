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
  not even re-tarred: a layer whose tree fingerprint matches the previous
  export reuses its blob. The image is tagged only once every blob is stored,
  so a failed build exports nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxiway.builder import assemble, stack
from taxiway.builder import buildpack as bpmod
from taxiway.builder import env as envmod
from taxiway.builder import layer as lyr
from taxiway.builder.buildpack import Buildpack, GroupEntry, LayerMeta, Process
from taxiway.builder.project import copy_source, load_project
from taxiway.builder.sandbox import GID, TRUST_ENV, UID, Sandbox, check_root
from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Descriptor

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
    os.chown(root, UID, GID)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), UID, GID)


def _tail(text: str, n: int = LOG_TAIL) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


# -- the cache --------------------------------------------------------------------------------


def cache_dir(tag: str) -> Path:
    """The build cache of one image name: the kept /layers and what the last export wrote."""
    from taxiway.oci.store import normalize_name
    from taxiway.paths import home

    key = hashlib.sha256(normalize_name(tag).encode()).hexdigest()[:20]
    return home() / "build" / "cache" / key


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


def _toml_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restore_layers(layers: Path, exported: dict[str, str]) -> None:
    """Prune the kept /layers as the spec's restorer would leave it.

    ``exported`` maps the launch layers (``<bp dir>/<layer>``) of the previous
    image to the hash of the ``<layer>.toml`` they were exported with: only
    those keep their metadata without their content. (A build that failed after
    a buildpack rewrote a toml must not pass the old layer off as the new one.)
    """
    if not layers.is_dir():
        return
    for bpdir in layers.iterdir():
        if not bpdir.is_dir():
            bpdir.unlink()
            continue
        tomls = {p.stem for p in bpdir.glob("*.toml") if p.name not in SPECIAL_TOMLS}
        for special in ("launch.toml", "build.toml"):
            (bpdir / special).unlink(missing_ok=True)
        for child in bpdir.iterdir():
            if child.is_dir() and child.name not in tomls:
                discard(child)
        for name in tomls:
            try:
                meta = bpmod.parse_layer_toml(bpdir / f"{name}.toml")
            except InvalidInput:
                meta = LayerMeta()
            d = bpdir / name
            if meta.cache:
                continue
            if d.exists():
                discard(d)
            toml = bpdir / f"{name}.toml"
            if not meta.launch or exported.get(f"{bpdir.name}/{name}") != _toml_hash(toml):
                toml.unlink()


def buildpacks_dir(bps: list[Buildpack]) -> Path:
    """/cnb/buildpacks/<id>/<version> for these buildpacks, made once per content and shared by builds."""
    from taxiway.paths import home

    unique = list({bp.id: bp for bp in bps}.values())
    lib = bpmod.bundled_root() / "_lib"
    h = hashlib.sha256()
    for bp in unique:
        h.update(f"{bp.id}\0{bp.version}\0{bp.path}\0{lyr.fingerprint(bp.path)}\n".encode())
    h.update(lyr.fingerprint(lib).encode())
    root = home() / "build" / "buildpacks"
    dest = root / h.hexdigest()[:20]
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".new-"))
    try:
        for bp in unique:
            shutil.copytree(bp.path, tmp / bp.dirname / bp.version, symlinks=True)
        shutil.copytree(lib, tmp / "_lib")
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
        copy_source(self.source, self.workspace, self.project)
        _chown_tree(self.workspace)
        self.platform = work / "platform"
        (self.platform / "env").mkdir(parents=True)
        for k, v in self.opts.env.items():
            (self.platform / "env" / k).write_text(v)
        self.bpdir = buildpacks_dir(bps)
        self.out = work / "out"
        self.out.mkdir()
        os.chown(self.out, UID, GID)
        if self.opts.no_cache and self.layers.exists():
            shutil.rmtree(self.layers)
        self.layers.mkdir(parents=True, exist_ok=True)
        record = self.cache / "export.json"
        layers_record = json.loads(record.read_text()).get("layers", {}) if record.exists() else {}
        exported = {k: v.get("toml", "") for k, v in layers_record.items()}
        restore_layers(self.layers, exported)
        _chown_tree(self.layers)
        self.log = work / "build.log"
        self.sandbox = Sandbox(self.rootfs, binds={"/workspace": self.workspace, "/layers": self.layers, "/cnb/work": self.out},
                               ro_binds={"/platform": self.platform, "/cnb/buildpacks": self.bpdir})

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
            why = " ".join(_tail(det.output, 3)) or "did not apply"
            looked.append(f"{bid}: {why}")
        raise TaxiwayError(f"no buildpack detected an app in {self.source}: " + "; ".join(looked),
                           "add the file a buildpack looks for, or pass --buildpack")

    def _detect_one(self, entry: GroupEntry) -> Detected:
        bp = entry.buildpack
        d = self.out / bp.dirname
        d.mkdir(exist_ok=True)
        os.chown(d, UID, GID)
        plan_path = f"/cnb/work/{bp.dirname}/plan.toml"
        env = self._base_env(bp) | {"CNB_BUILD_PLAN_PATH": plan_path}
        p = self.sandbox.run([f"{env['CNB_BUILDPACK_DIR']}/bin/detect", "/platform", plan_path], env, timeout=120)
        out = (p.stdout or b"").decode(errors="replace") + (p.stderr or b"").decode(errors="replace")
        if p.returncode not in (0, 100):
            raise BuildFailed(f"buildpack {bp.id} failed to detect (exit {p.returncode})",
                              "fix the buildpack's bin/detect; its output is above", _tail(out))
        plan: dict[str, Any] = {}
        host_plan = d / "plan.toml"
        if p.returncode == 0 and host_plan.exists() and host_plan.read_text().strip():
            plan = bpmod.load_toml(host_plan, f"build plan of {bp.id}")
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
            bl = self.layers / bp.dirname
            bl.mkdir(exist_ok=True)
            os.chown(bl, UID, GID)
            plan_host = self.out / bp.dirname / "bpplan.toml"
            plan_host.parent.mkdir(exist_ok=True)
            plan_host.write_text(bpmod.toml_dumps(plan))
            os.chown(plan_host, UID, GID)
            plan_path = f"/cnb/work/{bp.dirname}/bpplan.toml"
            env = self._base_env(bp)
            for k, v in build_env.items():
                env[k] = v
            env |= {"CNB_LAYERS_DIR": f"/layers/{bp.dirname}", "CNB_BP_PLAN_PATH": plan_path}
            start = self.log.stat().st_size if self.log.exists() else 0
            p = self.sandbox.run([f"{env['CNB_BUILDPACK_DIR']}/bin/build", f"/layers/{bp.dirname}", "/platform", plan_path],
                                 env, log=self.log, timeout=1800)
            if p.returncode != 0:
                with open(self.log, "rb") as f:
                    f.seek(start)
                    out = f.read().decode(errors="replace")
                tail = _tail(out)
                last = tail[-1].removeprefix("error: ") if tail else "no output"
                raise BuildFailed(f"buildpack {bp.id} failed to build (exit {p.returncode}): {last}; nothing was exported",
                                  "fix the error (the end of the build log is above) and build again", tail)
            launch = bl / "launch.toml"
            if launch.exists():
                procs, labels = bpmod.parse_launch_toml(launch, bp.id)
                for proc in procs:
                    processes[proc.type] = proc
                for label in labels:
                    self.labels[label["key"]] = str(label.get("value", ""))
            # Later buildpacks see this one's build layers.
            for name, meta in self._layer_metas(bp):
                if meta.build:
                    merged = {"PATH": env.get("PATH", BASE_PATH), **build_env}
                    envmod.apply_layer(merged, bl / name, "build", inside=f"/layers/{bp.dirname}/{name}")
                    build_env = merged
        return list(processes.values())

    def _layer_metas(self, bp: Buildpack) -> list[tuple[str, LayerMeta]]:
        bl = self.layers / bp.dirname
        out = []
        for t in sorted(bl.glob("*.toml")):
            if t.name in SPECIAL_TOMLS:
                continue
            out.append((t.stem, bpmod.parse_layer_toml(t)))
        return out

    # -- export ---------------------------------------------------------------------------

    def export(self, group: list[Buildpack], processes: list[Process]) -> BuildResult:
        record_path = self.cache / "export.json"
        prev = json.loads(record_path.read_text()) if record_path.exists() and not self.opts.no_cache else {}
        prev_layers: dict[str, Any] = prev.get("layers", {})
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
                has_content = d.is_dir()  # the restorer removes launch-only folders; present means (re)written
                old = prev_layers.get(key)
                if has_content:
                    fp = lyr.fingerprint(d)
                    if old and old.get("fingerprint") == fp and self.store.has_blob(old["digest"]):
                        layer, envfiles = _layer_from(old), old["env"]
                        reused.append(key)
                    else:
                        layer = lyr.store_dir_layer(self.store, d, inside.lstrip("/"), UID, GID)
                        envfiles = _env_files(d)
                        written.append(key)
                elif old and self.store.has_blob(old["digest"]):
                    fp, layer, envfiles = old.get("fingerprint"), _layer_from(old), old["env"]
                    reused.append(key)
                else:
                    raise TaxiwayError(f"buildpack {bp.id} kept launch layer {name!r} but there is no previous image layer to reuse",
                                       "build again with --no-cache")
                envmod.apply_recorded(env, envfiles, inside)
                record[key] = {"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.descriptor.size,
                               "fingerprint": fp, "env": envfiles,
                               "toml": _toml_hash(self.layers / bp.dirname / f"{name}.toml")}
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
            plyr = lyr.store_layer(self.store, entries, 0, 0)
            old_p = prev.get("processes", {}).get("digest")
            (reused if old_p == plyr.digest else written).append("processes")
            new_layers.append(("process types at /cnb/process", plyr))
            processes_record = {"digest": plyr.digest}

        fp = lyr.fingerprint(self.workspace)
        old = prev.get("app")
        if old and old.get("fingerprint") == fp and self.store.has_blob(old["digest"]):
            app = _layer_from(old)
            reused.append("app")
        else:
            app = lyr.store_dir_layer(self.store, self.workspace, "workspace", UID, GID)
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
        labels[assemble.LIFECYCLE_LABEL] = json.dumps(lifecycle_md, sort_keys=True, separators=(",", ":"))
        labels[assemble.BUILD_LABEL] = json.dumps(build_md, sort_keys=True, separators=(",", ":"))
        labels.update(getattr(self, "labels", {}))
        labels.update(git_labels(self.source))
        cfg = assemble.with_layers(run_cfg, [layer.diff_id for _, layer in new_layers], [h for h, _ in new_layers])
        c = cfg.setdefault("config", {})
        env.setdefault("PORT", "8080")
        c["Env"] = [f"{k}={v}" for k, v in env.items()]
        c["User"] = f"{UID}:{GID}"
        c["WorkingDir"] = (default.working_dir if default and default.working_dir else "/workspace")
        c["Labels"] = labels
        c["ExposedPorts"] = {"8080/tcp": {}}
        c.pop("Cmd", None)
        c.pop("Entrypoint", None)
        if default:
            c["Entrypoint"] = default.argv()
        else:
            self.say("[export] no default process: the image has no entrypoint (add a Procfile or launch.toml process)")
        layers = [*run.layers(), *[layer.descriptor for _, layer in new_layers]]
        desc = assemble.put_image(self.store, cfg, layers)
        assemble.tag_if_changed(self.store, self.opts.tag, desc)
        from taxiway.fsutil import write_bytes_atomic

        write_bytes_atomic(record_path, json.dumps({"layers": record, "app": app_record, "digest": desc.digest,
                                                    "processes": processes_record},
                                                   sort_keys=True, indent=1).encode())
        return BuildResult(self.opts.tag, desc, group, processes, written, reused)

    # -- all phases -----------------------------------------------------------------------

    def run(self) -> BuildResult:
        check_root()
        stack.import_stack(self.store, stack.BUILD)
        self.rootfs = stack.rootfs_for(self.store, stack.RECIPES[stack.BUILD].ref)
        if self.opts.buildpacks:
            order = [[GroupEntry(bpmod.resolve(s)) for s in self.opts.buildpacks]]
        else:
            order = bpmod.default_order()
        all_bps = [e.buildpack for g in order for e in g]
        from taxiway.paths import home

        tmp_root = home() / "build" / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with stack.locked(self.cache / "lock"), tempfile.TemporaryDirectory(dir=tmp_root, prefix="build-") as work:
            self._prepare(Path(work), all_bps)
            with self.sandbox:
                group = self.detect(order)
                processes = self.build(group)
            result = self.export([bp for bp, _ in group], processes)
        return result


def _layer_from(rec: dict[str, Any]) -> lyr.Layer:
    return lyr.Layer(Descriptor(mt.OCI_LAYER_GZIP, rec["digest"], rec["size"]), rec["diff_id"])


def _env_files(d: Path) -> dict[str, Any]:
    """What a launch layer contributes to the environment, recorded so a reused layer contributes the same."""
    out: dict[str, Any] = {"bin": (d / "bin").is_dir(), "lib": (d / "lib").is_dir(), "files": {}}
    for sub in ("env", "env.launch"):
        p = d / sub
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file():
                    out["files"][f"{sub}/{f.name}"] = f.read_text()
    return out


def process_script(p: Process) -> str:
    """A tiny launcher for one process type: its working dir, its argv, and any extra arguments."""
    import shlex

    wd = p.working_dir or "/workspace"
    return f"#!/bin/sh\n# {p.type} (from {p.buildpack_id})\ncd {shlex.quote(wd)} && exec {shlex.join(p.argv())} \"$@\"\n"


def _default_process(processes: list[Process]) -> Process | None:
    for p in processes:
        if p.default:
            return p
    for p in processes:
        if p.type == "web":
            return p
    return processes[0] if len(processes) == 1 else None


def git_labels(source: Path) -> dict[str, str]:
    """org.opencontainers.image.source and .revision from git, when the source is a checkout."""
    if not any((p / ".git").exists() for p in (source, *source.parents)) or not shutil.which("git"):
        return {}
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    rev = git("rev-parse", "HEAD")
    if not rev:
        return {}
    labels = {"org.opencontainers.image.revision": rev}
    url = git("config", "--get", "remote.origin.url")
    if url:
        labels["org.opencontainers.image.source"] = url
    return labels


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
    run_cfg = new_run.config()
    run_diffs = (run_cfg.get("rootfs") or {}).get("diff_ids") or []
    app_layers = img.layers()[n:]
    new_cfg = json.loads(json.dumps(cfg))
    new_cfg["rootfs"] = {"type": "layers", "diff_ids": run_diffs + diffs[n:]}
    hist = cfg.get("history") or []
    new_cfg["history"] = list(run_cfg.get("history") or []) + hist[len(hist) - len(app_layers):]
    md["runImage"] = {"topLayer": run_diffs[-1] if run_diffs else "", "reference": new_run.digest(), "image": run_image}
    md["stack"] = {"runImage": {"image": run_image}}
    new_cfg["config"]["Labels"][assemble.LIFECYCLE_LABEL] = json.dumps(md, sort_keys=True, separators=(",", ":"))
    desc = assemble.put_image(store, new_cfg, [*new_run.layers(), *app_layers])
    store.tag(tag or ref, desc)
    return desc
