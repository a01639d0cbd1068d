"""Machines: an image run as an isolated process tree (namespaces) or a micro-VM.

The API the CLI and the platform's host agent use (each name is imported on
first use, so ``import taxiway.machines`` costs nothing: ``taxiway run``'s
start-up time matters)::

    from taxiway import machines

    m = machines.create(machines.MachineConfig(image="app:1", cmd=["serve"]), "web-1")
    machines.start_detached(m)          # returns once it runs
    machines.exec_in(m, ["uptime"])     # -> exit code
    machines.stop(m, None, 10)          # its stop signal, SIGKILL after 10 s
    machines.wait(m)                    # the final record
    machines.start(m)                   # again, in the background
    machines.destroy(m, force=True)
    machines.load(id) / machines.find(name_or_id) / machines.all_machines()

The same names stay importable from :mod:`taxiway.machines.runtime`,
:mod:`taxiway.machines.state` and :mod:`taxiway.machines.config`. Each
runtime implements :class:`taxiway.machines.interface.Runtime`.
"""

from __future__ import annotations

_EXPORTS = {
    "runtime": ("create", "start_detached", "run_attached", "supervise", "stop", "start", "destroy", "wait",
                "exec_in", "read_logs", "gc", "runtime_for"),
    "state": ("Machine", "load", "find", "all_machines"),
    "config": ("MachineConfig", "Guest", "Mount", "Port", "Restart"),
    "interface": ("Runtime",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'taxiway.machines' has no attribute {name!r}")
    import sys

    full = f"taxiway.machines.{module}"
    __import__(full)
    value = getattr(sys.modules[full], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
