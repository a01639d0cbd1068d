"""A hostile guest against the host: volumes (virtiofsd), QEMU's confinement, the agent's host side.

Real QEMU (TCG here), real virtiofsd, real tw-vmjail; as root. What a guest may
do to its volumes' host directories, and what QEMU and virtiofsd may do on the
host, is checked on the host side (modes, /proc/PID/status), never trusted
from inside.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from machines.conftest import tw
from machines.test_vm import kvm_cache, vm_env  # noqa: F401 (fixtures)
from machines.test_vm_parity import BOOT, procs_of

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root"), pytest.mark.usefixtures("vm_env")]

CAP_FSETID, CAP_MKNOD, CAP_SETFCAP = 4, 27, 31


def status(pid: str) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def argv0(pid: str) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]


def argv0_or_empty(pid: str) -> bytes:
    try:
        return argv0(pid)
    except OSError:
        return b""


def sh(name: str, script: str) -> subprocess.CompletedProcess:
    return tw("machines", "exec", name, "sh", "-c", script, timeout=BOOT)


def test_guest_cannot_plant_devices_or_setuid_files_and_qemu_virtiofsd_are_confined(busybox, taxiway_home, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    # a setuid-root program the host already had in the directory, and a device node
    suid = vol / "host-suid"
    suid.write_bytes(Path("/bin/busybox").read_bytes())
    os.chmod(suid, 0o4755)
    os.mknod(vol / "host-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    r = tw("run", "-d", "--name", "h", "--isolation", "vm", "-v", f"{vol}:/v", busybox,
           "sh", "-c", "while true; do sleep 1; done", timeout=BOOT)
    assert r.returncode == 0, r.stderr
    try:
        # -- QEMU: seccomp sandbox, no root, no capabilities, an empty chroot, its own ipc namespace
        procs = procs_of(taxiway_home)
        qemu = [p for p in procs if b"qemu-system" in argv0(p)]
        fsd = [p for p in os.listdir("/proc") if p.isdigit() and b"virtiofsd" in argv0_or_empty(p)
               and any(str(x).encode() in Path(f"/proc/{p}/cmdline").read_bytes() for x in (taxiway_home, vol))]
        assert len(qemu) == 1 and fsd, procs
        q = status(qemu[0])
        assert q["Seccomp"] == "2"
        uids, gids = q["Uid"].split(), q["Gid"].split()
        assert "0" not in uids and "0" not in gids and len(set(uids)) == 1, (uids, gids)
        assert int(q["CapEff"], 16) == 0 and int(q["CapPrm"], 16) == 0
        assert os.readlink(f"/proc/{qemu[0]}/root") == str(taxiway_home / "vm" / "empty")
        assert os.readlink(f"/proc/{qemu[0]}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
        leaked = [os.readlink(f"/proc/{qemu[0]}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu[0]}/fd")]
        assert not [t for t in leaked if t.endswith(("/log", "/console", "/events.jsonl", "/machine.json"))], leaked
        # -- virtiofsd (every process of it): no MKNOD, FSETID or SETFCAP, even in the bounding set; filtered
        for p in fsd:
            st = status(p)
            for key in ("CapEff", "CapPrm", "CapBnd"):
                caps = int(st[key], 16)
                assert not caps & (1 << CAP_MKNOD | 1 << CAP_FSETID | 1 << CAP_SETFCAP), (p, key, st[key])
            assert st["Seccomp"] == "2", p

        # -- the guest (root in it) tries to plant device nodes and setuid/setgid programs in the volume
        r = sh("h", "cd /v; mknod null c 1 3; echo mknod-c=$?; mknod disk b 8 0; echo mknod-b=$?; "
                    "cp /bin/busybox sh; chmod 4755 sh; echo suid=$?; chmod 2755 sh; echo sgid=$?; "
                    "chmod u+s,g+s sh; echo us=$?; echo x >> host-suid; echo write=$?; "
                    "cat host-null; echo devread=$?; mkfifo fifo; echo fifo=$?")
        out = r.stdout.decode()
        for probe in ("mknod-c", "mknod-b", "suid", "sgid", "us", "devread"):
            assert f"{probe}=0" not in out, out
        assert "write=0" in out and "fifo=0" in out, out  # ordinary use still works
        # on the host: no device node the guest made, no setuid/setgid bit, and the host's setuid
        # program lost its bit when the guest wrote to it (the kernel strips it: no CAP_FSETID)
        for f in vol.iterdir():
            m = os.lstat(f).st_mode
            assert not (m & (stat.S_ISUID | stat.S_ISGID)), (f, oct(m))
            if f.name != "host-null":
                assert not (stat.S_ISCHR(m) or stat.S_ISBLK(m)), (f, oct(m))
        assert (vol / "sh").exists()
        # and run as nobody on the host, the guest's program is no way to root
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            str(vol / "sh"), "-c", "id -u"], capture_output=True, timeout=30)
        assert r.stdout.strip() == b"65534", r
        # the guest's side of the volume is nosuid,nodev too
        r = sh("h", "grep ' /v ' /proc/mounts")
        assert b"nosuid" in r.stdout and b"nodev" in r.stdout, r.stdout
    finally:
        tw("machines", "rm", "-f", "h", timeout=BOOT)
    assert procs_of(taxiway_home) == []


def test_guest_cannot_redirect_a_volume_by_symlink_across_restarts(busybox, taxiway_home, tmp_path):
    """Volume A holds volume B's host path; through A the guest swaps a directory on it for a symlink to /usr."""
    a = tmp_path / "a"
    (a / "b" / "lib").mkdir(parents=True)
    r = tw("run", "-d", "--name", "s", "--isolation", "vm", "-v", f"{a}:/a", "-v", f"{a / 'b' / 'lib'}:/lib2",
           busybox, "sh", "-c", "while true; do sleep 1; done", timeout=BOOT)
    assert r.returncode == 0, r.stderr
    try:
        r = sh("s", "rm -rf /a/b && ln -s /usr /a/b && echo swapped")
        assert b"swapped" in r.stdout, r
        assert os.path.realpath(a / "b" / "lib") == "/usr/lib"  # B's path now names the host's /usr/lib
        assert tw("machines", "stop", "s", timeout=BOOT).returncode == 0
        r = tw("machines", "start", "s", timeout=BOOT)
        err = r.stderr.decode()
        assert r.returncode != 0 and "now leads to /usr/lib," in err and len(err.strip().splitlines()) == 1, err
        assert not [p for p in procs_of(taxiway_home) if b"virtiofsd" in argv0(p) or b"qemu" in argv0(p)]
    finally:
        tw("machines", "rm", "-f", "s", timeout=BOOT)


