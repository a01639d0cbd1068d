"""export() and `umoci unpack` build the same root filesystem from the fixture image."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers.images import LayoutImage, tree_manifest, write_fixture_image

from taxiway.oci.unpack import export

pytestmark = [
    pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is installed by .ci/run"),
    pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack without --rootless needs root; CI runs as root"),
]


@pytest.mark.parametrize("resolver,workers", [("openat2", 2), ("walk", 0)])
def test_export_matches_umoci_unpack(tmp_path, resolver, workers):
    layout = tmp_path / "layout"
    write_fixture_image(layout, "fixture")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:fixture", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    stats = export(LayoutImage(layout, "fixture"), tmp_path / "ours", resolver=resolver, workers=workers)
    assert stats.warnings == []

    ours = tree_manifest(tmp_path / "ours")
    theirs = tree_manifest(tmp_path / "bundle" / "rootfs")
    diff = {k: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)}
    assert diff == {}
    # the comparison covered what the fixture exercises
    kinds = {d["type"] for d in ours.values()}
    assert kinds == {"file", "dir", "symlink", "chr", "blk", "fifo"}
    assert any(d.get("link_group") for d in ours.values())
    assert any(d.get("xattrs") for d in ours.values())
    assert ours["bin/su-helper"]["mode"] == "0o4755"
