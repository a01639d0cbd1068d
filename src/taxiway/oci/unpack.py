"""Apply OCI layers safely onto a root directory: export, snapshots, builds.

Each tar entry is applied here, by hand: ``tarfile`` only parses headers and
hands out member data; it never extracts. Every path is resolved inside the
root (see :mod:`taxiway.oci._safepath`), leaves are never followed, files are
created fresh (``O_EXCL|O_NOFOLLOW``, so a lower layer's hardlink or symlink
is replaced, never written through), and metadata is applied through file
descriptors. Layers stream: decompression (isal for gzip, zstandard for
zstd), hashing (the diff ID) and writing happen chunk by chunk.

Semantics follow the OCI image spec's "Applying changesets": ``.wh.NAME``
deletes NAME from lower layers, ``.wh..wh..opq`` hides a directory's lower
children, later entries replace earlier ones, and a directory entry over an
existing directory merges.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import queue
import stat
import tarfile
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.oci._layerstream import LayerError, TarSource, _Counting, _decompressor, members
from taxiway.oci._safepath import RootFS, clean, rmtree_at
from taxiway.oci.image import Descriptor, Image
from taxiway.oci.mediatypes import layer_compression
from taxiway.oci.store import HashThread

__all__ = ["LayerError", "LayerStats", "ExportStats", "apply_layer", "export", "chain_ids"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20
_MAX_WARNINGS = 100
# Small new files are written by worker threads, in batches: the main thread
# decompresses and parses while the workers create, write and stamp files.
_ASYNC_MAX_FILE = 8 << 20
_BATCH_FILES = 64
_BATCH_BYTES = 4 << 20
_MAX_INFLIGHT_BYTES = 16 << 20
_DEFAULT_WORKERS = 2
_INFLATE_CHUNK = 1 << 20
_INFLATED_QUEUE = 8  # decompressed chunks (<= _INFLATE_CHUNK each) waiting for the tar parser
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


@dataclass
class ExportStats:
    """What exporting an image did, layer by layer."""

    dest: str
    layers: list[LayerStats] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.layers)

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.layers for w in s.warnings]

    def to_json(self) -> dict[str, Any]:
        keys = ("entries", "files", "dirs", "symlinks", "hardlinks", "devices", "fifos", "whiteouts",
                "bytes", "tar_bytes", "skipped")
        return {"dest": self.dest, **{k: self.total(k) for k in keys},
                "layers": [s.to_json() for s in self.layers]}


# --------------------------------------------------------------------------
# Decompression beside the parser


class _Inflater:
    """Reads, decompresses and hashes a layer in a thread of its own, a bounded queue ahead of the parser.

    isal, zstandard and hashlib release the GIL on big buffers, so on two or
    more cores decompression and the diff ID overlap with parsing and writing
    instead of adding to them. Memory stays bounded by the queue.
    """

    def __init__(self, stream: BinaryIO, media_type: str, label: str, progress: Callable[[int], None] | None):
        self.label = label
        self._raw: Any = _Counting(stream, progress) if progress else stream
        self._media_type = media_type
        self._hash = HashThread(name="unpack-diffhash")
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_INFLATED_QUEUE)
        self._stop = False
        self._done = False
        self._t = threading.Thread(target=self._work, name="unpack-inflate", daemon=True)
        self._t.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop:
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            try:
                dec = _decompressor(self._raw, layer_compression(self._media_type))
            except Exception as e:
                raise LayerError(f"{self.label} cannot be decompressed ({e})", "remove the image and pull it again") from e
            while not self._stop:
                try:
                    chunk = dec.read(_INFLATE_CHUNK)
                except Exception as e:  # gzip/zstd/IO errors all mean "this layer is broken"
                    raise LayerError(f"{self.label} is corrupt or truncated ({e.__class__.__name__}: {e})",
                                     "remove the image and pull it again") from e
                if chunk:
                    self._hash.update(chunk)
                if not self._put(chunk) or not chunk:
                    return
        except BaseException as e:
            self._put(e)

    def read(self, n: int = -1) -> bytes:
        """The next decompressed chunk (``n`` is ignored: chunks come as decompressed); b"" at the end."""
        if self._done:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def digest(self) -> str:
        """sha256 of everything decompressed (call after the end was read)."""
        self._t.join()
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        """Stop the thread (idempotent; a blocked put gives up within 0.1 s)."""
        self._stop = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._t.join()
        self._hash.close()


class _InflatedSource(TarSource):
    """A :class:`TarSource` fed by an :class:`_Inflater`, which already hashes the stream."""

    def __init__(self, inflater: _Inflater):
        super().__init__(inflater, inflater.label)
        self._inflater = inflater

    def _more(self) -> bool:
        chunk = self._inflater.read()  # raises LayerError as TarSource does
        if not chunk:
            self.eof = True
            return False
        self._buf, self._off = chunk, 0
        return True

    def drain(self) -> str:
        super().drain()
        return self._inflater.digest()


# --------------------------------------------------------------------------
# Chain IDs


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs of a layer stack: ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))."""
    from taxiway.oci.digest import Digest

    out: list[str] = []
    for d in diff_ids:
        d = str(Digest.parse(d))
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


