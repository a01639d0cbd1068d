"""The machines API: create, run, supervise, stop, start, remove, exec, wait, logs, gc.

Both runtimes share it; what differs is one ``run_once`` per runtime
(:mod:`taxiway.machines.namespace` for processes, :mod:`taxiway.machines.vm`
for micro-VMs). State changes are written to the machine's ``events.jsonl``
as they happen, for the platform to watch.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.machines import cgroups
from taxiway.machines import config as C
from taxiway.machines import state as S
from taxiway.machines.cgroups import Cgroup
from taxiway.machines.config import MachineConfig
from taxiway.machines.snapshots import Snapshotter

if False:  # typing only: not imported on the start path
    from typing import Any

PR_SET_CHILD_SUBREAPER = 36


# -- images -------------------------------------------------------------------------------


class _CachedImage:
    """An image resolved earlier: its digest and config, the store opened only if layers are needed."""

    def __init__(self, ref: str, digest: str, config: dict[str, Any]):
        self.ref, self._digest, self._config = ref, digest, config
        self._image: Any = None

    def digest(self) -> str:
        return self._digest

    def config(self) -> dict[str, Any]:
        return self._config

    def _real(self) -> Any:
        if self._image is None:
            from taxiway.oci.store import Store

            self._image = Store().image(self.ref)
        return self._image

    def layers(self) -> list[Any]:
        return self._real().layers()

    def open_blob(self, digest: str) -> Any:
        return self._real().open_blob(digest)

    def __repr__(self) -> str:
        return self.ref


def _index_identity() -> list[int] | None:
    from taxiway.paths import store_dir

    try:
        st = os.stat(store_dir() / "index.json")
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _cache_path() -> Path:
    return S.machines_dir() / ".images.json"


def get_image(ref: str, progress: Any = None) -> Any:
    """The image from the local store, pulled first if it is missing.

    A warm start skips the store: a small cache maps ``ref`` to its digest and
    config, valid while the store's index.json is the very same file (any pull,
    tag or rm replaces it).
    """
    import json

    ident = _index_identity()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cache = json.loads(_cache_path().read_bytes())
        if ident is not None and cache["index"] == ident and ref in cache["refs"]:
            hit = cache["refs"][ref]
            return _CachedImage(ref, hit["digest"], hit["config"])
    from taxiway.errors import NotFound
    from taxiway.oci.store import Store

    store = Store()
    try:
        image = store.image(ref)
    except NotFound:
        try:
            from taxiway.oci.pull import pull
        except ImportError:
            raise NotFound(f"no image {ref} in the store", "pull it first with `taxiway pull`") from None
        pull(ref, store=store, progress=progress)
        image = store.image(ref)
    ident = _index_identity()
    if ident is not None:
        with contextlib.suppress(OSError, ValueError):
            try:
                cache = json.loads(_cache_path().read_bytes())
                if cache.get("index") != ident:
                    raise ValueError
            except (OSError, ValueError):
                cache = {"index": ident, "refs": {}}
            cache["refs"][ref] = {"digest": image.digest(), "config": image.config()}
            tmp = _cache_path().with_name(f".images.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, _cache_path())
    return image


def _read_layer_file(snap: Snapshotter, chain: list[str], rel: str) -> str | None:
    """A file of the image's merged root, read from its layer directories (top layer first)."""
    layers = [chain[-1]] if not snap.overlay else list(reversed(chain))
    for c in layers:
        p = snap.path(c) / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return None
        if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:  # overlay whiteout
            return None
        try:
            return Path(os.path.realpath(p)).read_text(errors="replace") if not os.path.islink(p) else p.read_text(errors="replace")
        except OSError:
            return None
    return None


# -- create -------------------------------------------------------------------------------


