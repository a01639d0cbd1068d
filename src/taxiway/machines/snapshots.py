"""The snapshot cache: every layer unpacked once, keyed by its chain ID.

Layout under ``$TAXIWAY_HOME/snapshots``::

    layers/<chain-hex>/fs          a committed layer (overlay diff, or a full tree in copy mode)
    layers/<chain-hex>/meta.json   chain ID, diff ID, size, when
    layers/.tmp-<chain-hex>-<pid>  being unpacked; renamed into place only when complete
    leases/<owner>.json            which chain a VM disk (or another owner) holds
    base/fs                        the top lower of every machine: empty mount points (proc, sys,
                                   dev, etc/hosts...) so a start writes nothing to the upper

A machine's own record (``machines/<id>/machine.json``, with its chain) is its lease.

In overlay mode a layer directory is an overlayfs *upper* produced by
applying the layer tar on top of its parents through an overlay mount (in a
private mount namespace, so a crash never leaves a mount behind): deletions
become overlay whiteouts by themselves, exactly as containerd's overlay
snapshotter does. In copy mode (no overlayfs, or ``TAXIWAY_SNAPSHOTTER=copy``)
each layer directory holds the whole tree up to it, made by a reflink copy of
its parent plus the layer, and a machine root is a reflink copy of the top.

Crash safety: a layer becomes visible only by ``rename`` after its tar was
applied completely, so a half-unpacked layer is never used; ``cleanup`` drops
``.tmp-*`` left by dead processes and leases of machines that are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.errors import TaxiwayError
from taxiway.fsutil import atomic_write
from taxiway.machines.config import Record
from taxiway.machines.dirs import private_dir, snapshots_dir
from taxiway.machines.procs import pid_alive

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, BinaryIO


class _Lazy:
    """``shutil`` on first use (it pulls in zlib, bz2 and lzma: not needed to start a machine)."""

    def __getattr__(self, name: str) -> Any:
        import shutil as _shutil

        return getattr(_shutil, name)


shutil = _Lazy()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).

    The same as :func:`taxiway.oci.unpack.chain_ids` (a test pins that), kept here so a warm
    ``taxiway run`` does not import the unpacker.
    """
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            import hashlib

            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def chain_hex(chain_id: str) -> str:
    """The hex part of a sha256 chain ID (a directory name), refused unless well-formed."""
    algo, _, h = chain_id.partition(":")
    if algo != "sha256" or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise TaxiwayError(f"invalid chain ID {chain_id!r}", "the image config is corrupt")
    return h


def overlay_supported() -> bool:
    if os.environ.get("TAXIWAY_SNAPSHOTTER") == "copy":
        return False
    try:
        with open("/proc/filesystems") as f:
            if "overlay" in f.read():
                return True
    except OSError:
        return False
    import subprocess

    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


class SnapshotInfo(Record):
    FIELDS = (("chain_id", Record.REQUIRED), ("size", Record.REQUIRED), ("leases", Record.REQUIRED),
              ("in_image", Record.REQUIRED), ("created", Record.REQUIRED))
    chain_id: str
    size: int
    leases: list[str]
    in_image: bool
    created: float


def apply_layer(root: Path, stream: BinaryIO, media_type: str, diff_id: str | None = None, size: int = 0) -> Any:
    """Apply a layer with the images part's safe unpacker, checking its diff ID.

    Small layers are written inline: handing a few files to writer threads costs more
    (in thread switches on a busy host) than it saves.
    """
    from taxiway.oci.unpack import apply_layer as _apply

    return _apply(root, stream, media_type, diff_id=diff_id, name=f"layer {diff_id[:19] if diff_id else ''}",
                  workers=0 if size < (8 << 20) else None)


