"""The fabric's relay (fdaa::3:4280 -> the API on loopback) is bounded: every machine can reach it.

Run on loopback sockets (the relay takes any listening socket), so no namespace is needed.
"""

from __future__ import annotations

import socket
import threading

from taxiway.platform.fabric import Relay


def _echo(c: socket.socket) -> None:
    with c:
        while data := c.recv(4096):
            c.sendall(data)


def _echo_server() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _relay(**limits) -> tuple[Relay, int, socket.socket]:
    upstream = _echo_server()
    listener = socket.create_server(("127.0.0.1", 0))
    relay = Relay(listener, upstream.getsockname(), **limits).start()
    return relay, listener.getsockname()[1], upstream


def _echoes(c: socket.socket) -> bool:
    c.sendall(b"ping")
    return c.recv(16) == b"ping"


def test_connections_over_the_per_source_limit_are_refused_and_the_others_still_relay():
    relay, port, upstream = _relay(max_per_source=2)
    try:
        a = socket.create_connection(("127.0.0.1", port), timeout=10)
        b = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert _echoes(a) and _echoes(b)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(16) == b""  # closed at once, no thread held for it
        a.close()
        # a slot freed by a closed connection is given out again
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                c.sendall(b"ping")
                got = c.recv(16)
            except OSError:
                got = b""
            if got == b"ping":
                break
            c.close()
        assert got == b"ping"
        assert _echoes(b)
    finally:
        relay.close()
        upstream.close()


def test_idle_connections_are_closed_and_the_total_is_bounded():
    relay, port, upstream = _relay(max_connections=3, idle_timeout=0.5)
    try:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        assert all(_echoes(c) for c in held)
        refused = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert refused.recv(16) == b""
        # idle past the timeout: the relay hangs up, and its slots come back
        assert all(c.recv(16) == b"" for c in held)
        fresh = None
        for _ in range(200):
            fresh = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                if _echoes(fresh):
                    break
            except OSError:
                pass
            fresh.close()
        assert fresh is not None and _echoes(fresh)
    finally:
        relay.close()
        upstream.close()
