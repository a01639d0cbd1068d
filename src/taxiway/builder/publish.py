"""Push a built image with the images part's registry client (``taxiway.oci.push``)."""

from __future__ import annotations


def push_image(store, name: str, insecure: bool = False) -> dict:
    """Push the store's ``name`` to the registry its name points at; returns what was pushed."""
    from taxiway.oci.push import push
    from taxiway.oci.store import normalize_name

    ref = normalize_name(name)
    result = push(ref, insecure=insecure, store=store)
    return {"reference": ref, "digest": result.digest, "uploaded": result.uploaded, "existing": result.existing}
