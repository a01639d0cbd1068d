"""Layers that try to write, link, chmod or delete outside the root: none may.

Each case is a trick from a real escape: umoci CVE-2021-29136 (a "." symlink),
containerd CVE-2021-32760 (chmod through a hardlinked symlink), OpenShift oc
CVE-2020-27833 and GNU tar CVE-2025-45582 (a symlink out, then a write through
it in a later layer), Python tarfile CVE-2024-12718 (metadata changed through
links) and CVE-2025-4517 (a symlink chain longer than PATH_MAX that realpath
gives up on), cpython#149486 (empty names). A sentinel directory beside the
root, with a victim file, a victim directory and a victim symlink, must come
out byte-for-byte, mode-for-mode and mtime-for-mtime unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.images import tree_manifest
from helpers.layout import Entry, make_layer

from taxiway.oci._safepath import openat2_available
from taxiway.oci.unpack import apply_layer

TAR = "application/vnd.oci.image.layer.v1.tar"
RESOLVERS = ["walk"] + (["openat2"] if openat2_available() else [])


def make_world(tmp: Path) -> tuple[Path, Path]:
    """An empty root and, beside it, a sentinel directory with things to attack."""
    root, sentinel = tmp / "root", tmp / "sentinel"
    root.mkdir()
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "victim").write_bytes(b"original\n")
    (sentinel / "dir" / "inner").write_bytes(b"inner\n")
    (sentinel / "victim-link").symlink_to("victim")
    os.chmod(sentinel / "victim", 0o640)
    for p in (sentinel / "victim", sentinel / "dir" / "inner", sentinel / "dir", sentinel):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root, sentinel


def outside(tmp: Path) -> dict:
    """Everything under ``tmp`` except the root's contents (and the root's own times)."""
    snap = tree_manifest(tmp, prune=frozenset({"root"}))
    snap = {k: v for k, v in snap.items() if k != "root" and not k.startswith("root/")}
    st = os.lstat(tmp / "root")
    snap["root (type)"] = {"dir": os.path.isdir(tmp / "root") and not os.path.islink(tmp / "root"),
                           "ino": st.st_ino}
    return snap


def apply_all(root: Path, layers: list[list[Entry]], resolver: str) -> list:
    stats = []
    for entries in layers:
        raw = make_layer(entries)
        import io

        stats.append(apply_layer(root, io.BytesIO(raw), TAR, resolver=resolver))
    return stats


def cases(s: str) -> dict[str, list[list[Entry]]]:
    """The attacks, with ``s`` the sentinel's absolute path."""
    s_rel = "../sentinel"
    deep = [f"{'d' * 200}{i:02d}" for i in range(24)]  # > PATH_MAX (4096) in total
    long_chain = []
    path = ""
    for comp in deep:
        path = f"{path}/{comp}" if path else comp
        long_chain.append(Entry(path, "dir", mode=0o777))
    long_chain.append(Entry(f"{path}/up", "symlink", linkname="/".join([".."] * (len(deep) + 3)) + "/sentinel"))
    return {
        "dotdot name": [[Entry("../sentinel/victim", data=b"pwned"), Entry("../../../../../../../../" + s[1:] + "/new", data=b"x")]],
        "absolute name": [[Entry(s + "/victim", data=b"pwned"), Entry("/" + s + "/dir/inner", data=b"pwned")]],
        "dotdot dir then file": [[Entry("..", "dir", mode=0o777), Entry("../sentinel", "dir", mode=0o777),
                                  Entry("../sentinel/x", data=b"pwned")]],
        "symlink out, write through (same layer)": [[
            Entry("lnk", "symlink", linkname=s), Entry("lnk/victim", data=b"pwned"),
            Entry("rel", "symlink", linkname=s_rel), Entry("rel/victim", data=b"pwned"), Entry("rel/new", data=b"x")]],
        "symlink out, write through (next layer, oc CVE-2020-27833)": [
            [Entry("etc", "symlink", linkname=s)], [Entry("etc/victim", data=b"pwned"), Entry("etc/dir/inner", data=b"x")]],
        "symlink leaf then file over it": [[Entry("evil", "symlink", linkname=s + "/victim"), Entry("evil", data=b"pwned")]],
        "symlink leaf then dir, fifo, device over it": [[
            Entry("e1", "symlink", linkname=s + "/dir"), Entry("e1", "dir", mode=0o777, mtime=0),
            Entry("e2", "symlink", linkname=s + "/victim"), Entry("e2", "fifo", mode=0o777),
            Entry("e3", "symlink", linkname=s + "/victim"), Entry("e3", "chr", mode=0o777, devmajor=1, devminor=3)]],
        "hardlink to absolute outside path": [[Entry("h", "hardlink", linkname=s + "/victim"), Entry("h", data=b"pwned")]],
        "hardlink via dotdot": [[Entry("h", "hardlink", linkname="../sentinel/victim"),
                                 Entry("h2", "hardlink", linkname="../../../../" + s + "/victim")]],
        "hardlink via symlinked parent": [[Entry("d", "symlink", linkname=s), Entry("h", "hardlink", linkname="d/victim"),
                                           Entry("h", data=b"pwned")]],
        "hardlink to a symlink pointing out (containerd CVE-2021-32760)": [
            [Entry("s", "symlink", linkname=s + "/victim"), Entry("h", "hardlink", linkname="s", mode=0o4777)],
            [Entry("h", "hardlink", linkname="s", mode=0o777), Entry("s", "dir", mode=0o777)],
            [Entry("h", data=b"pwned", mode=0o777)]],
        "symlink replaced by a directory mid-layer": [[
            Entry("d", "symlink", linkname=s), Entry("d", "dir"), Entry("d/victim", data=b"pwned")]],
        "directory replaced by a symlink mid-layer": [[
            Entry("d", "dir", mode=0o777, mtime=0), Entry("d/x", data=b"x"),
            Entry("d", "symlink", linkname=s), Entry("d/victim", data=b"pwned"), Entry("d/new", data=b"x")]],
        "chained relative symlinks": [[
            Entry("l1", "symlink", linkname=".."), Entry("l2", "symlink", linkname="l1/.."),
            Entry("l3", "symlink", linkname="l2/../l1/../sentinel"), Entry("l3/victim", data=b"pwned"),
            Entry("x", "dir"), Entry("x/y", "symlink", linkname="../../../.."), Entry("x/y/sentinel/victim", data=b"pwned"),
            Entry("x/z", "symlink", linkname="y/" + s[1:]), Entry("x/z/dir/inner", data=b"pwned")]],
        "symlink loop": [[Entry("a", "symlink", linkname="b"), Entry("b", "symlink", linkname="a"),
                          Entry("a/victim", data=b"pwned")]],
        "entry named . is a symlink out (umoci CVE-2021-29136)": [
            [Entry(".", "symlink", linkname=s), Entry("victim", data=b"pwned"), Entry("./dir/inner", data=b"pwned")],
            [Entry("/.", "symlink", linkname=s), Entry(".wh.victim"), Entry("dir/.wh..wh..opq")]],
        "entry named . or / is a file or hardlink": [[
            Entry(".", data=b"pwned"), Entry("/", "hardlink", linkname=s + "/victim"), Entry("/.", "fifo")]],
        "empty names (cpython#149486)": [[Entry("", "symlink", linkname=s), Entry("", "symlink", linkname=".."),
                                          Entry("victim", data=b"pwned")]],
        "symlink to / then a file under it": [[
            Entry("rootlink", "symlink", linkname="/"), Entry("rootlink" + s + "/victim", data=b"pwned"),
            Entry("up", "symlink", linkname="../../../../../.."), Entry("up" + s + "/victim", data=b"pwned")]],
        "whiteouts aimed outside": [
            [Entry("link", "symlink", linkname=s), Entry("rlink", "symlink", linkname=s_rel)],
            [Entry("../.wh.sentinel"), Entry("../sentinel/.wh.victim"), Entry(s + "/.wh.victim"),
             Entry("link/.wh.victim"), Entry("rlink/.wh.victim"), Entry("link/dir/.wh.inner"),
             Entry("link/.wh..wh..opq"), Entry("rlink/dir/.wh..wh..opq"), Entry(".wh.."), Entry(".wh..."),
             Entry("link/.wh.victim-link")]],
        "whiteout of a symlink pointing out removes only the symlink": [
            [Entry("v", "symlink", linkname=s + "/victim"), Entry("d", "symlink", linkname=s + "/dir")],
            [Entry(".wh.v"), Entry(".wh.d")]],
        "metadata through links (CVE-2024-12718)": [[
            Entry("m", "symlink", linkname=s + "/victim"), Entry("m", "dir", mode=0o777, mtime=0),
            Entry("q", "dir", mode=0o777, mtime=0), Entry("q", "symlink", linkname=s + "/dir"),
            Entry("p", "dir", mode=0o777, mtime=0), Entry("p/f", data=b"x"),
            Entry("p", "symlink", linkname=s), Entry("p2", "symlink", linkname=s)],
            [Entry("p2/.wh.victim"), Entry("p2/x", data=b"x")]],
        "long symlink chain beyond PATH_MAX (CVE-2025-4517)": [
            long_chain, [Entry(long_chain[-1].name + "/victim", data=b"pwned"),
                         Entry(long_chain[-1].name + "/dir/inner", "hardlink", linkname=long_chain[-1].name + "/victim")]],
        "device node through a symlinked dir": [[
            Entry("dev", "symlink", linkname=s + "/dir"), Entry("dev/inner", "chr", devmajor=1, devminor=3, mode=0o666),
            Entry("dev/fifo", "fifo")]],
        "xattrs through a symlink": [[
            Entry("x", "symlink", linkname=s + "/victim", pax={"SCHILY.xattr.user.evil": "1"}),
            Entry("x", "hardlink", linkname="x", pax={"SCHILY.xattr.user.evil": "1"})]],
    }


