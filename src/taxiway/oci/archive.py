"""``image load`` and ``image save``: docker-save tarballs and OCI archives.

Load understands
  * OCI archives (a tar of an OCI image layout, as ``skopeo copy ... oci-archive:``
    and ``docker save`` since Docker 25 write them: names come from
    ``io.containerd.image.name`` or ``org.opencontainers.image.ref.name``), and
  * classic ``docker save`` tarballs (``manifest.json`` with ``Config``,
    ``RepoTags`` and ``Layers``; uncompressed or compressed layer files).
Every blob is verified (digest, size; uncompressed layers against the config's
``diff_ids``) before it becomes visible, and names are written last.

Save writes an OCI image layout tar; ``--format docker`` adds ``manifest.json``
(and Docker 25's name annotations), the layout ``docker save`` writes since
Docker 25, which skopeo reads both as ``docker-archive:`` and ``oci-archive:``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.oci import mediatypes as mt
from taxiway.oci.digest import Digest
from taxiway.oci.image import Descriptor, Platform
from taxiway.oci.layerio import DiffHasher, LayerError, decompress, magic, sniff
from taxiway.oci.reference import Reference
from taxiway.oci.store import REF_NAME, Store, StoreImage, parse_json

CONTAINERD_NAME = "io.containerd.image.name"


def _norm(name: str) -> str:
    name = name.lstrip("./") if name.startswith("./") else name
    return name.lstrip("/")


@contextlib.contextmanager
def _open_tar(path: Path, scratch: Path) -> Iterator[tarfile.TarFile]:
    """Open a tarball, plain or gzip/bzip2/xz/zstd-compressed."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise NotFound(f"cannot read {path} ({e.strerror})", "check the path") from e
    tmp = None
    try:
        opener = _decompressor(head)
        if opener is not None:
            # Random access into a compressed stream re-inflates from the start on every
            # backwards seek: inflate once into a scratch file instead.
            fd, tmp = tempfile.mkstemp(prefix="load-", suffix=".tar", dir=scratch)
            try:
                with opener(path) as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except Exception as e:  # noqa: BLE001 - gzip/bz2/xz (OSError, EOFError) and zstd (ZstdError) alike: damaged
                raise InvalidInput(f"{path} is a damaged compressed file ({e})", "write it again") from e
            path = Path(tmp)
        try:
            tf = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InvalidInput(f"{path} is not a tar archive ({e})", "pass a file written by `docker save`, `taxiway image save` or skopeo") from e
        with tf:
            yield tf
    finally:
        if tmp:
            os.unlink(tmp)


def _decompressor(head: bytes) -> Any:
    """An opener for a compressed tarball (by magic number), or None for a plain one.

    gzip and zstd go through the layer pipeline's decompressor (:func:`layerio.decompress`,
    zstd frames read across, as a layer's are); bzip2 and xz are for whole ``docker save``
    tarballs only, never layers, so they stay here.
    """
    kind = magic(head)
    if kind in ("gzip", "zstd"):
        @contextlib.contextmanager
        def open_layer_codec(p: Path) -> Iterator[Any]:
            with open(p, "rb") as raw:
                yield decompress(raw, kind)

        return open_layer_codec
    if kind == "bzip2":
        import bz2

        return lambda p: bz2.open(p, "rb")
    if kind == "xz":
        import lzma

        return lambda p: lzma.open(p, "rb")
    return None


