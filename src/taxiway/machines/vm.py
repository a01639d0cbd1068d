"""The micro-VM runtime: the same image, booted by QEMU's ``microvm`` machine.

* Once per image, its merged root becomes an ext4 image (``mkfs.ext4 -d`` on
  a read-only overlay of the snapshot's layers, mounted in a private mount
  namespace), kept under ``$TAXIWAY_HOME/vm/disks`` with a lease on its layers.
* Per machine, a qcow2 file backed by that image is its copy-on-write disk
  (the analog of an LVM thin snapshot).
* The kernel is Debian's cloud kernel; the initramfs (built once per kernel,
  init and agent version) carries static busybox, the virtio modules (blk,
  console, net, fs), the init script and the guest agent. The host appends a
  tiny second cpio archive with this machine's hostname, workdir, eth0
  address and volumes (the kernel unpacks concatenated archives).
* The init mounts the disk, the volumes (virtiofs), the API filesystems and
  /etc files, configures eth0, then ``exec``s the agent (``vmagent.c``), which
  is PID 1 from then on: it runs the main process and ``machines exec``
  processes and talks to the host over a virtio-serial port
  (:mod:`taxiway.machines.vmagent` is the host side). The serial console keeps
  the kernel's messages (saved as ``console``) and a fallback exit mark.
* QEMU runs in a network namespace of its own (``unshare --net``). With a NIC,
  a tap device there is the guest's only link, and ``-p`` forwarders enter
  that namespace to connect to the guest.
* ``-v``: one virtiofsd per volume; ``:ro`` is a read-only bind in virtiofsd's
  own mount namespace, so the guest cannot write even by remounting.
* KVM is probed once with a tiny guest; where it does not work (nested
  virtualization, as on these hosts) the VM runs under TCG and says so.

Deviations from the first design, and why:

* The tap's addresses are IPv4 link-local (169.254.77.1/.2, /30), not ULA
  under fdaa::/16: the pair exists only inside the namespace made for this
  one QEMU, IPv4 needs no duplicate address detection (no wait before the
  first connection), and busybox ``ip`` configures it in one line. The
  private network between machines (the platform's) stays ULA.
* The main process's argv/env/user come in the host's OPEN frame for
  channel 0, not in the initramfs: one code path for the main process and
  exec, and the host knows the terminal size at start (``run -t``).
* The protocol adds READY and ACK frames (stdin flow control, see
  :mod:`taxiway.machines.vmagent`) and ERROR (a setup failure as one line).

Boot time under TCG (2026-11-26; boot to entrypoint ~2.35 s -> ~1.7 s, interleaved A/B):

* ``cryptomgr.notests``: the crypto API's boot self-tests were ~0.37 s of the
  kernel's ~1.05 s to init; they check implementations and protect nothing
  (FIPS mode, ``fips=1``, ignores the option and still runs them).
* The NIC's modules (virtio_net, failover) load only with a NIC, fuse and
  virtiofs only with volumes (~30 ms each); no ``busybox --install`` (its
  shell runs applets without links); the KVM probe stops before the modules.
* Kept: KASLR (the uncompressed vmlinux booted through PVH skips the ~0.35 s
  LZ4 decompression, but PVH entry leaves the kernel unrandomized), every
  security default, the ext4 journal (a restarted machine reuses its disk),
  the uncompressed initramfs (lz4 boots no faster, gzip ~50 ms slower; this
  kernel loads only uncompressed modules).
  No gain beyond the ~0.1 s noise between boots: ``-cpu max``, ``tb-size``,
  ``thread=single/multi``, ``8250.nr_uarts=1``, ``edd=off``; microvm has no
  i8042 to skip. What is left: LZ4 decompression ~0.35 s, kernel init
  ~0.65 s, module loading ~0.14 s, the init's mounts ~0.15 s, agent ~0.03 s.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.fsutil import atomic_path, atomic_write
from taxiway.machines import state as S
from taxiway.machines.dirs import vm_dir
from taxiway.machines.logs import LogPump
from taxiway.machines.procs import kill_after, pid_alive
from taxiway.machines.snapshots import chain_hex, du
from taxiway.machines.stdio import FORWARDED, handling, null_input, raw_terminal

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from taxiway.machines.config import MachineConfig
    from taxiway.machines.interface import Exit
    from taxiway.machines.snapshots import Snapshotter

QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
EXIT_MARK = b"@@TAXIWAY-EXIT@@"
CONSOLE_MAX = 4 << 20  # bytes of the serial console kept on the host (a guest can write to it forever)
# loaded in groups (with their dependencies): the NIC's and the volumes' only when the machine has them
MODULES = {"load": ("virtio_mmio", "virtio_blk", "virtio_console"), "load-net": ("virtio_net",),
           "load-fs": ("virtiofs",)}
GUEST_ADDR = "169.254.77.2"  # eth0, seen only inside the netns taxiway makes for QEMU
HOST_ADDR = "169.254.77.1"  # tap0, the other end, in that netns too
MIN_VM_MEMORY = 128 * 1024 * 1024
# QEMU's seccomp sandbox. elevateprivileges=allow, not deny: QEMU 7.2 installs the filter before
# -runas changes uid, and with deny it is killed by its own filter (SIGSYS) at that setuid. After
# the change QEMU holds no capability, so set*id cannot raise it, and spawn=deny refuses execve
# (no setuid program either): deny would add nothing once the uid is dropped.
SANDBOX = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
# QEMU runs as uid/gid VM_UID_BASE + 24 bits of the machine id (one per machine, so one QEMU
# cannot signal or ptrace another's; a range no distribution allocates, like the jailer's --uid)
VM_UID_BASE = 0x7A000000
# virtiofsd's bounding set (tw-vmjail): what it needs to serve files as any guest uid and set up its
# own sandbox (namespaces, pivot_root, RLIMIT_NOFILE). Not MKNOD (device nodes), FSETID (a write
# keeps a setuid bit), SETFCAP (file capabilities), nor anything else.
FSD_CAPS = ("chown", 0), ("dac_override", 1), ("dac_read_search", 2), ("fowner", 3), ("setgid", 6), \
    ("setuid", 7), ("setpcap", 8), ("sys_chroot", 18), ("sys_admin", 21), ("sys_resource", 24)
DEFAULT_VM_MEMORY = 256 * 1024 * 1024

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/null
if [ ! -f /taxiway/config ]; then echo "@@TAXIWAY-EXIT@@ 0"; poweroff -f; fi
. /taxiway/config
fail() { echo "@@TAXIWAY-EXIT@@ 125 $1"; poweroff -f; }
load() { while read -r m; do insmod /lib/modules/$m.ko 2>/dev/null; done < /lib/modules/$1; }
load load
[ -n "$TW_ADDR" ] && load load-net
[ -s /taxiway/volumes ] && load load-fs
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot 2>/dev/null || fail "cannot mount the root disk"
hostname "$TW_HOSTNAME"
ip link set lo up 2>/dev/null
if [ -n "$TW_ADDR" ]; then
  ip link set eth0 up && ip addr add "$TW_ADDR" dev eth0 || fail "cannot configure eth0"
fi
if [ -n "$TW_ADDR6" ]; then
  echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
  ip -6 addr add "$TW_ADDR6" dev eth0 && ip -6 route add fe80::1 dev eth0 &&
    ip -6 route add default via fe80::1 dev eth0 || fail "cannot configure eth0's private address"
fi
for d in proc sys dev etc tmp; do [ -d /newroot/$d ] || mkdir -p /newroot/$d; done
while read -r tag mode dir; do
  mkdir -p "/newroot$dir" && mount -t virtiofs -o "$mode" "$tag" "/newroot$dir" || fail "cannot mount volume $dir"
done < /taxiway/volumes
mount -t proc proc /newroot/proc
mount -t sysfs -o ro sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
for f in hosts resolv.conf hostname; do rm -f /newroot/etc/$f; cp /taxiway/$f /newroot/etc/$f; done
mkdir -p "/newroot$TW_WORKDIR"
exec /bin/tw-agent
"""


