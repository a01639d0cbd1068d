"""Registry storage: a small interface, and the filesystem backend behind it.

Blobs are content-addressed and shared by every repository; a repository sees
a blob only through a link of its own, so tenants never see each other's bytes.

Layout under the root::

    blobs/sha256/ab/<hex>                        verified content (manifests too)
    uploads/<id>                                 in-progress upload sessions
    repos/<name>/_layers/sha256/<hex>            the repository may read this blob
    repos/<name>/_manifests/revisions/sha256/<hex>   {"mediaType": ...}
    repos/<name>/_manifests/tags/<tag>           the tag's digest
    repos/<name>/_referrers/<subject hex>/<hex>  descriptor of a referrer

Repository components never start with ``_``, so the control directories can't
collide with a name. Every file becomes visible by rename, after it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import orjson

from taxiway.oci.digest import Digest
from taxiway.registry.errors import RegistryError


class Storage(Protocol):
    """What the server needs from a storage backend (filesystem now, S3 later)."""

    def blob_path(self, digest: str) -> Path | None: ...  # a local file to send; S3 would redirect instead
    def blob_size(self, digest: str) -> int | None: ...
    def read_blob(self, digest: str) -> bytes: ...
    def touch_blob(self, digest: str) -> bool: ...
    def has_link(self, repo: str, digest: str) -> bool: ...
    def link(self, repo: str, digest: str) -> None: ...
    def unlink(self, repo: str, digest: str) -> bool: ...
    def new_upload(self) -> str: ...
    def upload_size(self, upload_id: str) -> int | None: ...
    def open_upload(self, upload_id: str): ...
    def append_upload(self, upload_id: str, chunk: bytes) -> None: ...
    def commit_upload(self, upload_id: str, digest: str, hasher=None) -> int: ...
    def drop_upload(self, upload_id: str) -> None: ...
    def put_manifest(self, repo: str, body: bytes, digest: str, media_type: str) -> None: ...
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


def _hex(digest: str) -> tuple[str, str]:
    d = Digest.parse(digest)  # validated before it names a file
    return d.algorithm, d.hex


def _publish(path: Path, data: bytes) -> None:
    """Write a small file by rename (atomic for readers; links need no fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _storage_error(e: OSError) -> RegistryError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RegistryError("STORAGE_FULL", detail="no space left on the registry's disk")
    return RegistryError("STORAGE_FULL", message="storage error", detail=e.strerror, status=500)


class FilesystemStorage:
    """The default backend: plain files and atomic renames under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.repos = self.root / "repos"
        for d in (self.blobs, self.uploads, self.repos):
            d.mkdir(parents=True, exist_ok=True)

    # -- blobs ---------------------------------------------------------
    def blob_path(self, digest: str) -> Path | None:
        algo, hx = _hex(digest)
        p = self.blobs / algo / hx[:2] / hx
        return p if p.is_file() else None

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

    def link(self, repo: str, digest: str) -> None:
        try:
            _publish(self._layer_link(repo, digest), b"")
        except OSError as e:
            raise _storage_error(e) from e
        self.touch_blob(digest)

    def unlink(self, repo: str, digest: str) -> bool:
        try:
            self._layer_link(repo, digest).unlink()
            return True
        except FileNotFoundError:
            return False

    # -- uploads -------------------------------------------------------
    def new_upload(self) -> str:
        upload_id = uuid.uuid4().hex
        try:
            (self.uploads / upload_id).touch(exist_ok=False)
        except OSError as e:
            raise _storage_error(e) from e
        return upload_id

    def _upload(self, upload_id: str) -> Path:
        if len(upload_id) != 32 or not all(c in "0123456789abcdef" for c in upload_id):
            raise RegistryError("BLOB_UPLOAD_UNKNOWN")
        return self.uploads / upload_id

    def upload_size(self, upload_id: str) -> int | None:
        try:
            return self._upload(upload_id).stat().st_size
        except (FileNotFoundError, RegistryError):
            return None

    def open_upload(self, upload_id: str):
        """The session's file, opened for appending."""
        try:
            return open(self._upload(upload_id), "r+b")
        except FileNotFoundError:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN") from None

    def append_upload(self, upload_id: str, chunk: bytes) -> None:
        with self.open_upload(upload_id) as f:
            f.seek(0, os.SEEK_END)
            try:
                f.write(chunk)
            except OSError as e:
                raise _storage_error(e) from e

    def commit_upload(self, upload_id: str, digest: str, hasher=None) -> int:
        """Verify the session's bytes against ``digest`` and publish them as a blob.

        ``hasher`` is the running hash when the caller kept one; otherwise the
        file is hashed from disk (after a restart, or in another worker).
        """
        src = self._upload(upload_id)
        d = Digest.parse(digest)
        try:
            with open(src, "rb") as f:
                if hasher is None:
                    hasher = hashlib.new(d.algorithm)
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN") from None
        if hasher.hexdigest() != d.hex:
            self.drop_upload(upload_id)
            raise RegistryError("DIGEST_INVALID", detail=f"content does not hash to {digest}")
        target = self._blob_target(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                src.unlink()
                os.utime(target)
            else:
                os.replace(src, target)
        except OSError as e:
            self.drop_upload(upload_id)
            raise _storage_error(e) from e
        return size

    def drop_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError, RegistryError):
            self._upload(upload_id).unlink()

    def clean_uploads(self, older_than: float = 0.0) -> int:
        """Remove upload sessions (and stray temp files) older than ``older_than`` seconds."""
        now, n = time.time(), 0
        for p in list(self.uploads.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime >= older_than:
                    p.unlink()
                    n += 1
        for tmp in self.blobs.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return n

    def write_blob(self, data: bytes, digest: str) -> None:
        """Store small verified content (manifests) as a blob: temp, fsync, rename."""
        target = self._blob_target(digest)
        if target.exists():
            os.utime(target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise _storage_error(e) from e

    # -- manifests and tags --------------------------------------------
    def _revision(self, repo: str, digest: str) -> Path:
        algo, hx = _hex(digest)
        return self._repo(repo) / "_manifests" / "revisions" / algo / hx

    def _tag(self, repo: str, tag: str) -> Path:
        return self._repo(repo) / "_manifests" / "tags" / tag

    def put_manifest(self, repo: str, body: bytes, digest: str, media_type: str) -> None:
        self.write_blob(body, digest)
        try:
            _publish(self._revision(repo, digest), orjson.dumps({"mediaType": media_type}))
        except OSError as e:
            raise _storage_error(e) from e

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
        d = base / "tags"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

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
        rev.unlink()
        algo, hx = _hex(digest)
        # It stops being a referrer of anything in this repository.
        ref_root = self._repo(repo) / "_referrers"
        if ref_root.is_dir():
            for p in ref_root.glob(f"*/{hx}"):
                p.unlink(missing_ok=True)
        return True

    def revisions(self, repo: str) -> list[str]:
        d = self._repo(repo) / "_manifests" / "revisions"
        if not d.is_dir():
            return []
        return [f"{a.name}:{p.name}" for a in d.iterdir() for p in a.iterdir() if not p.name.startswith(".")]

    def layer_links(self, repo: str) -> list[str]:
        d = self._repo(repo) / "_layers"
        if not d.is_dir():
            return []
        return [f"{a.name}:{p.name}" for a in d.iterdir() for p in a.iterdir() if not p.name.startswith(".")]

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


