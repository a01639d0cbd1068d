"""Apply one layer's tar entries to a directory, safely: the file-system side of unpack.

:class:`Applier` takes entries one by one (from :func:`taxiway.oci.layerio.members`)
and does what :func:`taxiway.oci.changeset.entry_change` says they mean. Every path
is resolved inside the root (see :mod:`taxiway.oci._safepath`), leaves are never
followed, files are created fresh (``O_EXCL|O_NOFOLLOW``, so a lower layer's
hardlink or symlink is replaced, never written through), and metadata is applied
through file descriptors. Small new files go to worker threads in batches, so
parsing overlaps with creating and writing them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from taxiway.oci.changeset import (
    EMPTY_WHITEOUT,
    OPAQUE,
    PATH,
    ROOT,
    WHITEOUT,
    entry_change,
    times_ns,
    xattrs,
)
from taxiway.oci.layerio import LayerReader
from taxiway.oci.safepath import RootFS, clean, rmtree_at

_CHUNK = 1 << 20
_MAX_WARNINGS = 100
# Small new files are written by worker threads, in batches: the main thread
# decompresses and parses while the workers create, write and stamp files.
_ASYNC_MAX_FILE = 8 << 20
_BATCH_FILES = 64
_BATCH_BYTES = 4 << 20
_MAX_INFLIGHT_BYTES = 16 << 20
DEFAULT_WORKERS = 2
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors no entry can cause: stop the whole layer instead of skipping an entry.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE,
                          errno.ENOMEM})
# xattrs that describe the host, not the image: never copied onto it.
_IGNORED_XATTRS = frozenset({"security.selinux"})


@dataclass
class LayerStats:
    """What applying one layer did."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    bytes: int = 0  # file content written
    tar_bytes: int = 0  # the uncompressed layer
    diff_id: str = ""  # sha256 of the uncompressed layer
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.skipped += 1
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(msg)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, warnings=list(self.warnings))


def _umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: always chmod


