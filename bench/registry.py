"""Benchmark: taxiway's registry side by side with Debian's docker-registry (distribution 2.8).

Both servers run on 127.0.0.1 with their storage on the same disk, fresh for
every round. Measured per round, alternating which registry goes first:

- skopeo push (oci layout -> registry) and skopeo pull (registry -> oci layout)
  of the shared Debian image, as throughput of blob bytes over wall time;
- 32 concurrent pulls of the image with httpx (manifest + every blob, streamed
  and discarded) as aggregate throughput, and the p50/p99 latency of manifest
  GETs probed one at a time from another process while 32 pulls run;
- 32 concurrent pulls by 32 separate curl processes (every blob to /dev/null):
  one httpx process is itself the bottleneck on two cores, separate clients
  load the server the way 32 pulling hosts do.

taxiway runs with authentication on (clients do the Docker token flow once),
docker-registry with none. Usage: python bench/registry.py [--rounds 3] [--push-reps 8] [--workers 2]
It prints a markdown table (and the load average); it never edits bench/RESULTS.md, which other
benchmarks share: paste the figures into its ``## Registry`` section by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers.servers import docker_registry, free_port, serve  # noqa: E402

CACHE = Path("/var/cache/taxiway-bench")
LAYOUT = CACHE / "debian-layout"
TAG = "bookworm"
MACHINE = "2-core Debian 12 VM, 24 GiB"
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def ensure_layout() -> None:
    """Use the shared Debian layout; build it (under the lock) if nobody has yet."""
    if (LAYOUT / "index.json").exists():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (LAYOUT / "index.json").exists():
            return
        tmp = CACHE / "debian-layout.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tar = CACHE / "bookworm.tar"
        subprocess.run(["mmdebstrap", "--variant=minbase", "--format=oci", "bookworm", str(tar)], check=True)
        tmp.mkdir()
        subprocess.run(["tar", "-xf", str(tar), "-C", str(tmp)], check=True)
        subprocess.run(["skopeo", "copy", f"oci:{tmp}", f"oci:{LAYOUT}:{TAG}"], check=True)
        shutil.rmtree(tmp)
        tar.unlink()


def image_bytes() -> int:
    idx = json.loads((LAYOUT / "index.json").read_text())
    desc = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)
    blobs = LAYOUT / "blobs" / "sha256"
    man = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    return man["config"]["size"] + sum(layer["size"] for layer in man["layers"])


@contextlib.contextmanager
def taxiway_registry(root: Path, workers: int):
    root.mkdir(parents=True)
    tx = [sys.executable, "-m", "taxiway", "registry"]
    subprocess.run([*tx, "org", "create", "bench", "--root", str(root)], check=True, capture_output=True)
    token = subprocess.run([*tx, "token", "create", "--org", "bench", "--root", str(root)], check=True,
                           capture_output=True, text=True).stdout.strip()
    port = free_port()
    with serve([*tx, "serve", "--listen", f"127.0.0.1:{port}", "--root", str(root), "--workers", str(workers)],
               port, log=root.parent / "taxiway.log") as s:
        yield s, token


def skopeo(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", *args], check=True, capture_output=True)
    return time.perf_counter() - t


def bearer(url: str, token: str | None, repo: str) -> dict[str, str]:
    if token is None:
        return {}
    basic = base64.b64encode(f"bench:{token}".encode()).decode()
    r = httpx.get(f"{url}/v2/token", params={"service": "taxiway", "scope": f"repository:{repo}:pull"},
                  headers={"Authorization": f"Basic {basic}"})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def concurrent_pulls(url: str, headers: dict, repo: str, clients: int = 32) -> dict:
    """``clients`` pulls at once (throughput), then again while another process probes manifest GETs."""
    total = 0
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as c:

        async def manifest() -> dict:
            r = await c.get(f"/v2/{repo}/manifests/{TAG}", headers={"Accept": MANIFEST_ACCEPT})
            r.raise_for_status()
            return r.json()

        async def pull() -> int:
            m = await manifest()
            n = 0
            for d in [m["config"]] + m["layers"]:
                async with c.stream("GET", f"/v2/{repo}/blobs/{d['digest']}") as r:
                    r.raise_for_status()
                    async for chunk in r.aiter_raw(1 << 20):
                        n += len(chunk)
            return n

        await manifest()  # warm up the connection and the page cache
        t = time.perf_counter()
        sizes = await asyncio.gather(*(pull() for _ in range(clients)))
        elapsed = time.perf_counter() - t
        total = sum(sizes)
        # Manifest GET latency under load: a separate client process probes one request at a
        # time (so its own queueing doesn't count) while 32 more pulls run.
        probe = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--probe", url, f"/v2/{repo}/manifests/{TAG}", json.dumps(headers),
            stdout=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.3)
        await asyncio.gather(*(pull() for _ in range(clients)))
        probe.send_signal(signal.SIGINT)
        out, _ = await probe.communicate()
    lat = sorted(json.loads(out))
    return {"throughput": total / elapsed, "seconds": elapsed, "bytes": total,
            "p99_manifest_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "p50_manifest_ms": 1000 * statistics.median(lat),
            "manifest_gets": len(lat)}


def curl_pulls(url: str, headers: dict, repo: str, clients: int = 32) -> dict:
    """``clients`` separate curl processes, each fetching the image's blobs at once (as 32 hosts would).

    The httpx figure above is one Python process receiving every byte: on two cores that client,
    not the server, sets the pace. Separate processes put the load on the server, as real pulls do.
    """
    r = httpx.get(f"{url}/v2/{repo}/manifests/{TAG}", headers={**headers, "Accept": MANIFEST_ACCEPT})
    r.raise_for_status()
    m = r.json()
    urls = [f"{url}/v2/{repo}/blobs/{d['digest']}" for d in [m["config"]] + m["layers"]]
    argv = ["curl", "-sSf", "--noproxy", "*"] + [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")]
    for u in urls:
        argv += ["-o", "/dev/null", u]
    size = sum(d["size"] for d in [m["config"]] + m["layers"])
    subprocess.run(argv, check=True)  # warm the page cache
    t = time.perf_counter()
    procs = [subprocess.Popen(argv) for _ in range(clients)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a curl pull failed")
    elapsed = time.perf_counter() - t
    return {"curl_throughput": clients * size / elapsed}


def one_round(work: Path, workers: int, first: str) -> dict:
    size = image_bytes()
    out: dict = {}
    with docker_registry(work / "distribution") as dist, taxiway_registry(work / "taxiway", workers) as (tw, token):
        targets = {"distribution": (dist, None), "taxiway": (tw, token)}
        order = [first, "taxiway" if first == "distribution" else "distribution"]
        for name in order:
            srv, tok = targets[name]
            creds = ["--dest-creds", f"bench:{tok}"] if tok else []
            dest = f"docker://{srv.address}/bench/debian:{TAG}"
            out.setdefault(name, {})["push"] = size / skopeo("--dest-tls-verify=false", *creds,
                                                              f"oci:{LAYOUT}:{TAG}", dest)
        for name in order:
            srv, tok = targets[name]
            creds = ["--src-creds", f"bench:{tok}"] if tok else []
            dest = Path(tempfile.mkdtemp(dir=work))
            src = f"docker://{srv.address}/bench/debian:{TAG}"
            out[name]["pull"] = size / skopeo("--src-tls-verify=false", *creds, src, f"oci:{dest}:{TAG}")
            shutil.rmtree(dest)
        for name in order:
            srv, tok = targets[name]
            headers = bearer(srv.url, tok, "bench/debian")
            out[name].update(asyncio.run(concurrent_pulls(srv.url, headers, "bench/debian")))
        for name in order:
            srv, tok = targets[name]
            out[name].update(curl_pulls(srv.url, bearer(srv.url, tok, "bench/debian"), "bench/debian"))
    return out


def probe(url: str, path: str, headers: str) -> None:
    """Manifest GETs one at a time until SIGINT; prints the latencies (seconds) as JSON."""
    lat: list[float] = []
    with httpx.Client(base_url=url, headers=json.loads(headers), timeout=60) as c:
        try:
            for _ in range(100_000):
                t = time.perf_counter()
                c.get(path, headers={"Accept": MANIFEST_ACCEPT}).raise_for_status()
                lat.append(time.perf_counter() - t)
        except KeyboardInterrupt:
            pass
    print(json.dumps(lat))


def push_samples(work: Path, workers: int, reps: int) -> dict[str, list[float]]:
    """Extra skopeo pushes, each to a fresh pair of registries (a push is short, so noise needs samples)."""
    size = image_bytes()
    out: dict[str, list[float]] = {"taxiway": [], "distribution": []}
    for i in range(reps):
        sub = work / f"push{i}"
        with docker_registry(sub / "distribution") as dist, taxiway_registry(sub / "taxiway", workers) as (tw, tok):
            order = [("distribution", dist, []), ("taxiway", tw, ["--dest-creds", f"bench:{tok}"])]
            for name, srv, creds in order if i % 2 == 0 else order[::-1]:
                dest = f"docker://{srv.address}/bench/debian:{TAG}"
                out[name].append(size / skopeo("--dest-tls-verify=false", *creds, f"oci:{LAYOUT}:{TAG}", dest))
        shutil.rmtree(sub, ignore_errors=True)
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":
        return probe(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="taxiway server processes")
    ap.add_argument("--push-reps", type=int, default=8, help="extra push-only samples (fresh registries each)")
    args = ap.parse_args()
    ensure_layout()
    rounds = []
    base = Path(os.environ.get("TAXIWAY_BENCH_DIR", "/var/tmp"))
    for i in range(max(1, min(args.rounds, 10))):
        with tempfile.TemporaryDirectory(prefix="txbench-", dir=base) as work:
            r = one_round(Path(work), args.workers, "distribution" if i % 2 == 0 else "taxiway")
            rounds.append(r)
            print(f"round {i + 1} (load {_load()}): " + json.dumps({k: {m: round(v, 1) for m, v in d.items()} for k, d in r.items()}),
                  flush=True)

    with tempfile.TemporaryDirectory(prefix="txbench-", dir=base) as work:
        pushes = push_samples(Path(work), args.workers, max(0, min(args.push_reps, 20)))
    for r in rounds:
        for name in pushes:
            pushes[name].append(r[name]["push"])
    print("push samples (MiB/s): " + json.dumps({k: [round(v / (1 << 20), 1) for v in vs] for k, vs in pushes.items()}))

    def med(target: str, metric: str) -> float:
        if metric == "push":
            return statistics.median(pushes[target])
        return statistics.median(r[target][metric] for r in rounds)

    mb = 1 << 20
    rows = [
        ("skopeo push", med("taxiway", "push") / mb, med("distribution", "push") / mb, "MiB/s", True),
        ("skopeo pull", med("taxiway", "pull") / mb, med("distribution", "pull") / mb, "MiB/s", True),
        ("32 concurrent pulls (httpx)", med("taxiway", "throughput") / mb, med("distribution", "throughput") / mb,
         "MiB/s", True),
        ("32 concurrent pulls (32 curl processes)", med("taxiway", "curl_throughput") / mb,
         med("distribution", "curl_throughput") / mb, "MiB/s", True),
        ("p50 manifest GET under load", med("taxiway", "p50_manifest_ms"), med("distribution", "p50_manifest_ms"),
         "ms", False),
        ("p99 manifest GET under load", med("taxiway", "p99_manifest_ms"), med("distribution", "p99_manifest_ms"),
         "ms", False),
    ]
    lines = ["| measure | taxiway | docker-registry 2.8 | ratio |", "|---|---|---|---|"]
    for label, t, d, unit, higher in rows:
        ratio = t / d if higher else d / t
        lines.append(f"| {label} | {t:.1f} {unit} | {d:.1f} {unit} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(f"\n{datetime.date.today().isoformat()}, {MACHINE}, load average {_load()} (1/5/15 min) at the end;"
          f" {len(rounds)} rounds, {args.push_reps} push-only rounds, taxiway --workers {args.workers}:\n")
    print(table)
    # bench/RESULTS.md is shared with other benchmarks and carries the history of these figures:
    # this script never writes it. Paste the table into its ``## Registry`` section by hand.


if __name__ == "__main__":
    main()
