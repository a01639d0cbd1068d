"""Small file-system helpers: atomic writes so nothing is ever half-written, and safe reads of user-named files.

Every file taxiway makes visible goes through :func:`atomic_write` (or
:func:`atomic_path` when a library writes the file by name, as SQLite does):
a temp file in the same directory, optionally fsynced, renamed over the target.
Temp files are named ``.<name>.<8 random characters>.tmp``; sweepers of crash
leftovers (the CA, the registry) match that pattern.

:func:`read_regular` reads a file a user or a directory we do not fully own
names: regular files only, bounded, optionally without following a symlink, so
a path replaced by ``/dev/zero`` or a FIFO gives an error line instead of
eating memory or hanging.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

# ``tempfile`` (random, shutil, bz2, lzma...) is kept off the import path on purpose: ``taxiway run``
# writes its records through here, and it would add tens of ms to its start-up (see _mkstemp).
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import IO

MAX_INPUT = 1 << 20  # CSRs, certificates, keys, small JSON records: real ones are a few KiB

TEMP_GLOB = ".{}.????????.tmp"  # the temp names atomic_write makes for a target name (8 random characters)
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's alphabet: 37**8 names


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so a rename or link inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkstemp(path: Path) -> tuple[int, str]:
    """tempfile.mkstemp's contract (O_EXCL, 0600, O_NOFOLLOW, retry on a taken name) without importing tempfile."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        rand = "".join(_TEMP_CHARS[b % len(_TEMP_CHARS)] for b in os.urandom(8))
        tmp = os.path.join(path.parent, f".{path.name}.{rand}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no usable temporary file name found", str(path.parent))


def _temp_beside(path: Path, mode: int) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    try:
        os.fchmod(fd, mode)  # created 0600 (before the umask): never more open than ``mode`` at any moment
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _publish(tmp: str, path: Path, *, exclusive: bool, fsync_dir_: bool) -> None:
    if exclusive:
        try:
            os.link(tmp, path)  # first writer wins: never replaces what another process made
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)
    if fsync_dir_:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o644, binary: bool = True, *, fsync: bool = True,
                 fsync_dir: bool = False, exclusive: bool = False) -> Iterator[IO]:
    """Write to a temp file beside ``path`` (created with ``mode``), then rename it over ``path``.

    ``fsync``: flush the file's data to disk before the rename, so after a crash ``path``
    holds the old or the new content, never an empty file (skip it only for content
    that is worthless after a power cut). ``fsync_dir``: also fsync the directory after
    the rename, so the new name itself survives one. ``exclusive``: link instead of
    rename, raising FileExistsError when ``path`` already exists (the first writer wins).
    ``binary=False`` yields a text file. If the body raises, the temp file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path, mode)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        _publish(tmp, path, exclusive=exclusive, fsync_dir_=fsync_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644, *, fsync: bool = True,
                fsync_dir: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_write` for writers that need a file name (SQLite): yields the temp path.

    The temp file exists (empty, ``mode``) when the body starts; whatever the body
    leaves there is fsynced (``fsync``) and renamed over ``path`` when it returns.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path, mode)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _publish(tmp, path, exclusive=False, fsync_dir_=fsync_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644, *, fsync: bool = True,
                       fsync_dir: bool = False) -> None:
    """Atomically replace ``path`` with ``data`` (see :func:`atomic_write` for the options)."""
    with atomic_write(path, mode=mode, fsync=fsync, fsync_dir=fsync_dir) as f:
        f.write(data)


def sweep_temp_files(path: str | os.PathLike) -> int:
    """Remove temp files a crashed :func:`atomic_write` left beside ``path`` (our own regular files only)."""
    import glob

    path, n = Path(path), 0
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(TEMP_GLOB.format(glob.escape(path.name))):
            st = tmp.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                tmp.unlink()
                n += 1
    return n


# -- reading files a user names ---------------------------------------------------------------------------------


class FileProblem(Exception):
    """Why a file cannot be read, as a phrase to follow its name ("is not a regular file")."""


class TooLarge(FileProblem):
    """The file is a regular one, but over the limit it was read with."""


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """os.open with O_NOFOLLOW (``path`` relative to ``dir_fd`` if given); a symlink raises FileProblem instead of being followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileProblem("is a symbolic link, which taxiway does not follow here") from None
        raise


def read_regular(path: str | os.PathLike, limit: int = MAX_INPUT, *, nofollow: bool = False,
                 dir_fd: int | None = None) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes (``path`` relative to ``dir_fd`` if given).

    FileNotFoundError and other OSErrors propagate; a symlink (with ``nofollow``),
    a device, FIFO or directory raise FileProblem, a file over the limit TooLarge.
    ``nofollow`` refuses a link only as the last component: to refuse one anywhere,
    open each folder on the way with O_NOFOLLOW and pass the last one as ``dir_fd``.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK  # a FIFO must not block the open
    fd = open_nofollow(path, flags, dir_fd=dir_fd) if nofollow else os.open(path, flags | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise FileProblem(f"is {kind}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(f"is larger than {limit >> 20} MiB" if limit >= 1 << 20 else f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def same_file(paths: Iterable[str | os.PathLike | None]) -> tuple[str | os.PathLike, str | os.PathLike] | None:
    """Two of ``paths`` that are one file (same path, other spellings, links), or None. ``None`` entries are skipped."""
    seen: list[tuple[str | os.PathLike, str]] = []
    for p in paths:
        if p is None:
            continue
        real = os.path.realpath(p)
        for q, other in seen:
            same = real == other
            if not same and os.path.exists(real) and os.path.exists(other):
                same = os.path.samefile(real, other)
            if same:
                return q, p
        seen.append((p, real))
    return None
