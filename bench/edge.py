"""The platform's edge side by side with nginx, Caddy and HAProxy as reverse proxies, and direct.

    .venv/bin/python bench/edge.py [--seconds 3] [--conns 1,50,500] [--repeat 2] [--tool wrk|go] [--markdown]

One run starts, each with its own temp config and stopped after:
- two nginx "machines" on 127.0.0.1 (each answers GET /small with 3 bytes), one worker each,
  and a WebSocket echo machine (bench/_wsecho.py, Go);
- a nats-server with JetStream, and the apps' APPS/MACHINES/STATUS records written as the API
  and the agent write them (machine A routed, B started but cordoned; app "ws": the echo);
- the edge (``python -m taxiway.platform.edge``, one process on uvloop);
- the peers, each on one core as the edge is: nginx (one worker, upstream keepalive 64),
  Caddy (GOMAXPROCS=1) and HAProxy (nbthread 1, http-reuse always) when installed, routing
  to machine A and /ws to the echo machine.

Measured:
- small requests at each --conns with wrk (one thread; --tool go: bench/_loadgen.py):
  ``Host: web.localhost``, requests/s, p50/p99; "added" is p50/p99 minus direct's. Each path
  runs --repeat times interleaved, best kept.
- WebSocket echo: 50 WebSockets through each path, a 128-byte frame and its echo at a time
  on each, messages/s and p50/p99.
- a rolling deploy under load through the edge: 50 connections for --seconds x 3 while
  machine B is uncordoned, A cordoned, drained (edge.drain) and stopped (kill + STATUS
  "stopped"), then A comes back and B goes: failed requests must be 0.

Targets (issue 18): >= 0.5x nginx's requests/s, >= 1.0x Caddy's, added p99 < 2 ms at 50
connections, 0 failed requests during a deploy. The scale-to-zero wake-up is bench/edge_wake.py.
Nothing leaves loopback; no name is resolved (the clients dial 127.0.0.1 and send the Host
header themselves).
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
import _wsecho  # noqa: E402  (bench/_wsecho.py: WebSocket echo machine and ping-pong client, Go)

from taxiway.platform import schema  # noqa: E402
from taxiway.platform.nats import NatsServer  # noqa: E402
from taxiway.platform.state import State  # noqa: E402

APP = "web"
HOST = f"{APP}.localhost"
MACHINE_A, MACHINE_B = "00000000000a0a", "00000000000b0b"
WS_MACHINE = "00000000000e0e"


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


def nginx(d: Path, port: int, proxy_to: int | None = None, ws_to: int | None = None) -> Proc:
    """nginx answering /small itself (a machine), or proxying to 127.0.0.1:``proxy_to`` (the peer;
    /ws to the WebSocket echo machine on ``ws_to``)."""
    d.mkdir(parents=True)
    for sub in ("tmp", "logs"):
        (d / sub).mkdir()
    nginx_conf(d, port, proxy_to, ws_to)
    return Proc(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/error.log")],
                port, d / "nginx.out")


def nginx_conf(d: Path, port: int, proxy_to: int | None = None, ws_to: int | None = None) -> None:
    """Write ``d``/nginx.conf (see :func:`nginx`); a running nginx takes a new one on SIGHUP."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    if proxy_to is None:
        server = f"""server {{ listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "ok\\n"; }} }}"""
    else:
        server = f"""upstream machines {{ server 127.0.0.1:{proxy_to}; keepalive 64; }}
  upstream wsecho {{ server 127.0.0.1:{ws_to or proxy_to}; }}
  server {{ listen 127.0.0.1:{port} backlog=4096;
    location / {{ proxy_pass http://machines; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_buffering off; }}
    location /ws {{ proxy_pass http://wsecho; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade"; proxy_set_header Host $host; proxy_read_timeout 300s; }} }}"""
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


def nginx_reload(peer: Proc, d: Path, port: int, ports: dict[str, int], ws_to: int) -> list[str]:
    """The nginx way of a deploy: the upstream changed in the config, then ``nginx -s reload``
    (SIGHUP), A -> B -> A. Returns the steps done."""
    steps = []
    for new in (MACHINE_B, MACHINE_A):
        nginx_conf(d, port, ports[new], ws_to)
        os.kill(peer.proc.pid, signal.SIGHUP)
        steps.append(f"reload to {new}")
        time.sleep(1.0)
    return steps