# -- host facts -----------------------------------------------------------------------------


def kernel() -> tuple[Path, str]:
    """The cloud kernel to boot and its version (``TAXIWAY_VM_KERNEL`` overrides)."""
    env = os.environ.get("TAXIWAY_VM_KERNEL")
    cands = [env] if env else sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or sorted(glob.glob("/boot/vmlinuz-*"))
    for k in reversed(cands):
        if k and os.access(k, os.R_OK):
            ver = os.path.basename(k).removeprefix("vmlinuz-")
            if Path("/lib/modules", ver).is_dir():
                return Path(k), ver
    raise TaxiwayError("no kernel for micro-VMs (looked for /boot/vmlinuz-*-cloud-amd64 with its /lib/modules)",
                       "install linux-image-cloud-amd64, or set TAXIWAY_VM_KERNEL")


def _qemu() -> str:
    q = shutil.which(QEMU)
    if not q:
        raise TaxiwayError(f"{QEMU} is not installed", "install qemu-system-x86 to use --isolation vm")
    return q


# -- cpio (newc) ----------------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
    out = hdr.encode() + nb
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (name, mode, data); directories have mode 0o040xxx."""
    out = b"".join(_cpio_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(entries))
    return out + _cpio_entry("TRAILER!!!", 0)


def _modules(ver: str) -> list[tuple[str, str, bytes]]:
    """The virtio modules with their dependencies as (group, name, bytes), in load order.

    A module goes in the first group that needs it (virtio_ring in "load", failover in "load-net").
    """
    base = Path("/lib/modules") / ver
    dep = {}
    for line in (base / "modules.dep").read_text().splitlines():
        k, _, v = line.partition(":")
        dep[k] = v.split()
    by_name = {Path(k).name.split(".ko")[0].replace("-", "_"): k for k in dep}
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(group: str, path: str) -> None:
        for d in reversed(dep.get(path, [])):
            add(group, d)
        if path not in seen:
            seen.add(path)
            order.append((group, path))

    for group, names in MODULES.items():
        for m in names:
            if m in by_name:
                add(group, by_name[m])
    out = []
    for group, p in order:
        data = (base / p).read_bytes()
        if p.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif p.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        out.append((group, Path(p).name.split(".ko")[0], data))
    return out


def base_initramfs() -> Path:
    """The shared initramfs: busybox, virtio modules, init, the guest agent (built once per version)."""
    import hashlib

    from taxiway.machines import vmagent

    _, ver = kernel()
    agent = vmagent.binary()
    key = hashlib.sha256(f"{INIT}{MODULES}{agent.name}".encode()).hexdigest()[:12]
    p = vm_dir() / f"initramfs-{ver}-{key}.cpio"
    if p.exists():
        return p
    mods = _modules(ver)
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""), ("lib", 0o040755, b""), ("lib/modules", 0o040755, b""), ("taxiway", 0o040755, b""),
        ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("bin/tw-agent", 0o100755, agent.read_bytes()),
        ("init", 0o100755, INIT.encode()),
    ] + [(f"lib/modules/{g}", 0o100644, "".join(n + "\n" for gg, n, _ in mods if gg == g).encode()) for g in MODULES] \
      + [(f"lib/modules/{n}.ko", 0o100644, d) for _, n, d in mods]
    # fsync: it is trusted by its name alone from now on, so it must never be there but incomplete
    with atomic_write(p, 0o644) as f:
        f.write(cpio(entries))
    for old in vm_dir().glob(f"initramfs-{ver}*.cpio"):  # earlier versions of init or agent
        if old != p:
            with contextlib.suppress(OSError):
                old.unlink()
    return p


# -- KVM --------------------------------------------------------------------------------------


def kvm_usable(timeout: float = 8.0) -> bool:
    """Does a tiny KVM guest boot here? Probed once and cached (``TAXIWAY_KVM=0/1`` overrides)."""
    forced = os.environ.get("TAXIWAY_KVM")
    if forced in ("0", "1"):
        return forced == "1"
    if not os.path.exists("/dev/kvm"):
        return False
    kpath, ver = kernel()
    cache = Path(os.environ.get("TAXIWAY_KVM_CACHE") or vm_dir() / "kvm-probe.json")
    with contextlib.suppress(OSError, ValueError):
        c = json.loads(cache.read_text())
        if c.get("kernel") == ver:
            return bool(c["kvm"])
    ok = False
    try:
        stdin = null_input()  # the serial console reads it: never a /dev/null that is a file
        try:
            r = subprocess.run([_qemu(), *_machine_args("kvm", 128 << 20, 1), "-kernel", str(kpath),
                                "-initrd", str(base_initramfs()), "-append", _cmdline()],
                               capture_output=True, timeout=timeout, stdin=stdin)
        finally:
            os.close(stdin)
        ok = EXIT_MARK in r.stdout and r.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    # renamed into place: a concurrent probe (parallel runs, tests) never reads it half-written and
    # probes again; no fsync, one that does not parse after a power cut is only probed again
    with contextlib.suppress(OSError), atomic_write(cache, 0o644, fsync=False) as f:
        f.write(json.dumps({"kernel": ver, "kvm": ok, "probed": time.time()}).encode())
    return ok


def _machine_args(accel: str, memory: int, cpus: int, shared_memory: bool = False) -> list[str]:
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
    mem: list[str] = []
    if shared_memory:  # vhost-user (virtiofsd) maps the guest's memory: it must be a shareable memfd
        machine += ",memory-backend=mem"
        mem = ["-object", f"memory-backend-memfd,id=mem,size={memory >> 20}M,share=on"]
    args = ["-M", machine, *mem, "-m", f"{memory >> 20}M", "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            # modern virtio-mmio (version 2): vhost-user devices (virtiofsd) refuse legacy ones
            "-global", "virtio-mmio.force-legacy=false",
            "-no-reboot"]
    if accel == "kvm":
        args += ["-enable-kvm", "-cpu", "host"]
    else:
        args += ["-accel", "tcg"]
    return args


def _tsc_khz() -> int:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _cmdline() -> str:
    # tsc_early_khz, lpj and no_timer_check skip the guest's timer calibration: under TCG on a busy
    # host it fails ("Unable to calibrate against PIT") and the boot hangs without them
    # cryptomgr.notests: the crypto API's boot self-tests (known-answer tests of every algorithm
    # registered, ~0.35 s under TCG) are a check of the implementations, not a protection; they still
    # run when the kernel is in FIPS mode (fips=1 ignores the option)
    return (f"console=ttyS0 reboot=t panic=-1 quiet loglevel=1 rdinit=/init pci=off "
            f"tsc_early_khz={_tsc_khz()} lpj=4000000 no_timer_check cryptomgr.notests")


def choose_accel(want: str) -> str:
    if want == "tcg":
        return "tcg"
    ok = kvm_usable()
    if want == "kvm" and not ok:
        raise TaxiwayError("KVM is not usable on this host (no /dev/kvm, or guests fail: nested virtualization)",
                           "use --vm-accel tcg (emulation, slower) or run on hardware with KVM")
    return "kvm" if ok else "tcg"


# -- disks ------------------------------------------------------------------------------------


def image_disk(snap: Snapshotter, chain: list[str]) -> Path:
    """The image's root as an ext4 file (made once per image, leased on its layers)."""
    disks = vm_dir() / "disks"
    disks.mkdir(exist_ok=True)
    key = chain_hex(chain[-1])
    path = disks / f"{key}.ext4"
    if path.exists():
        return path
    size = sum(du(snap.path(c)) for c in chain)
    mb = max(64, math.ceil(size * 1.3 / (1 << 20)) + 32)
    # mkfs.ext4 writes the file by name: atomic_path gives it a temp one, removed if this raises.
    # fsync: the disk is trusted by its name alone from now on (mkfs has flushed it already, so it is cheap).
    with atomic_path(path, 0o644) as tmp:
        if snap.overlay and len(chain) > 1:
            mnt = disks / f".mnt-{os.getpid()}"
            mnt.mkdir(exist_ok=True)
            lower = ":".join(str(snap.path(c)) for c in reversed(chain))
            script = (f"mount -t overlay overlay -o ro,lowerdir={shlex.quote(lower)} {shlex.quote(str(mnt))} && "
                      f"mkfs.ext4 -q -F -L root -d {shlex.quote(str(mnt))} {shlex.quote(str(tmp))} {mb}M")
            # unshare -m: the overlay lives in a throwaway mount namespace, never on the host
            r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True)
            with contextlib.suppress(OSError):
                mnt.rmdir()
        else:
            r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(snap.path(chain[-1])), str(tmp),
                                f"{mb}M"], capture_output=True)
        if r.returncode != 0:
            raise TaxiwayError(f"could not build the VM disk: {r.stderr.decode(errors='replace').strip()[:300]}",
                               "check that e2fsprogs (mkfs.ext4 with -d) is installed and the disk has room")
    snap.lease(f"vmdisk-{key}", chain)
    return path


