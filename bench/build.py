"""Build the Python sample with `taxiway build` and with `buildah bud`, side by side.

    sudo .venv/bin/python bench/build.py [--runs 3] [--markdown]

Both start from the same Debian base: the stack's build image
(localhost/taxiway/build:bookworm: python3, python3-venv, pip) is made with
`taxiway stack create` (mmdebstrap, cached) and copied into a private buildah
storage with skopeo; nothing of that is timed. The Dockerfile does what the
python buildpack does (a venv installed with the base's pip from
requirements.txt, then the source), with `--layers` so buildah caches steps.

Timed, per run, in fresh state (a new $TAXIWAY_HOME / a new buildah storage):
- cold: the first build of examples/python (pip downloads from PyPI for both);
- rebuild: after a one-line change to app.py, the same build again.

Targets (issue 8): rebuild <= 0.3x buildah's and < 2 s; cold no slower than buildah's.

Offline (no PyPI): ``--index URL`` points both tools' pip at another index
(taxiway: ``--env PIP_INDEX_URL`` through its egress proxy, with the index's
host in ``TAXIWAY_BUILD_ALLOW``; buildah: ``--index-url`` in the RUN step), and
``--requirements "flask==3.1.3 gunicorn==26.2.0"`` replaces the sample's pins
with what that index holds. To serve a PEP 503 folder (here /opt/pypi) on an
address of a network namespace of the bench's own, never the host's network:

    sudo unshare -n sh -c 'ip link set lo up; ip addr add 10.200.0.1/32 dev lo;
      python3 -m http.server -b 10.200.0.1 8000 -d /opt/pypi >/dev/null 2>&1 & sleep 1;
      .venv/bin/python bench/build.py --runs 3 --markdown --index http://10.200.0.1:8000/simple
        --requirements "flask==3.1.3 gunicorn==26.2.0"; kill $!'
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

BASE = "localhost/taxiway/build:bookworm"
CA = "/etc/ssl/certs/ca-certificates.crt"
DOCKERFILE = f"""\
FROM {BASE}
USER root
WORKDIR /workspace
COPY requirements.txt .
ARG PIP_ARGS=""
RUN python3 -m venv --without-pip /venv && python3 -m pip --python /venv/bin/python install --no-input --disable-pip-version-check $PIP_ARGS -r requirements.txt
COPY . .
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 1000:1000
CMD ["/bin/sh", "-c", "exec gunicorn --bind 0.0.0.0:${{PORT:-8080}} app:app"]
"""


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    t = time.perf_counter()
    p = subprocess.run(argv, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed:\n{p.stderr.decode()[-3000:]}")
    return dt


def touch_app(src: Path, i: int) -> None:
    with open(src / "app.py", "a") as f:
        f.write(f"\n# one-line change {i}\n")


#: Set from --index / --requirements in main().
INDEX = ""
REQUIREMENTS = ""


def copy_sample(dest: Path) -> None:
    shutil.copytree(REPO / "examples" / "python", dest)
    if REQUIREMENTS:
        (dest / "requirements.txt").write_text("\n".join(REQUIREMENTS.split()) + "\n")


def bench_taxiway(work: Path, stack_home: Path, run: int) -> tuple[float, float]:
    from urllib.parse import urlsplit

    home = work / f"tw-home-{run}"
    src = work / f"tw-src-{run}"
    copy_sample(src)
    env = {"TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(home / "config")}
    # Stack images into this home's store (a copy from the machine cache; not timed, as buildah's pull isn't).
    subprocess.run([sys.executable, "-m", "taxiway", "stack", "create", "build", "run-python"], env={**os.environ, **env},
                   check=True, capture_output=True)
    argv = [sys.executable, "-m", "taxiway", "build", str(src), "-t", "bench/python:1"]
    if INDEX:
        host = urlsplit(INDEX).hostname or ""
        env["TAXIWAY_BUILD_ALLOW"] = host
        argv += ["--env", f"PIP_INDEX_URL={INDEX}", "--env", f"PIP_TRUSTED_HOST={host}"]
    cold = timed(argv, env)
    touch_app(src, run)
    rebuild = timed(argv, env)
    return cold, rebuild


def bench_buildah(work: Path, stack_home: Path, run: int) -> tuple[float, float]:
    root, runroot = work / f"buildah-root-{run}", work / f"buildah-run-{run}"
    g = ["--root", str(root), "--runroot", str(runroot), "--storage-driver", "overlay"]
    src = work / f"bd-src-{run}"
    copy_sample(src)
    (src / "Dockerfile").write_text(DOCKERFILE)
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{stack_home / 'store'}:{BASE}",
                    f"containers-storage:[overlay@{root}+{runroot}]{BASE}"], check=True, capture_output=True)
    argv = ["buildah", *g, "bud", "--layers", "--network", "host", "-v", f"{CA}:{CA}:ro",
            "-t", "bench/python:1", "-f", str(src / "Dockerfile"), str(src)]
    if INDEX:
        from urllib.parse import urlsplit

        argv[argv.index("-t"):argv.index("-t")] = [
            "--build-arg", f"PIP_ARGS=--index-url {INDEX} --trusted-host {urlsplit(INDEX).hostname}"]
    try:
        cold = timed(argv)
        touch_app(src, run)
        rebuild = timed(argv)
    finally:
        subprocess.run(["buildah", *g, "rm", "--all"], capture_output=True)
        subprocess.run(["buildah", *g, "rmi", "--all", "--force"], capture_output=True)
    return cold, rebuild


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table for bench/RESULTS.md")
    ap.add_argument("--index", default="", help="a PEP 503 index URL for both tools' pip instead of PyPI")
    ap.add_argument("--requirements", default="", help='pins replacing the sample\'s ("flask==3.1.3 gunicorn==26.2.0")')
    args = ap.parse_args()
    global INDEX, REQUIREMENTS
    INDEX, REQUIREMENTS = args.index, args.requirements
    if os.geteuid() != 0:
        sys.exit("run as root: taxiway build uses mount namespaces, and buildah's storage is private to this run")
    for tool in ("buildah", "skopeo", "mmdebstrap"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (scripts/install-deps.sh)")
    with tempfile.TemporaryDirectory(prefix="taxiway-bench-build-") as tmp:
        work = Path(tmp)
        stack_home = work / "stack-home"
        subprocess.run([sys.executable, "-m", "taxiway", "stack", "create", "build", "run-python"], check=True,
                       env={**os.environ, "TAXIWAY_HOME": str(stack_home)}, capture_output=True)
        rows: dict[str, list[tuple[float, float]]] = {"taxiway build": [], "buildah bud --layers": []}
        for i in range(args.runs):
            # Alternate who goes first so PyPI/proxy warm-up favours neither.
            order = [("taxiway build", bench_taxiway), ("buildah bud --layers", bench_buildah)]
            if i % 2:
                order.reverse()
            for name, fn in order:
                rows[name].append(fn(work, stack_home, i))
                print(f"run {i + 1}: {name}: cold {rows[name][-1][0]:.2f}s, rebuild {rows[name][-1][1]:.2f}s", file=sys.stderr)
        med = {k: (statistics.median(c for c, _ in v), statistics.median(r for _, r in v)) for k, v in rows.items()}
        tw, bd = med["taxiway build"], med["buildah bud --layers"]
        if args.markdown:
            print("| tool | cold build (median) | rebuild after a one-line change (median) |")
            print("|---|---|---|")
            for k, (c, r) in med.items():
                print(f"| {k} | {c:.2f} s | {r:.2f} s |")
            print(f"| **ratio taxiway/buildah** | **{tw[0] / bd[0]:.2f}x** (target <= 1x) | **{tw[1] / bd[1]:.2f}x** (target <= 0.3x, and < 2 s) |")
            print()
            print("Each run (cold / rebuild): " + "; ".join(
                f"run {i + 1}: taxiway {t[0]:.2f} / {t[1]:.2f} s, buildah {b[0]:.2f} / {b[1]:.2f} s"
                for i, (t, b) in enumerate(zip(rows["taxiway build"], rows["buildah bud --layers"], strict=True))))
        else:
            for k, (c, r) in med.items():
                print(f"{k:24} cold {c:6.2f}s  rebuild {r:6.2f}s")
            print(f"ratio cold {tw[0] / bd[0]:.2f}x (target <= 1), rebuild {tw[1] / bd[1]:.2f}x (target <= 0.3, and {tw[1]:.2f}s < 2s)")


if __name__ == "__main__":
    main()