def caddy(d: Path, port: int, proxy_to: int, ws_to: int) -> Proc:
    """Caddy as the peer reverse proxy (one core: GOMAXPROCS=1, as nginx has one worker)."""
    d.mkdir(parents=True)
    (d / "Caddyfile").write_text(f"""{{
  admin off
  auto_https off
}}
http://:{port} {{
  bind 127.0.0.1
  reverse_proxy /ws* 127.0.0.1:{ws_to}
  reverse_proxy 127.0.0.1:{proxy_to}
}}
""")
    env = {**os.environ, "GOMAXPROCS": "1", "HOME": str(d), "XDG_DATA_HOME": str(d / "data"),
           "XDG_CONFIG_HOME": str(d / "config")}
    return Proc(["caddy", "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"], port,
                d / "caddy.out", env=env)


def haproxy(d: Path, port: int, proxy_to: int, ws_to: int) -> Proc:
    """HAProxy as the peer reverse proxy (one thread, pooled server connections)."""
    d.mkdir(parents=True)
    (d / "haproxy.cfg").write_text(f"""global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout tunnel 300s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  use_backend ws if {{ path_beg /ws }}
  default_backend machines
backend machines
  http-reuse always
  server a 127.0.0.1:{proxy_to}
backend ws
  server e 127.0.0.1:{ws_to}
""")
    return Proc(["haproxy", "-db", "-f", str(d / "haproxy.cfg")], port, d / "haproxy.out")


