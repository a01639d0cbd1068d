"""The namespace runtime: a machine as a process tree in its own namespaces and cgroups.

Implements :class:`taxiway.machines.interface.Runtime`. The low-level work
(PID 1's setup between fork and exec, ``machines exec``'s entry) is in
:mod:`taxiway.machines.namespace`; this module is one machine's life around it:
its writable layer at create, its cgroups, stdio and log for each run.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.machines import cgroups
from taxiway.machines import state as S
from taxiway.machines.cgroups import Cgroup
from taxiway.machines.dirs import machines_dir
from taxiway.machines.logs import LogPump
from taxiway.machines.procs import kill_after
from taxiway.machines.stdio import forward_to, handling, null_input, raw_terminal

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from taxiway.machines.config import MachineConfig
    from taxiway.machines.interface import Exit
    from taxiway.machines.snapshots import Snapshotter


def caps(m: S.Machine) -> list[str]:
    """The machine's capability set."""
    from taxiway.machines import linux

    c = m.process.get("caps")
    return list(linux.DEFAULT_CAPS) if c is None else c  # a record from before caps were kept: as it ran


def seccomp_filter(m: S.Machine) -> bytes | None:
    """The machine's seccomp program (classic BPF), or None with ``seccomp=unconfined``."""
    setting = m.config.seccomp
    if setting == "unconfined":
        return None
    from taxiway.machines import seccomp

    return seccomp.filter_for(setting if isinstance(setting, dict) else None, caps(m),
                              str(machines_dir() / ".seccomp"))


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


def _open_volume(image: str) -> int:
    """``namespace.open_volume``, waiting a little for a loop device the kernel is still clearing
    (the volume's previous machine just died: a redeploy's new machine starts right after)."""
    from taxiway.machines import namespace

    deadline = time.monotonic() + 5
    while True:
        try:
            return namespace.open_volume(image)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TaxiwayError(f"volume {os.path.basename(image).removesuffix('.img')} is in use by another machine",
                                   "a volume is mounted by one machine at a time: stop or destroy the other") from None
            time.sleep(0.1)
        except OSError as e:
            raise TaxiwayError(f"cannot mount volume {os.path.basename(image).removesuffix('.img')} ({e.strerror})",
                               "check that the kernel has loop devices and ext4 (e2fsck the file if it is damaged)"
                               ) from None


class _Run:
    """What one run holds until it ends: PID 1, its cgroup, output fds, forwarders."""

    def __init__(self, pid: int, cg: Cgroup, readers: dict[int, str], master: int | None, tty: bool,
                 forwarders: Any):
        self.pid, self.cg, self.readers, self.master, self.tty, self.forwarders = \
            pid, cg, readers, master, tty, forwarders


