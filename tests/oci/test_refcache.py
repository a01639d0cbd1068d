"""The store's reference cache (oci.refcache): a hit without opening the store, a miss after
any index change (pull, tag, rm), prune drops it, a corrupt file is ignored and rewritten,
and the store stays an OCI layout skopeo reads."""

from __future__ import annotations

import json
import subprocess

from helpers.layout import Entry, busybox_entries, make_layer, skopeo_push, write_layout

from taxiway.oci import refcache
from taxiway.oci.image import Descriptor
from taxiway.oci.store import Store


def _add(store: Store, layout, layers: list[bytes], name: str, tag: str = "latest") -> Descriptor:
    desc = write_layout(layout, layers, tag)
    for b in (layout / "blobs" / "sha256").iterdir():
        if not store.has_blob("sha256:" + b.name):
            with b.open("rb") as f:
                store.write_blob(f, "sha256:" + b.name)
    d = Descriptor.from_json(desc)
    store.tag(name, d)
    return d


def test_hit_after_the_store_resolves_and_the_image_reads_layers(tmp_path):
    s = Store(tmp_path / "store")
    d = _add(s, tmp_path / "a", [make_layer(busybox_entries())], "127.0.0.1:5000/a:latest")
    ref = "127.0.0.1:5000/a:latest"
    assert refcache.lookup(ref, s.root) is None  # never resolved
    img = s.image(ref)
    digest, config = refcache.lookup(ref, s.root)
    assert digest == d.digest == img.digest() and config == img.config()
    by_digest = s.image(digest)  # what machines open when layers are needed: the same manifest
    assert by_digest.layers() == img.layers()
    again = s.image(ref)  # the store's own hit: the same answer
    assert again.digest() == d.digest and again.media_type() == img.media_type()
    assert refcache.lookup("127.0.0.1:5000/other:latest", s.root) is None
    # skopeo still reads the store as an OCI layout with the cache inside it
    out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{s.root}:{ref}"], capture_output=True, check=True)
    assert json.loads(out.stdout)["config"]["digest"] == img.config_descriptor().digest


def test_tag_and_rm_invalidate(tmp_path):
    s = Store(tmp_path / "store")
    base = make_layer(busybox_entries())
    a = _add(s, tmp_path / "a", [base], "127.0.0.1:5000/a:latest")
    b = _add(s, tmp_path / "b", [base, make_layer([Entry("etc/b", "file", b"b\n")])], "127.0.0.1:5000/b:latest")
    ref = "127.0.0.1:5000/app:latest"
    s.tag(ref, a)
    assert s.image(ref).digest() == a.digest and refcache.lookup(ref, s.root)[0] == a.digest
    s.tag(ref, b)  # the same name now points elsewhere
    assert refcache.lookup(ref, s.root) is None
    assert s.image(ref).digest() == b.digest and refcache.lookup(ref, s.root)[0] == b.digest
    s.untag(ref)
    assert refcache.lookup(ref, s.root) is None
    s.image("127.0.0.1:5000/a:latest")
    assert refcache.lookup("127.0.0.1:5000/a:latest", s.root)[0] == a.digest
    # another tool rewriting index.json (same content, new file) keeps hits; different content misses
    raw = (s.root / "index.json").read_bytes()
    (s.root / "index.json").unlink()
    (s.root / "index.json").write_bytes(raw)
    assert refcache.lookup("127.0.0.1:5000/a:latest", s.root)[0] == a.digest
    (s.root / "index.json").write_bytes(raw.replace(b'"manifests":[', b'"manifests":[ ', 1))
    assert refcache.lookup("127.0.0.1:5000/a:latest", s.root) is None


def test_prune_drops_the_cache(tmp_path):
    s = Store(tmp_path / "store")
    a = _add(s, tmp_path / "a", [make_layer(busybox_entries())], "127.0.0.1:5000/a:latest")
    s.image("127.0.0.1:5000/a:latest")
    s.untag("127.0.0.1:5000/a:latest")
    s.prune()
    assert not (s.meta / refcache.CACHE_NAME).exists()
    assert not s.has_blob(a.digest)


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    s = Store(tmp_path / "store")
    a = _add(s, tmp_path / "a", [make_layer(busybox_entries())], "127.0.0.1:5000/a:latest")
    ref = "127.0.0.1:5000/a:latest"
    s.image(ref)
    path = s.meta / refcache.CACHE_NAME
    good = json.loads(path.read_bytes())
    for bad in (b"{not json", b"[]", b'{"index": 1, "refs": {}}',
                json.dumps({**good, "refs": {ref: {"digest": 5}}}).encode()):
        path.write_bytes(bad)
        assert refcache.lookup(ref, s.root) is None
        assert s.image(ref).digest() == a.digest  # the store answers and rewrites the file
        assert refcache.lookup(ref, s.root)[0] == a.digest
    path.unlink()
    assert refcache.lookup(ref, s.root) is None


def test_a_pull_invalidates(registry, tmp_path, taxiway_home):
    from taxiway.oci.pull import ensure_image, pull

    base = make_layer(busybox_entries())
    write_layout(tmp_path / "one", [base], "one")
    write_layout(tmp_path / "two", [base, make_layer([Entry("etc/two", "file", b"2\n")])], "two")
    ref = f"{registry.address}/refcache:latest"
    skopeo_push(tmp_path / "one", "one", ref)
    store = Store(taxiway_home / "store")
    first = ensure_image(ref, store=store)
    assert refcache.lookup(ref) == (first.digest(), first.config())  # default root: $TAXIWAY_HOME/store
    skopeo_push(tmp_path / "two", "two", ref)
    pull(ref, store=store)
    assert refcache.lookup(ref) is None
    second = ensure_image(ref, store=store)
    assert second.digest() != first.digest() and refcache.lookup(ref)[0] == second.digest()
