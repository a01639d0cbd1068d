"""What a machine runs: its image's config and the user's options turned into a process spec.

One path for both runtimes (the namespace runtime and the micro-VM runtime
used to repeat it, and had drifted): the command, environment, user (looked
up in the image's own /etc/passwd and /etc/group), working directory and
hostname, the stop signal the image asks for, and the snapshot chain.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput
from taxiway.machines import config as C

if TYPE_CHECKING:
    from typing import Any

    from taxiway.machines.config import MachineConfig
    from taxiway.machines.snapshots import Snapshotter


def root_file(snap: Snapshotter, chain: list[str], rel: str) -> str | None:
    """A file of the image's merged root (``rel``, e.g. ``etc/passwd``), read from its layers, top first.

    Only a file that really is inside the snapshots: an image's symlink (``etc/passwd ->
    /etc/shadow``, or ``etc -> /etc``) is followed on the host here, so where it leads out of
    the snapshot cache the image has no such file, and the host's is never read.
    """
    inside = os.path.realpath(snap.layers) + "/"
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
        real = os.path.realpath(p)
        if not real.startswith(inside):
            return None
        try:
            with open(real, errors="replace") as f:
                return f.read()
        except OSError:
            return None
    return None


class Spec:
    """A machine's image, snapshot chain and process, ready for a record."""

    def __init__(self, image: Any, chain: list[str], argv: list[str], process: dict[str, Any]):
        self.image, self.chain, self.argv, self.process = image, chain, argv, process


def spec(cfg: MachineConfig, image: Any, snap: Snapshotter, machine_id: str) -> Spec:
    """Unpack ``image``'s layers (once per layer) and derive the process to run.

    Sets ``cfg.stop_signal`` from the image's StopSignal when the user gave none.
    The process dict: argv, env, uid, gid, groups, workdir, hostname.
    """
    icfg = image.config()
    argv = C.command(icfg, cfg.cmd, cfg.entrypoint)
    chain = snap.prepare(image)
    if not chain:
        raise InvalidInput(f"{cfg.image} has no layers", "this image has no root filesystem to run")
    ic = icfg.get("config") or {}
    user = cfg.user if cfg.user is not None else (ic.get("User") or None)
    uid, gid, groups, home = C.resolve_user(user, root_file(snap, chain, "etc/passwd"),
                                            root_file(snap, chain, "etc/group"), cfg.image)
    hostname = cfg.hostname or machine_id[:12]
    if cfg.stop_signal is None and ic.get("StopSignal"):
        cfg.stop_signal = ic["StopSignal"]
    process = {"argv": argv, "env": C.environment(icfg, cfg.env, hostname, home), "uid": uid, "gid": gid,
               "groups": groups, "workdir": cfg.workdir or ic.get("WorkingDir") or "/", "hostname": hostname}
    return Spec(image, chain, argv, process)
