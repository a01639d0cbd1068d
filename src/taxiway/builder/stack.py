"""Stacks: the build image and the run images, made from Debian packages with mmdebstrap.

Each image is one layer: ``mmdebstrap --variant=minbase`` plus only the packages
it needs, with the ``cnb`` user (uid/gid 1000) the build and the app run as.
mmdebstrap is slow (a minute for the build image), so its result is cached
under ``/var/cache/taxiway-stacks`` (``$TAXIWAY_STACK_CACHE``) keyed by the
recipe's hash and built under a lock; importing a cached stack into a store
only copies one blob. The run images hold no compilers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from taxiway.errors import TaxiwayError
from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Descriptor

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CNB_UID = 1000
CNB_GID = 1000
RECIPE_VERSION = 1
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Mount points the builder binds into the build image, and the cnb user.
_HOOK = (
    'chroot "$1" groupadd -g 1000 cnb && chroot "$1" useradd -u 1000 -g 1000 -m -s /bin/sh cnb'
    ' && mkdir -p "$1/workspace" "$1/layers" "$1/platform" "$1/cnb/buildpacks"'
    ' && chown 1000:1000 "$1/workspace" "$1/layers"'
    ' && rm -rf "$1/var/cache/apt"/*.bin "$1/var/log"/*.log "$1/var/log/apt"/* "$1/usr/share/doc"/* "$1/usr/share/man"/*'
)


@dataclass(frozen=True)
class Recipe:
    """One stack image: its name and the Debian packages on top of minbase."""

    name: str
    packages: tuple[str, ...]
    description: str

    @property
    def ref(self) -> str:
        return f"localhost/taxiway/{self.name}:{SUITE}"

    def key(self) -> str:
        """The recipe hash the cache is keyed by."""
        blob = json.dumps([RECIPE_VERSION, SUITE, MIRROR, self.packages, _HOOK], sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:16]}"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("build", ("ca-certificates", "python3", "python3-venv", "python3-pip", "nodejs", "npm",
                         "busybox-static", "git"), "the build image: Python, Node and npm, busybox"),
        Recipe("run-base", ("ca-certificates",), "the run image for static sites, Deno and Procfile apps"),
        Recipe("run-python", ("ca-certificates", "python3"), "the run image for Python apps"),
        Recipe("run-node", ("ca-certificates", "nodejs"), "the run image for Node apps"),
    )
}
BUILD = "build"
RUN_IMAGES = ("run-base", "run-python", "run-node")


def cache_root() -> Path:
    """Where built stacks are cached: $TAXIWAY_STACK_CACHE, /var/cache/taxiway-stacks, or under $TAXIWAY_HOME."""
    env = os.environ.get("TAXIWAY_STACK_CACHE")
    if env:
        p = Path(env)
    elif os.access("/var/cache", os.W_OK):
        p = Path("/var/cache/taxiway-stacks")
    else:
        from taxiway.paths import home

        p = home() / "stack-cache"
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def locked(path: Path, check: Callable[[], object] | None = None) -> Iterator[None]:
    """An exclusive flock on ``path`` (created with its folder) for the block's duration.

    With ``check`` (a deadline), the wait polls and calls it, so what it raises ends the wait.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if check is None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        else:
            import time

            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    check()
                    time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _mmdebstrap(recipe: Recipe, out: Path) -> None:
    if not shutil.which("mmdebstrap"):
        raise TaxiwayError("mmdebstrap is not installed", "install it: apt-get install mmdebstrap (scripts/install-deps.sh)")
    argv = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(recipe.packages),
            "--customize-hook=" + _HOOK, SUITE, str(out), f"deb {MIRROR} {SUITE} main"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(315532801)}
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise TaxiwayError(f"mmdebstrap failed for the {recipe.name} stack image: {tail}",
                           "check that apt can reach the Debian mirror")


