"""Warm redeploy after a one-line change: `taxiway deploy` through the platform vs podman by hand.

    sudo .venv/bin/python bench/platform_deploy.py [--rounds 5] [--example static|python] [--markdown]

Issue 16's target: from the command to the new release answering through the edge, < 5 s and
<= 0.5x the manual alternative. Set up once (not timed): `taxiway up -d` in a temp $TAXIWAY_HOME and
`taxiway launch` of a copy of the example (v1 built, pushed and deployed); for podman, a private
storage (--root/--runroot in the temp dir, $CONTAINERS_CONF a temp containers.conf with runc and the
ulimits this host allows: nothing under /etc or /var/lib/containers is used), the stack image the
example runs on copied in with skopeo, the first image built and its container answering.

Timed, per round, alternating who goes first, each on its own copy of the example after the same
one-line change (the page's text, so the new release is recognisable):
- taxiway: `taxiway deploy DIR` (build, push to the platform registry, release, a new machine gated
  on its check, the old one drained and stopped) while GET / loops through the edge; the time is
  until the command returned AND the edge answered with the new text; failed requests are counted.
- podman: `podman build` (layers cached), `podman run -d` of the new image (host network, a new
  loopback port: a deploy by hand has no router to switch, so it is measured to the new container
  answering on its own port), then `podman stop` + `podman rm` of the old one. --init gives podman's
  container an init as PID 1, as taxiway's machines have tini, so both stop on SIGTERM.

--example static (default): examples/static (busybox httpd; builds offline). --example python:
examples/python needs a package index for its first build; offline, serve a PEP 503 folder on an
address of a network namespace of the bench's own and run the bench inside it (as bench/build.py):

    sudo unshare -n sh -c 'ip link set lo up; ip addr add 10.200.0.1/32 dev lo;
      python3 -m http.server -b 10.200.0.1 8000 -d /opt/pypi >/dev/null 2>&1 & sleep 1;
      .venv/bin/python bench/platform_deploy.py --example python --index http://10.200.0.1:8000/simple
        --requirements "flask==3.1.3 gunicorn==26.2.0"; kill $!'
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
TAXIWAY = [sys.executable, "-m", "taxiway"]
APP = "benchapp"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass(frozen=True)
class Example:
    """An example app: where its page text is, the stack image podman builds on, its Dockerfile."""

    folder: str
    page: str  # the file whose text the one-line change edits
    text: str  # the text in it the change rewrites
    base: str
    dockerfile: str


EXAMPLES = {
    "static": Example(
        "static", "public/index.html", "hello from a static site on taxiway", "localhost/taxiway/run-base:bookworm",
        # What the static buildpack makes: busybox httpd (static binary) serving public/ as the cnb user.
        'FROM localhost/taxiway/run-base:bookworm\nCOPY busybox /bin/busybox\nCOPY public /www\nUSER 1000:1000\n'
        'CMD ["/bin/sh", "-c", "exec /bin/busybox httpd -f -p 127.0.0.1:${PORT:-8080} -h /www"]\n'),
    "python": Example(
        "python", "app.py", "hello from python on taxiway", "localhost/taxiway/build:bookworm",
        # As bench/build.py: what the python buildpack does (a venv from requirements.txt, then the source).
        'FROM localhost/taxiway/build:bookworm\nUSER root\nWORKDIR /workspace\nCOPY requirements.txt .\n'
        'ARG PIP_ARGS=""\nRUN python3 -m venv --without-pip /venv && python3 -m pip --python /venv/bin/python '
        'install --no-input --disable-pip-version-check $PIP_ARGS -r requirements.txt\nCOPY . .\n'
        'ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1\nUSER 1000:1000\n'
        # The process the python buildpack gives the app (2 workers, access log), so both sides run the
        # same server; on the host network it binds loopback only.
        'CMD ["/bin/sh", "-c", "exec gunicorn --bind 127.0.0.1:${PORT:-8080} --workers ${WEB_CONCURRENCY:-2} '
        '--access-logfile - app:app"]\n'),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, capture_output=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv[:5])} failed ({p.returncode}):\n{p.stdout.decode()[-1500:]}{p.stderr.decode()[-3000:]}")
    return p


def change(src: Path, ex: Example, n: int) -> str:
    """The one-line change of round N: the page says 'change N'; returns the text to wait for."""
    page = src / ex.page
    lines = page.read_text().splitlines(keepends=True)
    marker = f"{ex.text} (change {n})"
    for i, line in enumerate(lines):
        if ex.text in line:
            start = line.index(ex.text)
            end = line.index(")", start) + 1 if f"{ex.text} (change" in line else start + len(ex.text)
            lines[i] = line[:start] + marker + line[end:]
            break
    else:
        sys.exit(f"{page} has no {ex.text!r}")
    page.write_text("".join(lines))
    return marker


def copy_example(ex: Example, dest: Path, requirements: str) -> None:
    shutil.copytree(REPO / "examples" / ex.folder, dest)
    if requirements and (dest / "requirements.txt").exists():
        (dest / "requirements.txt").write_text("\n".join(requirements.split()) + "\n")


INTERVAL = 0.05  # seconds between GETs while waiting (--interval)


def wait_for(client: httpx.Client, url: str, marker: str, deadline: float, headers: dict | None = None,
             done=lambda: True) -> tuple[float, int, int]:
    """GET URL until it answers with MARKER and done() is true; (time the marker came, answers, failures)."""
    seen, answers, failures = None, 0, 0
    while True:
        try:
            r = client.get(url, headers=headers)
            if r.status_code == 200:
                answers += 1
                if seen is None and marker in r.text:
                    seen = time.perf_counter()
            else:
                failures += 1
        except httpx.HTTPError:
            failures += 1
        if seen is not None and done():
            return seen, answers, failures
        if time.perf_counter() > deadline:
            sys.exit(f"timed out waiting for {marker!r} at {url}")
        time.sleep(INTERVAL)


@dataclass
class Platform:
    """taxiway up in a temp home, the example launched; torn down (app, platform, machines) by close()."""

    work: Path
    ex: Example
    index: str
    requirements: str
    env: dict[str, str] = field(default_factory=dict)
    src: Path = Path()
    edge: str = ""
    up: bool = False
    verbose: bool = False

    def tw(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run([*TAXIWAY, *args], env=self.env, **kw)

    def start(self) -> None:
        home = self.work / "tw-home"
        self.env = {**os.environ, "TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(self.work / "tw-config")}
        self.up = True
        self.tw("up", "-d", "--free-ports")
        self.src = self.work / "tw-src"
        copy_example(self.ex, self.src, self.requirements)
        self.tw("launch", str(self.src), "--name", APP, "--no-deploy")
        if self.index:
            host = urlsplit(self.index).hostname or ""
            self.env["TAXIWAY_BUILD_ALLOW"] = host
            with open(self.src / "taxiway.toml", "a") as f:
                f.write(f'\n[build.args]\nPIP_INDEX_URL = "{self.index}"\nPIP_TRUSTED_HOST = "{host}"\n')
        self.tw("deploy", str(self.src))
        # The edge's plain HTTP listener (up.json; `taxiway open` may name its HTTPS one)
        self.edge = json.loads((home / "platform" / "up.json").read_text())["edge"]
        # The stack image the example runs on, for podman to build on (a copy from the machine's cache).
        self.tw("stack", "create", "build", "run-base")

    def redeploy(self, client: httpx.Client, n: int) -> tuple[float, float, int, int]:
        """One timed round: (seconds to done and answering, seconds to the first new answer, answers, failures)."""
        marker = change(self.src, self.ex, n)
        port = urlsplit(self.edge).port
        t0 = time.perf_counter()
        proc = subprocess.Popen([*TAXIWAY, "deploy", str(self.src)], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Each progress line with when it came, for --verbose's breakdown of where the time goes.
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=lambda: lines.extend(
            (time.perf_counter() - t0, ln.decode().rstrip()) for ln in proc.stdout), daemon=True)
        reader.start()
        seen, answers, failures = wait_for(client, f"http://127.0.0.1:{port}/", marker, t0 + 300,
                                           headers={"Host": f"{APP}.localhost:{port}"},
                                           done=lambda: proc.poll() is not None)
        t1 = time.perf_counter()  # the command has returned (the loop above waited for it)
        reader.join(10)
        if proc.returncode != 0:
            sys.exit("taxiway deploy failed:\n" + "\n".join(ln for _, ln in lines)[-3000:])
        if self.verbose:
            for t, ln in lines:
                print(f"    {t:6.2f} {ln}", file=sys.stderr)
            print(f"    {seen - t0:6.2f} (the edge answered with the new text)", file=sys.stderr)
        return t1 - t0, seen - t0, answers, failures

    def close(self) -> None:
        if not self.up:
            return
        subprocess.run([*TAXIWAY, "apps", "destroy", APP, "-y"], env=self.env, capture_output=True)
        subprocess.run([*TAXIWAY, "down"], env=self.env, capture_output=True)
        # `down` never stops machines: destroy whatever this home still runs.
        subprocess.run([sys.executable, "-c", "from taxiway import machines\n"
                        "for m in machines.all_machines(): machines.destroy(m, force=True)"],
                       env=self.env, capture_output=True)


@dataclass
class Podman:
    """podman with a private storage and containers.conf; the manual redeploy."""

    work: Path
    ex: Example
    index: str
    requirements: str
    env: dict[str, str] = field(default_factory=dict)
    g: list[str] = field(default_factory=list)
    src: Path = Path()
    current: str = ""
    used: bool = False

    def pm(self, *args: str) -> subprocess.CompletedProcess:
        return run(["podman", *self.g, *args], env=self.env)

    def start(self, store: Path) -> None:
        conf = self.work / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        root, runroot = self.work / "podman-root", self.work / "podman-run"
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.g = ["--root", str(root), "--runroot", str(runroot), "--storage-driver", "overlay",
                  "--tmpdir", str(self.work / "podman-tmp")]
        self.used = True
        run(["skopeo", "copy", "--quiet", f"oci:{store}:{self.ex.base}",
             f"containers-storage:[overlay@{root}+{runroot}]{self.ex.base}"], env=self.env)
        self.src = self.work / "pm-src"
        copy_example(self.ex, self.src, self.requirements)
        (self.src / "Dockerfile").write_text(self.ex.dockerfile)
        if self.ex.folder == "static":
            shutil.copy2("/bin/busybox", self.src / "busybox")

    def build_args(self, tag: str) -> list[str]:
        argv = ["build", "--layers", "--network", "host", "-q", "-t", tag]
        if self.index:
            argv += ["--build-arg", f"PIP_ARGS=--index-url {self.index} --trusted-host {urlsplit(self.index).hostname}"]
        return [*argv, str(self.src)]

    def first(self, client: httpx.Client) -> None:
        """The running v1 (not timed)."""
        self.pm(*self.build_args("bench/app:0"))
        self.current, port = self._run("bench/app:0")
        wait_for(client, f"http://127.0.0.1:{port}/", self.ex.text, time.perf_counter() + 120)

    def _run(self, tag: str) -> tuple[str, int]:
        port = free_port()
        cid = self.pm("run", "-d", "--init", "--network", "host", "-e", f"PORT={port}", tag).stdout.decode().strip()
        return cid, port

    def redeploy(self, client: httpx.Client, n: int) -> tuple[float, float]:
        """One timed round: (seconds to the new container answering and the old one removed, to the answer)."""
        marker = change(self.src, self.ex, n)
        tag = f"bench/app:{n}"
        t0 = time.perf_counter()
        self.pm(*self.build_args(tag))
        cid, port = self._run(tag)
        seen, _, _ = wait_for(client, f"http://127.0.0.1:{port}/", marker, t0 + 300)
        self.pm("stop", "-t", "5", self.current)
        self.pm("rm", self.current)
        t1 = time.perf_counter()
        self.current = cid
        return t1 - t0, seen - t0

    def close(self) -> None:
        if self.used:
            for args in (["rm", "-a", "-f", "-t", "0"], ["rmi", "-a", "-f"]):
                subprocess.run(["podman", *self.g, *args], env=self.env, capture_output=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--example", choices=sorted(EXAMPLES), default="static")
    ap.add_argument("--index", default="", help="a PEP 503 index URL for both sides' pip (--example python)")
    ap.add_argument("--requirements", default="", help='pins replacing the sample\'s ("flask==3.1.3 gunicorn==26.2.0")')
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table for bench/RESULTS.md")
    ap.add_argument("--verbose", action="store_true", help="print each deploy's progress lines with their times")
    ap.add_argument("--interval", type=float, default=0.05,
                    help="seconds between the request loop's GETs (it shares the CPU with what it measures)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: machines and podman's private storage need it")
    for tool in ("podman", "skopeo", "nats-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (scripts/install-deps.sh)")
    ex = EXAMPLES[args.example]
    global INTERVAL
    INTERVAL = args.interval
    print(f"load at the start: {load()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="taxiway-bench-platform-") as tmp:
        work = Path(tmp)
        plat = Platform(work, ex, args.index, args.requirements, verbose=args.verbose)
        pod = Podman(work, ex, args.index, args.requirements)
        tw_rows: list[tuple[float, float, int, int]] = []
        pm_rows: list[tuple[float, float]] = []
        try:
            plat.start()
            pod.start(Path(plat.env["TAXIWAY_HOME"]) / "store")
            with httpx.Client(timeout=10, trust_env=False) as client:
                pod.first(client)
                for i in range(args.rounds):
                    n = i + 1
                    order = ["taxiway", "podman"] if i % 2 == 0 else ["podman", "taxiway"]
                    for who in order:
                        if who == "taxiway":
                            tw_rows.append(plat.redeploy(client, n))
                            t = tw_rows[-1]
                            print(f"round {n}: taxiway deploy {t[0]:.2f}s (new release answered at {t[1]:.2f}s;"
                                  f" {t[2]} answers, {t[3]} failed)", file=sys.stderr)
                        else:
                            pm_rows.append(pod.redeploy(client, n))
                            t = pm_rows[-1]
                            print(f"round {n}: podman build+run+stop {t[0]:.2f}s (new container answered at"
                                  f" {t[1]:.2f}s)", file=sys.stderr)
        finally:
            pod.close()
            plat.close()
    tw, pm = statistics.median(r[0] for r in tw_rows), statistics.median(r[0] for r in pm_rows)
    tw_ans, pm_ans = statistics.median(r[1] for r in tw_rows), statistics.median(r[1] for r in pm_rows)
    failed = sum(r[3] for r in tw_rows)
    answers = sum(r[2] for r in tw_rows)
    ratio = tw / pm
    print(f"load at the end: {load()}", file=sys.stderr)
    if args.markdown:
        print(f"| side ({args.example}, {args.rounds} rounds, medians) | command to done and answering | to the first new answer |")
        print("|---|---|---|")
        print(f"| `taxiway deploy` (through the edge) | {tw:.2f} s | {tw_ans:.2f} s |")
        print(f"| `podman build` + `podman run` + `podman stop`/`rm` | {pm:.2f} s | {pm_ans:.2f} s |")
        print(f"| **ratio taxiway/podman** | **{ratio:.2f}x** (target <= 0.5x; taxiway < 5 s: "
              f"{'yes' if tw < 5 else 'no'}) | {tw_ans / pm_ans:.2f}x |")
        print()
        print(f"Requests through the edge during taxiway's deploys: {answers} answered, {failed} failed.")
        print("Each round (taxiway / podman): " + "; ".join(
            f"{i + 1}: {t[0]:.2f} / {p[0]:.2f} s" for i, (t, p) in enumerate(zip(tw_rows, pm_rows, strict=True))))
    else:
        print(f"taxiway deploy        median {tw:6.2f}s (new release first answered at {tw_ans:.2f}s)")
        print(f"podman build+run+stop median {pm:6.2f}s (new container first answered at {pm_ans:.2f}s)")
        print(f"ratio {ratio:.2f}x (target <= 0.5x), taxiway {tw:.2f}s (target < 5s); "
              f"requests through the edge during the deploys: {answers} answered, {failed} failed")
    print(json.dumps({"example": args.example, "rounds": args.rounds, "taxiway_s": round(tw, 3),
                      "podman_s": round(pm, 3), "ratio": round(ratio, 3), "failed_requests": failed}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