def lease_owners() -> set[str]:
    d = vm_dir() / "disks"
    return {f"vmdisk-{p.stem}" for p in d.glob("*.ext4")} if d.exists() else set()


# -- create / run -----------------------------------------------------------------------------


def _has_nic(m: S.Machine) -> bool:
    return m.config.net != "none"


def _config_cpio(m: S.Machine) -> bytes:
    """This machine's part of the initramfs: hostname, workdir, eth0's address, volumes, /etc files."""
    p = m.process
    q = shlex.quote
    conf = f"TW_HOSTNAME={q(p['hostname'])}\nTW_WORKDIR={q(p['workdir'])}\n"
    if _has_nic(m):
        conf += f"TW_ADDR={GUEST_ADDR}/30\n"
    if m.config.net.startswith("/") and m.config.private_ip:
        conf += f"TW_ADDR6={q(m.config.private_ip)}/128\n"
    # nosuid,nodev in the guest too: a setuid file or device node in a host directory means nothing there
    vols = "".join(f"vol{i} {'ro' if v.readonly else 'rw'},nosuid,nodev {v.target}\n"
                   for i, v in enumerate(m.config.mounts))
    from taxiway.machines.namespace import etc_files

    etc = etc_files(p["hostname"], "private", m.config.dns)
    return cpio([("taxiway", 0o040755, b""), ("taxiway/config", 0o100644, conf.encode()),
                 ("taxiway/volumes", 0o100644, vols.encode())] +
                [(f"taxiway/{k}", 0o100644, v.encode()) for k, v in etc.items()])