def create(cfg: MachineConfig, name: str | None = None, progress: Any = None) -> S.Machine:
    """Validate ``cfg`` against the image, prepare its snapshot and record the machine (not started)."""
    if os.geteuid() != 0:
        raise TaxiwayError("running machines needs root (namespaces, cgroups and mounts)",
                           "run taxiway as root, e.g. with sudo")
    if name:
        S.valid_name(name)
        if S.name_taken(name):
            raise InvalidInput(f"a machine named {name!r} already exists", f"remove it (`taxiway machines rm -f {name}`) or pick another --name")
    if cfg.net not in ("none", "host", "private"):
        raise InvalidInput(f"invalid network {cfg.net!r}", "use --net none, host or private")
    if cfg.ports and cfg.net == "none":
        raise InvalidInput("-p needs a network", "use --net private (the default) or --net host")
    if cfg.hostname is not None:
        C.check_hostname(cfg.hostname)
    for mnt in cfg.mounts:
        C.check_volume_target(mnt.target)
    if cfg.storage_size and cfg.isolation != "namespace":
        raise InvalidInput("--storage-size is for namespace machines", "drop it, or use --isolation namespace")
    if cfg.isolation == "vm":
        from taxiway.machines import vm

        return vm.create(cfg, name, progress)
    if cfg.isolation != "namespace":
        raise InvalidInput(f"invalid isolation {cfg.isolation!r}", "use --isolation namespace or vm")
    from taxiway.machines import linux

    caps = linux.machine_caps(cfg.cap_add, cfg.cap_drop)
    image = get_image(cfg.image, progress)
    icfg = image.config()
    argv = C.command(icfg, cfg.cmd, cfg.entrypoint)
    snap = Snapshotter()
    snap.cleanup()
    if cfg.storage_size and not snap.overlay:
        raise InvalidInput("--storage-size needs overlayfs (this host copies layers instead)", "drop --storage-size")
    chain = snap.prepare(image)
    if not chain:
        raise InvalidInput(f"{cfg.image} has no layers", "this image has no root filesystem to run")
    ic = icfg.get("config") or {}
    user = cfg.user if cfg.user is not None else (ic.get("User") or None)
    uid, gid, groups, home = C.resolve_user(user, _read_layer_file(snap, chain, "etc/passwd"),
                                            _read_layer_file(snap, chain, "etc/group"), cfg.image)
    mid = S.new_id()
    name = name or S.new_name()
    hostname = cfg.hostname or mid[:12]
    if cfg.stop_signal is None and ic.get("StopSignal"):
        cfg.stop_signal = ic["StopSignal"]
    m = S.Machine(id=mid, name=name, config=cfg, image_digest=image.digest(), chain=chain, command=argv,
                  process={"argv": argv, "env": C.environment(icfg, cfg.env, hostname, home), "uid": uid, "gid": gid,
                           "groups": groups, "workdir": cfg.workdir or ic.get("WorkingDir") or "/",
                           "hostname": hostname, "caps": caps})
    d = m.dir
    d.mkdir()
    try:  # the record (with its chain) is the machine's lease on its snapshots
        if cfg.storage_size:
            _make_disk(d, cfg.storage_size)
        elif snap.overlay:
            (d / "upper").mkdir()
            (d / "work").mkdir()
        else:
            snap.copy_root(chain, d / "root")
        m.save()
        m.event("created", image=cfg.image)
    except BaseException:
        S.remove_dir(d)
        raise
    return m


def _make_disk(d: Path, size: int) -> None:
    """``--storage-size``: the writable layer's own ext4 file (sparse, no journal, no reserved blocks),
    mounted over a loop device for each run (``namespace.open_disk``); removed with the machine."""
    import subprocess

    disk = d / "disk.ext4"
    with open(disk, "wb") as f:
        f.truncate(size)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(disk)], capture_output=True)
    if r.returncode != 0:
        raise TaxiwayError(f"could not make the machine's storage: {r.stderr.decode(errors='replace').strip()[:300]}",
                           "check that e2fsprogs is installed and the disk has room")
    (d / "disk").mkdir()


# -- one run of a namespace machine ----------------------------------------------------------


def _ts() -> bytes:
    t = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z").encode()


LOG_MAX = int(os.environ.get("TAXIWAY_LOG_MAX_BYTES", 16 << 20))  # then log -> log.1 (one old file kept)
LINE_MAX = 64 << 10  # a longer line (or output with no newline at all) is split: memory stays bounded


