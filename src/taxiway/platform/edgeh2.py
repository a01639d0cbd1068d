"""HTTP/2 at the edge (TLS with ALPN ``h2``), with the ``h2`` library's state machine.

Each HTTP/2 stream becomes one HTTP/1.1 request through the edge's own plumbing
(:meth:`Edge.handle`: routing, least-loaded balancing, retries, in-flight counts for
drains, pooled HTTP/1.1 connections to the machines, limits), so a machine never
sees HTTP/2 and both protocols behave alike. The translation is all here:

- request: pseudo-headers to a request line and ``Host``; cookies joined; a body
  without ``content-length`` is sent chunked; a field holding CR, LF or NUL resets
  the stream (it would otherwise split into two HTTP/1.1 fields);
- response: the HTTP/1.1 head the edge writes becomes HEADERS (hop-by-hop fields
  dropped), its body (length, chunked or until close) DATA frames, sent as the
  peer's flow-control window allows; :meth:`_StreamWriter.drain` waits for the
  window, so a slow HTTP/2 client slows the machine's response, as HTTP/1.1 does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from taxiway.egress import http
from taxiway.platform.edgehttp import parse_response_head

if TYPE_CHECKING:
    from taxiway.platform.edge import Edge

MAX_STREAMS = 128
# Upload windows: a stream may have STREAM_WINDOW bytes in flight (plus what its reader holds,
# at most twice the header limit, before the edge stops acknowledging), all streams CONN_WINDOW.
STREAM_WINDOW = 256 * 1024
CONN_WINDOW = 1 << 20
RESET_LIMIT = 100  # streams a client may cancel early before its resets are weighed against its answers
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
_BAD = (b"\r", b"\n", b"\x00")


class BadRequest(ValueError):
    """An HTTP/2 request that cannot be one HTTP/1.1 request."""


def request_head(headers: list[tuple[bytes, bytes]], has_body: bool) -> tuple[bytes, bool, str]:
    """(HTTP/1.1 request head, whether its body must be chunked, method) for an HTTP/2 request."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    length = False
    for name, value in headers:
        if any(b in name or b in value for b in _BAD):
            raise BadRequest("CR, LF or NUL in a header field")
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)
        elif name in _HOP or name == b"host" and b":authority" in pseudo:
            continue
        else:
            length = length or name == b"content-length"
            fields.append((name, value))
    method = pseudo.get(b":method", b"")
    path = pseudo.get(b":path", b"")
    authority = pseudo.get(b":authority") or next((v for n, v in fields if n == b"host"), b"")
    if not method or not path or method == b"CONNECT":
        raise BadRequest("a request needs :method and :path (CONNECT is not served)")
    fields = [(n, v) for n, v in fields if n != b"host"]
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    chunked = has_body and not length
    if chunked:
        fields.append((b"transfer-encoding", b"chunked"))
    lines = [method + b" " + path + b" HTTP/1.1", b"host: " + authority]
    lines += [n + b": " + v for n, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n", chunked, method.decode("latin-1")


class _Dechunk:
    """The payload of a chunked body (the edge writes it canonically; read it strictly anyway)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.left = 0
        self.state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.state == "data":
                take = min(self.left, len(self.buf))
                if not take:
                    break
                out += self.buf[:take]
                del self.buf[:take]
                self.left -= take
                if self.left == 0:
                    self.state = "crlf"
                continue
            i = self.buf.find(b"\r\n")
            if i < 0:
                break
            line = bytes(self.buf[:i])
            del self.buf[: i + 2]
            if self.state == "size":
                self.left = int(line.split(b";")[0], 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "crlf":
                self.state = "size"
            elif not line:  # the blank line after trailers
                self.done = True
        return bytes(out)


class _StreamWriter:
    """What :meth:`Edge.handle` writes an HTTP/1.1 response to, turned into HTTP/2 frames."""

    def __init__(self, conn: H2Connection, stream_id: int, method: str) -> None:
        self.conn, self.stream_id, self.method = conn, stream_id, method
        self.head = bytearray()
        self.state = "head"     # head, body, done
        self.kind, self.left = "none", 0
        self.dechunk: _Dechunk | None = None
        self.pending = bytearray()  # DATA not yet sent: the peer's window is closed
        self.ended = False
        self.closed = False
        self.window = asyncio.Event()
        self.transport = conn.transport  # for callers that look at is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.conn.transport.get_extra_info(name, default)

    def write(self, data: bytes) -> None:
        if self.closed or self.state == "done":
            return
        if self.state == "head":
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            raw, rest = bytes(self.head[: i + 4]), bytes(self.head[i + 4:])
            self.head.clear()
            rhead = parse_response_head(raw)  # the edge wrote it: llhttp reads it again quickly
            if 100 <= rhead.status < 200:  # interim answers are not passed on
                if rest:
                    self.write(rest)
                return
            self._headers(rhead)
            data = rest
            if self.state == "done" or not data:
                return
        self._body(data)

    def _headers(self, rhead: http.ResponseHead) -> None:
        tokens = http.connection_tokens(rhead.headers)
        out = [(b":status", str(rhead.status).encode())]
        out += [(k.lower(), v) for k, v in rhead.headers if k.lower() not in _HOP and k.lower() not in tokens]
        self.kind, self.left = http.response_framing(rhead, self.method)
        if self.kind == "chunked":
            self.dechunk = _Dechunk()
        end = self.kind == "none" or (self.kind == "length" and self.left == 0)
        self.conn.send_headers(self.stream_id, out, end)
        self.state = "done" if end else "body"
        self.ended = end

    def _body(self, data: bytes) -> None:
        end = False
        if self.kind == "length":
            data = data[: self.left]
            self.left -= len(data)
            end = self.left == 0
        elif self.kind == "chunked":
            assert self.dechunk is not None
            data = self.dechunk.feed(data)
            end = self.dechunk.done
        self.pending += data
        if end:
            self.state = "done"
        self.conn.pump(self)

    def finish(self, ok: bool) -> None:
        """The request ended: end the stream (a body read until close), or reset a broken one."""
        if self.closed:
            return
        if self.state == "head":
            self.conn.send_headers(self.stream_id, [(b":status", b"502"), (b"content-length", b"0")], True)
            self.ended = True
            self.state = "done"
        elif self.state == "body" and self.kind == "close" and ok:
            self.state = "done"
            self.conn.pump(self)
        elif self.state != "done" or not ok:
            self.conn.reset(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.closed = True

    async def drain(self) -> None:
        while self.pending and not self.closed:
            self.window.clear()
            await self.window.wait()
        if self.closed and self.state != "done":
            raise ConnectionResetError("the HTTP/2 stream was reset")

    def close(self) -> None:
        self.closed = True
        self.window.set()

    def can_write_eof(self) -> bool:
        return False


class _Stream:
    """One request stream: its body as a StreamReader (for :meth:`Edge.handle`) and its answer."""

    def __init__(self, conn: H2Connection, stream_id: int, method: str, chunked: bool) -> None:
        self.conn, self.stream_id = conn, stream_id
        self.reader = asyncio.StreamReader(limit=conn.edge.config.max_header_bytes)
        # The reader pauses "its transport" when more than twice its limit waits unread, and
        # resumes it once read: that is when this stream stops and restarts acknowledging the
        # client's DATA, so a client cannot pile a body up in memory faster than the machine reads it.
        self.reader.set_transport(self)  # type: ignore[arg-type]
        self.writer = _StreamWriter(conn, stream_id, method)
        self.chunked = chunked
        self.task: asyncio.Task | None = None
        self.held = False
        self.unacked = 0

    def pause_reading(self) -> None:
        self.held = True

    def resume_reading(self) -> None:
        self.held = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.acknowledge(self.stream_id, n)

    def received(self, n: int) -> None:
        if self.held:
            self.unacked += n
        else:
            self.conn.acknowledge(self.stream_id, n)

    def body(self, data: bytes) -> None:
        if data:
            self.reader.feed_data(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def end(self) -> None:
        if self.chunked:
            self.reader.feed_data(b"0\r\n\r\n")
        self.reader.feed_eof()


class H2Connection(asyncio.Protocol):
    """One HTTP/2 client connection (already through TLS)."""

    def __init__(self, edge: Edge, registry: set[Any]) -> None:
        self.edge = edge
        self.registry = registry
        # Inbound headers are checked (a client may send anything); ours are already lowercase and
        # filtered, and checking them again cost a tenth of a request (measured with bench/edge_tls.py).
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, _Stream] = {}
        self.transport: Any = None
        self.client_ip = "?"
        self.paused = False
        self._flush_soon = False
        self.resets = 0      # streams the client cancelled before their answer
        self.completed = 0   # streams answered

    # -- transport callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "?"
        self.registry.add(self)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.edge.config.max_header_bytes})
        self.h2.initiate_connection()
        # The connection's window starts at 64 KiB whatever the settings say: open it to CONN_WINDOW
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2.events.DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.body(ev.data)
                    st.received(ev.flow_controlled_length)
                else:
                    self.acknowledge(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.end()
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.writer.close()
                    if st.task is not None:
                        st.task.cancel()
                    self.resets += 1
                    if self.resets > RESET_LIMIT and self.resets > 2 * self.completed:
                        # "Rapid reset" (CVE-2023-44487): each stream opened and cancelled at once
                        # still costs the edge a request; a client doing mostly that is cut off.
                        self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                        self._flush()
                        self.transport.close()
                        return
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for st in list(self.streams.values()):
                    if st.writer.pending:
                        self.pump(st.writer)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.transport.close()
        self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        for st in self.streams.values():
            st.writer.close()
            if st.task is not None:
                st.task.cancel()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for st in list(self.streams.values()):
            st.writer.window.set()

    # -- frames out
    def flush(self) -> None:
        """Send the frames h2 has queued, once per loop iteration: every stream's answers of
        one iteration go out in one TLS write (a write per frame cost most of a request's time)."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.send_headers(stream_id, headers, end_stream=end)
        if end:
            self._finished(stream_id)
        self.flush()

    def pump(self, w: _StreamWriter) -> None:
        """Send as much of a stream's pending body as the windows allow (and END_STREAM when done)."""
        try:
            while w.pending:
                room = min(self.h2.local_flow_control_window(w.stream_id), self.h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(w.pending[:room])
                del w.pending[:room]
                self.h2.send_data(w.stream_id, chunk)
            if not w.pending and w.state == "done" and not w.ended:
                self.h2.end_stream(w.stream_id)
                w.ended = True
                self._finished(w.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            w.close()
        self.flush()
        if not w.pending and not self.paused:
            w.window.set()

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Give the client back ``n`` bytes of flow-control window (the stream's and the connection's)."""
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.acknowledge_received_data(n, stream_id)
        self.flush()

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self.streams.pop(stream_id, None)
        self.flush()

    def _finished(self, stream_id: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None and st.task is not None and st.task.done():
            self.streams.pop(stream_id, None)

    def shutdown(self) -> None:
        """The edge stops: GOAWAY (streams in progress may finish), then close once they did."""
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self._flush()
        if not self.streams and self.transport is not None:
            self.transport.close()

    # -- one request
    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        try:
            raw, chunked, method = request_head(list(ev.headers), has_body=ev.stream_ended is None)
        except BadRequest:
            self.reset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        st = _Stream(self, sid, method, chunked)
        self.streams[sid] = st
        if ev.stream_ended is not None:
            st.end()
        st.task = asyncio.get_running_loop().create_task(self._serve(sid, st, raw))

    async def _serve(self, sid: int, st: _Stream, raw: bytes) -> None:
        ok = False
        try:
            await self.edge.handle(raw, st.reader, st.writer, self.client_ip)  # type: ignore[arg-type]
            ok = True
            self.completed += 1
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bug must not take the connection down, but must be seen
            self.edge.log(msg="error", client=self.client_ip, error=repr(e), protocol="h2")
        finally:
            st.writer.finish(ok)
            if st.writer.state == "done" and not st.writer.pending or st.writer.closed:
                self.streams.pop(sid, None)
            self._flush()
            if self.h2.state_machine.state == h2.connection.ConnectionState.CLOSED and not self.streams:
                self.transport.close()
