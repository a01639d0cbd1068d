"""The builder's fixed parts of an image: the created time, the buildpack labels, tagging.

Images are assembled through the image model (``taxiway.oci.image``: the run
image, ``append_layers``, ``set_config``, ``rebase``, ``write_image``).
Everything that goes into the config is a function of the inputs (the created
time is fixed, the JSON is canonical), so the same layers always give the same
manifest digest.
"""

from __future__ import annotations

from taxiway.oci.image import Descriptor

CREATED = "1980-01-01T00:00:01Z"
LIFECYCLE_LABEL = "io.buildpacks.lifecycle.metadata"
BUILD_LABEL = "io.buildpacks.build.metadata"
PROJECT_LABEL = "io.buildpacks.project.metadata"


def history(created_by: str) -> dict[str, str]:
    """An image history entry at the fixed created time."""
    return {"created": CREATED, "created_by": created_by}


def tag_if_changed(store, name: str, desc: Descriptor) -> None:
    """Point ``name`` at ``desc`` unless it already does (saves a locked index rewrite)."""
    from taxiway.errors import NotFound

    try:
        if store.resolve(name).digest == desc.digest:
            return
    except NotFound:
        pass
    store.tag(name, desc)


def merge_env(base: list[str], updates: dict[str, str]) -> list[str]:
    """``KEY=VALUE`` list of ``base`` with ``updates`` replacing or adding keys, order kept."""
    out: dict[str, str] = {}
    for item in base:
        k, _, v = item.partition("=")
        out[k] = v
    out.update(updates)
    return [f"{k}={v}" for k, v in out.items()]