# --------------------------------------------------------------------------
# Entries


def _times_ns(m: tarfile.TarInfo) -> tuple[int, int]:
    def exact(key: str, fallback: float) -> int:
        s = m.pax_headers.get(key)
        if s:
            whole, _, frac = s.partition(".")
            try:
                neg = whole.startswith("-")
                ns = abs(int(whole)) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
                return -ns if neg else ns
            except ValueError:
                pass
        return int(fallback * 1_000_000_000)

    mt = exact("mtime", m.mtime)
    return exact("atime", mt / 1e9) if "atime" in m.pax_headers else mt, mt


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


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    # An empty pax value deletes the keyword (POSIX pax; Go's archive/tar agrees).
    out = []
    for k, v in m.pax_headers.items():
        if not v:
            continue
        if k.startswith("SCHILY.xattr."):
            out.append((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape")))
        elif k.startswith("LIBARCHIVE.xattr."):
            try:
                out.append((urllib.parse.unquote(k[len("LIBARCHIVE.xattr."):]), base64.b64decode(v)))
            except ValueError:
                continue
    return out


class _Applier:
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
        for name, value in _xattrs(m):
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
        os.utime(fd, ns=_times_ns(m))

    # -- the dispatcher ------------------------------------------------------
    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, src: TarSource) -> None:
        self.stats.entries += 1
        parts = clean(m.name)
        base = parts[-1] if parts else ""
        if base.startswith(WHITEOUT_PREFIX):
            self.stats.whiteouts += 1
            self.drain()
            if base == OPAQUE_MARKER:
                self._opaque(parts[:-1])
            elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                pass  # other aufs metadata (.wh..wh.plnk...): nothing to apply
            elif base[len(WHITEOUT_PREFIX):] in ("", ".", ".."):
                self.stats.warn(f"{m.name}: whiteout of nothing, ignored")
            else:
                self._whiteout(parts[:-1] + (base[len(WHITEOUT_PREFIX):],))
            return
        if not parts:
            if m.isdir():
                self.dirs[()] = m
            else:
                self.stats.warn(f"{m.name!r}: refusing to replace the root with a non-directory")
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
            data = src.read(m.size)
            if len(data) != m.size:
                raise LayerError(f"{src.label} is truncated (a file's data ends early)",
                                 "remove the image and pull it again")
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

    # -- entry kinds ---------------------------------------------------------
    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, src: TarSource, pfd: int, name: str,
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
        os.utime(fd, ns=_times_ns(m))

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
        os.utime(name, ns=_times_ns(m), dir_fd=pfd, follow_symlinks=False)
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
        os.utime(name, ns=_times_ns(m), dir_fd=pfd, follow_symlinks=False)

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


# --------------------------------------------------------------------------
# Public API


def apply_layer(root: Path | str, stream: BinaryIO, media_type: str, *, diff_id: str | None = None,
                same_owner: bool | None = None, progress: Callable[[int], None] | None = None,
                resolver: str | None = None, name: str | None = None, workers: int | None = None) -> LayerStats:
    """Apply one (compressed) layer onto the existing directory ``root``, safely.

    ``media_type`` picks the decompressor (gzip, zstd or plain tar).
    ``diff_id``, when given, is checked against the uncompressed stream
    (LayerError on mismatch; the root is then partly changed, so callers
    apply into a scratch directory). ``same_owner`` (default: when root)
    applies uid/gid. ``progress(n)`` is called with compressed bytes read.
    ``resolver`` forces "openat2" or "walk" (default: openat2 when available).
    ``workers`` threads write small new files (default 2; 0 writes inline).
    Entries that would leave the root are resolved inside it or skipped with
    a warning in the returned :class:`LayerStats`.
    """
    label = name or f"layer ({media_type})"
    if same_owner is None:
        same_owner = os.geteuid() == 0
    inflater = _Inflater(stream, media_type, label, progress)
    src = _InflatedSource(inflater)
    stats = LayerStats()
    try:
        try:
            with RootFS(root, resolver=resolver) as fs:
                ap = _Applier(fs, stats, same_owner, _DEFAULT_WORKERS if workers is None else workers)
                if ap.pool is not None:
                    fs.before_slow_path = ap.drain
                fs.before_mkdir = ap.before_mkdir
                try:
                    if not os.listdir(fs.rootfd):
                        ap.fresh.add(())
                    for tf, m in members(src):
                        fs.release()
                        ap.entry(tf, m, src)
                    ap.finish()
                finally:
                    ap.close()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TaxiwayError(f"no space left on the device holding {root} while applying {label}",
                                   "free some disk space and try again") from e
            raise TaxiwayError(f"cannot write {root} while applying {label}: {e.strerror or e}",
                               "check that the directory is writable") from e
        stats.diff_id = src.drain()
    finally:
        inflater.close()  # a no-op after a full read; else stops the thread
    stats.tar_bytes = src.tell()
    if diff_id is not None and stats.diff_id != diff_id:
        raise LayerError(f"{label}: uncompressed content is {stats.diff_id}, the image config says {diff_id}",
                         "the image is corrupt; remove it and pull it again")
    return stats


def export(image: Image, dest: Path | str, progress: Callable[[Descriptor, int], None] | None = None, *,
           verify: bool = True, resolver: str | None = None, workers: int | None = None) -> ExportStats:
    """Apply all layers of ``image``, oldest first, into a new directory ``dest``.

    ``dest`` must not exist or be an empty directory; the rootfs is built in
    a temporary sibling and renamed into place, so ``dest`` never holds half
    an image. ``verify`` checks each layer's diff ID against the config.
    ``progress(descriptor, n)`` reports compressed bytes consumed.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InvalidInput(f"{dest} exists and is not an empty directory",
                           "export into a new or empty directory")
    layers = image.layers()
    diff_ids: list[str | None] = [None] * len(layers)
    if verify:
        cfg_ids = (image.config().get("rootfs") or {}).get("diff_ids") or []
        if len(cfg_ids) != len(layers):
            raise LayerError(f"image {image.digest()} has {len(layers)} layers but {len(cfg_ids)} diff IDs",
                             "the image is corrupt; remove it and pull it again")
        diff_ids = list(cfg_ids)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".export", dir=dest.parent))
    os.chmod(tmp, 0o755)
    stats = ExportStats(dest=str(dest))
    try:
        for i, desc in enumerate(layers):
            cb = (lambda n, d=desc: progress(d, n)) if progress else None
            with image.open_blob(desc.digest) as f:
                stats.layers.append(apply_layer(tmp, f, desc.media_type, diff_id=diff_ids[i], progress=cb,
                                                resolver=resolver, workers=workers,
                                                name=f"layer {i} ({desc.digest[:19]})"))
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            pfd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                rmtree_at(pfd, tmp.name)
            finally:
                os.close(pfd)
        raise
    return stats
