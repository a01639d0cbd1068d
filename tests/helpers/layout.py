"""Build small real OCI images offline, for tests.

``make_layer`` turns a list of entries into a tar layer; ``write_layout``
writes layers + config + manifest into an OCI image layout directory, which
skopeo/umoci read (``oci:DIR:TAG``) and ``skopeo copy`` pushes to a registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Entry:
    """One tar entry. ``type`` is one of file, dir, symlink, hardlink, chr, blk, fifo."""

    name: str
    type: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    mtime: int = 1_700_000_000
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
}


def make_layer(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tar with exactly these entries, in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.type]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.type == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            ti.pax_headers = dict(e.pax)
            if e.type == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _put(blobs: Path, data: bytes) -> str:
    d = hashlib.sha256(data).hexdigest()
    (blobs / d).write_bytes(data)
    return "sha256:" + d


def write_layout(root: Path, layers: list[bytes], tag: str = "latest", *, config: dict | None = None,
                 compress: bool = True, architecture: str = "amd64", os_: str = "linux",
                 variant: str | None = None, index_entries: list[dict] | None = None) -> dict:
    """Write (or add to) an OCI layout with one image made of ``layers`` (raw tars).

    Returns the manifest descriptor that was added to index.json under ``tag``.
    """
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer_descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip_bytes(raw) if compress else raw
        layer_descs.append({"mediaType": LAYER_GZIP if compress else LAYER_TAR, "digest": _put(blobs, blob), "size": len(blob)})
    cfg = {
        "architecture": architecture, "os": os_,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"} for i in range(len(layers))],
    }
    if variant:
        cfg["variant"] = variant
    if config:
        cfg["config"].update(config)
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _put(blobs, cfg_bytes), "size": len(cfg_bytes)},
        "layers": layer_descs,
    }
    mbytes = json.dumps(manifest).encode()
    desc = {"mediaType": OCI_MANIFEST, "digest": _put(blobs, mbytes), "size": len(mbytes),
            "annotations": {"org.opencontainers.image.ref.name": tag}}
    if index_entries is not None:
        desc = dict(desc, platform={"architecture": architecture, "os": os_, **({"variant": variant} if variant else {})})
        desc.pop("annotations")
        index_entries.append(desc)
        return desc
    idx_path = root / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"schemaVersion": 2, "manifests": []}
    idx["manifests"] = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    idx["manifests"].append(desc)
    idx_path.write_text(json.dumps(idx))
    return desc


def write_index(root: Path, manifests: list[dict], tag: str) -> dict:
    """Add an image index over ``manifests`` (descriptors with platforms) under ``tag``."""
    blobs = root / "blobs" / "sha256"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    ibytes = json.dumps(index).encode()
    desc = {"mediaType": OCI_INDEX, "digest": _put(blobs, ibytes), "size": len(ibytes),
            "annotations": {"org.opencontainers.image.ref.name": tag}}
    idx_path = root / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"schemaVersion": 2, "manifests": []}
    idx["manifests"] = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    idx["manifests"].append(desc)
    idx_path.write_text(json.dumps(idx))
    return desc


def busybox_entries() -> list[Entry]:
    """A minimal busybox-static root: /bin/busybox plus applet symlinks and /etc files."""
    bb = Path("/bin/busybox")
    data = bb.read_bytes()
    entries = [Entry("bin", "dir"), Entry("etc", "dir"), Entry("tmp", "dir", mode=0o1777),
               Entry("bin/busybox", "file", data, mode=0o755)]
    for applet in ("sh", "ls", "cat", "echo", "true", "false", "sleep", "id", "env", "ps", "mount", "touch",
                   "mkdir", "rm", "wc", "head", "tail", "grep", "hostname", "whoami", "stat", "kill", "pwd",
                   "date", "sha256sum", "dd", "wget", "nc", "yes", "seq", "umount", "chmod", "cp", "mv", "ln"):
        entries.append(Entry(f"bin/{applet}", "symlink", linkname="busybox"))
    entries += [
        Entry("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
        Entry("etc/group", "file", b"root:x:0:\nnogroup:x:65534:\napp:x:1000:\n"),
        Entry("root", "dir", mode=0o700), Entry("home", "dir"), Entry("home/app", "dir", uid=1000, gid=1000),
    ]
    return entries


def skopeo_push(layout: Path, tag: str, dest: str) -> None:
    """Push oci:LAYOUT:TAG to docker://DEST with skopeo (plain HTTP allowed)."""
    import subprocess

    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{dest}"],
                   check=True, capture_output=True, env={**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")})
