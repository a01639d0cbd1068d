"""Copy a tree someone else controls (an app's source, a ``-b`` buildpack folder) without following a link.

``shutil.copytree`` works by path: a folder swapped for a symlink between its
listing and its copy sends it into a host folder, a very deep tree ends in a
RecursionError, and a race or a fifo ends in a traceback. Here every folder is
opened relative to its parent's fd with ``O_NOFOLLOW | O_DIRECTORY`` (a swapped
link fails to open instead of being followed), the walk is a loop with a depth
limit, special files (devices, fifos, sockets) are skipped and reported, and
any OS error is one clear line naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from taxiway.errors import InvalidInput

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Folders below the root, at most. Each level holds two fds while copied; real apps stay far below this.
MAX_DEPTH = 128


def copy_tree(source: Path, dest: Path, keep: Callable[[str, bool], bool] | None = None, *, what: str = "the source",
              hashes: dict[str, str] | None = None, check: Callable[[], object] | None = None,
              max_depth: int = MAX_DEPTH) -> list[str]:
    """Copy ``source`` into the new folder ``dest`` (symlinks as symlinks); returns the special files skipped.

    ``keep(rel, is_dir)`` leaves out what it rejects (a rejected folder is not entered). ``hashes`` gets
    each copied file's sha256 by its path below ``dest``; ``check`` is called before each file (a deadline).
    Raises InvalidInput (naming ``what`` and the path) on a folder deeper than ``max_depth``, a folder
    that turned into a link or file while copied, or any OS error.
    """
    specials: list[str] = []
    rel = ""
    frames: list[tuple[int, int, str, list[str], os.stat_result]] = []
    try:
        sfd = os.open(source, _DIR)
        try:
            root_st = os.fstat(sfd)
            os.mkdir(dest, 0o700)
            dfd = os.open(dest, _DIR)
        except BaseException:
            os.close(sfd)
            raise
        frames.append((sfd, dfd, "", sorted(os.listdir(sfd), reverse=True), root_st))
        while frames:
            sfd, dfd, rel_dir, names, dst = frames[-1]
            if not names:
                frames.pop()
                rel = rel_dir
                os.fchmod(dfd, stat.S_IMODE(dst.st_mode))
                os.utime(dfd, ns=(dst.st_atime_ns, dst.st_mtime_ns))
                os.close(sfd)
                os.close(dfd)
                continue
            name = names.pop()
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
            except FileNotFoundError:  # removed since the listing: nothing to copy
                continue
            m = st.st_mode
            if stat.S_ISDIR(m):
                if keep is not None and not keep(rel, True):
                    continue
                if len(frames) > max_depth:
                    raise InvalidInput(f"{what} has folders nested deeper than {max_depth} levels (at {rel[:200]}...)",
                                       "flatten the tree, or leave that folder out of the build")
                try:
                    csfd = os.open(name, _DIR, dir_fd=sfd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InvalidInput(f"{what} changed while it was copied: {rel} is no longer a folder",
                                           "do not change the folder during the build, and build again") from None
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    cdfd = os.open(name, _DIR, dir_fd=dfd)
                except BaseException:
                    os.close(csfd)
                    raise
                frames.append((csfd, cdfd, rel, sorted(os.listdir(csfd), reverse=True), st))
            elif stat.S_ISLNK(m):
                if keep is None or keep(rel, False):
                    os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            elif stat.S_ISREG(m):
                if keep is None or keep(rel, False):
                    if check is not None:
                        check()
                    _copy_file(sfd, dfd, name, rel, hashes, specials)
            elif keep is None or keep(rel, False):
                specials.append(rel)
    except OSError as e:
        where = f" at {rel}" if rel else ""
        raise InvalidInput(f"could not copy {what}{where}: {e.strerror or e}",
                           "make it a readable folder of plain files, folders and links, and build again") from None
    finally:
        for sfd, dfd, *_ in frames:
            os.close(sfd)
            os.close(dfd)
    return specials


def _copy_file(sfd: int, dfd: int, name: str, rel: str, hashes: dict[str, str] | None, specials: list[str]) -> None:
    # Opened without following a link and without blocking; copied only if it is (still) a regular file.
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link since the listing: not followed, not copied
            specials.append(rel)
            return
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            specials.append(rel)
            return
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
        if hashes is not None:
            hashes[rel] = h.hexdigest()
    finally:
        os.close(fd)
