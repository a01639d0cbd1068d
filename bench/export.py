"""Export from a warm OCI layout: taxiway's unpack vs `umoci unpack`, side by side.

The image is Debian bookworm (mmdebstrap --variant=minbase, 100 MB+ uncompressed)
as one gzip layer, cached as an OCI layout at /var/cache/taxiway-bench/debian-layout
(tag ``bookworm``, shared with bench/pull.py, built once under a lock).

Each round runs, on the same warm layout:
  * ``umoci unpack --image LAYOUT:bookworm BUNDLE`` (as root);
  * ``python -c 'export(...)'`` in a fresh interpreter (startup included).
Wall and CPU times (user + sys of all threads) are medians over the rounds,
run alternately so load from other work hits both alike; the target is a
wall-time ratio <= 0.5.

Usage: python bench/export.py [--rounds N] [--prepare-only] [--json]
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("TAXIWAY_BENCH_CACHE", "/var/cache/taxiway-bench"))
LAYOUT = CACHE / "debian-layout"
TAG = "bookworm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _put(blobs: Path, path: Path | None = None, data: bytes | None = None) -> tuple[str, int]:
    h = hashlib.sha256()
    if data is not None:
        h.update(data)
        size = len(data)
        tmp = blobs / ".tmp"
        tmp.write_bytes(data)
    else:
        assert path is not None
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        tmp = path
    os.replace(tmp, blobs / h.hexdigest())
    return "sha256:" + h.hexdigest(), size


def build_debian_layout(dest: Path) -> None:
    """mmdebstrap a minbase bookworm into one gzip layer of an OCI layout at ``dest``."""
    work = Path(tempfile.mkdtemp(prefix="debian-build.", dir=dest.parent))
    try:
        tar = work / "rootfs.tar"
        print(f"building {dest} with mmdebstrap (a few minutes, once)", file=sys.stderr)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "--format=tar", "bookworm",
                        str(tar)], check=True)
        h = hashlib.sha256()
        with open(tar, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        diff_id = "sha256:" + h.hexdigest()
        layout = work / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        gz = work / "layer.tar.gz"
        with open(gz, "wb") as out:
            subprocess.run(["pigz", "-6", "-n", "-c", str(tar)], stdout=out, check=True)
        layer_digest, layer_size = _put(blobs, path=gz)
        cfg = {"architecture": "amd64", "os": "linux",
               "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                          "Cmd": ["/bin/bash"]},
               "rootfs": {"type": "layers", "diff_ids": [diff_id]},
               "history": [{"created_by": "mmdebstrap --variant=minbase bookworm"}]}
        cfg_digest, cfg_size = _put(blobs, data=json.dumps(cfg, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest,
                               "size": cfg_size},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": layer_digest, "size": layer_size}]}
        m_digest, m_size = _put(blobs, data=json.dumps(manifest).encode())
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": m_digest, "size": m_size,
             "annotations": {"org.opencontainers.image.ref.name": TAG}}]}))
        os.rename(layout, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_debian_layout() -> Path:
    """The shared cached Debian layout, built once (under a lock) if absent."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "debian-layout.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (LAYOUT / "index.json").exists():
            build_debian_layout(LAYOUT)
    return LAYOUT


class LayoutImage:
    """The minimal Image (layers, config, open_blob) over one tag of a layout."""

    def __init__(self, root: Path, tag: str):
        self.root = root
        idx = json.loads((root / "index.json").read_text())
        d = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
        self._digest = d["digest"]
        self._manifest = json.loads(self._path(d["digest"]).read_bytes())

    def _path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def digest(self) -> str:
        return self._digest

    def config(self) -> dict:
        return json.loads(self._path(self._manifest["config"]["digest"]).read_bytes())

    def layers(self) -> list:
        from taxiway.oci.image import Descriptor

        return [Descriptor.from_json(d) for d in self._manifest["layers"]]

    def open_blob(self, digest: str):
        return open(self._path(digest), "rb")


TAXIWAY_SNIPPET = """
import sys
sys.path.insert(0, {bench!r})
from export import LayoutImage
from pathlib import Path
from taxiway.oci.unpack import export
export(LayoutImage(Path({layout!r}), {tag!r}), Path(sys.argv[1]))
"""


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + sys, all threads) of one run of ``argv``."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with {proc.returncode}")
    return wall, ru.ru_utime + ru.ru_stime


def layer_sizes(layout: Path) -> tuple[int, int, int]:
    img = LayoutImage(layout, TAG)
    (layer,) = img.layers()
    n_files = 0
    usize = 0
    import tarfile

    with gzip.open(img._path(layer.digest)) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            n_files += 1
            usize += m.size
    return layer.size, usize, n_files


