"""httpx transports for the clients that make many calls: on aiohttp's connection pool
(the operator's Kubernetes and Director clients), and a lean HTTP/1.1 one on asyncio
streams (the broker's Kubernetes client)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import httpx

if TYPE_CHECKING:
    import aiohttp

# The pool size when the caller does not say: few connections (one server, short calls);
# httpcore scans its whole pool for every queued request, so a large pool costs more than
# it gains under a burst (benchmarks/broker).
DEFAULT_MAX_CONNECTIONS = 10
# httpx's own default keep-alive expiry; this transport uses the same.
KEEPALIVE_EXPIRY = 5.0


class _PooledTransport(httpx.AsyncBaseTransport):
    """What both transports are given: httpx's TLS setting, a bound on connections and how
    long an idle one is kept."""

    def __init__(
        self,
        *,
        verify: bool | ssl.SSLContext = True,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        self._verify = verify
        self._tls: ssl.SSLContext | None = verify if isinstance(verify, ssl.SSLContext) else None
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._init_pool()

    def _init_pool(self) -> None:
        """The transport's own state, empty."""

    def _context(self) -> ssl.SSLContext:
        # The same TLS settings httpx would use (its CA bundle when verify is True; no
        # verification when False), made on first use: loading the CA bundle costs ~0.1 s.
        if self._tls is None:
            self._tls = httpx.create_ssl_context(verify=bool(self._verify))
        return self._tls


