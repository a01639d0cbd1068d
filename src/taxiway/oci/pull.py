"""Pull an image from a registry into the local store.

The pipeline: resolve the reference to a manifest (choosing a platform from an
index), then fetch the config and every missing layer in parallel threads.
Each blob streams into ``.taxiway/ingest/<hex>.partial`` while it is hashed
(and, for layers, decompressed and hashed again to check the config's
``diff_id``); only a blob whose digest and size match is renamed into
``blobs/``. A partial file survives a failed run, so the next pull resumes it
with ``Range``. Names are written last, so a failed pull leaves the store's
names and blobs as they were.

Also here: :func:`ensure_image` (the store's image, pulled only if missing) and
:class:`RemoteImage` (an :class:`~taxiway.oci.image.Image` read straight from a
registry, for copies between registries and exports that skip the store).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from taxiway.errors import InvalidInput, NotFound
from taxiway.oci import mediatypes as mt
from taxiway.oci.client import RegistryClient, RegistryError
from taxiway.oci.digest import Digest
from taxiway.oci.image import Descriptor, Platform
from taxiway.oci.layerio import BlobChecker, DiffHasher, LayerError
from taxiway.oci.progress import Progress
from taxiway.oci.reference import Reference
from taxiway.oci.store import BlobMismatch, Store, parse_json, select_platform

__all__ = ["pull", "ensure_image", "RemoteImage", "PullResult", "Puller", "LayerError", "CorruptLayer", "DiffHasher"]

# What pull says about a damaged layer: the registry's copy is bad, and nothing was stored.
_REPUSH = "the image in the registry is damaged (push it again); nothing was stored"

MAX_CONFIG = 16 << 20  # configs are read into memory; real ones are a few kB
CONFIG_TYPES = frozenset({mt.OCI_CONFIG, mt.DOCKER_CONFIG})
LAYER_TYPES = frozenset({
    mt.OCI_LAYER, mt.OCI_LAYER_GZIP, mt.OCI_LAYER_ZSTD, mt.OCI_LAYER_ND, mt.OCI_LAYER_ND_GZIP, mt.OCI_LAYER_ND_ZSTD,
    mt.DOCKER_LAYER, mt.DOCKER_FOREIGN_LAYER, "application/vnd.docker.image.rootfs.diff.tar",
})

Log = Callable[[str], None]


class _Cancelled(Exception):
    """A download stopped because the pull as a whole is failing."""


#: The error for a layer whose bytes are bad (kept under its old name for callers).
CorruptLayer = LayerError


@dataclass
class PullResult:
    """What a pull did."""

    name: str
    descriptor: Descriptor
    manifests: list[tuple[str, str]] = field(default_factory=list)  # (platform, manifest digest)
    fetched: int = 0  # blobs downloaded
    fetched_bytes: int = 0
    present: int = 0  # blobs already in the store
    warnings: list[str] = field(default_factory=list)


class Puller:
    """Fetches blobs of one repository into the store, in parallel, resumably."""

    def __init__(self, client: RegistryClient, store: Store, repository: str, *, progress: Progress | None = None,
                 log: Log | None = None, retries: int = 5, verify_layers: bool = True, notice: Log | None = None):
        self.client = client
        self.store = store
        self.repository = repository
        self.progress = progress
        self.log = log or (lambda s: None)
        self.notice = notice or (lambda s: None)
        self.retries = retries
        self.verify_layers = verify_layers
        self.new_blobs: list[str] = []
        self.cancelled = threading.Event()  # set when another layer failed or the user pressed Ctrl-C
        self.fetched_bytes = 0

    def fetch(self, desc: Descriptor, diff_id: str | None = None) -> bool:
        """Make sure ``desc`` is in the store; True if it was downloaded now."""
        digest = desc.digest
        if self.store.has_blob(digest):
            return False
        part = self.store.ingest_path(digest)
        with open(part, "ab") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)  # another taxiway may be fetching the same blob
            try:
                if self.store.has_blob(digest):
                    return False
                self._download(desc, part, diff_id)
                self.new_blobs.append(digest)
                return True
            finally:
                fcntl.flock(lockf.fileno(), fcntl.LOCK_UN)

    def _download(self, desc: Descriptor, part: Path, diff_id: str | None) -> None:
        digest, size = desc.digest, desc.size
        compression = mt.layer_compression(desc.media_type) if mt.is_layer(desc.media_type) else "none"
        check = compression if (diff_id and self.verify_layers) else None
        if check == "none" and diff_id == digest:
            check = None  # an uncompressed layer's diff_id is its digest, which is checked anyway
        label = f"layer {digest[:19]}"
        reported = 0  # bytes of this blob reported to progress

        def done(upto: int) -> None:  # the first ``upto`` bytes are on disk
            nonlocal reported
            if self.progress is not None and upto != reported:
                self.progress(desc, upto - reported)
            reported = upto

        def checker() -> BlobChecker:
            return BlobChecker(check, label=label, hint=_REPUSH)

        delay = 0.25
        ver = checker()
        try:
            for attempt in range(self.retries):
                offset = part.stat().st_size
                if offset > size:
                    os.truncate(part, 0)
                    offset = 0
                if offset < ver.fed:  # the file was cut back: start checking over
                    ver.close()
                    ver = checker()
                ver.feed_file(part, offset)  # resumed bytes from an earlier try or run
                try:
                    if offset < size:
                        with self.client.open_blob(self.repository, digest, offset) as resp, open(part, "r+b") as f:
                            if resp.status_code == 200 and offset:
                                offset = 0  # the server ignored Range: start over
                                f.truncate(0)
                                ver.close()
                                ver = checker()
                            f.seek(offset)
                            done(offset)
                            written = offset
                            for chunk in resp.iter_raw():  # as received: a dropped connection loses nothing
                                if self.cancelled.is_set():
                                    raise _Cancelled()
                                written += len(chunk)
                                if written > size:
                                    raise BlobMismatch(f"blob {digest} is larger than the {size} bytes its descriptor says",
                                                       "the registry served corrupt content; nothing was stored")
                                f.write(chunk)
                                ver.feed(chunk)
                                self.fetched_bytes += len(chunk)
                                done(written)
                            f.flush()
                            if written == size:
                                # To disk now, while the verifier finishes the last chunks;
                                # commit_ingest's own fsync then has nothing left to write.
                                os.fsync(f.fileno())
                        if written < size:
                            raise httpx.RemoteProtocolError(f"connection closed after {written} of {size} bytes")
                    break
                except (httpx.TransportError, RegistryError) as e:
                    if isinstance(e, RegistryError) and (e.status is None or e.status not in (500, 502, 503, 504, 429)):
                        raise
                    if attempt == self.retries - 1:
                        raise RegistryError(f"download of blob {digest[:19]} from {self.client.registry}/{self.repository} kept failing ({e})",
                                            "run the pull again: it resumes where it stopped") from e
                    self.notice(f"retrying blob {digest[7:19]} from byte {part.stat().st_size} ({e})")
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
            ver.feed_file(part, part.stat().st_size)
            hashed, diff = ver.finish()
        finally:
            ver.close()
        if hashed != digest or part.stat().st_size != size:
            self.store.commit_ingest(digest, size, hashed)  # raises BlobMismatch and removes the partial file
        if isinstance(diff, LayerError) or (diff_id and diff is not None and diff != diff_id):
            part.unlink(missing_ok=True)
            if isinstance(diff, LayerError):
                raise diff
            raise LayerError(f"{label} decompresses to {diff[:19]}, not the config's diff_id {diff_id[:19]}", _REPUSH)
        self.store.commit_ingest(digest, size, hashed)


def _check_manifest(obj: dict[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    cfg = obj.get("config")
    if not isinstance(cfg, dict):
        raise InvalidInput(f"manifest of {what} has no config", "this is not a runnable image")
    config = Descriptor.from_json(cfg)
    if config.size > MAX_CONFIG:
        raise InvalidInput(f"{what} has a {config.size}-byte config", f"configs over {MAX_CONFIG >> 20} MiB are refused; this is not a normal image")
    if config.media_type and config.media_type not in CONFIG_TYPES:
        raise InvalidInput(f"{what} is an artifact with config type {config.media_type}, not a container image",
                           "only container images can be pulled")
    layers = [Descriptor.from_json(d) for d in obj.get("layers") or []]
    for d in layers:
        if d.media_type not in LAYER_TYPES:
            raise InvalidInput(f"{what} has a layer of unsupported media type {d.media_type}",
                               "taxiway handles tar layers, uncompressed or gzip/zstd compressed")
    return config, layers


def pull(reference: str, *, platform: Platform | None = None, all_platforms: bool = False, insecure: bool = False,
         store: Store | None = None, progress: Progress | None = None, log: Log | None = None, jobs: int = 4,
         verify_layers: bool = True, client: RegistryClient | None = None, notice: Log | None = None) -> PullResult:
    """Pull ``reference`` into the store and name it; returns what happened.

    On any error the store's names are unchanged and no new blob stays visible
    (completed downloads move back to the ingest area so a retry is free).
    ``progress(descriptor, n)`` reports bytes downloaded (see :mod:`taxiway.oci.progress`).
    """
    ref = Reference.parse(reference)
    store = store or Store()
    log = log or (lambda s: None)
    own_client = client is None
    client = client or RegistryClient(ref.registry, insecure=insecure)
    name = str(ref)
    puller = Puller(client, store, ref.repository, progress=progress, log=log, verify_layers=verify_layers, notice=notice)
    result: PullResult | None = None
    lease = store.lease()
    lease.__enter__()  # no prune while our blobs are not yet named
    try:
        raw, media_type, digest = client.get_manifest(ref.repository, ref.identifier, what=name)
        top = Descriptor(media_type, digest, len(raw))
        manifests: list[tuple[Descriptor, bytes]] = []
        if media_type in mt.INDEX_TYPES:
            index = parse_json(raw, f"index of {name}")
            if all_platforms:
                children = [Descriptor.from_json(m) for m in index.get("manifests", [])]
                children = [c for c in children if c.media_type in mt.MANIFEST_TYPES and not (c.platform and c.platform.os == "unknown")]
                if not children:
                    raise NotFound(f"{name} is an index without image manifests", "this is not a container image")
            else:
                children = [select_platform(index, platform or Platform.host(), name)]
            for child in children:
                craw, ctype, cdigest = client.get_manifest(ref.repository, child.digest, what=f"{name} ({child.platform or child.digest[:19]})")
                if ctype not in mt.MANIFEST_TYPES:
                    raise InvalidInput(f"{name}: nested index {cdigest[:19]} is not supported", "pull the inner image by digest")
                manifests.append((Descriptor(ctype, cdigest, len(craw), platform=child.platform), craw))
        else:
            manifests.append((top, raw))

        result = PullResult(name, top if (all_platforms and media_type in mt.INDEX_TYPES) else manifests[0][0])
        plan: list[tuple[Descriptor, str | None]] = []
        seen: set[str] = set()
        for mdesc, mraw in manifests:
            obj = parse_json(mraw, f"manifest of {name}")
            config, layers = _check_manifest(obj, name)
            puller.fetch(config)
            cfg = parse_json(store.read_blob(config.digest), f"config of {name}")
            diff_ids = ((cfg.get("rootfs") or {}).get("diff_ids")) or []
            if diff_ids and len(diff_ids) != len(layers):
                raise InvalidInput(f"{name}: the config lists {len(diff_ids)} layers but the manifest has {len(layers)}",
                                   "the image is corrupt")
            plat = mdesc.platform or Platform(cfg.get("os", "?"), cfg.get("architecture", "?"), cfg.get("variant"))
            result.manifests.append((str(plat), mdesc.digest))
            for i, layer in enumerate(layers):
                if layer.digest in seen:
                    continue
                seen.add(layer.digest)
                if store.has_blob(layer.digest):
                    result.present += 1
                    continue
                if layer.is_nondistributable:
                    msg = f"layer {layer.digest[:19]} is non-distributable ({layer.media_type})" + (f", urls {', '.join(layer.urls)}" if layer.urls else "")
                    result.warnings.append(msg)
                    log(msg + "; fetching it from the registry if it has it")
                diff = diff_ids[i] if diff_ids and Digest.is_valid(str(diff_ids[i])) else None
                plan.append((layer, diff))

        def one(item: tuple[Descriptor, str | None]) -> bool:
            layer, diff = item
            try:
                return puller.fetch(layer, diff)
            except RegistryError as e:
                if layer.is_nondistributable and e.status == 404:
                    result.warnings.append(f"non-distributable layer {layer.digest[:19]} is not on the registry; skipped")
                    log(result.warnings[-1])
                    return False
                raise

        if plan:
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(plan))), thread_name_prefix="pull") as pool:
                futures = [pool.submit(one, item) for item in plan]
                errors: list[BaseException] = []
                try:
                    for fut in as_completed(futures):
                        if fut.exception() is not None and not isinstance(fut.exception(), _Cancelled):
                            errors.append(fut.exception())  # type: ignore[arg-type]
                            puller.cancelled.set()  # fail fast: the other layers stop at their next chunk
                except BaseException:  # Ctrl-C: stop the downloads (partial files stay for the next run)
                    puller.cancelled.set()
                    raise
                if errors:
                    raise errors[0]
        result.fetched = len(puller.new_blobs)  # before manifests join the list below
        result.fetched_bytes = puller.fetched_bytes
        # Names last: manifests, then the index, then the tag.
        for d, r in [*manifests, *([(top, raw)] if media_type in mt.INDEX_TYPES else [])]:
            if not store.has_blob(d.digest):
                store.write_blob(r, d.digest, len(r))
                puller.new_blobs.append(d.digest)  # so a failure below takes it back
        for blob in [d for d, _ in manifests] + [top]:
            store.add_source(blob.digest, f"{ref.registry}/{ref.repository}")
        for _mdesc, mraw in manifests:
            obj = parse_json(mraw, "manifest")
            for d in [obj["config"], *(obj.get("layers") or [])]:
                store.add_source(d["digest"], f"{ref.registry}/{ref.repository}")
        store.tag(name, result.descriptor)
        return result
    except BaseException:
        _rollback(store, puller.new_blobs)
        raise
    finally:
        lease.__exit__(None, None, None)
        if own_client:
            client.close()


def _rollback(store: Store, new_blobs: list[str]) -> None:
    """Move blobs this failed pull added back to the ingest area (complete, so the next pull reuses them)."""
    if not new_blobs:
        return
    keep = store.referenced()
    for dg in new_blobs:
        if dg in keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.replace(store.blob_path(dg), store.ingest_path(dg))


def ensure_image(reference: str, *, platform: Platform | None = None, store: Store | None = None, insecure: bool = False,
                 progress: Progress | None = None, log: Log | None = None) -> Any:
    """The :class:`~taxiway.oci.store.StoreImage` for ``reference``, pulled first if the store lacks it.

    For callers such as ``taxiway run`` and the builder: a name already in the
    store is used as is (no registry round trip); anything else is pulled.
    """
    store = store or Store()
    try:
        return store.image(reference, platform)
    except NotFound:
        pass
    pull(reference, platform=platform, store=store, insecure=insecure, progress=progress, log=log)
    return store.image(reference, platform)


class _RemoteBlob(io.RawIOBase):
    """A readable, digest-checked stream of one blob straight from the registry."""

    def __init__(self, client: RegistryClient, repository: str, digest: str, size: int | None):
        self._cm = client.open_blob(repository, digest)
        self._resp = self._cm.__enter__()
        self._it = self._resp.iter_raw()
        self._buf = b""
        self._h = hashlib.sha256()
        self._n = 0
        self.digest, self.size = digest, size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                self._check()
                return 0
            self._h.update(self._buf)
            self._n += len(self._buf)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _check(self) -> None:
        got = "sha256:" + self._h.hexdigest()
        if got != self.digest or (self.size is not None and self._n != self.size):
            raise BlobMismatch(f"blob {self.digest[:19]} streamed from the registry has digest {got[:19]} ({self._n} bytes)",
                               "the registry served corrupt content")

    def close(self) -> None:
        if not self.closed:
            self._cm.__exit__(None, None, None)
        super().close()


class RemoteImage:
    """A single-platform image read straight from a registry; implements :class:`taxiway.oci.image.Image`.

    Nothing touches the store: ``push_image(RemoteImage.fetch(src), dst)`` copies
    between registries, ``unpack.export(RemoteImage.fetch(ref), dir)`` unpacks
    while bytes arrive. Manifest and config are verified against their digests.
    """

    def __init__(self, client: RegistryClient, repository: str, manifest_raw: bytes, media_type: str, digest: str):
        self.client = client
        self.repository = repository
        self._raw = manifest_raw
        self._manifest = parse_json(manifest_raw, f"manifest {digest}")
        self._media_type = media_type
        self._digest = digest
        self._config: bytes | None = None
        _check_manifest(self._manifest, f"{client.registry}/{repository}@{digest}")

    @classmethod
    def fetch(cls, reference: str, *, platform: Platform | None = None, insecure: bool = False,
              client: RegistryClient | None = None) -> RemoteImage:
        """Resolve ``reference`` (choosing ``platform`` from an index, default the host)."""
        ref = Reference.parse(reference)
        client = client or RegistryClient(ref.registry, insecure=insecure)
        raw, media_type, digest = client.get_manifest(ref.repository, ref.identifier, what=str(ref))
        if media_type in mt.INDEX_TYPES:
            child = select_platform(parse_json(raw, f"index of {ref}"), platform or Platform.host(), str(ref))
            raw, media_type, digest = client.get_manifest(ref.repository, child.digest, what=f"{ref} ({child.platform})")
            if media_type not in mt.MANIFEST_TYPES:
                raise InvalidInput(f"{ref}: nested index {digest[:19]} is not supported", "pull the inner image by digest")
        return cls(client, ref.repository, raw, media_type, digest)

    def close(self) -> None:
        """Close the registry connections."""
        self.client.close()

    def __enter__(self) -> RemoteImage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def manifest_bytes(self) -> bytes:
        """The raw manifest."""
        return self._raw

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest."""
        return self._manifest

    def media_type(self) -> str:
        """OCI or Docker schema 2 manifest media type."""
        return self._media_type

    def digest(self) -> str:
        """The manifest digest."""
        return self._digest

    def config_bytes(self) -> bytes:
        """The config blob (fetched once, verified)."""
        if self._config is None:
            desc = Descriptor.from_json(self._manifest["config"])
            with self.open_blob(desc.digest) as f:
                self._config = f.read(MAX_CONFIG + 1)
        return self._config

    def config(self) -> dict[str, Any]:
        """The parsed config."""
        return parse_json(self.config_bytes(), f"config of {self._digest}")

    def layers(self) -> list[Descriptor]:
        """Layer descriptors, base first."""
        return [Descriptor.from_json(d) for d in self._manifest.get("layers") or []]

    def open_blob(self, digest: str) -> BinaryIO:
        """Stream a blob from the registry (its digest is checked when the stream ends)."""
        size = next((d.size for d in [Descriptor.from_json(self._manifest["config"]), *self.layers()] if d.digest == digest), None)
        return io.BufferedReader(_RemoteBlob(self.client, self.repository, digest, size), 1 << 20)  # type: ignore[return-value]
