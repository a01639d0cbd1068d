"""``-p HOSTPORT:PORT``: forward 127.0.0.1:HOSTPORT into a machine's private network namespace.

The listening socket lives in the host namespace (loopback only); each
forwarder thread enters the machine's network namespace (setns is per
thread), so the sockets it opens to the machine's port are created there.
For a namespace machine the target is its loopback; for a micro-VM it is the
guest's address on the tap device inside the netns QEMU runs in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from taxiway.errors import TaxiwayError
from taxiway.machines import linux as L


def listen(host_port: int, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, host_port))
    except OSError as e:
        s.close()
        raise TaxiwayError(f"cannot listen on {host}:{host_port}: {e.strerror}",
                           "pick another host port with -p HOSTPORT:PORT") from None
    s.listen(64)
    return s


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy ``a`` to ``b`` until EOF, then half-close ``b`` (one direction of a relay; a thread each way).

    Neither socket is closed here: the other direction may still be running; each is
    closed when the last thread holding it ends.
    """
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, pid: int, target: str, port: int, stop: threading.Event) -> None:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        L.setns(fd, L.CLONE_NEWNET)
    finally:
        os.close(fd)
    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        try:
            upstream = socket.create_connection((target, port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


class Forwarders:
    """Forwarding threads for one run of a machine."""

    def __init__(self, listeners: list[tuple[socket.socket, int]]):
        self.listeners = listeners
        self.stop = threading.Event()

    def start(self, pid: int, target: str = "127.0.0.1") -> None:
        """Serve, connecting to ``target`` inside the network namespace of ``pid``."""
        for listener, port in self.listeners:
            threading.Thread(target=_serve, args=(listener, pid, target, port, self.stop), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for listener, _ in self.listeners:
            with contextlib.suppress(OSError):
                listener.close()
