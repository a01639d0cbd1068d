"""What a build leaves behind when the process running it dies (``kill -9``), and who removes it.

A build works in ``$TAXIWAY_HOME/build/tmp/build-*``; the folder's ``owner`` file names
the process running it (pid and start time, so a reused pid is not mistaken for it),
and each step's cgroup is named after the folder (``build-XXXX-sN``, under this home's
``...-builds`` parent). Two things clean up after a build that died:

- a watcher started with each build, in its own session (a signal to the build's
  process group does not reach it), holds the read end of a pipe the build never
  writes to. When the pipe closes, the build has either finished (its folder is gone)
  or died: then the watcher kills the steps still running, removes their cgroups and
  the folder, so nothing keeps writing into the cache after ``taxiway build`` is gone;
- every build first sweeps the folders (and cgroups) of builds whose owner is gone,
  in case a watcher was killed too.

``python -m taxiway.builder.reaper WORK`` is the watcher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from taxiway.process import pid_alive, start_time

OWNER = "owner"
_LEGACY_AGE = 24 * 3600  # folders older builds left without an owner file


def claim(work: Path) -> None:
    """Record this process as the owner of the build folder ``work``."""
    from taxiway.fsutil import atomic_write  # here: the watcher (python -m ...reaper) never writes

    # Renamed into place: another build's sweep must never read a half-written (empty) owner file
    # and take this live build for a dead one. No fsync: after a power cut no build is running.
    with atomic_write(work / OWNER, binary=False, fsync=False) as f:
        f.write(f"{os.getpid()} {start_time(os.getpid())}\n")


def _owner_alive(work: Path) -> bool | None:
    """Whether the build that owns ``work`` still runs (None: no owner recorded)."""
    try:
        pid, start = (work / OWNER).read_text().split()
        return pid_alive(int(pid), start)  # the same start time: not another process that got the pid
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False


def step_cgroup_name(work: Path, step: int) -> str:
    return f"{work.name}-s{step}"


def builds_parent() -> str:
    """The cgroup parent of this home's build steps (apart from its machines, so `machines gc` never sees them)."""
    from taxiway.machines.cgroups import parent_name

    return parent_name() + "-builds"


def reap(work: Path) -> None:
    """Kill the steps of the build in ``work``, remove their cgroups, then the folder."""
    from taxiway.machines.cgroups import ROOT, V1_CONTROLLERS, V1_OTHERS, Cgroup, is_v2

    parent = builds_parent()
    bases = [ROOT / parent] if is_v2() else [ROOT / c / parent for c in V1_CONTROLLERS + V1_OTHERS]
    names: set[str] = set()
    for b in bases:
        with contextlib.suppress(OSError):
            names.update(p.name for p in b.iterdir() if p.is_dir() and p.name.startswith(work.name + "-s"))
    for name in sorted(names):
        cg = Cgroup(name, parent=parent)
        cg.kill()
        with contextlib.suppress(OSError):
            cg.remove()
    shutil.rmtree(work, ignore_errors=True)


def sweep(tmp_root: Path) -> int:
    """Reap the build folders under ``tmp_root`` whose owner is gone. Returns how many."""
    n = 0
    with contextlib.suppress(FileNotFoundError):
        for work in tmp_root.iterdir():
            if not work.is_dir() or not work.name.startswith("build-"):
                continue
            alive = _owner_alive(work)
            if alive is None:
                with contextlib.suppress(OSError):
                    alive = time.time() - work.stat().st_mtime < _LEGACY_AGE
            if not alive:
                reap(work)
                n += 1
    return n


@contextlib.contextmanager
def watched(work: Path) -> Iterator[None]:
    """Run the ``with`` block with a watcher that reaps ``work`` if this process dies first."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "taxiway.builder.reaper", str(work)], stdin=r,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(r)
    try:
        yield
    finally:
        os.close(w)  # the watcher sees EOF: the folder is gone by now on a normal exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)


def _watch(work: Path) -> None:
    """Wait for the build to close our stdin; reap its folder if it is still there."""
    while os.read(0, 4096):
        pass
    if work.exists():
        reap(work)


if __name__ == "__main__":
    _watch(Path(sys.argv[1]))
