"""The local image store: a standard OCI image layout under ``$TAXIWAY_HOME/store``.

Layout (what skopeo and umoci read)::

    oci-layout                  {"imageLayoutVersion": "1.0.0"}
    index.json                  one entry per name, annotated org.opencontainers.image.ref.name
    blobs/sha256/<hex>          content, written to a temp file, verified, renamed

taxiway's own bookkeeping lives beside it under ``.taxiway/`` (ignored by other
tools): the index lock, partial downloads (``ingest/``, resumable) and where each
blob came from (``sources/``, so push can try a cross-repository mount), and the
reference cache (``refs.json``: :mod:`taxiway.oci.refcache`, the store's fast path).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.fsutil import write_bytes_atomic
from taxiway.oci import mediatypes as mt
from taxiway.oci.digest import Digest
from taxiway.oci.image import Descriptor, Platform

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
#: Temp files of writers that died (``kill -9`` mid-write) are removed once this old and unlocked.
TEMP_GRACE = 60.0
#: The temp files :meth:`Store.temp_file` makes: locked by their writer, so a pruner can tell a live one.
_TEMP_PREFIXES = ("blob-", "layer-")


class BlobMismatch(TaxiwayError):
    """Content did not match the digest or size it was announced with."""


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """Hold an fcntl lock (``LOCK_SH`` or ``LOCK_EX``) on ``path`` for the block."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def normalize_name(name: str) -> str:
    """The canonical reference string for a user-typed name (``busybox`` -> ``docker.io/library/busybox:latest``)."""
    from taxiway.oci.reference import Reference

    return str(Reference.parse(name))


def parse_json(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a manifest/config/index; a one-line error when it is not a JSON object."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what} is not valid JSON ({e.__class__.__name__})", "the registry or file is serving something that is not an image") from e
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} is not a JSON object", "the registry or file is serving something that is not an image")
    return obj


def select_platform(index: dict[str, Any], want: Platform, name: str = "image") -> Descriptor:
    """Pick the manifest for ``want`` from an index; the error lists the platforms that exist."""
    descs = [Descriptor.from_json(m) for m in index.get("manifests", []) if isinstance(m, dict)]
    available = []
    for d in descs:
        if d.platform is None or d.media_type not in mt.MANIFEST_TYPES | {""}:
            continue  # attestations, nested indexes, artifacts without platform
        if d.platform.os == "unknown":
            continue
        available.append(d)
        if want.matches(d.platform):
            return d
    shown = ", ".join(sorted({str(d.platform) for d in available})) or "none"
    raise NotFound(f"{name} has no manifest for platform {want} (it has: {shown})",
                   "pick one with --platform os/arch[/variant], or use --all-platforms")


class StoreImage:
    """One single-platform image in the store; implements :class:`taxiway.oci.image.Image`."""

    def __init__(self, store: Store, desc: Descriptor, name: str | None = None):
        self.store = store
        self.descriptor = desc
        self.name = name
        self._manifest_bytes = store.read_blob(desc.digest)
        self._manifest = parse_json(self._manifest_bytes, f"manifest {desc.digest}")
        mtype = self._manifest.get("mediaType") or desc.media_type
        if mtype not in mt.MANIFEST_TYPES:
            raise InvalidInput(f"{desc.digest} is a {mtype or 'blob of unknown type'}, not an image manifest", "pass a single-platform image")
        self._media_type = mtype
        self._config_bytes: bytes | None = None

    def manifest_bytes(self) -> bytes:
        """The raw manifest."""
        return self._manifest_bytes

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest."""
        return self._manifest

    def media_type(self) -> str:
        """OCI or Docker schema 2 manifest media type."""
        return self._media_type

    def digest(self) -> str:
        """The manifest digest."""
        return self.descriptor.digest

    def config_descriptor(self) -> Descriptor:
        """The config's descriptor."""
        return Descriptor.from_json(self._manifest.get("config") or {})

    def config_bytes(self) -> bytes:
        """The raw config blob."""
        if self._config_bytes is None:
            self._config_bytes = self.store.read_blob(self.config_descriptor().digest)
        return self._config_bytes

    def config(self) -> dict[str, Any]:
        """The parsed config."""
        return parse_json(self.config_bytes(), f"config of {self.digest()}")

    def layers(self) -> list[Descriptor]:
        """Layer descriptors, base first."""
        return [Descriptor.from_json(d) for d in self._manifest.get("layers") or []]

    def open_blob(self, digest: str) -> BinaryIO:
        """A blob's bytes from the store."""
        return self.store.open_blob(digest)

    def __repr__(self) -> str:
        return f"StoreImage({self.name or self.digest()})"