def _netns_wrapper(m: S.Machine) -> list[str]:
    """QEMU runs in a network namespace of its own; with a NIC, a tap device there is the guest's only link.

    The netns holds nothing but lo and tap0 (HOST_ADDR), so the guest (GUEST_ADDR, no
    default route) can reach nothing outside it; ``-p`` forwarders enter it to connect.
    It disappears with QEMU.
    """
    # --ipc too: QEMU, once unprivileged, must not reach the host's System V shared memory
    if not _has_nic(m):
        return ["unshare", "--net", "--ipc", "--"]
    if m.config.net.startswith("/") and m.config.private_ip:
        return ["nsenter", f"--net={m.config.net}", "unshare", "--ipc", "--", "sh", "-c",
                _private_tap_script(m.config.private_ip), "sh"]
    script = (f"ip link set lo up && ip tuntap add dev tap0 mode tap && ip addr add {HOST_ADDR}/30 dev tap0 && "
              "ip link set tap0 up && exec \"$@\"")
    return ["unshare", "--net", "--ipc", "--", "sh", "-c", script, "sh"]


def _private_tap_script(addr: str) -> str:
    """The platform's private network for a micro-VM: QEMU runs in the machine's plugged netns, which
    routes between the fabric (eth0) and the guest (tap0), the guest holding the machine's address.

    The address moves from eth0 to the guest: eth0 answers the fabric's neighbour solicitations for
    it (proxy NDP) and the netns forwards to tap0, whose end is fe80::1 as the fabric's is for
    eth0. tap0 also keeps HOST_ADDR for the ``-p`` forwarders. A tap left by an earlier run goes first.
    """
    import ipaddress

    a = str(ipaddress.IPv6Address(addr))  # never shell text from elsewhere
    return ("ip link del tap0 2>/dev/null; ip tuntap add dev tap0 mode tap && ip link set tap0 addrgenmode none && "
            f"echo 0 > /proc/sys/net/ipv6/conf/tap0/accept_dad && ip addr add {HOST_ADDR}/30 dev tap0 && "
            "ip -6 addr add fe80::1/64 dev tap0 nodad && ip link set tap0 up && "
            f"{{ ip -6 addr del {a}/128 dev eth0 2>/dev/null; true; }} && "
            "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding && echo 1 > /proc/sys/net/ipv6/conf/eth0/proxy_ndp && "
            f"ip -6 neigh replace proxy {a} dev eth0 && ip -6 route replace {a}/128 dev tap0 && exec \"$@\"")


