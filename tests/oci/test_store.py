"""The local store: verified blob writes, names in index.json, prune; read by skopeo and umoci."""

from __future__ import annotations

import io
import json
import subprocess

import pytest
from helpers.layout import busybox_entries, make_layer, write_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput, NotFound
from taxiway.oci.digest import sha256_digest
from taxiway.oci.image import Descriptor, Platform
from taxiway.oci.store import BlobMismatch, Store, select_platform


def _import_layout(store: Store, layout, desc: dict, name: str) -> Descriptor:
    for b in (layout / "blobs" / "sha256").iterdir():
        with b.open("rb") as f:
            store.write_blob(f, "sha256:" + b.name)
    d = Descriptor.from_json(desc)
    store.tag(name, d)
    return d


def test_write_blob_verifies_and_leaves_nothing_on_mismatch(tmp_path):
    s = Store(tmp_path / "store")
    d = s.write_blob(b"hello")
    assert d.digest == sha256_digest(b"hello") and s.has_blob(d.digest) and d.size == 5
    bad = sha256_digest(b"other")
    with pytest.raises(BlobMismatch):
        s.write_blob(io.BytesIO(b"hello!"), bad)
    with pytest.raises(BlobMismatch):
        s.write_blob(b"hello!", sha256_digest(b"hello!"), expected_size=3)
    assert not s.has_blob(bad)
    assert list((s.meta / "ingest").iterdir()) == []
    assert sorted(p.name for p in s.blobs.iterdir()) == [d.digest.split(":")[1]]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "sha256:../../x", "sha256:" + "g" * 64, "md5:abc", ""])
def test_digests_are_validated_before_naming_files(tmp_path, bad):
    s = Store(tmp_path / "store")
    with pytest.raises(InvalidInput):
        s.blob_path(bad)


def test_tag_resolve_untag_prune_and_peers_read_it(tmp_path):
    layout = tmp_path / "layout"
    desc = write_layout(layout, [make_layer(busybox_entries())])
    s = Store(tmp_path / "store")
    d = _import_layout(s, layout, desc, "127.0.0.1:5000/busybox")
    stray = s.write_blob(b"unreferenced")
    assert s.resolve("127.0.0.1:5000/busybox:latest").digest == d.digest
    assert s.resolve(d.digest).digest == d.digest
    assert s.resolve(d.digest[7:19]).digest == d.digest
    img = s.image("127.0.0.1:5000/busybox:latest")
    assert img.digest() == d.digest and len(img.layers()) == 1
    assert img.config()["rootfs"]["diff_ids"]
    out = subprocess.run(["skopeo", "inspect", f"oci:{s.root}:127.0.0.1:5000/busybox:latest"], check=True, capture_output=True)
    assert json.loads(out.stdout)["Digest"] == d.digest
    out = subprocess.run(["umoci", "ls", "--layout", str(s.root)], check=True, capture_output=True, text=True)
    assert "127.0.0.1:5000/busybox:latest" in out.stdout
    assert s.prune() == [stray.digest]
    s.tag("127.0.0.1:5000/other:v1", d)
    s.untag("127.0.0.1:5000/busybox")
    assert s.prune() == []
    s.untag("127.0.0.1:5000/other:v1")
    assert len(s.prune()) == 3 and list(s.blobs.iterdir()) == []
    with pytest.raises(NotFound):
        s.resolve("127.0.0.1:5000/busybox")


_plat = st.builds(Platform, st.sampled_from(["linux", "windows"]), st.sampled_from(["amd64", "arm64", "arm"]),
                  st.sampled_from([None, "v7", "v8"]))


@given(st.lists(_plat, max_size=6), _plat)
def test_select_platform_picks_a_match_or_lists_what_exists(plats, want):
    index = {"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256_digest(str(i).encode()),
                            "size": 1, "platform": p.to_json()} for i, p in enumerate(plats)]}
    try:
        d = select_platform(index, want)
    except NotFound as e:
        assert not any(want.matches(p) for p in plats)
        for p in plats:
            assert str(p) in str(e)
    else:
        assert want.matches(d.platform)


def _tiny_image(store: Store, layer_payloads: list[bytes]) -> Descriptor:
    layers = [store.write_blob(p, media_type="application/vnd.oci.image.layer.v1.tar") for p in layer_payloads]
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]}}).encode()
    c = store.write_blob(cfg)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.digest, "size": c.size},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.digest, "size": d.size}
                                      for d in layers]}).encode()
    dg = store.put_manifest(manifest, "application/vnd.oci.image.manifest.v1+json")
    return Descriptor("application/vnd.oci.image.manifest.v1+json", dg, len(manifest))


_payloads = st.lists(st.sampled_from([b"a", b"b", b"c", b"d"]), min_size=1, max_size=3)
_names = st.sampled_from(["127.0.0.1:5000/x:1", "127.0.0.1:5000/x:2", "127.0.0.1:5000/y:1"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.tuples(st.just("tag"), _names, _payloads), st.tuples(st.just("untag"), _names, st.none()),
                          st.tuples(st.just("prune"), st.none(), st.none())), max_size=12))
def test_store_operations_keep_every_named_image_whole(tmp_path_factory, ops):
    """Whatever sequence of tag/untag/prune: named images stay complete, prune keeps nothing unreachable."""
    s = Store(tmp_path_factory.mktemp("store"))
    expected: dict[str, str] = {}
    for op, name, payloads in ops:
        if op == "tag":
            d = _tiny_image(s, payloads)
            s.tag(name, d)
            expected[name] = d.digest
        elif op == "untag":
            if name in expected:
                s.untag(name)
                del expected[name]
            else:
                with pytest.raises(NotFound):
                    s.untag(name)
        else:
            s.prune()
            on_disk = {"sha256:" + p.name for p in s.blobs.iterdir()}
            assert on_disk == s.referenced()
        assert {n: d.digest for n, d in s.images()} == expected
        for n in expected:
            img = s.image(n)
            assert all(s.has_blob(d.digest) for d in [img.config_descriptor(), *img.layers()])


def test_prune_waits_for_leases(tmp_path):
    import threading
    import time

    s = Store(tmp_path / "store")
    done = threading.Event()
    with s.lease():
        blob = s.write_blob(b"being pulled, not yet named")
        t = threading.Thread(target=lambda: (Store(s.root).prune(), done.set()))
        t.start()
        time.sleep(0.3)
        assert not done.is_set() and s.has_blob(blob.digest)
    t.join(10)
    assert done.is_set() and not s.has_blob(blob.digest)
