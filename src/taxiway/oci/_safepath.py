"""Resolve paths inside a root directory the way a chroot would, with file descriptors.

Every path a layer names is resolved *inside* the root: ``..`` stops at the
root, absolute symlinks restart at the root, and nothing is ever opened by a
host path built from archive input. The kernel does this for us with
``openat2(RESOLVE_IN_ROOT)`` (Linux 5.6+, called through ``syscall(437)``);
where that is missing (old kernels, seccomp filters) an equivalent walk opens
one component at a time with ``O_NOFOLLOW`` and follows symlinks by hand.

Leaves are never resolved here: callers get the parent directory's fd and
act on the last component with ``*at`` calls that do not follow it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_LINKS = 40  # like the kernel's MAXSYMLINKS
_CACHE_SIZE = 256

_SYS_OPENAT2 = 437  # same number on every architecture (new syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_openat2_works: bool | None = None  # None: not probed yet


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """Call openat2(2); raise OSError like os.open does."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def openat2_available() -> bool:
    """True when openat2(RESOLVE_IN_ROOT) works here (probed once)."""
    global _openat2_works
    if _openat2_works is None:
        root = os.open("/", _O_PATH_DIR)
        try:
            os.close(_openat2(root, ".", _O_PATH_DIR, _RESOLVE_IN_ROOT))
            _openat2_works = True
        except (OSError, AttributeError):
            _openat2_works = False
        finally:
            os.close(root)
    return _openat2_works


def clean(name: str) -> tuple[str, ...]:
    """The components of an archive path, cleaned as if it were rooted.

    ``/a/./b//c`` -> ``(a, b, c)``; ``../../x`` -> ``(x,)``; ``.`` and ``/`` -> ``()``.
    ``..`` can never climb above the root, exactly like ``..`` in ``/``.
    """
    out: list[str] = []
    for c in name.split("/"):
        if c == "" or c == ".":
            continue
        if c == "..":
            if out:
                out.pop()
            continue
        out.append(c)
    return tuple(out)