def vm_uid(m: S.Machine) -> int:
    """The unprivileged uid (and gid) QEMU runs as once its devices are open."""
    return VM_UID_BASE + int(m.id[:6], 16)


def _jail_args(m: S.Machine) -> list[str]:
    """QEMU's own confinement: its seccomp sandbox, then (after opening its files) a uid of its own in an empty chroot."""
    empty = vm_dir() / "empty"
    empty.mkdir(mode=0o555, exist_ok=True)
    if any(empty.iterdir()):
        raise TaxiwayError(f"{empty} is not empty (QEMU is chrooted there)", f"remove what is in {empty}")
    uid = vm_uid(m)
    return ["-sandbox", SANDBOX, "-runas", f"{uid}:{uid}", "-chroot", str(empty)]


def volume_paths(cfg: MachineConfig) -> list[str]:
    """Each volume's host directory as resolved now (symlinks followed once, when the machine is created)."""
    return [os.path.realpath(v.source) for v in cfg.mounts]


def _check_volume(source: str, resolved: str) -> None:
    """Refuse a start where ``source`` no longer leads to ``resolved``, where it led when the machine was created.

    A path component replaced by a symlink (by a host user, or by the guest through another volume)
    must not make the host share what the user never named; tw-vmjail then opens ``resolved``
    without following any symlink, so a swap after this check is refused too.
    """
    now = os.path.realpath(source)
    if now != resolved:
        raise InvalidInput(f"host path {source} for -v now leads to {now}, not to {resolved} as when the machine "
                           "was created", "recreate the machine (machines rm, then run) if that directory is meant")


