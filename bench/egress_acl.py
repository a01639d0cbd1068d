"""What a large egress ACL costs per request (issue 22), all on loopback.

    .venv/bin/python bench/egress_acl.py [--seconds 3] [--conns 8] [--markdown]

Measured:
- decision time: ``Acl.decide`` for a host that matches no glob (so every list is
  consulted: the rule's allowed domains, the global deny list, the global allow
  list), at 0, 1,000 and 20,000 globs (half allowed, half denied, half of each
  ``*.`` globs); beside it, the glob-by-glob matcher the ACL used before
  (``host_matches_glob`` over every glob), which is what the old ``decide`` did;
- requests/s through the real proxy (``taxiway egress serve``, a subprocess) with
  no ACL and with the 20,000-glob ACL: --conns keep-alive connections sending
  absolute-form GETs for --seconds to a tiny upstream on 127.0.0.2 (IP literal,
  so nothing is resolved). Run it with ``PYTHONPATH=<old checkout>/src`` to
  measure an older proxy the same way (the decision-time part needs this tree).

Target: per-request decision cost independent of the ACL's size, < 0.5 ms at 20,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = "127.0.0.2"


def acl_text(n: int) -> str:
    half = n // 2
    allowed = "".join(f'      - "{"*." if i % 2 else ""}allowed{i}.example.com"\n' for i in range(half))
    denied = "".join(f'  - "{"*." if i % 2 else ""}denied{i}.example.net"\n' for i in range(n - half))
    return ("version: v1\nservices:\n  - name: big\n    project: p\n    action: open\n"
            + (f"    allowed_domains:\n{allowed}" if allowed else "")
            + "default:\n  project: d\n  action: open\n"
            + (f"global_deny_list:\n{denied}" if denied else ""))


def decision_times(sizes: list[int], calls: int = 2000) -> list[tuple[int, float, float]]:
    """(globs, new decide us, old glob-by-glob us) per request."""
    from taxiway.egress.acl import host_matches_glob, parse_acl

    out = []
    for n in sizes:
        acl = parse_acl(acl_text(n))
        hosts = [f"h{i}.nomatch.example.org" for i in range(calls)]
        t0 = time.perf_counter()
        for h in hosts:
            acl.decide("big", h)
        new = (time.perf_counter() - t0) / calls * 1e6
        rule = acl.rules["big"]
        globs = [*rule.domain_globs, *acl.global_deny, *acl.global_allow]
        old_calls = max(5, min(calls, 200_000 // max(n, 1)))
        t0 = time.perf_counter()
        for h in hosts[:old_calls]:
            any(host_matches_glob(h, g) for g in globs)
        old = (time.perf_counter() - t0) / old_calls * 1e6
        out.append((n, new, old))
    return out


class Upstream:
    """A keep-alive HTTP/1.1 server answering 3 bytes, in a thread with its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

        async def main() -> None:
            self.server = await asyncio.start_server(handle, UPSTREAM, 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(main()), self.loop.run_forever()),
                         daemon=True).start()
        ready.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def proxy(acl: Path | None, log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "taxiway", "egress", "serve", "--listen", f"127.0.0.1:{port}",
            "--allow-range", f"{UPSTREAM}/32", "--resolver", "127.0.0.1:9"] + (["--acl", str(acl)] if acl else [])
    with open(log, "wb") as lf:
        p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env={**os.environ, "PROXY_PASSWORD": ""})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.05)
        yield port
    finally:
        p.terminate()
        p.wait(30)


async def load(port: int, target_port: int, conns: int, seconds: float) -> tuple[int, int]:
    """(requests completed, errors) over ``conns`` keep-alive connections for ``seconds``."""
    request = b"GET http://%s:%d/small HTTP/1.1\r\nHost: x\r\n\r\n" % (UPSTREAM.encode(), target_port)
    done, errors = 0, 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                    return
                await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
                done += 1
        except Exception:
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    return done, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--skip-decisions", action="store_true", help="only the through-proxy part")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if not args.skip_decisions:
        rows = decision_times([0, 1000, 20_000])
        print("| globs | decide us/request | old glob-by-glob us/request |")
        print("|---:|---:|---:|")
        for n, new, old in rows:
            print(f"| {n} | {new:.1f} | {old:.1f} |")
        print()
    up = Upstream()
    with tempfile.TemporaryDirectory() as d:
        big = Path(d) / "acl-20k.yaml"
        big.write_text(acl_text(20_000))
        print("| proxy ACL | conns | req/s | errors |")
        print("|---|---:|---:|---:|")
        for name, acl in (("none", None), ("20,000 globs", big)):
            with proxy(acl, Path(d) / "egress.log") as port:
                asyncio.run(load(port, up.port, 1, 0.5))  # warm-up
                n, errs = asyncio.run(load(port, up.port, args.conns, args.seconds))
            print(f"| {name} | {args.conns} | {n / args.seconds:.0f} | {errs} |")


if __name__ == "__main__":
    main()
