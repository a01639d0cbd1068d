"""The platform's .internal DNS server side by side with dnsmasq serving the same records.

    .venv/bin/python bench/dns.py [--seconds 10] [--rate 1000] [--machines 10] [--markdown]

One run, everything on loopback in a temp dir, removed after:
- **taxiway**: ``python -m taxiway.platform.dnsserver`` (uvloop) with a real nats-server as its
  state: app ``web`` with ``--machines`` started machines in two regions, app ``db`` with one;
  the client's source 127.0.0.1 is mapped to their org with ``--org-of``.
- **dnsmasq** (Debian's dnsmasq-base, its own cache off, no upstream): the same names and
  records as --host-record / --txt-record lines, TTL 5 s (``--local-ttl``), ``--local=/internal/``.

Before measuring, every name is asked of both with dig and the answers compared (sorted), so
both serve the same data. The client is dnsperf (Debian's), the same for both, over UDP:
1. **paced**: ``-Q --rate`` queries/s for --seconds, every response's latency logged (``-v``),
   p50/p99/max computed here; the issue's target is p99 < 2 ms at 1,000 queries/s;
2. **flat out**: no rate limit, 4 clients, 64 queries in flight, for --seconds/2: queries/s.
The two servers take turns for --rounds rounds (medians reported, each round's p99 shown): on a
shared machine the tail is mostly other processes' load, and alternating lets both see it.
The query mix is the names an app asks: <app>.internal (most), <region>.<app>.internal,
<id>.vm.<app>.internal, topN.nearest.of, vms/regions TXT, _apps TXT.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from taxiway.platform import dns, schema  # noqa: E402
from taxiway.platform.nats import NatsServer, free_port  # noqa: E402
from taxiway.platform.state import NATS_URL_ENV, State  # noqa: E402

ORG = "bench"


def ip(n: int) -> str:
    return str(ipaddress.IPv6Address((0xFDAA << 112) | (7 << 80) | (1 << 64) | n))


def layout(count: int) -> list[dns.Machine]:
    web = [dns.Machine(f"{n:014x}", "web", "ams" if n % 3 else "ord", "app", "started", ip(n + 1))
           for n in range(count)]
    return [*web, dns.Machine("000000000000db", "db", "ams", "app", "started", ip(500))]


def questions(machines: list[dns.Machine]) -> list[tuple[str, str]]:
    web = [m for m in machines if m.app == "web"]
    qs = [("web.internal", "AAAA")] * 6 + [("db.internal", "AAAA")] * 2
    qs += [("ams.web.internal", "AAAA"), ("ord.web.internal", "AAAA"), ("top2.nearest.of.web.internal", "AAAA"),
           ("vms.web.internal", "TXT"), ("regions.web.internal", "TXT"), ("_apps.internal", "TXT")]
    qs += [(f"{m.id}.vm.web.internal", "AAAA") for m in web[:4]]
    return qs


def dnsmasq_args(snap: dns.Snapshot, qs: list[tuple[str, str]], port: int, log: Path) -> list[str]:
    """dnsmasq serving exactly what taxiway's core answers (asked of the core itself)."""
    asker = dns.Asker(ORG)
    args = ["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--listen-address=127.0.0.1", f"--port={port}", "--local=/internal/", f"--local-ttl={dns.TTL}",
            "--cache-size=0", f"--pid-file={log.parent / 'dnsmasq.pid'}", f"--log-facility={log}", "--user=root"]
    for name, qtype in sorted(set(qs)):
        ans = dns.resolve(snap, asker, name, qtype)
        for r in ans.records:
            if r.type == "AAAA":
                args.append(f"--host-record={name},{r.value}")
            else:  # raw TXT rdata (dnsmasq's --txt-record splits strings at commas, which these hold)
                raw = b"".join(bytes([len(s.encode())]) + s.encode() for s in r.value)
                args.append(f"--dns-rr={name},16,{raw.hex(':')}")
    return args


def dig(port: int, name: str, qtype: str) -> list[str]:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, qtype, "+short", "+tries=1", "+time=3"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or ";;" in out.stdout:   # no answer (not up yet): nothing
        return []
    return sorted(out.stdout.split())


