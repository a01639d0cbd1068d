"""Scale to zero: how long a request waits while the edge wakes a stopped namespace machine (issue 18).

    sudo .venv/bin/python bench/edge_wake.py [--rounds 5]

In a fresh $TAXIWAY_HOME under a temp dir: a real nats-server on loopback, the host agent
(``python -m taxiway.platform.agent``), a busybox image whose machine serves HTTP (busybox
httpd, no checks declared: the edge routes it once STATUS says started and retries the connect
until it listens), and the edge in this process on its own NATS user, with autostop_after
0.5 s. Each round waits until the edge has stopped the idle machine, then times one GET
through the edge: from sending it to the whole answer (the edge asks the agent to start the
machine, waits for its STATUS, connects). Also reported: the edge's own "awake" figure (start
request to routable) and the agent's share. Target: < 300 ms. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

HTTPD = ["sh", "-c", "mkdir -p /www; echo hello > /www/index.html; exec httpd -f -p 8080 -h /www"]


async def bench(rounds: int, tmp: Path) -> None:
    import httpx
    from machines.conftest import BUSYBOX, make_image

    from taxiway import machines
    from taxiway.platform import schema
    from taxiway.platform.edge import Edge, EdgeConfig
    from taxiway.platform.nats import NatsServer
    from taxiway.platform.state import State

    image = make_image(tmp, BUSYBOX)
    srv = NatsServer(tmp / "nats").start()
    agent = edge = st = est = None
    log = open(tmp / "agent.log", "ab")
    try:
        st = await State.connect(srv.url)
        agent = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", srv.url, "--poll", "0.2"],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        while True:
            try:
                if (await st.request(schema.agent_subject("local", "ping"), {}, timeout=2)).get("reconciled_at"):
                    break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        mid = schema.new_machine_id()
        key = schema.machine_key("web", mid)
        service = {"internal_port": 8080, "protocol": "tcp", "ports": [{"port": 80, "handlers": ["http"]}],
                   "autostop": "stop", "autostart": True, "min_machines_running": 0}
        await st.put(schema.APPS, "web", {"name": "web", "org": "personal"})
        await st.put(schema.MACHINES, key, {
            "id": mid, "name": mid, "app": "web", "org": "personal", "region": "local", "host": "local",
            "process_group": "app", "release": 1, "desired": "started", "instance_id": "i1",
            "config": {"image": image, "cmd": HTTPD, "services": [service], "stop_timeout": 2,
                       "metadata": {"release": 1, "process_group": "app"}}})
        est = await State.connect(srv.url_for("edge"))
        edge_log = tmp / "edge.log"
        edge = Edge(EdgeConfig(listen=("127.0.0.1", 0), autostop_after=0.5), state=est, log=open(edge_log, "ab"))
        await edge.start()
        waits = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.address[1]}", timeout=60) as c:
            while not edge.routes.backends("web"):  # the agent creates and starts it
                await asyncio.sleep(0.05)
            first = await c.get("/index.html", headers={"Host": "web.localhost"})
            assert first.text == "hello\n", first.text
            for _ in range(rounds):
                while edge.routes.sleeping("web") != [mid]:
                    await asyncio.sleep(0.02)
                t0 = time.perf_counter()
                r = await c.get("/index.html", headers={"Host": "web.localhost"})
                waits.append((time.perf_counter() - t0) * 1000)
                assert r.text == "hello\n", r.text
        import json

        lines = [json.loads(x) for x in edge_log.read_text().splitlines() if '"msg":"awake"' in x]
        awake = [x["seconds"] * 1000 for x in lines]
        agent_ms = [x["agent_seconds"] * 1000 for x in lines]
        print(f"wake-up of a stopped namespace machine through the edge, {rounds} rounds "
              f"(load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus):")
        print(f"  request wait: median {statistics.median(waits):.0f} ms, min {min(waits):.0f}, max {max(waits):.0f} "
              f"(target < 300 ms)")
        if awake:
            print(f"  edge 'awake' (start request to routable): median {statistics.median(awake):.0f} ms, of which "
                  f"the agent's answer to agent.local.start: median {statistics.median(agent_ms):.0f} ms")
    finally:
        if edge is not None:
            await edge.close()
        for s in (est, st):
            if s is not None:
                await s.close()
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait()
        log.close()
        for m in machines.all_machines():
            machines.destroy(m, force=True)
        srv.stop()
        from taxiway.platform import fabric

        fabric.release_all(os.environ["TAXIWAY_HOME"])  # the private network's namespace files, if made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("error: machines need root; run it with sudo")
    with tempfile.TemporaryDirectory(prefix="tw-bench-wake-") as d:
        os.environ["TAXIWAY_HOME"] = str(Path(d) / "home")
        os.environ["TAXIWAY_CONFIG"] = str(Path(d) / "config")
        asyncio.run(bench(a.rounds, Path(d)))


if __name__ == "__main__":
    main()
