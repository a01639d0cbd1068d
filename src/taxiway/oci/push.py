"""Push an image (or index) from the store to a registry.

Blobs first, in parallel: a HEAD skips blobs the registry already has; a blob
the store remembers seeing in another repository of the same registry is
mounted (``POST ?mount=&from=``) instead of uploaded; large blobs go up in
``PATCH`` chunks. Manifests go last (an index after its children), so a failed
push never leaves a tag pointing at missing content.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, BinaryIO

from taxiway.errors import NotFound
from taxiway.oci import mediatypes as mt
from taxiway.oci.client import RegistryClient, RegistryError
from taxiway.oci.image import Descriptor, Image
from taxiway.oci.progress import Progress
from taxiway.oci.reference import Reference
from taxiway.oci.store import Store, StoreImage, parse_json

CHUNK_SIZE = 16 << 20  # blobs larger than this go up in PATCH chunks of this size
READ = 1 << 20


class _Cancelled(Exception):
    """An upload stopped because the push as a whole is failing."""


@dataclass
class PushResult:
    """What a push did."""

    name: str
    digest: str
    uploaded: int = 0
    uploaded_bytes: int = 0
    mounted: int = 0
    existing: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, what: str, n: int = 1) -> None:
        """Thread-safe counter update."""
        with self._lock:
            setattr(self, what, getattr(self, what) + n)


def _read_chunks(f: BinaryIO, n: int, on_chunk: Any) -> Iterator[bytes]:
    left = n
    while left > 0:
        b = f.read(min(READ, left))
        if not b:
            raise RegistryError("a blob in the store is shorter than its descriptor", "run `taxiway pull` again to repair it")
        left -= len(b)
        on_chunk(len(b))
        yield b


class Pusher:
    """Uploads blobs to one repository, reading them through ``open_blob`` (any Image's, or the store's)."""

    def __init__(self, client: RegistryClient, repository: str, open_blob: Callable[[str], BinaryIO], *,
                 sources: Callable[[str], list[str]] | None = None, progress: Progress | None = None,
                 chunk_size: int = CHUNK_SIZE):
        self.client = client
        self.repository = repository
        self.open_blob = open_blob
        self.sources = sources or (lambda digest: [])
        self.progress = progress
        self.chunk_size = chunk_size
        self.full_name = f"{client.registry}/{repository}"
        self.cancelled = threading.Event()

    def mount_source(self, digest: str) -> str | None:
        """Another repository of this registry the blob came from, if one is remembered."""
        prefix = self.client.registry + "/"
        for src in self.sources(digest):
            if src.startswith(prefix) and src != self.full_name:
                return src[len(prefix):]
        return None

    def push_blob(self, desc: Descriptor, result: PushResult) -> None:
        """Make sure the registry has ``desc`` in this repository."""
        digest, size = desc.digest, desc.size
        if self.client.blob_exists(self.repository, digest):
            result.count("existing")
            return
        source = self.mount_source(digest)
        location = self.client.start_upload(self.repository, mount=digest if source else None, from_repository=source)
        if location is None:
            result.count("mounted")
            return
        def advance(n: int) -> None:
            if self.cancelled.is_set():
                raise _Cancelled()
            if self.progress is not None:
                self.progress(desc, n)

        with self.open_blob(digest) as f:
            if size <= self.chunk_size:
                self.client.finish_upload(self.repository, location, digest, _read_chunks(f, size, advance), size=size)
            else:
                offset = 0
                while offset < size:
                    data = f.read(min(self.chunk_size, size - offset))
                    if not data:
                        raise RegistryError(f"blob {digest[:19]} is shorter than its descriptor", "the source image is corrupt")
                    location = self.client.upload_chunk(self.repository, location, data, offset)
                    offset += len(data)
                    advance(len(data))
                self.client.finish_upload(self.repository, location, digest, b"", size=0)
        result.count("uploaded")
        result.count("uploaded_bytes", size)

    def push_all(self, blobs: list[Descriptor], result: PushResult, jobs: int) -> None:
        """Push blobs in parallel; the first error (or Ctrl-C) stops the others at their next chunk."""
        if not blobs:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(blobs))), thread_name_prefix="push") as pool:
            futures = [pool.submit(self.push_blob, d, result) for d in blobs]
            errors: list[BaseException] = []
            try:
                for fut in as_completed(futures):
                    exc = fut.exception()
                    if exc is not None and not isinstance(exc, _Cancelled):
                        errors.append(exc)
                        self.cancelled.set()
            except BaseException:
                self.cancelled.set()
                raise
            if errors:
                raise errors[0]


def _image_blobs(image: Image) -> list[Descriptor]:
    out: dict[str, Descriptor] = {}
    for d in [Descriptor.from_json(image.manifest()["config"]), *image.layers()]:
        if d.is_nondistributable:
            continue  # foreign layers stay where they are
        out.setdefault(d.digest, d)
    return list(out.values())


def push_image(image: Image, reference: str, *, insecure: bool = False, progress: Progress | None = None,
               client: RegistryClient | None = None, jobs: int = 4, chunk_size: int = CHUNK_SIZE,
               store: Store | None = None) -> PushResult:
    """Push any single-platform :class:`Image` (from the store, the builder...) to ``reference``.

    With ``store``, blobs it remembers from another repository of the same
    registry are mounted, and where they now live is remembered.
    ``progress(descriptor, n)`` reports bytes uploaded.
    """
    ref = Reference.parse(reference)
    own_client = client is None
    client = client or RegistryClient(ref.registry, insecure=insecure)
    result = PushResult(str(ref), image.digest())
    try:
        pusher = Pusher(client, ref.repository, image.open_blob, sources=store.sources if store else None,
                        progress=progress, chunk_size=chunk_size)
        blobs = _image_blobs(image)
        pusher.push_all(blobs, result, jobs)
        client.put_manifest(ref.repository, ref.tag or image.digest(), image.manifest_bytes(), image.media_type())
        if store is not None:
            for d in [*blobs, Descriptor(image.media_type(), image.digest(), len(image.manifest_bytes()))]:
                store.add_source(d.digest, f"{ref.registry}/{ref.repository}")
        return result
    finally:
        if own_client:
            client.close()


def push(reference: str, *, insecure: bool = False, store: Store | None = None, progress: Progress | None = None,
         client: RegistryClient | None = None, jobs: int = 4, chunk_size: int = CHUNK_SIZE,
         source: str | None = None) -> PushResult:
    """Push the store's image or index ``source`` (default: ``reference``) to ``reference``."""
    ref = Reference.parse(reference)
    store = store or Store()
    top = store.resolve(source or reference)
    if top.media_type not in mt.INDEX_TYPES:
        img = StoreImage(store, top, source or reference)
        return push_image(img, reference, insecure=insecure, progress=progress, client=client, jobs=jobs,
                          chunk_size=chunk_size, store=store)
    own_client = client is None
    client = client or RegistryClient(ref.registry, insecure=insecure)
    name = str(ref)
    result = PushResult(name, top.digest)
    try:
        top_raw = store.read_blob(top.digest)
        index = parse_json(top_raw, f"index of {name}")
        images: list[StoreImage] = []
        for m in index.get("manifests", []):
            child = Descriptor.from_json(m)
            if not store.has_blob(child.digest):
                raise NotFound(f"{name}: the manifest for {child.platform or child.digest[:19]} is not in the store",
                               "pull the image with --all-platforms before pushing the whole index")
            images.append(StoreImage(store, child, name))
        blobs: dict[str, Descriptor] = {}
        for img in images:
            for d in _image_blobs(img):
                if not store.has_blob(d.digest):
                    raise NotFound(f"blob {d.digest[:19]} of {name} is not in the store", "pull the image again before pushing it")
                blobs.setdefault(d.digest, d)
        pusher = Pusher(client, ref.repository, store.open_blob, sources=store.sources, progress=progress, chunk_size=chunk_size)
        pusher.push_all(list(blobs.values()), result, jobs)
        for img in images:  # children by digest, then the index under its tag
            client.put_manifest(ref.repository, img.digest(), img.manifest_bytes(), img.media_type())
        media_type = top.media_type or index.get("mediaType") or mt.OCI_INDEX
        client.put_manifest(ref.repository, ref.tag or top.digest, top_raw, media_type)
        for dg in [*blobs, *(img.digest() for img in images), top.digest]:
            store.add_source(dg, f"{ref.registry}/{ref.repository}")
        return result
    finally:
        if own_client:
            client.close()
