"""Fixtures for the machines tests: real busybox images loaded into a fresh store."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.layout import Entry, busybox_entries, make_layer, write_layout

BUSYBOX = "localhost/machines-test/busybox:1"


def load_layout(layout: Path, tag: str, name: str) -> str:
    """Copy one image of an OCI layout into the taxiway store under ``name``; returns its digest."""
    from taxiway.oci.image import Descriptor
    from taxiway.oci.store import Store

    store = Store()
    idx = json.loads((layout / "index.json").read_text())
    desc = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
    for d in [manifest["config"], *manifest["layers"], desc]:
        store.write_blob((layout / "blobs/sha256" / d["digest"].split(":")[1]).read_bytes(), d["digest"])
    store.tag(name, Descriptor.from_json({k: v for k, v in desc.items() if k != "annotations"}))
    return desc["digest"]


def make_image(tmp: Path, name: str, layers: list[list[Entry]] | None = None, config: dict | None = None) -> str:
    """Build an image (busybox base + extra layers) and load it into the store as ``name``."""
    layout = tmp / ("layout-" + name.replace("/", "_").replace(":", "_"))
    raw = [make_layer(busybox_entries())] + [make_layer(entries) for entries in (layers or [])]
    write_layout(layout, raw, "t", config=config)
    load_layout(layout, "t", name)
    return name


@pytest.fixture
def busybox(taxiway_home, tmp_path) -> str:
    """A busybox image in this test's store."""
    return make_image(tmp_path, BUSYBOX)


def tw(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the taxiway CLI (in the test's $TAXIWAY_HOME)."""
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, input=input,
                          timeout=timeout, env=dict(os.environ))


def host_state(home: Path) -> dict:
    """What a machine could leak on the host: mounts, cgroups, network namespaces, processes, disk."""
    from taxiway.machines import cgroups

    mounts = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(home) in ln]
    parent = cgroups.parent_name()
    cgs = sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{parent}*")) + \
        sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"{parent}*"))
    netns, procs = set(), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            netns.add(os.readlink(p / "ns/net"))
            cg = (p / "cgroup").read_text()
            root = os.readlink(p / "root")
        except OSError:
            continue
        if parent in cg or str(home) in root:
            procs.append(p.name)
    size = 0  # os.walk, not rglob: removed machines' files vanish in the background meanwhile
    for d, _, files in os.walk(home):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(d, f))
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return {"mounts": mounts, "cgroups": cgs, "netns": len(netns), "procs": procs,
            "machines": sorted(p.name for p in (home / "machines").iterdir() if not p.name.startswith("."))
            if (home / "machines").exists() else [],
            "leases": sorted(p.name for p in (home / "snapshots/leases").iterdir()) if (home / "snapshots/leases").exists() else [],
            "size": size}
