"""Relay a tunnel's two sockets through kernel pipes with splice(2) (Linux).

No tunnel byte enters Python: each direction moves data socket -> pipe ->
socket inside the kernel, driven by the event loop's readiness callbacks.
This is what lets a Python proxy keep up with squid on large transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time

AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
_BULK = 64 * 1024


class _Direction:
    """src -> pipe -> dst; reads only while the pipe has room, writes while it has data."""

    def __init__(self, tunnel: SpliceTunnel, src: socket.socket, dst: socket.socket):
        self.t, self.src, self.dst = tunnel, src.fileno(), dst.fileno()
        self.dst_sock = dst
        self.rp, self.wp = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.cap = 65536
        with contextlib.suppress(OSError):
            self.cap = fcntl.fcntl(self.wp, _F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.count = 0
        self.eof = False
        self.finished = False
        self.reading = False
        self.writing = False

    def want_read(self, on: bool) -> None:
        if on and not self.reading:
            self.t.loop.add_reader(self.src, self.on_read)
        elif not on and self.reading:
            self.t.loop.remove_reader(self.src)
        self.reading = on

    def want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.t.loop.add_writer(self.dst, self.flush)
        elif not on and self.writing:
            self.t.loop.remove_writer(self.dst)
        self.writing = on

    def on_read(self) -> None:
        # Move as much as the socket has now (fewer wake-ups per megabyte), emptying
        # the pipe into dst between reads.
        while True:
            room = self.cap - self.in_pipe
            if room <= 0:
                break
            try:
                n = os.splice(self.src, self.wp, room, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                self.t.fail()
                return
            if n == 0:
                self.eof = True
                break
            self.in_pipe += n
            self.count += n
            if not self._drain() or n < _BULK:
                # A small read means the socket is (nearly) empty: don't pay for an
                # EAGAIN splice; bulk transfers keep looping.
                break
        self.t.last = time.monotonic()
        self.flush()

    def _drain(self) -> bool:
        """Splice the pipe into dst; False if dst would block (or failed)."""
        while self.in_pipe:
            try:
                m = os.splice(self.rp, self.dst, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError:
                self.t.fail()
                return False
            self.in_pipe -= m
        return True

    def flush(self) -> None:
        if self.t.closed:
            return
        self._drain()
        if self.t.closed:
            return
        self.want_write(self.in_pipe > 0)
        self.want_read(not self.eof and self.in_pipe < self.cap)
        if self.eof and self.in_pipe == 0 and not self.finished:
            self.finished = True
            with contextlib.suppress(OSError):
                self.dst_sock.shutdown(socket.SHUT_WR)
            self.t.direction_finished()

    def stop(self) -> None:
        self.want_read(False)
        self.want_write(False)
        for fd in (self.rp, self.wp):
            with contextlib.suppress(OSError):
                os.close(fd)


class SpliceTunnel:
    """Two connected sockets relayed both ways; ``done`` resolves when both are closed.

    Same surface as the protocol-based tunnel: ``client.count`` (bytes to
    upstream), ``upstream.count`` (bytes to the client), ``last``, ``close()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: socket.socket):
        self.loop = loop
        self.socks = (client, upstream)
        for s in self.socks:
            s.setblocking(False)
        self.done: asyncio.Future[None] = loop.create_future()
        self.last = time.monotonic()
        self.closed = False
        self.client = _Direction(self, client, upstream)
        self.upstream = _Direction(self, upstream, client)

    def start(self) -> None:
        self.client.want_read(True)
        self.upstream.want_read(True)

    def direction_finished(self) -> None:
        if self.client.finished and self.upstream.finished:
            self.close()

    def fail(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.stop()
        self.upstream.stop()
        for s in self.socks:
            s.close()
        if not self.done.done():
            self.done.set_result(None)

    abort = close


async def dial_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket (for the splice relay), closed on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def detach(writer: asyncio.StreamWriter) -> socket.socket:
    """Take a client's socket away from its transport (a dup), once what was written is sent."""
    transport = writer.transport
    transport.pause_reading()
    while transport.get_write_buffer_size():
        await writer.drain()
        await asyncio.sleep(0)
    sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    transport.close()
    return sock
