"""The device policy of a machine: Docker's default rules, as cgroup v1 lines or a cgroup v2 eBPF program.

cgroup v1 has a ``devices`` controller that takes the rules as text. cgroup v2 has
none: the kernel asks a BPF_PROG_TYPE_CGROUP_DEVICE program attached to the group
instead, so :func:`program` turns the same rules into eBPF instructions (built here,
byte by byte; no compiler) and :func:`attach` loads it with bpf(2) and attaches it
to the machine's group. Any device access not allowed by a rule is refused (EPERM).
"""

from __future__ import annotations

import ctypes
import os
import struct

# (type "c"/"b", major or None for any, minor or None for any, access "rwm")
RULES: tuple[tuple[str, int | None, int | None, str], ...] = (
    ("c", None, None, "m"), ("b", None, None, "m"),  # mknod of any node; opening it is another matter
    ("c", 1, 3, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 7, "rwm"), ("c", 1, 8, "rwm"), ("c", 1, 9, "rwm"),  # null zero full random urandom
    ("c", 5, 0, "rwm"), ("c", 5, 1, "rwm"), ("c", 5, 2, "rwm"),  # tty console ptmx
    ("c", 136, None, "rwm"),  # /dev/pts/*
    ("c", 10, 200, "rwm"),  # /dev/net/tun
)


def v1_lines(rules: tuple[tuple[str, int | None, int | None, str], ...] = RULES) -> list[str]:
    """The rules as lines for a v1 ``devices.allow`` (after ``a`` was written to ``devices.deny``)."""
    return [f"{t} {'*' if ma is None else ma}:{'*' if mi is None else mi} {acc}" for t, ma, mi, acc in rules]


# eBPF encoding (linux/bpf.h)
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_ALU32_AND_K, _ALU32_RSH_K, _ALU32_MOV_X = 0x54, 0x74, 0xBC
_ALU64_MOV_K = 0xB7
_JNE_K, _EXIT = 0x55, 0x95
_DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
_ACC = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(rules: tuple[tuple[str, int | None, int | None, str], ...] = RULES) -> bytes:
    """A cgroup device program: 1 (allow) when a rule matches the access, else 0.

    The context is struct bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type); u32 major; u32 minor}.
    """
    head = [
        _insn(_LDX_W, 2, 1, 0),  # r2 = access_type
        _insn(_ALU32_MOV_X, 3, 2),  # w3 = w2
        _insn(_ALU32_RSH_K, 3, imm=16),  # w3 = access
        _insn(_ALU32_AND_K, 2, imm=0xFFFF),  # w2 = type
        _insn(_LDX_W, 4, 1, 4),  # r4 = major
        _insn(_LDX_W, 5, 1, 8),  # r5 = minor
    ]
    body: list[bytes] = []
    for t, major, minor, access in rules:
        checks = [(2, _DEV_TYPE[t])]
        if major is not None:
            checks.append((4, major))
        if minor is not None:
            checks.append((5, minor))
        allowed = sum(_ACC[a] for a in set(access))
        block_len = len(checks) + 5  # checks, mov, and, jne, mov r0 1, exit
        block = []
        for i, (reg, val) in enumerate(checks):
            block.append(_insn(_JNE_K, reg, off=block_len - i - 1, imm=val))
        block += [
            _insn(_ALU32_MOV_X, 0, 3),  # w0 = access
            _insn(_ALU32_AND_K, 0, imm=~allowed & 0x7),  # what this rule does not allow
            _insn(_JNE_K, 0, off=2, imm=0),
            _insn(_ALU64_MOV_K, 0, imm=1),
            _insn(_EXIT),
        ]
        body += block
    tail = [_insn(_ALU64_MOV_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(head + body + tail)


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_LOAD, _BPF_PROG_ATTACH = 5, 8
_PROG_TYPE_CGROUP_DEVICE, _ATTACH_CGROUP_DEVICE = 15, 6
_F_ALLOW_MULTI = 2


def attach(cgroup_dir: str, rules: tuple[tuple[str, int | None, int | None, str], ...] = RULES) -> None:
    """Load the device program and attach it to the v2 group ``cgroup_dir`` (it lives as long as the group)."""
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "bpf: unknown system call number on this architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    code = program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"Apache-2.0")
    attr = ctypes.create_string_buffer(128)
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type
    struct.pack_into("<IIQQIIQII16sII", attr, 0, _PROG_TYPE_CGROUP_DEVICE, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic), 0, 0, 0, 0, 0, b"taxiway_devices", 0,
                     _ATTACH_CGROUP_DEVICE)
    prog = libc.syscall(nr, _BPF_PROG_LOAD, attr, ctypes.c_uint(len(attr)))
    if prog < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf(BPF_PROG_LOAD) of the device program: {os.strerror(e)}")
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attr = ctypes.create_string_buffer(128)
            struct.pack_into("<IIII", attr, 0, cg, prog, _ATTACH_CGROUP_DEVICE, _F_ALLOW_MULTI)
            if libc.syscall(nr, _BPF_PROG_ATTACH, attr, ctypes.c_uint(len(attr))) < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"bpf(BPF_PROG_ATTACH) of the device program: {os.strerror(e)}")
        finally:
            os.close(cg)
    finally:
        os.close(prog)
