"""The micro-VM runtime: the same image, booted by QEMU's ``microvm`` machine.

* Once per image, its merged root becomes an ext4 image (``mkfs.ext4 -d`` on
  a read-only overlay of the snapshot's layers, mounted in a private mount
  namespace), kept under ``$TAXIWAY_HOME/vm/disks`` with a lease on its layers.
* Per machine, a qcow2 file backed by that image is its copy-on-write disk
  (the analog of an LVM thin snapshot).
* The kernel is Debian's cloud kernel; the initramfs (built once per kernel)
  carries static busybox, the virtio modules it must load before mounting the
  root disk, and an init script. The host appends a tiny second cpio archive
  with this machine's config (the kernel unpacks concatenated archives).
* The init mounts the disk, the API filesystems and /etc files, runs the
  entrypoint as the image's user (busybox ``nsenter -r -w -S -G``), prints
  its exit code on the serial console and powers off. The console is the
  machine's log; the exit code is parsed from it.
* KVM is probed once with a tiny guest; where it does not work (nested
  virtualization, as on these hosts) the VM runs under TCG and says so.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.machines import config as C
from taxiway.machines import state as S
from taxiway.machines.config import MachineConfig
from taxiway.machines.snapshots import Snapshotter, _hex, du

QEMU = "qemu-system-x86_64"
EXIT_MARK = b"@@TAXIWAY-EXIT@@"
START_MARK = b"@@TAXIWAY-START@@"
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk")
MIN_VM_MEMORY = 128 * 1024 * 1024
DEFAULT_VM_MEMORY = 256 * 1024 * 1024

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/null
for m in $(cat /lib/modules/load); do insmod /lib/modules/$m.ko 2>/dev/null; done
if [ ! -f /taxiway/config ]; then echo "@@TAXIWAY-EXIT@@ 0"; poweroff -f; fi
. /taxiway/config
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot 2>/dev/null; then
  echo "@@TAXIWAY-EXIT@@ 125 cannot mount the root disk"; poweroff -f
fi
hostname "$TW_HOSTNAME"
ip link set lo up 2>/dev/null
for d in proc sys dev etc tmp; do [ -d /newroot/$d ] || mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc
mount -t sysfs -o ro sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
for f in hosts resolv.conf hostname; do rm -f /newroot/etc/$f; cp /taxiway/$f /newroot/etc/$f; done
mkdir -p "/newroot$TW_WORKDIR"
echo "@@TAXIWAY-START@@"
tw_run
code=$?
cd /
echo "@@TAXIWAY-EXIT@@ $code"
sync
umount -l /newroot 2>/dev/null
poweroff -f
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


def _vm_dir() -> Path:
    from taxiway.paths import home

    d = home() / "vm"
    d.mkdir(exist_ok=True)
    return d


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


def _modules(ver: str) -> list[tuple[str, bytes]]:
    """The virtio modules (with their dependencies, in load order) as (name, bytes)."""
    base = Path("/lib/modules") / ver
    dep = {}
    for line in (base / "modules.dep").read_text().splitlines():
        k, _, v = line.partition(":")
        dep[k] = v.split()
    by_name = {Path(k).name.split(".ko")[0].replace("-", "_"): k for k in dep}
    order: list[str] = []

    def add(path: str) -> None:
        for d in reversed(dep.get(path, [])):
            add(d)
        if path not in order:
            order.append(path)

    for m in MODULES:
        if m in by_name:
            add(by_name[m])
    out = []
    for p in order:
        data = (base / p).read_bytes()
        if p.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif p.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        out.append((Path(p).name.split(".ko")[0], data))
    return out


def base_initramfs() -> Path:
    """The shared initramfs for this kernel: busybox, virtio modules, init (built once)."""
    _, ver = kernel()
    p = _vm_dir() / f"initramfs-{ver}.cpio"
    if p.exists():
        return p
    mods = _modules(ver)
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""), ("lib", 0o040755, b""), ("lib/modules", 0o040755, b""), ("taxiway", 0o040755, b""),
        ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("lib/modules/load", 0o100644, "".join(n + "\n" for n, _ in mods).encode()),
    ] + [(f"lib/modules/{n}.ko", 0o100644, d) for n, d in mods]
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cpio(entries))
    os.replace(tmp, p)
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
    cache = Path(os.environ.get("TAXIWAY_KVM_CACHE") or _vm_dir() / "kvm-probe.json")
    with contextlib.suppress(OSError, ValueError):
        c = json.loads(cache.read_text())
        if c.get("kernel") == ver:
            return bool(c["kvm"])
    ok = False
    try:
        r = subprocess.run([_qemu(), *_machine_args("kvm", 128 << 20, 1), "-kernel", str(kpath),
                            "-initrd", str(base_initramfs()), "-append", _cmdline()],
                           capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        ok = EXIT_MARK in r.stdout and r.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"kernel": ver, "kvm": ok, "probed": time.time()}))
    return ok


def _machine_args(accel: str, memory: int, cpus: int) -> list[str]:
    args = ["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-m", f"{memory >> 20}M", "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
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
    return (f"console=ttyS0 reboot=t panic=-1 quiet loglevel=1 rdinit=/init pci=off "
            f"tsc_early_khz={_tsc_khz()} lpj=4000000 no_timer_check")


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
    disks = _vm_dir() / "disks"
    disks.mkdir(exist_ok=True)
    key = _hex(chain[-1])
    path = disks / f"{key}.ext4"
    if path.exists():
        return path
    size = sum(du(snap.path(c)) for c in chain)
    mb = max(64, math.ceil(size * 1.3 / (1 << 20)) + 32)
    tmp = disks / f".{key}.{os.getpid()}.tmp"
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
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(snap.path(chain[-1])), str(tmp), f"{mb}M"],
                           capture_output=True)
    if r.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise TaxiwayError(f"could not build the VM disk: {r.stderr.decode(errors='replace').strip()[:300]}",
                           "check that e2fsprogs (mkfs.ext4 with -d) is installed and the disk has room")
    os.replace(tmp, path)
    snap.lease(f"vmdisk-{key}", chain)
    return path


def lease_owners() -> set[str]:
    d = _vm_dir() / "disks"
    return {f"vmdisk-{p.stem}" for p in d.glob("*.ext4")} if d.exists() else set()


# -- create / run -----------------------------------------------------------------------------


def create(cfg: MachineConfig, name: str | None, progress: Any = None) -> S.Machine:
    """Validate and prepare a micro-VM machine: image disk, qcow2 overlay, config initrd."""
    from taxiway.machines import runtime

    if cfg.ports:
        raise InvalidInput("-p is not supported with --isolation vm yet", "VMs have no network; drop -p")
    if cfg.mounts:
        raise InvalidInput("-v is not supported with --isolation vm yet", "VMs see only their own disk; drop -v")
    if cfg.interactive or cfg.tty:
        raise InvalidInput("-i/-t are not supported with --isolation vm yet", "drop -i/-t")
    mem = cfg.guest.memory or DEFAULT_VM_MEMORY
    if mem < MIN_VM_MEMORY:
        raise InvalidInput(f"memory {mem >> 20}m is too small for a micro-VM", "use --memory 128m or more")
    kernel()
    _qemu()
    accel = choose_accel(cfg.vm_accel)
    image = runtime.get_image(cfg.image, progress)
    icfg = image.config()
    argv = C.command(icfg, cfg.cmd, cfg.entrypoint)
    snap = Snapshotter()
    snap.cleanup()
    chain = snap.prepare(image)
    ic = icfg.get("config") or {}
    user = cfg.user if cfg.user is not None else (ic.get("User") or None)
    uid, gid, groups, home = C.resolve_user(user, runtime._read_layer_file(snap, chain, "etc/passwd"),
                                            runtime._read_layer_file(snap, chain, "etc/group"), cfg.image)
    base = image_disk(snap, chain)
    base_initramfs()
    mid = S.new_id()
    name = name or S.new_name()
    hostname = cfg.hostname or mid[:12]
    if cfg.stop_signal is None and ic.get("StopSignal"):
        cfg.stop_signal = ic["StopSignal"]
    env = C.environment(icfg, cfg.env, hostname, home)
    m = S.Machine(id=mid, name=name, config=cfg, image_digest=image.digest(), chain=chain, command=argv,
                  process={"argv": argv, "env": env, "uid": uid, "gid": gid, "groups": groups,
                           "workdir": cfg.workdir or ic.get("WorkingDir") or "/", "hostname": hostname},
                  runtime="vm", accel=accel)
    d = m.dir
    d.mkdir()
    try:
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(d / "disk.qcow2")],
                           capture_output=True)
        if r.returncode != 0:
            raise TaxiwayError(f"qemu-img failed: {r.stderr.decode(errors='replace').strip()}", "check qemu-utils")
        m.save()
        m.event("created", image=cfg.image, accel=accel)
    except BaseException:
        S.remove_dir(d)
        raise
    return m


def _config_cpio(m: S.Machine) -> bytes:
    p = m.process
    q = shlex.quote
    # nsenter -r keeps the working directory when it lies inside the new root
    run = (f"tw_run() {{\n  cd {q('/newroot' + p['workdir'])} || return 126\n  env -i " +
           " ".join(q(e) for e in p["env"]) +
           f" nsenter -r/newroot -S {int(p['uid'])} -G {int(p['gid'])} -F " +
           " ".join(q(a) for a in p["argv"]) + "\n}\n")
    conf = f"TW_HOSTNAME={q(p['hostname'])}\nTW_WORKDIR={q(p['workdir'])}\n" + run
    from taxiway.machines.namespace import etc_files

    etc = etc_files(p["hostname"], "private")
    return cpio([("taxiway", 0o040755, b""), ("taxiway/config", 0o100644, conf.encode())] +
                [(f"taxiway/{k}", 0o100644, v.encode()) for k, v in etc.items()])


def run_once(m: S.Machine, attached: bool, on_started: Any) -> tuple[int, str, int | None]:
    """Boot the VM once and wait for it; returns (exit code, reason, signal)."""
    kpath, _ = kernel()
    d = m.dir
    initrd = d / "initrd"
    with open(initrd, "wb") as f:
        with open(base_initramfs(), "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(_config_cpio(m))
    mem = m.config.guest.memory or DEFAULT_VM_MEMORY
    cpus = max(1, math.ceil(m.config.guest.cpus or 1))
    argv = [_qemu(), *_machine_args(m.accel or "tcg", mem, cpus), "-kernel", str(kpath), "-initrd", str(initrd),
            "-append", _cmdline(),
            "-drive", f"id=root,file={d / 'disk.qcow2'},format=qcow2,if=none,cache=unsafe",
            "-device", "virtio-blk-device,drive=root"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    m.pid = proc.pid
    m.started = time.time()
    m.exit_code = m.reason = m.signal = m.error = None
    m.set_state("running", pid=proc.pid, accel=m.accel)
    on_started(m)
    from taxiway.machines.runtime import _LogPump

    pump = _LogPump(d / "log")
    old = {}
    if attached:
        def forward(signum: int, _f: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, forward)
    code: int | None = None
    started = False
    boot_ms = None
    buf = b""
    errbuf = b""
    fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}  # type: ignore[union-attr]
    try:
        while fds:
            ready, _, _ = select.select(list(fds), [], [])
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    fds.pop(fd)
                    continue
                if fds[fd] == "err":
                    errbuf = (errbuf + data)[-4000:]
                    continue
                buf += data.replace(b"\r\n", b"\n").replace(b"\r", b"")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(START_MARK):
                        started = True
                        boot_ms = int((time.monotonic() - t0) * 1000)
                        m.event("entrypoint", boot_ms=boot_ms, accel=m.accel)
                        continue
                    if line.startswith(EXIT_MARK):
                        started = False  # what follows is shutdown noise
                        parts = line.split()
                        with contextlib.suppress(ValueError, IndexError):
                            code = int(parts[1])
                        if len(parts) > 2:
                            m.error = b" ".join(parts[2:]).decode(errors="replace")
                        continue
                    if not started:
                        continue  # boot noise
                    pump.write("stdout", line + b"\n")
                    if attached:
                        with contextlib.suppress(OSError):
                            os.write(1, line + b"\n")
        rc = proc.wait()
    finally:
        pump.close()
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if boot_ms is not None:
        with contextlib.suppress(OSError):
            (d / "boot_ms").write_text(str(boot_ms))
    if code is not None:
        if code > 128:
            return code, "signalled", code - 128
        return code, "exited", None
    if rc < 0:
        return 128 - rc, "signalled", -rc
    if b"KVM internal error" in errbuf or b"KVM" in errbuf:
        raise TaxiwayError("the KVM guest failed (KVM internal error)", "use --vm-accel tcg")
    return 128 + 15, "signalled", 15


def cleanup(m: S.Machine) -> None:
    """Nothing outside the machine dir: QEMU runs in its own session and dies with the machine."""
    if m.pid and S._alive(m.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