def wrk(port: int, conns: int, seconds: float) -> dict:
    """One wrk run (one thread) of GET /small with Host web.localhost: requests/s, p50/p99, errors."""
    import re

    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
                          "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/small"],
                         capture_output=True, text=True, timeout=seconds + 120).stdout

    def ms(p: str) -> float:
        m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx[1]) if non2xx else 0
    return {"rps": float(rps[1]) if rps else 0.0, "p50_ms": ms("50"), "p99_ms": ms("99"), "errors": errors}


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
    ap.add_argument("--tool", choices=("wrk", "go"), default="wrk" if shutil.which("wrk") else "go",
                    help="load generator for small requests (default: wrk when installed)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="also measure the edge with this many worker processes (default: one per core)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",")]
    if not shutil.which("nginx") or not shutil.which("go"):
        sys.exit("error: bench/edge.py needs nginx and go; fix: install nginx and golang-go (.ci/apt-packages.txt)")
    missing = [t for t in ("caddy", "haproxy") if not shutil.which(t)]
    with tempfile.TemporaryDirectory(prefix="tw-bench-edge-") as tmp:
        d = Path(tmp)
        loadgen = _loadgen.build(d)
        wsecho = _wsecho.build(d)
        ports = {MACHINE_A: free_port(), MACHINE_B: free_port()}
        machines: dict[str, Proc] = {MACHINE_A: nginx(d / "machine-a", ports[MACHINE_A]),
                                     MACHINE_B: nginx(d / "machine-b", ports[MACHINE_B])}
        echo_proc, echo_port = _wsecho.serve(wsecho, d / "wsecho.log")
        nats = NatsServer(d / "nats").start()
        procs: list[Proc] = []
        p = Platform(nats.url)
        try:
            p.put(schema.APPS, APP, {"name": APP, "org": "personal"})
            for mid, cordoned in ((MACHINE_A, False), (MACHINE_B, True)):
                p.put(schema.MACHINES, f"{APP}.{mid}", machine(mid, cordoned=cordoned))
                p.put(schema.STATUS, f"{APP}.{mid}", status(mid, ports[mid]))
            p.put(schema.APPS, "ws", {"name": "ws", "org": "personal"})  # the WebSocket echo machine
            p.put(schema.MACHINES, f"ws.{WS_MACHINE}", {**machine(WS_MACHINE), "app": "ws"})
            p.put(schema.STATUS, f"ws.{WS_MACHINE}", {**status(WS_MACHINE, echo_port), "app": "ws"})
            edge_port = free_port()
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            procs.append(Proc([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats.url,
                               "--listen", f"127.0.0.1:{edge_port}"], edge_port, d / "edge.log", env=env))
            paths = {"direct": ports[MACHINE_A]}
            peer = free_port()
            nginx_peer = nginx(d / "peer-nginx", peer, proxy_to=ports[MACHINE_A], ws_to=echo_port)
            procs.append(nginx_peer)
            paths["nginx"] = peer
            if "caddy" not in missing:
                peer = free_port()
                procs.append(caddy(d / "peer-caddy", peer, ports[MACHINE_A], echo_port))
                paths["caddy"] = peer
            if "haproxy" not in missing:
                peer = free_port()
                procs.append(haproxy(d / "peer-haproxy", peer, ports[MACHINE_A], echo_port))
                paths["haproxy"] = peer
            paths["taxiway edge"] = edge_port
            if a.workers > 1:  # the same edge as SO_REUSEPORT workers, one per core
                wport = free_port()
                procs.append(Proc([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats.url,
                                   "--listen", f"127.0.0.1:{wport}", "--workers", str(a.workers)], wport,
                                  d / "edge-workers.log", env=env))
                paths[f"edge x{a.workers}"] = wport
            rows = []
            for c in conns:
                best: dict[str, dict] = {}
                for _ in range(a.repeat):
                    for name, port in paths.items():
                        if a.tool == "wrk":
                            r = wrk(port, c, a.seconds)
                        else:
                            r = _loadgen.run(loadgen, target=f"127.0.0.1:{port}", host=HOST, conns=c,
                                             seconds=a.seconds, reconnect=True)
                        if name not in best or r["rps"] > best[name]["rps"]:
                            best[name] = r
                for name, r in best.items():
                    rows.append((c, name, r, best["direct"]))
            ws_rows = []
            for name, port in paths.items():
                port = echo_port if name == "direct" else port
                ws_rows.append((name, max((_wsecho.run(wsecho, target=f"127.0.0.1:{port}", conns=50,
                                                       seconds=a.seconds) for _ in range(a.repeat)),
                                          key=lambda r: r["per_s"])))
            # A rolling deploy under load, through the edge.
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(_loadgen.run(
                loadgen, target=f"127.0.0.1:{edge_port}", host=HOST, conns=50, seconds=a.seconds * 3, reconnect=True)))
            t.start()
            time.sleep(0.5)
            steps = rolling_deploy(p, ports, machines, d)
            t.join()
            # The same under nginx: its upstream changed in the config and reloaded (both machines up).
            machines[MACHINE_B] = nginx(d / f"machine-b-{time.monotonic_ns()}", ports[MACHINE_B])
            reload_result: dict = {}
            t = threading.Thread(target=lambda: reload_result.update(_loadgen.run(
                loadgen, target=f"127.0.0.1:{paths['nginx']}", host=HOST, conns=50, seconds=a.seconds * 3,
                reconnect=True)))
            t.start()
            time.sleep(0.5)
            reload_steps = nginx_reload(nginx_peer, d / "peer-nginx", paths["nginx"], ports, echo_port)
            t.join()
        finally:
            p.close()
            for proc in procs + list(machines.values()):
                proc.stop()
            echo_proc.terminate()
            echo_proc.wait()
            nats.stop()
    nginx_rps = {c: r["rps"] for c, name, r, _ in rows if name == "nginx"}
    caddy_rps = {c: r["rps"] for c, name, r, _ in rows if name == "caddy"}
    print(f"small requests ({a.tool}, {a.seconds:g} s runs, best of {a.repeat}; every proxy on one core):")
    if a.markdown:
        print("| conns | path | req/s | p50 ms | p99 ms | added p50/p99 ms | vs nginx | vs Caddy | errors |")
        print("|---|---|---|---|---|---|---|---|---|")
    for c, name, r, direct in rows:
        added = f"{r['p50_ms'] - direct['p50_ms']:+.2f}/{r['p99_ms'] - direct['p99_ms']:+.2f}"
        ratio = f"{r['rps'] / nginx_rps[c]:.2f}x" if name != "direct" else "-"
        vs_caddy = f"{r['rps'] / caddy_rps[c]:.2f}x" if name != "direct" and caddy_rps.get(c) else "-"
        if a.markdown:
            print(f"| {c} | {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added} | {ratio} | "
                  f"{vs_caddy} | {r['errors']} |")
        else:
            print(f"{c:>4} conns  {name:<13} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  added {added}  {ratio:>6} nginx  {vs_caddy:>6} caddy  "
                  f"errors {r['errors']}")
    print("WebSocket echo, 50 connections, 128-byte messages ping-pong:")
    ws_nginx = dict(ws_rows).get("nginx", {}).get("per_s") or 1
    for name, r in ws_rows:
        print(f"  {name:<13} {r['per_s']:>9,.0f} msg/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
              f"{r['per_s'] / ws_nginx:.2f}x nginx  errors {r['errors']}")
    print(f"rolling deploy under 50 connections through the edge: {result.get('requests', 0):,} requests, "
          f"{result.get('errors', '?')} failed{' (' + result['first_error'] + ')' if result.get('first_error') else ''}"
          f"; steps: {'; '.join(steps)}")
    print(f"nginx reloaded with a changed upstream under 50 connections: {reload_result.get('requests', 0):,} "
          f"requests, {reload_result.get('errors', '?')} failed"
          f"{' (' + reload_result['first_error'] + ')' if reload_result.get('first_error') else ''}"
          f"; steps: {'; '.join(reload_steps)}")
    for tool in missing:
        print(f"({tool} is not installed here: not measured)")


if __name__ == "__main__":
    main()
