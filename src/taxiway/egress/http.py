"""The HTTP/1.1 a forward proxy needs, sans-I/O: heads, targets, body framing.

Bytes in, values out. The server feeds these functions what it read and acts
on what they return; nothing here touches a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taxiway.egress.hosts import Host, HostError, parse_host, parse_port, shown, split_authority

MAX_HEADERS = 100

# Headers that describe one hop and are never forwarded as they came.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate",
    b"proxy-connection", b"te", b"trailer", b"upgrade",
})

REASONS = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    407: "Proxy Authentication Required", 408: "Request Timeout", 413: "Content Too Large",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}

_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


_CONTROL = re.compile(rb"[\x00-\x20\x7f]")
# h11's chunk header: 1-20 hex digits, an extension, optional whitespace (the CRLF is checked apart).
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")


def _is_token(b: bytes) -> bool:
    """RFC 9110 token: non-empty, only tchars (checked in C by bytes.translate)."""
    return bool(b) and not b.translate(None, _TOKEN_CHARS)


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; answer ``status`` and close."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


Headers = list[tuple[bytes, bytes]]


@dataclass
class RequestHead:
    method: str
    target: str
    version: bytes
    headers: Headers

    def get(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


@dataclass
class ResponseHead:
    version: bytes
    status: int
    reason: bytes
    headers: Headers

    def get(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


def get_header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def connection_tokens(headers: Headers) -> set[bytes]:
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() in (b"connection", b"proxy-connection"):
            out.update(t.strip().lower() for t in v.split(b","))
    return out


def keeps_alive(head: RequestHead) -> bool:
    """Whether the client wants the connection kept after this request (HTTP/1.1 unless ``close``)."""
    tokens = connection_tokens(head.headers)
    if head.version == b"HTTP/1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens and b"close" not in tokens


def _parse_headers(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header fields", 431)
    headers: Headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _is_token(name):
            raise ProtocolError(f"malformed header line {line[:40]!r}")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise ProtocolError("control character in header value")
        headers.append((name, value.strip(b" \t")))
    return headers


def parse_request_head(data: bytes) -> RequestHead:
    """Parse ``data`` (up to and including the blank line) into a RequestHead."""
    lines = data.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if not _is_token(method):
        raise ProtocolError("malformed method")
    if not target or _CONTROL.search(target):
        raise ProtocolError("malformed request target")
    try:
        target_s = target.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request target is not UTF-8") from None
    return RequestHead(method.decode("ascii"), target_s, version, _parse_headers(lines[1:]))


def parse_response_head(data: bytes) -> ResponseHead:
    lines = data.rstrip(b"\r\n").split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"malformed status line {lines[0][:80]!r}", 502)
    return ResponseHead(version, int(code), reason, _parse_headers(lines[1:]))


@dataclass(frozen=True)
class Target:
    """Where a proxied request goes: a normalized host, a port, and the origin-form path."""

    host: Host
    port: int
    path: str = "/"
    default_port: int = 80

    @property
    def _host_text(self) -> str:
        return f"[{self.host.name}]" if self.host.ip is not None and self.host.ip.version == 6 else self.host.name

    @property
    def authority(self) -> str:
        """``host[:port]`` as the upstream's Host header should say it."""
        return self._host_text if self.port == self.default_port else f"{self._host_text}:{self.port}"

    def __str__(self) -> str:
        return f"{self._host_text}:{self.port}"


def parse_connect_target(target: str) -> Target:
    """CONNECT's authority-form ``host:port``; the port is required."""
    try:
        raw_host, port = split_authority(target)
        return Target(parse_host(raw_host), port, "", 443)
    except HostError as e:
        raise ProtocolError(str(e)) from None


def parse_absolute_target(target: str, schemes: dict[str, int] | None = None) -> Target:
    """An absolute-form ``http://host[:port]/path`` request target.

    Userinfo before ``@`` is dropped (the host after it is the destination, as
    every URL parser agrees); backslashes and other ambiguities are refused.
    """
    schemes = schemes or {"http": 80}
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise ProtocolError(f"only http:// URLs can be proxied without CONNECT, got {shown(target, 60)}")
    default_port = schemes[scheme.lower()]
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if "\\" in authority:
        raise ProtocolError("backslash in URL authority")
    authority = authority.rpartition("@")[2]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    try:
        if authority.startswith("["):
            close = authority.find("]")
            if close < 0:
                raise HostError(f"unterminated IPv6 literal in {shown(authority)}")
            raw_host, port_s = authority[: close + 1], authority[close + 1 :]
            if port_s and not port_s.startswith(":"):
                raise HostError(f"junk after IPv6 literal in {shown(authority)}")
            port_s = port_s[1:]
        else:
            raw_host, _, port_s = authority.partition(":")
        port = parse_port(port_s) if port_s else default_port
        return Target(parse_host(raw_host), port, path, default_port)
    except HostError as e:
        raise ProtocolError(str(e)) from None


def request_framing(head: RequestHead) -> tuple[str, int]:
    """How a request body ends: ("length", n), ("chunked", 0) or ("none", 0)."""
    te = [v for k, v in head.headers if k.lower() == b"transfer-encoding"]
    cl = [v for k, v in head.headers if k.lower() == b"content-length"]
    if te:
        if cl:
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        # As h11: one Transfer-Encoding header, and it says exactly "chunked". A second
        # one (chunked + identity) is read differently by different servers: smuggling.
        if len(te) > 1:
            raise ProtocolError("multiple Transfer-Encoding headers", 501)
        if te[0].strip().lower() != b"chunked":
            raise ProtocolError("unsupported Transfer-Encoding (only chunked is)", 501)
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise ProtocolError("invalid Content-Length")
        return "length", int(cl[0])
    return "none", 0