class Store:
    """An OCI image layout on disk, with verified writes and a locked index."""

    def __init__(self, root: Path | str | None = None):
        if root is None:
            from taxiway.paths import store_dir

            root = store_dir()
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.meta = self.root / ".taxiway"
        self._temps_pruned = False
        self._ensure()

    # -- layout -------------------------------------------------------------

    def _ensure(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.meta / "ingest").mkdir(parents=True, exist_ok=True)
        (self.meta / "sources").mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").exists():
            write_bytes_atomic(self.root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.root / "index.json").exists():
            with self._locked():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []})

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _flock(self.meta / "index.lock", fcntl.LOCK_EX)

    def lease(self) -> contextlib.AbstractContextManager[None]:
        """Hold off :meth:`prune` while blobs are being added but not yet named (a pull, a load, a build).

        Any number of leases can be held at once (a shared lock); prune waits for them.
        """
        return _flock(self.meta / "gc.lock", fcntl.LOCK_SH)

    def _read_index(self) -> dict[str, Any]:
        try:
            raw = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        idx = parse_json(raw, f"{self.root}/index.json")
        idx.setdefault("manifests", [])
        return idx

    def _write_index(self, idx: dict[str, Any]) -> None:
        write_bytes_atomic(self.root / "index.json", json.dumps(idx, indent=None, separators=(",", ":")).encode())

    # -- blobs --------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a blob lives (the digest is validated first, so it can't name another file)."""
        d = Digest.parse(digest)
        if d.algorithm != "sha256":
            raise InvalidInput(f"unsupported digest algorithm in {digest}", "the store holds sha256 blobs only")
        return self.blobs / d.hex

    def has_blob(self, digest: str) -> bool:
        """True if the blob is in the store."""
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for reading; NotFound if it is missing."""
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", "pull the image again") from None

    def read_blob(self, digest: str) -> bytes:
        """A (small) blob's bytes: manifests and configs."""
        with self.open_blob(digest) as f:
            return f.read()

    def blob_size(self, digest: str) -> int:
        """Size of a stored blob."""
        return self.blob_path(digest).stat().st_size

    def write_blob(self, data: bytes | BinaryIO, expected_digest: str | None = None, expected_size: int | None = None,
                   media_type: str = "application/octet-stream") -> Descriptor:
        """Store a blob: temp file, verify digest and size, rename. Returns its descriptor.

        With ``expected_digest`` a mismatch raises :class:`BlobMismatch` and nothing is stored.
        """
        # Not fsutil.atomic_write (which index.json and every small record use), on purpose: a
        # blob's name is its digest, known only once the bytes are hashed (and checked before
        # anything is published); its temp file must stay out of blobs/ (skopeo and umoci
        # read every file there as the layout's content) and be flock-ed so prune_temps
        # can tell a live writer from a killed one; downloads stream into resumable
        # ``.partial`` files that outlive the process (commit_ingest). The rule is the same:
        # fsync, then one rename onto the final name, temp removed on any failure.
        if expected_digest is not None:
            Digest.parse(expected_digest)
            if self.has_blob(expected_digest):  # content-addressed: what is there is already verified
                return Descriptor(media_type, expected_digest, self.blob_size(expected_digest))
        stream: BinaryIO = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        fd, tmp = self.temp_file("blob-")
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                    if expected_size is not None and size > expected_size:
                        break
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            self._check(digest, size, expected_digest, expected_size)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.blobs / h.hexdigest())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return Descriptor(media_type, digest, size)

    def temp_file(self, prefix: str = "blob-") -> tuple[int, str]:
        """A new temp file in the ingest area, as (fd, path), flock-ed by this process until the fd is closed.

        The lock is how :meth:`prune_temps` tells a live writer from one that died
        (``kill -9`` releases it): each store prunes dead writers' files on its first write.
        """
        if prefix not in _TEMP_PREFIXES:
            raise ValueError(f"temp file prefix {prefix!r} is not one of {_TEMP_PREFIXES}")
        if not self._temps_pruned:
            self._temps_pruned = True
            self.prune_temps()
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.meta / "ingest")
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, tmp

    def prune_temps(self, grace: float = TEMP_GRACE) -> list[str]:
        """Remove temp files of dead writers: older than ``grace`` seconds and not locked. Returns their names.

        Only :meth:`temp_file`'s names: resumable downloads (``.partial``) are kept for
        the next pull, and :meth:`prune` ages them out.
        """
        removed = []
        cutoff = time.time() - grace
        for p in (self.meta / "ingest").iterdir():
            if not (p.name.endswith(".tmp") and p.name.startswith(_TEMP_PREFIXES)):
                continue
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # gone (renamed into place) or not a plain file
            try:
                st = os.fstat(fd)
                if st.st_mtime >= cutoff:
                    continue  # maybe between mkstemp and its flock, or between close and rename
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                with contextlib.suppress(FileNotFoundError):
                    # Unlink only the file we locked, not one a writer put under the same name since.
                    if os.stat(p, follow_symlinks=False).st_ino == st.st_ino:
                        os.unlink(p)
                        removed.append(p.name)
            finally:
                os.close(fd)
        return removed

    @staticmethod
    def _check(digest: str, size: int, expected_digest: str | None, expected_size: int | None) -> None:
        if expected_size is not None and size != expected_size:
            raise BlobMismatch(f"blob {expected_digest or digest} has {'more than ' if size > expected_size else ''}{size} bytes, expected {expected_size}",
                               "the source is corrupt or changed underneath; nothing was stored")
        if expected_digest is not None and digest != expected_digest:
            raise BlobMismatch(f"blob content has digest {digest}, expected {expected_digest}",
                               "the source is corrupt or tampered with; nothing was stored")

    def ingest_path(self, digest: str) -> Path:
        """The partial-download file for a blob (kept between runs so downloads resume)."""
        return self.meta / "ingest" / (Digest.parse(digest).hex + ".partial")

    def commit_ingest(self, digest: str, size: int | None, hashed: str | None = None) -> Descriptor:
        """Verify a completed partial download and move it into ``blobs/``.

        ``hashed`` is the digest the caller already computed while writing; if
        absent the file is hashed here. On mismatch the partial file is deleted.
        """
        part = self.ingest_path(digest)
        actual_size = part.stat().st_size
        if hashed is None:
            h = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            hashed = "sha256:" + h.hexdigest()
        try:
            self._check(hashed, actual_size, digest, size)
        except BlobMismatch:
            part.unlink(missing_ok=True)
            raise
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(part, 0o644)
        os.replace(part, self.blob_path(digest))
        return Descriptor("application/octet-stream", digest, actual_size)

    # -- where blobs came from (for cross-repository mounts) -----------------

    def add_source(self, digest: str, repository_name: str) -> None:
        """Remember that ``digest`` was seen in ``registry/repository``."""
        p = self.meta / "sources" / Digest.parse(digest).hex
        if repository_name in self.sources(digest):
            return
        with open(p, "a") as f:
            f.write(repository_name + "\n")

    def sources(self, digest: str) -> list[str]:
        """Every ``registry/repository`` the blob was pulled from or pushed to."""
        p = self.meta / "sources" / Digest.parse(digest).hex
        try:
            return [line for line in p.read_text().splitlines() if line]
        except FileNotFoundError:
            return []

    # -- manifests, names ---------------------------------------------------

    def put_manifest(self, raw: bytes, media_type: str) -> str:
        """Store a manifest or index (verbatim); returns its digest."""
        return self.write_blob(raw, media_type=media_type).digest

    def tag(self, name: str, desc: Descriptor) -> None:
        """Point ``name`` (a full reference) at ``desc`` in index.json, replacing any old entry."""
        ref = normalize_name(name)
        if not self.has_blob(desc.digest):
            raise NotFound(f"manifest {desc.digest} is not in the store", "pull the image first")
        entry = Descriptor(desc.media_type, desc.digest, desc.size, annotations={REF_NAME: ref},
                           platform=desc.platform).to_json()
        with self._locked():
            idx = self._read_index()
            idx["manifests"] = [m for m in idx["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != ref]
            idx["manifests"].append(entry)
            self._write_index(idx)

    def untag(self, name: str) -> Descriptor:
        """Remove a name from index.json; returns what it pointed at."""
        ref = self._lookup_name(name)
        with self._locked():
            idx = self._read_index()
            keep, gone = [], None
            for m in idx["manifests"]:
                if (m.get("annotations") or {}).get(REF_NAME) == ref:
                    gone = m
                else:
                    keep.append(m)
            if gone is None:
                raise NotFound(f"no image named {name} in the store", "see `taxiway images`")
            idx["manifests"] = keep
            self._write_index(idx)
        return Descriptor.from_json(gone)

    def images(self) -> list[tuple[str, Descriptor]]:
        """Every (name, descriptor) in index.json, in order."""
        out = []
        for m in self._read_index()["manifests"]:
            name = (m.get("annotations") or {}).get(REF_NAME)
            if name:
                out.append((name, Descriptor.from_json(m)))
        return out

    def _lookup_name(self, name: str) -> str:
        names = {n for n, _ in self.images()}
        if name in names:
            return name
        with contextlib.suppress(InvalidInput):
            ref = normalize_name(name)
            if ref in names:
                return ref
        return name

    def resolve(self, ref_or_digest: str) -> Descriptor:
        """A name, a digest, or a unique prefix of a stored manifest digest -> its descriptor."""
        images = self.images()
        name = self._lookup_name(ref_or_digest)
        for n, d in images:
            if n == name:
                return d
        if Digest.is_valid(ref_or_digest):
            for _, d in images:
                if d.digest == ref_or_digest:
                    return d
            if self.has_blob(ref_or_digest):
                return self._sniff(ref_or_digest)
        else:
            prefix = ref_or_digest.removeprefix("sha256:")
            if 4 <= len(prefix) < 64 and all(c in "0123456789abcdef" for c in prefix):
                hits = {d.digest: d for _, d in images if d.digest.removeprefix("sha256:").startswith(prefix)}
                if len(hits) == 1:
                    return next(iter(hits.values()))
        raise NotFound(f"no image {ref_or_digest} in the store", "see `taxiway images`, or `taxiway pull` it first")

    def _sniff(self, digest: str) -> Descriptor:
        raw = self.read_blob(digest)
        obj = parse_json(raw, f"blob {digest}")
        mtype = obj.get("mediaType") or (mt.OCI_INDEX if "manifests" in obj else mt.OCI_MANIFEST)
        return Descriptor(mtype, digest, len(raw))

    def image(self, ref: str, platform: Platform | None = None) -> StoreImage:
        """The single-platform image for ``ref`` (an index is resolved to ``platform``, default the host).

        For the host platform the answer goes through the store's reference cache
        (:mod:`taxiway.oci.refcache`): a hit skips the index walk, a miss is recorded,
        so :func:`taxiway.oci.refcache.lookup` answers the next caller without the store.
        """
        from taxiway.oci import refcache

        index_text = None
        if platform is None:
            cached = refcache.descriptor(ref, self.root)
            if cached is not None and self.has_blob(cached[1]):
                return StoreImage(self, Descriptor(*cached), ref)
            if not Digest.is_valid(ref):  # a digest resolves without the index: not worth a record
                index_text = refcache.index_text(self.root)  # read before resolving: see refcache.record
        image = self._image(ref, platform)
        if index_text is not None:
            refcache.record(self.root, index_text, ref, image.media_type(), image.digest(), image.descriptor.size,
                            image.config())
        return image

    def _image(self, ref: str, platform: Platform | None) -> StoreImage:
        desc = self.resolve(ref)
        seen = 0
        while desc.media_type in mt.INDEX_TYPES or desc.media_type == "":
            raw = self.read_blob(desc.digest)
            obj = parse_json(raw, f"index {desc.digest}")
            if obj.get("mediaType") in mt.MANIFEST_TYPES or "layers" in obj:
                desc = Descriptor(obj.get("mediaType") or mt.OCI_MANIFEST, desc.digest, desc.size)
                break
            desc = select_platform(obj, platform or Platform.host(), ref)
            seen += 1
            if seen > 4:
                raise InvalidInput(f"{ref} nests indexes too deeply", "this is not a usable image")
        if not self.has_blob(desc.digest):
            raise NotFound(f"{ref} for {desc.platform or 'this platform'} is not in the store",
                           f"pull it with `taxiway pull {ref} --platform {desc.platform}`" if desc.platform else "pull it again")
        return StoreImage(self, desc, ref)

    # -- garbage collection -------------------------------------------------

    def referenced(self) -> set[str]:
        """Digests reachable from index.json (manifests, indexes, configs, layers)."""
        seen: set[str] = set()
        todo = [d.digest for _, d in self.images()]
        todo += [m["digest"] for m in self._read_index()["manifests"] if isinstance(m, dict) and "digest" in m]
        while todo:
            dg = todo.pop()
            if dg in seen or not Digest.is_valid(dg):
                continue
            seen.add(dg)
            if not self.has_blob(dg):
                continue
            p = self.blob_path(dg)
            if p.stat().st_size > 4 << 20:
                continue  # a layer, not a manifest
            try:
                obj = json.loads(p.read_bytes())
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(obj, dict):
                continue
            for m in obj.get("manifests") or []:
                if isinstance(m, dict) and "digest" in m:
                    todo.append(m["digest"])
            cfg = obj.get("config")
            if isinstance(cfg, dict) and "digest" in cfg and "layers" in obj:
                todo.append(cfg["digest"])
            for layer in obj.get("layers") or []:
                if isinstance(layer, dict) and "digest" in layer:
                    todo.append(layer["digest"])
            subject = obj.get("subject")
            if isinstance(subject, dict) and "digest" in subject:
                todo.append(subject["digest"])
        return seen

    def prune(self) -> list[str]:
        """Remove blobs no name reaches, and stale temp files; returns the removed digests."""
        from taxiway.oci import refcache

        removed = []
        with _flock(self.meta / "gc.lock", fcntl.LOCK_EX), self._locked():
            refcache.drop(self.root)  # a cached digest reference may point at a blob removed here
            keep = self.referenced()
            for p in self.blobs.iterdir():
                dg = "sha256:" + p.name
                if dg not in keep and Digest.is_valid(dg):
                    p.unlink(missing_ok=True)
                    (self.meta / "sources" / p.name).unlink(missing_ok=True)
                    removed.append(dg)
            self.prune_temps()
            stale = time.time() - 3600  # a concurrent pull may still be writing newer ones
            for p in (self.meta / "ingest").iterdir():
                if p.name.endswith(".tmp") and p.name.startswith(_TEMP_PREFIXES):
                    continue  # prune_temps decided: still locked by a live writer
                with contextlib.suppress(FileNotFoundError):
                    if p.stat().st_mtime < stale:
                        p.unlink()
        return sorted(removed)

    def disk_usage(self) -> int:
        """Bytes used by blobs."""
        return sum(p.stat().st_size for p in self.blobs.iterdir() if p.is_file())
