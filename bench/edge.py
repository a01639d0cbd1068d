"""The platform's edge side by side with nginx as a reverse proxy, and with no proxy, on loopback.

    .venv/bin/python bench/edge.py [--seconds 3] [--conns 1,50,500] [--repeat 2] [--markdown]

One run starts, each with its own temp config and stopped after:
- two nginx "machines" on 127.0.0.1 (each answers GET /small with 3 bytes), one worker each;
- a nats-server with JetStream, and the app's APPS/MACHINES/STATUS records written as the API
  and the agent write them (machine A routed, B started but cordoned);
- the edge (``python -m taxiway.platform.edge``, one process on uvloop);
- nginx as the peer reverse proxy (one worker, upstream keepalive 64), routing Host
  ``web.localhost`` to machine A.

Measured:
- small requests at each --conns: the Go load generator (bench/_loadgen.py) opens C
  keep-alive connections, sends one warm-up request on each, then GET /small with
  ``Host: web.localhost`` on all of them for --seconds; requests/s, p50/p99 and errors;
  "added" is p50/p99 minus direct's. Each path runs --repeat times interleaved, best kept.
- a rolling deploy under load through the edge: 50 connections for --seconds x 3 while
  machine B is uncordoned, A cordoned, drained (edge.drain) and stopped (kill + STATUS
  "stopped"), then A comes back and B goes: failed requests must be 0.

Targets (issue 18): >= 0.5x nginx's requests/s, added p99 < 2 ms at 50 connections,
0 failed requests during a deploy. Caddy and HAProxy are measured when installed.
Nothing leaves loopback; no name is resolved (the loadgen dials 127.0.0.1 and sends
the Host header itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import _loadgen  # noqa: E402  (bench/_loadgen.py: the Go load generator shared with bench/egress.py)

from taxiway.platform import schema  # noqa: E402
from taxiway.platform.nats import NatsServer  # noqa: E402
from taxiway.platform.state import State  # noqa: E402

APP = "web"
HOST = f"{APP}.localhost"
MACHINE_A, MACHINE_B = "00000000000a0a", "00000000000b0b"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on 127.0.0.1:{port}")


class Proc:
    """A child process in its own session, stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, argv: list[str], port: int, log: Path, **kw) -> None:
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         stdin=subprocess.DEVNULL, **kw)
        wait_port(port, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def nginx(d: Path, port: int, proxy_to: int | None = None) -> Proc:
    """nginx answering /small itself (a machine), or proxying to 127.0.0.1:``proxy_to`` (the peer)."""
    d.mkdir(parents=True)
    for sub in ("tmp", "logs"):
        (d / sub).mkdir()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    if proxy_to is None:
        server = f"""server {{ listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "ok\\n"; }} }}"""
    else:
        server = f"""upstream machines {{ server 127.0.0.1:{proxy_to}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port} backlog=4096; server_name {HOST};
    location / {{ proxy_pass http://machines; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_buffering off; }} }}"""
    (d / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  tcp_nodelay on; keepalive_requests 100000000; keepalive_timeout 300;
  {server}
}}
""")
    return Proc(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/error.log")],
                port, d / "nginx.out")


def machine(mid: str, *, cordoned: bool = False) -> dict:
    return {"id": mid, "app": APP, "org": "personal", "region": "local", "host": "local", "desired": "started",
            "cordoned": cordoned, "config": {"services": [{"internal_port": 8080, "protocol": "tcp",
                                                           "ports": [{"port": 80, "handlers": ["http"]}]}]}}


def status(mid: str, port: int, state: str = "started") -> dict:
    return {"id": mid, "app": APP, "host": "local", "state": state, "ports": {"8080": port}, "checks": {}}


class Platform:
    """A State on its own loop thread, so the bench (synchronous) writes records as the API would."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.st: State = self.run(State.connect(url))

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def put(self, bucket: str, key: str, value: dict) -> None:
        self.run(self.st.put(bucket, key, value))

    def drain(self, machines: list[str]) -> dict:
        from taxiway.platform import edge

        return self.run(edge.drain(self.st, machines, timeout=30))

    def close(self) -> None:
        self.run(self.st.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def rolling_deploy(p: Platform, ports: dict[str, int], machines: dict[str, Proc], d: Path) -> list[str]:
    """A -> B -> A: start the new one, cordon the old, drain it, stop it. Returns the steps done."""
    steps = []
    for old, new in ((MACHINE_A, MACHINE_B), (MACHINE_B, MACHINE_A)):
        if machines.get(new) is None:
            machines[new] = nginx(d / f"machine-{new}-{time.monotonic_ns()}", ports[new])
        p.put(schema.STATUS, f"{APP}.{new}", status(new, ports[new]))
        p.put(schema.MACHINES, f"{APP}.{new}", machine(new))
        time.sleep(0.5)
        p.put(schema.MACHINES, f"{APP}.{old}", machine(old, cordoned=True))
        answer = p.drain([old])
        machines.pop(old).stop()
        p.put(schema.STATUS, f"{APP}.{old}", status(old, ports[old], state="stopped"))
        steps.append(f"{old}->{new} drained={answer.get('drained')}")
        time.sleep(0.5)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per load run")
    ap.add_argument("--conns", default="1,50,500", help="connection counts")
    ap.add_argument("--repeat", type=int, default=2, help="runs per path (interleaved; best kept)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",")]
    if not shutil.which("nginx") or not shutil.which("go"):
        sys.exit("error: bench/edge.py needs nginx and go; fix: install nginx and golang-go (.ci/apt-packages.txt)")
    with tempfile.TemporaryDirectory(prefix="tw-bench-edge-") as tmp:
        d = Path(tmp)
        loadgen = _loadgen.build(d)
        ports = {MACHINE_A: free_port(), MACHINE_B: free_port()}
        machines: dict[str, Proc] = {MACHINE_A: nginx(d / "machine-a", ports[MACHINE_A]),
                                     MACHINE_B: nginx(d / "machine-b", ports[MACHINE_B])}
        nats = NatsServer(d / "nats").start()
        procs: list[Proc] = []
        p = Platform(nats.url)
        try:
            p.put(schema.APPS, APP, {"name": APP, "org": "personal"})
            for mid, cordoned in ((MACHINE_A, False), (MACHINE_B, True)):
                p.put(schema.MACHINES, f"{APP}.{mid}", machine(mid, cordoned=cordoned))
                p.put(schema.STATUS, f"{APP}.{mid}", status(mid, ports[mid]))
            edge_port, peer_port = free_port(), free_port()
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            procs.append(Proc([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats.url,
                               "--listen", f"127.0.0.1:{edge_port}"], edge_port, d / "edge.log", env=env))
            procs.append(nginx(d / "peer-nginx", peer_port, proxy_to=ports[MACHINE_A]))
            paths = {"direct": ports[MACHINE_A], "nginx": peer_port, "taxiway edge": edge_port}
            rows = []
            for c in conns:
                best: dict[str, dict] = {}
                for _ in range(a.repeat):
                    for name, port in paths.items():
                        r = _loadgen.run(loadgen, target=f"127.0.0.1:{port}", host=HOST, conns=c, seconds=a.seconds,
                                         reconnect=True)
                        if name not in best or r["rps"] > best[name]["rps"]:
                            best[name] = r
                for name, r in best.items():
                    rows.append((c, name, r, best["direct"]))
            # A rolling deploy under load, through the edge.
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(_loadgen.run(
                loadgen, target=f"127.0.0.1:{edge_port}", host=HOST, conns=50, seconds=a.seconds * 3, reconnect=True)))
            t.start()
            time.sleep(0.5)
            steps = rolling_deploy(p, ports, machines, d)
            t.join()
        finally:
            p.close()
            for proc in procs + list(machines.values()):
                proc.stop()
            nats.stop()
    nginx_rps = {c: r["rps"] for c, name, r, _ in rows if name == "nginx"}
    if a.markdown:
        print("| conns | path | req/s | p50 ms | p99 ms | added p50/p99 ms | vs nginx | errors |")
        print("|---|---|---|---|---|---|---|---|")
    for c, name, r, direct in rows:
        added = f"{r['p50_ms'] - direct['p50_ms']:+.2f}/{r['p99_ms'] - direct['p99_ms']:+.2f}"
        ratio = f"{r['rps'] / nginx_rps[c]:.2f}x" if name != "direct" else "-"
        if a.markdown:
            print(f"| {c} | {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added} | {ratio} | "
                  f"{r['errors']} |")
        else:
            print(f"{c:>4} conns  {name:<13} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  added {added}  {ratio:>6} nginx  errors {r['errors']}")
    print(f"rolling deploy under 50 connections through the edge: {result.get('requests', 0):,} requests, "
          f"{result.get('errors', '?')} failed{' (' + result['first_error'] + ')' if result.get('first_error') else ''}"
          f"; steps: {'; '.join(steps)}")
    for tool in ("caddy", "haproxy", "wrk"):
        if not shutil.which(tool):
            print(f"({tool} is not installed here: not measured)")


if __name__ == "__main__":
    main()
