"""Issue leaf certificates with taxiway (Python API and CLI) and with mkcert, side by side.

    .venv/bin/python bench/ca.py [--n 1000] [--cli-n 1000] [--rsa-n 200] [--markdown]

Every path issues one certificate per distinct host name into a temp
directory. mkcert runs with CAROOT in that directory and is never asked to
-install (nothing touches the machine's trust store).

The paths run round-robin: round i issues certificate i on every path (API
calls in this process, CLI calls as one process each), so on shared cores every
path sees the same load at the same moment. Reported per path: the median wall
time per certificate; per comparison: the median over rounds of the per-round
ratio (paired), which is what the targets are judged on: CLI <= mkcert, and
API >= 10x faster than mkcert. CPU time (user + system, children included) is
shown beside wall time: it depends much less on what else the cores are doing. The API figures exclude the one-time import and
CA load (a service pays those once); the CLI figures include everything.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

Step = Callable[[int], None]


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_rounds(paths: dict[str, tuple[int, Step]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Call each path's step for round i (if it has that many); return (wall, cpu) seconds per call."""
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(max(n for n, _ in paths.values())):
        for name, (n, step) in paths.items():
            if i < n:
                c, t = cpu_seconds(), time.perf_counter()
                step(i)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(cpu_seconds() - c)
    return wall, cpu


def paired(a: list[float], b: list[float]) -> float:
    """Median over the rounds both ran of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b, strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="certificates through the API and mkcert -ecdsa")
    ap.add_argument("--cli-n", type=int, default=1000, help="certificates through taxiway ca issue (one process each)")
    ap.add_argument("--rsa-n", type=int, default=200, help="RSA 2048 certificates per path (RSA keygen is slow)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables for bench/RESULTS.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temp directory is removed

    mkcert = shutil.which("mkcert")
    taxiway = str(Path(sys.executable).parent / "taxiway")
    if not mkcert or not os.path.exists(taxiway):
        sys.exit("needs mkcert (Debian package) and the taxiway venv (make setup)")
    with tempfile.TemporaryDirectory(prefix="bench-ca-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "TAXIWAY_CAROOT": str(tmp / "taxiway-ca"), "TAXIWAY_HOME": str(tmp / "home"),
               "CAROOT": str(tmp / "mkcert-ca")}
        out = tmp / "out"
        out.mkdir()
        subprocess.run([taxiway, "ca", "init"], env=env, check=True, capture_output=True)
        # mkcert makes its CA on first use; that run is not timed. Never -install.
        subprocess.run([mkcert, "-cert-file", str(out / "w.pem"), "-key-file", str(out / "w-key.pem"),
                        "warm.example.test"], env=env, check=True, capture_output=True)

        from taxiway.pki import CA

        ca = CA.load(tmp / "taxiway-ca")
        ca.issue(["warmup.example.test"])  # loads the intermediate key once

        def proc(prefix: list[str], tag: str, force: bool) -> Step:
            def step(i: int) -> None:
                argv = [*prefix, "--cert-file", str(out / f"{tag}{i}.pem"), "--key-file", str(out / f"{tag}{i}-key.pem")]
                argv += ["--force"] if force else []
                subprocess.run([*argv, f"{tag}{i}.example.test"], env=env, cwd=out, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return step

        def api(tag: str, key_type: str, files: bool) -> Step:
            def step(i: int) -> None:
                leaf = ca.issue([f"{tag}{i}.example.test"], key_type=key_type)
                if files:
                    leaf.write(out / f"{tag}{i}.pem", out / f"{tag}{i}-key.pem", force=True)
            return step

        n, cn, rn = args.n, args.cli_n, args.rsa_n
        paths = {
            "taxiway API, ECDSA P-256, in memory (+ inventory line)": (n, api("api", "ecdsa-p256", False)),
            "taxiway API, ECDSA P-256, + cert/key files (fsync)": (n, api("apf", "ecdsa-p256", True)),
            "taxiway API, RSA 2048, + files": (rn, api("apr", "rsa-2048", True)),
            "taxiway ca issue (ECDSA P-256, its default)": (cn, proc([taxiway, "ca", "issue"], "cli", True)),
            "taxiway ca issue --rsa (RSA 2048)": (rn, proc([taxiway, "ca", "issue", "--rsa"], "clr", True)),
            "mkcert -ecdsa (ECDSA P-256)": (n, proc([mkcert, "-ecdsa"], "mke", False)),
            "mkcert (RSA 2048, its default)": (rn, proc([mkcert], "mkr", False)),
        }
        t, cpu = run_rounds(paths)

    k = list(paths)
    api_mem, api_files, api_rsa, cli, cli_rsa, mk_ec, mk_rsa = (t[x] for x in k)
    ratios = [
        ("taxiway ca issue (default) / mkcert (default)", paired(cli, mk_rsa), "<= 1"),
        ("taxiway ca issue / mkcert, both ECDSA P-256", paired(cli, mk_ec), "<= 1"),
        ("taxiway ca issue / mkcert, both RSA 2048", paired(cli_rsa, mk_rsa), "<= 1"),
        ("mkcert (default) / taxiway API (default)", paired(mk_rsa, api_mem), ">= 10"),
        ("mkcert -ecdsa / taxiway API, both ECDSA", paired(mk_ec, api_mem), ">= 10"),
        ("mkcert -ecdsa / taxiway API + files, both ECDSA", paired(mk_ec, api_files), ">= 10"),
        ("mkcert / taxiway API + files, both RSA 2048", paired(mk_rsa, api_rsa), ">= 10"),
    ]
    if args.markdown:
        print("| path | certs | median wall ms per cert | median CPU ms per cert |\n|---|---:|---:|---:|")
        for name in k:
            print(f"| {name} | {len(t[name])} | {statistics.median(t[name]) * 1000:.2f} "
                  f"| {statistics.median(cpu[name]) * 1000:.2f} |")
        print("\n| ratio (median of per-round ratios) | value | target |\n|---|---:|---|")
        for name, val, target in ratios:
            print(f"| {name} | {val:.2f} | {target} |")
        print(f"| CPU: taxiway ca issue / mkcert (default) | {paired(cpu[k[3]], cpu[k[6]]):.2f} | |")
        print(f"| CPU: taxiway ca issue / mkcert -ecdsa | {paired(cpu[k[3]], cpu[k[5]]):.2f} | |")
        return
    for name in k:
        print(f"{name:<58} n={len(t[name]):<5} {statistics.median(t[name]) * 1000:8.2f} ms/cert wall"
              f" {statistics.median(cpu[name]) * 1000:8.2f} ms/cert CPU")
    for name, val, target in ratios:
        print(f"{name:<58} {val:8.2f}  (target {target})")
    print(f"CPU, taxiway ca issue / mkcert (default): {paired(cpu[k[3]], cpu[k[6]]):.2f}; "
          f"/ mkcert -ecdsa: {paired(cpu[k[3]], cpu[k[5]]):.2f}")


if __name__ == "__main__":
    main()
