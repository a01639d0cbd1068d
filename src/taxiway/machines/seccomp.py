"""Seccomp for namespace machines: Docker's default profile, custom profiles, and loading a filter.

Profiles use Docker's JSON format (``defaultAction``, ``archMap``, ``syscalls`` with
``names``, ``action``, ``errnoRet``, ``args``, ``includes``/``excludes`` on caps,
arches and minKernel), so a profile written for ``docker run --security-opt
seccomp=FILE`` works with taxiway unchanged. :data:`DEFAULT` makes the same
decisions as moby's ``profiles/seccomp/default.json`` (the data, mirrored), with
io_uring left out as Docker 25 and later do.

The supervisor compiles a profile to classic BPF with libseccomp (the system's
``libseccomp.so.2``, through its public C API) and caches the result under
``$TAXIWAY_HOME/machines/.seccomp``; the machine's PID 1 (and ``machines exec``)
only hands those bytes to the kernel right before exec, which needs no import.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.fsutil import atomic_write
from taxiway.machines import linux as L

if TYPE_CHECKING:
    from typing import Any

_ALLOW = (
    "accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 clock_adjtime "
    "clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep "
    "clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 epoll_create "
    "epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 "
    "execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir "
    "fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork "
    "fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex "
    "futex_time64 futex_waitv futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 "
    "getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority "
    "getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid "
    "getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch "
    "inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents "
    "io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill landlock_add_rule "
    "landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat listen listxattr "
    "llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise membarrier memfd_create memfd_secret "
    "mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify "
    "mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl "
    "msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open "
    "openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll "
    "ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 "
    "pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg "
    "remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction "
    "rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait "
    "rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam "
    "sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval "
    "sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield "
    "seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg "
    "sendto setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid "
    "setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit "
    "set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32 setxattr shmat shmctl "
    "shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice "
    "stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time "
    "timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 "
    "timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate "
    "truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice "
    "wait4 waitid waitpid write writev"
).split()

_NS_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: clone may set none of them


def _rule(names: str, action: str = "SCMP_ACT_ALLOW", **kw: Any) -> dict[str, Any]:
    return {"names": names.split(), "action": action, **kw}


# The same decisions as moby's default profile (x86 and arm families; other arches' extras omitted).
DEFAULT: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    ],
    "syscalls": [
        {"names": _ALLOW, "action": "SCMP_ACT_ALLOW"},
        _rule("process_vm_readv process_vm_writev ptrace", includes={"minKernel": "4.8"}),
        _rule("socket", args=[{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]),  # no AF_VSOCK
        *[_rule("personality", args=[{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}])
          for v in (0, 8, 131072, 131080, 4294967295)],
        _rule("arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls",
              includes={"arches": ["arm", "arm64"]}),
        _rule("arch_prctl", includes={"arches": ["amd64", "x32"]}),
        _rule("modify_ldt", includes={"arches": ["amd64", "x32", "x86"]}),
        _rule("open_by_handle_at", includes={"caps": ["CAP_DAC_READ_SEARCH"]}),
        _rule("bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount mount_setattr "
              "move_mount open_tree perf_event_open quotactl quotactl_fd setdomainname sethostname setns syslog "
              "umount umount2 unshare", includes={"caps": ["CAP_SYS_ADMIN"]}),
        _rule("clone", args=[{"index": 0, "value": _NS_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
              excludes={"caps": ["CAP_SYS_ADMIN"]}),
        _rule("clone3", "SCMP_ACT_ERRNO", errnoRet=38, excludes={"caps": ["CAP_SYS_ADMIN"]}),  # ENOSYS: libc falls back to clone
        _rule("reboot", includes={"caps": ["CAP_SYS_BOOT"]}),
        _rule("chroot", includes={"caps": ["CAP_SYS_CHROOT"]}),
        _rule("delete_module init_module finit_module", includes={"caps": ["CAP_SYS_MODULE"]}),
        _rule("acct", includes={"caps": ["CAP_SYS_PACCT"]}),
        _rule("kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
              includes={"caps": ["CAP_SYS_PTRACE"]}),
        _rule("iopl ioperm", includes={"caps": ["CAP_SYS_RAWIO"]}),
        _rule("settimeofday stime clock_settime clock_settime64", includes={"caps": ["CAP_SYS_TIME"]}),
        _rule("vhangup", includes={"caps": ["CAP_SYS_TTY_CONFIG"]}),
        _rule("get_mempolicy mbind set_mempolicy set_mempolicy_home_node", includes={"caps": ["CAP_SYS_NICE"]}),
        _rule("syslog", includes={"caps": ["CAP_SYSLOG"]}),
        _rule("bpf", includes={"caps": ["CAP_BPF"]}),
        _rule("perf_event_open", includes={"caps": ["CAP_PERFMON"]}),
    ],
}

_ACTIONS = {"SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
            "SCMP_ACT_TRAP": 0x00030000, "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
            "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000}
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
        "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_ARCHES = {"SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X86_64": 0xC000003E, "SCMP_ARCH_X32": 0x4000003E,
           "SCMP_ARCH_ARM": 0x40000028, "SCMP_ARCH_AARCH64": 0xC00000B7}
_NATIVE = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64")}
_GO_ARCH = {"SCMP_ARCH_X86": "x86", "SCMP_ARCH_X86_64": "amd64", "SCMP_ARCH_X32": "x32", "SCMP_ARCH_ARM": "arm",
            "SCMP_ARCH_AARCH64": "arm64"}
_FLTATR_CTL_OPTIMIZE = 8


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SockFprog(ctypes.Structure):
    """struct sock_fprog: what prctl(PR_SET_SECCOMP) takes."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_profile(path: str) -> dict[str, Any]:
    """A Docker-format seccomp profile from ``path``, checked enough to compile."""
    import json

    try:
        with open(path, "rb") as f:
            prof = json.loads(f.read())
    except OSError as e:
        raise InvalidInput(f"cannot read seccomp profile {path}: {e.strerror}",
                           "pass an existing JSON file: --security-opt seccomp=/path/profile.json") from None
    except ValueError as e:
        raise InvalidInput(f"seccomp profile {path} is not valid JSON ({e})", "fix the file (Docker's format)") from None
    if not isinstance(prof, dict) or prof.get("defaultAction") not in _ACTIONS:
        raise InvalidInput(f"seccomp profile {path} has no valid defaultAction",
                           "use Docker's format, e.g. \"defaultAction\": \"SCMP_ACT_ERRNO\"")
    for r in prof.get("syscalls") or []:
        if not isinstance(r, dict) or r.get("action") not in _ACTIONS or not isinstance(r.get("names", []), list):
            raise InvalidInput(f"seccomp profile {path} has an invalid rule: {str(r)[:80]}",
                               "each rule needs \"names\" (a list) and a SCMP_ACT_* \"action\"")
        for a in r.get("args") or []:
            if a.get("op") not in _OPS or not isinstance(a.get("index"), int) or not 0 <= a["index"] < 6:
                raise InvalidInput(f"seccomp profile {path} has an invalid argument rule: {a}",
                                   "use index 0-5 and an op such as SCMP_CMP_EQ")
    return prof


