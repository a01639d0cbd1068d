"""Read what a build wrote without ever following a link it planted.

Buildpacks (and the app code they run) own ``/layers`` and ``/cnb/work``, so
every path the lifecycle opens below those roots may be a symlink aimed at the
host (``env.launch/SHADOW -> /etc/shadow``, ``launch.toml -> /root/.ssh/...``).
The host side opens each component of such a path relative to its parent's
fd with ``O_NOFOLLOW``: a link anywhere on the way is refused with an error
naming it, never resolved. (Inside the build machine links still work: there
they resolve in the build image.) Nothing here writes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from taxiway.errors import InvalidInput
from taxiway.fsutil import FileProblem, TooLarge, read_regular

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(root: Path, rel: str) -> InvalidInput:
    return InvalidInput(f"the build left a symlink or special file at {rel} (under {root.name}); "
                        "the lifecycle reads its files only as plain files and folders",
                        "make the buildpack write a regular file there, not a link")


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{rel!r} climbs out of its root")
    return parts


def open_dir(root: Path, rel: str = "") -> int | None:
    """An fd of folder ``rel`` below ``root`` (no link on the way), or None when it is missing."""
    fd = os.open(root, _DIR)
    try:
        for p in _parts(rel):
            nfd = os.open(p, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except FileNotFoundError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(root, rel) from None
        raise


def kind(root: Path, rel: str) -> str | None:
    """``dir``, ``file``, ``link`` or ``other`` for ``rel`` below ``root`` (parents must be plain folders); None if missing."""
    parts = _parts(rel)
    parent = open_dir(root, "/".join(parts[:-1]))
    if parent is None:
        return None
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "link" if stat.S_ISLNK(st.st_mode) else "other"


def is_dir(root: Path, rel: str) -> bool:
    """True when ``rel`` is a real folder (a link to one is refused, not followed)."""
    k = kind(root, rel)
    if k in ("link", "other"):
        raise _refuse(root, rel)
    return k == "dir"


def entries(root: Path, rel: str = "") -> list[tuple[str, str]]:
    """(name, kind) of what folder ``rel`` holds, sorted; empty when it is missing."""
    fd = open_dir(root, rel)
    if fd is None:
        return []
    out = []
    try:
        for name in sorted(os.listdir(fd)):
            m = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            out.append((name, "dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m)
                        else "link" if stat.S_ISLNK(m) else "other"))
    finally:
        os.close(fd)
    return out


MAX_READ = 16 << 20  # metadata and env files; a bigger one is a build trying to exhaust the host


def read_bytes(root: Path, rel: str) -> bytes | None:
    """The bytes of regular file ``rel`` below ``root``, or None when it is missing."""
    parts = _parts(rel)
    parent = open_dir(root, "/".join(parts[:-1]))
    if parent is None:
        return None
    try:
        # open_dir reached its folder refusing every link on the way; the file itself is not followed either.
        return read_regular(parts[-1], MAX_READ, nofollow=True, dir_fd=parent)
    except FileNotFoundError:
        return None
    except TooLarge:
        raise InvalidInput(f"the build wrote {rel} larger than {MAX_READ >> 20} MB", "keep metadata and env files small") from None
    except FileProblem:  # a link, a folder, a device or a fifo
        raise _refuse(root, rel) from None
    finally:
        os.close(parent)


def read_text(root: Path, rel: str, what: str) -> str | None:
    """``read_bytes`` as UTF-8; InvalidInput naming ``what`` when it is not."""
    data = read_bytes(root, rel)
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} ({rel}) is not UTF-8 text", "write it as UTF-8") from None
