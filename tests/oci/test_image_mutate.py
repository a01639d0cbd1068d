"""The image model's mutate API: append layers, set the config, rebase, write into a store."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput, NotFound
from taxiway.oci import mediatypes as mt
from taxiway.oci.image import (
    Addendum,
    Descriptor,
    Image,
    MutatedImage,
    append_layers,
    canonical_json,
    empty_image,
    rebase,
    set_config,
    write_image,
)
from taxiway.oci.store import BlobMismatch, Store


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def layer(text: str, created_by: str = "") -> tuple[Addendum, bytes]:
    """A one-file gzip layer (made in memory) as an Addendum with an opener, and its bytes."""
    tar = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=tar, mode="w") as tf:
        data = text.encode()
        ti = tarfile.TarInfo(text.replace("/", "_") or "empty")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    raw = tar.getvalue()
    gz = gzip.compress(raw, mtime=0)
    desc = Descriptor(mt.OCI_LAYER_GZIP, sha(gz), len(gz))
    return Addendum(desc, sha(raw), {"created_by": created_by or f"add {text}"}, opener=lambda: io.BytesIO(gz)), gz


def base_image(store: Store, *texts: str, config: dict | None = None) -> Image:
    """An image of ``texts`` layers written to ``store`` and read back as the store's image."""
    img = append_layers(empty_image(), *(layer(t)[0] for t in texts))
    if config is not None:
        img = set_config(img, {**img.config(), **config})
    desc = write_image(store, img)
    return store.image(desc.digest)


def test_empty_image_is_an_image_with_no_layers():
    e = empty_image()
    assert isinstance(e, Image) and isinstance(e, MutatedImage)
    assert e.layers() == [] and e.config()["rootfs"] == {"type": "layers", "diff_ids": []}
    assert e.digest() == sha(e.manifest_bytes())
    assert e.manifest()["config"]["digest"] == sha(e.config_bytes())
    assert e.config()["os"] == "linux"


def test_append_layers_adds_layers_diff_ids_and_history_in_order(tmp_path):
    store = Store(tmp_path / "s")
    base = base_image(store, "one", config={"config": {"Env": ["A=1"]}})
    (a, _), (b, _) = layer("two"), layer("three")
    img = append_layers(base, a, b)
    assert [d.digest for d in img.layers()] == [*(d.digest for d in base.layers()), a.layer.digest, b.layer.digest]
    cfg = img.config()
    assert cfg["rootfs"]["diff_ids"] == [*base.config()["rootfs"]["diff_ids"], a.diff_id, b.diff_id]
    assert [h["created_by"] for h in cfg["history"]] == ["add one", "add two", "add three"]
    assert cfg["config"] == {"Env": ["A=1"]}, "the rest of the base config is kept"
    # Nothing is written until write_image.
    assert not store.has_blob(a.layer.digest)
    desc = write_image(store, img)
    back = store.image(desc.digest)
    assert back.manifest_bytes() == img.manifest_bytes() and back.config_bytes() == img.config_bytes()
    assert desc == Descriptor(mt.OCI_MANIFEST, img.digest(), len(img.manifest_bytes()))
    with store.open_blob(b.layer.digest) as f:
        assert gzip.decompress(f.read())  # the layer came from its opener


def test_same_inputs_same_digest_and_canonical_json(tmp_path):
    (a, _), (b, _) = layer("x"), layer("y")
    one = append_layers(empty_image(), a, b)
    two = append_layers(append_layers(empty_image(), a), b)
    assert one.digest() == two.digest()
    assert one.manifest_bytes() == canonical_json(json.loads(one.manifest_bytes()))
    assert one.config_bytes() == canonical_json(json.loads(one.config_bytes()))
    assert append_layers(empty_image(), b, a).digest() != one.digest()


def test_config_is_a_copy_and_set_config_keeps_layers(tmp_path):
    (a, _) = layer("x")
    img = append_layers(empty_image(), a)
    cfg = img.config()
    cfg["config"] = {"User": "1000:1000"}
    assert "config" not in img.config(), "editing the returned dict does not change the image"
    new = set_config(img, cfg)
    assert new.config()["config"] == {"User": "1000:1000"} and new.layers() == img.layers()
    assert new.digest() != img.digest()
    cfg["config"]["User"] = "0:0"
    assert new.config()["config"]["User"] == "1000:1000", "set_config copies what it is given"
    # Without rootfs, the base's is kept; other diff IDs are refused.
    assert set_config(img, {"config": {}}).config()["rootfs"] == img.config()["rootfs"]
    with pytest.raises(ValueError, match="diff_ids"):
        set_config(img, {"rootfs": {"type": "layers", "diff_ids": []}})


