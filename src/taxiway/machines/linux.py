"""The Linux system calls the runtime needs that Python 3.11's ``os`` lacks.

mount(2), umount2(2), pivot_root(2), unshare(2), setns(2), capset(2) and
prctl(2) through ctypes. Each raises OSError with errno on failure, like ``os``.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# unshare/clone flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
PR_SET_KEEPCAPS = 8
SECCOMP_MODE_FILTER = 2
CLOSE_RANGE_CLOEXEC = 1 << 2
KEYCTL_JOIN_SESSION_KEYRING = 1

SYS_pivot_root = 155  # x86_64
SYS_capset = 126
SYS_keyctl = 250
SYS_close_range = 436
SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount = 429, 430, 431, 432  # the same on every arch

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _b(s: str | bytes | None) -> bytes | None:
    return s.encode() if isinstance(s, str) else s


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2)."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2)."""
    _check(_libc.setns(fd, nstype), "setns")


def mount_detached(fstype: str, source: str) -> int:
    """A new mount of ``source``, in no namespace yet (fsopen, fsconfig, fsmount): its fd.

    Made by the caller (outside any machine's device policy), placed later with :func:`move_mount`;
    closing the fd before that unmounts it."""
    fs = _libc.syscall(SYS_fsopen, _b(fstype), ctypes.c_uint(1))  # FSOPEN_CLOEXEC
    if fs < 0:
        _check(-1, f"fsopen {fstype}")
    try:
        _check(_libc.syscall(SYS_fsconfig, ctypes.c_int(fs), ctypes.c_uint(1), b"source", _b(source),
                             ctypes.c_int(0)), f"mount {source}")  # FSCONFIG_SET_STRING
        _check(_libc.syscall(SYS_fsconfig, ctypes.c_int(fs), ctypes.c_uint(6), None, None, ctypes.c_int(0)),
               f"mount {source}")  # FSCONFIG_CMD_CREATE
        mfd = _libc.syscall(SYS_fsmount, ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_uint(0))  # FSMOUNT_CLOEXEC
        if mfd < 0:
            _check(-1, f"fsmount {source}")
        return mfd
    finally:
        os.close(fs)


def move_mount(mount_fd: int, target: str) -> None:
    """move_mount(2) of a detached mount onto ``target``."""
    _check(_libc.syscall(SYS_move_mount, ctypes.c_int(mount_fd), b"", ctypes.c_int(-100), _b(target),
                         ctypes.c_uint(4)), f"mount {target}")  # AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH


def attach_loop(path: str, exclusive: bool = False) -> tuple[int, str]:
    """A loop device over ``path`` that clears itself once nothing uses it (LO_FLAGS_AUTOCLEAR):
    (an open fd of it, its path). Mount it, then close the fd: it lives as long as the mount.

    The kernel clears released devices lazily, so a "free" one may still be busy: take the next.
    ``exclusive``: flock the file first (BlockingIOError if it is held). The lock belongs to the
    open file the loop device keeps, so it is held exactly as long as the device is attached:
    two mounts of one ext4 file (which would corrupt it) are refused, and a dead machine frees it."""
    import errno
    import fcntl
    import struct

    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if exclusive:
            fcntl.flock(backing, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for _ in range(200):
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                n = fcntl.ioctl(ctl, 0x4C82)  # LOOP_CTL_GET_FREE
            finally:
                os.close(ctl)
            dev = f"/dev/loop{n}"
            try:
                lo = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:  # devtmpfs has not made the node yet
                continue
            cfg = bytearray(304)  # struct loop_config: fd, block_size, loop_info64 (lo_flags at 52), reserved
            struct.pack_into("=II", cfg, 0, backing, 0)
            struct.pack_into("=I", cfg, 8 + 52, 4)  # LO_FLAGS_AUTOCLEAR
            try:
                fcntl.ioctl(lo, 0x4C0A, bytes(cfg))  # LOOP_CONFIGURE
            except OSError as e:
                os.close(lo)
                if e.errno != errno.EBUSY:
                    raise
                continue
            return lo, dev
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(backing)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    _check(_libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)), "pivot_root")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> None:
    """prctl(2)."""
    rc = _libc.prctl(option, a2, a3, a4, a5)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl {option}: {os.strerror(e)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAPS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}

# Docker's (moby's) default capability set.
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
# A machine's default set: Docker's without CAP_MKNOD (``--cap-add MKNOD`` gives it back).
MACHINE_CAPS = tuple(c for c in DEFAULT_CAPS if c != "CAP_MKNOD")