def cached_layer(recipe: Recipe) -> tuple[Path, dict]:
    """The gzip layer of ``recipe`` in the cache (built with mmdebstrap on first use) and its metadata."""
    from taxiway.builder.layer import GZIP_LEVEL
    from taxiway.oci.layerio import LayerWriter

    root = cache_root()
    d = root / recipe.key()
    meta_path = d / "layer.json"
    with locked(root / f"{recipe.key()}.lock"):
        if not meta_path.exists():
            d.mkdir(parents=True, exist_ok=True)
            from taxiway.fsutil import atomic_write, sweep_temp_files, write_bytes_atomic

            sweep_temp_files(d / "layer.tar.gz")  # what a build killed here left (we hold the lock)
            with tempfile.TemporaryDirectory(dir=root, prefix=".mm-") as tmp:
                tar = Path(tmp) / "rootfs.tar"
                _mmdebstrap(recipe, tar)
                # Synced before layer.json names it: after a power cut the record never
                # points at a layer that is empty or short.
                with atomic_write(d / "layer.tar.gz") as out, open(tar, "rb") as src:
                    sink = LayerWriter(out, GZIP_LEVEL)
                    while chunk := src.read(1 << 20):
                        sink.write(chunk)
                    sink.finish()
                meta = {"digest": sink.digest, "diff_id": sink.diff_id,
                        "size": sink.size, "packages": list(recipe.packages), "suite": SUITE}
                write_bytes_atomic(meta_path, json.dumps(meta, sort_keys=True).encode())
    return d / "layer.tar.gz", json.loads(meta_path.read_text())


def stack_config(recipe: Recipe, diff_id: str) -> dict:
    """The image config of a stack image (fixed, so the digest depends only on the layer)."""
    from taxiway.builder.assemble import CREATED

    return {
        "architecture": "amd64", "os": "linux", "created": CREATED,
        "config": {"Env": [f"PATH={PATH}", "LANG=C.UTF-8"], "User": f"{CNB_UID}:{CNB_GID}",
                   "WorkingDir": "/", "Cmd": ["/bin/sh"],
                   "Labels": {"io.buildpacks.stack.id": f"io.taxiway.stacks.{SUITE}",
                              "io.taxiway.stack.recipe": recipe.key(),
                              "org.opencontainers.image.description": recipe.description}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": CREATED, "created_by": f"mmdebstrap --variant=minbase {SUITE} +{','.join(recipe.packages)}"}],
    }


def import_stack(store, name: str) -> Descriptor:
    """Make sure the stack image ``name`` is in ``store`` (building it if needed); returns its manifest descriptor."""
    from taxiway.builder.assemble import tag_if_changed
    from taxiway.oci.image import Addendum, append_layers, empty_image, set_config, write_image

    recipe = RECIPES[name]
    path, meta = cached_layer(recipe)
    # The layer is read from the cache only if the store lacks it (and checked against the recorded digest then).
    layer = Addendum(Descriptor(mt.OCI_LAYER_GZIP, meta["digest"], meta["size"]), meta["diff_id"],
                     opener=lambda: open(path, "rb"))
    img = set_config(append_layers(empty_image(), layer), stack_config(recipe, meta["diff_id"]))
    desc = write_image(store, img)
    tag_if_changed(store, recipe.ref, desc)
    return desc


def ensure_stacks(store, names: tuple[str, ...] | None = None) -> dict[str, Descriptor]:
    """Import (building when not cached) the named stack images; all of them by default.

    Two at a time: mmdebstrap spends much of its time waiting on the mirror.
    """
    from concurrent.futures import ThreadPoolExecutor

    wanted = list(names or (BUILD, *RUN_IMAGES))
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stack") as pool:
        futures = {n: pool.submit(cached_layer, RECIPES[n]) for n in wanted}
        for f in futures.values():
            f.result()
    return {n: import_stack(store, n) for n in wanted}


def rootfs_for(store, image_ref: str) -> Path:
    """The build image's root filesystem, unpacked once per image digest and shared (read-only in builds)."""
    img = store.image(image_ref)
    root = cache_root() / "rootfs"
    root.mkdir(exist_ok=True)
    dest = root / img.digest().split(":", 1)[1]
    if (dest / ".complete").exists():
        return dest
    with locked(root / (dest.name + ".lock")):
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
        try:
            for layer in img.layers():
                # Stack images are our own single-layer images; `tar` is the fastest unpacker here.
                with img.open_blob(layer.digest) as src:
                    p = subprocess.Popen(["tar", "-xz", "--numeric-owner", "-p", "-C", str(tmp)], stdin=src,
                                         stderr=subprocess.PIPE)
                    _, err = p.communicate()
                if p.returncode != 0:
                    raise TaxiwayError(f"could not unpack the build image {image_ref}: {err.decode(errors='replace').strip()[-200:]}",
                                       "recreate it with `taxiway stack create`")
            for mp in ("workspace", "layers", "platform", "cnb/buildpacks", "cnb/work", "proc", "dev", "tmp", "home/cnb"):
                (tmp / mp).mkdir(parents=True, exist_ok=True)
            (tmp / ".complete").write_text(img.digest())
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest
