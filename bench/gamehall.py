#!/usr/bin/env python3
"""Load benchmark for gamehall: bot players over real websockets, real HTML pages.

Starts its own gamehall node(s) (and a redis-server for the two-node run) on
127.0.0.1, creates GAMES tic-tac-toe games with two bot players each, lets them
play (and rematch) for DURATION seconds with THINK seconds of thinking per move,
and reports:

* moves per second the hall served,
* move-to-page latency: from a bot sending a move to each page of that game
  receiving the re-rendered HTML (p50/p99 over every page, and over the slowest
  page of each move: "every page"),
* memory per idle game (RSS growth of a fresh node after creating idle games)
  and per live game (with its two sockets).

Two nodes: games are created on node A and node B in turn; the creator's page
is on the game's own node and the other player's page on the other node, so
every move crosses Redis on its way to one of the two pages (and half the moves
are sent from the node that does not own the game).

    python bench/gamehall.py                      # one node, then two nodes
    python bench/gamehall.py --nodes 1 --games 1000 --duration 30 --think 1.0
    python bench/gamehall.py --nodes 2 --tls      # Redis with mutual TLS (taxiway's CA)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websockets

VERSION = re.compile(r'data-version="(\d+)" data-status="(\w+)"\s+data-turn="(\w*)"')
LEGAL = re.compile(r'data-move="(\d+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


@contextlib.contextmanager
def process(argv: list[str], port: int, log: Path):
    with open(log, "wb") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(url: str, data: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(data).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def machine() -> dict:
    """How busy this machine is: load average and a CPU probe (seconds for sum(range(10**7)),
    about 0.2 s on an idle core here), since the cores are shared."""
    t = time.perf_counter()
    sum(range(10**7))
    return {
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
        "probe_s": round(time.perf_counter() - t, 2),
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


@dataclass
class Stats:
    sent: dict[tuple[str, int], float] = field(default_factory=dict)  # (code, version) -> send time
    pages: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # deliveries per move
    moves: int = 0
    errors: int = 0
    error_texts: dict[str, int] = field(default_factory=dict)
    measuring: bool = False


class Page:
    """One bot player's page: HTML fragments in, moves out."""

    def __init__(
        self, url: str, code: str, stats: Stats, think: float, leader: bool, rng: random.Random
    ):
        self.url, self.code, self.stats, self.think, self.leader, self.rng = (
            url,
            code,
            stats,
            think,
            leader,
            rng,
        )
        self.token = secrets.token_urlsafe(9)
        self.version = -1
        self.acted = -1
        self.stopping = False
        self.ws = None
        self.tasks: set[asyncio.Task] = set()

    async def connect(self) -> None:
        ws_base = self.url.replace("http://", "ws://")
        for attempt in range(5):  # a loaded machine may be slow to answer the handshake
            try:
                self.ws = await websockets.connect(
                    f"{ws_base}/ws/{self.code}?token={self.token}",
                    max_size=2**20,
                    ping_interval=None,
                    compression=None,
                    open_timeout=30,
                )
                return
            except (TimeoutError, OSError):
                if attempt == 4:
                    raise
                await asyncio.sleep(1 + attempt)

    async def join(self, name: str) -> None:
        await self.ws.send(json.dumps({"action": "join", "name": name}))

    def _later(self, coro) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _act(self, version: int, message: dict, is_move: bool) -> None:
        await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.think)
        if self.stopping or self.version != version:
            return
        if is_move:
            if self.stats.measuring:  # only moves sent inside the window are measured
                self.stats.sent[(self.code, version + 1)] = time.perf_counter()
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.ws.send(json.dumps(message))

    async def run(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                now = time.perf_counter()
                m = VERSION.search(raw)
                if m is None:
                    m = re.search(r'class="notice error" role="alert">([^<]+)</p>', raw)
                    if m:
                        self.stats.errors += 1
                        text = m.group(1)[:80]
                        self.stats.error_texts[text] = self.stats.error_texts.get(text, 0) + 1
                    continue
                version, status, turn = int(m.group(1)), m.group(2), m.group(3)
                if version <= self.version:
                    continue
                self.version = version
                key = (self.code, version)
                sent = self.stats.sent.get(key)
                if sent is not None:
                    self.stats.pages.setdefault(key, []).append(now - sent)
                if self.stopping or self.acted == version:
                    continue
                if status == "playing" and turn == "you":
                    self.acted = version
                    move = self.rng.choice([int(x) for x in LEGAL.findall(raw)])
                    if self.stats.measuring:
                        self.stats.moves += 1
                    self._later(self._act(version, {"action": "move", "move": move}, True))
                elif status == "over" and self.leader:
                    self.acted = version
                    self._later(self._act(version, {"action": "rematch"}, False))
                elif (
                    status == "lobby"
                    and self.leader
                    and raw.count("(you)") == 1
                    and "open seat" not in raw
                ):
                    self.acted = version
                    self._later(self._act(version, {"action": "start"}, False))

    async def close(self) -> None:
        self.stopping = True
        for t in list(self.tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()


async def load(
    urls: tuple[str, str], games: int, duration: float, think: float, warmup: float, pids: list[int]
) -> dict:
    """Create ``games`` games on urls[0], seat one bot page on each url, play for ``duration``."""
    stats = Stats()
    rng = random.Random(7)
    # Games are created on each node in turn (people create games where they are); the
    # creator's page is on that node and the other player's page on the other node.
    homes = [(urls[i % 2], urls[(i + 1) % 2]) for i in range(games)]
    codes = [post(home + "/api/games", {"game": "tictactoe"})["code"] for home, _ in homes]
    rss_before = sum(rss_kib(p) for p in pids)
    pages: list[Page] = []
    for code, (home, away) in zip(codes, homes, strict=True):
        pages.append(Page(home, code, stats, think, True, random.Random(rng.random())))
        pages.append(Page(away, code, stats, think, False, random.Random(rng.random())))
    sem = asyncio.Semaphore(100)

    async def connect(p: Page) -> None:
        async with sem:
            await p.connect()

    t0 = time.perf_counter()
    await asyncio.gather(*(connect(p) for p in pages))
    connect_s = time.perf_counter() - t0
    runners = [asyncio.create_task(p.run()) for p in pages]
    for i in range(0, len(pages), 2):
        await pages[i].join(f"Bot {i}")
        await pages[i + 1].join(f"Bot {i + 1}")
    rss_live = sum(rss_kib(p) for p in pids)
    await asyncio.sleep(warmup)
    cpu0 = [cpu_seconds(p) for p in pids]
    me0 = time.process_time()
    stats.measuring = True
    t_start = time.perf_counter()
    await asyncio.sleep(duration)
    stats.measuring = False
    elapsed = time.perf_counter() - t_start
    cpu1 = [cpu_seconds(p) for p in pids]
    me1 = time.process_time()
    for p in pages:
        p.stopping = True
    await asyncio.sleep(5.0)  # let moves sent inside the window reach every page
    await asyncio.gather(*(p.close() for p in pages))
    for r in runners:
        r.cancel()
    await asyncio.gather(*runners, return_exceptions=True)

    deliveries = [lat for lats in stats.pages.values() for lat in lats]
    every_page = [max(lats) for lats in stats.pages.values() if len(lats) == 2]
    incomplete = sum(1 for lats in stats.pages.values() if len(lats) < 2)
    ms = 1000.0
    return {
        "games": games,
        "players": len(pages),
        "duration_s": round(elapsed, 1),
        "think_s": think,
        "connect_s": round(connect_s, 2),
        "moves": len(stats.pages),
        "moves_per_s": round(len(stats.pages) / elapsed, 1),
        "page_updates_per_s": round(len(deliveries) / elapsed, 1),
        "latency_ms_p50": round(pct(deliveries, 50) * ms, 2),
        "latency_ms_p99": round(pct(deliveries, 99) * ms, 2),
        "every_page_ms_p50": round(pct(every_page, 50) * ms, 2),
        "every_page_ms_p99": round(pct(every_page, 99) * ms, 2),
        "every_page_ms_max": round(max(every_page) * ms, 2) if every_page else None,
        "moves_missing_a_page": incomplete,
        "errors_on_pages": stats.errors,
        "error_samples": dict(sorted(stats.error_texts.items(), key=lambda kv: -kv[1])[:5]),
        "server_cpu_pct": [
            round((b - a) / elapsed * 100, 1) for a, b in zip(cpu0, cpu1, strict=True)
        ],
        # CPU seconds of every server process (nodes and Redis) per move measured
        "server_cpu_ms_per_move": round(
            sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / max(1, len(stats.pages)) * ms,
            2,
        ),
        "bench_client_cpu_pct": round((me1 - me0) / elapsed * 100, 1),
        "live_game_kib": round((rss_live - rss_before) / games, 1),
    }


def idle_memory(url: str, pid: int, n: int) -> dict:
    """RSS growth of a node per idle game (created, in the lobby, no sockets)."""
    for _ in range(50):  # warm the allocator and import everything first
        post(url + "/api/games", {"game": "tictactoe"})
    time.sleep(0.5)
    before = rss_kib(pid)
    for _ in range(n):
        post(url + "/api/games", {"game": "tictactoe"})
    time.sleep(0.5)
    after = rss_kib(pid)
    return {
        "idle_games": n,
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "idle_game_kib": round((after - before) / n, 1),
    }


def gamehall_argv(port: int, *extra: str) -> list[str]:
    level = os.environ.get("GAMEHALL_BENCH_LOG_LEVEL", "warning")
    return [
        sys.executable,
        "-m",
        "gamehall.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        level,
        *extra,
    ]


def run_one_node(args, tmp: Path) -> dict:
    before = machine()
    port = free_port()
    with process(gamehall_argv(port), port, tmp / "node.log") as proc:
        url = f"http://127.0.0.1:{port}"
        mem = idle_memory(url, proc.pid, args.idle_games)
    port = free_port()
    with process(gamehall_argv(port), port, tmp / "node-load.log") as proc:
        url = f"http://127.0.0.1:{port}"
        result = asyncio.run(
            load((url, url), args.games, args.duration, args.think, args.warmup, [proc.pid])
        )
    return {
        "setup": "one node, in memory",
        "machine_before": before,
        "machine_after": machine(),
        **mem,
        **result,
    }


def redis_tls(tmp: Path, rport: int) -> tuple[list[str], list[str]]:
    """Certificates from taxiway's own CA: the redis-server arguments for TLS only with
    client certificates required, and the gamehall arguments to connect with one."""
    from taxiway.pki import CA

    ca, _ = CA.init(tmp / "ca")
    ca.issue(["localhost", "127.0.0.1"], record=False).write(tmp / "redis.pem", tmp / "redis-key.pem")
    ca.issue([], client=True, cn="gamehall", record=False).write(
        tmp / "client.pem", tmp / "client-key.pem"
    )
    root = str(tmp / "ca" / "root.pem")
    server = ["--port", "0", "--tls-port", str(rport), "--tls-cert-file", str(tmp / "redis.pem"),
              "--tls-key-file", str(tmp / "redis-key.pem"), "--tls-ca-cert-file", root,
              "--tls-auth-clients", "yes"]
    client = ["--redis", f"rediss://127.0.0.1:{rport}/0", "--redis-ca", root,
              "--redis-cert", str(tmp / "client.pem"), "--redis-key", str(tmp / "client-key.pem")]
    return server, client


def run_two_nodes(args, tmp: Path) -> dict:
    before = machine()
    rport = free_port()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    if args.tls:
        listen, common = redis_tls(tmp, rport)
    else:
        listen, common = ["--port", str(rport)], ["--redis", f"redis://127.0.0.1:{rport}/0"]
    with process(
        [
            redis,
            "--bind",
            "127.0.0.1",
            *listen,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        rport,
        tmp / "redis.log",
    ) as rproc:
        pa, pb = free_port(), free_port()
        with (
            process(gamehall_argv(pa, *common, "--node-id", "a"), pa, tmp / "a.log") as a,
            process(gamehall_argv(pb, *common, "--node-id", "b"), pb, tmp / "b.log") as b,
        ):
            result = asyncio.run(
                load(
                    (f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"),
                    args.games,
                    args.duration,
                    args.think,
                    args.warmup,
                    [a.pid, b.pid, rproc.pid],
                )
            )
    result["server_cpu_pct"] = dict(
        zip(["node_a", "node_b", "redis"], result["server_cpu_pct"], strict=True)
    )
    return {
        "setup": "two nodes through Redis" + (" (mutual TLS)" if args.tls else ""),
        "machine_before": before,
        "machine_after": machine(),
        **result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", choices=["1", "2", "both"], default="both")
    ap.add_argument(
        "--games", type=int, default=1000, help="concurrent games (two bot players each)"
    )
    ap.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds played before measuring")
    ap.add_argument(
        "--think", type=float, default=2.0, help="mean seconds a bot thinks before each move"
    )
    ap.add_argument("--idle-games", type=int, default=2000, help="idle games for the memory figure")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="two nodes: Redis speaks only TLS and requires client certificates (taxiway's CA)",
    )
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    gc.set_threshold(50_000, 20, 100)  # the measuring client must not stall in collections
    results = []
    keep = os.environ.get("GAMEHALL_BENCH_LOGS")  # keep the servers' logs there
    with (
        contextlib.nullcontext(keep)
        if keep
        else tempfile.TemporaryDirectory(prefix="gamehall-bench-") as tmp
    ):
        if args.nodes in ("1", "both"):
            results.append(run_one_node(args, Path(tmp)))
            print(json.dumps(results[-1], indent=2), flush=True)
        if args.nodes in ("2", "both"):
            results.append(run_two_nodes(args, Path(tmp)))
            print(json.dumps(results[-1], indent=2), flush=True)


if __name__ == "__main__":
    main()
