"""The platform API: create 1,000 machine records through it and list them (p50/p99), issue 16.

    .venv/bin/python bench/platform_api.py [--machines 1000] [--lists 50] [--concurrency 8]

In a temp $TAXIWAY_HOME: a real nats-server and the real API (``python -m taxiway.platform.api``,
uvicorn) on loopback, an org admin token, one app. Timed with httpx from this process:

- create: ``POST /v1/apps/bench/machines`` one by one (then ``--concurrency`` at once): token
  check, config validation, the MACHINES record written with compare-and-set, the request to
  ``agent.local.create`` and its answer. **The agent is replaced by a responder that
  acknowledges at once** (this bench measures the control plane; making 1,000 real machines is
  the agent's and the runtime's cost, see bench/platform_agent.py and bench/run.py).
- list: ``GET /v1/apps/bench/machines`` with all of them (MACHINES and STATUS read), ``--lists`` times.

Everything started is stopped and the temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def responder(url: str, ready: threading.Event, stop: threading.Event) -> None:
    """Answers agent.local.* with ok (see the module docstring: not a machine runtime)."""
    from taxiway.platform.state import State

    async def main() -> None:
        st = await State.connect(url, name="bench-responder")

        async def ok(p: dict) -> dict:
            return {"ok": True, "status": {"id": p.get("id"), "state": "created"}}

        await st.serve("agent.local.>", ok)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await st.close()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--lists", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()

    import os

    import httpx

    with tempfile.TemporaryDirectory(prefix="tw-bench-api-") as tmp:
        os.environ["TAXIWAY_HOME"] = str(Path(tmp) / "home")
        from taxiway.platform import api, schema
        from taxiway.platform.nats import NatsServer, free_port
        from taxiway.platform.state import State

        nats = NatsServer(Path(tmp) / "nats").start()
        port = free_port()
        log = open(Path(tmp) / "api.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "taxiway.platform.api", "--nats", nats.url, "--listen",
                                 f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()
        try:
            async def boot() -> str:
                st = await State.connect(nats.url)
                _, tok = await api.new_org(st, "bench")
                await st.put(schema.APPS, "bench", {"name": "bench", "org": "bench", "created_at": 0, "config": {}})
                await st.close()
                return tok

            token = asyncio.run(boot())
            ready = threading.Event()
            t = threading.Thread(target=responder, args=(nats.url, ready, stop), daemon=True)
            t.start()
            ready.wait(30)
            c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                             trust_env=False, timeout=60)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if c.get("/v1/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start; see " + str(Path(tmp) / "api.log"))
                time.sleep(0.05)
            body = {"config": {"image": "bench:1", "cmd": ["sleep", "3600"],
                               "services": [{"internal_port": 8080, "protocol": "tcp"}]}}
            half = a.machines // 2
            creates = []
            t0 = time.perf_counter()
            for _ in range(half):
                s = time.perf_counter()
                r = c.post("/v1/apps/bench/machines", json=body)
                creates.append(time.perf_counter() - s)
                assert r.status_code == 200, r.text
            seq_wall = time.perf_counter() - t0

            from concurrent.futures import ThreadPoolExecutor

            def one(_: int) -> float:
                s = time.perf_counter()
                r = c.post("/v1/apps/bench/machines", json=body)
                assert r.status_code == 200, r.text
                return time.perf_counter() - s

            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.concurrency) as ex:
                conc = list(ex.map(one, range(a.machines - half)))
            conc_wall = time.perf_counter() - t0

            lists = []
            for _ in range(a.lists):
                s = time.perf_counter()
                r = c.get("/v1/apps/bench/machines")
                lists.append(time.perf_counter() - s)
                assert len(r.json()) == a.machines
            c.close()
            ms = 1000
            print(f"create, one at a time ({half}): p50 {pct(creates, 50) * ms:.1f} ms, p99 {pct(creates, 99) * ms:.1f}"
                  f" ms, {half / seq_wall:.0f}/s")
            print(f"create, {a.concurrency} at once ({a.machines - half}): p50 {pct(conc, 50) * ms:.1f} ms, "
                  f"p99 {pct(conc, 99) * ms:.1f} ms, {(a.machines - half) / conc_wall:.0f}/s")
            print(f"list of {a.machines} ({a.lists} times): p50 {pct(lists, 50) * ms:.0f} ms, "
                  f"p99 {pct(lists, 99) * ms:.0f} ms, mean {statistics.mean(lists) * ms:.0f} ms")
        finally:
            stop.set()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            nats.stop()


if __name__ == "__main__":
    main()
