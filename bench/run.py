"""Machines side by side: ``taxiway run`` vs ``podman run --rm`` vs bare ``runc run``, with hyperfine.

The image is a small busybox-static image (tests/helpers/layout.py) pushed with
skopeo to a docker-registry started here on 127.0.0.1 (free port); taxiway and
podman both pull it from there. podman uses throwaway --root/--runroot
directories (never the host's storage) with runc and the ulimits this host
needs; runc runs a bundle prepared once (``runc spec`` + the exported rootfs).

Measured (wall time, hyperfine; CPU time beside it where the process tree is ours):
  * warm: start to exit of ``true``: ``taxiway run --rm IMG true`` vs
    ``podman run --rm IMG true`` (target <= 0.25x) and vs ``runc run`` (within 4x);
  * cold: first run of a just-pulled image, unpack included (``taxiway
    snapshots prune --all`` before each) vs podman's first run after ``podman
    pull`` (``podman rmi`` + ``podman pull`` before each; target <= 0.5x);
  * the same warm run with the store's reference cache removed before each run (what the
    cache saves: the store's import and reads, see taxiway/oci/refcache.py);
  * micro-VM: ``taxiway run --rm --isolation vm IMG true`` wall time and the
    boot-to-entrypoint time the runtime records (KVM if it works, else TCG).

taxiway's modules are byte-compiled first (``compileall``), as an installed
package is; this environment sets PYTHONDONTWRITEBYTECODE.

Usage: python bench/run.py [--runs N] [--vm-runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

TAXIWAY = str(Path(sys.executable).parent / "taxiway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(argv: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{r.stderr.decode(errors='replace')}")
    return r


def hyperfine(cmds: dict[str, str], runs: int, work: Path, env: dict, warmup: int = 3,
              prepare: dict[str, str] | None = None) -> dict[str, dict]:
    """Run hyperfine over ``cmds`` (name -> shell command); returns name -> stats in ms."""
    for n, c in cmds.items():  # fail with the tool's own message, not hyperfine's
        if prepare:
            subprocess.run(prepare.get(n, "true"), shell=True, executable="/bin/bash", env={**os.environ, **env})
        sh(c.split(), env=env)
    out = work / f"hf-{time.monotonic_ns()}.json"
    argv = ["hyperfine", "-N" if not prepare else "--shell=bash", "--warmup", str(warmup), "--runs", str(runs),
            "--export-json", str(out), "--style", "none"]
    names = list(cmds)
    for n in names:
        if prepare:
            argv += ["--prepare", prepare.get(n, "true")]
        argv += ["-n", n, cmds[n]]
    sh(argv, env=env)
    res = json.loads(out.read_text())["results"]
    return {r["command"]: {"mean": r["mean"] * 1000, "median": r["median"] * 1000, "min": r["min"] * 1000,
                           "stddev": (r["stddev"] or 0) * 1000, "cpu": (r["user"] + r["system"]) * 1000}
            for r in res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cold-runs", type=int, default=8)
    ap.add_argument("--vm-runs", type=int, default=3, help="micro-VM runs (0: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("hyperfine", "podman", "runc", "skopeo", "docker-registry"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (see .ci/apt-packages.txt)")
    sh([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "taxiway")])

    from helpers.layout import busybox_entries, make_layer, write_layout
    from helpers.servers import docker_registry

    work = Path(tempfile.mkdtemp(prefix="taxiway-bench-run-"))
    env = {"TAXIWAY_HOME": str(work / "home"), "TAXIWAY_CONFIG": str(work / "config"),
           "TAXIWAY_KVM_CACHE": str(work / "kvm.json")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    pod_conf = work / "containers.conf"
    pod_conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024","nproc=1024:1024"]\n'
                        '[engine]\nruntime = "runc"\n')
    penv = {"CONTAINERS_CONF": str(pod_conf)}
    podman = f"podman --root {work}/podman/root --runroot {work}/podman/run --storage-driver overlay"
    results: dict = {"date": time.strftime("%Y-%m-%d"), "host": os.uname().nodename}
    try:
        with docker_registry(work / "registry") as reg:
            port = reg.port
            image = f"127.0.0.1:{port}/bench/busybox:1"
            write_layout(work / "layout", [make_layer(busybox_entries())], "1",
                         config={"Cmd": ["/bin/sh"]})
            sh(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{work}/layout:1", f"docker://{image}"])
            sh([TAXIWAY, "pull", image], env=env)
            sh(podman.split() + ["pull", "-q", "--tls-verify=false", image], env=penv)
            # the runc bundle: the exported rootfs and `runc spec` running `true`, no terminal
            bundle = work / "bundle"
            bundle.mkdir()
            sh([TAXIWAY, "image", "export", image, str(bundle / "rootfs")], env=env)
            sh(["runc", "spec", "--bundle", str(bundle)])
            spec = json.loads((bundle / "config.json").read_text())
            spec["process"]["terminal"] = False
            spec["process"]["args"] = ["/bin/true"]
            (bundle / "config.json").write_text(json.dumps(spec))
            sh([TAXIWAY, "run", "--rm", image, "true"], env=env)  # unpack once
            sh(podman.split() + ["run", "--rm", image, "true"], env=penv)

            penv_all = {**env, **penv}
            warm = hyperfine({
                "taxiway run --rm": f"{TAXIWAY} run --rm {image} true",
                "podman run --rm": f"{podman} run --rm {image} true",
                "runc run (prepared bundle)": f"runc --root {work}/runc run --bundle {bundle} bench-true",
            }, args.runs, work, penv_all)
            results["warm"] = warm
            # the store's reference cache (oci/refcache.py): the same warm run with the cache removed
            # before each run, so every run opens the store (Store.image) and it writes the cache again
            memo = f"{env['TAXIWAY_HOME']}/store/.taxiway/refs.json"
            results["memo"] = hyperfine({
                "taxiway run --rm (ref cache removed)": f"{TAXIWAY} run --rm {image} true",
            }, args.runs, work, penv_all, prepare={"taxiway run --rm (ref cache removed)": f"rm -f {memo}"})
            cold = hyperfine({
                "taxiway run --rm (cold)": f"{TAXIWAY} run --rm {image} true",
                "podman run --rm (first after pull)": f"{podman} run --rm {image} true",
            }, args.cold_runs, work, penv_all, warmup=0, prepare={
                "taxiway run --rm (cold)": f"{TAXIWAY} snapshots prune --all >/dev/null",
                "podman run --rm (first after pull)":
                    f"{podman} rmi -f {image} >/dev/null 2>&1; {podman} pull -q --tls-verify=false {image} >/dev/null",
            })
            results["cold"] = cold
            # micro-VM: wall time, and boot-to-entrypoint as recorded by the runtime
            vm_wall, boots, accel = [], [], None
            for i in range(args.vm_runs):
                t = time.perf_counter()
                sh([TAXIWAY, "run", "--name", f"vm{i}", "--isolation", "vm", image, "true"], env=env)
                vm_wall.append((time.perf_counter() - t) * 1000)
                m = json.loads(sh([TAXIWAY, "machines", "inspect", f"vm{i}"], env=env).stdout)[0]
                accel = m["accel"]
                boots += [e["boot_ms"] for e in m["events"] if e["type"] == "entrypoint"]
                sh([TAXIWAY, "machines", "rm", f"vm{i}"], env=env)
            vm_wall.sort()
            boots.sort()
            results["vm"] = {"accel": accel, "wall_median": vm_wall[len(vm_wall) // 2],
                             "boot_to_entrypoint_median": boots[len(boots) // 2] if boots else None,
                             "runs": args.vm_runs} if vm_wall else None
    finally:
        subprocess.run(podman.split() + ["system", "reset", "-f"], env={**os.environ, **penv}, capture_output=True)
        subprocess.run(["runc", "--root", f"{work}/runc", "delete", "-f", "bench-true"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    w, c = results["warm"], results["cold"]
    tw, pm, rc = w["taxiway run --rm"], w["podman run --rm"], w["runc run (prepared bundle)"]
    results["ratios"] = {
        "warm_vs_podman": tw["median"] / pm["median"],
        "warm_vs_runc": tw["median"] / rc["median"],
        "cold_vs_podman": c["taxiway run --rm (cold)"]["median"] / c["podman run --rm (first after pull)"]["median"],
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| case | median ms | mean ± sd ms | min ms | CPU ms (user+sys, children) |")
    print("|---|---|---|---|---|")
    for group in ("warm", "memo", "cold"):
        for name, s in results[group].items():
            print(f"| {group}: {name} | {s['median']:.0f} | {s['mean']:.0f} ± {s['stddev']:.0f} | {s['min']:.0f} | {s['cpu']:.0f} |")
    v = results["vm"]
    if v:  # --vm-runs 0 leaves the micro-VM out
        print(f"| micro-VM ({v['accel']}): taxiway run --rm --isolation vm | {v['wall_median']:.0f} | | | |")
        print(f"| micro-VM ({v['accel']}): boot to entrypoint | {v['boot_to_entrypoint_median']} | | | |")
    r = results["ratios"]
    print(f"\nwarm taxiway/podman = {r['warm_vs_podman']:.2f}x (target <= 0.25x); "
          f"warm taxiway/runc = {r['warm_vs_runc']:.2f}x (target <= 4x); "
          f"cold taxiway/podman = {r['cold_vs_podman']:.2f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