def run_target(target: Path, layout: Path, rounds: int) -> dict:
    """Alternate umoci and taxiway ``rounds`` times, exporting below ``target``.

    Outputs are removed only at the end: ext4 scans recently deleted inodes
    when it allocates new ones (``recently_deleted`` in __ext4_new_inode), so
    deleting one run's 8,700 files would slow the next run's creates.
    """
    bench_dir = str(Path(__file__).resolve().parent)
    snippet = TAXIWAY_SNIPPET.format(bench=bench_dir, layout=str(layout), tag=TAG)
    wall: dict[str, list[float]] = {"umoci": [], "taxiway": []}
    cpu: dict[str, list[float]] = {"umoci": [], "taxiway": []}
    target.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="taxiway-bench-export.", dir=target))
    try:
        for r in range(rounds):
            for name in (("umoci", "taxiway") if r % 2 == 0 else ("taxiway", "umoci")):
                out = work / f"{name}-{r}"
                if name == "umoci":
                    argv = ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(out)]
                else:
                    argv = [sys.executable, "-c", snippet, str(out)]
                w, c = timed(argv)
                wall[name].append(w)
                cpu[name].append(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "target": str(target), "fs": _fstype(target), "rounds": rounds,
        "umoci_unpack_s": round(med["umoci"], 3), "taxiway_export_s": round(med["taxiway"], 3),
        "ratio": round(med["taxiway"] / med["umoci"], 3),
        "umoci_cpu_s": round(med_cpu["umoci"], 3), "taxiway_cpu_s": round(med_cpu["taxiway"], 3),
        "cpu_ratio": round(med_cpu["taxiway"] / med_cpu["umoci"], 3), "loadavg_1m": round(os.getloadavg()[0], 1),
        "all_wall": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "all_cpu": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
    }


def _fstype(path: Path) -> str:
    best, fs = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mnt, typ = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, typ
    return fs


def compare_with_umoci(target: Path, layout: Path) -> dict:
    """Export once with each tool and compare the trees entry by entry (tests/helpers/images.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers.images import tree_manifest

    from taxiway.oci.unpack import export

    target.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="taxiway-bench-compare.", dir=target))
    try:
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(work / "bundle")], check=True,
                       stdout=subprocess.DEVNULL)
        export(LayoutImage(layout, TAG), work / "rootfs")
        ours, theirs = tree_manifest(work / "rootfs"), tree_manifest(work / "bundle" / "rootfs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    diffs = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return {"paths": len(ours), "differences": len(diffs), "first_differences": diffs[:10]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--targets", default=f"{CACHE / 'out'},/dev/shm/taxiway-bench",
                    help="comma-separated directories to export into (default: the cache disk and tmpfs)")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--no-compare", action="store_true", help="skip checking that both trees are identical")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/export.py runs as root (umoci unpack and device nodes need it)", file=sys.stderr)
        return 2
    layout = ensure_debian_layout()
    if args.prepare_only:
        return 0
    compressed, uncompressed, entries = layer_sizes(layout)
    targets = [Path(t) for t in args.targets.split(",") if t]
    same = None if args.no_compare else compare_with_umoci(targets[0], layout)
    runs = [run_target(t, layout, args.rounds) for t in targets]
    report = {"image": f"{layout}:{TAG}", "layer_compressed_bytes": compressed,
              "uncompressed_bytes": uncompressed, "entries": entries, "identical_to_umoci": same, "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"image: Debian bookworm minbase, 1 gzip layer of {compressed / 1e6:.1f} MB "
          f"({uncompressed / 1e6:.1f} MB in {entries} entries); medians of {args.rounds} alternated rounds")
    if same is not None:
        print(f"same tree as umoci unpack (types, modes, owners, link targets, hardlinks, devices, xattrs, "
              f"sha256, mtimes): {same['paths']} paths, {same['differences']} differences {same['first_differences']}")
    for r in runs:
        print(f"into {r['target']} ({r['fs']}): umoci unpack {r['umoci_unpack_s']:.2f} s wall "
              f"({r['umoci_cpu_s']:.2f} s CPU), taxiway export {r['taxiway_export_s']:.2f} s wall "
              f"({r['taxiway_cpu_s']:.2f} s CPU, interpreter start included): wall ratio {r['ratio']:.2f}x "
              f"(target <= 0.5x), CPU ratio {r['cpu_ratio']:.2f}x, load {r['loadavg_1m']} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
