"""Platform volumes have a real size: each is an ext4 file (``<volume id>.img``, sparse) the
agent makes once and the runtime loop-mounts inside the machine's own mount namespace only.

Real nats-server, the real agent and API (test_api_agent's ``stack``), real machines, the real
CLI for ``volumes create/ls/destroy``. Pure parts (size parsing, the tenant policy, the file
itself) are tested without servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_api_agent import stack, web_config  # noqa: F401 (fixture)

from taxiway.errors import InvalidInput
from taxiway.platform import policy
from taxiway.platform.agent import make_volume_image

MB = 1 << 20


def _until(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _loops_of(image: Path) -> list[str]:
    """Loop devices backed by ``image`` (what `losetup -a` shows), read from sysfs."""
    out = []
    for d in Path("/sys/block").glob("loop*"):
        with_file = d / "loop" / "backing_file"
        try:
            if with_file.read_text().strip() in (str(image), f"{image} (deleted)"):
                out.append(d.name)
        except OSError:
            continue
    return out


def _host_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


# -- pure parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "want"), [("1gb", 1 << 30), ("512mb", 512 * MB), ("10GB", 10 << 30),
                                            ("16MB", 16 * MB), (64 * MB, 64 * MB)])
def test_volume_sizes_parse(size, want):
    from taxiway.platform.api import _parse_volume_size

    assert _parse_volume_size({"size": size}) == want


@pytest.mark.parametrize("size", ["lots", "1.5.gb", "-1gb", "1mb", "4097gb", ""])
def test_bad_volume_sizes_are_one_clear_line(size):
    from taxiway.platform.api import ApiError, _parse_volume_size

    with pytest.raises(ApiError) as e:
        _parse_volume_size({"size": size})
    assert e.value.status == 400 and "\n" not in str(e.value)


@pytest.mark.parametrize("mount", [
    {"volume": "vol_0123456789abcdef", "path": "/data", "type": "ext4-image"},
    {"volume": "vol_0123456789abcdef", "path": "/data", "source": "/var/lib/x.img"},
    {"type": "ext4-image", "source": "/etc/shadow", "target": "/data"},
    {"volume": "vol_0123456789abcdef", "path": "/data", "image": "/tmp/x.img"},
    {"volume": "vol_fedcba9876543210", "path": "/data"},  # another app's
])
def test_tenants_cannot_name_an_image_or_a_type(mount):
    vols = {"vol_0123456789abcdef": {"id": "vol_0123456789abcdef", "app": "web", "name": "data", "size": 16 * MB}}
    with pytest.raises(InvalidInput):
        policy.check_config({"image": "localhost/x:1", "mounts": [mount]}, volumes=vols, registry=None)


def test_a_volume_is_mounted_once_per_machine():
    vols = {"vol_0123456789abcdef": {"id": "vol_0123456789abcdef", "app": "web", "name": "data", "size": 16 * MB}}
    twice = [{"volume": "vol_0123456789abcdef", "path": "/a"}, {"name": "data", "path": "/b"}]
    with pytest.raises(InvalidInput, match="mounted twice"):
        policy.check_config({"image": "localhost/x:1", "mounts": twice}, volumes=vols, registry=None)


def test_micro_vms_refuse_an_ext4_image_mount(platform_home, tmp_path):
    from taxiway import machines

    mount = machines.Mount(source=str(tmp_path / "v.img"), target="/data", type="ext4-image")
    with pytest.raises(InvalidInput, match="namespace machines"):
        machines.create(machines.MachineConfig(image="localhost/x:1", isolation="vm", mounts=[mount]))
    with pytest.raises(InvalidInput, match="mount type"):
        machines.create(machines.MachineConfig(image="localhost/x:1", mounts=[
            machines.Mount(source=str(tmp_path), target="/data", type="overlay")]))


def test_the_image_is_sparse_ext4_made_once(tmp_path):
    img = tmp_path / "vols" / "vol_0123456789abcdef.img"
    make_volume_image(img, 10 << 30)
    st = img.stat()
    assert st.st_size == 10 << 30 and st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 < 32 * MB  # sparse: the host holds only what ext4 wrote
    r = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "has_journal" in r.stdout, r.stderr  # replayed after a kill -9
    # every group's inode table is known to be zero: the kernel will not zero them (on the host's disk)
    groups = [line for line in r.stdout.splitlines() if line.startswith("Group ") and "(Blocks" in line]
    assert groups and all("ITABLE_ZEROED" in line for line in groups)
    assert [p.name for p in img.parent.iterdir()] == [img.name]  # no temporary left
    img.write_bytes(b"kept")  # made once: an existing file is never formatted again
    make_volume_image(img, 256 * MB)
    assert img.read_bytes() == b"kept"


# -- end to end ---------------------------------------------------------------------------------------


def _cli(api_url: str, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAXIWAY_API_URL": api_url, "TAXIWAY_API_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _exec(c, mid: str, script: str) -> dict:
    r = c.post(f"/v1/apps/web/machines/{mid}/exec", json={"command": ["sh", "-c", script]})
    assert r.status_code == 200, r.text
    return r.json()


def _started(c, mid: str) -> None:
    r = c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started", "timeout": 60})
    assert r.status_code == 200, r.text


def _destroy(c, mid: str) -> None:
    assert c.delete(f"/v1/apps/web/machines/{mid}", params={"force": "true"}).status_code == 200
    r = c.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "destroyed", "timeout": 60})
    assert r.status_code == 200, r.text


def test_a_volume_is_a_hard_limit_kept_across_machines_and_gone_when_destroyed(stack, platform_home):  # noqa: F811
    c, image, api, tmp_path, nats_url, toks = stack
    tok = toks["acme"]
    r = _cli(api.url, tok, "volumes", "create", "data", "--size", "lots", "--app", "web")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "error:" in r.stderr, r.stderr
    r = _cli(api.url, tok, "volumes", "create", "data", "--size", "16MB", "--app", "web", "--json")
    assert r.returncode == 0, r.stderr
    vid = json.loads(r.stdout)["id"]
    r = _cli(api.url, tok, "volumes", "ls", "--app", "web", "--json")
    assert [(v["id"], v["size"]) for v in json.loads(r.stdout)] == [(vid, 16 * MB)]

    voldir = platform_home / "platform" / "volumes" / "web"
    img = voldir / f"{vid}.img"
    mounts = [{"volume": vid, "path": "/data"}]
    r = c.post("/v1/apps/web/machines", json={"config": web_config(image, mounts=mounts)})
    assert r.status_code == 200, r.text
    m1 = r.json()["id"]
    _started(c, m1)
    assert img.stat().st_size == 16 * MB
    # mounted in the machine's namespace only: the host's mount table never sees it
    assert " /data " in _exec(c, m1, "cat /proc/self/mountinfo")["stdout"]
    loops = _loops_of(img)
    assert loops and _host_mounts_under(voldir) == []
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if any(f" /dev/{lo} " in line for lo in loops)]

    # writing past the size: ENOSPC in the machine, the host's disk untouched beyond the file
    _exec(c, m1, "echo kept > /data/f; sync")
    r = _exec(c, m1, "dd if=/dev/zero of=/data/big bs=1M count=64; rc=$?; sync; exit $rc")
    assert r["exit_code"] != 0 and "No space left on device" in r["stderr"], r
    assert img.stat().st_size == 16 * MB and img.stat().st_blocks * 512 <= 16 * MB
    assert sorted(p.name for p in voldir.iterdir()) == [img.name]
    _exec(c, m1, "rm /data/big")

    # one machine per volume: a second one is refused while the first has it
    r = c.post("/v1/apps/web/machines", json={"config": web_config(image, mounts=mounts)})
    assert r.status_code == 422 and "in use by another machine" in r.json()["error"], r.text
    assert _exec(c, m1, "cat /data/f")["stdout"] == "kept\n"

    # a restart keeps the data
    assert c.post(f"/v1/apps/web/machines/{m1}/restart").status_code == 200
    _until(lambda: _exec(c, m1, "cat /data/f").get("stdout") == "kept\n", "the restarted machine's volume")

    # kill -9 of the machine mid-write: its mount and loop device go with it; it mounts again
    _exec(c, m1, "setsid sh -c 'while :; do echo x >> /data/log; done' >/dev/null 2>&1 < /dev/null &")
    _until(lambda: _exec(c, m1, "test -s /data/log && echo yes")["stdout"] == "yes\n", "the writer")
    assert c.post(f"/v1/apps/web/machines/{m1}/signal", json={"signal": "SIGKILL"}).status_code == 200
    _until(lambda: c.get(f"/v1/apps/web/machines/{m1}").json()["state"] in ("stopped", "failed"), "the kill")
    _until(lambda: not _loops_of(img), "the killed machine's loop device to clear")
    assert c.post(f"/v1/apps/web/machines/{m1}/start").status_code == 200
    _started(c, m1)
    assert _exec(c, m1, "cat /data/f")["stdout"] == "kept\n"

    # a redeploy (a new machine, the same volume, here read-only) finds the data
    _destroy(c, m1)
    r = c.post("/v1/apps/web/machines", json={"config": web_config(image, mounts=[{**mounts[0], "readonly": True}])})
    assert r.status_code == 200, r.text
    m2 = r.json()["id"]
    _started(c, m2)
    assert _exec(c, m2, "cat /data/f")["stdout"] == "kept\n"
    assert "Read-only file system" in _exec(c, m2, "echo x > /data/g")["stderr"]

    # destroyed: nothing left mounted or attached; destroying the volume removes its file
    r = _cli(api.url, tok, "volumes", "destroy", vid, "--app", "web", "-y")
    assert r.returncode != 0 and "mounted by machine" in r.stderr and img.exists(), r.stderr  # m2 has it
    assert c.post(f"/v1/apps/web/machines/{m2}/stop").status_code == 200
    r = c.get(f"/v1/apps/web/machines/{m2}/wait", params={"state": "stopped", "timeout": 60})
    assert r.status_code == 200, r.text
    r = _cli(api.url, tok, "volumes", "destroy", vid, "--app", "web", "-y")  # stopped: it would miss its data
    assert r.returncode != 0 and "mounted by machine" in r.stderr and img.exists(), r.stderr
    _destroy(c, m2)
    _until(lambda: not _loops_of(img), "the loop device to clear")
    assert _host_mounts_under(voldir) == []
    r = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # left clean by every machine that had it
    r = _cli(api.url, tok, "volumes", "destroy", vid, "--app", "web", "-y")
    assert r.returncode == 0, r.stderr
    assert not img.exists()
    assert json.loads(_cli(api.url, tok, "volumes", "ls", "--app", "web", "--json").stdout) == []


def test_an_older_directory_volume_stays_a_directory(stack, platform_home):  # noqa: F811
    c, image, api, tmp_path, nats_url, toks = stack
    r = c.post("/v1/apps/web/volumes", json={"name": "old", "size": "16mb"})
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    old = platform_home / "platform" / "volumes" / "web" / vid
    old.mkdir(parents=True, mode=0o700)
    (old / "f").write_text("from before\n")
    r = c.post("/v1/apps/web/machines", json={"config": web_config(image, mounts=[{"volume": vid, "path": "/data"}])})
    assert r.status_code == 200, r.text
    mid = r.json()["id"]
    _started(c, mid)
    assert _exec(c, mid, "cat /data/f")["stdout"] == "from before\n"
    assert not old.with_name(f"{vid}.img").exists()
    _destroy(c, mid)
    assert c.delete(f"/v1/apps/web/volumes/{vid}").status_code == 200
    assert not old.exists()
