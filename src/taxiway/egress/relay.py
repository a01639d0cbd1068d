"""Relay a tunnel through two asyncio protocols (for clients on TLS, which splice can't serve).

Each side's protocol writes what it receives straight into the other side's
transport, and pauses the other side's reading while its own transport's
write buffer is full: one callback per read, flow control both ways, EOF
passed on as a half-close where the transport allows it.
"""

from __future__ import annotations

import asyncio
import time


class Relay(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to the peer transport."""

    def __init__(self, tunnel: ProtocolTunnel, side: str):
        self.tunnel, self.side = tunnel, side
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.eof = False
        self.closed = False
        self.count = 0
        self._early: list[bytes] = []

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.transport = transport

    def attach(self, peer: asyncio.Transport) -> None:
        """Start writing to ``peer``, first whatever arrived before it was known."""
        self.peer = peer
        for data in self._early:
            peer.write(data)
        self._early.clear()
        if self.eof:
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.tunnel.last = time.monotonic()
        if self.peer is None:
            self._early.append(data)
        elif not self.peer.is_closing():
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.is_closing():
            if peer.can_write_eof():
                peer.write_eof()
            else:
                peer.close()
        if self.tunnel.both_eof():
            self.tunnel.close()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and not self.peer.is_closing():
            self.peer.close()
        self.tunnel.side_lost()


class ProtocolTunnel:
    """Two Relay protocols, one per side; ``done`` resolves when both sides are closed."""

    def __init__(self) -> None:
        self.client = Relay(self, "client")
        self.upstream = Relay(self, "upstream")
        self.last = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()

    def both_eof(self) -> bool:
        return self.client.eof and self.upstream.eof

    def side_lost(self) -> None:
        if self.client.closed and self.upstream.closed and not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()
