"""The issue's fixture images, written offline as OCI layouts.

* :func:`write_fixture_image` -- a busybox-static image of several layers that
  exercises whiteouts, an opaque directory, hardlinks (also to a file of a
  lower layer), symlinks, device nodes, a fifo, setuid/setgid/sticky modes,
  owners, a file replaced by a later layer, a file replaced by a directory and
  vice versa, xattrs, an entry that re-appears in the same layer, and planted
  secrets (a private key, a ``.env``, AWS credentials, an ``.npmrc`` token) that
  later layers delete or overwrite.
* :func:`write_multiplatform` -- an index over linux/amd64 and linux/arm64/v8.
* :class:`LayoutImage` -- a tiny :class:`taxiway.oci.image.Image` over a layout
  directory, so tests need not depend on the store.

Every layout can be pushed with ``helpers.layout.skopeo_push`` and read by
``umoci`` and ``skopeo`` (``oci:DIR:TAG``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from helpers.layout import Entry, busybox_entries, make_layer, write_index, write_layout

FIXTURE_TAG = "fixture"
MULTI_TAG = "multi"

# Fake secrets, but shaped like the real thing so the scanner's patterns fire.
PRIVATE_KEY = (
    b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
    b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    b"QyNTUxOQAAACBmYWtlZmFrZWZha2VmYWtlZmFrZWZha2VmYWtlZmFrZWZha2UAAAAJZmFr\n"
    b"-----END OPENSSH PRIVATE KEY-----\n"
)
DOTENV = b"DATABASE_URL=postgres://app:hunter2@db.internal/app\nSECRET_KEY=s3cr3t-not-for-images\n"
AWS_CREDENTIALS = (
    b"[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
    b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
)
NPMRC = b"//registry.npmjs.org/:_authToken=npm_abcdefghijklmnopqrstuvwxyz0123456789\n"
GITHUB_TOKEN = b"token: ghp_" + b"A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8" + b"\n"

#: Paths (relative to the root) of secrets a lower layer adds and a later layer
#: hides, with (added-in, hidden-in, how) -- what ``scan`` must report.
HIDDEN_SECRETS: dict[str, tuple[int, int, str]] = {
    "root/.ssh/id_rsa": (0, 1, "deleted"),
    "srv/app/.env": (0, 1, "deleted"),
    "root/.aws/credentials": (1, 2, "deleted"),
    "srv/app/cache/token.txt": (0, 1, "deleted"),  # removed by the opaque dir
    "root/.npmrc": (0, 2, "overwritten"),
}
#: Files a later layer hides that are not secrets.
HIDDEN_PLAIN: dict[str, tuple[int, int, str]] = {
    "etc/config.txt": (0, 1, "overwritten"),
    "srv/app/cache/a.dat": (0, 1, "deleted"),
    "opt/was-file": (0, 1, "overwritten"),  # a directory replaces it
    "opt/was-dir/inside": (0, 1, "deleted"),  # a file replaces its directory
    "var/log/old.log": (0, 2, "deleted"),
}


def fixture_layers() -> list[bytes]:
    """The raw (uncompressed) tars of the fixture image, oldest first."""
    base = busybox_entries()
    base += [
        Entry("dev", "dir"),
        Entry("dev/null", "chr", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/zero", "chr", mode=0o666, devmajor=1, devminor=5),
        Entry("dev/loop9", "blk", mode=0o660, devmajor=7, devminor=9, gid=6),
        Entry("run", "dir"),
        Entry("run/ctl.fifo", "fifo", mode=0o600),
        # setuid / setgid files and a setgid directory
        Entry("bin/su-helper", "file", b"#!/bin/sh\nexec id\n", mode=0o4755),
        Entry("bin/sg-helper", "file", b"#!/bin/sh\nexec id -g\n", mode=0o2755, gid=50),
        Entry("srv", "dir"),
        Entry("srv/shared", "dir", mode=0o2775, gid=1000),
        # hardlinks: a group of three in this layer
        Entry("bin/bb-hard", "hardlink", linkname="bin/busybox"),
        Entry("etc/hosts", "file", b"127.0.0.1 localhost\n::1 localhost\n"),
        Entry("etc/hosts.hard", "hardlink", linkname="etc/hosts"),
        # symlinks: relative, absolute, dangling, to a directory
        Entry("etc/localtime", "symlink", linkname="/usr/share/zoneinfo/UTC"),
        Entry("etc/mtab", "symlink", linkname="../proc/self/mounts"),
        Entry("usr", "dir"),
        Entry("usr/bin", "symlink", linkname="../bin"),
        # xattrs (user.* works on tmpfs, ext4, overlay as root and rootless)
        Entry("etc/xattr-file", "file", b"has xattrs\n", pax={"SCHILY.xattr.user.taxiway": "hello",
                                                               "SCHILY.xattr.user.empty": ""}),
        # owners
        Entry("home/app/.profile", "file", b"export PS1='$ '\n", uid=1000, gid=1000, mode=0o600),
        # files later layers overwrite or delete
        Entry("etc/config.txt", "file", b"version=1\n"),
        Entry("opt", "dir"),
        Entry("opt/was-file", "file", b"I will become a directory\n"),
        Entry("opt/was-dir", "dir"),
        Entry("opt/was-dir/inside", "file", b"my directory will become a file\n"),
        Entry("var", "dir"), Entry("var/log", "dir"),
        Entry("var/log/old.log", "file", b"old log line\n" * 20),
        # planted secrets
        Entry("root/.ssh", "dir", mode=0o700),
        Entry("root/.ssh/id_rsa", "file", PRIVATE_KEY, mode=0o600),
        Entry("root/.ssh/known_hosts", "file", b"localhost ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE\n"),
        Entry("root/.npmrc", "file", NPMRC, mode=0o600),
        Entry("srv/app", "dir"),
        Entry("srv/app/.env", "file", DOTENV, mode=0o600),
        Entry("srv/app/main.sh", "file", b"#!/bin/sh\necho app\n", mode=0o755),
        Entry("srv/app/cache", "dir"),
        Entry("srv/app/cache/a.dat", "file", b"cached" * 100),
        Entry("srv/app/cache/token.txt", "file", GITHUB_TOKEN),
        # an entry that re-appears later in the same layer: the last one wins
        Entry("etc/motd", "file", b"first motd\n"),
        Entry("etc/motd", "file", b"second motd wins\n", mode=0o640),
    ]
    layer1 = [
        # whiteouts of the planted secrets
        Entry("root/.ssh/.wh.id_rsa", "file"),
        Entry("srv/app/.wh..env", "file"),
        # an opaque directory: a.dat and token.txt vanish, fresh.dat stays
        Entry("srv/app/cache", "dir"),
        Entry("srv/app/cache/.wh..wh..opq", "file"),
        Entry("srv/app/cache/fresh.dat", "file", b"fresh\n"),
        # a file replaced by a later layer
        Entry("etc/config.txt", "file", b"version=2\n", mode=0o640),
        # a hardlink to a file that only a lower layer has
        Entry("bin/bb-hard2", "hardlink", linkname="bin/busybox"),
        # a file replaced by a directory, and a directory by a file
        Entry("opt/was-file", "dir", mode=0o750),
        Entry("opt/was-file/now-inside", "file", b"inside the new directory\n"),
        Entry("opt/was-dir", "file", b"I used to be a directory\n"),
        # a new secret that the next layer deletes
        Entry("root/.aws", "dir", mode=0o700),
        Entry("root/.aws/credentials", "file", AWS_CREDENTIALS, mode=0o600),
        # a symlink replaced by a regular file
        Entry("etc/mtab", "file", b"none / tmpfs rw 0 0\n"),
    ]
    layer2 = [
        Entry("root/.aws/.wh.credentials", "file"),
        Entry("root/.npmrc", "file", b"registry=https://registry.npmjs.org/\n", mode=0o644),
        Entry("var/log/.wh.old.log", "file"),
        Entry("etc/motd", "file", b"welcome to the fixture\n"),
        Entry("home/app/notes.txt", "file", b"plain notes\n", uid=1000, gid=1000),
    ]
    return [make_layer(base), make_layer(layer1), make_layer(layer2)]


def write_fixture_image(root: Path, tag: str = FIXTURE_TAG, *, compress: bool = True) -> dict:
    """Write the several-layer busybox fixture image into the OCI layout ``root``.

    Returns the manifest descriptor added to ``index.json`` under ``tag``.
    """
    return write_layout(root, fixture_layers(), tag, compress=compress)


def write_multiplatform(root: Path, tag: str = MULTI_TAG) -> dict:
    """Write an index over linux/amd64 (busybox) and linux/arm64/v8 under ``tag``."""
    manifests: list[dict] = []
    amd64 = make_layer(busybox_entries() + [Entry("etc/arch", "file", b"amd64\n")])
    write_layout(root, [amd64], tag, architecture="amd64", index_entries=manifests)
    arm64 = make_layer([Entry("etc", "dir"), Entry("etc/arch", "file", b"arm64\n")])
    write_layout(root, [arm64], tag, architecture="arm64", variant="v8", index_entries=manifests)
    return write_index(root, manifests, tag)


@dataclass
class _Desc:
    media_type: str
    digest: str
    size: int


class LayoutImage:
    """A read-only :class:`taxiway.oci.image.Image` over ``oci:ROOT:TAG``.

    For an index, ``architecture``/``variant`` pick the platform (default amd64).
    """

    def __init__(self, root: Path, tag: str, architecture: str = "amd64", variant: str | None = None):
        self.root = Path(root)
        idx = json.loads((self.root / "index.json").read_text())
        desc = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
        data = self._blob_bytes(desc["digest"])
        doc = json.loads(data)
        if doc.get("mediaType", "").endswith("index.v1+json") or "manifests" in doc:
            desc = next(m for m in doc["manifests"] if m["platform"]["architecture"] == architecture
                        and (variant is None or m["platform"].get("variant") == variant))
            data = self._blob_bytes(desc["digest"])
        self._manifest_bytes = data
        self._manifest = json.loads(data)
        self._digest = desc["digest"]

    def _blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.root / "blobs" / algo / hexd

    def _blob_bytes(self, digest: str) -> bytes:
        return self._blob_path(digest).read_bytes()

    def manifest_bytes(self) -> bytes:
        return self._manifest_bytes

    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def media_type(self) -> str:
        return self._manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")

    def digest(self) -> str:
        return self._digest

    def config_bytes(self) -> bytes:
        return self._blob_bytes(self._manifest["config"]["digest"])

    def config(self) -> dict[str, Any]:
        return json.loads(self.config_bytes())

    def layers(self) -> list:
        try:
            from taxiway.oci.image import Descriptor

            return [Descriptor.from_json(d) for d in self._manifest["layers"]]
        except ImportError:  # pragma: no cover - the package is always installed in tests
            return [_Desc(d["mediaType"], d["digest"], d["size"]) for d in self._manifest["layers"]]

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self._blob_path(digest), "rb")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_manifest(root: Path, *, mtimes: bool = True, dir_mtimes: bool = True,
                  prune: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Everything about a tree worth comparing: type, mode, owner, content hash,
    link target, device numbers, xattrs, mtime, and hardlink group (keyed by the
    group's first path), keyed by path relative to ``root`` (the root excluded).
    Directories named in ``prune`` (relative paths) are listed but not entered.
    """
    import os
    import stat as st_

    out: dict[str, dict] = {}
    inodes: dict[tuple[int, int], str] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [n for n in dirnames if str((Path(dirpath) / n).relative_to(root)) not in prune]
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = os.lstat(p)
            kind = {st_.S_IFREG: "file", st_.S_IFDIR: "dir", st_.S_IFLNK: "symlink", st_.S_IFCHR: "chr",
                    st_.S_IFBLK: "blk", st_.S_IFIFO: "fifo", st_.S_IFSOCK: "sock"}[st_.S_IFMT(s.st_mode)]
            d: dict = {"type": kind, "uid": s.st_uid, "gid": s.st_gid}
            if kind != "symlink":
                d["mode"] = oct(st_.S_IMODE(s.st_mode))
                d["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False).hex()
                               for k in sorted(os.listxattr(p, follow_symlinks=False))}
            if kind == "file":
                d["sha256"] = sha256_file(p)
                d["size"] = s.st_size
                key = (s.st_dev, s.st_ino)
                d["link_group"] = inodes.setdefault(key, rel) if s.st_nlink > 1 else None
            elif kind == "symlink":
                d["target"] = os.readlink(p)
            elif kind in ("chr", "blk"):
                d["rdev"] = (os.major(s.st_rdev), os.minor(s.st_rdev))
            if mtimes and (kind != "dir" or dir_mtimes):
                d["mtime_ns"] = s.st_mtime_ns
            out[rel] = d
    return out
