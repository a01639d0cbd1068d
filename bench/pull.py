"""Pull + export side by side: taxiway vs skopeo + umoci, against a local docker-registry.

The image is the cached Debian bookworm layout that bench/export.py builds once
with mmdebstrap (/var/cache/taxiway-bench/debian-layout, tag ``bookworm``,
100 MB+ uncompressed in one gzip layer). It is pushed with skopeo to a
docker-registry started here on 127.0.0.1 (free port), stopped at the end.

Each round measures, with fresh destinations:
  * cold:  ``taxiway pull`` + ``taxiway image export`` into an empty store
           vs ``skopeo copy docker://... oci:...`` + ``umoci unpack``;
  * warm:  ``taxiway image export`` vs ``umoci unpack`` from their warm stores;
  * peak RSS of the ``taxiway pull`` process (target < 150 MB);
  * CPU time (user + sys) of every process, which a busy shared machine skews far less than wall time;
and once, the median wall time of ``taxiway --help`` (target < 150 ms); the load average is
printed at the start and the end (the machine is shared).
Times are medians over the rounds; ratios are taxiway / peer (target <= 0.5).

With ``--baseline SRC`` (the ``src`` directory of another checkout, e.g. a
``git worktree`` of the commit before a change), each round also runs the same
cold and warm taxiway commands from that tree (``PYTHONPATH=SRC``), in rotated
order, so a before/after comparison shares one run's load.

Usage: python bench/pull.py [--rounds N] [--baseline SRC] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from export import TAG, ensure_debian_layout  # noqa: E402  (the shared cached Debian image)

TAXIWAY = [sys.executable, "-m", "taxiway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU: dict[str, float] = {}  # argv[0..2] joined -> CPU seconds (user + sys) of the last run


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run to completion; (wall seconds, peak RSS in KiB of that process). CPU time goes to ``CPU["last"]``."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    CPU["last"] = usage.ru_utime + usage.ru_stime
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {err[-2000:]}")
    if p.stderr:
        p.stderr.close()
    return wall, usage.ru_maxrss


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", metavar="SRC", help="also time taxiway from this source tree (PYTHONPATH), alternated")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("note: umoci unpack without root uses --rootless; run as root for a like-for-like comparison", file=sys.stderr)
    layout = ensure_debian_layout()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="taxiway-bench-pull."))
    reg_dir = work / "registry"
    reg_dir.mkdir()
    proc, address = start_registry(reg_dir)
    ref = f"{address}/debian:{TAG}"
    results: dict[str, list[float]] = {k: [] for k in ("tw_pull", "tw_export", "tw_cold", "peer_copy", "peer_unpack",
                                                       "peer_cold", "tw_warm", "peer_warm", "tw_rss_kib",
                                                       "cpu_tw_cold", "cpu_peer_cold", "cpu_tw_warm", "cpu_peer_warm",
                                                       "cpu_tw_pull", "cpu_peer_copy", "bl_cold", "bl_warm",
                                                       "cpu_bl_cold", "cpu_bl_warm")}
    try:
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{ref}"],
                       check=True)
        umoci_extra = [] if os.geteuid() == 0 else ["--rootless"]
        for r in range(args.rounds):
            rd = work / f"round{r}"
            rd.mkdir()
            env = {"TAXIWAY_HOME": str(rd / "home"), "TAXIWAY_CONFIG": str(rd / "config")}
            def tw_cold(rd: Path = rd, env: dict = env) -> tuple[float, int, float, float, float]:
                t_pull, rss = run([*TAXIWAY, "pull", ref], env)
                c_pull = CPU["last"]
                t_exp, _ = run([*TAXIWAY, "image", "export", ref, str(rd / "tw-rootfs")], env)
                return t_pull, rss, c_pull, t_exp, CPU["last"]

            def peer_cold(rd: Path = rd) -> tuple[float, float, float, float]:
                t_copy, _ = run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{rd / 'oci'}:{TAG}"])
                c_copy = CPU["last"]
                t_unpack, _ = run(["umoci", "unpack", *umoci_extra, "--image", f"{rd / 'oci'}:{TAG}", str(rd / "bundle")])
                return t_copy, c_copy, t_unpack, CPU["last"]

            def bl_cold(rd: Path = rd) -> None:
                benv = {"TAXIWAY_HOME": str(rd / "bl-home"), "TAXIWAY_CONFIG": str(rd / "bl-config"), "PYTHONPATH": args.baseline}
                t_pull, _ = run([*TAXIWAY, "pull", ref], benv)
                c_pull = CPU["last"]
                t_exp, _ = run([*TAXIWAY, "image", "export", ref, str(rd / "bl-rootfs")], benv)
                results["bl_cold"].append(t_pull + t_exp)
                results["cpu_bl_cold"].append(c_pull + CPU["last"])

            # Alternate who goes first, and delete nothing until every round is done: right after a
            # mass delete, ext4 makes whoever creates files next pay for it (seen with perf).
            if args.baseline and r % 3 == 1:
                bl_cold()
            if r % 2 == 0:
                t_pull, rss, c_pull, t_exp, c_exp = tw_cold()
                if args.baseline and r % 3 == 0:
                    bl_cold()
                t_copy, c_copy, t_unpack, c_unpack = peer_cold()
            else:
                t_copy, c_copy, t_unpack, c_unpack = peer_cold()
                if args.baseline and r % 3 == 0:
                    bl_cold()
                t_pull, rss, c_pull, t_exp, c_exp = tw_cold()
            if args.baseline and r % 3 == 2:
                bl_cold()
            # warm: export again from the warm stores, into new directories
            warm = [("tw", [*TAXIWAY, "image", "export", ref, str(rd / "tw-rootfs-warm")], env),
                    ("peer", ["umoci", "unpack", *umoci_extra, "--image", f"{rd / 'oci'}:{TAG}", str(rd / "bundle-warm")], None)]
            if args.baseline:
                warm.insert(r % 3, ("bl", [*TAXIWAY, "image", "export", ref, str(rd / "bl-rootfs-warm")],
                                    {"TAXIWAY_HOME": str(rd / "bl-home"), "TAXIWAY_CONFIG": str(rd / "bl-config"),
                                     "PYTHONPATH": args.baseline}))
            if r % 2:
                warm.reverse()
            got = {}
            for who, argv, e in warm:
                t, _ = run(argv, e)
                got[who] = (t, CPU["last"])
            (t_tw_warm, c_tw_warm), (t_peer_warm, c_peer_warm) = got["tw"], got["peer"]
            if "bl" in got:
                results["bl_warm"].append(got["bl"][0])
                results["cpu_bl_warm"].append(got["bl"][1])
            for k, v in (("cpu_tw_cold", c_pull + c_exp), ("cpu_peer_cold", c_copy + c_unpack), ("cpu_tw_warm", c_tw_warm),
                         ("cpu_peer_warm", c_peer_warm), ("cpu_tw_pull", c_pull), ("cpu_peer_copy", c_copy)):
                results[k].append(v)
            for k, v in (("tw_pull", t_pull), ("tw_export", t_exp), ("tw_cold", t_pull + t_exp), ("peer_copy", t_copy),
                         ("peer_unpack", t_unpack), ("peer_cold", t_copy + t_unpack), ("tw_warm", t_tw_warm),
                         ("peer_warm", t_peer_warm), ("tw_rss_kib", rss)):
                results[k].append(v)
            print(f"round {r + 1}/{args.rounds}: taxiway cold {t_pull + t_exp:.2f}s (pull {t_pull:.2f} + export {t_exp:.2f}), "
                  f"skopeo+umoci {t_copy + t_unpack:.2f}s (copy {t_copy:.2f} + unpack {t_unpack:.2f}); "
                  f"warm {t_tw_warm:.2f}s vs {t_peer_warm:.2f}s; pull RSS {rss / 1024:.0f} MiB"
                  + (f"; baseline cold {results['bl_cold'][-1]:.2f}s, warm {results['bl_warm'][-1]:.2f}s" if args.baseline else ""),
                  file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        # For ~60 s after a mass delete (up to 6 min while the inode table is dirty), ext4's inode
        # allocator skips the freed inodes one by one (recently_deleted, seen with perf), which makes
        # whoever creates files next pay: sync now so at least the next run waits the short window.
        os.sync()
    load_end = os.getloadavg()
    helps = []
    for _ in range(10):
        t, _ = run([*TAXIWAY, "--help"])
        helps.append(t)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    blob_sizes = sorted(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    out = {
        "image": f"Debian bookworm minbase, one gzip layer of {blob_sizes[-1] / 1e6:.0f} MB",
        "rounds": args.rounds,
        "cold_taxiway_s": round(med["tw_cold"], 3), "cold_taxiway_pull_s": round(med["tw_pull"], 3),
        "cold_taxiway_export_s": round(med["tw_export"], 3),
        "cold_peer_s": round(med["peer_cold"], 3), "cold_skopeo_copy_s": round(med["peer_copy"], 3),
        "cold_umoci_unpack_s": round(med["peer_unpack"], 3),
        "cold_ratio": round(med["tw_cold"] / med["peer_cold"], 3),
        "warm_taxiway_export_s": round(med["tw_warm"], 3), "warm_umoci_unpack_s": round(med["peer_warm"], 3),
        "warm_ratio": round(med["tw_warm"] / med["peer_warm"], 3),
        "pull_peak_rss_mib": round(max(results["tw_rss_kib"]) / 1024, 1),
        "cpu_cold_taxiway_s": round(med["cpu_tw_cold"], 3), "cpu_cold_peer_s": round(med["cpu_peer_cold"], 3),
        "cpu_cold_ratio": round(med["cpu_tw_cold"] / med["cpu_peer_cold"], 3),
        "cpu_taxiway_pull_s": round(med["cpu_tw_pull"], 3), "cpu_skopeo_copy_s": round(med["cpu_peer_copy"], 3),
        "cpu_warm_taxiway_s": round(med["cpu_tw_warm"], 3), "cpu_warm_umoci_s": round(med["cpu_peer_warm"], 3),
        "cpu_warm_ratio": round(med["cpu_tw_warm"] / med["cpu_peer_warm"], 3),
        "help_ms": round(statistics.median(helps) * 1000, 1),
        "load_average_start": [round(x, 2) for x in load_start], "load_average_end": [round(x, 2) for x in load_end],
    }
    if args.baseline:
        out.update({"baseline": args.baseline, "cold_baseline_s": round(med["bl_cold"], 3),
                    "cold_baseline_ratio": round(med["bl_cold"] / med["peer_cold"], 3),
                    "warm_baseline_s": round(med["bl_warm"], 3),
                    "warm_baseline_ratio": round(med["bl_warm"] / med["peer_warm"], 3),
                    "cpu_cold_baseline_s": round(med["cpu_bl_cold"], 3), "cpu_warm_baseline_s": round(med["cpu_bl_warm"], 3)})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"image: {out['image']}; median of {args.rounds} rounds")
        print(f"cold pull+export   taxiway {out['cold_taxiway_s']:.2f}s  (pull {out['cold_taxiway_pull_s']:.2f} + export {out['cold_taxiway_export_s']:.2f})")
        print(f"                   skopeo+umoci {out['cold_peer_s']:.2f}s  (copy {out['cold_skopeo_copy_s']:.2f} + unpack {out['cold_umoci_unpack_s']:.2f})")
        print(f"                   ratio {out['cold_ratio']:.2f}x  (target <= 0.5x)")
        print(f"warm export        taxiway {out['warm_taxiway_export_s']:.2f}s vs umoci {out['warm_umoci_unpack_s']:.2f}s  "
              f"ratio {out['warm_ratio']:.2f}x  (target <= 0.5x)")
        print(f"CPU time (user+sys, robust on a busy machine): cold {out['cpu_cold_taxiway_s']:.2f}s vs {out['cpu_cold_peer_s']:.2f}s "
              f"({out['cpu_cold_ratio']:.2f}x; pull {out['cpu_taxiway_pull_s']:.2f}s vs skopeo copy {out['cpu_skopeo_copy_s']:.2f}s), "
              f"warm {out['cpu_warm_taxiway_s']:.2f}s vs {out['cpu_warm_umoci_s']:.2f}s ({out['cpu_warm_ratio']:.2f}x)")
        print(f"taxiway pull peak RSS {out['pull_peak_rss_mib']:.0f} MiB  (target < 150 MiB)")
        print(f"taxiway --help {out['help_ms']:.0f} ms  (target < 150 ms)")
        if args.baseline:
            print(f"baseline ({args.baseline}): cold {out['cold_baseline_s']:.2f}s ({out['cold_baseline_ratio']:.2f}x), "
                  f"warm {out['warm_baseline_s']:.2f}s ({out['warm_baseline_ratio']:.2f}x); CPU cold "
                  f"{out['cpu_cold_baseline_s']:.2f}s, warm {out['cpu_warm_baseline_s']:.2f}s")
        print(f"load average (1, 5, 15 min): {out['load_average_start']} at the start, {out['load_average_end']} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
