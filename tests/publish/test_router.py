"""The publish router: forwards to the backend in its state file, switches on SIGHUP, survives it."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

from taxiway.process import pid_alive
from taxiway.publish import deploy


def _backend(reply: bytes) -> tuple[socket.socket, int]:
    """A one-line TCP server on loopback: answers every connection with ``reply``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_router_forwards_switches_on_sighup_and_survives_it(tmp_path):
    a, port_a = _backend(b"release-a")
    b, port_b = _backend(b"release-b")
    state = tmp_path / "router.json"
    state.write_text(json.dumps({"backend_host": "127.0.0.1", "backend_port": port_a}))
    try:
        for _ in range(5):  # as publish does it: start, then SIGHUP at once (handlers are set before listen)
            rport = deploy._free_port()
            pid = deploy._ensure_router(tmp_path, {}, rport)
            try:
                os.kill(pid, signal.SIGHUP)
                with socket.create_connection(("127.0.0.1", rport), timeout=5) as c:
                    assert c.recv(100) == b"release-a"
                state.write_text(json.dumps({"backend_host": "127.0.0.1", "backend_port": port_b}))
                os.kill(pid, signal.SIGHUP)
                for _ in range(100):  # the reload is asynchronous
                    with socket.create_connection(("127.0.0.1", rport), timeout=5) as c:
                        if c.recv(100) == b"release-b":
                            break
                else:
                    raise AssertionError("the router never switched to the new backend")
                state.write_text("{not json")  # a broken state file keeps the last good backend
                os.kill(pid, signal.SIGHUP)
                with socket.create_connection(("127.0.0.1", rport), timeout=5) as c:
                    assert c.recv(100) == b"release-b"
                assert pid_alive(pid)
            finally:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
                state.write_text(json.dumps({"backend_host": "127.0.0.1", "backend_port": port_a}))
    finally:
        a.close()
        b.close()
