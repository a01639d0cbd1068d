"""The edge's TLS side against nginx terminating TLS in front of the same machine, on loopback.

    .venv/bin/python bench/edge_tls.py [--repeat 3] [--requests 20000] [--handshakes 500] [--markdown]

One run starts, each with its own temp config and stopped after:
- an nginx "machine" on 127.0.0.1 answering GET /small with 3 bytes (one worker);
- a nats-server with the app's APPS/MACHINES/STATUS records, as the API and the agent write them;
- a taxiway CA in tmp; the edge (``python -m taxiway.platform.edge --https ...``, one process on
  uvloop) issues its ``web.localhost`` certificate on the first handshake (done before measuring);
- nginx as the peer (one worker, upstream keepalive 64) with a certificate of the same CA and
  key type for ``web.localhost``, ``listen ... ssl http2``; Caddy (GOMAXPROCS=1, ``tls CERT KEY``,
  ``reverse_proxy``) and HAProxy (one thread, ``ssl crt ... alpn h2,http/1.1``, ``http-reuse always``)
  the same way when they are installed.

Measured with h2load (nghttp2-client), one client thread, SNI ``web.localhost`` and
``--connect-to`` 127.0.0.1 (no name is resolved):
- new TLS connections per second: --handshakes clients at once, each a full handshake (no
  resumption) and one HTTP/1.1 request;
- HTTPS small requests per second over HTTP/1.1: 50 keep-alive connections, --requests requests;
- the same over HTTP/2: 10 connections x 10 concurrent streams.
Each figure is the best of --repeat runs, the paths interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from taxiway.platform import schema  # noqa: E402
from taxiway.platform.nats import NatsServer  # noqa: E402

APP, MID = "web", "00000000000a0a"
HOST = f"{APP}.localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
    def __init__(self, argv: list[str], port: int, log: Path, **kw) -> None:
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         stdin=subprocess.DEVNULL, **kw)
        wait_port(port, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def nginx(d: Path, port: int, proxy_to: int | None = None, cert: Path | None = None) -> Proc:
    d.mkdir(parents=True)
    for sub in ("tmp", "logs"):
        (d / sub).mkdir()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    if proxy_to is None:
        server = f"""server {{ listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "ok\\n"; }} }}"""
    else:
        server = f"""upstream machines {{ server 127.0.0.1:{proxy_to}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port} ssl http2 backlog=4096; server_name {HOST};
    ssl_certificate {cert}; ssl_certificate_key {cert}; ssl_protocols TLSv1.2 TLSv1.3;
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


def caddy(d: Path, port: int, proxy_to: int, cert: Path, key: Path) -> Proc:
    d.mkdir(parents=True)
    (d / "Caddyfile").write_text(f"""{{
  admin off
  auto_https off
  storage file_system {d}/data
}}
https://{HOST}:{port} {{
  bind 127.0.0.1
  tls {cert} {key}
  reverse_proxy 127.0.0.1:{proxy_to}
}}
""")
    env = {**os.environ, "GOMAXPROCS": "1", "HOME": str(d), "XDG_DATA_HOME": str(d / "data"),
           "XDG_CONFIG_HOME": str(d / "config")}
    return Proc(["caddy", "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"], port, d / "caddy.out",
                env=env)


def haproxy(d: Path, port: int, proxy_to: int, pem: Path) -> Proc:
    d.mkdir(parents=True)
    (d / "haproxy.cfg").write_text(f"""global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend edge
  bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1
  default_backend machines
backend machines
  http-reuse always
  server m 127.0.0.1:{proxy_to}
""")
    return Proc(["haproxy", "-db", "-f", str(d / "haproxy.cfg")], port, d / "haproxy.out")


def h2load(port: int, *args: str) -> dict:
    """One h2load run against https://web.localhost:PORT/small: {"rps", "ok", "failed"}."""
    out = subprocess.run(["h2load", "-t", "1", f"--connect-to=127.0.0.1:{port}", *args,
                          f"https://{HOST}:{port}/small"], capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m or not r:
        raise RuntimeError(f"h2load said:\n{out}")
    return {"rps": float(m[3]), "ok": int(r[2]), "failed": int(r[3]) + int(r[4])}


def put_records(nats_url: str, port: int) -> None:
    import asyncio

    from taxiway.platform.state import State

    async def go() -> None:
        st = await State.connect(nats_url)
        try:
            await st.put(schema.APPS, APP, {"name": APP, "org": "personal"})
            await st.put(schema.MACHINES, f"{APP}.{MID}", {
                "id": MID, "app": APP, "org": "personal", "region": "local", "host": "local", "desired": "started",
                "cordoned": False, "config": {"services": [{"internal_port": 8080, "protocol": "tcp",
                                                            "ports": [{"port": 80, "handlers": ["http"]}]}]}})
            await st.put(schema.STATUS, f"{APP}.{MID}", {"id": MID, "app": APP, "host": "local", "state": "started",
                                                         "ports": {"8080": port}, "checks": {}})
        finally:
            await st.close()

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per path and measure (interleaved; best kept)")
    ap.add_argument("--requests", type=int, default=20000, help="requests per keep-alive run")
    ap.add_argument("--handshakes", type=int, default=500, help="new connections per handshake run")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args()
    for tool in ("nginx", "h2load", "nats-server"):
        if not shutil.which(tool):
            sys.exit(f"error: bench/edge_tls.py needs {tool}; fix: install it (.ci/apt-packages.txt)")
    from taxiway.pki.ca import CA

    with tempfile.TemporaryDirectory(prefix="tw-bench-edge-tls-") as tmp:
        d = Path(tmp)
        ca, _ = CA.init(d / "ca")
        leaf = ca.issue([HOST], record=False)
        (d / "peer.pem").write_bytes(leaf.chain_pem + leaf.key_pem)  # type: ignore[operator]
        (d / "peer-chain.pem").write_bytes(leaf.chain_pem)
        (d / "peer-key.pem").write_bytes(leaf.key_pem)  # type: ignore[arg-type]
        mport, edge_http, edge_https, peer = free_port(), free_port(), free_port(), free_port()
        procs: list[Proc] = [nginx(d / "machine", mport)]
        nats = NatsServer(d / "nats").start()
        try:
            put_records(nats.url, mport)
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            procs.append(Proc([sys.executable, "-m", "taxiway.platform.edge", "--nats", nats.url,
                               "--listen", f"127.0.0.1:{edge_http}", "--https", f"127.0.0.1:{edge_https}",
                               "--ca", str(d / "ca"), "--tls-dir", str(d / "edge-tls")], edge_https, d / "edge.log",
                              env=env))
            procs.append(nginx(d / "peer", peer, proxy_to=mport, cert=d / "peer.pem"))
            paths = {"nginx": peer, "taxiway edge": edge_https}
            if shutil.which("caddy"):
                paths["caddy"] = free_port()
                procs.append(caddy(d / "caddy", paths["caddy"], mport, d / "peer-chain.pem", d / "peer-key.pem"))
            if shutil.which("haproxy"):
                paths["haproxy"] = free_port()
                procs.append(haproxy(d / "haproxy", paths["haproxy"], mport, d / "peer.pem"))
            for port in paths.values():  # warm-up: the edge issues its certificate on the first handshake
                h2load(port, "-n", "20", "-c", "2", "--h1")
            measures = {
                "new TLS connections/s (handshake + 1 request, HTTP/1.1)":
                    ["--h1", "-n", str(a.handshakes), "-c", str(a.handshakes)],
                "HTTPS small requests/s, HTTP/1.1, 50 connections": ["--h1", "-n", str(a.requests), "-c", "50"],
                "HTTPS small requests/s, HTTP/2, 10 connections x 10 streams":
                    ["-n", str(a.requests), "-c", "10", "-m", "10"],
            }
            best: dict[tuple[str, str], dict] = {}
            for _ in range(a.repeat):
                for what, args in measures.items():
                    for name, port in paths.items():
                        r = h2load(port, *args)
                        if (what, name) not in best or r["rps"] > best[(what, name)]["rps"]:
                            best[(what, name)] = r
        finally:
            for p in reversed(procs):
                p.stop()
            nats.stop()
    names = list(paths)
    others = [n for n in names if n != "taxiway edge"]
    if a.markdown:
        print("| measure | " + " | ".join(names) + " | " + " | ".join(f"edge / {n}" for n in others)
              + " | failed |")
        print("|---" * (len(names) + len(others) + 2) + "|")
    for what in measures:
        e = best[(what, "taxiway edge")]
        rates = [f"{best[(what, n)]['rps']:,.0f}" for n in names]
        ratios = [f"{e['rps'] / best[(what, n)]['rps']:.2f}x" for n in others]
        failed = "/".join(str(best[(what, n)]["failed"]) for n in names)
        if a.markdown:
            print(f"| {what} | " + " | ".join(rates) + " | " + " | ".join(ratios) + f" | {failed} |")
        else:
            print(f"{what}\n  " + "  ".join(f"{n} {r}" for n, r in zip(names, rates, strict=True))
                  + "  edge/" + "  edge/".join(f"{n} {r}" for n, r in zip(others, ratios, strict=True))
                  + f"  failed {failed}")


if __name__ == "__main__":
    main()
