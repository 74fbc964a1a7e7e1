"""A small HTTP/1.1 server for JSON APIs, on ``asyncio.Protocol`` (the broker's).

Why not aiohttp's server, which the local director and Consul use: under bursts of small
JSON requests, aiohttp's web server spent ~0.19 ms of CPU a request (its request, response,
router and writer objects) where this one spends ~0.11 ms (a bare Protocol: ~0.06 ms), and
the broker's p99 follows its CPU per request (``benchmarks/broker``). What a JSON API
needs of HTTP/1.1 (RFC 9112) is here, and what it does not need is refused plainly:

- requests in origin-form (or absolute-form), HTTP/1.0 and 1.1, keep-alive, pipelining
  (answered in order, one at a time), bodies by Content-Length or chunked,
  ``Expect: 100-continue``, HEAD on GET routes;
- what a proxy and this server could read differently is refused with 400 and the
  connection closed: both Content-Length and Transfer-Encoding, differing Content-Lengths,
  folded or malformed header lines, bare CR or LF, no or several Host headers in 1.1;
- limits, each answered with its own status and the connection closed: a request line over
  8 KiB (414), a head over 64 KiB or 100 fields (431), a body over 1 MiB (413), a transfer
  coding other than chunked (501), another HTTP version (505);
- a connection idle ``keepalive_timeout`` seconds is closed; a request whose head and body
  have not arrived ``request_timeout`` seconds after its first byte gets 408.

A server can hand connections over: ``hand_over(request)`` sees each request once its head
is read, and may return another protocol (an aiohttp ``web.Server()``'s, say) that then owns
the connection from that request on, fed every byte this one has not answered.

A handler is not cancelled when its client goes away: what it changes, it finishes (the
answer is dropped). ``stop()`` stops accepting, closes idle connections and lets running
handlers finish (up to ``shutdown_timeout``).
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from controller import jsonbytes

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 64 * 1024
MAX_FIELDS = 100
MAX_BODY = 1024 * 1024
# aiohttp's defaults, which clients of the broker met before.
KEEPALIVE_TIMEOUT = 75.0
REQUEST_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0
# How often deadlines are checked (one sweep for all connections, no timer per request).
SWEEP_INTERVAL = 1.0
# After refusing a request whose body may still be coming, how long what the client sends
# is read and dropped before closing: closing with unread bytes resets the connection,
# and a reset can destroy the answer before the client reads it.
LINGER = 2.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class HttpError(Exception):
    """A request refused by the HTTP layer (or a router): status, a sentence for the client,
    headers to add, and whether the connection must close after the answer."""

    def __init__(self, status: int, description: str, *, headers: list[tuple[str, str]] | None = None,
                 close: bool = False) -> None:  # fmt: skip
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = headers or []
        self.close = close

    @property
    def reason(self) -> str:
        return _REASONS.get(self.status, "Error")


class Request:
    """One parsed request: method, decoded path, query, headers (lower-case names; repeated
    fields joined with ", "), body, and the route's variables once routed."""

    __slots__ = ("_query", "body", "headers", "match_info", "method", "query_string", "raw_path", "version")

    def __init__(
        self, method: str, raw_path: str, query_string: str, version: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.query_string = query_string
        self.version = version
        self.headers = headers
        self.body = body
        self.match_info: dict[str, str] = {}
        self._query: dict[str, str] | None = None

    @property
    def path(self) -> str:
        return unquote(self.raw_path)

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, the first value of each name."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in parse_qsl(self.query_string, keep_blank_values=True):
                query.setdefault(name, value)
            self._query = query
        return self._query


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        headers: list[tuple[str, str]] | None = None,
        content_type: str | None = JSON_CONTENT_TYPE,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        self.content_type = content_type

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Response:
        return cls(status, jsonbytes.dumps(document))


Handler = Callable[[Request], Awaitable[Response]]
# Given a request whose head is read: None to answer it here, or the protocol to take the connection.
HandOver = Callable[[Request], asyncio.BaseProtocol | None]


class Router:
    """Routes by method and path pattern (``/v2/things/{id}``: a variable is one non-empty
    path segment, percent-decoded). GET routes answer HEAD too."""

    def __init__(self) -> None:
        # Per segment count: (segments, method -> handler); a segment is a literal or None.
        self._routes: dict[int, list[tuple[tuple[str | None, ...], tuple[str, ...], dict[str, Handler]]]] = {}

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        if not pattern.startswith("/"):
            raise ValueError(f"route {pattern!r} must start with /")
        parts = pattern.split("/")[1:]
        segments = tuple(None if part.startswith("{") and part.endswith("}") else part for part in parts)
        names = tuple(part[1:-1] for part in parts if part.startswith("{") and part.endswith("}"))
        routes = self._routes.setdefault(len(segments), [])
        for existing, _, handlers in routes:
            if existing == segments:
                handlers[method] = handler
                break
        else:
            routes.append((segments, names, {method: handler}))

    def resolve(self, request: Request) -> Handler:
        """The handler for the request (its variables set in ``match_info``); HttpError 404 or 405."""
        parts = request.raw_path.split("/")[1:]
        for segments, names, handlers in self._routes.get(len(parts), ()):
            values = []
            for segment, part in zip(segments, parts, strict=True):
                decoded = unquote(part) if "%" in part else part
                if segment is None:
                    if not decoded:
                        break
                    values.append(decoded)
                elif segment != decoded:
                    break
            else:
                method = "GET" if request.method == "HEAD" else request.method
                handler = handlers.get(method)
                if handler is None:
                    allowed = sorted(set(handlers) | ({"HEAD"} if "GET" in handlers else set()))
                    raise HttpError(405, f"{request.method} is not allowed here",
                                    headers=[("Allow", ", ".join(allowed))])  # fmt: skip
                request.match_info = dict(zip(names, values, strict=True))
                return handler
        raise HttpError(404, f"no such resource: {request.path}")


_date_second = 0
_date_value = b""


def _date() -> bytes:
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_value = now, formatdate(now, usegmt=True).encode()
    return _date_value


def error_response(exc: HttpError) -> Response:
    response = Response.json({"error": exc.reason, "description": exc.description}, exc.status)
    response.headers.extend(exc.headers)
    return response


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # a request is being answered; the next one waits in the buffer
        self._closing = False
        self._lingering = False
        self._eof = False
        self._paused_reading = False
        self._paused_writing = False
        self._continued = False  # "100 Continue" sent for the request being read
        self._scanned = 0  # bytes of the buffer searched for the end of a head
        self._chunks: _ChunkedBody | None = None
        self._head: tuple[Request, int, int | None, bool] | None = None
        self._successor: asyncio.BaseProtocol | None = None  # who took the connection over
        # When the connection is given up: idle too long, or a request too slow to arrive.
        self.deadline: float | None = None
        self.idle = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's are not asyncio.Transport subclasses, but have its methods).
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)
        self.deadline = self._loop.time() + self._server.keepalive_timeout

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._closing:
            return
        self._buffer += data
        if self._busy or self._paused_writing:
            if len(self._buffer) > MAX_HEAD + self._server.max_body and not self._paused_reading:
                self._paused_reading = True
                assert self._transport is not None
                self._transport.pause_reading()
            return
        self._advance()

    def eof_received(self) -> bool:
        self._eof = True
        if self._lingering:
            return False
        # Keep the write side open while a request is answered (a client that half-closed).
        if self._busy:
            return True
        self._advance()
        # Handed over: the successor was told of the end, and closed if it would.
        return self._successor is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server._connections.discard(self)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if not self._busy and not self._closing:
            self._advance()

    # reading requests

    def _advance(self) -> None:
        """Start answering the next complete request in the buffer, if any."""
        if self._closing:
            return
        try:
            request = self._next_request()
        except HttpError as exc:
            self._busy = True
            self._send(error_response(exc), close=True, head_only=False, linger=True)
            return
        if request is None:
            if self._eof and not self._closing:
                self.close()
            return
        self._busy = True
        # The next request has not begun; its clock starts with its first byte.
        self.idle = True
        self.deadline = None
        self._server._tasks.add(task := self._loop.create_task(self._answer(request)))
        task.add_done_callback(self._server._tasks.discard)

    def _next_request(self) -> Request | None:
        buffer = self._buffer
        if self._head is None:
            # RFC 9112 2.2: empty lines before a request line are ignored.
            while buffer[:2] == b"\r\n":
                del buffer[:2]
                self._scanned = 0
            if not buffer:
                self.idle = True
                self.deadline = self._loop.time() + self._server.keepalive_timeout
                return None
            # Searched from where the last search ended: a head sent a byte at a time is
            # scanned once, not once per byte.
            end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3), MAX_HEAD + 4)
            if end < 0:
                if (
                    self._scanned <= MAX_REQUEST_LINE < len(buffer)
                    and buffer.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0
                ):
                    raise HttpError(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes", close=True)
                if len(buffer) > MAX_HEAD:
                    raise HttpError(431, f"the request head is longer than {MAX_HEAD} bytes", close=True)
                self._scanned = len(buffer)
                self._receiving()
                return None
            self._scanned = 0
            self._head = self._parse_head(bytes(buffer[:end]), end + 4)
            if self._server.hand_over is not None:
                try:
                    protocol = self._server.hand_over(self._head[0])
                except Exception:
                    log.exception("internal error handing over %s %s", self._head[0].method, self._head[0].raw_path)
                    raise HttpError(500, "the server failed; see its log", close=True) from None
                if protocol is not None:
                    self._give_to(protocol)
                    return None
        request, start, length, chunked = self._head
        if chunked:
            if self._chunks is None:
                self._chunks = _ChunkedBody(start, self._server.max_body)
            body = self._chunks.feed(buffer)
            if body is None:
                # The chunks' framing (sizes, extensions, trailers) counts too: tiny chunks
                # with long extensions must not hold gigabytes for a body within the limit.
                if len(buffer) - start > 2 * self._server.max_body + MAX_HEAD:
                    raise HttpError(413, f"the chunked body is larger than {self._server.max_body} bytes", close=True)
                self._expect_continue(request)
                return None
            end_of_request = self._chunks.position
            self._chunks = None
        else:
            end_of_request = start + (length or 0)
            if len(buffer) < end_of_request:
                self._expect_continue(request)
                return None
            body = bytes(buffer[start:end_of_request])
        del buffer[:end_of_request]
        self._head = None
        self._continued = False
        request.body = body
        return request

    def _give_to(self, protocol: asyncio.BaseProtocol) -> None:
        """The connection, from the request just read on, belongs to ``protocol``; this one is
        done (nothing is being answered: a request is read only when the last one was)."""
        transport = self._transport
        assert transport is not None
        data, eof = bytes(self._buffer), self._eof
        self._buffer.clear()
        self._head = None
        self._closing = True
        self.deadline = None
        self._server._connections.discard(self)
        self._transport = None
        self._successor = protocol
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if data and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(data)
        if eof and isinstance(protocol, asyncio.Protocol) and not protocol.eof_received():
            transport.close()

    def _receiving(self) -> None:
        if self.idle:
            self.idle = False
            self.deadline = self._loop.time() + self._server.request_timeout

    def _expect_continue(self, request: Request) -> None:
        self._receiving()
        if (
            not self._continued
            and request.version == "HTTP/1.1"
            and request.headers.get("expect")
            and self._transport is not None
        ):
            self._continued = True
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _parse_head(self, head: bytes, start: int) -> tuple[Request, int, int | None, bool]:
        lines = head.split(b"\r\n")
        if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            raise HttpError(400, "a line of the request head ends in a bare CR or LF", close=True)
        request_line = lines[0]
        if len(request_line) > MAX_REQUEST_LINE:
            raise HttpError(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes", close=True)
        if len(lines) - 1 > MAX_FIELDS:
            raise HttpError(431, f"more than {MAX_FIELDS} header fields", close=True)
        parts = request_line.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
            raise HttpError(400, "malformed request line (expected METHOD TARGET HTTP/1.1)", close=True)
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _VERSION.fullmatch(version):
                raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served", close=True)
            raise HttpError(400, "malformed request line (expected METHOD TARGET HTTP/1.1)", close=True)
        headers: dict[str, str] = {}
        host = 0
        lengths: set[bytes] = set()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise HttpError(400, "malformed header line (folded, or no NAME: value)", close=True)
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise HttpError(400, "a header value holds a control character", close=True)
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            if key == "content-length":
                lengths.add(value)
                continue
            if key == "host":
                host += 1
            previous = headers.get(key)
            headers[key] = text if previous is None else f"{previous}, {text}"
        if version == b"HTTP/1.1" and host != 1:
            raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header", close=True)
        length: int | None = None
        chunked = False
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if lengths:
                raise HttpError(400, "both Content-Length and Transfer-Encoding", close=True)
            if version == b"HTTP/1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
            if coding.strip().lower() != "chunked":
                raise HttpError(501, f"transfer coding {coding[:40]!r} is not supported (only chunked)",
                                close=True)  # fmt: skip
            chunked = True
        elif lengths:
            if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
                raise HttpError(400, "Content-Length is not one number", close=True)
            length = int(next(iter(lengths)))
            if length > self._server.max_body:
                raise HttpError(413, f"the body is larger than {self._server.max_body} bytes", close=True)
            headers["content-length"] = str(length)
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise HttpError(417, f"Expect {expect[:40]!r} is not supported", close=True)
        if target.startswith(b"/"):
            path, _, query = target.partition(b"?")
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            rest = target.split(b"//", 1)[1]
            slash = rest.find(b"/")
            path, _, query = (rest[slash:] if slash >= 0 else b"/").partition(b"?")
        else:
            raise HttpError(400, "the request target is not a path", close=True)
        path = path.split(b"#", 1)[0]
        request = Request(
            method.decode("ascii"), path.decode("ascii"), query.decode("ascii"), version.decode("ascii"), headers, b""
        )
        return request, start, length, chunked

    # answering

    async def _answer(self, request: Request) -> None:
        try:
            response = await self._server.handler(request)
        except HttpError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.raw_path)
            response = Response.json({"error": "InternalError", "description": "the server failed; see its log"}, 500)
        self._send(response, close=self._closes_after(request), head_only=request.method == "HEAD")

    def _closes_after(self, request: Request) -> bool:
        connection = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" not in connection
        return "close" in connection

    def _send(self, response: Response, *, close: bool, head_only: bool, linger: bool = False) -> None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            self._busy = False
            return
        close = close or self._server.stopping
        body = response.body
        status = response.status
        head = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: pgbosh\r\n" % (
            status, _REASONS.get(status, "Unknown").encode(), _date())]  # fmt: skip
        if status == 204 or status == 304:  # no content, and no Content-Length (RFC 9110 8.6)
            body = b""
        else:
            if response.content_type is not None:
                head.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
            head.append(b"Content-Length: %d\r\n" % len(body))
        for name, value in response.headers:
            head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if not head_only:
            head.append(body)
        transport.write(b"".join(head))
        self._busy = False
        if close:
            if linger:
                self._linger()
            else:
                self.close()
            return
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if not self._paused_writing:
            self._advance()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _linger(self) -> None:
        """Closed for writing after a refusal: the client reads the answer, then its end of
        the connection; what it still sends is dropped until it closes (or ``LINGER`` s)."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._eof or not transport.can_write_eof():
            self.close()
            return
        self._closing = True
        self._lingering = True
        self._buffer.clear()
        transport.write_eof()
        if self._paused_reading:
            transport.resume_reading()
        self.deadline = self._loop.time() + LINGER

    def expire(self, now: float) -> None:
        """Close the connection (408 when a request was arriving) once its deadline passed."""
        if self.deadline is None or now < self.deadline or self._busy:
            return
        if self._lingering:
            self._lingering = False
            self.close()
            return
        if self._closing:
            return
        if self.idle:
            self.close()
        else:
            self._busy = True
            self._send(
                error_response(HttpError(408, "the request did not arrive in time", close=True)),
                close=True,
                head_only=False,
                linger=True,
            )

    @property
    def busy(self) -> bool:
        return self._busy


class _ChunkedBody:
    """A chunked body read as its bytes arrive (RFC 9112 7.1), from ``position``; chunk
    extensions and trailer fields are read and ignored. Each byte is looked at once however
    the body is cut into pieces: a line's search resumes where it stopped, and a chunk's
    data is waited for without reading its size line again."""

    def __init__(self, position: int, limit: int) -> None:
        self.position = position
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._trailers = False
        self._scanned = position  # where the search for the current line's end resumes
        self._data_end: int | None = None  # inside a chunk: where its data ends

    def feed(self, buffer: bytearray) -> bytes | None:
        """The whole body once it has arrived (``position`` then just past it), else None."""
        while True:
            if self._data_end is not None:
                if len(buffer) < self._data_end + 2:
                    return None
                if buffer[self._data_end : self._data_end + 2] != b"\r\n":
                    raise HttpError(400, "a chunk does not end with CRLF", close=True)
                self._parts.append(bytes(buffer[self.position : self._data_end]))
                self.position = self._scanned = self._data_end + 2
                self._data_end = None
                continue
            line_end = buffer.find(b"\r\n", max(self.position, self._scanned - 1), self.position + 4096)
            if line_end < 0:
                if len(buffer) - self.position > 4096:
                    raise HttpError(400, "a chunk-size or trailer line is too long", close=True)
                self._scanned = len(buffer)
                return None
            line = bytes(buffer[self.position : line_end])
            self.position = self._scanned = line_end + 2
            if self._trailers:
                if not line:
                    return b"".join(self._parts)
                continue
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise HttpError(400, "malformed chunk size", close=True)
            size = int(size_text, 16)
            if size == 0:
                self._trailers = True
                continue
            if self._size + size > self._limit:
                raise HttpError(413, f"the body is larger than {self._limit} bytes", close=True)
            self._size += size
            self._data_end = self.position + size


class HttpServer:
    """Serves ``handler`` on a TCP address. ``async with`` or ``start()``/``stop()``."""

    def __init__(
        self,
        handler: Handler,
        *,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
        max_body: int = MAX_BODY,
        hand_over: HandOver | None = None,
    ) -> None:
        self.handler = handler
        self.hand_over = hand_over
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_body = max_body
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = False
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for connection in list(self._connections):
                connection.expire(now)

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let running handlers answer, close the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            if not connection.busy:
                connection.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
        for task in set(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._sweeper = None