def dnsperf(port: int, datafile: Path, seconds: float, rate: int | None) -> dict:
    args = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-l", str(seconds), "-t", "2"]
    if rate:
        args += ["-Q", str(rate), "-c", "1", "-q", "64", "-v"]
    else:
        args += ["-c", "4", "-T", "2", "-q", "64"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    res: dict = {}
    lat = []
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("> ") and rate:   # "> NOERROR web.internal AAAA 0.000143"
            lat.append(float(s.split()[-1]) * 1000)
        elif s.startswith("Queries per second:"):
            res["qps"] = float(s.split(":")[1])
        elif s.startswith("Queries lost:"):
            res["lost"] = int(s.split(":")[1].split("(")[0])
        elif s.startswith("Queries completed:"):
            res["completed"] = int(s.split(":")[1].split("(")[0])
        elif s.startswith("Average Latency (s):"):
            res["avg_ms"] = float(s.split(":")[1].split("(")[0]) * 1000
    if lat:
        lat.sort()
        res["p50_ms"] = statistics.median(lat)
        res["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        res["max_ms"] = lat[-1]
        res["samples"] = len(lat)
    return res


async def load_state(url: str, machines: list[dns.Machine]) -> None:
    async with await State.connect(url) as st:
        for app in sorted({m.app for m in machines}):
            await st.put(schema.APPS, app, {"name": app, "org": ORG})
        for m in machines:
            key = schema.machine_key(m.app, m.id)
            await st.put(schema.MACHINES, key, {"id": m.id, "app": m.app, "region": m.region,
                                                "process_group": m.process_group, "desired": "started"})
            await st.put(schema.STATUS, key, {"id": m.id, "app": m.app, "state": "started",
                                              "private_ip": m.private_ip})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="paced run per round (flat out: half)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds; medians reported")
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--machines", type=int, default=10)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    for tool in ("dnsmasq", "dnsperf", "dig", "nats-server"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"error: {tool} is not installed; apt-get install dnsmasq-base dnsperf dnsutils nats-server")
    load_before = os.getloadavg()
    machines = layout(a.machines)
    snap = dns.Snapshot({"web": ORG, "db": ORG}, machines)
    qs = questions(machines)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    procs: list[subprocess.Popen] = []
    nats = NatsServer(tmp / "nats").start()
    try:
        asyncio.run(load_state(nats.url, machines))
        tw_port, mq_port = free_port(), free_port()
        tw_log = open(tmp / "dns.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "taxiway.platform.dnsserver", "--nats", nats.address,
             "--listen", f"127.0.0.1:{tw_port}", "--org-of", f"127.0.0.1/32={ORG}",
             "--upstream", f"127.0.0.1:{free_port()}"],
            stdout=tw_log, stderr=subprocess.STDOUT, env={**os.environ, NATS_URL_ENV: nats.url_for("dns")}))
        procs.append(subprocess.Popen(dnsmasq_args(snap, qs, mq_port, tmp / "dnsmasq.log"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not (dig(tw_port, "web.internal", "AAAA") and dig(mq_port, "web.internal", "AAAA")):
            if time.monotonic() > deadline:
                sys.exit("error: a server did not answer within 30 s; see " + str(tmp))
            time.sleep(0.2)
        for name, qtype in sorted(set(qs)):
            t, m = dig(tw_port, name, qtype), dig(mq_port, name, qtype)
            if t != m or not t:
                sys.exit(f"error: {name} {qtype}: taxiway {t} != dnsmasq {m}")
        data = tmp / "queries.txt"
        data.write_text("".join(f"{n} {t}\n" for n, t in qs))
        runs: dict[str, list[dict]] = {"taxiway": [], "dnsmasq": []}
        for _ in range(a.rounds):  # alternated, so both see the same moments of a shared machine's load
            for label, port in (("taxiway", tw_port), ("dnsmasq", mq_port)):
                runs[label].append({"paced": dnsperf(port, data, a.seconds, a.rate),
                                    "flat": dnsperf(port, data, max(a.seconds / 2, 2), None)})
        results = {label: {part: {k: statistics.median(r[part].get(k, 0) for r in rs)
                                  for k in ("qps", "p50_ms", "p99_ms", "max_ms", "lost", "avg_ms")}
                           for part in ("paced", "flat")} | {"rounds": rs}
                   for label, rs in runs.items()}
    finally:
        for pr in procs:
            pr.terminate()
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
        nats.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "load": [round(x, 2) for x in load], "machines": a.machines, "rate": a.rate, "seconds": a.seconds,
            "names": len(set(qs)), "rounds": a.rounds, "load_before": [round(x, 2) for x in load_before]}
    if a.markdown:
        print(f"{meta['date']}, {meta['cpus']} cores, load {meta['load_before']} before, {meta['load']} after; "
              f"{len(set(qs))} names, {a.machines + 1} machines; dnsperf over UDP on loopback; medians of "
              f"{a.rounds} alternated rounds ({a.seconds:g} s paced, {max(a.seconds / 2, 2):g} s flat out)\n")
        print(f"| server | paced {a.rate}/s: achieved q/s | p50 ms | p99 ms (each round) | max ms | lost | "
              "flat out q/s |")
        print("|---|---|---|---|---|---|---|")
        for label, r in results.items():
            pc, fl = r["paced"], r["flat"]
            each = " / ".join(f"{x['paced'].get('p99_ms', 0):.2f}" for x in r["rounds"])
            print(f"| {label} | {pc['qps']:.0f} | {pc['p50_ms']:.3f} | **{pc['p99_ms']:.3f}** ({each}) | "
                  f"{pc['max_ms']:.2f} | {pc['lost']:.0f} | {fl['qps']:.0f} |")
    else:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