def du(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


class Snapshotter:
    """Unpacked layers keyed by chain ID, with leases and garbage collection."""

    def __init__(self, root: Path | None = None):
        if root is None:
            root = snapshots_dir()
        self.root = Path(root)
        self.layers = self.root / "layers"
        self.leases = self.root / "leases"
        self.root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(self.root)  # layers keep the images' setuid files and device nodes
        self.layers.mkdir(exist_ok=True)
        self.leases.mkdir(exist_ok=True)
        self.overlay = overlay_supported()

    @contextlib.contextmanager
    def _lock(self, name: str = "lock") -> Iterator[None]:
        with open(self.root / name, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def path(self, chain_id: str) -> Path:
        return self.layers / chain_hex(chain_id) / "fs"

    def has(self, chain_id: str) -> bool:
        return (self.layers / chain_hex(chain_id) / "meta.json").exists()

    def prepare(self, image: Any) -> list[str]:
        """Make sure every layer of ``image`` is unpacked; returns the chain IDs, base first."""
        cfg = image.config()
        diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
        chain = chain_ids(diff_ids)
        if chain and all(self.has(c) for c in chain):
            return chain  # warm: the manifest's layer list is not even read
        layers = image.layers()
        if len(diff_ids) != len(layers):
            raise TaxiwayError(f"{image!r}: config lists {len(diff_ids)} layers, manifest {len(layers)}",
                               "the image is corrupt; pull it again")
        with self._lock():
            for i, c in enumerate(chain):
                if not self.has(c):
                    self._unpack(image, layers[i], chain[:i], c, diff_ids[i])
        return chain

    def _unpack(self, image: Any, desc: Any, parents: list[str], chain_id: str, diff_id: str) -> None:
        h = chain_hex(chain_id)
        final = self.layers / h
        tmp = self.layers / f".tmp-{h}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            fs = tmp / "fs"
            if not parents:
                fs.mkdir()
                with image.open_blob(desc.digest) as blob:
                    apply_layer(fs, blob, desc.media_type, diff_id, desc.size)
            elif not self.overlay:
                import subprocess

                subprocess.run(["cp", "-a", "--reflink=auto", str(self.path(parents[-1])), str(fs)], check=True)
                with image.open_blob(desc.digest) as blob:
                    apply_layer(fs, blob, desc.media_type, diff_id, desc.size)
            else:
                fs.mkdir()
                self._apply_on_overlay(image, desc, parents, tmp, diff_id)
            for extra in ("work", "merged"):
                if (tmp / extra).exists():
                    shutil.rmtree(tmp / extra)
            meta = {"chain_id": chain_id, "diff_id": diff_id, "parent": parents[-1] if parents else None,
                    "created": time.time(), "mode": "overlay" if self.overlay else "copy"}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if final.exists():  # a leftover without meta.json: never committed
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _apply_on_overlay(self, image: Any, desc: Any, parents: list[str], tmp: Path, diff_id: str) -> None:
        """Apply the layer through an overlay of its parents, in a child with its own mount namespace."""
        from taxiway.machines import linux

        (tmp / "work").mkdir()
        (tmp / "merged").mkdir()
        lower = ":".join(str(self.path(p)) for p in reversed(parents))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                linux.unshare(linux.CLONE_NEWNS)
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                linux.mount("overlay", str(tmp / "merged"), "overlay", 0,
                            f"lowerdir={lower},upperdir={tmp / 'fs'},workdir={tmp / 'work'}")
                with image.open_blob(desc.digest) as blob:
                    apply_layer(tmp / "merged", blob, desc.media_type, diff_id, desc.size)
                os._exit(0)
            except BaseException as e:  # noqa: BLE001 - report to the parent, never return into its code
                with contextlib.suppress(Exception):
                    os.write(w, str(e).encode()[:4000])
                os._exit(1)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            err = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise TaxiwayError(f"unpacking layer {desc.digest[:19]} failed: {err or status}",
                               "the layer is corrupt or the disk is full; pull the image again")

    # -- machine roots ---------------------------------------------------------------

    def base(self) -> Path:
        """The shared top lower with the mount points every machine needs (made once, atomically)."""
        fs = self.root / "base" / "fs"
        if fs.exists():
            return fs
        tmp = self.root / f".base-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for d in ("proc", "sys", "dev", "etc"):
            (tmp / "fs" / d).mkdir(parents=True)
        for f in ("hosts", "hostname", "resolv.conf"):
            (tmp / "fs" / "etc" / f).touch()
        try:
            os.rename(tmp, self.root / "base")
        except OSError:  # someone else made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return fs

    def overlay_options(self, chain: list[str], upper: Path, work: Path) -> str:
        lower = ":".join([str(self.base())] + [str(self.path(c)) for c in reversed(chain)])
        return f"lowerdir={lower},upperdir={upper},workdir={work}"

    def copy_root(self, chain: list[str], dest: Path) -> None:
        """Copy mode: a private writable root (reflink where the filesystem can)."""
        import subprocess

        subprocess.run(["cp", "-a", "--reflink=auto", str(self.path(chain[-1])), str(dest)], check=True)

    # -- leases ------------------------------------------------------------------------

    def lease(self, owner: str, chain: list[str], **extra: Any) -> None:
        # temp + rename without fsync: a lease lost in a power cut only lets prune drop a layer early,
        # and the next run unpacks it again
        with atomic_write(self.leases / f"{owner}.json", 0o644, fsync=False) as f:
            f.write(json.dumps({"chain": chain, "created": time.time(), **extra}).encode())

    def release(self, owner: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.leases / f"{owner}.json").unlink()

    def _leases(self, files_only: bool = False) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.leases.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                out[p.stem] = json.loads(p.read_text())["chain"]
        if not files_only:
            for p in (self.root.parent / "machines").glob("*/machine.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    out[p.parent.name] = json.loads(p.read_text())["chain"]
        return out

    # -- listing, gc -----------------------------------------------------------------

    def _image_chains(self) -> set[str]:
        """Chain IDs of every image in the local store."""
        out: set[str] = set()
        try:
            from taxiway.oci.store import Store

            store = Store()
            for name, _ in store.images():
                with contextlib.suppress(Exception):
                    img = store.image(name)
                    out.update(chain_ids(list((img.config().get("rootfs") or {}).get("diff_ids") or [])))
        except Exception:
            pass
        return out

    def list(self) -> list[SnapshotInfo]:
        leases = self._leases()
        images = self._image_chains()
        out = []
        for d in sorted(self.layers.iterdir()):
            if d.name.startswith(".") or not (d / "meta.json").exists():
                continue
            meta = json.loads((d / "meta.json").read_text())
            cid = meta["chain_id"]
            out.append(SnapshotInfo(cid, du(d), sorted(o for o, ch in leases.items() if cid in ch),
                                    cid in images, meta.get("created", 0)))
        return out

    def cleanup(self, live_owners: set[str] | None = None) -> list[str]:
        """Remove half-made snapshots of dead processes and (given the live owners) stale leases."""
        removed = []
        for d in self.layers.iterdir():
            if d.name.startswith(".tmp-"):
                pid = d.name.rsplit("-", 1)[-1]
                if not pid.isdigit() or not pid_alive(int(pid)) or int(pid) == os.getpid():
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
            elif not (d / "meta.json").exists() and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        for d in self.root.glob(".base-*"):
            if not pid_alive(int(d.name.rsplit("-", 1)[-1])):
                shutil.rmtree(d, ignore_errors=True)
        if live_owners is not None:
            for owner in self._leases(files_only=True):
                if owner not in live_owners:
                    self.release(owner)
                    removed.append(f"lease {owner}")
        return removed

    def prune(self, all_unused: bool = False) -> list[SnapshotInfo]:
        """Remove snapshots no lease needs (and, unless ``all_unused``, no stored image needs)."""
        with self._lock():
            leased: set[str] = set()
            for ch in self._leases().values():
                leased.update(ch)
            images = set() if all_unused else self._image_chains()
            gone = []
            for s in self.list():
                if s.chain_id in leased or s.chain_id in images:
                    continue
                # children before parents does not matter in overlay mode: each dir is standalone
                shutil.rmtree(self.layers / chain_hex(s.chain_id), ignore_errors=True)
                gone.append(s)
            return gone