class RootFS:
    """A root directory, opened once, in which paths are resolved safely.

    ``dirfd(parts)`` returns a (borrowed, cached) O_PATH fd of the directory
    ``parts`` names inside the root, creating missing directories when asked.
    Call :meth:`invalidate` after removing or replacing a directory or symlink,
    and :meth:`release` between entries (it closes fds that were invalidated).
    """

    def __init__(self, root: str | os.PathLike, *, resolver: str | None = None):
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if resolver is None:
            resolver = "openat2" if openat2_available() else "walk"
        if resolver not in ("openat2", "walk"):
            raise ValueError(f"unknown resolver {resolver!r}")
        self.resolver = resolver
        self._cache: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._graveyard: list[int] = []
        #: Called before a missing directory is made or a symlink is followed,
        #: so writes still in flight (unpack's worker threads) land first.
        self.before_slow_path: Callable[[], None] | None = None
        #: Called with (parent key or None, parent fd) before a missing directory is made.
        self.before_mkdir: Callable[[tuple[str, ...] | None, int], None] | None = None

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        self.invalidate()
        self.release()
        os.close(self.rootfd)

    def __enter__(self) -> RootFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invalidate(self) -> None:
        """Forget every cached directory (their fds stay open until :meth:`release`)."""
        self._graveyard.extend(self._cache.values())
        self._cache.clear()

    def release(self) -> None:
        """Close fds dropped by :meth:`invalidate`; no borrowed fd may be in use."""
        for fd in self._graveyard:
            os.close(fd)
        self._graveyard.clear()

    # -- resolution --------------------------------------------------------
    def dirfd(self, parts: tuple[str, ...], create: bool = False) -> int:
        """The directory ``parts`` inside the root, as a borrowed O_PATH fd.

        Symlinks along the way are followed inside the root. Raises
        FileNotFoundError (when not ``create``), NotADirectoryError, or
        OSError(ELOOP).
        """
        if not parts:
            return self.rootfd
        fd = self._cache.get(parts)
        if fd is not None:
            self._cache.move_to_end(parts)
            return fd
        # Find the longest cached prefix, then step one component at a time.
        k = len(parts) - 1
        while k > 0 and parts[:k] not in self._cache:
            k -= 1
        cur = self._cache[parts[:k]] if k else self.rootfd
        for i in range(k, len(parts)):
            fd = self._step(cur, parts[: i + 1], create)
            self._put(parts[: i + 1], fd)
            cur = fd
        return cur

    def _step(self, cur: int, key: tuple[str, ...], create: bool) -> int:
        """Open directory ``key[-1]`` below ``cur`` (the directory ``key[:-1]``)."""
        slow = self.before_slow_path
        while True:
            try:
                return os.open(key[-1], _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    raise
                if slow is not None:
                    slow()
                    slow = None
                    continue
                if self.before_mkdir is not None:
                    self.before_mkdir(key[:-1], cur)
                os.mkdir(key[-1], 0o755, dir_fd=cur)
                return os.open(key[-1], _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=cur)
            except OSError as e:
                if not (isinstance(e, NotADirectoryError) or e.errno == errno.ELOOP):
                    raise
                if slow is not None:
                    slow()
                    slow = None
                    continue
                # A symlink (or not a directory at all): resolve the whole
                # prefix inside the root; this raises for a non-directory.
                return self.resolve(key, create)

    def _put(self, key: tuple[str, ...], fd: int) -> None:
        self._cache[key] = fd
        while len(self._cache) > _CACHE_SIZE:
            _, old = self._cache.popitem(last=False)
            self._graveyard.append(old)

    def resolve(self, parts: tuple[str, ...], create: bool = False) -> int:
        """A new (owned) O_PATH fd of directory ``parts``, symlinks followed inside the root."""
        if self.resolver == "openat2":
            try:
                return _openat2(self.rootfd, "/".join(parts) or ".", _O_PATH_DIR,
                                _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno == errno.ENOENT and not create:
                    raise FileNotFoundError(e.errno, e.strerror, e.filename) from None
                if e.errno == errno.ENOTDIR:
                    raise NotADirectoryError(e.errno, e.strerror, e.filename) from None
                if e.errno == errno.ELOOP:
                    raise
                # ENOENT with create, EAGAIN (a concurrent rename), EXDEV...: walk.
        return walk(self.rootfd, parts, create, before_mkdir=self.before_mkdir)


def walk(rootfd: int, parts: tuple[str, ...] | list[str], create: bool = False,
         before_mkdir: Callable[[tuple[str, ...] | None, int], None] | None = None) -> int:
    """Resolve ``parts`` below ``rootfd`` one component at a time, like RESOLVE_IN_ROOT.

    Returns a new O_PATH fd of the directory. ``..`` never climbs above
    ``rootfd``; a symlink's target is followed inside the root (absolute
    targets restart at it); missing directories are made when ``create``
    (``before_mkdir(None, parent_fd)`` is told first: after symlinks there is
    no lexical key for the parent).
    """
    stack: list[int] = []  # the directories above ``cur``, for ".."
    cur = os.dup(rootfd)
    todo = list(reversed(parts))
    links = 0
    try:
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                if stack:
                    os.close(cur)
                    cur = stack.pop()
                continue
            try:
                fd = os.open(c, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    raise
                if before_mkdir is not None:
                    before_mkdir(None, cur)
                os.mkdir(c, 0o755, dir_fd=cur)
                fd = os.open(c, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/".join(parts))
                target = os.readlink(c, dir_fd=cur)
                if target.startswith("/"):
                    for s in stack:
                        os.close(s)
                    stack.clear()
                    os.close(cur)
                    cur = os.dup(rootfd)
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(mode):
                os.close(fd)
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/".join(parts))
            stack.append(cur)
            cur = fd
        return cur
    except BaseException:
        os.close(cur)
        raise
    finally:
        for s in stack:
            os.close(s)


def rmtree_at(dirfd: int, name: str) -> None:
    """Remove ``name`` below ``dirfd`` and all it holds, never following a symlink.

    Iterative (a layer can nest directories thousands deep, past Python's
    recursion limit and PATH_MAX); one fd per level of the tree being removed.
    """
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack = [(dirfd, name, os.open(name, flags, dir_fd=dirfd))]
    try:
        while stack:
            _parent, _name, fd = stack[-1]
            sub = None
            with os.scandir(fd) as it:  # scans from the start each time (a dup, rewound on close)
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        sub = e.name
                        break
                    try:
                        os.unlink(e.name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
            if sub is not None:
                stack.append((fd, sub, os.open(sub, flags, dir_fd=fd)))
                continue
            parent, nm, fd = stack.pop()
            os.close(fd)
            os.rmdir(nm, dir_fd=parent)
    finally:
        for _p, _n, fd in stack:
            os.close(fd)
