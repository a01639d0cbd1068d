"""The micro-VM runtime: QEMU microvm with the cloud kernel (KVM if it works here, else TCG)."""

from __future__ import annotations

import json
import os
import time

import pytest

from machines.conftest import host_state, tw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root")


@pytest.fixture(scope="session")
def kvm_cache(tmp_path_factory):
    """Probe KVM once per session (a tiny guest), shared by every VM test."""
    return tmp_path_factory.mktemp("kvm") / "probe.json"


@pytest.fixture
def vm_env(kvm_cache, monkeypatch):
    monkeypatch.setenv("TAXIWAY_KVM_CACHE", str(kvm_cache))


def qemu_procs(home) -> list[str]:
    """QEMU processes working on this test's files."""
    out = []
    for p in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if cmd.startswith(b"/usr/bin/qemu-system") or b"qemu-system" in cmd.split(b"\0")[0]:
            if str(home).encode() in cmd:
                out.append(p)
    return out


def test_vm_runs_entrypoint_as_user_and_reports_exit(busybox, taxiway_home, vm_env):
    r = tw("run", "--rm", "--isolation", "vm", "-u", "app", "--hostname", "vmhost", "-e", "WHO=vm", busybox,
           "sh", "-c", 'echo "hello from a $WHO"; id -u; hostname; pwd; cat /etc/hostname; exit 3', timeout=300)
    assert r.returncode == 3, r.stderr
    assert r.stdout.decode().splitlines() == ["hello from a vm", "1000", "vmhost", "/", "vmhost"]
    err = r.stderr.decode()
    assert "TCG" in err or err == ""  # says so when it falls back to emulation
    st = host_state(taxiway_home)
    assert st["machines"] == [] and qemu_procs(taxiway_home) == []
    # the image disk is made once and kept (leased); the per-machine qcow2 is gone with the machine
    assert len(list((taxiway_home / "vm/disks").glob("*.ext4"))) == 1


def test_vm_detached_lifecycle_and_accel_choice(busybox, taxiway_home, vm_env):
    r = tw("run", "-d", "--name", "vm1", "--isolation", "vm", busybox, "sh", "-c",
           "echo booted; while true; do sleep 1; done", timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(tw("machines", "inspect", "vm1").stdout)[0]
    assert m["runtime"] == "vm" and m["accel"] in ("kvm", "tcg") and m["state"] == "running"
    deadline = time.time() + 240
    while b"booted" not in tw("machines", "logs", "vm1").stdout:
        assert time.time() < deadline
        time.sleep(0.5)
    assert "vm/" + m["accel"] in tw("machines", "ls").stdout.decode()
    r = tw("machines", "exec", "vm1", "sh", "-c", "echo in-vm; exit 7")
    assert r.returncode == 7 and r.stdout == b"in-vm\n", r.stderr
    assert tw("machines", "stop", "vm1").returncode == 0
    m = json.loads(tw("machines", "inspect", "vm1").stdout)[0]
    assert m["state"] == "exited" and m["reason"] == "stopped"
    assert any(e["type"] == "entrypoint" and e["boot_ms"] > 0 for e in m["events"])
    assert tw("machines", "rm", "vm1").returncode == 0
    assert qemu_procs(taxiway_home) == [] and host_state(taxiway_home)["machines"] == []
    # --vm-accel kvm: runs where KVM works, else one clear line and nothing left behind
    r = tw("run", "--rm", "--isolation", "vm", "--vm-accel", "kvm", busybox, "true", timeout=300)
    if m["accel"] == "tcg":
        assert r.returncode != 0
        err = r.stderr.decode()
        assert err.startswith("error: KVM is not usable") and err.count("\n") == 1
    else:
        assert r.returncode == 0
    assert host_state(taxiway_home)["machines"] == []