class _Archive:
    """Member lookup by normalized name."""

    def __init__(self, tf: tarfile.TarFile, path: Path):
        self.tf = tf
        self.path = path
        try:
            self.members = {_norm(m.name): m for m in tf.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InvalidInput(f"{path} is a damaged tar archive ({e})", "write it again") from e

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> IO[bytes]:
        m = self.members.get(name)
        if m is None:
            raise InvalidInput(f"{self.path} lacks {name}", "the archive is incomplete; write it again")
        f = self.tf.extractfile(m)
        assert f is not None
        return f

    def size(self, name: str) -> int:
        return self.members[name].size

    def read_json(self, name: str) -> Any:
        with self.open(name) as f:
            raw = f.read(16 << 20)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise InvalidInput(f"{name} in {self.path} is not valid JSON", "the archive is damaged") from e


def _blob_name(digest: str) -> str:
    d = Digest.parse(digest)
    return f"blobs/{d.algorithm}/{d.hex}"


def _name_for(annotations: dict[str, str], name: str | None, path: Path) -> str | None:
    full = annotations.get(CONTAINERD_NAME)
    if full:
        return str(Reference.parse(full))
    ref = annotations.get(REF_NAME)
    if ref and ("/" in ref or ":" in ref.split("@")[0]):
        return str(Reference.parse(ref))
    if name:
        base = Reference.parse(name)
        return str(base.with_tag(ref)) if ref else str(base)
    if ref:
        raise InvalidInput(f"{path} names an image only {ref!r}", f"pass --name REGISTRY/NAME to load it as NAME:{ref}")
    return None


class _Loader:
    def __init__(self, ar: _Archive, store: Store):
        self.ar = ar
        self.store = store
        self.new: list[str] = []

    def put(self, member: str, expected: str | None, size: int | None, media_type: str = "application/octet-stream") -> Descriptor:
        had = expected is not None and self.store.has_blob(expected)
        with self.ar.open(member) as f:
            desc = self.store.write_blob(f, expected, size, media_type=media_type)
        if not had and desc.digest not in self.new:
            self.new.append(desc.digest)
        return desc

    def rollback(self) -> None:
        keep = self.store.referenced()
        for dg in self.new:
            if dg not in keep:
                self.store.blob_path(dg).unlink(missing_ok=True)

    def oci_tree(self, desc: Descriptor, depth: int = 0) -> None:
        """Import a manifest or index and everything it references, children first."""
        if depth > 4:
            raise InvalidInput(f"{self.ar.path} nests indexes too deeply", "this is not a usable image")
        name = _blob_name(desc.digest)
        if not self.ar.has(name):
            raise InvalidInput(f"{self.ar.path} lacks the blob {desc.digest[:19]}", "the archive is incomplete; write it again")
        with self.ar.open(name) as f:
            raw = f.read(4 << 20)
        obj = parse_json(raw, f"manifest {desc.digest[:19]} in {self.ar.path}")
        mtype = obj.get("mediaType") or desc.media_type
        if mtype in mt.INDEX_TYPES or "manifests" in obj:
            for m in obj.get("manifests", []):
                child = Descriptor.from_json(m)
                if self.ar.has(_blob_name(child.digest)):
                    self.oci_tree(child, depth + 1)
        elif mtype in mt.MANIFEST_TYPES or "layers" in obj:
            config = Descriptor.from_json(obj.get("config") or {})
            self.put(_blob_name(config.digest), config.digest, config.size)
            for layer in obj.get("layers") or []:
                ld = Descriptor.from_json(layer)
                if ld.is_nondistributable and not self.ar.has(_blob_name(ld.digest)):
                    continue
                self.put(_blob_name(ld.digest), ld.digest, ld.size)
        else:
            raise InvalidInput(f"{self.ar.path} holds an unsupported media type {mtype}", "only images can be loaded")
        self.put(name, desc.digest, desc.size)

    def docker_image(self, entry: dict[str, Any]) -> Descriptor:
        """Import one ``manifest.json`` entry; returns the OCI manifest built for it."""
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or not isinstance(entry.get("Layers"), list):
            raise InvalidInput(f"{self.ar.path}: manifest.json entry lacks Config or Layers", "the archive is damaged")
        cfg_name = _norm(entry["Config"])
        cfg_expected = "sha256:" + Path(cfg_name).name.removesuffix(".json") if cfg_name.startswith("blobs/sha256/") else None
        config = self.put(cfg_name, cfg_expected, None, mt.OCI_CONFIG)
        cfg = parse_json(self.store.read_blob(config.digest), f"config in {self.ar.path}")
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(entry["Layers"]):
            raise InvalidInput(f"{self.ar.path}: config lists {len(diff_ids)} layers, manifest.json {len(entry['Layers'])}", "the archive is damaged")
        layers = []
        for i, lname in enumerate(entry["Layers"]):
            lname = _norm(str(lname))
            with self.ar.open(lname) as f:
                head = f.read(4)
            compression = sniff(head, mt.OCI_LAYER)
            mtype = {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD, "none": mt.OCI_LAYER}[compression]
            expected = None
            if lname.startswith("blobs/sha256/"):
                expected = "sha256:" + Path(lname).name
            elif compression == "none":
                expected = diff_ids[i]  # an uncompressed layer's digest is its diff_id
            desc = self.put(lname, expected, self.ar.size(lname), mtype)
            if compression != "none":
                label = f"layer {desc.digest[:19]} ({lname} in {self.ar.path})"
                dh = DiffHasher(compression, label=label, hint="the archive is damaged; write it again")
                with self.store.open_blob(desc.digest) as bf:
                    while chunk := bf.read(1 << 20):
                        dh.update(chunk)
                if dh.finish() != diff_ids[i]:
                    raise LayerError(f"{label} does not match the config's diff_id {str(diff_ids[i])[:19]}",
                                     "the archive is damaged; write it again")
            layers.append(Descriptor(mtype, desc.digest, desc.size))
        manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                    "config": Descriptor(mt.OCI_CONFIG, config.digest, config.size).to_json(),
                    "layers": [d.to_json() for d in layers]}
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        d = self.store.write_blob(raw, media_type=mt.OCI_MANIFEST)
        self.new.append(d.digest)
        return Descriptor(mt.OCI_MANIFEST, d.digest, d.size)


