"""The threads that take hashing and decompression off the critical paths of pull and export.

Same digests as a plain hashlib, bounded memory, nothing left running when a layer
fails half-way, and a plain-HTTP client that never builds the HTTPS side.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
import time

import pytest
from helpers.layout import Entry, make_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from oci.fakeregistry import fake_registry
from oci.test_faults import GZ
from taxiway.oci.layerio import DiffHasher, HashThread
from taxiway.oci.unpack import LayerError, apply_layer

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("layer-inflate", "layer-diffhash", "diffhash",
                                                                        "blob-check"))]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=12))
def test_hash_thread_digest_is_hashlibs(chunks):
    h = HashThread(budget=4096)
    for c in chunks:
        h.update(c)
    assert h.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert not h._t.is_alive()


def test_hash_thread_holds_at_most_its_budget_or_one_chunk():
    h = HashThread(budget=1 << 20)
    peak = 0
    for size in [300_000] * 20 + [5 << 20, 100, 700_000]:
        h.update(bytes(size))
        peak = max(peak, h._bytes)
        assert h._bytes <= max(1 << 20, size)
    h.hexdigest()
    assert peak > 0 and h._bytes == 0


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_diff_hasher_with_a_hash_thread_matches_the_plain_one(compression):
    import zstandard

    content = make_layer([Entry(f"f{i}", data=os.urandom(50_000) + bytes(200_000)) for i in range(20)])
    blob = gzip.compress(content, mtime=0) if compression == "gzip" else zstandard.ZstdCompressor().compress(content)
    d = DiffHasher(compression, HashThread())
    for i in range(0, len(blob), 65536):
        d.update(blob[i:i + 65536])
    assert d.finish() == "sha256:" + hashlib.sha256(content).hexdigest()


def test_a_layer_failing_early_stops_the_inflater_that_is_ahead_of_it(tmp_path):
    """The parser gives up on the first header while the inflater has a full queue and more to do."""
    blob = gzip.compress(b"\x01" * 512 + bytes(64 << 20), compresslevel=1)
    t = time.monotonic()
    with pytest.raises(LayerError, match="pull it again"):
        apply_layer(tmp_path, io.BytesIO(blob), GZIP, name="layer 0")
    assert time.monotonic() - t < 20
    assert _our_threads() == []


def test_a_corrupt_gzip_is_still_refused_and_leaves_no_thread(tmp_path):
    g = bytearray(gzip.compress(make_layer([Entry("a", data=os.urandom(300_000))])))
    g[len(g) // 2] ^= 0xFF
    with pytest.raises(LayerError, match="corrupt or truncated"):
        apply_layer(tmp_path, io.BytesIO(bytes(g)), GZIP, name="layer 0")
    assert _our_threads() == []


def test_many_small_files_in_few_directories_through_the_workers(tmp_path):
    """Files of one batch share their parent's fd; a symlink swapped mid-layer is still never written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [Entry("d", "dir"), Entry("e", "dir")]
    entries += [Entry(f"{'de'[i % 2]}/f{i}", data=str(i).encode()) for i in range(300)]
    entries += [Entry("l", "symlink", linkname=str(outside)), Entry("l/x", data=b"x"),  # resolved inside the root
                Entry(".wh.l"), Entry("l", "dir"), Entry("l/y", data=b"y")]
    entries += [Entry(f"d/g{i}", data=b"g") for i in range(100)]
    root = tmp_path / "root"
    root.mkdir()
    stats = apply_layer(root, io.BytesIO(make_layer(entries)), TAR, workers=2)
    assert stats.skipped == 0, stats.warnings
    assert len(os.listdir(root / "d")) == 250 and len(os.listdir(root / "e")) == 150
    assert (root / "d/f10").read_bytes() == b"10" and (root / "e/f11").read_bytes() == b"11"
    assert os.listdir(outside) == []
    assert sorted(os.listdir(root / "l")) == ["y"] and not (root / "l").is_symlink()


def test_a_plain_http_loopback_client_never_loads_the_trust_store(monkeypatch, taxiway_home):
    import httpx

    from taxiway.oci import client as client_mod
    from taxiway.oci.pull import pull

    def refuse():
        raise AssertionError("the TLS context was built for a plain-HTTP pull")

    monkeypatch.setattr(client_mod, "_tls_context", refuse)
    with fake_registry() as reg:
        reg.add_image("app", "v1", [(gzip.compress(make_layer([Entry("a", data=b"a")])), GZ)])
        result = pull(f"{reg.address}/app:v1")
    assert result.fetched >= 2
    with client_mod.RegistryClient("127.0.0.1:5000", use_stored_credentials=False) as c:
        # https:// URLs (registry, token realm, redirect) always take the verifying transport
        assert isinstance(c._http._transport_for_url(httpx.URL("https://127.0.0.1:5000/v2/")), client_mod._LazyTLSTransport)
        assert not isinstance(c._http._transport_for_url(httpx.URL("http://127.0.0.1:5000/v2/")),
                              client_mod._LazyTLSTransport)


def test_directory_owners_are_exact_with_the_chowns_skipped(tmp_path):
    """Directories this layer made skip a chown only when they already have the entry's owner."""
    if os.geteuid() != 0:
        pytest.skip(reason="owners are applied when root")
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(root, io.BytesIO(make_layer([Entry("sg", "dir", mode=0o2775, gid=50), Entry("lower", "dir", uid=7, gid=8)])),
                TAR)
    apply_layer(root, io.BytesIO(make_layer([
        Entry("sg/d", "dir"),  # made below a setgid parent: inherits gid 50, must be chowned back to 0
        Entry("lower", "dir"),  # merged with a lower layer's directory owned by 7:8: back to 0:0
        Entry("mine", "dir"), Entry("mine/x", "dir", uid=3, gid=4),
        Entry("twice", "dir"), Entry("twice", "dir", uid=5, gid=6),  # re-declared: the last entry's owner
    ])), TAR)
    owners = {p: (os.stat(root / p).st_uid, os.stat(root / p).st_gid) for p in ("sg/d", "lower", "mine", "mine/x", "twice")}
    assert owners == {"sg/d": (0, 0), "lower": (0, 0), "mine": (0, 0), "mine/x": (3, 4), "twice": (5, 6)}
