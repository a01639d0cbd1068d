"""``taxiway run``: its options (one table), its body, and a click-free fast path.

A warm ``taxiway run`` is over in well under 100 ms, and importing click alone
costs 15-30 ms of that on these hosts. So the options are declared once, as
data, in ``OPTIONS``: ``taxiway.cli.machines`` turns the table into the click
command (help, errors, completion), and :func:`parse` reads the same table to
parse an ordinary command line without importing click. Anything :func:`parse`
is not sure of (``--help``, an unknown or malformed option, a value that does
not convert) makes it return ``None`` and the caller hands the whole command
line to click, so users get click's messages and behaviour in every case the
fast path does not handle.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


class Opt:
    """One option: its flags (``("-e", "--env")``), the keyword argument of run_command() it fills,
    its kind (flag, value or multiple), help, value type (None = str), default and choices."""

    __slots__ = ("flags", "dest", "kind", "help", "type", "default", "choices")

    def __init__(self, flags: tuple[str, ...], dest: str, kind: str, help: str, type: type | None = None,
                 default: Any = None, choices: tuple[str, ...] | None = None) -> None:
        self.flags, self.dest, self.kind, self.help = flags, dest, kind, help
        self.type, self.default, self.choices = type, default, choices


OPTIONS: tuple[Opt, ...] = (
    Opt(("-d", "--detach"), "detach", "flag", "Run in the background and print the machine ID."),
    Opt(("--name",), "name", "value", "Name the machine (default: a generated name)."),
    Opt(("-e", "--env"), "env", "multiple", "Set an environment variable (K=V, or K to copy ours)."),
    Opt(("--env-file",), "env_file", "multiple", "Read K=V lines from a file."),
    Opt(("-w", "--workdir"), "workdir", "value", "Working directory inside the machine."),
    Opt(("-u", "--user"), "user", "value", "user[:group], names from the image's /etc/passwd and /etc/group, or ids."),
    Opt(("--hostname",), "hostname", "value", "The machine's hostname (default: its ID)."),
    Opt(("--entrypoint",), "entrypoint", "value", "Replace the image's Entrypoint (an empty string clears it)."),
    Opt(("-m", "--memory"), "memory", "value", "Memory limit, e.g. 64m or 1g (at least 6m)."),
    Opt(("--cpus",), "cpus", "value", "CPU limit, e.g. 0.5 or 2.", float),
    Opt(("--pids-limit",), "pids_limit", "value", "Maximum number of tasks (stops fork bombs).", int),
    Opt(("--storage-size",), "storage_size", "value",
        "Cap the machine's writable layer, e.g. 1g (an ext4 file of that size; namespace machines)."),
    Opt(("--restart",), "restart", "value", "no, on-failure[:N] or always.", None, "no"),
    Opt(("-v", "--volume"), "volumes", "multiple", "Bind-mount HOSTDIR:DIR[:ro] (micro-VMs: a directory, shared over virtiofs)."),
    Opt(("--rm",), "auto_remove", "flag", "Remove the machine when it exits."),
    Opt(("--net",), "net", "value",
        "private: its own network namespace with loopback; host: the host's (micro-VMs: as private); "
        "none: loopback only, no ports.",
        None, "private", ("none", "host", "private")),
    Opt(("-p", "--publish"), "ports", "multiple", "Forward 127.0.0.1:HOSTPORT to the machine's PORT (HOSTPORT:PORT)."),
    Opt(("-i", "--interactive"), "interactive", "flag", "Keep stdin connected."),
    Opt(("-t", "--tty"), "tty", "flag", "Give the machine a terminal."),
    Opt(("--isolation",), "isolation", "value",
        "namespace: Linux namespaces and cgroups; vm: a QEMU micro-VM (KVM when it works, else TCG).",
        None, "namespace", ("namespace", "vm")),
    Opt(("--vm-accel",), "vm_accel", "value",
        "For --isolation vm: kvm fails when KVM is unusable; auto falls back to TCG and says so.",
        None, "auto", ("auto", "kvm", "tcg")),
    Opt(("--stop-signal",), "stop_signal", "value",
        "Signal for `machines stop` (default: the image's StopSignal or SIGTERM)."),
    Opt(("--stop-timeout",), "stop_timeout", "value", "Seconds before SIGKILL on stop.", float, 10.0),
    Opt(("--cap-add",), "cap_add", "multiple", "Add a Linux capability (e.g. MKNOD, NET_ADMIN; ALL for every one)."),
    Opt(("--cap-drop",), "cap_drop", "multiple", "Drop a Linux capability from the default set (ALL for every one)."),
    Opt(("--security-opt",), "security_opt", "multiple",
        "seccomp=unconfined, seccomp=PROFILE.json (Docker's format) or no-new-privileges (always on)."),
)

_BY_FLAG = {f: o for o in OPTIONS for f in o.flags}


def parse(args: list[str]) -> dict[str, Any] | None:
    """``run``'s arguments (after the word ``run``) as keyword arguments, or None to let click decide.

    Mirrors click's parsing of this command: options come before IMAGE (no
    interspersed arguments), ``--opt=value`` and ``--opt value``, ``-xVALUE``
    and ``-x value``, clusters of short flags (``-it``, ``-dit``), ``--``.
    """
    kw: dict[str, Any] = {o.dest: ([] if o.kind == "multiple" else (False if o.kind == "flag" else o.default))
                          for o in OPTIONS}
    i = 0
    n = len(args)
    while i < n:
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        if a.startswith("--"):
            flag, eq, val = a.partition("=")
            o = _BY_FLAG.get(flag)
            if o is None:
                return None
            if o.kind == "flag":
                if eq:
                    return None
                kw[o.dest] = True
                i += 1
                continue
            if not eq:
                if i + 1 >= n:
                    return None
                val = args[i + 1]
                i += 1
            i += 1
        else:
            # a cluster of short options: flags, then at most one that takes a value (the rest, or the next word)
            j = 1
            o = None
            val = ""
            while j < len(a):
                o = _BY_FLAG.get("-" + a[j])
                if o is None:
                    return None
                if o.kind == "flag":
                    kw[o.dest] = True
                    j += 1
                    o = None
                    continue
                val = a[j + 1:]
                break
            i += 1
            if o is None:
                continue
            if not val:
                if i >= n:
                    return None
                val = args[i]
                i += 1
        if o.choices and val not in o.choices:
            return None
        if o.type is not None:
            try:
                conv = o.type(val)
            except ValueError:
                return None
        else:
            conv = val
        if o.kind == "multiple":
            kw[o.dest].append(conv)
        else:
            kw[o.dest] = conv
    if i >= n:
        return None  # no IMAGE: click says so
    kw["image"] = args[i]
    kw["command"] = args[i + 1:]
    return kw


def run_command(detach: bool, name: str | None, env: Any, env_file: Any, workdir: str | None, user: str | None,
                hostname: str | None, entrypoint: str | None, memory: str | None, cpus: float | None,
                pids_limit: int | None, restart: str, volumes: Any, auto_remove: bool, net: str, ports: Any,
                interactive: bool, tty: bool, isolation: str, vm_accel: str, stop_signal: str | None,
                stop_timeout: float, image: str, command: Any, cap_add: Any = (), cap_drop: Any = (),
                security_opt: Any = (), storage_size: str | None = None) -> None:
    """Run IMAGE as an isolated machine: its Entrypoint + Cmd, or COMMAND instead of Cmd."""
    if isolation == "namespace" and not detach and os.geteuid() == 0:
        from taxiway.machines.cgroups import prime_attach

        prime_attach()  # the kernel's first cgroup move of a start waits ~15 ms: let that pass during imports
    from taxiway.errors import InvalidInput
    from taxiway.machines import config as C
    from taxiway.machines import runtime

    if pids_limit is not None and pids_limit < 1:
        raise InvalidInput(f"invalid --pids-limit {pids_limit}", "use a positive number of tasks")
    if cpus is not None and cpus <= 0:
        raise InvalidInput(f"invalid --cpus {cpus}", "use a positive number, e.g. 0.5")
    cfg = C.MachineConfig(
        image=image, cmd=list(command) or None,
        entrypoint=None if entrypoint is None else ([entrypoint] if entrypoint else []),
        env=C.parse_env(list(env), list(env_file)), workdir=workdir, user=user, hostname=hostname,
        guest=C.Guest(C.parse_memory(memory) if memory else None, cpus, pids_limit),
        ports=[C.parse_port(p) for p in ports], mounts=[C.parse_volume(v) for v in volumes],
        restart=C.parse_restart(restart), net=net, isolation=isolation, auto_remove=auto_remove,
        tty=tty, interactive=interactive, stop_signal=stop_signal, stop_timeout=stop_timeout, vm_accel=vm_accel,
        cap_add=list(cap_add), cap_drop=list(cap_drop), seccomp=C.parse_security_opt(list(security_opt)),
        storage_size=C.parse_storage_size(storage_size) if storage_size else None)
    if auto_remove and cfg.restart.policy != "no":
        raise InvalidInput("--rm and --restart cannot be combined", "drop one of them")
    if stop_signal:
        C.parse_signal(stop_signal)
    m = runtime.create(cfg, name, None)  # pull() draws its own progress bar on a terminal
    if m.runtime == "vm" and m.accel == "tcg" and vm_accel == "auto":
        sys.stderr.write("note: KVM is not usable on this host (nested virtualization?); "
                         "this micro-VM runs under QEMU TCG emulation, so it boots in seconds, not milliseconds\n")
        sys.stderr.flush()
    if detach:
        runtime.start_detached(m)
        sys.stdout.write(m.id + "\n")
        sys.stdout.flush()
        return
    code = runtime.run_attached(m)
    from taxiway.cli import exit_now

    exit_now(code, "run")
