"""An in-memory registry storage driver: the :class:`~taxiway.registry.storage.Storage` interface over dicts.

It keeps the filesystem driver's semantics (what exists when, which error a
missing or busy upload session gives, that a blob is visible only once its
digest matches) so the handlers can be unit-tested quickly without a disk, as
distribution tests its handlers over its ``inmemory`` driver. One process
only: its locks are thread locks, and nothing survives a restart. The real
server (``taxiway registry serve``) and the conformance tests use the
filesystem driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from taxiway.oci.digest import Digest
from taxiway.registry.errors import DistributionError
from taxiway.registry.storage import (
    ORG_NAME,
    UPLOAD_ID,
    UPLOAD_MAX_AGE,
    BlobBody,
    SessionBusy,
    too_many_sessions,
)


@dataclass
class _Upload:
    data: io.BytesIO = field(default_factory=io.BytesIO)
    lock: threading.Lock = field(default_factory=threading.Lock)
    touched: float = field(default_factory=time.time)


@dataclass
class _Repo:
    links: set[str] = field(default_factory=set)
    manifests: dict[str, str] | None = None  # digest -> media type; None: no manifest ever (not in the catalog)
    tags: dict[str, str] = field(default_factory=dict)
    referrers: dict[str, dict[str, dict]] = field(default_factory=dict)  # subject -> digest -> descriptor


class MemoryStorage:
    """Blobs, links, manifests, tags, referrers and upload sessions in dicts, guarded by one lock."""

    def __init__(self, upload_max_age: float = UPLOAD_MAX_AGE):
        self.upload_max_age = upload_max_age
        self._lock = threading.RLock()  # every blob lock at once: fine for tests, and never a deadlock
        self._blobs: dict[str, tuple[bytes, float]] = {}  # digest -> (content, last used)
        self._repos: dict[str, _Repo] = {}
        self._uploads: dict[tuple[str, str], _Upload] = {}

    # -- locks ---------------------------------------------------------
    @contextlib.contextmanager
    def blob_lock(self, digest: str) -> Iterator[None]:
        Digest.parse(digest)
        with self._lock:
            yield

    @contextlib.contextmanager
    def blob_locks(self, shared: Iterable[str], exclusive: Iterable[str] = ()) -> Iterator[None]:
        for d in [*shared, *exclusive]:
            Digest.parse(d)
        with self._lock:
            yield

    # -- blobs ---------------------------------------------------------
    def blob_body(self, digest: str) -> BlobBody | None:
        with self._lock:
            found = self._blobs.get(digest)
        if found is None:
            return None
        return BlobBody(size=len(found[0]), mtime=found[1], data=found[0])

    def blob_size(self, digest: str) -> int | None:
        found = self._blobs.get(digest)
        return None if found is None else len(found[0])

    def read_blob(self, digest: str) -> bytes:
        found = self._blobs.get(digest)
        if found is None:
            raise FileNotFoundError(digest)
        return found[0]

    def touch_blob(self, digest: str) -> bool:
        with self._lock:
            found = self._blobs.get(digest)
            if found is None:
                return False
            self._blobs[digest] = (found[0], time.time())
            return True

    def write_blob(self, data: bytes, digest: str, *, locked: bool = False) -> None:
        """Store small verified content (manifests) as a blob."""
        with self._lock:
            self._blobs[digest] = (bytes(data), time.time())

    def _repo(self, repo: str) -> _Repo:
        return self._repos.setdefault(repo, _Repo())

    def has_link(self, repo: str, digest: str) -> bool:
        r = self._repos.get(repo)
        return r is not None and digest in r.links and digest in self._blobs

    def link(self, repo: str, digest: str, source: str | None = None) -> bool:
        with self._lock:
            if source is not None and not self.has_link(source, digest):
                return False
            if not self.touch_blob(digest):
                return False
            self._repo(repo).links.add(digest)
            return True

    def unlink(self, repo: str, digest: str) -> bool:
        with self._lock:
            r = self._repos.get(repo)
            if r is None or digest not in r.links:
                return False
            r.links.discard(digest)
            return True

    # -- uploads -------------------------------------------------------
    @staticmethod
    def _org(org: str) -> str:
        if org and not ORG_NAME.fullmatch(org):
            raise DistributionError("BLOB_UPLOAD_UNKNOWN")
        return org

    def _key(self, upload_id: str, org: str) -> tuple[str, str]:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise DistributionError("BLOB_UPLOAD_UNKNOWN")
        return self._org(org), upload_id

    def _expired(self, u: _Upload, now: float | None = None) -> bool:
        return (now or time.time()) - u.touched > self.upload_max_age

    def _open_sessions(self, org: str) -> list[_Upload]:
        now = time.time()
        return [u for (o, _), u in self._uploads.items() if o == org and not self._expired(u, now)]

    def new_upload(self, org: str = "", *, max_sessions: int | None = None, resumable: bool = True) -> str:
        upload_id = uuid.uuid4().hex + ("" if resumable else ".once")
        key = self._key(upload_id, org)
        with self._lock:
            if max_sessions is not None:
                n = len(self._open_sessions(org))
                if n >= max_sessions:
                    raise too_many_sessions(n)
            self._uploads[key] = _Upload()
        return upload_id

    def upload_size(self, upload_id: str, org: str = "") -> int | None:
        try:
            u = self._uploads.get(self._key(upload_id, org))
        except DistributionError:
            return None
        return None if u is None or self._expired(u) else u.data.getbuffer().nbytes

    def upload_bytes(self, org: str = "") -> int:
        with self._lock:
            return sum(u.data.getbuffer().nbytes for u in self._open_sessions(self._org(org)))

    @contextlib.contextmanager
    def upload_session(self, upload_id: str, org: str = "") -> Iterator[BinaryIO]:
        key = self._key(upload_id, org)
        with self._lock:
            u = self._uploads.get(key)
            if u is None:
                raise DistributionError("BLOB_UPLOAD_UNKNOWN")
            if not u.lock.acquire(blocking=False):
                raise SessionBusy()
        try:
            if self._uploads.get(key) is not u:  # committed or dropped between our look and our lock
                raise DistributionError("BLOB_UPLOAD_UNKNOWN")
            if self._expired(u):
                self._uploads.pop(key, None)
                raise DistributionError("BLOB_UPLOAD_UNKNOWN", detail="the upload session expired")
            u.data.seek(0, io.SEEK_END)
            try:
                yield u.data  # type: ignore[misc]
            finally:
                u.touched = time.time()  # as a write moves a file's mtime
        finally:
            u.lock.release()

    def commit_upload(self, upload_id: str, digest: str, hasher=None, *, session: BinaryIO | None = None,
                      repo: str | None = None, org: str = "") -> int:
        key = self._key(upload_id, org)
        d = Digest.parse(digest)
        with contextlib.ExitStack() as stack:
            f = session if session is not None else stack.enter_context(self.upload_session(upload_id, org))
            data = bytes(f.getbuffer()) if isinstance(f, io.BytesIO) else (f.seek(0), f.read())[1]
            if hasher is None:
                hasher = hashlib.new(d.algorithm, data)
            if hasher.hexdigest() != d.hex:
                self.drop_upload(upload_id, org)
                raise DistributionError("DIGEST_INVALID", detail=f"content does not hash to {digest}")
            with self._lock:
                self._uploads.pop(key, None)
                self._blobs[digest] = (data, time.time())
                if repo is not None:
                    self._repo(repo).links.add(digest)
        return len(data)

    def drop_upload(self, upload_id: str, org: str = "") -> None:
        with contextlib.suppress(DistributionError), self._lock:
            self._uploads.pop(self._key(upload_id, org), None)

    def expire_uploads(self, idle: float | None = None, *, startup: bool = False) -> int:
        idle = self.upload_max_age if idle is None else idle
        now, n = time.time(), 0
        with self._lock:
            for key, u in list(self._uploads.items()):
                if now - u.touched >= idle and u.lock.acquire(blocking=False):
                    try:
                        del self._uploads[key]
                        n += 1
                    finally:
                        u.lock.release()
        return n

    # -- manifests and tags --------------------------------------------
    def put_manifest(self, repo: str, body: bytes, digest: str, media_type: str, *, locked: bool = False) -> None:
        with self._lock:
            self.write_blob(body, digest)
            r = self._repo(repo)
            if r.manifests is None:
                r.manifests = {}
            r.manifests[digest] = media_type

    def manifest_media_type(self, repo: str, digest: str) -> str | None:
        r = self._repos.get(repo)
        return None if r is None or r.manifests is None else r.manifests.get(digest)

    def resolve_tag(self, repo: str, tag: str) -> str | None:
        r = self._repos.get(repo)
        return None if r is None else r.tags.get(tag)

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        with self._lock:
            r = self._repo(repo)
            if r.manifests is None:
                r.manifests = {}
            r.tags[tag] = digest

    def tags(self, repo: str) -> list[str] | None:
        r = self._repos.get(repo)
        return None if r is None or r.manifests is None else sorted(r.tags)

    def delete_tag(self, repo: str, tag: str) -> bool:
        with self._lock:
            r = self._repos.get(repo)
            return r is not None and r.tags.pop(tag, None) is not None

    def delete_manifest(self, repo: str, digest: str) -> bool:
        with self._lock:
            r = self._repos.get(repo)
            if r is None or r.manifests is None or r.manifests.pop(digest, None) is None:
                return False
            r.tags = {t: d for t, d in r.tags.items() if d != digest}
            for refs in r.referrers.values():
                refs.pop(digest, None)
            return True

    def revisions(self, repo: str) -> list[str]:
        r = self._repos.get(repo)
        return [] if r is None or r.manifests is None else list(r.manifests)

    # -- referrers -----------------------------------------------------
    def add_referrer(self, repo: str, subject: str, digest: str, descriptor: dict) -> None:
        with self._lock:
            self._repo(repo).referrers.setdefault(subject, {})[digest] = dict(descriptor)

    def referrers(self, repo: str, subject: str) -> list[dict]:
        r = self._repos.get(repo)
        found = {} if r is None else r.referrers.get(subject, {})
        return [dict(found[d]) for d in sorted(found, key=lambda d: Digest.parse(d).hex)]

    # -- repositories --------------------------------------------------
    def repositories(self, prefix: str = "") -> list[str]:
        return sorted(name for name, r in self._repos.items() if r.manifests is not None
                      and (not prefix or name == prefix or name.startswith(prefix + "/")))

    def delete_repository(self, repo: str, keep_links: bool = False) -> bool:
        with self._lock:
            r = self._repos.get(repo)
            if r is None or (r.manifests is None and not r.links):
                return False
            if keep_links:
                r.manifests, r.tags, r.referrers = None, {}, {}
            else:
                del self._repos[repo]
            return True