def load(path: Path, store: Store, name: str | None = None) -> list[tuple[str, Descriptor]]:
    """Load every image of a docker-save or OCI archive tarball; returns (name, descriptor) pairs."""
    loaded: list[tuple[str, Descriptor]] = []
    with store.lease(), _open_tar(path, store.meta / "ingest") as tf:
        ar = _Archive(tf, path)
        loader = _Loader(ar, store)
        try:
            if ar.has("index.json") and ar.has("oci-layout"):
                index = ar.read_json("index.json")
                if not isinstance(index, dict):
                    raise InvalidInput(f"index.json in {path} is not an object", "the archive is damaged")
                for m in index.get("manifests", []):
                    desc = Descriptor.from_json(m)
                    loader.oci_tree(desc)
                    n = _name_for(desc.annotations or {}, name, path)
                    if n is None:
                        if name is None and len(index.get("manifests", [])) == 1:
                            raise InvalidInput(f"{path} does not name its image", "pass --name REGISTRY/NAME:TAG")
                        continue
                    loaded.append((n, Descriptor(desc.media_type, desc.digest, desc.size, platform=desc.platform)))
            elif ar.has("manifest.json"):
                entries = ar.read_json("manifest.json")
                if not isinstance(entries, list):
                    raise InvalidInput(f"manifest.json in {path} is not a list", "the archive is damaged")
                for entry in entries:
                    desc = loader.docker_image(entry)
                    tags = [t for t in (entry.get("RepoTags") or []) if isinstance(t, str)]
                    if not tags:
                        if not name:
                            raise InvalidInput(f"{path} has an image without a name", "pass --name REGISTRY/NAME:TAG")
                        tags = [name]
                    loaded += [(str(Reference.parse(t)), desc) for t in tags]
            else:
                raise InvalidInput(f"{path} is neither a docker-save tarball nor an OCI archive",
                                   "pass a file written by `docker save`, `taxiway image save` or skopeo")
            if not loaded:
                raise InvalidInput(f"{path} contains no images", "check the file")
            for n, desc in loaded:
                store.tag(n, desc)
        except TaxiwayError:
            loader.rollback()
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            loader.rollback()
            raise InvalidInput(f"{path} is damaged ({e})", "write it again") from e
    return loaded


def _docker_tag(name: str) -> str:
    """docker's short form of a name (``busybox:latest`` for docker.io/library/busybox:latest)."""
    ref = Reference.parse(name)
    short = ref.repository.removeprefix("library/") if ref.registry == "docker.io" else ref.name
    return f"{short}:{ref.tag or 'latest'}"


def save(store: Store, references: list[str], output: Path, fmt: str = "docker", platform: Platform | None = None) -> None:
    """Write images to ``output`` (atomically): an OCI layout tar, plus manifest.json for ``fmt='docker'``."""
    from taxiway.fsutil import atomic_write

    images: list[tuple[str, StoreImage]] = []
    for ref in references:
        desc = store.resolve(ref)
        names = [n for n, d in store.images() if d.digest == desc.digest]
        looked_up = store._lookup_name(ref)
        name = looked_up if looked_up in names else (names[0] if names else ref)
        images.append((name, store.image(ref, platform)))
    blobs: dict[str, int] = {}
    index_entries: list[dict[str, Any]] = []
    docker_manifest: list[dict[str, Any]] = []
    for name, img in images:
        for d in [img.config_descriptor(), *img.layers()]:
            if not store.has_blob(d.digest):
                raise NotFound(f"blob {d.digest[:19]} of {name} is not in the store", f"pull {name} again")
            blobs[d.digest] = d.size
        blobs[img.digest()] = len(img.manifest_bytes())
        ann = {REF_NAME: name} if fmt == "oci" else {CONTAINERD_NAME: name, REF_NAME: Reference.parse(name).tag or "latest"}
        index_entries.append(Descriptor(img.media_type(), img.digest(), len(img.manifest_bytes()), annotations=ann).to_json())
        docker_manifest.append({"Config": _blob_name(img.config_descriptor().digest), "RepoTags": [_docker_tag(name)],
                                "Layers": [_blob_name(d.digest) for d in img.layers()]})
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | None = None, blob: str | None = None) -> None:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = 0o644, 0
            if blob is not None:
                ti.size = store.blob_size(blob)
                with store.open_blob(blob) as bf:
                    tf.addfile(ti, bf)
            else:
                ti.size = len(data or b"")
                tf.addfile(ti, io_bytes(data or b""))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for dg in blobs:
            add(_blob_name(dg), blob=dg)
        add("index.json", json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": index_entries}).encode())
        if fmt == "docker":
            add("manifest.json", json.dumps(docker_manifest).encode())


def io_bytes(data: bytes) -> IO[bytes]:
    """A readable stream over ``data``."""
    return io.BytesIO(data)
