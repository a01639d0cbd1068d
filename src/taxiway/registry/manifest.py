"""Manifest validation: a pure function from bytes to what the manifest references.

Anything a client can send is either accepted or rejected with a
:class:`DistributionError` carrying a 4xx code; nothing here raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from taxiway.oci import mediatypes as mt
from taxiway.oci.digest import Digest
from taxiway.registry.errors import DistributionError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Ref:
    """A descriptor the manifest points at: a blob, or (for indexes) another manifest."""

    digest: str
    size: int
    media_type: str
    is_manifest: bool = False
    external: bool = False  # has urls: the bytes may live elsewhere


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    size: int
    refs: tuple[Ref, ...] = ()
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def descriptor(self) -> dict[str, Any]:
        """The descriptor a referrers list shows for this manifest."""
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.annotations:
            d["annotations"] = self.annotations
        return d


def _invalid(detail: str) -> DistributionError:
    return DistributionError("MANIFEST_INVALID", detail=detail)


def _descriptor(d: Any, where: str) -> tuple[str, int, str, bool]:
    if not isinstance(d, dict):
        raise _invalid(f"{where} is not a descriptor object")
    mtype, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(mtype, str) or not mtype:
        raise _invalid(f"{where}.mediaType missing")
    if not isinstance(digest, str) or not Digest.is_valid(digest):
        raise _invalid(f"{where}.digest invalid")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size invalid")
    urls = d.get("urls")
    if urls is not None and (not isinstance(urls, list) or not all(isinstance(u, str) for u in urls)):
        raise _invalid(f"{where}.urls invalid")
    ann = d.get("annotations")
    if ann is not None and (not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values())):
        raise _invalid(f"{where}.annotations invalid")
    return digest, size, mtype, bool(urls)


def parse(body: bytes, content_type: str | None) -> Manifest:
    """Validate a pushed manifest; returns its media type, digest and references."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise DistributionError("SIZE_INVALID", message="manifest too large",
                            detail=f"manifest larger than {MAX_MANIFEST_BYTES} bytes", status=413)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _invalid("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest is not a JSON object")
    content_type = (content_type or "").split(";")[0].strip()
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise _invalid("mediaType is not a string")
    if body_type and content_type and body_type != content_type:
        raise _invalid(f"Content-Type {content_type} does not match mediaType {body_type}")
    media_type = body_type or content_type
    if not media_type:
        # OCI manifests may omit mediaType; tell them apart by shape.
        media_type = mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST
    if media_type in mt.SCHEMA1_TYPES:
        raise _invalid("Docker schema 1 manifests are not supported")
    if media_type not in mt.MANIFEST_TYPES and media_type not in mt.INDEX_TYPES:
        raise _invalid(f"unsupported manifest media type {media_type!r}")
    if doc.get("schemaVersion") != 2 or isinstance(doc.get("schemaVersion"), bool):
        raise _invalid("schemaVersion must be 2")

    refs: list[Ref] = []
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType is not a string")
    if media_type in mt.MANIFEST_TYPES:
        if "manifests" in doc:
            raise _invalid("an image manifest has no manifests field")
        digest, size, ctype, ext = _descriptor(doc.get("config"), "config")
        refs.append(Ref(digest, size, ctype, external=ext))
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise _invalid("layers must be a list")
        for i, layer in enumerate(layers):
            digest, size, ltype, ext = _descriptor(layer, f"layers[{i}]")
            refs.append(Ref(digest, size, ltype, external=ext))
        if artifact_type is None and ctype != mt.OCI_EMPTY:
            artifact_type = ctype
    else:
        if "layers" in doc or "config" in doc:
            raise _invalid("an index has no layers or config field")
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise _invalid("manifests must be a list")
        for i, m in enumerate(manifests):
            digest, size, mtype, ext = _descriptor(m, f"manifests[{i}]")
            refs.append(Ref(digest, size, mtype, is_manifest=True, external=ext))
    subject = None
    if "subject" in doc:
        subject, _, _, _ = _descriptor(doc["subject"], "subject")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise _invalid("annotations must map strings to strings")
    return Manifest(media_type, str(Digest.of(body)), len(body), tuple(refs), subject, artifact_type, annotations)
