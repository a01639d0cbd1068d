"""DiffHasher (the streaming layer check of pull and load): any chunking, multi-member gzip, zstd, padding, truncation."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from taxiway.oci.layerio import DiffHasher, LayerError, magic


def _feed(h: DiffHasher, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        h.update(data[a:b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=8),
       st.sampled_from(["gzip", "zstd", "none"]), st.integers(0, 600))
def test_digest_of_the_content_whatever_the_chunking(members, cuts, compression, padding):
    content = b"".join(members)
    assume(compression != "none" or magic(content) is None)  # magic bytes win over the declared compression
    if compression == "gzip":
        blob = b"".join(gzip.compress(m, mtime=0) for m in members) + b"\0" * padding  # multi-member, zero padded
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(content)
    else:
        blob = content
    h = DiffHasher(compression)
    _feed(h, blob, cuts)
    assert h.finish() == "sha256:" + hashlib.sha256(content).hexdigest()


@given(st.binary(min_size=100, max_size=5000), st.sampled_from(["gzip", "zstd"]), st.floats(0.05, 0.95))
def test_truncated_streams_are_refused(content, compression, keep):
    blob = gzip.compress(content, mtime=0) if compression == "gzip" else zstandard.ZstdCompressor().compress(content)
    h = DiffHasher(compression)
    with pytest.raises(LayerError):
        h.update(blob[: max(1, int(len(blob) * keep))])
        h.finish()