class AiohttpTransport(_PooledTransport):
    """An httpx transport on aiohttp's connection pool.

    httpcore's pool re-examines every connection for every queued request (and asks
    each idle socket whether it is readable through anyio), so 50 concurrent calls
    cost ~2.5-6 ms of CPU each; aiohttp hands a free keep-alive connection over in
    constant time and parses responses in C (~0.3 ms a call under httpx). Requests,
    responses, decoding and errors stay httpx's: failures are raised as the httpx
    exceptions httpcore would raise (``ConnectError``, ``ReadTimeout``...).
    Environment proxies are not used (as with any custom httpx transport).
    """

    def _init_pool(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        # One ClientTimeout per distinct httpx timeout (a client uses one or two).
        self._timeouts: dict[tuple[float | None, float | None, float | None], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        # Made on first use, inside the event loop the client serves.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                keepalive_timeout=self._keepalive_expiry,
                ssl=self._context(),
            ),
            # httpx sets every header (aiohttp adds only missing ones) and decodes the body itself.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp

        session = self._session or self._open()
        timeouts = request.extensions.get("timeout") or {}
        key = (timeouts.get("connect"), timeouts.get("pool"), timeouts.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, pool, read = key
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                # aiohttp's "connect" covers waiting for a pooled connection and opening one.
                connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect,
                sock_read=read,
            )
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name not in ("connection", "content-length", "transfer-encoding")
        ]
        body = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = await response.read()
                status, raw_headers = response.status, response.raw_headers
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        return httpx.Response(status, headers=list(raw_headers), stream=httpx.ByteStream(content), request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# Methods that a request sent on a kept-alive connection the server had just closed may be
# sent again on a new one: they carry no body and change nothing (as Go's net/http does).
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
# The most a response's status line and headers may take.
MAX_HEAD = 1 << 20


def header_lines(raw: list[tuple[bytes, bytes]]) -> bytes:
    """Header fields as they go on the wire, one ``name: value`` line each ending in CRLF
    (what ``StreamTransport.exchange`` takes); ValueError if a name or value holds a line break."""
    fields = b"".join([b"%s: %s\r\n" % pair for pair in raw])
    if fields.count(b"\n") != len(raw) or fields.count(b"\r") != len(raw):
        raise ValueError("a header name or value holds a line break")
    return fields


class RawResponse(NamedTuple):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    content: bytes


class _Stale(Exception):
    """A kept-alive connection was closed before any byte of the response came back."""


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (
            now - self.idle_since < expiry
            and not self.writer.is_closing()
            and not self.reader.at_eof()
            and self.reader.exception() is None
            # Bytes nobody asked for (a server's "408 Request Timeout" before it closes).
            and not getattr(self.reader, "_buffer", b"")
        )

    def close(self) -> None:
        self.writer.close()


class StreamTransport(_PooledTransport):
    """An httpx transport speaking HTTP/1.1 itself, on asyncio streams, for request/response
    APIs such as Kubernetes (``KubeClient(backend="streams")``, what ``pgbosh broker serve`` uses).

    One Kubernetes call through aiohttp's client costs ~0.3 ms of CPU in a burst (request
    and response objects, tracing and timer hooks, its own URL and header models); writing
    the request's bytes and reading the answer here costs ~0.05-0.1 ms. As a transport,
    requests, responses, decoding (gzip) and errors stay httpx's; ``exchange`` takes and
    gives bytes below httpx's models (``KubeClient``'s calls, ~0.1 ms less each). Either
    way, failures are raised as the httpx exceptions httpcore would raise, and a
    connection that failed, was cancelled mid-call, was told
    ``Connection: close`` or has been idle ``keepalive_expiry`` seconds is not reused.
    A GET, HEAD or OPTIONS that finds its kept-alive connection closed by the server before
    any answer is sent once more on a new connection. Bodies are read whole (Content-Length,
    chunked, or up to the close), the read timeout bounding the head and then the body; no
    proxy, no HTTP/2, no streaming.
    """

    def _init_pool(self) -> None:
        self._slots: asyncio.Semaphore | None = None
        # Idle connections per (scheme, host, port), the most recently used last.
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        try:
            fields = header_lines(request.headers.raw)
        except ValueError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        timeouts = request.extensions.get("timeout") or {}
        status, reason, headers, content = await self.exchange(
            request.method, request.url, fields, body, timeouts, request=request
        )
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def exchange(
        self,
        method: str,
        url: httpx.URL,
        fields: bytes,
        body: bytes,
        timeouts: Mapping[str, float | None],
        *,
        request: httpx.Request | None = None,
    ) -> RawResponse:
        """One request as bytes, below httpx's models (``KubeClient`` sends its calls so):
        ``fields`` are the header lines, each ending in CRLF, checked by the caller for line
        breaks. The answer's status, reason, headers and body, the body as sent (a
        Content-Encoding not undone). Failures are the httpx exceptions, carrying ``request``."""
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
        if self._closed:
            raise RuntimeError("the transport is closed")
        message = b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method.encode(), url.raw_path, fields, body)
        # The host as it goes on the wire (IDNA-encoded; an IPv6 address without brackets).
        key = (url.scheme, url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80))

        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max_connections)
        if slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError as exc:
                raise httpx.PoolTimeout("no free connection in time", request=request) from exc
        else:
            await slots.acquire()
        try:
            while True:
                connection = self._checkout(key)
                reused = connection is not None
                if connection is None:
                    connection = await self._connect(request, key, timeouts)
                try:
                    status, reason, headers, content, keep = await self._exchange(
                        connection, method, request, message, timeouts, reused
                    )
                except _Stale as exc:
                    connection.close()
                    if method in _REPLAYABLE:
                        continue
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response.", request=request
                    ) from exc
                except BaseException:
                    connection.close()
                    raise
                break
        finally:
            slots.release()
        if keep and not self._closed:
            now = connection.idle_since = time.monotonic()
            idle = self._idle.setdefault(key, [])
            # The oldest first: close those idle too long (the server will have, or soon will).
            while idle and now - idle[0].idle_since >= self._keepalive_expiry:
                idle.pop(0).close()
            idle.append(connection)
        else:
            connection.close()
        return RawResponse(status, reason, headers, content)

    def _checkout(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self._keepalive_expiry):
                return connection
            connection.close()
        return None

    async def _connect(
        self, request: httpx.Request | None, key: tuple[str, str, int], timeouts: Mapping[str, float | None]
    ) -> _Connection:
        scheme, host, port = key
        tls = self._context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEAD
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
        except OSError as exc:  # ssl.SSLError included
            raise httpx.ConnectError(str(exc), request=request) from exc
        return _Connection(reader, writer)

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        request: httpx.Request | None,
        message: bytes,
        timeouts: Mapping[str, float | None],
        reused: bool,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bool]:
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(message)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeouts.get("write")):
                    await writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("writing the request timed out", request=request) from exc
        except OSError as exc:
            if reused:
                raise _Stale from exc
            raise httpx.WriteError(str(exc), request=request) from exc
        read_timeout = timeouts.get("read")
        head = b""
        try:
            async with asyncio.timeout(read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                while head[9:10] == b"1" and head[9:12] != b"101":  # 1xx: the answer follows
                    head = await reader.readuntil(b"\r\n\r\n")
            status, reason, headers, length, chunked, close = _parse_head(head)
            if method == "HEAD" or status in (204, 304):
                content = b""
            elif chunked:
                content = await self._read_chunked(reader, read_timeout)
            elif length is not None:
                if len(getattr(reader, "_buffer", b"")) >= length:
                    # Already read with the head (a small answer): no wait to bound.
                    content = await reader.readexactly(length)
                else:
                    async with asyncio.timeout(read_timeout):
                        content = await reader.readexactly(length)
            else:
                close = True
                async with asyncio.timeout(read_timeout):
                    content = await reader.read()
        except TimeoutError as exc:
            raise httpx.ReadTimeout("reading the response timed out", request=request) from exc
        except asyncio.IncompleteReadError as exc:
            if reused and not head and not exc.partial:
                raise _Stale from exc
            raise httpx.RemoteProtocolError("the server closed the connection mid-response", request=request) from exc
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"malformed response: {exc}", request=request) from exc
        except OSError as exc:
            if reused and not head and isinstance(exc, ConnectionResetError):
                raise _Stale from exc
            raise httpx.ReadError(str(exc), request=request) from exc
        return status, reason, headers, content, not close

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader, read_timeout: float | None) -> bytes:
        parts: list[bytes] = []
        async with asyncio.timeout(read_timeout):
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    return b"".join(parts)
                chunk = await reader.readexactly(size + 2)
                if chunk[-2:] != b"\r\n":
                    raise ValueError("a chunk does not end with CRLF")
                parts.append(chunk[:-2])

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], int | None, bool, bool]:
    """Status, reason, headers, Content-Length, chunked, and whether the server closes."""
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}")
    headers = []
    length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"header line {line[:80]!r}")
        value = value.strip()
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise ValueError(f"Content-Length {value[:20]!r}")
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            if not chunked:
                raise ValueError(f"Transfer-Encoding {value[:40]!r}")
        elif lowered == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
    return int(code), reason, headers, length, chunked, close