class Applier:
    """Applies one layer's entries; keeps the per-layer bookkeeping."""

    def __init__(self, fs: RootFS, stats: LayerStats, same_owner: bool, workers: int = 0):
        self.fs = fs
        self.stats = stats
        self.same_owner = same_owner
        self.upper: set[tuple[str, ...]] = set()  # paths this layer made (and their parents)
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}  # dir metadata, applied at the end
        self.saved_times: dict[tuple[str, ...], tuple[int, int]] = {}  # parents we touched
        self.xattr_warned: set[str] = set()
        self.setgid_parent: dict[tuple[str, ...], bool] = {}
        self.saved_fd_times: list[tuple[int, tuple[int, int]]] = []  # parents reached through symlinks
        self.ids = (os.geteuid(), os.getegid())
        self.umask = _umask()
        # Directories this layer made empty: a name in them not yet seen in this
        # layer cannot exist, so creating it can go to a worker.
        self.fresh: set[tuple[str, ...]] = set()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="unpack") if workers > 0 else None
        self.batch: list[tuple[int, str, bytes, tarfile.TarInfo, tuple[str, ...]]] = []
        self.batch_bytes = 0
        # Parent directories of the open batch: (RootFS's fd, our dup), one dup per parent,
        # not per file. Forgotten when the batch goes and whenever RootFS forgets its fds.
        self.batch_dirs: dict[tuple[str, ...], tuple[int, int]] = {}
        self.pending: dict[tuple[str, ...], Future] = {}  # path -> the batch writing it
        self.inflight: dict[Future, int] = {}  # batch -> bytes it holds

    # -- worker batches --------------------------------------------------------
    def _submit(self) -> None:
        if not self.batch:
            return
        assert self.pool is not None
        batch, nbytes = self.batch, self.batch_bytes
        self.batch, self.batch_bytes = [], 0
        self.batch_dirs = {}
        fut = self.pool.submit(self._write_batch, batch)
        self.inflight[fut] = nbytes
        for _pfd, _name, _data, _m, parts in batch:
            self.pending[parts] = fut
        while sum(self.inflight.values()) > _MAX_INFLIGHT_BYTES:
            self._collect(next(iter(self.inflight)))

    def _write_batch(self, batch: list) -> list[tuple[str, OSError]]:
        """(Worker thread) create and fill new files; per-file errors are returned."""
        errors = []
        try:
            for pfd, name, data, m, parts in batch:
                try:
                    self._write_new(pfd, name, data, m, parts[:-1])
                except OSError as e:
                    errors.append((m.name, e))
        finally:
            for pfd in {b[0] for b in batch}:  # the batch owns its parents' dups, shared by files
                os.close(pfd)
        return errors

    def _write_new(self, pfd: int, name: str, data: bytes, m: tarfile.TarInfo, pparts: tuple[str, ...]) -> None:
        mode = m.mode & 0o7777
        fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=pfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._file_meta(fd, m, mode, pparts)
        finally:
            os.close(fd)

    def _collect(self, fut: Future) -> None:
        """Wait for one batch; raise its fatal error or record its warnings."""
        self.inflight.pop(fut, None)
        for name, e in fut.result():
            if e.errno in _FATAL_ERRNOS:
                raise e
            self.stats.files -= 1
            self.stats.warn(f"{name}: {e.strerror}, skipped")

    def _wait(self, parts: tuple[str, ...]) -> None:
        """Before touching ``parts`` again: make sure its pending write is done."""
        if any(b[4] == parts for b in self.batch):
            self._submit()
        fut = self.pending.pop(parts, None)
        if fut is not None and fut in self.inflight:
            self._collect(fut)

    def drain(self) -> None:
        """Wait for every pending write (before removals, links into them, and the end)."""
        self._submit()
        while self.inflight:
            self._collect(next(iter(self.inflight)))
        self.pending.clear()

    def close(self) -> None:
        for pfd, _times in self.saved_fd_times:
            os.close(pfd)
        self.saved_fd_times = []
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            for pfd in {b[0] for b in self.batch}:
                os.close(pfd)
            self.batch = []
            self.batch_dirs = {}

    # -- helpers -------------------------------------------------------------
    def _mark_upper(self, parts: tuple[str, ...]) -> None:
        p = parts
        while p and p not in self.upper:
            self.upper.add(p)
            p = p[:-1]

    def _save_times(self, pparts: tuple[str, ...], pfd: int) -> None:
        if pparts not in self.saved_times:
            st = os.fstat(pfd)
            self.saved_times[pparts] = (st.st_atime_ns, st.st_mtime_ns)
            # Directory modes are applied at the end of the layer, so this holds all layer long.
            self.setgid_parent[pparts] = bool(st.st_mode & stat.S_ISGID)

    def before_mkdir(self, pparts: tuple[str, ...] | None, pfd: int) -> None:
        """A directory is about to be made implicitly in ``pfd``: keep that parent's times."""
        if pparts is not None:
            self._save_times(pparts, pfd)
        else:
            st = os.fstat(pfd)
            self.saved_fd_times.append((os.dup(pfd), (st.st_atime_ns, st.st_mtime_ns)))

    def _needs_chown(self, m: tarfile.TarInfo, pparts: tuple[str, ...]) -> bool:
        """False when a new inode already has m's owner (ours, and no setgid parent)."""
        if not self.same_owner:
            return False
        return (m.uid, m.gid) != self.ids or self.setgid_parent.get(pparts, True)

    def _remove(self, pfd: int, name: str) -> bool:
        """Remove ``name`` (never following it); True if something was there."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            self.drain()  # files may be on their way into it
            rmtree_at(pfd, name)
            self.fs.invalidate()
            self.batch_dirs = {}
            self.fresh.clear()  # a path through it may now lead elsewhere
        else:
            os.unlink(name, dir_fd=pfd)
            if stat.S_ISLNK(st.st_mode):
                self.fs.invalidate()
                self.batch_dirs = {}  # a path through the link may now lead elsewhere
        return True

    def _set_xattrs(self, target: int | str, m: tarfile.TarInfo) -> None:
        for name, value in xattrs(m):
            if name in _IGNORED_XATTRS:
                continue
            try:
                os.setxattr(target, name, value)
            except OSError as e:
                if e.errno in _FATAL_ERRNOS:
                    raise
                if name not in self.xattr_warned:
                    self.xattr_warned.add(name)
                    self.stats.warn(f"{m.name}: xattr {name} not set ({e.strerror})")

    def _meta_fd(self, fd: int, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        """A directory's metadata (at the end of its layer)."""
        # A directory this layer made (mkdir: ours, or its setgid parent's group) needs no
        # chown when the entry asks for exactly that owner; a merged one always gets it.
        if self.same_owner and not (parts and parts in self.fresh and not self._needs_chown(m, parts[:-1])):
            os.fchown(fd, m.uid, m.gid)
        self._set_xattrs(fd, m)
        os.fchmod(fd, m.mode & 0o7777)
        os.utime(fd, ns=times_ns(m))

    # -- the dispatcher ------------------------------------------------------
    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, src: LayerReader) -> None:
        """Apply one tar entry (its data, if any, is read from ``src``)."""
        self.stats.entries += 1
        kind, parts = entry_change(m.name)
        if kind != PATH:
            self._change(kind, parts, m)
            return
        pparts, name = parts[:-1], parts[-1]
        try:
            pfd = self.fs.dirfd(pparts, create=True)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            self.stats.warn(f"{m.name}: parent is not a directory inside the root ({e.strerror}), skipped")
            return
        seen = parts in self.upper
        self._mark_upper(parts)
        self._save_times(pparts, pfd)
        if (self.pool is not None and not seen and pparts in self.fresh and m.isreg() and m.sparse is None
                and m.size <= _ASYNC_MAX_FILE):
            data = src.read_exact(m.size)
            known = self.batch_dirs.get(pparts)
            if known is None or known[0] != pfd:
                known = self.batch_dirs[pparts] = (pfd, os.dup(pfd))
            self.batch.append((known[1], name, data, m, parts))
            self.batch_bytes += m.size
            self.stats.files += 1
            self.stats.bytes += m.size
            if len(self.batch) >= _BATCH_FILES or self.batch_bytes >= _BATCH_BYTES:
                self._submit()
            return
        if seen:
            self._wait(parts)
        try:
            if m.isreg():
                self._file(tf, m, src, pfd, name, pparts)
            elif m.isdir():
                self._dir(m, pfd, name, parts)
            elif m.issym():
                self._symlink(m, pfd, name, pparts)
            elif m.islnk():
                self._hardlink(m, pfd, name, parts)
            elif m.ischr() or m.isblk() or m.isfifo():
                self._special(m, pfd, name)
            else:
                self.stats.warn(f"{m.name}: unsupported tar entry type {m.type!r}, skipped")
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            self.stats.warn(f"{m.name}: {e.strerror}, skipped")

    def _change(self, kind: str, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        """Whiteouts, opaque markers and the root entry."""
        if kind == ROOT:
            if m.isdir():
                self.dirs[()] = m
            else:
                self.stats.warn(f"{m.name!r}: refusing to replace the root with a non-directory")
            return
        self.stats.whiteouts += 1
        self.drain()
        if kind == OPAQUE:
            self._opaque(parts)
        elif kind == WHITEOUT:
            self._whiteout(parts)
        elif kind == EMPTY_WHITEOUT:
            self.stats.warn(f"{m.name}: whiteout of nothing, ignored")
        # AUFS_META (.wh..wh.plnk...): nothing to apply

    # -- entry kinds ---------------------------------------------------------
    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, src: LayerReader, pfd: int, name: str,
              pparts: tuple[str, ...]) -> None:
        mode = m.mode & 0o7777
        # A fresh inode, created with its final permission bits (never setuid/setgid
        # before its owner is set); whatever was there is removed, never written through.
        try:
            fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, name)
            fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=pfd)
        try:
            if m.sparse is not None:
                f = tf.extractfile(m)
                assert f is not None
                while chunk := f.read(_CHUNK):
                    os.write(fd, chunk)
            elif m.size:
                src.copy_to(fd, m.size)
            self._file_meta(fd, m, mode, pparts)
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def _file_meta(self, fd: int, m: tarfile.TarInfo, mode: int, pparts: tuple[str, ...]) -> None:
        if self._needs_chown(m, pparts):
            os.fchown(fd, m.uid, m.gid)
        self._set_xattrs(fd, m)
        if mode & 0o7000 or mode & self.umask:
            os.fchmod(fd, mode)
        os.utime(fd, ns=times_ns(m))

    def _dir(self, m: tarfile.TarInfo, pfd: int, name: str, parts: tuple[str, ...]) -> None:
        # 0o700 until the end of the layer, when its own mode is applied.
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
            self.fresh.add(parts)
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a directory entry over a directory merges
                self._remove(pfd, name)
                os.mkdir(name, 0o700, dir_fd=pfd)
                self.fresh.add(parts)
        self.dirs[parts] = m
        self.stats.dirs += 1

    def _symlink(self, m: tarfile.TarInfo, pfd: int, name: str, pparts: tuple[str, ...]) -> None:
        try:
            os.symlink(m.linkname, name, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, name)
            os.symlink(m.linkname, name, dir_fd=pfd)
        if self._needs_chown(m, pparts):
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=times_ns(m), dir_fd=pfd, follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, name: str, parts: tuple[str, ...]) -> None:
        tparts = clean(m.linkname)
        if not tparts:
            self.stats.warn(f"{m.name}: hardlink to the root, skipped")
            return
        if tparts == parts:
            return  # a link to itself: what is there stays
        self.drain()  # the target may be on its way, under any of its names
        try:
            tpfd = self.fs.dirfd(tparts[:-1], create=False)
            tst = os.stat(tparts[-1], dir_fd=tpfd, follow_symlinks=False)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            self.stats.warn(f"{m.name}: hardlink target {m.linkname} not in the root ({e.strerror}), skipped")
            return
        if stat.S_ISDIR(tst.st_mode):
            self.stats.warn(f"{m.name}: hardlink to a directory ({m.linkname}), skipped")
            return
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                self.stats.hardlinks += 1
                return
        except FileNotFoundError:
            pass
        self._remove(pfd, name)
        # linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        os.link(tparts[-1], name, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _special(self, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        self._remove(pfd, name)
        if m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self.stats.fifos += 1
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                self.stats.warn(f"{m.name}: device node {m.devmajor},{m.devminor} skipped (needs root)")
                return
            self.stats.devices += 1
        if self.same_owner:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        # chmod through an O_PATH fd of the node we just made (never a symlink).
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # pragma: no cover - we just created it
                return
            proc = f"/proc/self/fd/{fd}"
            self._set_xattrs(proc, m)
            os.chmod(proc, m.mode & 0o7777)
        finally:
            os.close(fd)
        os.utime(name, ns=times_ns(m), dir_fd=pfd, follow_symlinks=False)

    # -- whiteouts -----------------------------------------------------------
    def _whiteout(self, parts: tuple[str, ...]) -> None:
        if parts in self.upper:
            # Whiteouts hide lower layers, never this layer's own entries: a
            # directory this layer already wrote into loses only its lower children.
            try:
                pfd = self.fs.dirfd(parts[:-1], create=False)
                dfd = os.open(parts[-1], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            except OSError as e:
                if e.errno in _FATAL_ERRNOS:
                    raise
                return  # this layer's own file or symlink: it stays
            try:
                self._save_times(parts, dfd)
                self._prune(dfd, parts)
            finally:
                os.close(dfd)
            return
        try:
            pfd = self.fs.dirfd(parts[:-1], create=False)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            return  # nothing there to hide
        self._save_times(parts[:-1], pfd)
        self._remove(pfd, parts[-1])

    def _opaque(self, parts: tuple[str, ...]) -> None:
        try:
            dfd = self.fs.dirfd(parts, create=False)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            return
        self._mark_upper(parts)
        self._save_times(parts, dfd)
        self._prune(dfd, parts)

    def _prune(self, dfd: int, parts: tuple[str, ...]) -> None:
        """Remove what this layer did not make below ``dfd`` (iteratively: trees can be deep)."""
        stack = [(os.dup(dfd), parts)]
        try:
            while stack:
                fd, p = stack.pop()
                try:
                    rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        with os.scandir(rfd) as it:
                            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                    finally:
                        os.close(rfd)
                    for name, is_dir in names:
                        child = p + (name,)
                        if child not in self.upper:
                            self._remove(fd, name)
                        elif is_dir:
                            cfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                            stack.append((cfd, child))
                finally:
                    os.close(fd)
        finally:
            for fd, _p in stack:
                os.close(fd)

    # -- the end of the layer ------------------------------------------------
    def finish(self) -> None:
        """Directory metadata, deepest first, after their contents are in place."""
        self.drain()
        self.fs.release()
        for pfd, times in self.saved_fd_times:
            with contextlib.suppress(OSError):
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
        for parts, times in self.saved_times.items():
            if parts not in self.dirs:
                self._with_dir(parts, lambda fd, t=times: os.utime(fd, ns=t))
        for parts in sorted(self.dirs, key=len, reverse=True):
            self._with_dir(parts, lambda fd, m=self.dirs[parts], p=parts: self._meta_fd(fd, m, p))

    def _with_dir(self, parts: tuple[str, ...], fn: Callable[[int], None]) -> None:
        try:
            if parts:
                pfd = self.fs.dirfd(parts[:-1], create=False)
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            else:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fs.rootfd)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            return  # replaced or removed later in the layer
        try:
            fn(fd)
        except OSError as e:
            if e.errno in _FATAL_ERRNOS:
                raise
            self.stats.warn(f"{'/'.join(parts) or '.'}: metadata not set ({e.strerror})")
        finally:
            os.close(fd)
