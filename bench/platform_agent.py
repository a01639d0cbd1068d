"""The host agent: time to reconcile N machines after a kill -9 and restart (issue 16).

    sudo .venv/bin/python bench/platform_agent.py [--machines 100] [--rounds 3]

In a fresh $TAXIWAY_HOME under a temp dir: a real nats-server on loopback, a busybox image
in the store, N MACHINES records (``sleep 3600``, desired started). The agent
(``python -m taxiway.platform.agent``) creates and starts them all (not timed, reported),
then, each round, is killed with SIGKILL and started again. Timed per round:

- wall: from spawning the new agent process to its ``ping`` answering that its first
  reconcile is done (interpreter start, NATS connect, reading the MACHINES bucket, adopting
  every running machine, writing each STATUS);
- agent: the reconcile alone, as the agent measures it (``reconcile_seconds``).

Then the agent's CPU use while it only observes the N machines (10 s, from /proc).

Every machine must be adopted (same pid, no restart). Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


async def ping(st, timeout: float) -> dict:
    from taxiway.platform import schema

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = await st.request(schema.agent_subject("local", "ping"), {}, timeout=1)
            if r.get("reconciled_at"):
                return r
        except Exception:
            pass
        await asyncio.sleep(0.02)
    raise SystemExit("the agent did not answer in time; see its log")


def idle_cpu(pid: int, seconds: float) -> float:
    """The share of one core process ``pid`` used over ``seconds`` (user + system, from /proc)."""
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime

    t0, c0 = time.monotonic(), ticks()
    time.sleep(seconds)
    return (ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


def spawn(url: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", url], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


async def bench(n: int, rounds: int, tmp: Path) -> None:
    from machines.conftest import BUSYBOX, make_image

    from taxiway import machines
    from taxiway.platform import schema
    from taxiway.platform.nats import NatsServer
    from taxiway.platform.state import State

    image = make_image(tmp, BUSYBOX)
    srv = NatsServer(tmp / "nats").start()
    agent = None
    try:
        st = await State.connect(srv.url)
        ids = [schema.new_machine_id() for _ in range(n)]
        now = time.time()
        for mid in ids:
            await st.put(schema.MACHINES, schema.machine_key("bench", mid),
                         {"id": mid, "app": "bench", "host": "local", "region": "local", "desired": "started",
                          "instance_id": "i1", "config": {"image": image, "cmd": ["sleep", "3600"]},
                          "created_at": now, "updated_at": now})
        t0 = time.monotonic()
        agent = spawn(srv.url, tmp / "agent.log")
        await ping(st, 3600)
        print(f"first start: {n} machines created and started in {time.monotonic() - t0:.1f} s", flush=True)
        pids = {mid: (await st.get(schema.STATUS, schema.machine_key("bench", mid)))[0]["pid"] for mid in ids}
        walls, inner = [], []
        for r in range(rounds):
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            t0 = time.monotonic()
            agent = spawn(srv.url, tmp / "agent.log")
            got = await ping(st, 600)
            walls.append(time.monotonic() - t0)
            inner.append(got["reconcile_seconds"])
            for mid in ids:
                s = (await st.get(schema.STATUS, schema.machine_key("bench", mid)))[0]
                assert s["state"] == "started" and s["pid"] == pids[mid] and s["restarts"] == 0, s
            print(f"round {r + 1}: wall {walls[-1] * 1000:.0f} ms, reconcile {inner[-1] * 1000:.0f} ms "
                  f"({n} adopted)", flush=True)
        cpu = idle_cpu(agent.pid, 10.0)
        print(f"idle: the agent used {cpu * 100:.1f}% of one core over 10 s observing {n} machines "
              f"(poll 0.5 s)", flush=True)
        print("\n| machines | rounds | wall median (min-max) | reconcile median (min-max) | idle CPU | load |")
        print("|---|---|---|---|---|---|")
        load = os.getloadavg()[0]
        print(f"| {n} | {rounds} | {statistics.median(walls) * 1000:.0f} ms ({min(walls) * 1000:.0f}-"
              f"{max(walls) * 1000:.0f}) | {statistics.median(inner) * 1000:.0f} ms ({min(inner) * 1000:.0f}-"
              f"{max(inner) * 1000:.0f}) | {cpu * 100:.1f}% | {load:.1f} |")
        await st.close()
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait()
        for m in machines.all_machines():
            machines.destroy(m, force=True)
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("error: machines need root; run it with sudo")
    with tempfile.TemporaryDirectory(prefix="tw-bench-agent-") as d:
        os.environ["TAXIWAY_HOME"] = str(Path(d) / "home")
        os.environ["TAXIWAY_CONFIG"] = str(Path(d) / "config")
        asyncio.run(bench(a.machines, a.rounds, Path(d)))


if __name__ == "__main__":
    main()
