"""The pull's peak memory stays small on the paths around the plain big-layer download
(test_faults.test_pull_memory_stays_small_for_a_big_layer): a very compressible gzip
layer checked against its diff_id, fetched over a connection that drops, and resumed
by a second run from the partial file on disk."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys

import pytest

from oci.fakeregistry import fake_registry, sha
from oci.test_faults import GZ, peak_rss_kib

ZEROS = 256 << 20  # the layer's uncompressed size; gzip makes ~260 kB of it (1:1000)


@pytest.fixture
def reg():
    with fake_registry() as r:
        yield r


def _zeros_layer() -> tuple[bytes, str]:
    """(gzip of ZEROS zero bytes, its diff_id), without holding the content twice."""
    blob = gzip.compress(bytes(ZEROS), compresslevel=9, mtime=0)
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(ZEROS >> 20):
        h.update(block)
    return blob, "sha256:" + h.hexdigest()


def test_pull_memory_stays_small_for_a_very_compressible_layer_resumed_from_disk(reg, taxiway_home):
    blob, diff_id = _zeros_layer()
    reg.add_image("zeros", "v1", [(blob, GZ)], diff_ids=[diff_id])
    reg.drop_after = len(blob) // 6
    reg.faults = {sha(blob): ["drop"] * 5}  # the first run gives up with most of the blob on disk
    argv = [sys.executable, "-m", "taxiway", "pull", f"{reg.address}/zeros:v1"]

    code, kib, err = peak_rss_kib(argv)
    assert code != 0 and b"run the pull again" in err, err
    assert kib < 150 * 1024, f"peak RSS {kib // 1024} MiB (dropped connections)"
    part = taxiway_home / "store" / ".taxiway" / "ingest" / (sha(blob)[7:] + ".partial")
    assert part.stat().st_size == 5 * reg.drop_after

    # The second run checks the bytes on disk (the diff_id too), then fetches the rest with Range.
    code, kib, err = peak_rss_kib(argv)
    assert code == 0, err
    assert kib < 150 * 1024, f"peak RSS {kib // 1024} MiB (resumed from the partial file)"
    assert reg.requests("GET", f"/blobs/{sha(blob)}")[-1].headers.get("Range") == f"bytes={5 * reg.drop_after}-"
    assert (taxiway_home / "store" / "blobs" / "sha256" / sha(blob)[7:]).stat().st_size == len(blob)
    info = json.loads((taxiway_home / "store" / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in info["manifests"]] == [f"{reg.address}/zeros:v1"]


def test_pull_memory_stays_small_for_a_very_compressible_zstd_layer(reg, taxiway_home):
    import zstandard

    from oci.test_faults import ZST

    _, diff_id = _zeros_layer()
    blob = zstandard.ZstdCompressor().compress(bytes(ZEROS))  # ~8 kB: one network chunk holds all of it
    reg.add_image("zeros", "zstd", [(blob, ZST)], diff_ids=[diff_id])
    code, kib, err = peak_rss_kib([sys.executable, "-m", "taxiway", "pull", f"{reg.address}/zeros:zstd"])
    assert code == 0, err
    assert kib < 150 * 1024, f"peak RSS {kib // 1024} MiB"
    assert (taxiway_home / "store" / "blobs" / "sha256" / sha(blob)[7:]).stat().st_size == len(blob)


def test_a_huge_manifest_is_refused_without_being_held(reg, taxiway_home):
    """The 4 MiB manifest limit is checked while the body streams, not after reading all of it."""
    reg.manifests[("huge", "v1")] = (b"{" + b" " * (200 << 20) + b"}", "application/vnd.oci.image.manifest.v1+json")
    code, kib, err = peak_rss_kib([sys.executable, "-m", "taxiway", "pull", f"{reg.address}/huge:v1"])
    del reg.manifests[("huge", "v1")]
    assert code != 0 and b"larger than 4 MiB" in err, err
    assert kib < 150 * 1024, f"peak RSS {kib // 1024} MiB"
