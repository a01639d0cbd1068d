"""Per-machine cgroups: limits on memory, cpu and pids, and a device policy, on cgroup v2 or v1.

A pure v2 host has ``/sys/fs/cgroup/cgroup.controllers``; otherwise (v1, or
hybrid with an empty v2 mount as on these machines) each controller has its
own hierarchy under ``/sys/fs/cgroup/<controller>``. Every machine gets a
``taxiway-<home>/<id>`` group in *every* hierarchy mounted there (freezer,
cpuset, devices, name=systemd, the hybrid's unified one...), even without
limits: its processes can be counted, killed and accounted for as one unit,
and the cgroup namespace it unshares is rooted at its own groups everywhere,
never at the host's. The device policy (:mod:`taxiway.machines.devices`) is the
v1 ``devices`` group's rules, or on v2 an eBPF program attached to the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path(os.environ.get("TAXIWAY_CGROUP_ROOT", "/sys/fs/cgroup"))


def parent_name() -> str:
    """One parent group per $TAXIWAY_HOME, so two homes never touch each other's machines.

    ``taxiway-`` + sha256(home)[:10]. Importing hashlib loads OpenSSL (~5 ms of a ~60 ms warm
    ``taxiway run``), so the name is kept in ``<home>/machines/.cgroup-parent`` beside the home
    path it was computed for, and recomputed only when that path differs (a moved home).
    """
    from taxiway.paths import home

    h = str(home())
    cache = os.path.join(h, "machines", ".cgroup-parent")
    try:
        with open(cache) as f:
            path, _, name = f.read().partition("\n")
        if path == h and name.startswith("taxiway-"):
            return name
    except (OSError, ValueError):
        pass
    import hashlib

    name = "taxiway-" + hashlib.sha256(h.encode()).hexdigest()[:10]
    try:
        from taxiway.fsutil import atomic_write

        # no fsync: the cache is checked when read (its path and name) and simply made again
        with atomic_write(cache, 0o644, binary=False, fsync=False) as f:
            f.write(f"{h}\n{name}")
    except OSError:
        pass
    return name


V1_CONTROLLERS = ("memory", "cpu", "pids")
# Every other v1 hierarchy a host may mount under ROOT: a machine gets a group in each one present.
V1_OTHERS = ("devices", "freezer", "cpuset", "blkio", "cpuacct", "net_cls", "net_prio", "net_cls,net_prio",
             "perf_event", "hugetlb", "rdma", "misc", "systemd", "unified")
CFS_PERIOD = 100_000
DEFAULT_PIDS = 2048  # podman's default; --pids-limit changes it


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _write(p: Path, value: str) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Cgroup:
    """The cgroup(s) of one machine."""

    def __init__(self, machine_id: str, parent: str | None = None):
        self.id = machine_id
        self.device_program = False  # v2: the device program was attached by create()
        self.v2 = is_v2()
        self.parent = parent or parent_name()
        if self.v2:
            self.dirs = {c: ROOT / self.parent / machine_id for c in V1_CONTROLLERS}
        else:
            self.dirs = {}
            for c in V1_CONTROLLERS + V1_OTHERS:
                base = ROOT / c
                if base.is_dir() and not base.is_symlink():  # cpu -> cpu,cpuacct style links: the real dir is listed
                    self.dirs[c] = base / self.parent / machine_id

    def has_devices(self) -> bool:
        """True when create() put the device policy in force (a v1 devices group, or the v2 program)."""
        return self.device_program if self.v2 else "devices" in self.dirs

    def paths(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def exists(self) -> bool:
        return any(p.exists() for p in self.paths())

    def create(self, memory: int | None = None, cpus: float | None = None, pids: int | None = None,
               default_pids: int | None = None) -> None:
        """Make the groups and set the limits (an OSError names the limit the kernel refused).

        ``default_pids`` applies when ``pids`` is None and the pids controller is there.
        """
        if self.v2:
            parent = ROOT / self.parent
            parent.mkdir(exist_ok=True)
            avail = (ROOT / "cgroup.controllers").read_text().split()
            want = " ".join(f"+{c}" for c in V1_CONTROLLERS if c in avail)
            for p in (ROOT, parent):
                with contextlib.suppress(OSError):
                    _write(p / "cgroup.subtree_control", want)
        for d in self.paths():
            for _ in range(3):  # a concurrent remove() may drop the empty parent in between
                try:
                    if "cpuset" in self.dirs and d == self.dirs["cpuset"]:
                        self._mkdir_cpuset(d)
                    else:
                        d.mkdir(parents=True, exist_ok=True)
                    break
                except FileNotFoundError:
                    continue
        from taxiway.machines import devices

        if self.v2:
            try:
                devices.attach(str(self.dirs["pids"]))
                self.device_program = True
            except OSError:  # a kernel without cgroup BPF: the runtime mounts the root nodev instead
                self.device_program = False
        elif "devices" in self.dirs:
            dev = self.dirs["devices"]
            _write(dev / "devices.deny", "a")
            for rule in devices.v1_lines():
                _write(dev / "devices.allow", rule)
        if memory:
            if self.v2:
                _write(self.dirs["memory"] / "memory.max", str(memory))
                with contextlib.suppress(OSError):
                    _write(self.dirs["memory"] / "memory.swap.max", "0")
            else:
                _write(self.dirs["memory"] / "memory.limit_in_bytes", str(memory))
                with contextlib.suppress(OSError):
                    _write(self.dirs["memory"] / "memory.memsw.limit_in_bytes", str(memory))
                with contextlib.suppress(OSError):
                    _write(self.dirs["memory"] / "memory.swappiness", "0")
        if cpus:
            quota = max(1000, int(cpus * CFS_PERIOD))
            if self.v2:
                _write(self.dirs["cpu"] / "cpu.max", f"{quota} {CFS_PERIOD}")
            elif "cpu" in self.dirs:
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD))
                _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if pids:
            _write(self.dirs["pids"] / "pids.max", str(pids))
        elif default_pids and "pids" in self.dirs and (self.dirs["pids"] / "pids.max").exists():
            _write(self.dirs["pids"] / "pids.max", str(default_pids))

    @staticmethod
    def _mkdir_cpuset(d: Path) -> None:
        """A v1 cpuset group takes no task until its cpus and mems are set: copy them from above."""
        for g in (d.parent, d):
            if g.is_dir():
                continue
            g.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (g / f).read_text().strip():
                    _write(g / f, (g.parent / f).read_text().strip())

    def add(self, pid: int) -> None:
        """Move ``pid`` into every group of this machine."""
        for p in self.paths():
            _write(p / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        out: set[int] = set()
        for p in self.paths():
            with contextlib.suppress(OSError):
                out.update(int(x) for x in (p / "cgroup.procs").read_text().split())
        return sorted(out)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this machine."""
        d = self.dirs.get("memory")
        if d is None:
            return 0
        try:
            text = (d / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def memory_peak(self) -> int | None:
        d = self.dirs.get("memory")
        if d is None:
            return None
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                return int((d / name).read_text())
        return None

    def kill(self) -> None:
        """SIGKILL everything left in the machine."""
        if self.v2 and (self.dirs["pids"] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs["pids"] / "cgroup.kill", "1")
                return
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the groups (waiting for exiting tasks)."""
        deadline = time.monotonic() + timeout
        for p in self.paths():
            while p.exists():
                try:
                    p.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    self.kill()
                    time.sleep(0.01)
            with contextlib.suppress(OSError):
                p.parent.rmdir()  # the per-home parent, once empty


def stale(live_ids: set[str]) -> list[str]:
    """Machine ids (of this home) that still have a cgroup but no machine record."""
    out: set[str] = set()
    parent = parent_name()
    bases = [ROOT / parent] if is_v2() else [ROOT / c / parent for c in V1_CONTROLLERS + V1_OTHERS]
    for b in bases:
        with contextlib.suppress(OSError):
            out.update(p.name for p in b.iterdir() if p.is_dir() and p.name not in live_ids)
    return sorted(out)


# -- the attach fast path ------------------------------------------------------------------

_primer: dict = {"on": False}


def _own_procs_file() -> str | None:
    """cgroup.procs of the cgroup this process is in (v1 pids hierarchy, else the v2 one)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    except OSError:
        return None
    for _hid, ctrl, path in lines:
        if ctrl == "pids":
            return f"{ROOT}/pids{path.rstrip('/')}/cgroup.procs"
    for hid, ctrl, path in lines:
        if hid == "0" and ctrl == "":
            return f"{ROOT}{path.rstrip('/')}/cgroup.procs"
    return None


def prime_attach(interval: float = 0.004, limit: float = 0.2) -> None:
    """Keep the kernel's cgroup-attach lock on its fast path while a machine starts.

    The first move of a task into a cgroup waits for an RCU grace period (10-25 ms
    here: percpu_down_write on cgroup_threadgroup_rwsem); a move within ~10 ms of an
    earlier one does not. So, from early in ``taxiway run``, a thread moves this
    process into the cgroup it is already in (a no-op) every few ms: the grace period
    passes while we prepare the machine, and its real moves are then fast. Best
    effort: any error, :func:`stop_priming` or ``limit`` seconds end it.
    """
    if _primer["on"]:
        return
    path = _own_procs_file()
    if path is None:
        return
    import threading

    _primer["on"] = True
    me = str(os.getpid()).encode()

    def loop() -> None:
        end = time.monotonic() + limit
        try:
            while _primer["on"] and time.monotonic() < end:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, me)
                finally:
                    os.close(fd)
                time.sleep(interval)
        except Exception:  # noqa: BLE001 - only an optimisation
            pass
        _primer["on"] = False

    try:
        threading.Thread(target=loop, name="cgroup-primer", daemon=True).start()
    except RuntimeError:
        _primer["on"] = False


def stop_priming() -> None:
    _primer["on"] = False
