"""Publish: files -> app directory -> image (builder) -> machine -> stable URL.

The image is built by taxiway's builder with the Datasette buildpack that
ships beside this module, on the Python run image; it runs as a namespace
machine whose port is forwarded to a loopback backend port; the app's stable
URL is a small router (see :mod:`taxiway.publish.router`) that switches to a
new release only once it answers, so the previous one serves until then.

State per app lives in ``$TAXIWAY_HOME/publish/<name>/``.

Crash safety: everything a publish makes is either inside that folder or
named after the app (machines ``publish-<name>-<release>-<n>``, images
``localhost/taxiway-publish/<name>:*``, routers whose command line names
``<name>/router.json``), and ``app.json`` records a ``pending`` publish before
any of it is created. So after a ``kill -9`` the next publish of the name,
``publish rm`` and ``publish ls`` find what it left and (publish, rm) remove it.
Release images kept per app: the current one and the previous one (for rollback).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.errors import NotFound, TaxiwayError
from taxiway.fsutil import atomic_write, write_bytes_atomic
from taxiway.process import pid_alive
from taxiway.publish.app import PublishSpec, content_hash, prepare, validate
from taxiway.publish.convert import TableInfo

BUILDPACK = Path(__file__).parent / "buildpack"
CONTAINER_PORT = 8001
READY_TIMEOUT = float(os.environ.get("TAXIWAY_PUBLISH_READY_TIMEOUT", "120"))
IMAGE_PREFIX = "localhost/taxiway-publish/"


@dataclass
class PublishResult:
    name: str
    url: str
    image: str
    machine: str
    release: str
    tables: list[TableInfo] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "image": self.image, "machine": self.machine,
                "release": self.release, "seconds": round(self.seconds, 2),
                "tables": [t.to_json() for t in self.tables]}

    def table_lines(self) -> list[str]:
        """One line per table for people ("  airports: 1,234 rows, comma-separated, map on lat/lon")."""
        out = []
        for t in self.tables:
            coords = f", map on {t.latitude}/{t.longitude}" if t.latitude else ""
            sep = f", {_SEPARATORS.get(t.delimiter, repr(t.delimiter))}-separated" if t.delimiter else ""
            out.append(f"  {t.table}: {t.rows:,} rows{sep}{coords}")
        return out


_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def publish_root() -> Path:
    from taxiway.paths import home

    d = home() / "publish"
    d.mkdir(exist_ok=True)
    return d


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _app_lock(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)  # it holds the app's secret and plugin secrets
    # A POSIX record lock, not flock: machine supervisors forked while we hold
    # it must not inherit it.
    with open(d / ".lock", "w") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TaxiwayError(f"another publish of {d.name} is running", "wait for it to finish") from None
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _load(d: Path) -> dict:
    try:
        return json.loads((d / "app.json").read_text())
    except (OSError, ValueError):
        return {}


def _save(d: Path, state: dict) -> None:
    write_bytes_atomic(d / "app.json", json.dumps(state, indent=2).encode())


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_ready(port: int, machine, deadline: float) -> None:
    from taxiway.machines import state as S

    url = f"http://127.0.0.1:{port}/-/versions.json"
    while time.monotonic() < deadline:
        if _answers(url):
            return
        m = S.load(machine.id)
        if m is not None and m.status() in ("exited", "failed"):
            raise TaxiwayError(f"the new release exited ({m.reason or 'error'}, code {m.exit_code}) before answering: "
                               f"{_log_tail(m)}", f"see `taxiway machines logs {m.name}`")
        time.sleep(0.1)
    raise TaxiwayError(f"the new release did not answer on port {port} within {READY_TIMEOUT:.0f}s",
                       f"see `taxiway machines logs {machine.name}`")


def _log_tail(m, n: int = 3) -> str:
    try:
        lines = (m.dir / "log").read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return ""
    return " | ".join(line.split(" ", 2)[-1] for line in lines)


def _ensure_router(d: Path, state: dict, port: int) -> int:
    """Start the app's router on ``port`` unless it runs; returns its pid."""
    pid = state.get("router_pid")
    running = _routers_of(d)  # the recorded pid only if it still is this app's router, not a reused pid
    if pid in running and state.get("port") == port:
        return pid
    for other in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGTERM)
    if not _port_free(port):
        raise TaxiwayError(f"port {port} is already in use", "pass another --port")
    log = open(d / "router.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "taxiway.publish.router", "--listen", f"127.0.0.1:{port}", "--state", str(d / "router.json")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise TaxiwayError(f"the router for {d.name} did not start on port {port}", f"see {d / 'router.log'}")


def _plugin_error(e: Exception, install: list[str]) -> TaxiwayError | None:
    text = str(e) + "\n" + "\n".join(getattr(e, "log_tail", []) or [])
    m = re.search(r"No matching distribution found for ([A-Za-z0-9._\[\]=<>~!-]+)", text)
    if m or re.search(r"Could not find a version that satisfies", text):
        bad = m.group(1) if m else next((p for p in install if p in text), "a requested package")
        return TaxiwayError(f"plugin {bad} could not be installed: it does not exist on the package index",
                            "check the name passed to --install (e.g. datasette-cluster-map)")
    return None


def _image_repo(name: str) -> str:
    return f"{IMAGE_PREFIX}{name}"


def _machine_name_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^publish-{re.escape(name)}-[0-9a-f]{{6}}-[0-9]{{5}}$")


def _machines_of(name: str) -> list:
    """Every machine a publish of ``name`` created (its names say so), current or left behind."""
    from taxiway.machines import state as S

    pat = _machine_name_re(name)
    return [m for m in S.all_machines() if pat.match(m.name)]


def _routers_of(d: Path) -> list[int]:
    """Pids of router processes serving the app in ``d`` (found by the state file their command line names)."""
    want = str(d / "router.json")
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"taxiway.publish.router" in argv and b"--state" in argv:
            i = argv.index(b"--state")
            if i + 1 < len(argv) and argv[i + 1].decode(errors="replace") == want and pid_alive(int(p.name)):
                pids.append(int(p.name))
    return pids


def _prune_images(name: str, keep: set[str]) -> list[str]:
    """Untag the app's images not in ``keep`` and delete the blobs no remaining name reaches; returns the names."""
    from taxiway.oci.store import Store, parse_json

    store = Store()
    repo = _image_repo(name) + ":"
    gone = []
    for ref, desc in store.images():
        if ref.startswith(repo) and ref not in keep:
            with contextlib.suppress(NotFound):
                store.untag(ref)
                gone.append((ref, desc))
    if not gone:
        return []
    candidates = set()
    for _, desc in gone:
        candidates.add(desc.digest)
        with contextlib.suppress(Exception):
            manifest = parse_json(store.read_blob(desc.digest), desc.digest)
            candidates.add(manifest["config"]["digest"])
            candidates.update(layer["digest"] for layer in manifest.get("layers") or [])
    referenced = store.referenced()
    for dg in candidates - referenced:
        with contextlib.suppress(Exception):
            store.blob_path(dg).unlink(missing_ok=True)
    return [ref for ref, _ in gone]


def _leftovers(d: Path, state: dict) -> dict:
    """What an interrupted publish of this app left: machines, routers and files that are not the current release."""
    name = d.name
    machines = [m.name for m in _machines_of(name) if m.id != state.get("machine_id")]
    routers = [p for p in _routers_of(d) if p != state.get("router_pid")]
    files = []
    if (d / "build").exists():
        files = [str(p) for p in (d / "build").rglob("*") if p.is_file()]
    return {"machines": machines, "routers": routers, "files": files}


def _clean(d: Path, state: dict) -> None:
    """Remove what earlier, interrupted publishes of this app left (the app lock is held)."""
    import shutil

    for m in _machines_of(d.name):
        if m.id != state.get("machine_id"):
            _retire(m.id, grace=0)
    for pid in _routers_of(d):
        if pid != state.get("router_pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    shutil.rmtree(d / "build", ignore_errors=True)
    keep = {state[k] for k in ("image", "previous_image") if state.get(k)}
    if keep:
        keep.add(_image_repo(d.name) + ":latest")  # the build cache's name; it points at the current release
    _prune_images(d.name, keep)


def _remove_all(d: Path) -> None:
    """Everything of the app in ``d``: routers, machines, images, build cache, folder (the app lock is held)."""
    import shutil

    from taxiway.builder import lifecycle

    for pid in _routers_of(d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for m in _machines_of(d.name):
        _retire(m.id, grace=0)
    _prune_images(d.name, set())
    cache = lifecycle.cache_dir(_image_repo(d.name) + ":latest")
    if cache.exists():
        with contextlib.suppress(OSError):
            lifecycle.discard(cache)
    # The app's images are gone, so the unpacked layers only they used (the published data among
    # them) are unreferenced: the snapshots API's default prune removes exactly those (no other image's).
    from taxiway.machines.snapshots import Snapshotter

    with contextlib.suppress(Exception):
        Snapshotter().prune()
    shutil.rmtree(d, ignore_errors=True)


def publish(spec: PublishSpec, say=_say) -> PublishResult:
    """Build and run ``spec`` as a Datasette app; replace the previous release once the new one answers."""
    validate(spec)  # bad options and files fail before anything is made
    name = spec.app_name()
    d = publish_root() / name
    with _app_lock(d):
        state = _load(d)
        state.pop("pending", None)
        _clean(d, state)
        # Intent first: a kill -9 from here on leaves a record that ls, rm and the next publish act on.
        _save(d, {**state, "name": name, "pending": {"pid": os.getpid(), "started": _now()}})
        ok = False
        try:
            result = _publish(spec, d, state, say)
            ok = True
            return result
        finally:
            if not ok:
                if state.get("release"):
                    _clean(d, state)
                    _save(d, state)
                else:
                    _remove_all(d)


def _secret(d: Path, given: str | None) -> str:
    """The app's DATASETTE_SECRET: ``given`` (then kept), else the one kept in ``d/secret``, else a new one.

    One secret per app, so signed cookies (``ds_actor``, CSRF tokens) stay valid across releases.
    """
    import secrets

    path = d / "secret"
    if not given:
        with contextlib.suppress(OSError):
            if kept := path.read_text().strip():
                return kept
    value = given or secrets.token_hex(32)
    with atomic_write(path, mode=0o600, binary=False) as f:
        f.write(value)
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _publish(spec: PublishSpec, d: Path, state: dict, say) -> PublishResult:
    from taxiway.builder import stack
    from taxiway.builder.lifecycle import BuildFailed, BuildOptions, build
    from taxiway.machines import runtime
    from taxiway.machines import state as S
    from taxiway.machines.config import Guest, MachineConfig, Port, Restart
    from taxiway.oci.store import Store

    t0 = time.monotonic()
    name = d.name
    app, tables, secrets_env = prepare(spec, d / "build")
    secrets_env["DATASETTE_SECRET"] = _secret(d, spec.secret)
    release = content_hash(app)[:12]
    tag = f"{_image_repo(name)}:{release}"
    say(f"---> building {tag}")
    store = Store()
    run_ref = stack.RECIPES["run-python"].ref
    stack.import_stack(store, "run-python")
    try:
        # Built under one name per app so the build cache (Datasette's layer) carries over
        # between releases; the machine runs the immutable release tag.
        result = build(BuildOptions(source=app, tag=f"{_image_repo(name)}:latest",
                                    buildpacks=[str(BUILDPACK)], run_image=run_ref), store=store,
                       say=lambda m: None if os.environ.get("TAXIWAY_QUIET") else say(m))
    except BuildFailed as e:
        raise _plugin_error(e, spec.install) or e from None
    store.tag(tag, result.descriptor)
    port = spec.port or state.get("port") or _free_port()
    backend = _free_port()
    cfg = MachineConfig(image=tag, env={"PORT": str(CONTAINER_PORT), **secrets_env},
                        ports=[Port(host_port=backend, port=CONTAINER_PORT)], net="private",
                        restart=Restart("on-failure", 3),
                        guest=Guest(memory=spec.memory, cpus=spec.cpus, pids=spec.pids))
    mname = f"publish-{name}-{release[:6]}-{int(time.time() * 1000) % 100000:05d}"
    pending = {"pid": os.getpid(), "started": _now(), "machine": mname, "image": tag, "port": port}
    _save(d, {**state, "name": name, "pending": pending})
    say(f"---> starting machine {mname}")
    m = runtime.create(cfg, name=mname)
    try:
        runtime.start_detached(m)
        _wait_ready(backend, m, time.monotonic() + READY_TIMEOUT)
    except BaseException:
        with contextlib.suppress(Exception):
            runtime.destroy(S.load(m.id) or m, force=True)
        raise
    # Switch the stable URL to the new release, then retire the old one.
    write_bytes_atomic(d / "router.json", json.dumps({"backend_host": "127.0.0.1", "backend_port": backend}).encode())
    try:
        router_pid = _ensure_router(d, state, port)
    except BaseException:
        with contextlib.suppress(Exception):
            runtime.destroy(S.load(m.id) or m, force=True)
        raise
    os.kill(router_pid, signal.SIGHUP)
    old = state.get("machine_id")
    url = f"http://127.0.0.1:{port}"
    previous = state.get("image") if state.get("image") != tag else state.get("previous_image")
    new_state = {"name": name, "port": port, "url": url, "router_pid": router_pid, "machine_id": m.id,
                 "machine": m.name, "backend_port": backend, "image": tag, "previous_image": previous,
                 "release": release, "published": _now(), "tables": [t.to_json() for t in tables]}
    _save(d, new_state)
    state.clear()
    state.update(new_state)  # from here on a failure keeps the new release, not the old one
    if old and old != m.id:
        _retire_in_background(old)
    # What this publish made and no longer needs: the app folder's copy of the data, older release images.
    import shutil

    shutil.rmtree(d / "build", ignore_errors=True)
    with contextlib.suppress(Exception):
        _prune_images(name, {tag, previous, f"{_image_repo(name)}:latest"} - {None})
    return PublishResult(name, url, tag, m.name, release, tables, time.monotonic() - t0)


def _retire(machine_id: str, grace: float = 0.5) -> None:
    """Stop and remove an old release after open requests have had a moment to finish."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    time.sleep(grace)
    m = S.load(machine_id)
    if m is None:
        return
    with contextlib.suppress(Exception):
        runtime.stop(m, timeout=5)
    with contextlib.suppress(Exception):
        runtime.destroy(S.load(machine_id) or m, force=True)


def _retire_in_background(machine_id: str) -> None:
    """Retire the old release in a detached child so the command returns as soon as the new one serves."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                _retire(machine_id)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _lock_free(d: Path) -> bool:
    """Whether no publish of the app in ``d`` is running now (another process's lock would be held)."""
    try:
        with open(d / ".lock", "a") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except OSError:
        return False


def list_apps() -> list[dict]:
    """Published apps with their URL and whether they answer; interrupted publishes too, with what they left."""
    from taxiway.machines import state as S

    out = []
    for d in sorted(publish_root().iterdir()):
        if not d.is_dir():
            continue
        st = _load(d)
        m = S.load(st["machine_id"]) if st.get("machine_id") else None
        running = m is not None and m.status() == "running" and st.get("router_pid") in _routers_of(d)
        if not _lock_free(d):
            status = "publishing"
        elif st.get("pending") or not st.get("release"):
            status = "interrupted"
        else:
            status = "running" if running else "stopped"
        left = _leftovers(d, st) if status != "publishing" else {"machines": [], "routers": [], "files": []}
        out.append({"name": st.get("name", d.name), "url": st.get("url"), "state": status,
                    "image": st.get("image"), "previous_image": st.get("previous_image"),
                    "machine": st.get("machine"), "published": st.get("published"),
                    "tables": [t["table"] for t in st.get("tables", [])], "leftovers": left})
    return out


def remove(name: str) -> None:
    """Stop the app's router and machine, remove its images and anything an interrupted publish left, and forget it."""
    d = publish_root() / name
    if not name or "/" in name or name.startswith(".") or not d.is_dir():
        raise NotFound(f"no published app named {name!r}", "see `taxiway publish ls`")
    with _app_lock(d):
        _remove_all(d)