def _start_virtiofsd(m: S.Machine) -> list[subprocess.Popen]:
    """One virtiofsd per volume (a child of the supervisor); :ro volumes are exported from a read-only bind."""
    from taxiway.machines import vmagent

    d = m.dir
    procs: list[subprocess.Popen] = []
    try:
        for i, v in enumerate(m.config.mounts):
            if not os.path.isdir(v.source):
                raise InvalidInput(f"host path {v.source} for -v does not exist", f"create it first (mkdir -p {v.source})")
            resolved = (m.process.get("volumes") or volume_paths(m.config))[i]
            _check_volume(v.source, resolved)
            sock, mnt = f"fs{i}.sock", f"vol{i}"
            with contextlib.suppress(FileNotFoundError):
                (d / sock).unlink()
            (d / mnt).mkdir(mode=0o700, exist_ok=True)
            keep = f"{sum(1 << n for _, n in FSD_CAPS):x}"
            # virtiofsd serves vol<i>: in its own mount namespace, a nosuid,nodev (and for :ro,
            # read-only) bind of the directory, opened without following symlinks (see vmjail.c)
            # (virtiofsd needs an absolute source, its options split on commas: \, escapes one)
            at = str(d / mnt)
            # the listening socket is made here and handed over (--fd): with --socket-path virtiofsd
            # locks /run/virtiofsd/<path>.pid, shared by every machine's relative fs0.sock (and left behind)
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dfd = vmagent.DirFd(d)
            try:
                lsock.bind(dfd.path(sock))
                lsock.listen(1)
            finally:
                dfd.close()
            fsd = [str(vmagent.jail_binary()), keep, "--bind", resolved, at, *(["--ro"] if v.readonly else []), "--",
                   VIRTIOFSD, f"--fd={lsock.fileno()}", "-o", "source=" + at.replace("\\", "\\\\").replace(",", "\\,"),
                   "-o", "cache=none", "-o", "sandbox=namespace", "-o", "no_posix_lock", "-o", "no_flock",
                   "-o", "no_xattr", "-o", "modcaps=-mknod:-fsetid:-setfcap"]
            log = open(d / f"virtiofsd{i}.log", "wb")
            try:
                proc = subprocess.Popen(fsd, cwd=d, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, pass_fds=(lsock.fileno(),))
            finally:
                log.close()
                lsock.close()
            procs.append(proc)
            with open(d / "virtiofsd.pids", "a") as f:
                f.write(f"{proc.pid}\n")
            # ready once it says it waits for QEMU (tw-vmjail's refusals come before, and it exits)
            deadline = time.monotonic() + 10
            while (not (d / f"virtiofsd{i}.log").stat().st_size and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.005)
            if proc.poll() is not None:
                err = (d / f"virtiofsd{i}.log").read_text(errors="replace").strip().splitlines()
                raise TaxiwayError(f"virtiofsd for volume {v.source} did not start: {(err or ['no output'])[-1][:200]}",
                                   "check the host directory and that qemu-system-common is installed")
    except BaseException:
        _stop_procs(procs)
        raise
    return procs


