"""The egress proxy side by side with squid and with no proxy at all, all on loopback.

    .venv/bin/python bench/egress.py [--seconds 3] [--big-mib 512] [--markdown]

One run starts, each with its own temp config and stopped after:
- nginx on 127.0.0.2 (the upstream: /small answers 3 bytes, /big is a file);
- squid (Debian's) as a plain forward proxy on 127.0.0.1, no cache, no logs;
- ``taxiway egress serve`` on 127.0.0.1 with ``--allow-range 127.0.0.2/32``
  (its JSON decision logs go to a file, as in production).

Measured, per path (direct / squid / taxiway):
- CONNECT throughput: curl downloads /big through a CONNECT tunnel (direct: no proxy),
  best of --rounds rounds, the three paths interleaved in each round;
- small requests: the Go load generator (bench/_loadgen.py, shared with bench/edge.py)
  opens C connections (1, 50, 500), sends one warm-up request on each, then keep-alive
  GET /small on all of them for a fixed time; for the proxies both through CONNECT tunnels and as absolute-form HTTP. It
  reports requests/s, p50/p99 latency and errors; "added" is the p50/p99 minus direct's.
  Each path runs --repeat times, interleaved, and its best run (by requests/s) is kept:
  the machine's other load varies, and this keeps it from favouring whoever ran last.

Targets (issue 6): throughput >= 1.0x squid and >= 0.7x direct; p50 added < 1 ms at
low concurrency; 500 concurrent tunnels with no errors. Nothing leaves loopback: the
targets are IP literals and both proxies get a loopback DNS server that is never asked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _loadgen  # noqa: E402  (bench/_loadgen.py: the Go load generator shared with bench/edge.py)

UPSTREAM_HOST = "127.0.0.2"

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on {host}:{port}")


@contextlib.contextmanager
def process(argv: list[str], host: str, port: int, log: Path, **kw):
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    try:
        wait_port(host, port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def nginx(d: Path, port: int, big_mib: int):
    www = d / "www"
    www.mkdir(parents=True)
    with open(www / "big", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(big_mib):
            f.write(block)
    for sub in ("tmp", "logs"):
        (d / sub).mkdir()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  sendfile on; tcp_nodelay on; keepalive_requests 100000000; keepalive_timeout 300;
  server {{
    listen {UPSTREAM_HOST}:{port} backlog=4096;
    root {www};
    location = /small {{ default_type text/plain; return 200 "ok\\n"; }}
  }}
}}
""")
    return process(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/error.log")],
                   UPSTREAM_HOST, port, d / "nginx.out")


def squid(d: Path, port: int):
    d.mkdir(parents=True)
    os.chmod(d, 0o777)  # squid drops to its own user when started as root
    (d / "squid.conf").write_text(f"""http_port 127.0.0.1:{port}
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
visible_hostname bench.invalid
dns_nameservers 127.0.0.1
max_filedescriptors 16384
shutdown_lifetime 1 seconds
via off
forwarded_for delete
""")
    return process(["squid", "-N", "-f", str(d / "squid.conf")], "127.0.0.1", port, d / "squid.out")


def taxiway(d: Path, port: int):
    d.mkdir(parents=True)
    argv = [sys.executable, "-m", "taxiway", "egress", "serve", "--listen", f"127.0.0.1:{port}",
            "--allow-range", f"{UPSTREAM_HOST}/32", "--resolver", "127.0.0.1:9", "--max-tunnels", "20000"]
    # No proxy authentication (squid runs without it too): PROXY_PASSWORD unset, not empty, which
    # the proxy refuses as a likely mistake.
    env = {k: v for k, v in os.environ.items() if k != "PROXY_PASSWORD"}
    env["PYTHONPATH"] = str(REPO / "src")
    return process(argv, "127.0.0.1", port, d / "taxiway.log", env=env)


