"""Zero-copy blob bodies: the ASGI ``http.response.pathsend`` extension, served with sendfile(2).

uvicorn offers no zero-copy extension, so every FileResponse chunk would be read
into Python (in a thread) and copied into the socket. :class:`PathSend` wraps the
app and, when the request runs on uvicorn's httptools protocol over plain TCP,
advertises ``http.response.pathsend`` in ``scope["extensions"]``; Starlette's
FileResponse then sends ``{"type": "http.response.pathsend", "path": ...}``
instead of the body (full-body GETs only: HEAD and Range responses take
Starlette's ordinary path). The wrapper answers that message by waiting for the
headers to leave the transport's buffer and calling ``os.sendfile`` on a
duplicate of the connection's socket, non-blocking, on the event loop; then it
completes the response through uvicorn as an empty final body.

Anywhere else (TLS, h11, another server, an in-process test client) nothing is
advertised and responses are streamed as before. The check looks at uvicorn's
internals (the bound ``send`` of its RequestResponseCycle), so it is strict:
the module, the class and every attribute used must be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

PATHSEND = "http.response.pathsend"
_CYCLE_MODULES = ("uvicorn.protocols.http.httptools_impl",)
_CYCLE_ATTRS = ("transport", "scope", "expected_content_length", "disconnected", "response_complete")
_WAIT = 1.0  # seconds between checks that the connection is still wanted while the socket is full


def _connection(send):
    """uvicorn's request cycle and its plain-TCP socket fd, or None when zero-copy isn't possible."""
    cycle = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__module__ not in _CYCLE_MODULES or type(cycle).__name__ != "RequestResponseCycle":
        return None
    if not all(hasattr(cycle, a) for a in _CYCLE_ATTRS):
        return None
    transport = cycle.transport
    try:
        if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
            return None
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
    except Exception:  # noqa: BLE001 - an unknown transport: stream as usual
        return None
    if fd < 0:
        return None
    return cycle, fd


class PathSend:
    """ASGI middleware: serve ``http.response.pathsend`` with sendfile(2) under uvicorn/httptools."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or PATHSEND in (scope.get("extensions") or {}):
            return await self.app(scope, receive, send)
        conn = _connection(send)
        if conn is None:
            return await self.app(scope, receive, send)
        cycle, fd = conn
        scope["extensions"] = {**(scope.get("extensions") or {}), PATHSEND: {}}

        async def send_pathsend(message):
            if message["type"] != PATHSEND:
                return await send(message)
            if getattr(cycle, "chunked_encoding", None) is not False:  # no Content-Length: stream it
                return await _stream(send, message["path"])
            if await sendfile(cycle, fd, message["path"]):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        return await self.app(scope, receive, send_pathsend)


async def _stream(send, path: str, chunk: int = 1 << 20) -> None:
    """The ordinary way, for a response without a Content-Length (pathsend's fallback)."""
    from anyio import open_file

    async with await open_file(path, "rb") as f:
        while True:
            data = await f.read(chunk)
            await send({"type": "http.response.body", "body": data, "more_body": len(data) == chunk})
            if len(data) < chunk:
                return


async def _writable(loop, fd: int) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    timer = loop.call_later(_WAIT, ready)  # wake now and then to notice a connection closed under us
    try:
        await fut
    finally:
        timer.cancel()
        loop.remove_writer(fd)


def _gone(cycle) -> bool:
    return cycle.disconnected or cycle.transport.is_closing()


async def sendfile(cycle, sock_fd: int, path: str) -> bool:
    """Send the file's ``Content-Length`` bytes after the headers; False if the connection was dropped."""
    loop = asyncio.get_running_loop()
    transport = cycle.transport
    count = cycle.expected_content_length
    # uvloop queues writes until the end of the loop iteration: wait until the headers are out,
    # so the body can't overtake them.
    spins = 0
    while transport.get_write_buffer_size():
        if _gone(cycle):
            return False
        await asyncio.sleep(0 if spins < 8 else 0.002)
        spins += 1
    out = os.dup(sock_fd)
    try:
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while offset < count:
                if _gone(cycle):
                    return False
                try:
                    n = os.sendfile(out, f.fileno(), offset, count - offset)
                except BlockingIOError:
                    await _writable(loop, out)
                    continue
                if n == 0:
                    raise OSError(f"{path} ended at {offset} of {count} bytes")
                offset += n
    except OSError:
        # A client that went away (EPIPE, ECONNRESET) or a short file: the response can't be
        # completed, so the connection goes, as uvicorn does when a streamed response fails.
        with contextlib.suppress(Exception):
            transport.close()
        cycle.disconnected = True
        return False
    finally:
        os.close(out)
    cycle.expected_content_length = 0
    return True
