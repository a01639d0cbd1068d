"""The machines API: create, run, supervise, stop, start, remove, exec, wait, logs, gc.

Runtime-neutral: each machine's runtime (:func:`runtime_for`: the namespace
runtime or the micro-VM runtime, both implementing
:class:`taxiway.machines.interface.Runtime`) does the work that differs.
State changes are written to the machine's ``events.jsonl`` as they happen,
for the platform to watch. The same names are exported by
:mod:`taxiway.machines`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.machines import config as C
from taxiway.machines import state as S
from taxiway.machines.config import MachineConfig
from taxiway.machines.logs import read_logs
from taxiway.machines.procs import pid_alive, wait_gone
from taxiway.machines.snapshots import Snapshotter

if TYPE_CHECKING:
    from typing import Any

    from taxiway.machines.interface import Runtime

__all__ = ["MachineConfig", "create", "supervise", "run_attached", "start_detached", "stop", "start", "destroy",
           "wait", "exec_in", "read_logs", "gc", "runtime_for"]

PR_SET_CHILD_SUBREAPER = 36
ISOLATIONS = ("namespace", "vm")


def _runtime_class(kind: str) -> Any:
    if kind == "vm":
        from taxiway.machines.vm import VMRuntime

        return VMRuntime
    from taxiway.machines.namespace_runtime import NamespaceRuntime

    return NamespaceRuntime


def runtime_for(m: S.Machine) -> Runtime:
    """The runtime that runs ``m`` (by its record's ``runtime``: namespace or vm)."""
    return _runtime_class(m.runtime)(m)


# -- create -------------------------------------------------------------------------------


def create(cfg: MachineConfig, name: str | None = None, progress: Any = None) -> S.Machine:
    """Validate ``cfg`` against the image, prepare its snapshot and record the machine (not started)."""
    if os.geteuid() != 0:
        raise TaxiwayError("running machines needs root (namespaces, cgroups and mounts)",
                           "run taxiway as root, e.g. with sudo")
    if name:
        S.valid_name(name)
        if S.name_taken(name):
            raise InvalidInput(f"a machine named {name!r} already exists",
                               f"remove it (`taxiway machines rm -f {name}`) or pick another --name")
    if cfg.net not in ("none", "host", "private") and not cfg.net.startswith("/"):
        raise InvalidInput(f"invalid network {cfg.net!r}",
                           "use --net none, host, private or the path of a network namespace file")
    if cfg.net.startswith("/") and cfg.isolation == "vm" and not cfg.private_ip:
        raise InvalidInput("a micro-VM joins a network namespace file only with the address it takes over",
                           "set private_ip (the platform's agent does), or use --net private")
    if cfg.ports and cfg.net == "none":
        raise InvalidInput("-p needs a network", "use --net private (the default) or --net host")
    if cfg.hostname is not None:
        C.check_hostname(cfg.hostname)
    for mnt in cfg.mounts:
        C.check_volume_target(mnt.target)
        if mnt.type not in C.MOUNT_TYPES:
            raise InvalidInput(f"invalid mount type {mnt.type!r}", "use bind or ext4-image")
        if mnt.type == "ext4-image" and cfg.isolation != "namespace":  # virtiofsd shares directories
            raise InvalidInput("an ext4-image mount is for namespace machines", "mount a directory into a micro-VM")
    if cfg.storage_size and cfg.isolation != "namespace":
        raise InvalidInput("--storage-size is for namespace machines", "drop it, or use --isolation namespace")
    if cfg.isolation not in ISOLATIONS:
        raise InvalidInput(f"invalid isolation {cfg.isolation!r}", "use --isolation namespace or vm")
    from taxiway.machines import images, process

    rt_class = _runtime_class(cfg.isolation)
    extra = rt_class.check(cfg)  # cheap refusals before the image is read
    image = images.get_image(cfg.image, progress)
    snap = Snapshotter()
    snap.cleanup()
    mid = S.new_id()
    ps = process.spec(cfg, image, snap, mid)
    m = S.Machine(id=mid, name=name or S.new_name(), config=cfg, image_digest=image.digest(), chain=ps.chain,
                  command=ps.argv, process=ps.process, runtime=rt_class.kind, **extra)
    d = m.dir
    d.mkdir()
    try:  # the record (with its chain) is the machine's lease on its snapshots
        rt_class(m).prepare(snap)
        m.save()
        m.event("created", image=cfg.image, **extra)
    except BaseException:
        S.remove_dir(d)
        raise
    return m


# -- supervision ----------------------------------------------------------------------------


def supervise(m: S.Machine, attached: bool, ready_w: int | None = None) -> int:
    """Run the machine until it exits for good (restart policy applied); returns its exit code."""
    with contextlib.suppress(OSError):
        from taxiway.machines import linux

        linux.prctl(PR_SET_CHILD_SUBREAPER, 1)
    m.supervisor = os.getpid()
    m.set_state("starting")

    def started() -> None:
        nonlocal ready_w
        if ready_w is not None:
            os.write(ready_w, b"ok\n")
            os.close(ready_w)
            ready_w = None

    rt = runtime_for(m)
    first = True
    try:
        while True:
            try:
                rt.start(attached, started)
                code, reason, sig = rt.wait()
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
            if m.stop_requested():
                m.reason = "stopped" if reason != "oom-killed" else reason
            m.set_state("exited", exit_code=code, reason=m.reason)
            pol = m.config.restart
            if m.stop_requested() or pol.policy == "no" or (pol.policy == "on-failure" and code == 0):
                break
            if pol.policy == "on-failure" and pol.max_retries and m.restarts >= pol.max_retries:
                break
            m.restarts += 1
            m.event("restart", attempt=m.restarts)
            time.sleep(min(10.0, 0.1 * 2 ** min(m.restarts, 7)))
            if m.stop_requested():
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
            from taxiway.machines.stdio import detach_stdio

            detach_stdio()
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


def _finish_orphan(m: S.Machine, reason: str = "lost") -> None:
    """Record the end of a machine whose supervisor is gone (kill -9), and free what its run held."""
    reason = runtime_for(m).cleanup() or reason
    m.pid = None
    m.supervisor = None
    m.finished = m.finished or time.time()
    m.reason = m.reason or reason
    m.set_state("exited", reason=m.reason)


def stop(m: S.Machine, sig: int | None = None, timeout: float | None = None) -> S.Machine:
    """StopSignal (or ``sig``) to the machine's main process, SIGKILL after ``timeout``; restarts are disabled."""
    if m.status() not in ("running", "starting", "stopping"):
        if m.state != m.status():
            _finish_orphan(m)
        return m
    m.request_stop()
    sig = sig or C.parse_signal(m.config.stop_signal)
    timeout = m.config.stop_timeout if timeout is None else timeout
    m.event("stopping", signal=sig)
    runtime_for(m).stop(sig, timeout)
    if m.supervisor:
        wait_gone(m.supervisor, 5)
    fresh = S.load(m.id) or m
    if fresh.state != "exited" or (fresh.supervisor and not pid_alive(fresh.supervisor)):
        if fresh.supervisor is None or not pid_alive(fresh.supervisor):
            _finish_orphan(fresh, "stopped")
    return S.load(m.id) or fresh


def start(m: S.Machine) -> None:
    """Start a stopped machine again, in the background."""
    if m.status() in ("running", "starting"):
        raise InvalidInput(f"machine {m.name} is already running", "stop it first")
    m.clear_stop()
    m.restarts = 0
    start_detached(m)


def destroy(m: S.Machine, force: bool = False) -> None:
    """Remove a machine: its processes (with ``force``), cgroup, writable layer, lease and record."""
    if m.status() in ("running", "starting", "stopping"):
        if not force:
            raise InvalidInput(f"machine {m.name} is running",
                               f"stop it first, or `taxiway machines rm -f {m.name}`")
        m.request_stop()
        if m.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
            wait_gone(m.pid, 5)
        if m.supervisor and m.supervisor != os.getpid():
            wait_gone(m.supervisor, 5)
    runtime_for(m).cleanup()
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
    """Run a command inside a running machine with its user, env and confinement; returns its exit code."""
    if m.status() != "running" or not m.pid:
        raise InvalidInput(f"machine {m.name} is not running", f"start it first: `taxiway machines start {m.name}`")
    return runtime_for(m).exec(argv, tty, interactive)


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
    from taxiway.machines.cgroups import Cgroup
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
        if d.is_dir() and not d.name.startswith(".") and d.name not in live and \
                not (d / "machine.json").exists() and time.time() - d.stat().st_mtime > 60:
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
