"""Mark and sweep garbage collection, safe while the server keeps serving.

Why it is safe online: the server touches every blob a manifest references
*before* it checks the blob and writes the manifest, and every upload leaves a
fresh blob. The sweep spares anything newer than ``grace`` seconds before the
collection started, and removes a blob by first renaming it aside and looking
at its modification time again, so a push that raced the mark phase either
sees the blob gone (and gets MANIFEST_BLOB_UNKNOWN, then re-uploads) or keeps it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from taxiway.registry import manifest as manifests
from taxiway.registry.errors import RegistryError
from taxiway.registry.storage import FilesystemStorage


def _refs(storage: FilesystemStorage, repo: str, digest: str) -> list[manifests.Ref]:
    media_type = storage.manifest_media_type(repo, digest)
    try:
        return list(manifests.parse(storage.read_blob(digest), media_type).refs)
    except (FileNotFoundError, RegistryError):
        return []


def _reachable(storage: FilesystemStorage, repo: str) -> set[str]:
    """Manifests reachable from tags: index children and referrers of reachable ones."""
    todo = [d for t in storage.tags(repo) or [] if (d := storage.resolve_tag(repo, t))]
    seen: set[str] = set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo += [r.digest for r in _refs(storage, repo, d) if r.is_manifest]
        todo += [x["digest"] for x in storage.referrers(repo, d)]
    return seen


def collect(root: str | Path, *, dry_run: bool = False, untagged: bool = False, grace: float = 3600) -> dict:
    """Remove unreferenced blobs (and, with ``untagged``, unreachable manifests); returns a report."""
    storage = FilesystemStorage(root)
    cutoff = time.time() - grace
    removed_manifests: list[str] = []
    marked: set[str] = set()
    for repo in storage.repositories():
        revisions = storage.revisions(repo)
        if untagged:
            reachable = _reachable(storage, repo)
            for d in revisions:
                if d in reachable:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if storage._revision(repo, d).stat().st_mtime > cutoff:
                        continue
                    removed_manifests.append(f"{repo}@{d}")
                    if not dry_run:
                        storage.delete_manifest(repo, d)
            revisions = storage.revisions(repo) if not dry_run else [d for d in revisions if d in reachable]
        for d in revisions:
            marked.add(d)
            marked.update(r.digest for r in _refs(storage, repo, d))

    removed_blobs: list[str] = []
    freed = kept = 0
    for digest, path in list(storage.all_blobs()):
        if digest in marked:
            kept += 1
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime > cutoff:
            kept += 1
            continue
        if dry_run:
            removed_blobs.append(digest)
            freed += st.st_size
            continue
        aside = path.with_name(f".{path.name}.gc.tmp")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        if aside.stat().st_mtime > cutoff:  # touched by a push between our look and the rename
            os.replace(aside, path)
            kept += 1
            continue
        aside.unlink()
        removed_blobs.append(digest)
        freed += st.st_size

    gone = set(removed_blobs)
    if not dry_run and gone:
        for repo_dir in storage.repos.rglob("_layers"):
            for link in repo_dir.glob("*/*"):
                if f"{link.parent.name}:{link.name}" in gone:
                    link.unlink(missing_ok=True)
    return {"manifests": removed_manifests, "blobs": removed_blobs, "bytes": freed, "kept_blobs": kept,
            "dry_run": dry_run}
