"""200 run/rm cycles leave no mount, cgroup, network namespace, process or disk growth behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from machines.conftest import host_state, tw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root")


def _netns_holders(ns: str) -> set[int]:
    """Pids of the processes in network namespace ``ns`` (``net:[inode]``)."""
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "ns/net") == ns:
                    out.add(int(p.name))
            except OSError:
                pass
    return out


def _wait_trash_empty(home: Path) -> None:
    # `run --rm` reports the exit code first; the removed machine's files are deleted in the background
    trash = home / "machines/.trash"
    deadline = time.time() + 30
    while trash.exists() and any(trash.iterdir()) and time.time() < deadline:
        time.sleep(0.1)


def test_200_run_rm_cycles_leave_nothing(busybox, taxiway_home):
    assert tw("run", "--rm", busybox, "true").returncode == 0  # unpack once
    _wait_trash_empty(taxiway_home)
    before = host_state(taxiway_home)
    seen_netns = set()
    for i in range(200):
        if i % 10 == 0:  # every tenth: detached, inspected from outside, then force-removed
            r = tw("run", "-d", "--name", f"c{i}", busybox, "sleep", "60")
            assert r.returncode == 0, r.stderr
            m = json.loads(tw("machines", "inspect", f"c{i}").stdout)[0]
            ns = os.readlink(f"/proc/{m['pid']}/ns/net")
            assert ns != os.readlink("/proc/self/ns/net")
            inside = _netns_holders(ns)
            assert m["pid"] in inside
            assert tw("machines", "rm", "-f", f"c{i}").returncode == 0
            # none of its processes is left: the namespace went with them. (Its inode number is free
            # again at once, and another suite's new namespace on this host may get it: so the
            # processes are checked, not the number; host_state below checks for any leftover.)
            assert not (_netns_holders(ns) & inside), (ns, inside)
            seen_netns.add(ns)
        else:
            r = tw("run", "--rm", busybox, "true")
            assert r.returncode == 0, r.stderr
    _wait_trash_empty(taxiway_home)
    after = host_state(taxiway_home)
    assert after["mounts"] == before["mounts"] == []
    assert after["cgroups"] == [] and after["procs"] == [] and after["machines"] == [] and after["leases"] == []
    assert seen_netns
    assert after["size"] <= before["size"] + 64 * 1024, (before["size"], after["size"])
