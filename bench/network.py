"""The private network (fabric) side by side with a plain veth pair between two network namespaces.

    sudo .venv/bin/python bench/network.py [--seconds 3] [--rounds 3] [--pings 2000] [--markdown]

Both paths are made in a temp dir and removed after; nothing touches the host's netns:
- **fabric**: a real platform fabric (platform.fabric: its own netns, ip6tables anti-spoofing
  in raw, the org filter in FORWARD, conntrack) with two namespaces plugged into it as the agent
  plugs machines (same org; each namespace is exactly what a machine's PID 1 joins), so a
  packet goes veth -> fabric (routed, filtered) -> veth;
- **veth**: two namespaces joined directly by one veth pair (fd00:be::1 / fd00:be::2), no rules.

Measured, each path alternately for --rounds, medians kept:
- TCP throughput: iperf3 (Debian's) server in one namespace, client in the other, --seconds;
- TCP latency: a 1-byte request/response over one connection, --pings round trips, p50/p99
  (Python sockets made inside the namespaces; the loop is the same for both paths).

Target (issue 17): fabric throughput >= 0.8x veth's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from taxiway.platform import fabric  # noqa: E402


def veth_pair(root: Path) -> tuple[Path, Path, str]:
    a, b = root / "va", root / "vb"
    for p in (a, b):
        fabric._new_netns(p)
    subprocess.run(["nsenter", f"--net={a}", "sh", "-ec",
                    f"ip link set lo up; ip link add veth0 type veth peer name veth0 netns {b};"
                    "ip addr add fd00:be::1/64 dev veth0 nodad; ip link set veth0 up"], check=True)
    subprocess.run(["nsenter", f"--net={b}", "sh", "-ec",
                    "ip link set lo up; ip addr add fd00:be::2/64 dev veth0 nodad; ip link set veth0 up"], check=True)
    return a, b, "fd00:be::2"


def fabric_pair(root: Path) -> tuple[Path, Path, str, fabric.Fabric]:
    fab = fabric.Fabric(root / "net")
    a = fab.plug("bench-a", 1, 1)
    b = fab.plug("bench-b", 1, 2)
    return a, b, str(fab.info("bench-b")["address"]), fab


def iperf(a: Path, b: Path, addr: str, seconds: float) -> float:
    """Gbit/s from a to b (one TCP stream)."""
    srv = subprocess.Popen(["nsenter", f"--net={b}", "iperf3", "-s", "-1", "-B", addr, "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until the server listens (a probe connection would be taken as a client)
            ss = subprocess.run(["nsenter", f"--net={b}", "ss", "-Hltn", "sport = :5201"], capture_output=True, text=True)
            if ss.stdout.strip():
                break
            time.sleep(0.05)
        r = subprocess.run(["nsenter", f"--net={a}", "iperf3", "-c", addr, "-p", "5201", "-t", str(seconds), "-J"],
                           capture_output=True, text=True, timeout=seconds + 60)
        got = json.loads(r.stdout) if r.stdout.strip() else {}
        if r.returncode != 0 or "sum_received" not in got.get("end", {}):
            raise RuntimeError(f"iperf3 failed: {got.get('error') or r.stderr[-300:]}")
        return got["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        if srv.poll() is None:
            try:
                srv.wait(timeout=10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()


def pingpong(a: Path, b: Path, addr: str, n: int) -> list[float]:
    """Round-trip times (µs) of a 1-byte request/response over one TCP connection."""
    srv = fabric.run_in(b, lambda: socket.create_server((addr, 0), family=socket.AF_INET6))
    port = srv.getsockname()[1]

    def echo() -> None:
        c, _ = srv.accept()
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := c.recv(1):
                c.sendall(data)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    cli = fabric.run_in(a, lambda: socket.create_connection((addr, port)))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            cli.sendall(b"x")
            cli.recv(1)
            out.append((time.perf_counter() - t0) * 1e6)
    finally:
        cli.close()
        t.join(5)
        srv.close()
    return out[n // 10:]  # warm-up dropped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: bench/network.py makes network namespaces; run it as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tw-bench-net-") as tmp:
        root = Path(tmp)
        try:
            va, vb, vaddr = veth_pair(root)
            fa, fb, faddr, fab = fabric_pair(root)
            res: dict[str, dict[str, list[float]]] = {"fabric": {"gbps": [], "p50": [], "p99": []},
                                                      "veth": {"gbps": [], "p50": [], "p99": []}}
            for i in range(args.rounds):
                order = [("fabric", fa, fb, faddr), ("veth", va, vb, vaddr)]
                for name, a, b, addr in order if i % 2 == 0 else order[::-1]:
                    res[name]["gbps"].append(iperf(a, b, addr, args.seconds))
                    rtt = sorted(pingpong(a, b, addr, args.pings))
                    res[name]["p50"].append(rtt[len(rtt) // 2])
                    res[name]["p99"].append(rtt[int(len(rtt) * 0.99)])
                    print(f"round {i + 1} {name}: {res[name]['gbps'][-1]:.2f} Gbit/s, "
                          f"p50 {res[name]['p50'][-1]:.0f} µs, p99 {res[name]['p99'][-1]:.0f} µs", file=sys.stderr)
        finally:
            fabric.release_all(root)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    ratio = med["fabric"]["gbps"] / med["veth"]["gbps"]
    # each round's fabric and veth runs are back to back: their ratio is less exposed to the load's swings
    paired = statistics.median(f / v for f, v in zip(res["fabric"]["gbps"], res["veth"]["gbps"], strict=True))
    load = os.getloadavg()[0]
    if args.markdown:
        print("| path | TCP throughput (Gbit/s) | RTT p50 (µs) | RTT p99 (µs) |\n|---|---|---|---|")
        for n in ("fabric", "veth"):
            print(f"| {n} | {med[n]['gbps']:.2f} | {med[n]['p50']:.0f} | {med[n]['p99']:.0f} |")
        print(f"\nfabric / veth throughput: **{ratio:.2f}x** of the medians, {paired:.2f}x median of the rounds' "
              f"ratios (target >= 0.8x); {args.rounds} rounds of {args.seconds:g} s, {args.pings} pings; "
              f"load {load:.1f} at the end")
    else:
        print(json.dumps({"median": med, "ratio": ratio, "paired_ratio": paired, "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
