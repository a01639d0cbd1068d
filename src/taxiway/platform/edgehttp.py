"""The edge's HTTP/1.1 beyond egress.http, sans-I/O: what a request head means for routing
and the head a machine gets, and the fast path's parsing of heads.

Bytes in, values out, as :mod:`taxiway.egress.http` (whose rules these keep: smuggling
defences for requests with a body stay there alone). llhttp (httptools, a dependency
through uvicorn[standard]) does the parsing where it is much quicker, and egress.http
judges whatever llhttp refuses, so both paths of the edge answer a bad head alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taxiway.egress import http

try:
    import httptools
except ImportError:  # a dependency (uvicorn[standard]); without it, egress.http's pure parser
    httptools = None

# Methods a proxy may send twice (RFC 9110 9.2.2): only these are retried once a
# request reached a backend that then died without answering.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
REQUEST_ID = b"taxiway-request-id"
# Replay (Fly's fly-replay): a machine's response header asking the edge to send the same
# request elsewhere, never passed to the client; the replayed request says where it came from.
REPLAY = b"taxiway-replay"
REPLAY_SRC = b"taxiway-replay-src"
# Set by the edge alone: whatever a client sent under these names is dropped.
OWN_HEADERS = frozenset({b"x-forwarded-proto", b"x-forwarded-host", REQUEST_ID, REPLAY_SRC})

_CONTROL_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Request fields plan_request looks at (everything else goes on as it came).
_PLAN_FIELDS = http.HOP_BY_HOP | OWN_HEADERS | {b"host", b"content-length", b"transfer-encoding",
                                                b"x-forwarded-for"}


@dataclass(slots=True)
class Plan:
    """What the edge makes of one request head (see plan_request); ``app`` is the edge's to fill."""

    app: str | None
    host: str
    keep: bool       # the client keeps its connection after this request
    body: bool       # a body follows (Content-Length other than 0, or Transfer-Encoding)
    upgrade: bool    # an Upgrade header (WebSocket...)
    out: bytes       # the head to send the machine
    request_id: str
    replayed: bool = False  # sent again on a machine's taxiway-replay (once at most)


def plan_request(head: http.RequestHead, client_ip: str, request_id: str, proto: bytes = b"http") -> Plan:
    """Everything one pass over a request's headers tells: its host, whether the client keeps
    the connection, whether a body or an upgrade follows, and the head to send the machine.

    The head sent on drops hop-by-hop fields and those the Connection header names
    (never Host or the body's framing), sets X-Forwarded-Proto (``proto``)/-Host and the request
    id (whatever the client sent under those names is dropped), appends the client's
    address to X-Forwarded-For, and puts an absolute-form target in origin form.
    """
    hosts: list[bytes] = []
    tokens: set[bytes] = set()
    forwarded_for: list[bytes] = []
    lines: list[bytes] = []
    named: list[int] = []  # indexes of lines a Connection token may name
    body = seen_length = False
    upgrade: bytes | None = None
    for k, v in head.headers:
        lk = k.lower()
        if lk not in _PLAN_FIELDS:
            named.append(len(lines))
            lines.append(k + b": " + v)
        elif lk == b"host":
            hosts.append(v)
        elif lk == b"content-length":
            if not seen_length:  # a repeat (the same value, or the framing refused it already) goes once
                lines.append(b"Content-Length: " + v.strip())
                seen_length = True
            body = body or v.strip() != b"0"
        elif lk == b"transfer-encoding":
            # Sent on in one canonical spelling: the body is re-framed as chunked, and a value a
            # machine might read otherwise ("\x0bchunked") is how requests get smuggled.
            if head.version != b"HTTP/1.1":  # RFC 9112 6.1: faulty framing in HTTP/1.0
                raise http.ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
            if v.strip(b" \t").lower() == b"chunked":
                lines.append(b"Transfer-Encoding: chunked")
            elif _CONTROL_IN_VALUE.search(v):
                raise http.ProtocolError("malformed Transfer-Encoding")
            else:
                lines.append(k + b": " + v)  # another coding: egress.http's framing answers 501
            body = True
        elif lk == b"connection" or lk == b"proxy-connection":
            tokens.update(t.strip().lower() for t in v.split(b","))
        elif lk == b"upgrade":
            upgrade = v
        elif lk == b"x-forwarded-for":
            forwarded_for.append(v)
        # else: hop-by-hop, or set by the edge alone: dropped
    if len(hosts) > 1:
        raise http.ProtocolError("more than one Host header")
    target = head.target
    if target.startswith(("http://", "https://")):  # absolute-form: its authority wins (RFC 9112 3.2.2)
        rest = target.partition("://")[2]
        host = rest.split("/", 1)[0].rpartition("@")[2].encode()
        target = "/" + rest.partition("/")[2]
    elif hosts:
        host = hosts[0]
    elif head.version == b"HTTP/1.1":
        raise http.ProtocolError("missing Host header")
    else:
        host = b""
    if tokens - {b"close", b"keep-alive", b"upgrade"}:  # rare: fields named as hop-by-hop
        drop = {i for i in named if lines[i].split(b":", 1)[0].lower() in tokens}
        lines = [line for i, line in enumerate(lines) if i not in drop]
    if head.version == b"HTTP/1.1":
        keep = b"close" not in tokens
    else:
        keep = b"keep-alive" in tokens and b"close" not in tokens
    out = [f"{head.method} {target} ".encode() + head.version, b"Host: " + host, *lines,
           b"X-Forwarded-For: " + b", ".join([*forwarded_for, client_ip.encode()]),
           b"X-Forwarded-Proto: " + proto, b"X-Forwarded-Host: " + host,
           REQUEST_ID + b": " + request_id.encode()]
    if upgrade is not None and b"upgrade" in tokens:
        out += [b"Connection: Upgrade", b"Upgrade: " + upgrade]
    return Plan(None, host.decode("latin-1"), keep, body, upgrade is not None,
                b"\r\n".join(out) + b"\r\n\r\n", request_id)


