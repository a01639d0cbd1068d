"""Snapshots: layers unpacked once by chain ID, overlay whiteouts, leases, prune, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.images import write_fixture_image
from helpers.layout import Entry

from machines.conftest import host_state, load_layout, make_image, tw
from taxiway.machines.snapshots import Snapshotter, chain_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root")


def test_chain_ids():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_ids([]) == []
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]
    from taxiway.oci import unpack

    assert chain_ids([a, b, a]) == unpack.chain_ids([a, b, a])


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_fixture_image_layers_and_whiteouts(tmp_path, taxiway_home, monkeypatch, mode):
    if mode == "copy":
        monkeypatch.setenv("TAXIWAY_SNAPSHOTTER", "copy")
    layout = tmp_path / "layout"
    write_fixture_image(layout)
    load_layout(layout, "fixture", "localhost/fixture:1")
    script = ("for f in etc/config.txt root/.ssh/id_rsa srv/app/.env srv/app/cache/token.txt srv/app/cache/a.dat "
              "root/.aws/credentials var/log/old.log etc/motd home/app/notes.txt; do "
              "if [ -e /$f ]; then echo $f=yes; else echo $f=no; fi; done; cat /etc/config.txt")
    r = tw("run", "--rm", "localhost/fixture:1", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    seen = dict(ln.split("=", 1) for ln in r.stdout.decode().splitlines() if "=" in ln and "/" in ln.split("=")[0])
    assert seen == {"etc/config.txt": "yes", "root/.ssh/id_rsa": "no", "srv/app/.env": "no",
                    "srv/app/cache/token.txt": "no", "srv/app/cache/a.dat": "no", "root/.aws/credentials": "no",
                    "var/log/old.log": "no", "etc/motd": "yes", "home/app/notes.txt": "yes"}
    assert r.stdout.decode().endswith("version=2\n")
    layers = [p for p in (taxiway_home / "snapshots/layers").iterdir()]
    assert len(layers) == 3 and all((p / "meta.json").exists() for p in layers)
    metas = [json.loads((p / "meta.json").read_text()) for p in layers]
    assert {m["mode"] for m in metas} == {mode}
    assert all(p.name == m["chain_id"].split(":")[1] for p, m in zip(layers, metas, strict=True))


def test_second_run_reuses_layers(busybox, taxiway_home):
    assert tw("run", "--rm", busybox, "true").returncode == 0
    layer = next((taxiway_home / "snapshots/layers").iterdir())
    ino = layer.stat().st_ino
    assert tw("run", "--rm", busybox, "true").returncode == 0
    assert next((taxiway_home / "snapshots/layers").iterdir()).stat().st_ino == ino


def test_leases_ls_and_prune(busybox, tmp_path, taxiway_home):
    other = make_image(tmp_path, "localhost/other:1", [[Entry("extra.txt", "file", b"x")]])
    assert tw("run", "-d", "--name", "holder", other, "sleep", "100").returncode == 0
    rows = json.loads(tw("snapshots", "ls", "--json").stdout)
    assert len(rows) == 2 and all(r["in_image"] for r in rows)
    leased = [r for r in rows if r["leases"]]
    assert len(leased) == 2 and all(r["leases"] for r in leased)  # a lease holds the whole chain
    # images still need them: plain prune keeps everything
    assert "removed 0" in tw("snapshots", "prune").stdout.decode()
    # --all drops what no lease holds: nothing while the machine lives
    assert "removed 0" in tw("snapshots", "prune", "--all").stdout.decode()
    tw("machines", "rm", "-f", "holder")
    assert host_state(taxiway_home)["leases"] == []
    assert "removed 2" in tw("snapshots", "prune", "--all").stdout.decode()
    assert list((taxiway_home / "snapshots/layers").iterdir()) == []
    # and the next run unpacks again
    assert tw("run", "--rm", busybox, "true").returncode == 0


def test_half_unpacked_layer_never_used_and_cleaned(busybox, taxiway_home):
    from taxiway.oci.store import Store

    snap = Snapshotter()
    img = Store().image(busybox)
    chain = chain_ids(img.config()["rootfs"]["diff_ids"])
    hexid = chain[0].split(":")[1]
    # a crash mid-unpack: a temp dir of a dead process, and a final-named dir without meta.json
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmpdir = snap.layers / f".tmp-{hexid}-{dead.pid}"
    (tmpdir / "fs/bin").mkdir(parents=True)
    (tmpdir / "fs/bin/half").write_text("partial")
    half = snap.layers / hexid
    (half / "fs").mkdir(parents=True)
    assert not snap.has(chain[0])
    r = tw("run", "--rm", busybox, "sh", "-c", "ls /bin/half 2>/dev/null || echo clean")
    assert r.stdout == b"clean\n", r.stderr
    assert not tmpdir.exists()
    assert (half / "meta.json").exists()


def test_kill_9_of_a_supervisor_is_cleaned_by_next_command(busybox, taxiway_home):
    assert tw("run", "-d", "--name", "orphan", busybox, "sleep", "1000").returncode == 0
    m = json.loads(tw("machines", "inspect", "orphan").stdout)[0]
    os.kill(m["supervisor"], signal.SIGKILL)
    os.kill(m["pid"], signal.SIGKILL)
    time.sleep(0.2)
    r = tw("machines", "ls", "-a", "--json")
    state = json.loads(r.stdout)[0]
    assert state["state"] == "exited"
    assert host_state(taxiway_home)["cgroups"] == []
    assert tw("machines", "rm", "orphan").returncode == 0
    st = host_state(taxiway_home)
    assert st["machines"] == [] and st["leases"] == [] and st["procs"] == []


def test_kill_9_during_unpack_then_run(tmp_path, taxiway_home):
    """Kill a run while it unpacks a big layer; the next run still works and nothing half-made stays."""
    big = [Entry(f"data/f{i}", "file", os.urandom(1 << 16)) for i in range(300)]
    img = make_image(tmp_path, "localhost/big:1", [[Entry("data", "dir"), *big]])
    p = subprocess.Popen([sys.executable, "-m", "taxiway", "run", "--rm", img, "true"], env=dict(os.environ))
    layers = taxiway_home / "snapshots/layers"

    def unpacking() -> bool:
        try:
            return any(d.name.startswith(".tmp-") for d in layers.iterdir())
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while time.time() < deadline and not unpacking():
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = tw("run", "--rm", img, "sh", "-c", "ls /data | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "300"
    assert not [d for d in layers.iterdir() if d.name.startswith(".tmp-")]
    assert host_state(taxiway_home)["machines"] == []