def test_vmjail_refuses_setid_modes_xattrs_and_symlinked_volume_paths(taxiway_home, tmp_path):
    """tw-vmjail itself (virtiofsd's wrapper): the filter, the bounding set and the no-symlink walk."""
    from taxiway.machines import vm, vmagent

    jail = str(vmagent.jail_binary())
    keep = f"{sum(1 << n for _, n in vm.FSD_CAPS):x}"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, stat\n"
        "def t(name, f):\n"
        "    try:\n        f(); print(name, 'ok')\n"
        "    except OSError as e:\n        print(name, e.errno)\n"
        "os.chdir(os.environ['D'])\n"
        "t('create-suid', lambda: os.close(os.open('a', os.O_CREAT | os.O_WRONLY, 0o4755)))\n"
        "t('create', lambda: os.close(os.open('b', os.O_CREAT | os.O_WRONLY, 0o755)))\n"
        "t('chmod-suid', lambda: os.chmod('b', 0o4755))\n"
        "t('chmod-sgid', lambda: os.chmod('b', 0o2755))\n"
        "t('chmod', lambda: os.chmod('b', 0o700))\n"
        "t('mknod-suid', lambda: os.mknod('c', 0o4755 | stat.S_IFREG))\n"
        "t('mknod-dev', lambda: os.mknod('d', 0o666 | stat.S_IFCHR, os.makedev(1, 3)))\n"
        "t('setxattr', lambda: os.setxattr('b', 'security.capability', b'x'))\n"
        "print('bnd', open('/proc/self/status').read().split('CapBnd:')[1].split()[0])\n")
    work = tmp_path / "w"
    work.mkdir()
    r = subprocess.run([jail, keep, "--", "/usr/bin/python3", str(probe)], capture_output=True, timeout=30,
                       env={"D": str(work)})
    got = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())
    assert got["create"] == "ok" and got["chmod"] == "ok", got
    for k in ("create-suid", "chmod-suid", "chmod-sgid", "mknod-suid", "mknod-dev", "setxattr"):
        assert got[k] == "1", (k, got)  # EPERM
    assert int(got["bnd"], 16) == int(keep, 16) & int(status("self")["CapBnd"], 16)  # only what we keep
    assert not any(os.lstat(f).st_mode & (stat.S_ISUID | stat.S_ISGID) for f in work.iterdir())
    # --bind: a symlink anywhere in the path is refused, not followed (the host is not changed)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "mnt").mkdir()
    def ours() -> list[str]:  # this test's mounts only: other suites on the host mount and unmount meanwhile
        return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in ln]

    before = ours()
    r = subprocess.run([jail, keep, "--bind", str(tmp_path / "link"), str(tmp_path / "mnt"), "--", "true"],
                       capture_output=True, timeout=30)
    assert r.returncode == 125 and b"no longer a plain directory" in r.stderr, r
    r = subprocess.run([jail, keep, "--bind", str(tmp_path / "real"), str(tmp_path / "mnt"), "--ro", "--",
                        "sh", "-c", f"grep ' {tmp_path / 'mnt'} ' /proc/self/mountinfo; touch {tmp_path}/mnt/x"],
                       capture_output=True, timeout=30)
    line = r.stdout.decode()
    assert "nosuid" in line and "nodev" in line and " ro," in line and r.returncode != 0, r
    assert ours() == before