def response_framing(head: ResponseHead, method: str) -> tuple[str, int]:
    """How a response body ends: adds ("close", 0) for bodies read until EOF."""
    if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return "none", 0
    te = head.get(b"transfer-encoding")
    if te is not None:
        if te.strip().lower().endswith(b"chunked"):
            return "chunked", 0
        return "close", 0
    cl = head.get(b"content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise ProtocolError("invalid Content-Length from upstream", 502)
        return "length", int(cl)
    return "close", 0


# Never forwarded in a trailer: framing, routing, authentication and hop-by-hop fields
# (RFC 9110 6.5.1); a "Transfer-Encoding: chunked" there means nothing good.
TRAILER_DROP = HOP_BY_HOP | {
    b"transfer-encoding", b"content-length", b"host", b"authorization", b"content-encoding",
    b"content-type", b"content-range", b"expect", b"max-forwards", b"cache-control",
}


class ChunkedScanner:
    """Reads a chunked body as h11 does and writes it out again in canonical form.

    ``feed(data)`` returns the number of bytes of ``data`` that belong to the
    body; when that is less than ``len(data)`` or ``done`` is set, the body
    (including trailers) ended there. ``take()`` returns the re-framed bytes
    so far: sizes as plain ``%x``, no chunk extensions or whitespace, trailers
    without framing and hop-by-hop fields. Nothing the client wrote is passed on
    as it came, so no byte of its framing can be read differently upstream. As
    strict as h11: chunk sizes are 1-20 hex digits, and every line ends in CRLF
    (a bare LF is one that different servers split differently, so it is refused).
    """

    MAX_LINE = 4096

    def __init__(self) -> None:
        self.done = False
        self._state = "size"  # size, data, data-crlf, trailer
        self._line = bytearray()
        self._remaining = 0
        self._out = bytearray()

    def take(self) -> bytes:
        """The canonical bytes produced since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> int:
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._state == "data":
                take = min(self._remaining, n - i)
                self._out += data[i:i + take]
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > self.MAX_LINE:
                    raise ProtocolError("chunk line too long")
                return n
            self._line += data[i:j]
            i = j + 1
            if len(self._line) > self.MAX_LINE:
                raise ProtocolError("chunk line too long")
            if not self._line.endswith(b"\r"):
                raise ProtocolError("bare LF in chunked body (lines must end in CRLF)")
            line = bytes(self._line[:-1])
            self._line.clear()
            if b"\r" in line:
                raise ProtocolError("bare CR in chunked body")
            if self._state == "size":
                m = _CHUNK_HEADER.fullmatch(line)
                if m is None:
                    raise ProtocolError(f"bad chunk size line {line[:20]!r}")
                size = int(m[1], 16)
                self._out += b"%x\r\n" % size
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining, self._state = size, "data"
            elif self._state == "data-crlf":
                if line:
                    raise ProtocolError("missing CRLF after chunk data")
                self._out += b"\r\n"
                self._state = "size"
            elif self._state == "trailer":
                if not line:
                    self._out += b"\r\n"
                    self.done = True
                else:
                    name, sep, value = line.partition(b":")
                    if not sep or not _is_token(name) or b"\x00" in value:
                        raise ProtocolError(f"malformed trailer line {line[:40]!r}")
                    if name.lower() not in TRAILER_DROP:
                        self._out += name + b": " + value.strip(b" \t") + b"\r\n"
        return i


def serialize_request(head: RequestHead, target: Target, keep_alive: bool) -> bytes:
    """The request head sent upstream: origin-form target, Host rewritten, hop headers dropped."""
    drop = HOP_BY_HOP | connection_tokens(head.headers) | {b"host"}
    upgrade = head.get(b"upgrade")
    wants_upgrade = upgrade is not None and b"upgrade" in connection_tokens(head.headers)
    out = [f"{head.method} {target.path} ".encode() + head.version, b"Host: " + target.authority.encode()]
    out += [k + b": " + v for k, v in head.headers if k.lower() not in drop]
    if wants_upgrade:
        out += [b"Connection: Upgrade", b"Upgrade: " + (upgrade or b"")]
    elif not keep_alive:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def serialize_response_head(head: ResponseHead, keep_alive: bool) -> bytes:
    if head.status == 101:
        drop = {b"proxy-authenticate", b"keep-alive", b"proxy-connection"}
    else:
        drop = HOP_BY_HOP | connection_tokens(head.headers)
    out = [head.version + b" " + str(head.status).encode() + b" " + head.reason]
    out += [k + b": " + v for k, v in head.headers if k.lower() not in drop]
    if head.status != 101 and not keep_alive:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def header_safe(text: str) -> str:
    """One printable ASCII line, safe to put in a header."""
    text = text[:2000].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


def simple_response(status: int, body: str = "", headers: list[tuple[str, str]] | None = None,
                    close: bool = True, content_type: str = "text/plain; charset=utf-8") -> bytes:
    """A complete response the proxy itself answers with."""
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {header_safe(v)}" for k, v in headers or []]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
