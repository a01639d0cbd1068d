"""Where the machines part keeps its files under ``$TAXIWAY_HOME``: private (0700) directories.

A leaf module (no other machines module imported), so state, snapshots, the
micro-VM runtime and its agent can all ask for their directory without
importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(d: Path) -> Path:
    """``d`` made 0700, or tightened to 0700 if others can enter it.

    Machines' writable layers and unpacked snapshots keep the image's setuid files and
    device nodes: no other user of the host may reach them (podman's storage is 0700
    too). Their children are reachable only through these directories, so only the top
    ones need it.
    """
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        if os.stat(d).st_mode & 0o077:
            os.chmod(d, 0o700)
    return d


def machines_dir() -> Path:
    """``$TAXIWAY_HOME/machines``: one directory per machine (see :mod:`taxiway.machines.state`)."""
    from taxiway.paths import home

    return private_dir(home() / "machines")


def snapshots_dir() -> Path:
    """``$TAXIWAY_HOME/snapshots``: the unpacked-layer cache (see :mod:`taxiway.machines.snapshots`)."""
    from taxiway.paths import home

    return home() / "snapshots"


def vm_dir() -> Path:
    """``$TAXIWAY_HOME/vm``: the micro-VM runtime's kernels' initramfs, image disks and helpers."""
    from taxiway.paths import home

    return private_dir(home() / "vm")  # the images' roots as ext4 files: no other user reads them