def test_hostile_frames_and_text_from_the_guest():
    from taxiway.machines import vmagent as A

    with pytest.raises(ValueError):  # a huge length is refused before anything is buffered for it
        A.Decoder().feed(A.HDR.pack(A.STDOUT, 0, 0xFFFFFFFF))
    assert A.exit_status(b"") == (255, 0) and A.exit_status(b"\x00\x00\x00\x07") == (255, 0)
    assert A.exit_status(A._i32(-5) + A._i32(9999)) == (255, 0)
    assert A.exit_status(A._i32(3) + A._i32(9)) == (3, 9)
    text = A.guest_text(b"boom \x1b]0;owned\x07\x1b[2J\r\nnext" + b"y" * 10000)
    assert "\x1b" not in text and "\n" not in text and "\r" not in text and len(text) <= 300


def test_guest_flooding_the_serial_console_is_bounded(busybox, taxiway_home):
    from taxiway.machines import vm

    t0 = time.monotonic()
    r = tw("run", "-d", "--name", "c", "--isolation", "vm", busybox, "sh", "-c",
           f"head -c {vm.CONSOLE_MAX + (1 << 20)} /dev/zero | tr '\\0' a > /dev/ttyS0; sleep 1000", timeout=BOOT)
    assert r.returncode == 0, r.stderr
    try:
        mdir = next((taxiway_home / "machines").glob("*/console")).parent
        deadline = t0 + 240
        while b"discarded" not in (mdir / "console").read_bytes():
            assert time.monotonic() < deadline, (mdir / "console").stat().st_size
            time.sleep(1)
        assert (mdir / "console").stat().st_size < vm.CONSOLE_MAX + 64 * 1024
    finally:
        tw("machines", "rm", "-f", "c", timeout=BOOT)
