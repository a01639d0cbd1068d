"""The one interface both runtimes implement: :class:`Runtime`.

:class:`taxiway.machines.namespace_runtime.NamespaceRuntime` runs a machine as
a process tree in its own namespaces; :class:`taxiway.machines.vm.VMRuntime`
boots it as a QEMU micro-VM. :mod:`taxiway.machines.runtime` (the API: create,
supervise, stop, destroy...) drives either through this interface and never
asks which one it has. A runtime object is made per machine record
(``runtime_for(m)``); ``start`` and ``wait`` are called by the machine's
supervisor, the others from any process.

Only imported for type checking: the runtimes satisfy it structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from taxiway.machines.config import MachineConfig
from taxiway.machines.snapshots import Snapshotter
from taxiway.machines.state import Machine

# how one run ended: (exit code, reason: exited | signalled | oom-killed, signal or None)
Exit = tuple[int, str, int | None]


class Runtime(Protocol):
    """One machine's runtime."""

    kind: ClassVar[str]  # "namespace" or "vm": the record's ``runtime`` field

    def __init__(self, m: Machine) -> None: ...

    @classmethod
    def check(cls, cfg: MachineConfig) -> dict[str, Any]:
        """Create time, before any work: refuse what this runtime cannot do; extra record fields (``accel``)."""

    def prepare(self, snap: Snapshotter) -> None:
        """Create time, in the new machine's directory: its writable layer or disk, and per-runtime process fields."""

    def start(self, attached: bool, on_started: Callable[[], None]) -> None:
        """Start one run; returns once it runs, or raises TaxiwayError (nothing left behind).

        ``on_started`` is called once the main process runs (in ``start``, or later in ``wait``).
        ``attached``: the terminal is the caller's (output echoed, -i/-t honoured, signals forwarded).
        """

    def wait(self) -> Exit:
        """Serve the run started by ``start`` (logs, terminal, signals) until its main process ends."""

    def signal(self, sig: int) -> bool:
        """Deliver ``sig`` to the main process (from any process); False if it cannot be reached."""

    def stop(self, sig: int, timeout: float) -> None:
        """``sig`` to the main process, SIGKILL to the machine after ``timeout`` seconds."""

    def exec(self, argv: list[str], tty: bool, interactive: bool) -> int:
        """Run ``argv`` inside the running machine with its user, env and confinement; its exit code."""

    def events(self) -> list[dict[str, Any]]:
        """The machine's state changes, oldest first (``events.jsonl``)."""

    def cleanup(self) -> str | None:
        """After a run, or a supervisor that died: free what the run held (cgroups, helper processes).

        Returns ``"oom-killed"`` if the kernel killed the machine for memory, else None.
        """