class _LogPump:
    """Copies machine output to its log (timestamped lines), rotating it at ``LOG_MAX`` bytes.

    Two files at most: ``log`` and ``log.1``, so a chatty machine can't fill the disk.
    """

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "ab", buffering=0)
        self.size = self.f.tell()
        self.partial: dict[str, bytes] = {}

    def _emit(self, chunk: bytes) -> None:
        if self.size + len(chunk) > LOG_MAX and self.size:
            self.f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.f = open(self.path, "ab", buffering=0)
            self.size = 0
        self.f.write(chunk)
        self.size += len(chunk)

    def write(self, stream: str, data: bytes) -> None:
        buf = self.partial.get(stream, b"") + data
        *whole, rest = buf.split(b"\n")
        lines = []
        for ln in whole:
            while len(ln) > LINE_MAX:
                lines.append(ln[:LINE_MAX])
                ln = ln[LINE_MAX:]
            lines.append(ln)
        while len(rest) > LINE_MAX:
            lines.append(rest[:LINE_MAX])
            rest = rest[LINE_MAX:]
        if lines:
            ts = _ts()
            self._emit(b"".join(ts + b" " + stream.encode() + b" " + ln + b"\n" for ln in lines))
        self.partial[stream] = rest

    def close(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self._emit(_ts() + b" " + stream.encode() + b" " + rest + b"\n")
        self.f.close()


def _caps(m: S.Machine) -> list[str]:
    from taxiway.machines import linux

    caps = m.process.get("caps")
    return list(linux.DEFAULT_CAPS) if caps is None else caps  # a record from before caps were kept: as it ran


def seccomp_filter(m: S.Machine) -> bytes | None:
    """The machine's seccomp program (classic BPF), or None with ``seccomp=unconfined``."""
    setting = m.config.seccomp
    if setting == "unconfined":
        return None
    from taxiway.machines import seccomp

    return seccomp.filter_for(setting if isinstance(setting, dict) else None, _caps(m),
                              str(S.machines_dir() / ".seccomp"))


def _spec(m: S.Machine) -> dict[str, Any]:
    from taxiway.machines.namespace import etc_files

    d = m.dir
    p = m.process
    shared = S.machines_dir()  # mount points shared by all machines: each mounts in its own namespace
    for mp in (".mnt", ".etc"):
        if not (shared / mp).exists():
            (shared / mp).mkdir(exist_ok=True)
    spec = {"rootfs": str(shared / ".mnt"), "etc_dir": str(shared / ".etc"), "net": m.config.net, "argv": p["argv"], "env": p["env"], "uid": p["uid"],
            "gid": p["gid"], "groups": p["groups"], "workdir": p["workdir"], "hostname": p["hostname"],
            "caps": _caps(m), "mounts": [vars(x) for x in m.config.mounts],
            "etc": etc_files(p["hostname"], m.config.net), "seccomp_bpf": seccomp_filter(m)}
    if (d / "upper").exists():
        spec["overlay"] = Snapshotter().overlay_options(m.chain, d / "upper", d / "work")
    elif m.config.storage_size:  # upper and work live in the machine's ext4 file, mounted at disk/
        spec["upper_disk"] = (str(d / "disk.ext4"), str(d / "disk"))  # the fd replaces the file before spawn
        spec["overlay"] = Snapshotter().overlay_options(m.chain, d / "disk/upper", d / "disk/work")
    else:
        spec["copy_root"] = str(d / "root")
    return spec


def _run_namespace(m: S.Machine, attached: bool, on_started: Any) -> tuple[int, str, int | None]:
    """Start the machine once and wait for it; returns (exit code, reason, signal)."""
    from taxiway.machines import namespace

    for mnt in m.config.mounts:
        if not os.path.exists(mnt.source):
            raise InvalidInput(f"host path {mnt.source} for -v does not exist", f"create it first (mkdir -p {mnt.source})")
    spec = _spec(m)
    cg = Cgroup(m.id)
    g = m.config.guest
    try:
        cg.create(g.memory, g.cpus, g.pids, cgroups.DEFAULT_PIDS)
    except OSError as e:
        cg.remove()
        raise TaxiwayError(f"the kernel refused the machine's limits ({e.strerror})",
                           "use a larger --memory (at least 6m) or a valid --cpus/--pids-limit") from None
    spec["device_cgroup"] = cg.has_devices()
    forwarders = None
    if m.config.ports:
        from taxiway.machines.ports import Forwarders, listen

        try:
            forwarders = Forwarders([(listen(p.host_port), p.port) for p in m.config.ports])
        except BaseException:
            cg.remove()
            raise
    fds_to_close: list[int] = []
    if spec.get("upper_disk"):
        disk, at = spec["upper_disk"]
        try:
            spec["upper_disk"] = (namespace.open_disk(disk), at)
        except OSError as e:
            if forwarders:
                forwarders.close()
            cg.remove()
            raise TaxiwayError(f"cannot mount machine {m.name}'s storage ({e.strerror})",
                               "check that the kernel has loop devices and ext4") from None
        fds_to_close.append(spec["upper_disk"][0])
    tty = m.config.tty and attached
    readers: dict[int, str] = {}
    master = None
    if tty:
        master, slave = os.openpty()
        stdio = (slave, slave, slave)
        fds_to_close.append(slave)
        spec["tty_fd"] = slave
        spec["tty_name"] = os.ttyname(slave)
        readers[master] = "stdout"
    else:
        outr, outw = os.pipe()
        errr, errw = os.pipe()
        if m.config.interactive and attached:
            stdin = 0
        else:
            stdin = os.open("/dev/null", os.O_RDONLY)
            fds_to_close.append(stdin)
        stdio = (stdin, outw, errw)
        fds_to_close += [outw, errw]
        readers[outr] = "stdout"
        readers[errr] = "stderr"
    try:
        pid, err = namespace.spawn(spec, [str(p / "cgroup.procs") for p in cg.paths()], stdio)
    finally:
        cgroups.stop_priming()
        for fd in fds_to_close:
            os.close(fd)
    if err or not pid:
        for fd in readers:
            os.close(fd)
        if pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if forwarders:
            forwarders.close()
        cg.remove()
        raise TaxiwayError(f"machine {m.name} could not start: {err.strip() or 'unknown error'}",
                           "check the image, the command and the options")
    m.pid = pid
    m.started = time.time()
    m.exit_code = m.reason = m.signal = m.error = None
    m.set_state("running", pid=pid)
    on_started(m)
    if forwarders:
        forwarders.start(pid)
    old_handlers = {}
    if attached:
        def forward(signum: int, _frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old_handlers[s] = signal.signal(s, forward)
    pump = _LogPump(m.dir / "log")
    echo = {"stdout": 1, "stderr": 2} if attached else {}
    term_state = None
    try:
        if tty and os.isatty(0):
            import termios
            import tty as _tty

            term_state = termios.tcgetattr(0)
            _tty.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop what was typed ahead
        watch = dict(readers)
        if tty:
            watch[0] = "stdin"
        while readers:
            try:
                ready, _, _ = select.select(list(watch), [], [])
            except InterruptedError:
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO on the pty master when the machine is gone
                    data = b""
                stream = watch[fd]
                if stream == "stdin":
                    if data and master is not None:
                        os.write(master, data)
                    else:
                        watch.pop(fd, None)
                    continue
                if not data:
                    watch.pop(fd, None)
                    readers.pop(fd, None)
                    os.close(fd)
                    continue
                pump.write(stream, data)
                if stream in echo:
                    with contextlib.suppress(OSError):
                        os.write(echo[stream], data)
        _, status = os.waitpid(pid, 0)
    finally:
        if term_state is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, term_state)
        pump.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if forwarders:
            forwarders.close()
    oom = cg.oom_kills() > 0
    cg.remove()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, ("oom-killed" if oom else "signalled"), sig
    code = os.WEXITSTATUS(status)
    if oom and code in (137, 1):
        return code, "oom-killed", 9
    if code > 128 and code - 128 < 65:
        return code, ("oom-killed" if oom else "signalled"), code - 128
    return code, "exited", None


# -- supervision ----------------------------------------------------------------------------


def _stop_requested(m: S.Machine) -> bool:
    return (m.dir / "stop-requested").exists()


def supervise(m: S.Machine, attached: bool, ready_w: int | None = None) -> int:
    """Run the machine until it exits for good (restart policy applied); returns its exit code."""
    with contextlib.suppress(OSError):
        from taxiway.machines import linux

        linux.prctl(PR_SET_CHILD_SUBREAPER, 1)
    m.supervisor = os.getpid()
    m.set_state("starting")

    def started(_m: S.Machine) -> None:
        nonlocal ready_w
        if ready_w is not None:
            os.write(ready_w, b"ok\n")
            os.close(ready_w)
            ready_w = None

    run_once = _run_namespace
    if m.runtime == "vm":
        from taxiway.machines import vm

        run_once = vm.run_once
    first = True
    try:
        while True:
            try:
                code, reason, sig = run_once(m, attached, started)
            except TaxiwayError as e:
                m.state, m.error, m.reason, m.exit_code, m.finished = "failed", str(e), "error", 127, time.time()
                m.pid = None
                m.save()
                m.event("failed", error=str(e))
                if first:
                    raise
                return 127
            first = False
            m.exit_code, m.reason, m.signal, m.finished = code, reason, sig, time.time()
            if _stop_requested(m):
                m.reason = "stopped" if reason != "oom-killed" else reason
            m.set_state("exited", exit_code=code, reason=m.reason)
            pol = m.config.restart
            if _stop_requested(m) or pol.policy == "no" or (pol.policy == "on-failure" and code == 0):
                break
            if pol.policy == "on-failure" and pol.max_retries and m.restarts >= pol.max_retries:
                break
            m.restarts += 1
            m.event("restart", attempt=m.restarts)
            time.sleep(min(10.0, 0.1 * 2 ** min(m.restarts, 7)))
            if _stop_requested(m):
                break
        return m.exit_code or 0
    finally:
        m.supervisor = None
        with contextlib.suppress(FileNotFoundError):
            m.save()
        if ready_w is not None:
            os.close(ready_w)


def run_attached(m: S.Machine) -> int:
    """Run in the foreground (``taxiway run`` without -d); --rm removes it afterwards."""
    try:
        code = supervise(m, attached=True)
    except BaseException:
        if m.config.auto_remove or m.state in ("failed", "starting"):
            destroy(m)
        raise
    if m.config.auto_remove:
        destroy(m)
    return code


def start_detached(m: S.Machine) -> None:
    """Start a supervisor in the background; returns once the machine runs (or raises its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                # supervise() closes the fd it is given once the machine runs (or on its way out):
                # keep our own copy, so a start failure can still be reported through the pipe
                supervise(m, attached=False, ready_w=os.dup(w))
            except TaxiwayError as e:
                with contextlib.suppress(OSError):
                    os.write(w, f"error:{e.message}\x00{e.hint or ''}".encode())
                if m.config.auto_remove or m.state == "failed":
                    destroy(m)
                os._exit(1)
            if m.config.auto_remove:
                destroy(m)
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            # An unexpected failure: say what it was (and keep the trace) instead of a bare "did not start".
            with contextlib.suppress(Exception):
                import traceback

                (m.dir / "supervisor-error").write_text(traceback.format_exc())
            with contextlib.suppress(Exception):
                os.write(w, f"error:machine {m.name} did not start: {type(e).__name__}: {e}\x00"
                            f"the trace is in {m.dir / 'supervisor-error'}".encode())
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    msg = b""
    while chunk := os.read(r, 4096):  # "ok" once it runs (the supervisor keeps its copy), else an error and EOF
        msg += chunk
        if msg.startswith(b"ok"):
            break
    os.close(r)
    if msg.startswith(b"ok"):
        return
    if msg.startswith(b"error:"):
        text, _, hint = msg[6:].decode(errors="replace").partition("\x00")
        raise TaxiwayError(text, hint or None)
    raise TaxiwayError(f"machine {m.name} did not start", f"see `taxiway machines inspect {m.name}`")


# -- lifecycle commands ----------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not S._alive(pid):
            return True
        time.sleep(0.02)
    return not S._alive(pid)


def _finish_orphan(m: S.Machine, reason: str = "lost") -> None:
    """Record the end of a machine whose supervisor is gone (kill -9), and clean its cgroup."""
    if m.runtime == "namespace":
        cg = Cgroup(m.id)
        oom = cg.oom_kills() > 0
        cg.remove()
        if oom:
            reason = "oom-killed"
    m.pid = None
    m.supervisor = None
    m.finished = m.finished or time.time()
    m.reason = m.reason or reason
    m.set_state("exited", reason=m.reason)


def stop(m: S.Machine, sig: int | None = None, timeout: float | None = None) -> S.Machine:
    """StopSignal (or ``sig``) to the machine's init, SIGKILL after ``timeout``; restarts are disabled."""
    if m.status() not in ("running", "starting", "stopping"):
        if m.state != m.status():
            _finish_orphan(m)
        return m
    (m.dir / "stop-requested").touch()
    sig = sig or C.parse_signal(m.config.stop_signal)
    timeout = m.config.stop_timeout if timeout is None else timeout
    m.event("stopping", signal=sig)
    pid = m.pid
    if pid and m.runtime == "vm":
        from taxiway.machines import vmagent

        # the guest agent delivers the signal to the main process; the guest powers off when it
        # exits. Without an agent to talk to, SIGTERM makes QEMU stop the guest at once.
        if not vmagent.signal_main(m, sig):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    elif pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if pid:
        if not _wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
    sup = m.supervisor
    if sup and _wait_gone(sup, 5):
        pass
    fresh = S.load(m.id) or m
    if fresh.state != "exited" or (fresh.supervisor and not S._alive(fresh.supervisor)):
        if fresh.supervisor is None or not S._alive(fresh.supervisor):
            _finish_orphan(fresh, "stopped")
    return S.load(m.id) or fresh


def start(m: S.Machine) -> None:
    """Start a stopped machine again, in the background."""
    if m.status() in ("running", "starting"):
        raise InvalidInput(f"machine {m.name} is already running", "stop it first")
    with contextlib.suppress(FileNotFoundError):
        (m.dir / "stop-requested").unlink()
    m.restarts = 0
    start_detached(m)


def destroy(m: S.Machine, force: bool = False) -> None:
    """Remove a machine: its processes (with ``force``), cgroup, writable layer, lease and record."""
    if m.status() in ("running", "starting", "stopping"):
        if not force:
            raise InvalidInput(f"machine {m.name} is running", f"stop it first, or `taxiway machines rm -f {m.name}`")
        (m.dir / "stop-requested").touch()
        if m.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
            _wait_gone(m.pid, 5)
        if m.supervisor and m.supervisor != os.getpid():
            _wait_gone(m.supervisor, 5)
    if m.runtime == "namespace":
        Cgroup(m.id).remove()
    else:
        from taxiway.machines import vm

        vm.cleanup(m)
    Snapshotter().release(m.id)
    S.trash(m.dir)


def wait(m: S.Machine, timeout: float | None = None) -> S.Machine:
    """Block until the machine has exited; returns the final record."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        cur = S.load(m.id)
        if cur is None:
            return m
        st = cur.status()
        if st in ("exited", "failed", "created"):
            if cur.state != st:
                _finish_orphan(cur)
                cur = S.load(m.id) or cur
            return cur
        if deadline is not None and time.monotonic() > deadline:
            raise TaxiwayError(f"machine {m.name} is still running after {timeout}s", "stop it, or wait longer")
        time.sleep(0.05)


def exec_in(m: S.Machine, argv: list[str], tty: bool = False, interactive: bool = False) -> int:
    """Run a command inside a running machine with its user, env and capabilities."""
    if m.status() != "running" or not m.pid:
        raise InvalidInput(f"machine {m.name} is not running", f"start it first: `taxiway machines start {m.name}`")
    if m.runtime == "vm":
        from taxiway.machines import vmagent

        return vmagent.exec_client(m, argv, tty, interactive)
    from taxiway.machines import namespace

    proc = dict(m.process, caps=_caps(m))
    return namespace.enter(m.pid, proc, argv, [str(p / "cgroup.procs") for p in Cgroup(m.id).paths()], tty,
                           seccomp_filter(m))


def read_logs(m: S.Machine, timestamps: bool = False, follow: bool = False, tail: int | None = None) -> None:
    """Print the machine's log (timestamps only if asked); ``tail``: only the last N lines first;
    ``follow`` keeps printing until it exits (across rotations of the log)."""
    import sys

    path = m.dir / "log"

    def emit(lines: list[bytes]) -> None:
        for line in lines:
            ts, _, rest = line.partition(b" ")
            stream, _, text = rest.partition(b" ")
            out = sys.stderr.buffer if stream == b"stderr" else sys.stdout.buffer
            out.write((ts + b" " + text if timestamps else text) + b"\n")
        sys.stdout.buffer.flush()
        sys.stderr.buffer.flush()

    def whole_lines(data: bytes, carry: bytes) -> tuple[list[bytes], bytes]:
        data = carry + data
        end = data.rfind(b"\n") + 1
        return data[:end].splitlines(), data[end:]

    def open_log(p: Path) -> Any:
        try:
            return open(p, "rb")
        except FileNotFoundError:
            return None

    old = open_log(path.with_name("log.1"))
    cur = open_log(path)  # held open while following: its inode can't be reused by a later rotation
    lines: list[bytes] = []
    carry = b""
    if old is not None:
        with old:
            lines, _ = whole_lines(old.read(), b"")
    if cur is not None:
        more, carry = whole_lines(cur.read(), b"")
        lines += more
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    emit(lines)
    last = not follow
    try:
        while not last:
            cur_m = S.load(m.id)
            if cur_m is None or cur_m.status() in ("exited", "failed", "created"):
                last = True  # one more read below, then stop
            try:
                now = os.stat(path).st_ino
            except FileNotFoundError:
                now = None
            if cur is None:
                cur = open_log(path)
            elif now is not None and now != os.fstat(cur.fileno()).st_ino:
                # rotated: finish the file we hold (renamed or even unlinked, it is still readable), then
                # log.1 if it is a file we never saw (two rotations between reads), then the new log
                more, carry = whole_lines(cur.read(), carry)
                emit(more)
                held = os.fstat(cur.fileno()).st_ino
                cur.close()
                mid = open_log(path.with_name("log.1"))
                if mid is not None:
                    with mid:
                        if os.fstat(mid.fileno()).st_ino not in (held, now):
                            more, carry = whole_lines(mid.read(), b"")
                            emit(more)
                carry = b""
                cur = open_log(path)
            if cur is not None:
                more, carry = whole_lines(cur.read(), carry)
                emit(more)
            if not last:
                time.sleep(0.1)
    finally:
        if cur is not None:
            cur.close()


# -- garbage collection ----------------------------------------------------------------------


def _mounts_under(prefix: str) -> list[str]:
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def gc() -> list[str]:
    """Clean what a crash (kill -9 of anything) left: dead machines, stale cgroups, mounts, half-made snapshots."""
    from taxiway.machines import cgroups
    from taxiway.machines import linux as L
    from taxiway.paths import home

    done = []
    for mp in sorted(_mounts_under(str(home())), key=len, reverse=True):
        with contextlib.suppress(OSError):
            L.umount(mp, L.MNT_DETACH)
            done.append(f"mount {mp}")
    ms = S.all_machines()
    for m in ms:
        if m.state in ("running", "starting", "stopping") and m.status() == "exited":
            _finish_orphan(m)
            done.append(f"machine {m.name}")
        elif m.state == "failed" and m.runtime == "namespace" and Cgroup(m.id).exists():
            Cgroup(m.id).remove()
    live = {m.id for m in ms}
    for mid in cgroups.stale(live):
        with contextlib.suppress(OSError):
            Cgroup(mid).remove()
            done.append(f"cgroup {mid}")
    S.empty_trash()
    for d in S.machines_dir().iterdir():  # a machine dir whose record was never written
        if d.is_dir() and not d.name.startswith(".") and d.name not in live and not (d / "machine.json").exists() and time.time() - d.stat().st_mtime > 60:
            S.remove_dir(d)
            done.append(f"dir {d.name}")
    done += Snapshotter().cleanup(live_owners=live | _vm_owners())
    return done


def _vm_owners() -> set[str]:
    try:
        from taxiway.machines import vm

        return vm.lease_owners()
    except Exception:
        return set()
