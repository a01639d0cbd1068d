"""Interleaved A/B of ``taxiway run --rm IMG true`` (warm, and cold after ``snapshots prune --all``):
this tree against another one (``--baseline OTHER/src``), in one home, with one image.

Rounds alternate which tree goes first; each run's wall time and the CPU time of its process tree
(user + system, from the children's rusage) are recorded, and medians printed. Use it when the
host is shared: both trees see the same load, so their difference is the change's.

Usage (as root, from the repository root):
    git archive REV src | tar -x -C /tmp/before
    .venv/bin/python bench/run_ab.py --baseline /tmp/before/src [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the other tree's src directory (the one holding taxiway/)")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="taxiway-bench-run-ab-"))
    os.environ["TAXIWAY_HOME"] = str(work / "home")
    os.environ["TAXIWAY_CONFIG"] = str(work / "config")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    from machines.conftest import make_image

    trees = {"baseline": str(Path(args.baseline).resolve()), "this tree": str(REPO / "src")}
    try:
        image = make_image(work, "localhost/bench/busybox:1")
        for t in trees.values():
            subprocess.run([sys.executable, "-m", "compileall", "-q", t], check=True)

        def run(tree: str, argv: list[str]) -> tuple[float, float]:
            env = dict(os.environ, PYTHONPATH=tree)
            r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "taxiway", *argv], env=env, capture_output=True)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                raise SystemExit(f"failed ({tree}): {p.stderr.decode(errors='replace')}")
            return (t1 - t0) * 1000, (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1000

        for t in trees.values():  # unpack once, memo written
            run(t, ["run", "--rm", image, "true"])
        res: dict[tuple[str, str], list[tuple[float, float]]] = {(k, c): [] for k in trees for c in ("warm", "cold")}
        for i in range(args.rounds):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for k in order:
                res[(k, "warm")].append(run(trees[k], ["run", "--rm", image, "true"]))
            for k in order:
                subprocess.run([sys.executable, "-m", "taxiway", "snapshots", "prune", "--all"], capture_output=True,
                               env=dict(os.environ, PYTHONPATH=trees["this tree"]))
                res[(k, "cold")].append(run(trees[k], ["run", "--rm", image, "true"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| case | tree | wall median ms (min) | CPU median ms |")
    print("|---|---|---:|---:|")
    for c in ("warm", "cold"):
        for k in trees:
            wall = [w for w, _ in res[(k, c)]]
            cpu = [x for _, x in res[(k, c)]]
            print(f"| {c} | {k} | {statistics.median(wall):.0f} ({min(wall):.0f}) | {statistics.median(cpu):.0f} |")


if __name__ == "__main__":
    main()
