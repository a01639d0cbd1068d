"""export() and apply_layer(): OCI changeset semantics, compression, integrity, errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from helpers.images import (
    HIDDEN_PLAIN,
    HIDDEN_SECRETS,
    LayoutImage,
    sha256_file,
    write_fixture_image,
)
from helpers.layout import Entry, make_layer

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.oci.unpack import LayerError, apply_layer, chain_ids, export

TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def apply(root: Path, entries: list[Entry], media_type: str = TAR, **kw):
    raw = make_layer(entries)
    if media_type in (GZIP, DOCKER):
        raw = gzip.compress(raw)
    elif media_type == ZSTD:
        raw = zstandard.ZstdCompressor().compress(raw)
    return apply_layer(root, io.BytesIO(raw), media_type, **kw)


@pytest.fixture(scope="module")
def fixture_rootfs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fixture")
    write_fixture_image(tmp / "layout")
    export(LayoutImage(tmp / "layout", "fixture"), tmp / "rootfs")
    return tmp / "rootfs"


def test_fixture_whiteouts_and_opaque_dirs_hide_lower_files(fixture_rootfs):
    for path in list(HIDDEN_SECRETS) + list(HIDDEN_PLAIN):
        what = HIDDEN_SECRETS.get(path) or HIDDEN_PLAIN[path]
        p = fixture_rootfs / path
        if what[2] == "deleted":
            assert not p.exists() and not p.is_symlink(), path
    assert sorted(os.listdir(fixture_rootfs / "srv/app/cache")) == ["fresh.dat"]
    assert (fixture_rootfs / "root/.ssh/known_hosts").exists()  # the whiteout hid only id_rsa
    assert (fixture_rootfs / "root/.aws").is_dir()


def test_fixture_replacements(fixture_rootfs):
    r = fixture_rootfs
    assert (r / "etc/config.txt").read_text() == "version=2\n"
    assert stat.S_IMODE(os.stat(r / "etc/config.txt").st_mode) == 0o640
    assert (r / "opt/was-file").is_dir() and (r / "opt/was-file/now-inside").is_file()
    assert stat.S_IMODE(os.stat(r / "opt/was-file").st_mode) == 0o750
    assert (r / "opt/was-dir").is_file()
    assert (r / "etc/mtab").is_file() and not (r / "etc/mtab").is_symlink()
    assert (r / "etc/motd").read_text() == "welcome to the fixture\n"
    assert (r / "root/.npmrc").read_text().startswith("registry=")


def test_fixture_links_devices_modes_owners_xattrs(fixture_rootfs):
    r = fixture_rootfs
    bb = os.stat(r / "bin/busybox")
    for name in ("bin/bb-hard", "bin/bb-hard2"):  # bb-hard2 links to a file of a lower layer
        assert os.stat(r / name).st_ino == bb.st_ino
    assert bb.st_nlink == 3
    assert os.readlink(r / "bin/sh") == "busybox"
    assert os.readlink(r / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(r / "usr/bin") == "../bin"
    null = os.lstat(r / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(os.lstat(r / "dev/loop9").st_mode)
    assert stat.S_ISFIFO(os.lstat(r / "run/ctl.fifo").st_mode)
    assert stat.S_IMODE(os.stat(r / "bin/su-helper").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(r / "bin/sg-helper").st_mode) == 0o2755
    assert os.stat(r / "bin/sg-helper").st_gid == 50
    assert stat.S_IMODE(os.stat(r / "srv/shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(r / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(r / "root").st_mode) == 0o700
    prof = os.stat(r / "home/app/.profile")
    assert (prof.st_uid, prof.st_gid, stat.S_IMODE(prof.st_mode)) == (1000, 1000, 0o600)
    assert os.getxattr(r / "etc/xattr-file", "user.taxiway") == b"hello"
    assert os.stat(r / "etc/hosts").st_mtime == 1_700_000_000
    # directory mtimes are set after their contents, and kept across whiteouts below them
    assert os.stat(r / "bin").st_mtime == 1_700_000_000
    assert os.stat(r / "root/.aws").st_mtime == 1_700_000_000
    # busybox really runs from the exported root
    out = subprocess.run([str(r / "bin/busybox"), "echo", "hi"], capture_output=True, text=True)
    assert out.stdout == "hi\n"


@pytest.mark.parametrize("media_type", [TAR, GZIP, ZSTD, DOCKER])
def test_compressions_give_the_same_tree_and_diff_id(tmp_path, media_type):
    entries = [Entry("d", "dir"), Entry("d/big", data=os.urandom(3 << 20)), Entry("d/small", data=b"x")]
    raw = make_layer(entries)
    stats = apply(tmp_path, entries, media_type, diff_id="sha256:" + hashlib.sha256(raw).hexdigest())
    assert stats.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert stats.tar_bytes == len(raw)
    assert sha256_file(tmp_path / "d/big") == hashlib.sha256(entries[1].data).hexdigest()
    assert (stats.files, stats.dirs, stats.bytes) == (2, 1, (3 << 20) + 1)


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    a, b = make_layer([Entry("a", data=b"a")]), make_layer([Entry("b", data=b"b")])
    # two gzip members / zstd frames concatenated are one stream
    data = gzip.compress(a[:512 * 3]) + gzip.compress(a[512 * 3:])
    (tmp_path / "g").mkdir()
    apply_layer(tmp_path / "g", io.BytesIO(data), GZIP)
    assert (tmp_path / "g/a").read_bytes() == b"a"
    z = zstandard.ZstdCompressor()
    (tmp_path / "z").mkdir()
    apply_layer(tmp_path / "z", io.BytesIO(z.compress(b[:1024]) + z.compress(b[1024:])), ZSTD)
    assert (tmp_path / "z/b").read_bytes() == b"b"


def test_progress_reports_compressed_bytes(tmp_path):
    blob = gzip.compress(make_layer([Entry("f", data=os.urandom(5 << 20))]))
    seen: list[int] = []
    apply_layer(tmp_path, io.BytesIO(blob), GZIP, progress=seen.append)
    assert sum(seen) == len(blob)


def test_whiteouts_hide_only_lower_layers(tmp_path):
    apply(tmp_path, [Entry("d", "dir"), Entry("d/lower", data=b"l"), Entry("d/sub", "dir"),
                     Entry("d/sub/lower", data=b"l"), Entry("e", data=b"e")])
    apply(tmp_path, [Entry("d/new", data=b"n"), Entry("d/sub/new", data=b"n"), Entry("d/.wh..wh..opq"),
                     Entry("x", data=b"x"), Entry(".wh.x"), Entry(".wh.e")])
    # the opaque marker hid lower children but kept this layer's (also below an implied parent)
    assert sorted(os.listdir(tmp_path / "d")) == ["new", "sub"]
    assert os.listdir(tmp_path / "d/sub") == ["new"]
    assert (tmp_path / "x").exists() and not (tmp_path / "e").exists()


def test_whiteout_of_a_directory_and_of_a_missing_path(tmp_path):
    apply(tmp_path, [Entry("d", "dir"), Entry("d/a", "dir"), Entry("d/a/f", data=b"f")])
    stats = apply(tmp_path, [Entry("d/.wh.a"), Entry("d/.wh.nothing"), Entry("nope/.wh.x")])
    assert os.listdir(tmp_path / "d") == [] and stats.whiteouts == 3 and stats.skipped == 0


def test_type_changes_and_reappearing_entries(tmp_path):
    apply(tmp_path, [Entry("a", data=b"1"), Entry("a", "dir"), Entry("a/in", data=b"x"), Entry("a", data=b"2"),
                     Entry("b", "dir"), Entry("b/c", data=b"c"), Entry("b", "dir", mode=0o700),
                     Entry("l", "symlink", linkname="a"), Entry("l", "symlink", linkname="b")])
    assert (tmp_path / "a").read_bytes() == b"2"
    assert (tmp_path / "b/c").exists() and stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o700
    assert os.readlink(tmp_path / "l") == "b"


def test_overwriting_a_hardlinked_file_breaks_the_link(tmp_path):
    apply(tmp_path, [Entry("a", data=b"shared"), Entry("b", "hardlink", linkname="a")])
    apply(tmp_path, [Entry("b", data=b"new")])
    assert (tmp_path / "a").read_bytes() == b"shared" and (tmp_path / "b").read_bytes() == b"new"


def test_parent_directories_are_made_and_symlinked_parents_followed_inside(tmp_path):
    apply(tmp_path, [Entry("usr", "dir"), Entry("usr/bin", "dir"), Entry("bin", "symlink", linkname="usr/bin"),
                     Entry("bin/tool", data=b"t"), Entry("deep/er/file", data=b"d")])
    assert (tmp_path / "usr/bin/tool").read_bytes() == b"t"  # merged-/usr layouts work
    assert (tmp_path / "deep/er/file").exists()


def test_pax_xattrs_and_unsupported_namespaces(tmp_path):
    stats = apply(tmp_path, [Entry("f", data=b"x", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.bogus.b": "2",
                                                        "SCHILY.xattr.security.selinux": "system_u:object_r:x"})])
    assert os.getxattr(tmp_path / "f", "user.a") == b"1"
    assert "security.selinux" not in os.listxattr(tmp_path / "f")  # host labels are never copied
    assert any("bogus.b" in w for w in stats.warnings)


def test_long_names_and_non_utf8_names(tmp_path):
    long = "/".join(["x" * 200] * 3)
    raw = make_layer([Entry(long, data=b"long")])
    apply_layer(tmp_path, io.BytesIO(raw), TAR)
    assert (tmp_path / long).read_bytes() == b"long"
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        ti = tarfile.TarInfo("caf\xe9")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"c"))
    apply_layer(tmp_path, io.BytesIO(buf.getvalue()), TAR)
    assert os.path.exists(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))


def test_sparse_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(4 << 20)
        f.write(b"tail")
    tarball = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-C", str(src), "-cf", str(tarball), "sparse"], check=True)
    (tmp_path / "out").mkdir()
    with open(tarball, "rb") as f:
        apply_layer(tmp_path / "out", f, TAR)
    assert sha256_file(tmp_path / "out/sparse") == sha256_file(src / "sparse")


@pytest.mark.parametrize("damage", ["truncated gzip", "corrupt gzip", "truncated tar", "garbage header",
                                    "short file data", "not a tar"])
def test_broken_layers_raise_layer_error(tmp_path, damage):
    raw = make_layer([Entry("a", data=os.urandom(100_000)), Entry("b", data=b"b")])
    media = TAR
    if damage == "truncated gzip":
        blob, media = gzip.compress(raw)[:-40], GZIP
    elif damage == "corrupt gzip":
        g = bytearray(gzip.compress(raw))
        g[len(g) // 2] ^= 0xFF
        blob, media = bytes(g), GZIP
    elif damage == "truncated tar":
        blob = raw[:100_000 + 512 + 600]  # ends inside b's header
    elif damage == "garbage header":
        b_header = 512 + 100_352
        blob = raw[:b_header] + b"\x01" * 512 + raw[b_header + 512:]
    elif damage == "short file data":
        blob = raw[:50_000]
    else:
        blob = b"this is not a tarball at all" * 40
    with pytest.raises(LayerError) as e:
        apply_layer(tmp_path, io.BytesIO(blob), media, name="layer 0")
    assert "layer 0" in str(e.value) and "pull it again" in str(e.value)


@pytest.mark.parametrize("end", [101_377, 101_888, 101_888 + 512, 101_400])
def test_layer_without_end_of_archive_marker_is_complete(tmp_path, end):
    """umoci's layers stop after the last member's data (no padding, no two zero blocks:
    opencontainers/umoci#436); skopeo, podman, Go and GNU tar take them, and so do we."""
    raw = make_layer([Entry("a", data=os.urandom(100_000)), Entry("b", data=b"b")])
    assert raw[101_376:101_377] == b"b" and not raw[101_377:].strip(b"\0")  # b's data, then only zeros
    apply_layer(tmp_path, io.BytesIO(raw[:end]), TAR, name="layer 0")
    assert (tmp_path / "b").read_bytes() == b"b" and (tmp_path / "a").stat().st_size == 100_000


def test_umoci_insert_layer_unpacks(tmp_path):
    """A layer umoci itself wrote (init, new, insert): its tar has no end-of-archive blocks."""
    import json

    # umoci is in .ci/apt-packages.txt: missing, this test fails rather than skips
    (tmp_path / "hello").write_bytes(b"hi\n")
    for argv in (["init", "--layout", "img"], ["new", "--image", "img:t"],
                 ["insert", "--image", "img:t", "hello", "/hello"]):
        subprocess.run(["umoci", *argv], cwd=tmp_path, check=True, capture_output=True)
    blobs = tmp_path / "img/blobs/sha256"
    index = json.loads((tmp_path / "img/index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    layer = manifest["layers"][-1]
    raw = gzip.decompress((blobs / layer["digest"].split(":")[1]).read_bytes())
    assert len(raw) % 512 != 0 or not raw.endswith(b"\0" * 1024)  # what umoci writes: no end-of-archive marker
    (tmp_path / "out").mkdir()
    with (blobs / layer["digest"].split(":")[1]).open("rb") as f:
        apply_layer(tmp_path / "out", f, layer["mediaType"])
    assert (tmp_path / "out/hello").read_bytes() == b"hi\n"


@pytest.mark.parametrize("end", [101_376, 101_376 - 300, 100_864 + 511])
def test_layer_cut_in_its_last_member_is_still_truncated(tmp_path, end):
    raw = make_layer([Entry("a", data=os.urandom(100_000)), Entry("b", data=b"b" * 600), Entry("c", "dir")])
    raw = raw[:end] if end != 101_376 else raw[:101_376 + 599]  # b's data one byte short
    with pytest.raises(LayerError, match="truncated"):
        apply_layer(tmp_path, io.BytesIO(raw), TAR, name="layer 0")


def test_diff_id_mismatch(tmp_path):
    with pytest.raises(LayerError, match="uncompressed content is sha256:"):
        apply(tmp_path, [Entry("a", data=b"a")], GZIP, diff_id="sha256:" + "0" * 64)


def test_export_is_all_or_nothing(tmp_path):
    layout = tmp_path / "layout"
    write_fixture_image(layout)
    img = LayoutImage(layout, "fixture")
    # break the last layer's blob: export fails and leaves nothing behind
    last = img.layers()[-1].digest.split(":")[1]
    (layout / "blobs/sha256" / last).write_bytes(gzip.compress(b"\0" * 100)[:-10])
    with pytest.raises(LayerError, match="layer 2"):
        export(img, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["layout"]


def test_export_refuses_a_non_empty_destination(tmp_path):
    layout = tmp_path / "layout"
    write_fixture_image(layout)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(InvalidInput, match="not an empty directory"):
        export(LayoutImage(layout, "fixture"), tmp_path / "full")
    (tmp_path / "empty").mkdir()
    stats = export(LayoutImage(layout, "fixture"), tmp_path / "empty")
    assert (tmp_path / "empty/bin/busybox").exists() and len(stats.layers) == 3
    assert stats.to_json()["files"] == sum(s.files for s in stats.layers)


def test_export_checks_diff_ids_against_the_config(tmp_path):
    layout = tmp_path / "layout"
    write_fixture_image(layout, compress=False)
    img = LayoutImage(layout, "fixture")
    # swap in a different (valid) layer blob under the same descriptor digest
    first = img.layers()[0].digest.split(":")[1]
    (layout / "blobs/sha256" / first).write_bytes(make_layer([Entry("evil", data=b"x")]))
    with pytest.raises(LayerError, match="the image config says"):
        export(img, tmp_path / "out")
    export(img, tmp_path / "unverified", verify=False)
    assert (tmp_path / "unverified/evil").exists()


def test_chain_ids():
    d = ["sha256:" + c * 64 for c in "abc"]
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert chain_ids(d) == [d[0], c1, c2]
    assert chain_ids([]) == []
    with pytest.raises(TaxiwayError):
        chain_ids(["sha256:nothex"])


def test_unprivileged_apply_skips_devices_and_owners():
    """As nobody: device nodes are skipped with a warning; files are ours; modes still apply."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to switch to nobody")
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="taxiway-unpriv-"))  # pytest's tmp is root-only
    os.chmod(tmp_path, 0o755)
    try:
        _unprivileged(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _unprivileged(tmp_path: Path) -> None:
    import json

    root = tmp_path / "root"
    root.mkdir()
    os.chown(root, 65534, 65534)
    raw = make_layer([Entry("dev", "dir"), Entry("dev/null", "chr", devmajor=1, devminor=3),
                      Entry("f", data=b"x", uid=1000, mode=0o4755), Entry("p", "fifo")])
    # Fork and drop to nobody: the child needs no access to the checkout or the venv.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            stats = apply_layer(root, io.BytesIO(raw), TAR)
            os.write(w, json.dumps(stats.to_json()).encode())
            code = 0
        except BaseException as e:  # report, never return into pytest
            os.write(w, repr(e).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    stats = json.loads(out)
    assert stats["devices"] == 0 and any("needs root" in w for w in stats["warnings"])
    assert not (root / "dev/null").exists()
    f = os.stat(root / "f")
    assert f.st_uid == 65534 and stat.S_IMODE(f.st_mode) == 0o4755
    assert stat.S_ISFIFO(os.lstat(root / "p").st_mode)


def test_owner_is_set_even_below_a_setgid_directory(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(reason="owners are applied when root")
    apply(tmp_path, [Entry("sg", "dir", mode=0o2775, gid=50)])
    apply(tmp_path, [Entry("sg/f", data=b"x"), Entry("sg/l", "symlink", linkname="f"), Entry("sg/g", data=b"y", gid=7)])
    assert os.stat(tmp_path / "sg/f").st_gid == 0  # not inherited from the setgid parent
    assert os.lstat(tmp_path / "sg/l").st_gid == 0
    assert os.stat(tmp_path / "sg/g").st_gid == 7


def test_modes_are_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        apply(tmp_path, [Entry("f", data=b"x", mode=0o755), Entry("d", "dir", mode=0o775), Entry("ro", mode=0o444)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(tmp_path / "ro").st_mode) == 0o444


def test_a_huge_tar_header_is_refused_not_buffered(tmp_path, monkeypatch):
    from taxiway.oci import layerio

    monkeypatch.setattr(layerio, "MAX_READ", 8192)  # stands in for 64 MiB
    raw = make_layer([Entry("f", data=b"x", pax={"SCHILY.xattr.user.big": "v" * 20_000})])
    with pytest.raises(LayerError, match="tar header of"):
        apply_layer(tmp_path, io.BytesIO(raw), TAR)


def test_file_capabilities_survive_the_chown(tmp_path):
    """security.capability is binary and is cleared by chown: it must be set after it."""
    if os.geteuid() != 0:
        pytest.skip(reason="setting security.capability needs root")
    import struct

    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # VFS_CAP_REVISION_2, cap_net_raw
    pax = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
    stats = apply(tmp_path, [Entry("ping", data=b"\x7fELF", mode=0o755, uid=1000, gid=1000, pax=pax)])
    assert stats.warnings == []
    assert os.getxattr(tmp_path / "ping", "security.capability") == cap
    assert os.stat(tmp_path / "ping").st_uid == 1000


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    """Export into a 1 MiB tmpfs (mounted in a private mount namespace): ENOSPC, nothing left behind."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip(reason="needs root and unshare to mount a tiny tmpfs")
    layout = tmp_path / "layout"
    write_fixture_image(layout)  # busybox alone is 2 MB
    small = tmp_path / "small"
    small.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from pathlib import Path;"
            "from helpers.images import LayoutImage; from taxiway.oci.unpack import export;"
            "from taxiway.errors import TaxiwayError\n"
            "try:\n    export(LayoutImage(Path(sys.argv[1]), 'fixture'), Path(sys.argv[2]) / 'rootfs')\n"
            "except TaxiwayError as e:\n    print('error:', e)\n")
    script = ('mount -t tmpfs -o size=1m tmpfs "$1" && "$2" -c "$3" "$4" "$1" "$5"; echo "left: $(ls -A "$1")"')
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(small),
                          sys.executable, code, str(layout), str(Path(__file__).parent.parent)],
                         capture_output=True, text=True, timeout=120)
    assert "error: no space left on the device" in out.stdout, out.stdout + out.stderr
    assert "free some disk space" in out.stdout
    assert out.stdout.strip().endswith("left:")  # the half-built root was removed


def test_very_deep_trees_are_applied_and_removed(tmp_path):
    """Deeper than Python's recursion limit: whiteouts still remove it (shutil.rmtree could not)."""
    depth = 1200
    names = ["/".join(["a"] * i) for i in range(1, depth + 1)]
    apply(tmp_path, [Entry(n, "dir") for n in names] + [Entry(names[-1] + "/f", data=b"deep")], workers=0)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):
            fd2 = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = fd2
        assert os.listdir(fd) == ["f"]
    finally:
        os.close(fd)
    stats = apply(tmp_path, [Entry(".wh.a")])
    assert os.listdir(tmp_path) == [] and stats.skipped == 0


def test_a_whiteout_after_this_layers_own_entries_hides_only_lower_ones(tmp_path):
    apply(tmp_path, [Entry("d", "dir"), Entry("d/lower", data=b"l"), Entry("x", "dir"), Entry("x/lower", data=b"l")])
    apply(tmp_path, [Entry("d/new", data=b"n"), Entry(".wh.d"),  # whiteout after a new entry in d
                     Entry("s", "symlink", linkname="x"), Entry(".wh.s")])  # this layer's own symlink stays
    assert os.listdir(tmp_path / "d") == ["new"]
    assert os.listdir(tmp_path / "x") == ["lower"] and os.readlink(tmp_path / "s") == "x"