def _kernel_at_least(want: str) -> bool:
    def nums(s: str) -> tuple[int, ...]:
        out = []
        for p in s.split(".")[:2]:
            d = "".join(c for c in p if c.isdigit()) or "0"
            out.append(int(d))
        return tuple(out)

    return nums(os.uname().release.split("-")[0]) >= nums(want)


def _action(name: str, errno: int | None, default_errno: int) -> int:
    base = _ACTIONS[name]
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        return base | ((default_errno if errno is None else errno) & 0xFFFF)
    return base


def _lib() -> Any:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise TaxiwayError("libseccomp is not installed, so machines cannot get a seccomp filter",
                           "install it (apt-get install libseccomp2), or run with --security-opt seccomp=unconfined") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def compile_profile(profile: dict[str, Any], caps: list[str] | tuple[str, ...]) -> bytes:
    """The profile as classic BPF (an array of struct sock_filter) for this machine's arch and caps."""
    native = _NATIVE.get(os.uname().machine)
    if native is None:
        raise TaxiwayError(f"seccomp profiles are not supported on {os.uname().machine} yet",
                           "run with --security-opt seccomp=unconfined")
    arch, goarch = native
    lib = _lib()
    derr = int(profile.get("defaultErrnoRet") or 1)
    default = _action(profile["defaultAction"], derr, derr)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise TaxiwayError("libseccomp could not start a filter", "run with --security-opt seccomp=unconfined")
    try:
        arches = {goarch}
        for m in profile.get("archMap") or []:
            if m.get("architecture") == arch:
                for sub in m.get("subArchitectures") or []:
                    if sub in _ARCHES and lib.seccomp_arch_add(ctx, _ARCHES[sub]) in (0, -17):
                        arches.add(_GO_ARCH[sub])
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)  # a binary tree of syscalls, not a list (best effort)
        capset = set(caps)
        for r in profile.get("syscalls") or []:
            inc, exc = r.get("includes") or {}, r.get("excludes") or {}
            if inc.get("caps") and not set(inc["caps"]) <= capset:
                continue
            if inc.get("arches") and not set(inc["arches"]) & arches:
                continue
            if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"]):
                continue
            if exc.get("caps") and set(exc["caps"]) & capset:
                continue
            if exc.get("arches") and set(exc["arches"]) & {goarch}:
                continue
            act = _action(r["action"], r.get("errnoRet"), derr)
            if act == default:
                continue
            args = r.get("args") or []
            cmp = (_ArgCmp * max(1, len(args)))()
            for i, a in enumerate(args):
                cmp[i] = _ArgCmp(a["index"], _OPS[a["op"]], int(a.get("value", 0)), int(a.get("valueTwo", 0)))
            for name in r.get("names") or []:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == -1:  # a syscall this libseccomp does not know: skipped, as runc does
                    continue
                rc = lib.seccomp_rule_add_array(ctx, act, nr, len(args), cmp if args else None)
                if rc not in (0, -17):  # -EEXIST: the same rule twice
                    raise InvalidInput(f"seccomp rule for {name} was refused by libseccomp ({os.strerror(-rc)})",
                                       "check the rule's action and args in the profile")
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc != 0:
                raise TaxiwayError(f"libseccomp could not export the filter ({os.strerror(-rc)})",
                                   "run with --security-opt seccomp=unconfined")
            os.lseek(fd, 0, os.SEEK_SET)
            out = b""
            while chunk := os.read(fd, 1 << 16):
                out += chunk
            return out
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def filter_for(profile: dict[str, Any] | None, caps: list[str] | tuple[str, ...], cache_dir: str | None = None) -> bytes:
    """Compiled BPF for ``profile`` (None: :data:`DEFAULT`) and ``caps``, cached in ``cache_dir``.

    The cache file holds the exact input (profile and caps as JSON) beside the program, and is
    used only when that input matches byte for byte: compiling costs ~10 ms of a warm start.
    """
    import json
    import zlib

    prof = DEFAULT if profile is None else profile
    key = json.dumps([prof, sorted(caps), os.uname().release], sort_keys=True, separators=(",", ":")).encode()
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"{zlib.crc32(key):08x}.bpf")
        try:
            with open(path, "rb") as f:
                data = f.read()
            head, sep, bpf = data.partition(b"\0")
            if sep and head == key and bpf and len(bpf) % 8 == 0:
                return bpf
        except OSError:
            pass
    bpf = compile_profile(prof, caps)
    if path:
        try:
            # no fsync: a cache entry is checked against its key when read, and recompiled if it is not whole
            with atomic_write(path, 0o644, fsync=False) as f:
                f.write(key + b"\0" + bpf)
        except OSError:
            pass
    return bpf


def program(bpf: bytes) -> tuple[SockFprog, Any]:
    """A struct sock_fprog over ``bpf`` (keep both returned objects alive until it is loaded)."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    return SockFprog(len(bpf) // 8, ctypes.addressof(buf)), buf


def load(prog: SockFprog) -> None:
    """Install the filter on the calling thread (needs no_new_privs or CAP_SYS_ADMIN). No imports."""
    L.prctl(L.PR_SET_SECCOMP, L.SECCOMP_MODE_FILTER, ctypes.addressof(prog))