class _Head:
    """httptools callbacks collecting a response head."""

    __slots__ = ("headers", "reason")

    def __init__(self) -> None:
        self.headers: http.Headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def parse_response_head(raw: bytes) -> http.ResponseHead:
    """A machine's response head (the stream path's); llhttp (C) when installed: a quarter of
    the pure parser's time (measured)."""
    if httptools is None:
        return http.parse_response_head(raw)
    head = _Head()
    parser = httptools.HttpResponseParser(head)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # a 101: the head is complete; what follows is the upgraded protocol
    except httptools.HttpParserError as e:
        raise http.ProtocolError(f"malformed response head from the machine: {e}", 502) from None
    if len(head.headers) > http.MAX_HEADERS:
        raise http.ProtocolError(f"more than {http.MAX_HEADERS} header fields from the machine", 502)
    version = b"HTTP/" + parser.get_http_version().encode()
    return http.ResponseHead(version, parser.get_status_code(), head.reason, head.headers)


# The response fields the fast path acts on, and the hop-by-hop lines it drops, found by
# regular expressions over the raw head (C speed) once llhttp has validated it: per-header
# Python callbacks cost more than the rest of a small response (measured).
_RESPONSE_FIELDS = re.compile(rb"\r\n(content-length|transfer-encoding|connection|proxy-connection|taxiway-replay)"
                              rb":[ \t]*([^\r\n]*)", re.IGNORECASE)
_HOP_LINES = re.compile(rb"\r\n(?:" + b"|".join(sorted(http.HOP_BY_HOP | {REPLAY})) + rb"):[^\r\n]*",
                        re.IGNORECASE)


