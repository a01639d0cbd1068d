"""One layer pipeline: the same sniffing and the same error for pull, unpack, scan, export and load.

A registry may serve a gzip (or zstd) layer under the plain-tar media type:
magic bytes decide everywhere. Bad layer bytes are one LayerError, whose
message names the layer's digest and says what to do.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from typing import Any

import pytest
import zstandard
from helpers.layout import Entry, make_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from oci.fakeregistry import fake_registry, sha
from taxiway.oci import changeset
from taxiway.oci.archive import load
from taxiway.oci.image import Descriptor
from taxiway.oci.layerio import DiffHasher, LayerError, magic, members, sniff
from taxiway.oci.pull import pull
from taxiway.oci.scan import scan
from taxiway.oci.store import Store
from taxiway.oci.unpack import apply_layer, export

TAR = "application/vnd.oci.image.layer.v1.tar"
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"

BASE = make_layer([Entry("app", "dir"), Entry("app/.env", data=b"API_TOKEN=abcdef123456\n"), Entry("app/run", data=b"#!/bin/sh\n")])
UPPER = make_layer([Entry("app/.wh..env"), Entry("app/new", data=b"new\n")])


def _compress(raw: bytes, how: str) -> bytes:
    return gzip.compress(raw, mtime=0) if how == "gzip" else zstandard.ZstdCompressor().compress(raw)


class MemImage:
    """An in-memory single-platform Image: (blob, media type) layers and the diff IDs of their tars."""

    def __init__(self, layers: list[tuple[bytes, str]], diff_ids: list[str]):
        self.blobs = {sha(b): b for b, _ in layers}
        self._layers = [Descriptor(t, sha(b), len(b)) for b, t in layers]
        self._config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}

    def layers(self) -> list[Descriptor]:
        return self._layers

    def config(self) -> dict[str, Any]:
        return self._config

    def digest(self) -> str:
        return "sha256:" + "0" * 64

    def open_blob(self, digest: str) -> io.BytesIO:
        return io.BytesIO(self.blobs[digest])


# -- sniffing ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_magic_bytes_win_over_a_plain_media_type(how):
    blob = _compress(BASE, how)
    assert sniff(blob[:4], TAR) == how
    assert sniff(BASE[:4], TAR) == "none"
    assert sniff(BASE[:4], GZ) == "gzip"  # no magic: the media type decides (and the bytes then fail)
    assert sniff(b"BZh9", TAR) == "none"  # a tar may start with a file named BZh...; only gzip/zstd are sniffed
    assert magic(b"BZh9") == "bzip2"


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_a_compressed_layer_under_the_plain_tar_media_type_unpacks_and_scans(tmp_path, how):
    img = MemImage([(_compress(BASE, how), TAR), (_compress(UPPER, how), TAR)], [sha(BASE), sha(UPPER)])
    stats = export(img, tmp_path / "rootfs")
    assert sorted(p.name for p in (tmp_path / "rootfs" / "app").iterdir()) == ["new", "run"]
    assert [s.diff_id for s in stats.layers] == [sha(BASE), sha(UPPER)]
    result = scan(img)
    assert [(f.path, f.how, f.secret) for f in result.hidden] == [("app/.env", "deleted", True)]
    h = DiffHasher("none")  # what pull and load check with
    h.update(_compress(BASE, how))
    assert h.finish() == sha(BASE)


def test_pull_then_export_of_a_gzip_layer_served_as_plain_tar(tmp_path):
    blob = _compress(BASE, "gzip")
    store = Store(tmp_path / "store")
    with fake_registry() as reg:
        reg.add_image("app", "v1", [(blob, TAR)], diff_ids=[sha(BASE)])
        pull(f"{reg.address}/app:v1", store=store)
    export(store.image(f"{reg.address}/app:v1"), tmp_path / "rootfs")
    assert (tmp_path / "rootfs" / "app" / ".env").read_bytes().startswith(b"API_TOKEN=")


# -- one error -------------------------------------------------------------------


def _truncated() -> tuple[bytes, str]:
    blob = _compress(BASE + bytes(300_000), "gzip")
    bad = blob[: len(blob) // 2]
    return bad, sha(bad)


def _check(e: pytest.ExceptionInfo, digest: str, fix: str) -> None:
    assert type(e.value) is LayerError
    msg = str(e.value)
    assert digest[:19] in msg and "truncated" in msg and fix in msg, msg
    assert "\n" not in msg


def test_one_error_for_a_truncated_layer_in_unpack_export_and_scan(tmp_path):
    bad, digest = _truncated()
    img = MemImage([(bad, GZ)], [sha(BASE + bytes(300_000))])
    with pytest.raises(LayerError) as e:
        export(img, tmp_path / "rootfs")
    _check(e, digest, "pull it again")
    assert not (tmp_path / "rootfs").exists()
    with pytest.raises(LayerError) as e:
        scan(img)
    _check(e, digest, "pull it again")
    with pytest.raises(LayerError) as e:
        apply_layer(tmp_path, io.BytesIO(bad), TAR, name=f"layer {digest[:19]}")  # sniffed, then truncated
    _check(e, digest, "pull it again")


def test_one_error_for_a_truncated_layer_in_pull(tmp_path):
    bad, digest = _truncated()
    with fake_registry() as reg:
        reg.add_image("app", "v1", [(bad, GZ)], diff_ids=[sha(BASE + bytes(300_000))])
        with pytest.raises(LayerError) as e:
            pull(f"{reg.address}/app:v1", store=Store(tmp_path / "store"))
    _check(e, digest, "push it again")


def test_one_error_for_a_truncated_layer_in_load(tmp_path, taxiway_home):
    bad, digest = _truncated()
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [sha(BASE + bytes(300_000))]}}).encode()
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("config.json", cfg), ("layer.tar.gz", bad),
                           ("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["example.com/app:v1"],
                                                          "Layers": ["layer.tar.gz"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(LayerError) as e:
        load(archive, Store(taxiway_home / "store"))
    _check(e, digest, "write it again")


# -- the changeset rules (pure) ----------------------------------------------------

_names = st.lists(st.sampled_from(["a", "b", ".", "..", "", ".wh.a", ".wh..wh..opq", ".wh..wh.plnk", ".wh.", ".wh..",
                                   ".wh...", ".wh.b c"]), max_size=5).map("/".join)


@settings(max_examples=300, deadline=None)
@given(_names)
def test_entry_change_stays_inside_the_root_and_names_what_it_hides(name):
    from taxiway.oci._safepath import clean

    kind, parts = changeset.entry_change(name)
    assert all(p not in ("", ".", "..") and "/" not in p for p in parts)
    full = clean(name)
    if not full:
        assert kind == changeset.ROOT
    elif kind == changeset.PATH:
        assert parts == full and not full[-1].startswith(".wh.")
    elif kind == changeset.OPAQUE:
        assert full[-1] == ".wh..wh..opq" and parts == full[:-1]
    elif kind == changeset.WHITEOUT:
        assert parts == full[:-1] + (full[-1][4:],) and not full[-1].startswith(".wh..wh.")
    else:
        assert kind in (changeset.AUFS_META, changeset.EMPTY_WHITEOUT) and full[-1].startswith(".wh.")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(-1, 9), max_size=12))
def test_the_sniffed_head_is_handed_out_again_whatever_the_read_sizes(data, sizes):
    from taxiway.oci.layerio import _Head

    h = _Head(io.BytesIO(data))
    assert h.head == data[:4]
    got = b"".join(h.read(n) for n in sizes) + h.read()
    assert got == data


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(max_size=4000), min_size=1, max_size=4), st.sampled_from(["gzip", "zstd", "none"]),
       st.sampled_from([TAR, GZ]))
def test_pull_and_unpack_agree_on_the_diff_id_whatever_the_media_type_says(files, how, media_type):
    """DiffHasher (pull, load) and LayerReader (unpack, scan) read the same blob the same way."""
    from taxiway.oci.layerio import open_layer

    raw = make_layer([Entry(f"f{i}", data=d) for i, d in enumerate(files)])
    blob = raw if how == "none" else _compress(raw, how)
    h = DiffHasher(sniff(blob[:4], media_type))
    if how == "none" and media_type == GZ:  # no magic: the media type decides, and both refuse the bytes
        with pytest.raises(LayerError):
            h.update(blob)
        with pytest.raises(LayerError), open_layer(io.BytesIO(blob), media_type, "layer x") as src:
            list(members(src))
        return
    h.update(blob)
    with open_layer(io.BytesIO(blob), media_type, "layer x") as src:
        names = [m.name for _tf, m in members(src)]
        assert src.drain() == h.finish() == sha(raw)
    assert names == [f"f{i}" for i in range(len(files))]
