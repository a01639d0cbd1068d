"""The host side of the micro-VM guest agent (``vmagent.c``): frames, the supervisor's hub, exec clients.

The agent is PID 1 in the guest and speaks one multiplexed, framed protocol
over a virtio-serial port (``type | channel u32 | length u32 | payload``, see
the C file). On the host, QEMU serves that port as ``agent.sock`` in the
machine's directory; the process that runs the VM (the attached ``taxiway
run``, or the detached supervisor) connects to it and is the hub:

* channel 0 is the main process: its stdout/stderr go to the machine log (and
  the terminal when attached), the terminal's input to it with ``-i``;
* ``exec.sock`` (mode 0600) takes ``machines exec`` clients, each given its
  own channel; the hub rewrites channel numbers and relays frames both ways;
* a client whose first frame is SIGNAL signals the main process
  (``machines stop``).

Input is flow-controlled: the agent acknowledges stdin bytes once written to
the process, and a sender keeps at most ``WINDOW`` bytes unacknowledged, so
the agent never has to stop reading its port for one slow reader. Output is
bounded, not windowed: the agent stops reading processes while its queue to
the port is full, and the hub stops reading the agent while an exec client
has ``CLIENT_BUF_MAX`` bytes it has not taken (that client then slows every
channel down; none grows without bound). Sockets
are reached through ``/proc/self/fd/N/…`` of the machine directory, so a long
``$TAXIWAY_HOME`` never exceeds the 108-byte limit of unix socket paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.errors import TaxiwayError
from taxiway.fsutil import atomic_path
from taxiway.machines.dirs import vm_dir
from taxiway.machines.stdio import FORWARDED, handling, raw_terminal, write_all

if TYPE_CHECKING:
    from typing import Any

OPEN, STDIN, STDIN_EOF, STDOUT, STDERR, EXIT, SIGNAL, RESIZE, STARTED, ERROR, READY, ACK = range(1, 13)
HDR = struct.Struct(">BII")
MAXPAY = 1 << 20
WINDOW = 256 * 1024
CLIENT_BUF_MAX = 8 << 20
POWEROFF_GRACE = 10.0  # seconds QEMU gets to exit after the main process did  # the hub stops reading the agent while a client has this much unread
SOURCE = Path(__file__).with_name("vmagent.c")
JAIL_SOURCE = Path(__file__).with_name("vmjail.c")


# -- frames (pure) -----------------------------------------------------------------------------


def frame(kind: int, ch: int, payload: bytes = b"") -> bytes:
    return HDR.pack(kind, ch, len(payload)) + payload


class Decoder:
    """Bytes in, ``(type, channel, payload)`` frames out."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= HDR.size:
            kind, ch, n = HDR.unpack_from(self.buf)
            if n > MAXPAY:
                raise ValueError(f"frame of {n} bytes")
            if len(self.buf) < HDR.size + n:
                break
            out.append((kind, ch, bytes(self.buf[HDR.size:HDR.size + n])))
            del self.buf[:HDR.size + n]
        return out


def open_payload(argv: list[str], env: list[str], uid: int, gid: int, groups: list[int], cwd: str,
                 tty: bool = False, rows: int = 24, cols: int = 80, stdin: bool = False) -> bytes:
    """The OPEN frame's payload: NUL-terminated ``key=value`` items the agent parses."""
    items = [f"arg={a}" for a in argv] + [f"env={e}" for e in env] + [
        f"cwd={cwd or '/'}", f"uid={int(uid)}", f"gid={int(gid)}", "groups=" + ",".join(str(int(g)) for g in groups),
        f"tty={int(tty)}", f"rows={int(rows)}", f"cols={int(cols)}", f"stdin={int(stdin)}"]
    return b"".join(i.encode() + b"\0" for i in items)


def tty_env(env: list[str], tty: bool) -> list[str]:
    """With a terminal, TERM=xterm unless the machine sets TERM (as Docker does)."""
    if tty and not any(e.startswith("TERM=") for e in env):
        return [*env, "TERM=xterm"]
    return env


def exit_status(payload: bytes) -> tuple[int, int]:
    """EXIT's payload as (code 0-255, signal 0-64); what a hostile guest makes up instead is (255, 0)."""
    if len(payload) < 8:
        return 255, 0
    code, sig = struct.unpack(">ii", payload[:8])
    return (code if 0 <= code <= 255 else 255), (sig if 0 <= sig <= 64 else 0)


