"""A published app's stable front door: a loopback TCP proxy to its current machine.

Each published app keeps one URL while its releases change. The router
listens on the app's stable port and forwards every new connection to the
backend named in its state file; a re-publish writes the new backend there
and sends SIGHUP, so new connections go to the new release while open ones
finish on the old. Run as ``python -m taxiway.publish.router --listen
127.0.0.1:PORT --state FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path


class Router:
    """Forwards connections on ``listen`` to the backend in ``state`` (re-read on SIGHUP)."""

    def __init__(self, host: str, port: int, state: Path):
        self.host, self.port, self.state = host, port, state
        self.backend: tuple[str, int] | None = None
        self.reload()

    def reload(self) -> None:
        try:
            data = json.loads(self.state.read_text())
            self.backend = (data["backend_host"], int(data["backend_port"]))
        except (OSError, ValueError, KeyError):
            pass  # keep the last good backend

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        backend = self.backend
        if backend is None:
            cw.close()
            return
        try:
            br, bw = await asyncio.wait_for(asyncio.open_connection(*backend), 10)
        except (TimeoutError, OSError):
            with contextlib.suppress(Exception):
                cw.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 31\r\nconnection: close\r\n\r\n"
                         b"the app's machine is not up yet")
                await cw.drain()
                cw.close()
            return
        await asyncio.gather(self._pipe(cr, bw), self._pipe(br, cw))

    async def serve(self) -> None:
        # Handlers first: the publisher sends SIGHUP as soon as the port accepts a connection, and the
        # default action of SIGHUP would kill a router that had not installed its handler yet.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        server = await asyncio.start_server(self.handle, self.host, self.port, reuse_address=True)
        async with server:
            await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description="taxiway publish router")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--state", required=True, type=Path)
    a = ap.parse_args()
    from taxiway.errors import TaxiwayError
    from taxiway.listen import parse_listen

    try:
        host, port = parse_listen(a.listen)
    except TaxiwayError as e:
        ap.error(str(e))
    asyncio.run(Router(host, port, a.state).serve())


if __name__ == "__main__":
    main()
