"""Mark and sweep garbage collection, safe while the server keeps serving.

Why it is safe online, with any ``grace`` (even 0): a manifest push checks its
references, writes the manifest and its tag, then touches the blobs it references
again, all while holding those blobs' locks shared and the manifest's own
exclusively. GC removes a blob, or an untagged manifest, holding that digest's lock
and looking again: at the blob's modification time (a push that completed after the
mark phase touched it after GC started, so it is spared), at the manifest's tags.
``grace`` spares anything written within it before the collection started (by the
filesystem's own clock); a push that starts after a removal finds the blob gone and
gets MANIFEST_BLOB_UNKNOWN, then re-uploads.

Each blob is removed, with every repository's link to it, while holding the
blob's lock, which the server also takes to publish and to link a blob (see
``storage.py``): an upload or a mount of that digest happens wholly before (the
blob is fresh, so it is spared) or wholly after (it publishes and links anew),
never in between, so a push answered 201 stays pullable.

Upload sessions idle for longer than the grace (or the configured max age,
whichever is shorter) are removed too, unless a request is writing to them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from taxiway.registry import manifest as manifests
from taxiway.registry.errors import DistributionError
from taxiway.registry.storage import FilesystemStorage


def _refs(storage: FilesystemStorage, repo: str, digest: str) -> list[manifests.Ref]:
    media_type = storage.manifest_media_type(repo, digest)
    try:
        return list(manifests.parse(storage.read_blob(digest), media_type).refs)
    except (FileNotFoundError, DistributionError):
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
    cutoff = _disk_now(storage) - grace
    removed_manifests: list[str] = []
    marked: set[str] = set()
    for repo in storage.repositories():
        revisions = storage.revisions(repo)
        if untagged:
            reachable = _reachable(storage, repo)
            for d in revisions:
                if d in reachable:
                    continue
                # Under the manifest's lock, which a push holds until its tag is written: look again.
                with storage.blob_lock(d), contextlib.suppress(FileNotFoundError):
                    if storage.revision_time(repo, d) >= cutoff:
                        continue
                    if not dry_run and d in _reachable(storage, repo):
                        continue
                    removed_manifests.append(f"{repo}@{d}")
                    if not dry_run:
                        storage.delete_manifest(repo, d)
            revisions = storage.revisions(repo) if not dry_run else [d for d in revisions if d in reachable]
        for d in revisions:
            marked.add(d)
            marked.update(r.digest for r in _refs(storage, repo, d))

    candidates: list[tuple[str, Path]] = []
    kept = 0
    for digest, path in list(storage.all_blobs()):
        if digest in marked:
            kept += 1
            continue
        try:
            if path.stat().st_mtime >= cutoff:
                kept += 1
                continue
        except FileNotFoundError:
            continue
        candidates.append((digest, path))

    # Every repository's links to the candidates, in one walk. A link made after this walk
    # was made under the blob's lock with the blob touched, so the recheck below spares it.
    links: dict[str, list[Path]] = {}
    if candidates:
        wanted = {d for d, _ in candidates}
        for repo_dir in storage.repos.rglob("_layers"):
            for link in repo_dir.glob("*/*"):
                d = f"{link.parent.name}:{link.name}"
                if d in wanted:
                    links.setdefault(d, []).append(link)

    removed_blobs: list[str] = []
    freed = 0
    for digest, path in candidates:
        with storage.blob_lock(digest):
            size = _remove_blob(path, cutoff, dry_run)
            if size is None:
                kept += 1
                continue
            if not dry_run:
                for link in links.get(digest, []):
                    link.unlink(missing_ok=True)
        removed_blobs.append(digest)
        freed += size

    sessions = 0
    if not dry_run:
        sessions = storage.expire_uploads(min(grace, storage.upload_max_age))
        storage.clean_temp(max(grace, 3600))  # a crash's leftovers; never a write still in progress
    return {"manifests": removed_manifests, "blobs": removed_blobs, "bytes": freed, "kept_blobs": kept,
            "upload_sessions": sessions, "dry_run": dry_run}


def _disk_now(storage: FilesystemStorage) -> float:
    """Now, by the clock the filesystem stamps modification times with (coarser than time.time())."""
    marker = storage.locks / "gc-clock"
    marker.touch()
    os.utime(marker)
    return marker.stat().st_mtime


def _remove_blob(path: Path, cutoff: float, dry_run: bool) -> int | None:
    """Remove an unmarked blob not used since ``cutoff`` (holding its lock); its size, or None if kept."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mtime >= cutoff:  # published, linked or referenced since we looked
        return None
    if dry_run:
        return st.st_size
    # A manifest PUT touches its blobs without the lock: rename aside, then look again.
    aside = path.with_name(f".{path.name}.gc.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    if aside.stat().st_mtime >= cutoff:  # touched between our look and the rename
        os.replace(aside, path)
        return None
    aside.unlink()
    return st.st_size