def guest_text(payload: bytes, limit: int = 300) -> str:
    """Text from the guest (an error) made safe for the host's terminal: one line, no control characters, bounded."""
    text = payload[:limit * 4].decode(errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _u32(payload: bytes) -> int:
    return struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else 0


def _i32(v: int) -> bytes:
    return struct.pack(">i", v)


# -- the agent binary --------------------------------------------------------------------------


def binary() -> Path:
    """The static agent, compiled once per source version into ``$TAXIWAY_HOME/vm``."""
    return compiled(SOURCE, "tw-agent")


def jail_binary() -> Path:
    """``tw-vmjail`` (``vmjail.c``): runs virtiofsd with a reduced bounding set and a setid-refusing filter."""
    return compiled(JAIL_SOURCE, "tw-vmjail")


def compiled(source: Path, stem: str) -> Path:
    """``source`` compiled (static) once per version into ``$TAXIWAY_HOME/vm/<stem>-<hash>``."""
    src = source.read_bytes()
    out = vm_dir() / f"{stem}-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if not gcc:
        raise TaxiwayError("gcc is needed once to build the micro-VM guest agent", "install gcc and libc6-dev")
    # gcc writes the file by name (its linker replaces the empty temp file, 0755 by the umask);
    # fsync: the helper is trusted by its name alone from now on
    with atomic_path(out, 0o755) as tmp:
        r = subprocess.run([gcc, "-static", "-O2", "-o", str(tmp), str(source)], capture_output=True)
        if r.returncode != 0:
            first = (r.stderr.decode(errors="replace").strip().splitlines() or ["gcc failed"])[-1]
            raise TaxiwayError(f"could not build the micro-VM helper {stem}: {first[:200]}", "install gcc and libc6-dev")
    for old in out.parent.glob(f"{stem}-*"):  # earlier versions
        if old != out:
            with contextlib.suppress(OSError):
                old.unlink()
    return out


# -- sockets ------------------------------------------------------------------------------------


class DirFd:
    """An O_PATH handle on a directory, for short socket paths (``/proc/self/fd/N/name``)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def path(self, name: str) -> str:
        return f"/proc/self/fd/{self.fd}/{name}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def connect(mdir: Path, name: str, timeout: float = 5.0) -> socket.socket:
    d = DirFd(mdir)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(d.path(name))
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return s
    finally:
        d.close()


# -- the hub, in the process that runs the VM ------------------------------------------------------


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.dec = Decoder()
        self.out = bytearray()
        self.ch: int | None = None
        self.closing = False  # close once ``out`` is flushed


class Hub:
    """Relays between the agent, channel 0's log/terminal and exec clients (one select loop)."""

    def __init__(self, m: Any, attached: bool, pump: Any):
        self.m = m
        self.attached = attached
        self.pump = pump
        self.agent: socket.socket | None = None
        self.to_agent = bytearray()
        self.dec = Decoder()
        self.clients: dict[int, _Client] = {}  # by socket fd
        self.by_ch: dict[int, _Client] = {}
        self.next_ch = 1
        self.main_exit: tuple[int, int] | None = None
        self.main_error: str | None = None
        self.started_at: float | None = None
        self.main_unacked = 0
        self.stdin_open = False
        self.tty = False
        self.pending_signals: list[int] = []
        self.stdin_fd: int | None = None  # the terminal's stdin while it goes to the main process
        self.on_main_started: Any = None  # called with the monotonic time the main process was exec'd
        self.dirfd = DirFd(m.dir)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dirfd.path("exec.sock"))
            self.listener.bind(self.dirfd.path("exec.sock"))  # 0600: root only
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.listener.setblocking(False)

    # -- setup

    def connect_agent(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """Connect to QEMU's agent socket (QEMU waits for us before it boots the guest)."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.dirfd.path("agent.sock"))
                break
            except OSError:
                s.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    return  # the caller sees QEMU's exit and its stderr
                time.sleep(0.005)
        s.setblocking(False)
        self.agent = s

    def open_main(self, tty: bool, interactive: bool) -> None:
        p = self.m.process
        rows, cols = 24, 80
        if tty:
            with contextlib.suppress(OSError):
                cols, rows = os.get_terminal_size(0)
        self.tty, self.stdin_open = tty, interactive or tty
        self.send(OPEN, 0, open_payload(p["argv"], tty_env(p["env"], tty), p["uid"], p["gid"], p.get("groups") or [],
                                        p.get("workdir") or "/", tty, rows, cols, self.stdin_open))

    def send(self, kind: int, ch: int, payload: bytes = b"") -> None:
        self.to_agent += frame(kind, ch, payload)

    # -- frames from the agent

    def _from_agent(self, kind: int, ch: int, payload: bytes) -> None:
        if ch == 0:
            if kind in (STDOUT, STDERR):
                stream = "stdout" if kind == STDOUT else "stderr"
                self.pump.write(stream, payload)
                if self.attached:
                    with contextlib.suppress(OSError):
                        write_all(1 if kind == STDOUT else 2, payload)
            elif kind == STARTED and self.started_at is None:  # once: a guest repeating it writes no more events
                self.started_at = time.monotonic()
                if self.on_main_started is not None:
                    self.on_main_started(self.started_at)
            elif kind == EXIT:
                self.main_exit = exit_status(payload)
            elif kind == ERROR:
                self.main_error = guest_text(payload)
                self.pump.write("stderr", payload + b"\n")  # the runtime raises it as the start error
            elif kind == ACK:
                self.main_unacked = max(0, self.main_unacked - _u32(payload))
            return
        c = self.by_ch.get(ch)
        if c is None:
            return
        c.out += frame(kind, ch, payload)
        if kind == EXIT:
            self.by_ch.pop(ch, None)
            c.ch = None
            c.closing = True

    # -- frames from exec clients

    def _from_client(self, c: _Client, kind: int, payload: bytes) -> None:
        if c.ch is None:
            if c.closing:
                return
            if kind == SIGNAL:  # `machines stop`: signal the main process
                self.send(SIGNAL, 0, payload[:4])
                c.closing = True
                return
            if kind != OPEN:
                c.closing = True
                return
            try:
                req = json.loads(payload)
                argv = [str(a) for a in req["argv"]]
            except (ValueError, KeyError, TypeError):
                c.out += frame(ERROR, 0, b"bad exec request") + frame(EXIT, 0, _i32(127) + _i32(0))
                c.closing = True
                return
            p = self.m.process
            ch = self.next_ch
            self.next_ch += 1
            c.ch = ch
            self.by_ch[ch] = c
            tty = bool(req.get("tty"))
            self.send(OPEN, ch, open_payload(argv, tty_env(p["env"], tty), p["uid"], p["gid"], p.get("groups") or [],
                                             p.get("workdir") or "/", tty,
                                             int(req.get("rows") or 24), int(req.get("cols") or 80),
                                             bool(req.get("stdin"))))
            return
        if kind in (STDIN, STDIN_EOF, SIGNAL, RESIZE):
            self.send(kind, c.ch, payload)

    def _drop_client(self, c: _Client) -> None:
        if c.ch is not None:  # gone before its process: hang it up, as a closed terminal would
            self.send(STDIN_EOF, c.ch)
            self.send(SIGNAL, c.ch, _i32(signal.SIGHUP))
            self.by_ch.pop(c.ch, None)
        self.clients.pop(c.sock.fileno(), None)
        with contextlib.suppress(OSError):
            c.sock.close()

    # -- the loop

    def signal_main(self, sig: int) -> None:
        self.pending_signals.append(sig)

    def run(self, console: Any) -> None:
        """Serve until QEMU closes its output (it has exited); ``console`` handles serial lines."""
        fds: dict[int, str] = {console.out_fd: "console", console.err_fd: "qemu-err"}
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.stdin_fd = 0 if (self.attached and self.stdin_open) else None
        exit_deadline: float | None = None
        try:
            while fds:  # QEMU's serial console (stdout) and its stderr: both closed once it exited
                self._send_signals()
                rl, wl = self._watched()
                rl = [*fds, wake_r, *rl]
                timeout = None
                if self.main_exit is not None:  # the guest powers off now; do not wait for a stuck one forever
                    if exit_deadline is None:
                        exit_deadline = time.monotonic() + POWEROFF_GRACE
                    timeout = exit_deadline - time.monotonic()
                    if timeout <= 0:
                        return
                try:
                    r, w, _ = select.select(rl, wl, [], timeout)
                except InterruptedError:
                    continue
                for x in r:
                    if x == wake_r:  # a signal arrived: its handler queued it, the loop sends it
                        with contextlib.suppress(OSError):
                            os.read(wake_r, 512)
                    elif isinstance(x, int) and x in fds and x != self.stdin_fd:
                        data = _read(x)
                        if data:
                            console.feed(fds[x], data)
                        else:
                            fds.pop(x)
                    else:
                        self._readable(x)
                for x in w:
                    self._writable(x)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)

    def _send_signals(self) -> None:
        """Signals the attached CLI received, to the main process (a resize as RESIZE)."""
        while self.pending_signals:
            sig = self.pending_signals.pop(0)
            if sig == signal.SIGWINCH:
                with contextlib.suppress(OSError):
                    cols, rows = os.get_terminal_size(0)
                    self.send(RESIZE, 0, struct.pack(">HH", rows, cols))
            else:
                self.send(SIGNAL, 0, _i32(sig))

    def _watched(self) -> tuple[list[Any], list[Any]]:
        """What to wait for: readable and writable sockets and fds (flow control decides which)."""
        rl: list[Any] = [self.listener]
        wl: list[Any] = []
        if self.agent is not None:
            # an exec client that does not read slows the agent's every channel down, never our memory
            if not any(len(c.out) > CLIENT_BUF_MAX for c in self.clients.values()):
                rl.append(self.agent)
            if self.to_agent:
                wl.append(self.agent)
        for c in list(self.clients.values()):
            if not c.closing:
                rl.append(c.sock)
            if c.out:
                wl.append(c.sock)
            elif c.closing:
                self._drop_client(c)
        if self.stdin_fd is not None and self.main_unacked < WINDOW and self.main_exit is None:
            rl.append(self.stdin_fd)
        return rl, wl

    def _readable(self, x: Any) -> None:
        if x is self.listener:
            with contextlib.suppress(OSError):
                cs, _ = self.listener.accept()
                cs.setblocking(False)
                self.clients[cs.fileno()] = _Client(cs)
        elif x is self.agent:
            self._read_agent()
        elif x == self.stdin_fd:
            data = _read(0)
            if data:
                self.main_unacked += len(data)
                self.send(STDIN, 0, data)
            else:
                self.send(STDIN_EOF, 0)
                self.stdin_fd = None
        elif isinstance(x, socket.socket):
            c = self.clients.get(x.fileno())
            if c is not None:
                self._read_client(c)

    def _read_agent(self) -> None:
        assert self.agent is not None
        data = _recv(self.agent)
        if data is None:
            return
        try:
            if not data:
                raise ValueError("closed")
            frames = self.dec.feed(data)
        except ValueError:  # gone, or a guest that breaks the protocol: not listened to any more
            self.agent.close()
            self.agent = None
            return
        for kind, ch, payload in frames:
            self._from_agent(kind, ch, payload)

    def _read_client(self, c: _Client) -> None:
        data = _recv(c.sock)
        if data is None:
            return
        try:
            if not data:
                raise ValueError("closed")
            frames = c.dec.feed(data)
        except ValueError:
            self._drop_client(c)
            return
        for kind, _ch, payload in frames:
            self._from_client(c, kind, payload)

    def _writable(self, x: Any) -> None:
        if x is self.agent and self.agent is not None:
            try:
                n = self.agent.send(self.to_agent)
                del self.to_agent[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.to_agent.clear()
        elif isinstance(x, socket.socket):
            c = self.clients.get(x.fileno())
            if c is None:
                return
            try:
                n = x.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop_client(c)

    def close(self) -> None:
        """The VM is gone: tell exec clients still waiting, and remove the sockets."""
        for c in list(self.clients.values()):
            if c.ch is not None:
                c.out += frame(ERROR, c.ch, b"the machine stopped") + frame(EXIT, c.ch, _i32(255) + _i32(0))
            with contextlib.suppress(OSError):
                c.sock.setblocking(True)
                c.sock.settimeout(1)
                c.sock.sendall(c.out)
            with contextlib.suppress(OSError):
                c.sock.close()
        self.clients.clear()
        with contextlib.suppress(OSError):
            self.listener.close()
        for name in ("exec.sock", "agent.sock"):
            with contextlib.suppress(OSError):
                os.unlink(self.dirfd.path(name))
        if self.agent is not None:
            with contextlib.suppress(OSError):
                self.agent.close()
        self.dirfd.close()


def _read(fd: int) -> bytes:
    """What a readable fd has; b"" at its end (or an error: the same to us)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _recv(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has: None if nothing yet, b"" once it is closed (or broken)."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


# -- clients: `machines exec` and `machines stop` ---------------------------------------------------


def _exec_socket(m: Any) -> socket.socket:
    try:
        return connect(m.dir, "exec.sock")
    except OSError as e:
        raise TaxiwayError(f"cannot reach the agent of micro-VM {m.name} ({e.strerror or e})",
                           f"check that it runs: `taxiway machines ls`; its log: `taxiway machines logs {m.name}`") from None


def signal_main(m: Any, sig: int) -> bool:
    """Ask the VM's supervisor to deliver ``sig`` to the main process; False if it cannot be reached."""
    try:
        s = connect(m.dir, "exec.sock", timeout=2)
    except OSError:
        return False
    try:
        s.sendall(frame(SIGNAL, 0, _i32(sig)))
        return True
    except OSError:
        return False
    finally:
        s.close()


class _ExecClient:
    """One ``machines exec`` of a micro-VM, on the client side: frames out, the command's output in."""

    def __init__(self, s: socket.socket, argv: list[str], tty: bool, interactive: bool, local_tty: bool):
        self.s = s
        rows, cols = _terminal_size() if local_tty else (24, 80)
        # the request (and EOF without -i) go out with the loop's other writes: the process may be over,
        # and the hub gone, before we finish sending; what it answered is still ours to read
        self.out = bytearray(frame(OPEN, 0, json.dumps({"argv": argv, "tty": tty, "rows": rows, "cols": cols,
                                                        "stdin": interactive}).encode()))
        if not interactive:
            self.out += frame(STDIN_EOF, 0)
        self.stdin_fd: int | None = 0 if interactive else None
        self.dec = Decoder()
        self.sending = True
        self.unacked = 0
        self.pending: list[int] = []
        self.code: int | None = None
        self.error: str | None = None

    def send_signals(self) -> None:
        while self.pending:
            sig = self.pending.pop(0)
            if sig == signal.SIGWINCH:
                with contextlib.suppress(OSError):
                    cols, rows = os.get_terminal_size(0)
                    self.out += frame(RESIZE, 0, struct.pack(">HH", rows, cols))
            else:
                self.out += frame(SIGNAL, 0, _i32(sig))

    def read_stdin(self) -> None:
        data = _read(0)
        if data:
            self.unacked += len(data)
            self.out += frame(STDIN, 0, data)
        else:
            self.out += frame(STDIN_EOF, 0)
            self.stdin_fd = None

    def flush(self) -> None:
        try:
            n = self.s.send(self.out)
            del self.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the hub closed our channel (its process is done): read its last frames
            self.sending = False
            self.stdin_fd = None
            self.out.clear()

    def receive(self) -> bool:
        """Frames from the hub; False once it closed the connection."""
        data = _recv(self.s)
        if data is None:
            return True
        if not data:
            return False
        for kind, _ch, payload in self.dec.feed(data):
            if kind == STDOUT:
                write_all(1, payload)
            elif kind == STDERR:
                write_all(2, payload)
            elif kind == ACK:
                self.unacked = max(0, self.unacked - _u32(payload))
            elif kind == ERROR:
                self.error = guest_text(payload)
            elif kind == EXIT:
                c, sig = exit_status(payload)
                self.code = 128 + sig if sig else c
        return True

    def serve(self, wake_r: int) -> None:
        """Until the command's exit status arrives (or the hub goes away)."""
        s = self.s
        s.setblocking(False)
        while self.code is None:
            self.send_signals()
            rl: list[Any] = [s, wake_r]
            if self.stdin_fd is not None and self.unacked < WINDOW:
                rl.append(self.stdin_fd)
            try:
                r, w, _ = select.select(rl, [s] if self.out and self.sending else [], [])
            except InterruptedError:
                continue
            if wake_r in r:  # a signal: its handler queued it
                with contextlib.suppress(OSError):
                    os.read(wake_r, 512)
            if self.stdin_fd is not None and self.stdin_fd in r:
                self.read_stdin()
            if s in w:
                self.flush()
            if s in r and not self.receive():
                return


def _terminal_size() -> tuple[int, int]:
    """(rows, cols) of our terminal, 24x80 if it has none."""
    try:
        cols, rows = os.get_terminal_size(0)
    except OSError:
        return 24, 80
    return rows, cols


def exec_client(m: Any, argv: list[str], tty: bool = False, interactive: bool = False) -> int:
    """Run ``argv`` in a running micro-VM through its agent; returns the exit code."""
    s = _exec_socket(m)
    local_tty = tty and os.isatty(0)
    client = _ExecClient(s, argv, tty, interactive, local_tty)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # with a terminal in the guest, Ctrl-C is a byte on stdin (raw mode): only resizes are signals here
    handled = (signal.SIGWINCH,) if local_tty else (*FORWARDED, signal.SIGQUIT)
    try:
        with handling(lambda n, _f: client.pending.append(n), handled), raw_terminal(0, local_tty):
            client.serve(wake_r)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        s.close()
    code, error = client.code, client.error
    if error and (code is None or code in (127, 255)):
        raise TaxiwayError(error if error != "the machine stopped" else f"micro-VM {m.name} stopped during exec",
                           "check the command and the machine's image")
    if code is None:
        raise TaxiwayError(f"lost the connection to micro-VM {m.name} during exec",
                           f"see `taxiway machines logs {m.name}`")
    return code


def wait_socket(path: Path, proc: subprocess.Popen | None, timeout: float) -> bool:
    """Wait for a daemon (virtiofsd) to create its socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.005)
    return path.exists()