class NamespaceRuntime:
    """A machine as a process tree: pid, mount, uts, ipc, net and cgroup namespaces, cgroups, seccomp."""

    kind = "namespace"

    def __init__(self, m: S.Machine):
        self.m = m
        self.run: _Run | None = None
        self.attached = False

    # -- create

    @classmethod
    def check(cls, cfg: MachineConfig) -> dict[str, Any]:
        from taxiway.machines import linux
        from taxiway.machines.snapshots import overlay_supported

        linux.machine_caps(cfg.cap_add, cfg.cap_drop)  # an unknown capability is refused here
        if cfg.storage_size and not overlay_supported():
            raise InvalidInput("--storage-size needs overlayfs (this host copies layers instead)", "drop --storage-size")
        return {}

    def prepare(self, snap: Snapshotter) -> None:
        from taxiway.machines import linux

        m = self.m
        d = m.dir
        m.process["caps"] = linux.machine_caps(m.config.cap_add, m.config.cap_drop)
        if m.config.storage_size:
            _make_disk(d, m.config.storage_size)
        elif snap.overlay:
            (d / "upper").mkdir()
            (d / "work").mkdir()
        else:
            snap.copy_root(m.chain, d / "root")

    # -- one run (in the supervisor)

    def _spec(self) -> dict[str, Any]:
        from taxiway.machines.namespace import etc_files
        from taxiway.machines.snapshots import Snapshotter

        m = self.m
        d = m.dir
        p = m.process
        shared = machines_dir()  # mount points shared by all machines: each mounts in its own namespace
        for mp in (".mnt", ".etc"):
            if not (shared / mp).exists():
                (shared / mp).mkdir(exist_ok=True)
        spec = {"rootfs": str(shared / ".mnt"), "etc_dir": str(shared / ".etc"), "net": m.config.net,
                "argv": p["argv"], "env": p["env"], "uid": p["uid"], "gid": p["gid"], "groups": p["groups"],
                "workdir": p["workdir"], "hostname": p["hostname"], "caps": caps(m),
                "mounts": [vars(x) for x in m.config.mounts], "etc": etc_files(p["hostname"], m.config.net, m.config.dns),
                "seccomp_bpf": seccomp_filter(m)}
        if (d / "upper").exists():
            spec["overlay"] = Snapshotter().overlay_options(m.chain, d / "upper", d / "work")
        elif m.config.storage_size:  # upper and work live in the machine's ext4 file, mounted at disk/
            spec["upper_disk"] = (str(d / "disk.ext4"), str(d / "disk"))  # the fd replaces the file before spawn
            spec["overlay"] = Snapshotter().overlay_options(m.chain, d / "disk/upper", d / "disk/work")
        else:
            spec["copy_root"] = str(d / "root")
        return spec

    def start(self, attached: bool, on_started: Callable[[], None]) -> None:
        from taxiway.machines import namespace

        m = self.m
        for mnt in m.config.mounts:
            if not os.path.exists(mnt.source):
                raise InvalidInput(f"host path {mnt.source} for -v does not exist",
                                   f"create it first (mkdir -p {mnt.source})")
        spec = self._spec()
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
        try:
            mounts = []
            for x in spec["mounts"]:
                if x.get("type") == "ext4-image":
                    x = {**x, "fd": _open_volume(x["source"])}
                    fds_to_close.append(x["fd"])
                mounts.append(x)
            spec["mounts"] = mounts
        except BaseException:
            for fd in fds_to_close:
                os.close(fd)
            if forwarders:
                forwarders.close()
            cg.remove()
            raise
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
                stdin = null_input()
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
        self.run = _Run(pid, cg, readers, master, tty, forwarders)
        self.attached = attached
        m.pid = pid
        m.started = time.time()
        m.exit_code = m.reason = m.signal = m.error = None
        m.set_state("running", pid=pid)
        on_started()
        if forwarders:
            forwarders.start(pid)

    def wait(self) -> Exit:
        run = self.run
        assert run is not None, "wait() before start()"
        self.run = None
        readers = run.readers
        pump = LogPump(self.m.dir / "log")
        echo = {"stdout": 1, "stderr": 2} if self.attached else {}
        try:
            with handling(forward_to(run.pid)) if self.attached else contextlib.nullcontext(), \
                    raw_terminal(0, run.tty):
                watch = dict(readers)
                if run.tty:
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
                            if data and run.master is not None:
                                os.write(run.master, data)
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
                _, status = os.waitpid(run.pid, 0)
        finally:
            pump.close()
            if run.forwarders:
                run.forwarders.close()
        oom = run.cg.oom_kills() > 0
        run.cg.remove()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return 128 + sig, ("oom-killed" if oom else "signalled"), sig
        code = os.WEXITSTATUS(status)
        if oom and code in (137, 1):
            return code, "oom-killed", 9
        if code > 128 and code - 128 < 65:
            return code, ("oom-killed" if oom else "signalled"), code - 128
        return code, "exited", None

    # -- from any process

    def signal(self, sig: int) -> bool:
        if not self.m.pid:
            return False
        try:
            os.kill(self.m.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, sig: int, timeout: float) -> None:
        pid = self.m.pid
        if pid and self.signal(sig):
            kill_after(pid, timeout)

    def exec(self, argv: list[str], tty: bool, interactive: bool) -> int:
        from taxiway.machines import namespace

        m = self.m
        proc = dict(m.process, caps=caps(m))
        return namespace.enter(m.pid, proc, argv, [str(p / "cgroup.procs") for p in Cgroup(m.id).paths()], tty,
                               seccomp_filter(m))

    def events(self) -> list[dict[str, Any]]:
        return self.m.events()

    def cleanup(self) -> str | None:
        cg = Cgroup(self.m.id)
        oom = cg.oom_kills() > 0
        cg.remove()
        return "oom-killed" if oom else None
