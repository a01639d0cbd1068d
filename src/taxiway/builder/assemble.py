"""Image assembly: a run image plus layers, a config and labels, written to the store.

Everything that goes into the config is a function of the inputs (the created
time is fixed, JSON keys are sorted), so the same layers always give the same
manifest digest.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Descriptor

CREATED = "1980-01-01T00:00:01Z"
LIFECYCLE_LABEL = "io.buildpacks.lifecycle.metadata"
BUILD_LABEL = "io.buildpacks.build.metadata"
PROJECT_LABEL = "io.buildpacks.project.metadata"


def dumps(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def put_image(store, config: dict, layers: list[Descriptor]) -> Descriptor:
    """Write ``config`` and an OCI manifest over ``layers`` (already in the store); returns the manifest descriptor."""
    cfg = dumps(config)
    # With the digest known up front the store skips blobs it has (a rebuild rewrites nothing it needn't).
    cdesc = store.write_blob(cfg, expected_digest=sha256(cfg), media_type=mt.OCI_CONFIG)
    manifest = {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": cdesc.digest, "size": cdesc.size},
        "layers": [{"mediaType": d.media_type or mt.OCI_LAYER_GZIP, "digest": d.digest, "size": d.size} for d in layers],
    }
    raw = dumps(manifest)
    digest = store.write_blob(raw, expected_digest=sha256(raw), media_type=mt.OCI_MANIFEST).digest
    return Descriptor(mt.OCI_MANIFEST, digest, len(raw))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tag_if_changed(store, name: str, desc: Descriptor) -> None:
    """Point ``name`` at ``desc`` unless it already does (saves a locked index rewrite)."""
    from taxiway.errors import NotFound

    try:
        if store.resolve(name).digest == desc.digest:
            return
    except NotFound:
        pass
    store.tag(name, desc)


def with_layers(base_config: dict, diff_ids: list[str], history: list[str]) -> dict:
    """A copy of ``base_config`` with more layers (and one history entry each) on top."""
    cfg = copy.deepcopy(base_config)
    cfg["created"] = CREATED
    cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    cfg["rootfs"]["diff_ids"] = list(cfg["rootfs"].get("diff_ids") or []) + list(diff_ids)
    hist = list(cfg.get("history") or [])
    hist += [{"created": CREATED, "created_by": h} for h in history]
    cfg["history"] = hist
    return cfg


def merge_env(base: list[str], updates: dict[str, str]) -> list[str]:
    """``KEY=VALUE`` list of ``base`` with ``updates`` replacing or adding keys, order kept."""
    out: dict[str, str] = {}
    for item in base:
        k, _, v = item.partition("=")
        out[k] = v
    out.update(updates)
    return [f"{k}={v}" for k, v in out.items()]
