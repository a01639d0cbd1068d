"""The agent's spare helper process (machine starts without paying Python's start on the deploy's
path): a command goes to the spare, a new spare replaces it, concurrent starts keep one, and closing
the agent's spare leaves no process behind. Real processes; a machine id that does not exist makes
the helper answer with its own one-line error (no machine needed)."""

from __future__ import annotations

import asyncio
import os

import pytest

from taxiway.platform import agent as A

pytestmark = pytest.mark.anyio


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def test_the_spare_runs_one_command_and_is_replaced(platform_home):
    spare = A._SpareHelper()
    try:
        rc, out, err = await spare.run("start", "0123456789abcdef")  # no spare yet: a fresh helper
        assert rc == 125 and "no local machine" in A._helper_error(out, err)["error"]
        first = spare.proc
        assert first is not None and first.returncode is None  # made after the command, waiting
        rc, out, err = await spare.run("start", "0123456789abcdef")  # this one runs in the spare
        assert rc == 125 and "no local machine" in A._helper_error(out, err)["error"]
        assert first.returncode is not None  # used up: it ran the command and exited
        assert spare.proc is not None and spare.proc is not first

        results = await asyncio.gather(*(spare.run("start", f"{i:016x}") for i in range(3)))  # concurrent
        assert all(rc == 125 for rc, _, _ in results)
        helpers = [p for p in os.listdir("/proc") if p.isdigit() and _is_spare(int(p), os.getpid())]
        assert helpers == [str(spare.proc.pid)], helpers  # one spare, not one per concurrent start
    finally:
        proc = spare.proc
        await spare.close()
    assert proc is not None and not _alive(proc.pid)


def _is_spare(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(")")[-1].split()
    except OSError:
        return False
    return b"--stdin" in argv and b"helper" in argv and int(fields[1]) == parent and fields[0] != "Z"


async def test_a_spare_whose_agent_is_gone_exits(platform_home):
    spare = A._SpareHelper()
    proc = await spare._make()
    proc.stdin.close()  # what the agent's death does to the pipe
    assert await asyncio.wait_for(proc.wait(), 60) == 0
