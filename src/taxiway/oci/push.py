"""Push an image (or index) from the store to a registry.

Blobs first, in parallel: a HEAD skips blobs the registry already has; a blob
the store remembers seeing in another repository of the same registry is
mounted (``POST ?mount=&from=``) instead of uploaded; large blobs go up in
``PATCH`` chunks. Manifests go last (an index after its children), so a failed
push never leaves a tag pointing at missing content.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from taxiway.errors import NotFound
from taxiway.oci import mediatypes as mt
from taxiway.oci.client import RegistryClient, RegistryError
from taxiway.oci.image import Descriptor
from taxiway.oci.reference import Reference
from taxiway.oci.store import Store, parse_json

CHUNK_SIZE = 16 << 20  # blobs larger than this go up in PATCH chunks of this size
READ = 1 << 20


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
    """Uploads blobs of the store to one repository."""

    def __init__(self, client: RegistryClient, store: Store, repository: str, *, progress: Any = None,
                 chunk_size: int = CHUNK_SIZE):
        self.client = client
        self.store = store
        self.repository = repository
        self.progress = progress
        self.chunk_size = chunk_size
        self.full_name = f"{client.registry}/{repository}"

    def mount_source(self, digest: str) -> str | None:
        """Another repository of this registry the blob came from, if the store remembers one."""
        prefix = self.client.registry + "/"
        for src in self.store.sources(digest):
            if src.startswith(prefix) and src != self.full_name:
                return src[len(prefix):]
        return None

    def push_blob(self, desc: Descriptor, result: PushResult) -> None:
        """Make sure the registry has ``desc`` in this repository."""
        digest = desc.digest
        if not self.store.has_blob(digest):
            raise NotFound(f"blob {digest[:19]} is not in the store", "pull the image again before pushing it")
        if self.client.blob_exists(self.repository, digest):
            result.count("existing")
            return
        source = self.mount_source(digest)
        location = self.client.start_upload(self.repository, mount=digest if source else None, from_repository=source)
        if location is None:
            result.count("mounted")
            return
        size = self.store.blob_size(digest)
        task = self.progress.add_task(digest[7:19], total=size) if self.progress is not None else None

        def advance(n: int) -> None:
            if task is not None:
                self.progress.advance(task, n)

        with self.store.open_blob(digest) as f:
            if size <= self.chunk_size:
                self.client.finish_upload(self.repository, location, digest, _read_chunks(f, size, advance), size=size)
            else:
                offset = 0
                while offset < size:
                    data = f.read(min(self.chunk_size, size - offset))
                    location = self.client.upload_chunk(self.repository, location, data, offset)
                    offset += len(data)
                    advance(len(data))
                self.client.finish_upload(self.repository, location, digest, b"", size=0)
        result.count("uploaded")
        result.count("uploaded_bytes", size)


def push(reference: str, *, insecure: bool = False, store: Store | None = None, progress: Any = None,
         client: RegistryClient | None = None, jobs: int = 4, chunk_size: int = CHUNK_SIZE,
         source: str | None = None) -> PushResult:
    """Push the store's image ``source`` (default: ``reference``) to ``reference``."""
    ref = Reference.parse(reference)
    store = store or Store()
    top = store.resolve(source or reference)
    own_client = client is None
    client = client or RegistryClient(ref.registry, insecure=insecure)
    name = str(ref)
    result = PushResult(name, top.digest)
    try:
        manifests: list[tuple[Descriptor, bytes]] = []
        top_raw = store.read_blob(top.digest)
        if top.media_type in mt.INDEX_TYPES:
            index = parse_json(top_raw, f"index of {name}")
            for m in index.get("manifests", []):
                child = Descriptor.from_json(m)
                if not store.has_blob(child.digest):
                    raise NotFound(f"{name}: the manifest for {child.platform or child.digest[:19]} is not in the store",
                                   "pull the image with --all-platforms before pushing the whole index")
                manifests.append((child, store.read_blob(child.digest)))
        else:
            manifests.append((top, top_raw))
        blobs: dict[str, Descriptor] = {}
        for _, raw in manifests:
            obj = parse_json(raw, f"manifest of {name}")
            if "layers" not in obj:
                continue
            for d in [obj["config"], *(obj.get("layers") or [])]:
                desc = Descriptor.from_json(d)
                if desc.is_nondistributable and not store.has_blob(desc.digest):
                    continue  # foreign layers stay where they are
                blobs.setdefault(desc.digest, desc)
        pusher = Pusher(client, store, ref.repository, progress=progress, chunk_size=chunk_size)
        if blobs:
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(blobs))), thread_name_prefix="push") as pool:
                futures = [pool.submit(pusher.push_blob, d, result) for d in blobs.values()]
                errors = []
                for fut in futures:
                    try:
                        fut.result()
                    except BaseException as e:  # noqa: BLE001 - wait for all, raise the first
                        errors.append(e)
                if errors:
                    raise errors[0]
        if top.media_type in mt.INDEX_TYPES:
            for child, raw in manifests:
                client.put_manifest(ref.repository, child.digest, raw, child.media_type or parse_json(raw, "manifest").get("mediaType", mt.OCI_MANIFEST))
        media_type = top.media_type or parse_json(top_raw, "manifest").get("mediaType") or mt.OCI_MANIFEST
        client.put_manifest(ref.repository, ref.tag or top.digest, top_raw, media_type)
        for dg in list(blobs) + [m.digest for m, _ in manifests]:
            store.add_source(dg, f"{ref.registry}/{ref.repository}")
        return result
    finally:
        if own_client:
            client.close()