def forward_response_head(raw: bytes, method: str, keep: bool, request_id: str
                          ) -> tuple[int, bytes, tuple[str, int], bool, bool, bytes | None]:
    """A machine's response head, and what the fast path needs of it in one pass:
    (status, the head for the client, body framing, keep the machine's connection,
    keep the client's, the taxiway-replay value or None). The same rules as egress.http's
    response_framing and serialize_response_head, plus the request id; the replay header
    never reaches the client; 101 is the stream path's."""
    if httptools is None:
        rhead = http.parse_response_head(raw)
        status, version = rhead.status, rhead.version
    else:
        parser = httptools.HttpResponseParser(_NO_CALLBACKS)  # validates (in C)
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            raise http.ProtocolError(f"malformed response head from the machine: {e}", 502) from None
        status, version = parser.get_status_code(), b"HTTP/" + parser.get_http_version().encode()
    if raw.count(b"\r\n") > http.MAX_HEADERS + 2:
        raise http.ProtocolError(f"more than {http.MAX_HEADERS} header fields from the machine", 502)
    length = te = replay = None
    tokens: set[bytes] = set()
    for m in _RESPONSE_FIELDS.finditer(raw):
        name, value = m[1].lower(), m[2].strip()
        if name == REPLAY:
            replay = value
        elif name == b"content-length":
            if length is not None and value != length:
                raise http.ProtocolError("conflicting Content-Length from the machine", 502)
            length = value
        elif name == b"transfer-encoding":
            te = value if te is None else te + b"," + value
        else:
            tokens.update(t.strip().lower() for t in value.split(b","))
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        framing: tuple[str, int] = ("none", 0)
    elif te is not None:
        framing = ("chunked", 0) if te.strip().lower().endswith(b"chunked") else ("close", 0)
    elif length is not None:
        if not length.isdigit():
            raise http.ProtocolError("invalid Content-Length from the machine", 502)
        framing = ("length", int(length))
    else:
        framing = ("close", 0)
    keep_conn = framing[0] != "close" and b"close" not in tokens and version == b"HTTP/1.1"
    keep_client = keep and framing[0] != "close"
    head = _HOP_LINES.sub(b"", raw[:-4])
    named = tokens - http.HOP_BY_HOP - {b"close", b"keep-alive"}
    if named:  # rare: fields the Connection header names as hop-by-hop
        lines = head.split(b"\r\n")
        head = b"\r\n".join([lines[0]] + [x for x in lines[1:] if x.split(b":", 1)[0].strip().lower() not in named])
    tail = b"\r\n" + REQUEST_ID + b": " + request_id.encode()
    if not keep_client:
        tail += b"\r\nConnection: close"
    return status, head + tail + b"\r\n\r\n", framing, keep_conn, keep_client, replay


_NO_CALLBACKS = object()


