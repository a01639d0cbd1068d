"""Publish benchmarks, side by side in one run.

1. CSV to SQLite for a 1,000,000-row CSV: taxiway's converter vs
   ``sqlite-utils insert --csv`` (which detects types too) and ``sqlite3 .import``
   (text columns only), wall time and peak memory of each.
2. Publish to first byte for airports.csv, cold and warm (after a one-row change),
   when ``--publish`` is given (it builds and runs a real app).

Usage: python bench/publish.py [--rows N] [--publish]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def make_csv(path: Path, rows: int) -> None:
    rnd = random.Random(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "name", "latitude", "longitude", "score", "city", "zip"])
        cities = ["Paris", "Lyon", "Nice", "Lille", "Brest"]
        for i in range(rows):
            w.writerow([i, f"name {i}", round(rnd.uniform(-90, 90), 5), round(rnd.uniform(-180, 180), 5),
                        rnd.randint(0, 1000), cities[i % 5], f"{rnd.randint(0, 99999):05d}"])


def rss_of(argv: list[str]) -> tuple[float, int]:
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *argv], check=True, capture_output=True, text=True)
    wall, kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kb)


def bench_csv(rows: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        src = tmp / "big.csv"
        make_csv(src, rows)
        print(f"CSV: {rows:,} rows, {src.stat().st_size / 1e6:.0f} MB")
        ours = [sys.executable, "-c",
                "import sys; from pathlib import Path; from taxiway.publish.convert import build_database;"
                f"build_database([Path({str(src)!r})], Path({str(tmp / 'ours.db')!r}))"]
        su = [str(VENV_BIN / "sqlite-utils"), "insert", str(tmp / "su.db"), "big", str(src), "--csv"]
        s3 = ["sqlite3", str(tmp / "s3.db"), f".import --csv {src} big"]
        results = {}
        for name, argv in (("taxiway", ours), ("sqlite-utils insert --csv", su), ("sqlite3 .import", s3)):
            results[name] = rss_of(argv)
            print(f"  {name:28s} {results[name][0]:7.2f} s  peak {results[name][1] / 1024:6.0f} MB")
        t = results["taxiway"][0]
        print(f"  ratio taxiway / sqlite-utils: {t / results['sqlite-utils insert --csv'][0]:.2f}x (target <= 1.0x)")
        print(f"  ratio taxiway / sqlite3 .import: {t / results['sqlite3 .import'][0]:.2f}x (sqlite3 stores text only)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_publish() -> None:
    import urllib.request

    import vega_datasets

    airports = Path(vega_datasets.__file__).parent / "_data" / "airports.csv"
    tmp = Path(tempfile.mkdtemp(prefix="bench-publish-app-"))
    home = tmp / "home"
    env = {**os.environ, "TAXIWAY_HOME": str(home)}  # a fresh home: "cold" builds the app from nothing
    src = tmp / "airports.csv"
    shutil.copy(airports, src)
    taxiway = [sys.executable, "-m", "taxiway"]

    def first_byte(label: str) -> float:
        t = time.perf_counter()
        out = subprocess.run([*taxiway, "publish", str(src), "--name", "bench-airports", "--json"], env=env,
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout)
        table = result["tables"][0]
        with urllib.request.urlopen(f"{result['url']}/{table['database']}/{table['table']}.json?_size=1", timeout=30) as r:
            r.read(1)
        wall = time.perf_counter() - t
        print(f"  {label:6s} publish to first byte: {wall:6.2f} s")
        return wall

    try:
        first_byte("cold")
        with open(src, "a") as f:
            f.write("ZZZ,Bench Field,Nowhere,XX,USA,40.0,-100.0\n")
        warm = first_byte("warm")
        print(f"  warm publish target < 5 s: {'met' if warm < 5 else 'NOT met'}")
    finally:
        subprocess.run([*taxiway, "publish", "rm", "bench-airports"], env=env, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--publish", action="store_true", help="also measure publish to first byte")
    a = ap.parse_args()
    bench_csv(a.rows)
    if a.publish:
        bench_publish()


if __name__ == "__main__":
    main()