def _stop_procs(procs: list[subprocess.Popen], grace: float = 2.0) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _Console:
    """The serial console: kernel noise and the init's fallback exit mark (kept in ``console``)."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        self.out_fd = proc.stdout.fileno()  # type: ignore[union-attr]
        self.err_fd = proc.stderr.fileno()  # type: ignore[union-attr]
        self.f = open(path, "ab", buffering=0)
        self.room = CONSOLE_MAX
        self.buf = b""
        self.errbuf = b""
        self.code: int | None = None
        self.error: str | None = None

    def _keep(self, data: bytes) -> None:
        if self.room > 0:
            self.f.write(data[:self.room])
            self.room -= len(data)
            if self.room <= 0:
                self.f.write(b"\n[taxiway: console output beyond this point discarded]\n")

    def feed(self, kind: str, data: bytes) -> None:
        from taxiway.machines.vmagent import guest_text

        if kind == "qemu-err":
            self.errbuf = (self.errbuf + data)[-4000:]
            self._keep(data)
            return
        self._keep(data)
        self.buf += data.replace(b"\r\n", b"\n").replace(b"\r", b"")
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.startswith(EXIT_MARK):
                parts = line.split()
                with contextlib.suppress(ValueError, IndexError):
                    code = int(parts[1])
                    self.code = code if 0 <= code <= 255 else 255
                if len(parts) > 2:
                    self.error = guest_text(b" ".join(parts[2:]))
        self.buf = self.buf[-4096:]  # only a line's start matters (the exit mark); no newline is no growth

    def close(self) -> None:
        self.f.close()


class VMRuntime:
    """A machine as a QEMU micro-VM (implements :class:`taxiway.machines.interface.Runtime`)."""

    kind = "vm"

    def __init__(self, m: S.Machine):
        self.m = m
        self.attached = False
        self._reset()

    def _reset(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.hub: Any = None
        self.fsd: list[subprocess.Popen] = []
        self.forwarders: Any = None
        self.boot_timer: Any = None
        self.started = False
        self.timed_out = False
        self.boot_limit = float(os.environ.get("TAXIWAY_VM_BOOT_TIMEOUT", "120"))

    # -- create

    @classmethod
    def check(cls, cfg: MachineConfig) -> dict[str, Any]:
        for mnt in cfg.mounts:
            if not os.path.exists(mnt.source):
                raise InvalidInput(f"host path {mnt.source} for -v does not exist",
                                   f"create it first (mkdir -p {mnt.source})")
            if not os.path.isdir(mnt.source):
                raise InvalidInput(f"host path {mnt.source} for -v is not a directory",
                                   "micro-VMs share directories (virtiofs): mount the directory that holds it")
            if not os.path.exists(VIRTIOFSD):
                raise TaxiwayError(f"{VIRTIOFSD} is missing: -v for micro-VMs needs it", "install qemu-system-common")
        mem = cfg.guest.memory or DEFAULT_VM_MEMORY
        if mem < MIN_VM_MEMORY:
            raise InvalidInput(f"memory {mem >> 20}m is too small for a micro-VM", "use --memory 128m or more")
        kernel()
        _qemu()
        return {"accel": choose_accel(cfg.vm_accel)}

    def prepare(self, snap: Snapshotter) -> None:
        m = self.m
        base = image_disk(snap, m.chain)
        base_initramfs()
        m.process["volumes"] = volume_paths(m.config)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                            str(m.dir / "disk.qcow2")], capture_output=True)
        if r.returncode != 0:
            raise TaxiwayError(f"qemu-img failed: {r.stderr.decode(errors='replace').strip()}", "check qemu-utils")

    # -- one run (in the supervisor)

    def start(self, attached: bool, on_started: Callable[[], None]) -> None:
        """Boot the VM: virtiofsd per volume, QEMU in its own netns, the agent connected, the main process asked for."""
        from taxiway.machines import vmagent

        self._reset()
        self.attached = attached
        m = self.m
        kpath, _ = kernel()
        d = m.dir
        cfg = m.config
        if cfg.ports:  # first: a busy host port fails the start before anything exists
            from taxiway.machines.ports import Forwarders, listen

            self.forwarders = Forwarders([(listen(p.host_port), p.port) for p in cfg.ports])
        try:
            self.fsd = _start_virtiofsd(m)
            initrd = d / "initrd"
            with open(initrd, "wb") as f:
                with open(base_initramfs(), "rb") as b:
                    shutil.copyfileobj(b, f)
                f.write(_config_cpio(m))
            mem = cfg.guest.memory or DEFAULT_VM_MEMORY
            cpus = max(1, math.ceil(cfg.guest.cpus or 1))
            argv = [*_netns_wrapper(m), _qemu(), *_machine_args(m.accel or "tcg", mem, cpus, bool(cfg.mounts)),
                    *_jail_args(m),
                    "-kernel", str(kpath), "-initrd", str(initrd), "-append", _cmdline(),
                    "-drive", f"id=root,file={d / 'disk.qcow2'},format=qcow2,if=none,cache=unsafe",
                    "-device", "virtio-blk-device,drive=root",
                    "-device", "virtio-serial-device",
                    "-chardev", "socket,id=agent,path=agent.sock,server=on,wait=on",
                    "-device", "virtserialport,chardev=agent,name=taxiway.agent"]
            if _has_nic(m):
                argv += ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                         "-device", "virtio-net-device,netdev=n0"]
            for i in range(len(cfg.mounts)):
                argv += ["-chardev", f"socket,id=fs{i},path=fs{i}.sock",
                         "-device", f"vhost-user-fs-device,chardev=fs{i},tag=vol{i}"]
            hub = self.hub = vmagent.Hub(m, attached, None)
            t0 = time.monotonic()

            def entrypoint(at: float) -> None:
                boot_ms = int((at - t0) * 1000)
                m.event("entrypoint", boot_ms=boot_ms, accel=m.accel)
                with contextlib.suppress(OSError):
                    (d / "boot_ms").write_text(str(boot_ms))
                # `run -d` returns now, as it does for a namespace machine once its process runs
                self.started = True
                on_started()

            hub.on_main_started = entrypoint
            # relative socket paths (cwd = the machine dir): unix socket paths are limited to 108 bytes
            # stdin: QEMU's serial console reads it (-serial stdio); never a /dev/null that is a file
            stdin = null_input()
            try:
                proc = self.proc = subprocess.Popen(argv, cwd=d, stdin=stdin, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, start_new_session=True)
            finally:
                os.close(stdin)
            m.pid = proc.pid
            m.started = time.time()
            m.exit_code = m.reason = m.signal = m.error = None
            m.set_state("running", pid=proc.pid, accel=m.accel)
            hub.connect_agent(proc)
            tty = cfg.tty and attached
            hub.open_main(tty, cfg.interactive and attached)
            if self.forwarders and hub.agent is not None:
                self.forwarders.start(proc.pid, GUEST_ADDR)

            def no_boot() -> None:  # a guest that never reaches its entrypoint (a hung boot) is stopped
                if not self.started and proc.poll() is None and not hub.main_error:
                    self.timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)

            import threading

            self.boot_timer = threading.Timer(self.boot_limit, no_boot)
            self.boot_timer.daemon = True
            self.boot_timer.start()
        except BaseException:
            self._teardown()
            raise

    def _teardown(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self.hub is not None:
            self.hub.close()
        if self.forwarders:
            self.forwarders.close()
        _stop_procs(self.fsd)
        with contextlib.suppress(FileNotFoundError):
            (self.m.dir / "virtiofsd.pids").unlink()
        if self.boot_timer is not None:
            self.boot_timer.cancel()

    def wait(self) -> Exit:
        """Serve the agent (log, terminal, exec clients) until QEMU exits; how the main process ended."""
        m = self.m
        proc, hub = self.proc, self.hub
        assert proc is not None and hub is not None, "wait() before start()"
        tty = m.config.tty and self.attached
        try:
            pump = LogPump(m.dir / "log")
            hub.pump = pump
            console = _Console(proc, m.dir / "console")
            asked = [0]

            def forward(signum: int, _f: Any) -> None:
                # to the main process through the agent; a third interrupt gives up on the guest
                if signum != signal.SIGWINCH:
                    asked[0] += 1
                    if asked[0] >= 3:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGKILL)
                hub.signal_main(signum)

            try:
                with handling(forward, (*FORWARDED, *((signal.SIGWINCH,) if tty else ()))) if self.attached \
                        else contextlib.nullcontext(), raw_terminal(0, tty):
                    hub.run(console)
                    try:
                        rc = proc.wait(5)
                    except subprocess.TimeoutExpired:  # the main process is over but the guest does not power off
                        proc.kill()
                        rc = proc.wait()
            finally:
                pump.close()
                console.close()
        finally:
            self._teardown()
        return self._outcome(rc, console)

    def _outcome(self, rc: int, console: _Console) -> Exit:
        m, hub = self.m, self.hub
        if self.timed_out:
            raise TaxiwayError(f"micro-VM {m.name} did not reach its entrypoint within {self.boot_limit:g}s",
                               "raise TAXIWAY_VM_BOOT_TIMEOUT (seconds) on a slow host; the kernel's messages are "
                               "in the machine's console file (`machines inspect`, kept without --rm)")
        if hub.main_error and not self.started:  # it never ran: a start failure, reported as one (run -d too)
            raise TaxiwayError(f"machine {m.name} could not start: {hub.main_error}",
                               "check the image, the command and the options")
        if hub.main_error:
            m.error = hub.main_error
        elif console.error:
            m.error = console.error
        if hub.main_exit is not None:
            code, sig = hub.main_exit
            if sig:
                return 128 + sig, "signalled", sig
            if code > 128 and code - 128 < 65:
                return code, "signalled", code - 128
            return code, "exited", None
        if console.code is not None:
            if console.code > 128:
                return console.code, "signalled", console.code - 128
            return console.code, "exited", None
        if b"KVM internal error" in console.errbuf:
            raise TaxiwayError("the KVM guest failed (KVM internal error)", "use --vm-accel tcg")
        if rc > 0 and not m.stop_requested():  # QEMU itself gave up (a signal makes rc negative)
            err = console.errbuf.decode(errors="replace").strip().splitlines()
            raise TaxiwayError(f"QEMU failed: {(err or ['exit status ' + str(rc)])[-1][:300]}",
                               "check the machine's options (and `taxiway machines inspect`)")
        if rc < 0:
            return 128 - rc, "signalled", -rc
        return 128 + 15, "signalled", 15

    # -- from any process

    def signal(self, sig: int) -> bool:
        """Through the supervisor's hub and the guest agent to the main process."""
        from taxiway.machines import vmagent

        return vmagent.signal_main(self.m, sig)

    def stop(self, sig: int, timeout: float) -> None:
        # the guest agent delivers the signal to the main process; the guest powers off when it
        # exits. Without an agent to talk to, SIGTERM makes QEMU stop the guest at once.
        pid = self.m.pid
        if not pid:
            return
        if not self.signal(sig):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        kill_after(pid, timeout)

    def exec(self, argv: list[str], tty: bool, interactive: bool) -> int:
        from taxiway.machines import vmagent

        return vmagent.exec_client(self.m, argv, tty, interactive)

    def events(self) -> list[dict[str, Any]]:
        return self.m.events()

    def cleanup(self) -> str | None:
        """Kill what a dead supervisor may have left: QEMU (own session) and virtiofsd processes."""
        m = self.m
        if m.pid and pid_alive(m.pid) and _ours(m.pid, m):
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            for line in (m.dir / "virtiofsd.pids").read_text().split():
                pid = int(line)
                if pid_alive(pid) and _ours(pid, m):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
        return None


def _ours(pid: int, m: S.Machine) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return m.id in cwd or m.id.encode() in cmd