def test_bad_addendum_and_inconsistent_base_are_refused(tmp_path):
    (a, _) = layer("x")
    with pytest.raises(InvalidInput, match="invalid digest"):
        append_layers(empty_image(), Addendum(a.layer, "not-a-digest"))
    store = Store(tmp_path / "s")
    # A base whose config lists more diff IDs than it has layers.
    bad_cfg = canonical_json({"rootfs": {"type": "layers", "diff_ids": [a.diff_id]}})
    cdesc = store.write_blob(bad_cfg, media_type=mt.OCI_CONFIG)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cdesc.to_json(), "layers": []})
    base = store.image(store.put_manifest(manifest, mt.OCI_MANIFEST))
    with pytest.raises(InvalidInput, match="2 diff IDs for 1 layers"):
        append_layers(base, layer("y")[0])


def test_open_blob_serves_config_manifest_and_layers_only():
    (a, gz) = layer("x")
    img = append_layers(empty_image(), a)
    assert img.open_blob(img.digest()).read() == img.manifest_bytes()
    assert img.open_blob(img.config_descriptor().digest).read() == img.config_bytes()
    assert img.open_blob(a.layer.digest).read() == gz
    with pytest.raises(NotFound):
        img.open_blob(sha(b"something else"))


def test_write_image_verifies_layers_and_writes_no_manifest_on_mismatch(tmp_path):
    store = Store(tmp_path / "s")
    (a, _) = layer("x")
    lying = Addendum(a.layer, a.diff_id, opener=lambda: io.BytesIO(b"not the layer"))
    img = append_layers(empty_image(), lying)
    with pytest.raises(BlobMismatch):
        write_image(store, img)
    assert not store.has_blob(a.layer.digest) and not store.has_blob(img.digest())


def test_write_image_skips_layers_the_store_has(tmp_path):
    store = Store(tmp_path / "s")
    (a, gz) = layer("x")
    store.write_blob(gz, a.layer.digest)
    no_opener = Addendum(a.layer, a.diff_id, {"created_by": "built in place"})
    desc = write_image(store, append_layers(empty_image(), no_opener))
    assert store.image(desc.digest).layers() == [a.layer]


def test_write_image_copies_a_store_image_to_another_store(tmp_path):
    src = base_image(Store(tmp_path / "a"), "one", "two")
    dst = Store(tmp_path / "b")
    desc = write_image(dst, src)
    assert desc.digest == src.digest()
    copy = dst.image(desc.digest)
    assert copy.manifest_bytes() == src.manifest_bytes() and copy.config_bytes() == src.config_bytes()


def test_rebase_swaps_the_base_keeps_the_top_and_goes_back_byte_for_byte(tmp_path):
    store = Store(tmp_path / "s")
    old_base = base_image(store, "os", config={"architecture": "amd64", "os": "linux"})
    new_base = base_image(store, "os", "patch", config={"architecture": "amd64", "os": "linux", "variant": "v2",
                                                        "history": [{"created_by": "os"}, {"created_by": "ENV", "empty_layer": True},
                                                                    {"created_by": "patch"}]})
    top = append_layers(old_base, layer("app")[0], layer("deps")[0])
    app = set_config(top, {**top.config(), "config": {"Cmd": ["run"]}})
    orig = store.image(write_image(store, app).digest)

    moved = rebase(orig, 1, new_base)
    assert [d.digest for d in moved.layers()] == [*(d.digest for d in new_base.layers()), *(d.digest for d in orig.layers()[1:])]
    cfg = moved.config()
    assert cfg["rootfs"]["diff_ids"] == new_base.config()["rootfs"]["diff_ids"] + orig.config()["rootfs"]["diff_ids"][1:]
    assert [h["created_by"] for h in cfg["history"]] == ["os", "ENV", "patch", "add app", "add deps"]
    assert cfg["config"] == {"Cmd": ["run"]} and cfg["variant"] == "v2", "the app's config, the new base's platform"
    # The layers it names can be read: the top from the old image, the base from the new one.
    for d in moved.layers():
        with moved.open_blob(d.digest) as f:
            assert sha(f.read()) == d.digest

    back = rebase(store.image(write_image(store, moved).digest), 2, old_base)
    assert back.config()["history"] == orig.config()["history"]
    assert "variant" not in back.config()
    assert back.digest() == orig.digest() and back.config_bytes() == orig.config_bytes()


def test_rebase_refuses_more_base_layers_than_the_image_has():
    img = append_layers(empty_image(), layer("x")[0])
    with pytest.raises(ValueError, match="base_layers=2"):
        rebase(img, 2, empty_image())


@settings(max_examples=30, deadline=None)
@given(base=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4, unique=True),
       top=st.lists(st.text(alphabet="xyz", min_size=1, max_size=4), max_size=4, unique=True),
       other=st.lists(st.text(alphabet="mno", min_size=1, max_size=4), max_size=4, unique=True))
def test_rebase_onto_another_base_and_back_is_the_identity(base, top, other):
    b = append_layers(empty_image(), *(layer(t)[0] for t in base))
    o = append_layers(empty_image(), *(layer(t)[0] for t in other))
    img = append_layers(b, *(layer(t)[0] for t in top))
    there = rebase(img, len(base), o)
    assert len(there.layers()) == len(other) + len(top)
    assert rebase(there, len(other), b).digest() == img.digest()