CASE_NAMES = list(cases("/s"))


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_nothing_leaves_the_root(tmp_path, case, resolver):
    root, sentinel = make_world(tmp_path)
    before = outside(tmp_path)
    apply_all(root, cases(str(sentinel))[case], resolver)
    assert outside(tmp_path) == before
    assert (sentinel / "victim").read_bytes() == b"original\n"
    assert root.is_dir() and not root.is_symlink()


def test_dot_symlink_is_refused_with_a_warning(tmp_path):
    root, sentinel = make_world(tmp_path)
    (stats,) = apply_all(root, [[Entry(".", "symlink", linkname=str(sentinel)), Entry("victim", data=b"ok")]], "walk")
    assert any("refusing to replace the root" in w for w in stats.warnings)
    # the file lands inside the root, as if "." were never replaced
    assert (root / "victim").read_bytes() == b"ok"


def test_writes_through_symlinks_land_inside_the_root(tmp_path):
    """A symlink to an absolute path is followed as a chroot would: inside the root."""
    root, sentinel = make_world(tmp_path)
    apply_all(root, [[Entry("etc", "symlink", linkname=str(sentinel))], [Entry("etc/victim", data=b"inside")]], "walk")
    assert (root / str(sentinel)[1:] / "victim").read_bytes() == b"inside"
    assert os.readlink(root / "etc") == str(sentinel)


def test_hardlink_to_outside_is_skipped_with_a_warning(tmp_path):
    root, sentinel = make_world(tmp_path)
    (stats,) = apply_all(root, [[Entry("h", "hardlink", linkname=str(sentinel / "victim"))]], "walk")
    assert not (root / "h").exists()
    assert stats.skipped == 1 and "not in the root" in stats.warnings[0]


def test_symlink_loop_is_skipped_with_a_warning(tmp_path):
    root, _ = make_world(tmp_path)
    (stats,) = apply_all(root, [[Entry("a", "symlink", linkname="b"), Entry("b", "symlink", linkname="a"),
                                 Entry("a/x", data=b"x")]], "walk")
    assert stats.skipped == 1
