"""Property tests: whatever a sequence of layers says, nothing leaves the root."""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from helpers.layout import Entry, make_layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oci.test_unpack_escape import RESOLVERS, make_world, outside
from taxiway.oci._safepath import clean
from taxiway.oci.unpack import apply_layer

TAR = "application/vnd.oci.image.layer.v1.tar"
SENTINEL = "@S"  # replaced by the sentinel's absolute path

# A small alphabet, so that a link made by one entry is often used by the next.
components = st.sampled_from(["lnk", "a", "..", "victim", "dir", ".wh.victim", ".wh.lnk", ".wh..wh..opq", ".",
                              "sentinel", SENTINEL])
names = st.lists(components, min_size=1, max_size=3).map("/".join)
targets = st.sampled_from([SENTINEL, SENTINEL + "/victim", SENTINEL + "/dir", "..", "../sentinel",
                           "../sentinel/victim", "/", "a", "lnk", "lnk/..", "../../..", "lnk/victim",
                           "lnk/dir", ""])
entries = st.builds(
    lambda name, kind, target, data, mode: (name, kind, target, data, mode),
    names,
    st.sampled_from(["file", "file", "dir", "symlink", "symlink", "hardlink", "fifo", "chr"]),
    targets,
    st.binary(max_size=16),
    st.sampled_from([0o644, 0o777, 0o4755, 0o000, 0o1777]),
)
layers = st.lists(st.lists(entries, min_size=1, max_size=8), min_size=1, max_size=3)


def _entry(e: tuple, sentinel: str) -> Entry:
    name, kind, target, data, mode = e
    name, target = name.replace(SENTINEL, sentinel), target.replace(SENTINEL, sentinel)
    if kind in ("symlink", "hardlink"):
        return Entry(name, kind, linkname=target, mode=mode)
    if kind == "chr":
        return Entry(name, kind, devmajor=1, devminor=3, mode=mode)
    return Entry(name, kind, data=data if kind == "file" else b"", mode=mode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=layers, resolver=st.sampled_from(RESOLVERS), workers=st.sampled_from([0, 2]))
def test_random_layers_never_touch_anything_outside_the_root(layers, resolver, workers):
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        root, sentinel = make_world(tmp)
        before = outside(tmp)
        for layer in layers:
            raw = make_layer([_entry(e, str(sentinel)) for e in layer])
            apply_layer(root, io.BytesIO(raw), TAR, resolver=resolver, workers=workers)
        assert outside(tmp) == before
        assert root.is_dir() and not root.is_symlink()
        assert (sentinel / "victim").read_bytes() == b"original\n"
        os.chmod(root, 0o755)  # so the temporary directory can be removed


@given(st.lists(st.sampled_from(["a", "..", ".", "", "b"]), max_size=8))
def test_clean_never_climbs_above_the_root(parts):
    out = clean("/".join(parts))
    assert ".." not in out and "." not in out and "" not in out
    assert len(out) <= len([p for p in parts if p not in ("..", ".", "")])


@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=5))
def test_clean_keeps_plain_paths(parts):
    assert clean("/".join(parts)) == tuple(parts)
    assert clean("/" + "/".join(parts)) == tuple(parts)
    assert clean("../" + "/".join(parts)) == tuple(parts)


# Benign paths where order matters: files written by worker threads must land
# exactly as the one-thread path writes them.
_names = st.sampled_from(["d", "d/e", "d/f", "d/e/f", "g", "d/g", "x"])
_ops = st.tuples(st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "whiteout", "opaque"]),
                 _names, _names, st.binary(max_size=8))


def _benign(op: tuple) -> Entry:
    kind, name, other, data = op
    if kind == "symlink":
        return Entry(name, "symlink", linkname=other)
    if kind == "hardlink":
        return Entry(name, "hardlink", linkname=other)
    if kind == "whiteout":
        head, _, tail = name.rpartition("/")
        return Entry(f"{head}/.wh.{tail}" if head else f".wh.{tail}")
    if kind == "opaque":
        return Entry(f"{name}/.wh..wh..opq")
    return Entry(name, kind, data=data if kind == "file" else b"")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_ops, min_size=1, max_size=12), min_size=1, max_size=3))
def test_worker_threads_change_nothing(layers):
    from helpers.images import tree_manifest

    started = time.time_ns() - 1_000_000_000
    with tempfile.TemporaryDirectory() as t:
        roots = []
        for workers in (0, 2):
            root = Path(t) / f"w{workers}"
            root.mkdir()
            for layer in layers:
                raw = make_layer([_benign(op) for op in layer])
                apply_layer(root, io.BytesIO(raw), TAR, workers=workers)
            snap = tree_manifest(root)
            # directories made implicitly get the current time; the rest, their entries' time
            for d in snap.values():
                if d["type"] == "dir" and d["mtime_ns"] >= started:
                    d.pop("mtime_ns")
            roots.append(snap)
        assert roots[0] == roots[1]
