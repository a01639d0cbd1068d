"""Issue leaf certificates with taxiway (Python API and CLI) and with mkcert, side by side.

    .venv/bin/python bench/ca.py [--api-n 1000] [--cli-n 200] [--markdown]

Every path issues one certificate per distinct host name and writes nothing
outside a temp directory. mkcert runs with CAROOT in that directory and is never
asked to -install (nothing touches the machine's trust store). Reported: wall
time per certificate (median of per-process times for the CLIs, which run
round-robin so that every path sees the same load on shared cores; total/N for
the API) and the ratios the issue targets: CLI <= mkcert, API >= 10x faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def interleaved(paths: dict[str, list[list[str]]], env: dict[str, str], cwd: Path) -> dict[str, list[float]]:
    """Run the paths' processes round-robin (one of each in turn), timing each.

    The cores are shared, so load drifts during a run: interleaving makes every
    path see the same drift instead of giving one path a quiet minute.
    """
    times: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(max(len(v) for v in paths.values())):
        for name, argvs in paths.items():
            if i < len(argvs):
                t = time.perf_counter()
                subprocess.run(argvs[i], env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t)
    return times


def bench_api(caroot: Path, n: int, key_type: str, write_dir: Path | None) -> float:
    """Seconds per certificate through CA.issue (recorded in the inventory), optionally writing files."""
    from taxiway.pki import CA

    ca = CA.load(caroot)
    ca.issue(["warmup.example.test"], key_type=key_type)  # loads the intermediate key once
    t = time.perf_counter()
    for i in range(n):
        leaf = ca.issue([f"api{i}.example.test"], key_type=key_type)
        if write_dir is not None:
            leaf.write(write_dir / f"api{i}.pem", write_dir / f"api{i}-key.pem", force=True)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api-n", type=int, default=1000, help="certificates through the Python API")
    ap.add_argument("--cli-n", type=int, default=200, help="certificates through each CLI (one process each)")
    ap.add_argument("--rsa-n", type=int, default=50, help="RSA certificates per CLI (RSA keygen is slow)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table for bench/RESULTS.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temp directory is removed

    mkcert = shutil.which("mkcert")
    taxiway = str(Path(sys.executable).parent / "taxiway")
    if not mkcert or not os.path.exists(taxiway):
        sys.exit("needs mkcert (Debian package) and the taxiway venv (make setup)")
    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ca-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "TAXIWAY_CAROOT": str(tmp / "taxiway-ca"), "TAXIWAY_HOME": str(tmp / "home"),
               "CAROOT": str(tmp / "mkcert-ca")}
        os.environ.update(env)
        out = tmp / "out"
        out.mkdir()
        subprocess.run([taxiway, "ca", "init"], env=env, check=True, capture_output=True)
        # mkcert makes its CA on first use; that first run is not timed. Never -install.
        subprocess.run([mkcert, "-cert-file", str(out / "w.pem"), "-key-file", str(out / "w-key.pem"),
                        "warm.example.test"], env=env, check=True, capture_output=True)

        api = bench_api(tmp / "taxiway-ca", args.api_n, "ecdsa-p256", None)
        rows.append(("taxiway API, ECDSA P-256, in memory (+ inventory)", args.api_n, api))
        api_files = bench_api(tmp / "taxiway-ca", args.api_n, "ecdsa-p256", out)
        rows.append(("taxiway API, ECDSA P-256, + cert/key files (fsync)", args.api_n, api_files))
        api_rsa = bench_api(tmp / "taxiway-ca", args.rsa_n, "rsa-2048", out)
        rows.append(("taxiway API, RSA 2048, + files", args.rsa_n, api_rsa))

        def cli_argvs(prefix: list[str], tag: str, n: int, taxi: bool) -> list[list[str]]:
            argvs = []
            for i in range(n):
                files = ["--cert-file", str(out / f"{tag}{i}.pem"), "--key-file", str(out / f"{tag}{i}-key.pem")]
                if taxi:
                    files.append("--force")
                argvs.append([*prefix, *files, f"{tag}{i}.example.test"])
            return argvs

        n, rn = args.cli_n, args.rsa_n
        t = interleaved({
            "taxiway ca issue (ECDSA P-256, default)": cli_argvs([taxiway, "ca", "issue"], "cli", n, True),
            "mkcert -ecdsa (ECDSA P-256)": cli_argvs([mkcert, "-ecdsa"], "mke", n, False),
            "mkcert (RSA 2048, its default)": cli_argvs([mkcert], "mkr", rn, False),
            "taxiway ca issue --rsa (RSA 2048)": cli_argvs([taxiway, "ca", "issue", "--rsa"], "clr", rn, True),
        }, env, out)
        med = {k: statistics.median(v) for k, v in t.items()}
        for k, v in t.items():
            rows.append((k, len(v), med[k]))
        cli_med, mk_ec = med["taxiway ca issue (ECDSA P-256, default)"], med["mkcert -ecdsa (ECDSA P-256)"]
        mk_rsa, cli_rsa = med["mkcert (RSA 2048, its default)"], med["taxiway ca issue --rsa (RSA 2048)"]

    ratios = [
        ("taxiway CLI (default) / mkcert (default)", cli_med / mk_rsa, "<= 1"),
        ("taxiway CLI / mkcert, both ECDSA", cli_med / mk_ec, "<= 1"),
        ("taxiway CLI / mkcert, both RSA 2048", cli_rsa / mk_rsa, "<= 1"),
        ("mkcert (default) / taxiway API", mk_rsa / api, ">= 10"),
        ("mkcert -ecdsa / taxiway API", mk_ec / api, ">= 10"),
        ("mkcert -ecdsa / taxiway API with files", mk_ec / api_files, ">= 10"),
        ("mkcert / taxiway API, both RSA with files", mk_rsa / api_rsa, ">= 10"),
    ]
    if args.markdown:
        print("| path | certs | ms per cert |\n|---|---:|---:|")
        for name, count, sec in rows:
            print(f"| {name} | {count} | {sec * 1000:.2f} |")
        print("\n| ratio | value | target |\n|---|---:|---|")
        for name, val, target in ratios:
            print(f"| {name} | {val:.2f} | {target} |")
        return
    for name, count, sec in rows:
        print(f"{name:<55} n={count:<5} {sec * 1000:8.2f} ms/cert")
    for name, val, target in ratios:
        print(f"{name:<55} {val:8.2f}  (target {target})")


if __name__ == "__main__":
    main()