def machine_caps(add: list[str] | tuple[str, ...] = (), drop: list[str] | tuple[str, ...] = ()) -> list[str]:
    """MACHINE_CAPS with ``--cap-add``/``--cap-drop`` applied (names with or without CAP_, or ALL)."""
    from taxiway.errors import InvalidInput

    def norm(names: list[str] | tuple[str, ...]) -> set[str]:
        out = set()
        for n in names:
            c = n.upper() if n.upper().startswith("CAP_") else "CAP_" + n.upper()
            if c == "CAP_ALL":
                out |= set(CAPS)
            elif c not in CAPS:
                raise InvalidInput(f"unknown capability {n!r}", "use a name such as NET_ADMIN or SYS_PTRACE (see capabilities(7))")
            else:
                out.add(c)
        return out

    caps = (set(MACHINE_CAPS) - norm(drop)) | norm(add)
    return sorted(caps, key=CAPS.__getitem__)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_bounding(keep: tuple[str, ...] = DEFAULT_CAPS) -> None:
    """Reduce the bounding set to ``keep`` (needs CAP_SETPCAP: call it while still privileged)."""
    want = {CAPS[c] for c in keep}
    for cap in range(last_cap() + 1):
        if cap not in want:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                pass


def set_caps(keep: tuple[str, ...] | list[str]) -> None:
    """Set effective, permitted and inheritable to exactly ``keep`` (capset)."""
    mask = 0
    for c in keep:
        mask |= 1 << CAPS[c]
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = part
    _check(_libc.syscall(SYS_capset, ctypes.byref(hdr), ctypes.byref(data)), "capset")


def drop_capabilities(keep: tuple[str, ...] = DEFAULT_CAPS) -> None:
    """Reduce the bounding set, then effective/permitted/inheritable, to ``keep``."""
    drop_bounding(keep)
    set_caps(keep)


def become(uid: int, gid: int, groups: list[int], keep: tuple[str, ...] | list[str]) -> None:
    """Switch to ``uid``/``gid``/``groups`` with capabilities ``keep``, as runc and Docker do.

    The bounding set is cut first (that needs CAP_SETPCAP), the ids change with
    PR_SET_KEEPCAPS (so even ``--cap-drop ALL`` can still switch user), then the
    capability sets are set: ``keep`` for root, none for any other user (Docker's
    rule: a non-root user gets no capability unless it gains one by exec, which
    no_new_privs forbids).
    """
    drop_bounding(tuple(keep))
    prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    set_caps(keep if uid == 0 else ())


def cloexec_from(low: int = 3) -> None:
    """Mark every fd >= ``low`` close-on-exec (close_range(2)), so exec leaks none of ours into a machine."""
    if _libc.syscall(SYS_close_range, ctypes.c_uint(low), ctypes.c_uint(0xFFFFFFFF), CLOSE_RANGE_CLOEXEC) == 0:
        return
    for name in os.listdir("/proc/self/fd"):  # kernels before 5.11: one fd at a time
        fd = int(name)
        if fd >= low:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


def join_session_keyring() -> None:
    """Join a new anonymous session keyring (as runc does): no key of the caller's session is reachable."""
    rc = _libc.syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, ctypes.c_void_p(0))
    if rc < 0:
        e = ctypes.get_errno()
        if e != 38:  # ENOSYS: a kernel without keys has nothing to leak
            raise OSError(e, f"keyctl join session keyring: {os.strerror(e)}")


def sethostname(name: str) -> None:
    """sethostname(2) (in the machine's own UTS namespace)."""
    b = name.encode()
    _check(_libc.sethostname(b, len(b)), "sethostname")


def set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS, 1): exec can never gain privileges (setuid bits, file caps)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace (SIOCSIFFLAGS), with libc only.

    It runs after pivot_root, where Python can no longer import modules.
    """
    fd = _libc.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    if fd < 0:
        _check(-1, "socket")
    try:
        ifr = ctypes.create_string_buffer(40)
        ifr.raw = b"lo".ljust(16, b"\0") + (0x1 | 0x8 | 0x40).to_bytes(2, "little") + bytes(22)
        _check(_libc.ioctl(fd, 0x8914, ifr), "SIOCSIFFLAGS lo")  # IFF_UP|IFF_LOOPBACK|IFF_RUNNING
    finally:
        os.close(fd)