class _RequestHeadCallbacks:
    """httptools callbacks collecting a request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.headers: http.Headers = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.strip(b" \t")))  # llhttp keeps trailing blanks


_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")  # never in a request target (as egress.http)


def parse_request_head(raw: bytes) -> http.RequestHead:
    """A client's request head on the fast path: llhttp (C) when it accepts it, with the
    rules egress.http adds (HTTP/1.0 or 1.1, a UTF-8 target without control characters,
    at most MAX_HEADERS fields); anything llhttp refuses is judged by egress.http, so the
    answer to a bad head is the stream path's. Heads of requests with a body go to the
    stream path, which parses them again with egress.http alone (smuggling defences)."""
    if httptools is None:
        return http.parse_request_head(raw)
    cb = _RequestHeadCallbacks()
    parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return http.parse_request_head(raw)  # raises the same error the stream path would
    version = _VERSIONS.get(parser.get_http_version())
    if version is None or len(cb.headers) > http.MAX_HEADERS or _CONTROL.search(cb.url):
        return http.parse_request_head(raw)
    try:
        target = cb.url.decode("utf-8")
    except UnicodeDecodeError:
        return http.parse_request_head(raw)
    return http.RequestHead(parser.get_method().decode("ascii"), target, version, cb.headers)


# -- replay (Fly's fly-replay) ------------------------------------------------------------------------

def parse_replay(value: bytes) -> dict[str, str]:
    """``instance=ID``, ``region=R``, ``elsewhere=true``, ``state=S`` (``;``-separated) -> a dict;
    ProtocolError (502: the machine's mistake) when it names no target."""
    out: dict[str, str] = {}
    for part in value.decode("latin-1").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k.strip().lower() in ("instance", "region", "elsewhere", "state"):
            out[k.strip().lower()] = v.strip()
    if not (out.get("instance") or out.get("region") or out.get("elsewhere") == "true"):
        raise http.ProtocolError(f"taxiway-replay names no instance, region or elsewhere=true: "
                                 f"{http.header_safe(value.decode('latin-1'))}", 502)
    return out


def replay_head(out: bytes, machine: str, region: str, state: str | None) -> bytes:
    """The head of a replayed request: the original one plus taxiway-replay-src (where it came from)."""
    src = f"instance={machine};region={region}" + (f";state={state}" if state else "")
    return out[:-2] + REPLAY_SRC + b": " + http.header_safe(src).encode("latin-1") + b"\r\n\r\n"


# -- WebSocket frames (for closing a drained one cleanly) ----------------------------------------------

WS_CLOSE = 0x8
WS_GOING_AWAY = 1001


class WsFrames:
    """Where frames start and end in one direction of a WebSocket (RFC 6455 5.2), sans-I/O:
    so the edge can put its own close frame between two of the machine's, never inside one."""

    __slots__ = ("head", "left")

    def __init__(self) -> None:
        self.head = bytearray()  # a frame header being collected
        self.left = 0            # payload bytes of the current frame still to come

    @property
    def at_boundary(self) -> bool:
        return self.left == 0 and not self.head

    def _need(self) -> int:
        if len(self.head) < 2:
            return 2
        b1 = self.head[1]
        n = b1 & 0x7F
        return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b1 & 0x80 else 0)

    def feed(self, data: bytes) -> list[int]:
        """Account for ``data``; returns the opcodes of the frames whose header completed in it."""
        ops: list[int] = []
        i, n, left = 0, len(data), self.left
        if not self.head:
            # The usual case, whole headers in one read: a few integer operations per frame
            # (this runs for every message through the edge).
            while i < n:
                if left:
                    k = left if left < n - i else n - i
                    left -= k
                    i += k
                    continue
                if n - i < 2:
                    break
                b1 = data[i + 1]
                n7 = b1 & 0x7F
                ext = 2 if n7 == 126 else 8 if n7 == 127 else 0
                end = i + 2 + ext
                if end + (4 if b1 & 0x80 else 0) > n:
                    break
                ops.append(data[i] & 0x0F)
                left = n7 if not ext else int.from_bytes(data[i + 2:end], "big")
                i = end + (4 if b1 & 0x80 else 0)
            self.left = left
            if i >= n:
                return ops
        while i < n:
            if self.left:
                k = min(self.left, n - i)
                self.left -= k
                i += k
                continue
            while len(self.head) < self._need() and i < n:
                k = min(self._need() - len(self.head), n - i)
                self.head += data[i:i + k]
                i += k
            if len(self.head) < self._need():
                break
            n7 = self.head[1] & 0x7F
            ops.append(self.head[0] & 0x0F)
            self.left = n7 if n7 < 126 else int.from_bytes(self.head[2:4 if n7 == 126 else 10], "big")
            self.head.clear()
        return ops

    def boundary_in(self, data: bytes) -> int | None:
        """How many bytes of ``data`` end the current frame (0 at a boundary), or None if it goes on past them."""
        if self.at_boundary:
            return 0
        probe = WsFrames()
        probe.head, probe.left = bytearray(self.head), self.left
        i = 0
        while probe.head and i < len(data):  # finish the header a byte at a time (at most 14)
            probe.feed(data[i:i + 1])
            i += 1
        if probe.head or probe.left > len(data) - i:
            return None
        return i + probe.left


def ws_close_frame(code: int = WS_GOING_AWAY, reason: str = "the machine is going away") -> bytes:
    """A server's close frame (unmasked, RFC 6455 5.5.1)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    return bytes([0x80 | WS_CLOSE, len(payload)]) + payload


# -- PROXY protocol v2 (for TCP services with the proxy_proto handler) --------------------------------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The PROXY protocol v2 header (haproxy's spec, 2.2) a machine gets before the client's bytes:
    PROXY command over TCP, the client's address and port and the one it connected to."""
    import ipaddress

    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:  # an IPv4 client on an IPv6 listener: both as IPv6
        s, d = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (s, d))
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    return PROXY_V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