def throughput(proxy: str | None, url: str) -> float:
    """MB/s of one download of ``url`` (through a CONNECT tunnel if ``proxy``)."""
    best = 0.0
    for _ in range(1):
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}", "--max-time", "60"]
        if proxy:
            argv += ["-p", "-x", f"http://{proxy}"]
        out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=90,
                             env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()}).stdout
        speed, code = out.split()
        if code != "200":
            raise RuntimeError(f"download via {proxy} answered {code}")
        best = max(best, float(speed) / 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per load run")
    ap.add_argument("--big-mib", type=int, default=512, help="size of the large transfer")
    ap.add_argument("--concurrency", default="1,50,500")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (best kept)")
    ap.add_argument("--repeat", type=int, default=2, help="load runs per path and level (best kept)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    for tool in ("nginx", "squid", "curl", "go"):
        if not shutil.which(tool):
            sys.exit(f"error: {tool} is not installed; run scripts/install-deps.sh")
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-egress-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        loadgen = _loadgen.build(d)
        up_port, squid_port, tw_port = free_port(UPSTREAM_HOST), free_port(), free_port()
        target = f"{UPSTREAM_HOST}:{up_port}"
        with contextlib.ExitStack() as stack:
            stack.enter_context(nginx(d / "nginx", up_port, args.big_mib))
            stack.enter_context(squid(d / "squid", squid_port))
            stack.enter_context(taxiway(d / "taxiway", tw_port))
            proxies = {"squid": f"127.0.0.1:{squid_port}", "taxiway": f"127.0.0.1:{tw_port}"}
            big = f"http://{target}/big"
            results: dict = {"throughput_MBps": {}, "load": []}
            print(f"== CONNECT throughput, {args.big_mib} MiB download, best of {args.rounds} interleaved "
                  "rounds (MB/s)", flush=True)
            paths = {"direct": None, **proxies}
            tp = results["throughput_MBps"]
            for _ in range(args.rounds):
                for name, addr in paths.items():
                    tp[name] = max(tp.get(name, 0.0), throughput(addr, big))
            for name, v in tp.items():
                print(f"  {name:8} {v:9.1f}")
            print(f"  taxiway/squid {tp['taxiway'] / tp['squid']:.2f}x   taxiway/direct {tp['taxiway'] / tp['direct']:.2f}x")
            print(f"== small requests, keep-alive GET /small for {args.seconds:g}s per run", flush=True)
            print(f"  {'path':18} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'+p50 ms':>8} {'+p99 ms':>8} {'held':>5} {'errors':>6}")
            runs = [("direct", "direct", None)] + [
                (f"{name} {mode}", mode, addr) for name, addr in proxies.items() for mode in ("connect", "http")]
            for c in levels:
                best: dict[str, dict] = {}
                for _ in range(args.repeat):  # interleaved, keep each path's best run
                    for label, mode, addr in runs:
                        r = _loadgen.run(loadgen, mode=mode, proxy=addr, target=target, conns=c,
                                         seconds=args.seconds)
                        if label not in best or r["rps"] > best[label]["rps"]:
                            best[label] = r
                direct = best["direct"]
                rows = [(label, best[label]) for label, _, _ in runs]
                for label, r in rows:
                    r.update(path=label, conns=c, added_p50_ms=r["p50_ms"] - direct["p50_ms"],
                             added_p99_ms=r["p99_ms"] - direct["p99_ms"])
                    results["load"].append(r)
                    print(f"  {label:18} {c:5} {r['rps']:9.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                          f"{r['added_p50_ms']:8.3f} {r['added_p99_ms']:8.3f} {r['connections_held']:5} "
                          f"{r['errors']:6}", flush=True)
            by = {(r["path"], r["conns"]): r for r in results["load"]}
            print("== ratios (taxiway vs squid, same mode)")
            for c in levels:
                for mode in ("connect", "http"):
                    t, s = by[(f"taxiway {mode}", c)], by[(f"squid {mode}", c)]
                    print(f"  {mode:8} c={c:<4} req/s {t['rps'] / s['rps']:.2f}x   "
                          f"p50 {t['p50_ms']:.3f} vs {s['p50_ms']:.3f} ms")
            if args.markdown:
                print("\n| path | conns | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
                      "req/conn min-max | errors |")
                print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
                for r in results["load"]:
                    print(f"| {r['path']} | {r['conns']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
                          f"| {r['added_p50_ms']:.3f} | {r['added_p99_ms']:.3f} "
                          f"| {r['min_per_conn']}-{r['max_per_conn']} | {r['errors']} |")
            json_out = os.environ.get("BENCH_JSON")
            if json_out:
                Path(json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
