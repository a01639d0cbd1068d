"""Registry storage: a small interface, and the filesystem backend behind it.

Blobs are content-addressed and shared by every repository; a repository sees
a blob only through a link of its own, so tenants never see each other's bytes.

Layout under the root::

    blobs/sha256/ab/<hex>                        verified content (manifests too)
    uploads/<org>/<id>                           in-progress upload sessions (``_`` without orgs)
    locks/<2 hex>                                flock(2) files, one per stripe of digests
    repos/<name>/_layers/sha256/<hex>            the repository may read this blob
    repos/<name>/_manifests/revisions/sha256/<hex>   {"mediaType": ...}
    repos/<name>/_manifests/tags/<tag>           the tag's digest
    repos/<name>/_referrers/<subject hex>/<hex>  descriptor of a referrer

Repository components never start with ``_``, so the control directories can't
collide with a name. Every file becomes visible by rename, after it is complete.

Concurrency, across threads and worker processes alike (flock(2) locks, which the
kernel drops when a process dies, so a ``kill -9`` never leaves one held):

- an upload session is written by one request at a time (:meth:`upload_session`);
  a second request to a busy session is refused, never interleaved;
- publishing a blob, linking it into a repository, and GC removing it take the
  blob's lock (:meth:`blob_lock`), so a push that answered 201 can't lose its blob
  or its link to a collection running at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson

from taxiway.fsutil import write_bytes_atomic
from taxiway.oci.digest import Digest
from taxiway.registry.errors import DistributionError, storage_error
from taxiway.registry.tenants import parse_duration

UPLOAD_ID = re.compile(r"[0-9a-f]{32}(?:\.once)?")  # upload session ids (".once": a monolithic upload)
ORG_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")  # org names, as tenants allows them

# Idle upload sessions expire after this long, as distribution's upload purging
# does by default (age 168h, checked every 24h); TAXIWAY_REGISTRY_UPLOAD_MAX_AGE overrides it.
UPLOAD_MAX_AGE = 168 * 3600
PURGE_INTERVAL = 24 * 3600
# Per org: open upload sessions, and bytes held in them (which also bounds the largest blob).
MAX_UPLOAD_SESSIONS = 200
MAX_UPLOAD_BYTES = 10 * 1024**3


def configured_upload_max_age() -> float:
    """The configured idle age after which an upload session is gone (seconds)."""
    raw = os.environ.get("TAXIWAY_REGISTRY_UPLOAD_MAX_AGE")
    return parse_duration(raw) if raw else UPLOAD_MAX_AGE


def too_many_sessions(n: int) -> DistributionError:
    """The 429 for an org that already has ``n`` open upload sessions, the most allowed (every driver answers it)."""
    return DistributionError("TOOMANYREQUESTS", message="too many open upload sessions",
                             detail=f"this organisation has {n} open upload sessions, the most allowed; finish or "
                                    f"cancel (DELETE) some, or wait for idle ones to expire")


class SessionBusy(DistributionError):
    """Another request is writing to this upload session (distribution answers such requests with an error too)."""

    def __init__(self, headers: dict[str, str] | None = None):
        super().__init__("RANGE_INVALID", message="upload session busy: another request is writing to it",
                         headers=headers)


@dataclass(frozen=True)
class BlobBody:
    """A stored blob as the server sends it: its size and modification time, and where its bytes are.

    ``file`` names a local file (the filesystem driver; sent with sendfile(2) where the
    server can); otherwise ``data`` holds the bytes (the in-memory driver). A driver
    for remote storage would add a redirect URL here, as distribution's drivers do.
    """

    size: int
    mtime: float
    file: str | None = None
    data: bytes | None = None


class Storage(Protocol):
    """What the server needs from a storage backend: the filesystem driver below, the in-memory one
    in ``memory.py`` (unit tests), an S3 one later. Handlers see digests, names and bytes, never paths."""

    upload_max_age: float  # seconds an idle upload session lives

    def blob_body(self, digest: str) -> BlobBody | None: ...
    def blob_size(self, digest: str) -> int | None: ...
    def read_blob(self, digest: str) -> bytes: ...
    def touch_blob(self, digest: str) -> bool: ...
    def blob_locks(self, shared: Iterable[str], exclusive: Iterable[str] = ()) -> contextlib.AbstractContextManager[None]: ...
    def has_link(self, repo: str, digest: str) -> bool: ...
    def link(self, repo: str, digest: str, source: str | None = None) -> bool: ...
    def unlink(self, repo: str, digest: str) -> bool: ...
    def new_upload(self, org: str = "", *, max_sessions: int | None = None, resumable: bool = True) -> str: ...
    def upload_size(self, upload_id: str, org: str = "") -> int | None: ...
    def upload_bytes(self, org: str = "") -> int: ...
    def upload_session(self, upload_id: str, org: str = "") -> contextlib.AbstractContextManager[BinaryIO]: ...
    def commit_upload(self, upload_id: str, digest: str, hasher=None, *, session: BinaryIO | None = None,
                      repo: str | None = None, org: str = "") -> int: ...
    def drop_upload(self, upload_id: str, org: str = "") -> None: ...
    def put_manifest(self, repo: str, body: bytes, digest: str, media_type: str, *, locked: bool = False) -> None: ...
    def manifest_media_type(self, repo: str, digest: str) -> str | None: ...
    def resolve_tag(self, repo: str, tag: str) -> str | None: ...
    def set_tag(self, repo: str, tag: str, digest: str) -> None: ...
    def tags(self, repo: str) -> list[str] | None: ...
    def delete_tag(self, repo: str, tag: str) -> bool: ...
    def delete_manifest(self, repo: str, digest: str) -> bool: ...
    def revisions(self, repo: str) -> list[str]: ...
    def add_referrer(self, repo: str, subject: str, digest: str, descriptor: dict) -> None: ...
    def referrers(self, repo: str, subject: str) -> list[dict]: ...
    def repositories(self, prefix: str = "") -> list[str]: ...
    def delete_repository(self, repo: str, keep_links: bool = False) -> bool: ...
    def expire_uploads(self, idle: float | None = None, *, startup: bool = False) -> int: ...


def _hex(digest: str) -> tuple[str, str]:
    d = Digest.parse(digest)  # validated before it names a file
    return d.algorithm, d.hex


def _publish(path: Path, data: bytes) -> None:
    """Write a small file by rename (atomic for readers; links, tags and revision records need no fsync:
    after a power cut a missing one is a push to repeat, never a wrong answer)."""
    write_bytes_atomic(path, data, fsync=False)


def _digests(d: Path) -> list[str]:
    """``algo:hex`` of the files under ``d/<algo>/``; what a concurrent delete removed is simply absent."""
    out: list[str] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for a in d.iterdir():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                out += [f"{a.name}:{p.name}" for p in a.iterdir() if not p.name.startswith(".")]
    return out


def _storage_error(e: OSError) -> DistributionError:
    return storage_error(e)


class FilesystemStorage:
    """The default backend: plain files and atomic renames under ``root``."""

    def __init__(self, root: str | os.PathLike, upload_max_age: float | None = None):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.repos = self.root / "repos"
        self.locks = self.root / "locks"
        self.upload_max_age = configured_upload_max_age() if upload_max_age is None else upload_max_age
        for d in (self.blobs, self.uploads, self.repos, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def blob_lock(self, digest: str) -> Iterator[None]:
        """Hold the lock of ``digest``'s stripe: publishing, linking and GC's removal of a blob take it."""
        _, hx = _hex(digest)
        fd = os.open(self.locks / hx[:2], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def blob_locks(self, shared: Iterable[str], exclusive: Iterable[str] = ()) -> Iterator[None]:
        """Hold several digests' locks at once: ``shared`` keeps GC from removing those blobs,
        ``exclusive`` keeps every other writer out too. Taken in one global order, so holders of
        several never deadlock (everyone else holds one at a time)."""
        modes: dict[str, int] = {}
        for d in shared:
            modes.setdefault(_hex(d)[1][:2], fcntl.LOCK_SH)
        for d in exclusive:
            modes[_hex(d)[1][:2]] = fcntl.LOCK_EX
        fds: list[int] = []
        try:
            for stripe in sorted(modes):
                fds.append(os.open(self.locks / stripe, os.O_RDWR | os.O_CREAT, 0o600))
                fcntl.flock(fds[-1], modes[stripe])
            yield
        finally:
            for fd in fds:
                os.close(fd)  # releases the lock

    # -- blobs ---------------------------------------------------------
    def blob_body(self, digest: str) -> BlobBody | None:
        """The blob's file, size and time, or None when it is not stored (or was removed just now)."""
        p = self._blob_target(digest)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return BlobBody(size=st.st_size, mtime=st.st_mtime, file=str(p))

    def _blob_target(self, digest: str) -> Path:
        algo, hx = _hex(digest)
        return self.blobs / algo / hx[:2] / hx

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob_target(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read_blob(self, digest: str) -> bytes:
        return self._blob_target(digest).read_bytes()

    def touch_blob(self, digest: str) -> bool:
        """Mark a blob as just used so an online GC's grace period protects it."""
        try:
            os.utime(self._blob_target(digest))
            return True
        except FileNotFoundError:
            return False

    def _repo(self, repo: str) -> Path:
        return self.repos / repo

    def _layer_link(self, repo: str, digest: str) -> Path:
        algo, hx = _hex(digest)
        return self._repo(repo) / "_layers" / algo / hx

    def has_link(self, repo: str, digest: str) -> bool:
        return self._layer_link(repo, digest).exists() and self._blob_target(digest).exists()

    def link(self, repo: str, digest: str, source: str | None = None) -> bool:
        """Let ``repo`` read the blob (when it exists, and ``source``, if given, may read it); False if not."""
        with self.blob_lock(digest):
            return self._link(repo, digest, source)

    def _link(self, repo: str, digest: str, source: str | None = None) -> bool:
        if source is not None and not self.has_link(source, digest):
            return False
        if not self.touch_blob(digest):  # fresh for GC's grace, and there at all
            return False
        try:
            _publish(self._layer_link(repo, digest), b"")
        except OSError as e:
            raise _storage_error(e) from e
        return True

    def unlink(self, repo: str, digest: str) -> bool:
        try:
            self._layer_link(repo, digest).unlink()
            return True
        except FileNotFoundError:
            return False

    # -- uploads -------------------------------------------------------
    def _org_uploads(self, org: str) -> Path:
        if org and not ORG_NAME.fullmatch(org):
            raise DistributionError("BLOB_UPLOAD_UNKNOWN")
        return self.uploads / (org or "_")  # no org starts with "_"

    def new_upload(self, org: str = "", *, max_sessions: int | None = None, resumable: bool = True) -> str:
        """A new empty session of ``org``; TOOMANYREQUESTS when the org already has ``max_sessions`` open.

        A session that is not ``resumable`` (a monolithic upload, never named to a client)
        is removed at the next start.
        """
        upload_id = uuid.uuid4().hex + ("" if resumable else ".once")
        d = self._org_uploads(org)
        try:
            d.mkdir(exist_ok=True)
            with self._org_lock(org):  # count and create as one step, across workers
                if max_sessions is not None:
                    n = len(self._sessions(d))
                    if n >= max_sessions:
                        raise too_many_sessions(n)
                (d / upload_id).touch(exist_ok=False)
        except OSError as e:
            raise _storage_error(e) from e
        return upload_id

    @contextlib.contextmanager
    def _org_lock(self, org: str) -> Iterator[None]:
        fd = os.open(self.locks / f"uploads-{org or '_'}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _sessions(self, d: Path) -> list[os.stat_result]:
        """The unexpired sessions in the org directory ``d``."""
        out, now = [], time.time()
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return out
        for name in names:
            if UPLOAD_ID.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(d / name)
                    if not self._expired(st, now):
                        out.append(st)
        return out

    def upload_bytes(self, org: str = "") -> int:
        """Bytes held in ``org``'s open upload sessions."""
        return sum(st.st_size for st in self._sessions(self._org_uploads(org)))

    def _upload(self, upload_id: str, org: str = "") -> Path:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise DistributionError("BLOB_UPLOAD_UNKNOWN")
        return self._org_uploads(org) / upload_id

    def _expired(self, st: os.stat_result, now: float | None = None) -> bool:
        return (now or time.time()) - st.st_mtime > self.upload_max_age

    def upload_size(self, upload_id: str, org: str = "") -> int | None:
        """The session's size, or None when there is no such session (or it expired)."""
        try:
            st = self._upload(upload_id, org).stat()
        except (FileNotFoundError, DistributionError):
            return None
        return None if self._expired(st) else st.st_size

    @contextlib.contextmanager
    def upload_session(self, upload_id: str, org: str = "") -> Iterator[BinaryIO]:
        """The session's file, held exclusively for one request.

        Raises :class:`SessionBusy` while another request holds it, and
        BLOB_UPLOAD_UNKNOWN when it is gone: expired, dropped, or committed
        (renamed into the blobs) between our open and our lock.
        """
        path = self._upload(upload_id, org)
        try:
            f = open(path, "r+b")
        except FileNotFoundError:
            raise DistributionError("BLOB_UPLOAD_UNKNOWN") from None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SessionBusy() from None
            st = os.fstat(f.fileno())
            try:
                current = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                current = False
            if not current:
                raise DistributionError("BLOB_UPLOAD_UNKNOWN")
            if self._expired(st):
                path.unlink(missing_ok=True)
                raise DistributionError("BLOB_UPLOAD_UNKNOWN", detail="the upload session expired")
            f.seek(0, os.SEEK_END)
            yield f

    def commit_upload(self, upload_id: str, digest: str, hasher=None, *, session: BinaryIO | None = None,
                      repo: str | None = None, org: str = "") -> int:
        """Verify the session's bytes against ``digest``, publish them as a blob and link ``repo`` to it.

        ``session`` is the file from :meth:`upload_session` when the caller holds it
        (otherwise it is taken here). ``hasher`` is the running hash when the caller
        kept one for exactly the bytes on disk; otherwise the file is hashed from disk.
        A verified upload replaces whatever file held that digest before, so a
        blob damaged on disk never shadows good content.
        """
        src = self._upload(upload_id, org)
        d = Digest.parse(digest)
        with contextlib.ExitStack() as stack:
            f = session if session is not None else stack.enter_context(self.upload_session(upload_id, org))
            f.flush()
            if hasher is None:
                hasher = hashlib.new(d.algorithm)
                f.seek(0)
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
            if hasher.hexdigest() != d.hex:
                self.drop_upload(upload_id, org)
                raise DistributionError("DIGEST_INVALID", detail=f"content does not hash to {digest}")
            target = self._blob_target(digest)
            with self.blob_lock(digest):
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, target)  # the session's lock stays on the file until we close it
                except OSError as e:
                    self.drop_upload(upload_id, org)
                    raise _storage_error(e) from e
                if repo is not None:
                    self._link(repo, digest)
        return size

    def drop_upload(self, upload_id: str, org: str = "") -> None:
        with contextlib.suppress(FileNotFoundError, DistributionError):
            self._upload(upload_id, org).unlink()

    def expire_uploads(self, idle: float | None = None, *, startup: bool = False) -> int:
        """Remove sessions idle for longer than ``idle`` seconds (default: the max age); busy ones stay.

        ``startup`` also removes what no client can resume: monolithic uploads cut off by
        a crash, and sessions stored directly under ``uploads/`` by versions that kept no org.
        """
        idle = self.upload_max_age if idle is None else idle
        now, n = time.time(), 0
        paths = []
        for p in list(self.uploads.iterdir()):
            if p.is_dir():
                paths += [(q, startup and q.name.endswith(".once")) for q in p.iterdir()]
            else:
                paths.append((p, True))  # the old flat layout: its sessions are unknown now
        for p, unresumable in paths:
            if not UPLOAD_ID.fullmatch(p.name):
                continue
            # Age first, without the lock: taking it, even for a moment, on a session
            # in use would make that client's next PATCH a "session busy" 416.
            try:
                if not unresumable and now - p.stat().st_mtime < idle:
                    continue
            except FileNotFoundError:
                continue
            try:
                f = open(p, "rb")
            except (FileNotFoundError, IsADirectoryError):
                continue
            with f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a request is writing to it: in use, whatever its age
                st = os.fstat(f.fileno())
                with contextlib.suppress(FileNotFoundError):
                    if (unresumable or now - st.st_mtime >= idle) and os.stat(p).st_ino == st.st_ino:
                        p.unlink()
                        n += 1
        return n

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files left in the blobs by a crash (older than ``older_than`` seconds)."""
        now, n = time.time(), 0
        for tmp in self.blobs.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime >= older_than:
                    tmp.unlink()
                    n += 1
        return n

    def clean_uploads(self, older_than: float = 0.0) -> int:
        """At startup: remove upload sessions older than ``older_than`` seconds, those no client
        can resume, and stray temp files. Resumable sessions survive a restart, as in distribution."""
        n = self.expire_uploads(older_than, startup=True)
        self.clean_temp()
        return n

    def write_blob(self, data: bytes, digest: str, *, locked: bool = False) -> None:
        """Store small verified content (manifests) as a blob: temp, fsync, rename.

        ``locked``: the caller holds the digest's lock (see :meth:`blob_locks`)."""
        target = self._blob_target(digest)
        with contextlib.nullcontext() if locked else self.blob_lock(digest):
            with contextlib.suppress(FileNotFoundError):
                if target.read_bytes() == data:  # never trust a damaged copy: compare, it is small
                    os.utime(target)
                    return
            try:
                write_bytes_atomic(target, data)
            except OSError as e:
                raise _storage_error(e) from e

    # -- manifests and tags --------------------------------------------
    def _revision(self, repo: str, digest: str) -> Path:
        algo, hx = _hex(digest)
        return self._repo(repo) / "_manifests" / "revisions" / algo / hx

    def _tag(self, repo: str, tag: str) -> Path:
        return self._repo(repo) / "_manifests" / "tags" / tag

    def put_manifest(self, repo: str, body: bytes, digest: str, media_type: str, *, locked: bool = False) -> None:
        self.write_blob(body, digest, locked=locked)
        try:
            _publish(self._revision(repo, digest), orjson.dumps({"mediaType": media_type}))
        except OSError as e:
            raise _storage_error(e) from e

    def revision_time(self, repo: str, digest: str) -> float:
        """When the manifest was last put in ``repo`` (GC's grace); FileNotFoundError when it is not there."""
        return self._revision(repo, digest).stat().st_mtime

    def manifest_media_type(self, repo: str, digest: str) -> str | None:
        try:
            return orjson.loads(self._revision(repo, digest).read_bytes())["mediaType"]
        except (FileNotFoundError, NotADirectoryError):
            return None

    def resolve_tag(self, repo: str, tag: str) -> str | None:
        try:
            return self._tag(repo, tag).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        try:
            _publish(self._tag(repo, tag), digest.encode())
        except OSError as e:
            raise _storage_error(e) from e

    def tags(self, repo: str) -> list[str] | None:
        """Sorted tags, or None when the repository does not exist."""
        base = self._repo(repo) / "_manifests"
        if not base.is_dir():
            return None
        try:
            return sorted(p.name for p in (base / "tags").iterdir() if not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):  # none yet, or removed by a concurrent delete
            return []

    def delete_tag(self, repo: str, tag: str) -> bool:
        try:
            self._tag(repo, tag).unlink()
            return True
        except FileNotFoundError:
            return False

    def tags_of(self, repo: str, digest: str) -> list[str]:
        return [t for t in (self.tags(repo) or []) if self.resolve_tag(repo, t) == digest]

    def delete_manifest(self, repo: str, digest: str) -> bool:
        rev = self._revision(repo, digest)
        if not rev.exists():
            return False
        for t in self.tags_of(repo, digest):
            self.delete_tag(repo, t)
        try:
            rev.unlink()
        except FileNotFoundError:
            return False  # a concurrent delete of the same manifest got there first
        algo, hx = _hex(digest)
        # It stops being a referrer of anything in this repository.
        ref_root = self._repo(repo) / "_referrers"
        if ref_root.is_dir():
            for p in ref_root.glob(f"*/{hx}"):
                p.unlink(missing_ok=True)
        return True

    def revisions(self, repo: str) -> list[str]:
        return _digests(self._repo(repo) / "_manifests" / "revisions")

    def layer_links(self, repo: str) -> list[str]:
        return _digests(self._repo(repo) / "_layers")

    # -- referrers -----------------------------------------------------
    def add_referrer(self, repo: str, subject: str, digest: str, descriptor: dict) -> None:
        _, shx = _hex(subject)
        _, hx = _hex(digest)
        try:
            _publish(self._repo(repo) / "_referrers" / shx / hx, orjson.dumps(descriptor))
        except OSError as e:
            raise _storage_error(e) from e

    def referrers(self, repo: str, subject: str) -> list[dict]:
        _, shx = _hex(subject)
        d = self._repo(repo) / "_referrers" / shx
        out = []
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out.append(orjson.loads(p.read_bytes()))
        return out

    # -- repositories --------------------------------------------------
    def repositories(self, prefix: str = "") -> list[str]:
        """Names of repositories holding manifests, sorted; only those under ``prefix``."""
        base = self.repos / prefix if prefix else self.repos
        out: list[str] = []
        if not base.is_dir():
            return out
        for dirpath, dirnames, _ in os.walk(base):
            if "_manifests" in dirnames:
                out.append(os.path.relpath(dirpath, self.repos))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(out)

    def delete_repository(self, repo: str, keep_links: bool = False) -> bool:
        """Forget a repository (its blobs stay until GC); ``keep_links`` keeps its blob links."""
        p = self._repo(repo)
        if not (p / "_manifests").is_dir() and not (p / "_layers").is_dir():
            return False
        for sub in ("_manifests", "_referrers") if keep_links else ("_manifests", "_layers", "_referrers"):
            shutil.rmtree(p / sub, ignore_errors=True)
        # Drop now-empty parent directories so the catalog forgets the name.
        with contextlib.suppress(OSError):
            while p != self.repos and not any(p.iterdir()):
                p.rmdir()
                p = p.parent
        return True

    def all_blobs(self) -> Iterator[tuple[str, Path]]:
        for algo in self.blobs.iterdir():
            for sub in algo.iterdir():
                for p in sub.iterdir():
                    if not p.name.startswith("."):
                        yield f"{algo.name}:{p.name}", p


