"""controller.http_server, the broker's HTTP/1.1 server, spoken to byte by byte.

What RFC 9112 asks of a server that a proxy in front of the broker, curl or Cloud
Foundry's Go client may rely on: keep-alive and pipelining, chunked bodies, 100-continue,
HEAD, and a plain refusal (status, JSON body, connection closed) of every request two
parsers could read differently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from controller import http_server
from controller.http_server import HttpError, HttpServer, Request, Response, Router


class App:
    """Echoes what it was given; ``/slow`` waits for ``release``; ``/boom`` fails."""

    def __init__(self) -> None:
        self.router = Router()
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished: list[str] = []
        for method in ("GET", "PUT", "POST"):
            self.router.add(method, "/echo/{name}", self.echo)
        self.router.add("DELETE", "/echo/{name}", self.echo)
        self.router.add("GET", "/slow", self.slow)
        self.router.add("GET", "/boom", self.boom)
        self.router.add("POST", "/json", self.json)
        self.router.add("DELETE", "/empty", self.nothing)

    async def __call__(self, request: Request) -> Response:
        return await self.router.resolve(request)(request)

    async def echo(self, request: Request) -> Response:
        return Response.json(
            {
                "method": request.method,
                "path": request.path,
                "name": request.match_info["name"],
                "query": request.query,
                "body": request.body.decode(),
                "headers": request.headers,
            }
        )

    async def slow(self, request: Request) -> Response:
        self.started.set()
        await self.release.wait()
        self.finished.append("slow")
        return Response.json({"slow": True})

    async def json(self, request: Request) -> Response:
        return Response.json({"got": json.loads(request.body)})

    async def nothing(self, request: Request) -> Response:
        return Response(204, b"ignored")

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("secret-detail")


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, HttpServer]]:
    app = App()
    server = HttpServer(app, keepalive_timeout=5, request_timeout=5, shutdown_timeout=5)
    await server.start("127.0.0.1", 0)
    try:
        yield app, server
    finally:
        app.release.set()
        await server.stop()


class Wire:
    """One raw TCP connection: write bytes, read answers as (status, headers, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: HttpServer) -> Wire:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def send_in_pieces(self, data: bytes, size: int) -> None:
        """``data`` in writes of ``size`` bytes, each let out before the next."""
        for start in range(0, len(data), size):
            self.writer.write(data[start : start + size])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 ")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 5) if length else b""
        return int(lines[0][9:12]), headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, *extra: str, version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join([f"GET {path} {version}", "Host: test", *extra, "", ""]).encode()


async def test_keep_alive_headers_and_query(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    for name in ("first", "a%20b"):
        wire.send(get(f"/echo/{name}?x=1&x=2&empty=", "X-Thing: one", "x-thing: two"))
        status, headers, body = await wire.answer()
        assert status == 200
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert headers["server"] == "pgbosh" and headers["date"].endswith(" GMT")
        assert "connection" not in headers
        echoed = json.loads(body)
        assert echoed["name"] == name.replace("%20", " ")
        assert echoed["query"] == {"x": "1", "empty": ""}  # the first value of a name
        assert echoed["headers"]["x-thing"] == "one, two"  # repeated fields, joined
    wire.close()


async def test_pipelined_requests_are_answered_in_order(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    # Leading empty lines before a request line are ignored (RFC 9112 2.2).
    wire.send(b"\r\n" + get("/echo/one") + get("/echo/two") + get("/echo/three"))
    names = [json.loads((await wire.answer())[2])["name"] for _ in range(3)]
    assert names == ["one", "two", "three"]
    wire.close()


async def test_bodies_by_length_chunked_and_after_100_continue(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhel")
    await asyncio.sleep(0.05)
    wire.send(b"lo")
    assert json.loads((await wire.answer())[2])["body"] == "hello"

    # Chunked, in pieces, with a chunk extension and a trailer field.
    wire.send(b"POST /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n")
    await asyncio.sleep(0.05)
    wire.send(b"5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n")
    status, _, body = await wire.answer()
    assert status == 200 and json.loads(body)["body"] == "wikipedia"

    wire.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await asyncio.wait_for(wire.reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    wire.send(b"ok")
    assert json.loads((await wire.answer())[2])["body"] == "ok"
    wire.close()


async def test_clients_agree_httpx_and_curl(served: tuple[App, HttpServer]) -> None:
    _, server = served
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        answer = await client.put("/echo/c", json={"a": 1}, params={"q": "é"})
        assert answer.status_code == 200
        assert answer.json()["body"] == '{"a":1}' and answer.json()["query"] == {"q": "é"}
        head = await client.head("/echo/c")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    # curl waits for "100 Continue" (up to a second) before it sends the body.
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-X", "PUT", "--data-binary", "@-", "-H", "Content-Type: application/json",
        "-H", "Expect: 100-continue", "--expect100-timeout", "30",
        f"http://127.0.0.1:{server.port}/echo/curl",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    big = json.dumps({"blob": "x" * 4000}).encode()
    out, err = await asyncio.wait_for(process.communicate(big), 10)
    assert process.returncode == 0, err
    echoed = json.loads(out)
    assert echoed["headers"]["expect"] == "100-continue" and echoed["body"] == big.decode()


async def test_a_head_arriving_in_pieces(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    request = get("/echo/pieces", "X-Long: " + "v" * 3000)
    await wire.send_in_pieces(request, 7)  # the end-of-head mark split across pieces too
    assert json.loads((await wire.answer())[2])["name"] == "pieces"
    # A request line past the limit, in pieces: refused once the limit is crossed.
    for _ in range(10):
        wire.send(b"GET /" + b"a" * 1000)
        await asyncio.sleep(0.01)
    status, _, body = await wire.answer()
    assert status == 414 and "request line is longer" in json.loads(body)["description"]


async def test_a_chunked_body_arriving_in_pieces(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    body = b"3;name=value\r\nabc\r\n10\r\n" + b"0123456789abcdef" + b"\r\n1\r\nz\r\n0\r\nT: 1\r\n\r\n"
    wire.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    await wire.send_in_pieces(body, 2)  # every line end and chunk end split somewhere
    assert json.loads((await wire.answer())[2])["body"] == "abc0123456789abcdefz"
    wire.close()


async def test_routing_errors_404_and_405(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(get("/nothing"))
    status, _, body = await wire.answer()
    assert status == 404 and json.loads(body) == {"error": "Not Found", "description": "no such resource: /nothing"}
    wire.send(get("/echo/"))  # a variable is a non-empty segment
    assert (await wire.answer())[0] == 404
    wire.send(b"PATCH /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = await wire.answer()
    assert status == 405 and headers["allow"] == "DELETE, GET, HEAD, POST, PUT"
    assert json.loads(body)["error"] == "Method Not Allowed"
    wire.send(get("/echo/still-open"))  # a routing error keeps the connection
    assert (await wire.answer())[0] == 200
    wire.close()


BAD = [
    (b"GET /echo/x\r\nHost: t\r\n\r\n", 400, "malformed request line"),
    (b"GET /echo/x HTTP/1.1 extra\r\nHost: t\r\n\r\n", 400, "malformed request line"),
    (b"G(T /echo/x HTTP/1.1\r\nHost: t\r\n\r\n", 400, "malformed request line"),
    (b"GET echo HTTP/1.1\r\nHost: t\r\n\r\n", 400, "not a path"),
    (b"GET /echo/x HTTP/2.0\r\nHost: t\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
    (b"GET /echo/x HTTP/1.1\r\n\r\n", 400, "exactly one Host"),
    (b"GET /echo/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "exactly one Host"),
    (b"GET /echo/x HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400, "folded"),
    (b"GET /echo/x HTTP/1.1\r\nHost : t\r\n\r\n", 400, "malformed header line"),
    (b"GET /echo/x HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", 400, "bare CR or LF"),
    (b"GET /echo/x HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400, "control character"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "both Content-Length and Transfer-Encoding"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400,
     "Content-Length is not one number"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length is not one number"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "only chunked"),
    (b"PUT /echo/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed chunk size"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400, "CRLF"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n", 417, "Expect"),
    (b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n", 413, "larger than 1048576"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request line is longer"),
    (b"GET /echo/x HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "more than 100 header"),
    (b"GET /echo/x HTTP/1.1\r\nHost: t\r\n" + b"X: " + b"y" * 70000, 431, "head is longer"),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status", "words"), BAD)
async def test_malformed_requests_are_refused_and_the_connection_closed(
    served: tuple[App, HttpServer], request_bytes: bytes, status: int, words: str
) -> None:
    _, server = served
    wire = await Wire.open(server)
    # What follows a refused request is never read as a request of its own (smuggling).
    wire.send(request_bytes + get("/echo/smuggled"))
    answer_status, headers, body = await wire.answer()
    assert (answer_status, headers["connection"]) == (status, "close")
    assert words in json.loads(body)["description"]
    assert await wire.closed()


async def test_chunked_body_over_the_limit_is_413(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        wire.send(b"40000\r\n" + b"x" * 0x40000 + b"\r\n")
    status, _, body = await wire.answer()
    assert status == 413 and "larger than" in json.loads(body)["description"]
    assert await wire.closed()


async def test_chunk_framing_counts_toward_the_limit() -> None:
    """Tiny chunks with long extensions: refused by what arrived, not by the body's size."""
    server = HttpServer(App(), max_body=1000)
    await server.start("127.0.0.1", 0)
    try:
        wire = await Wire.open(server)
        wire.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"1;" + b"e" * 4000 + b"\r\nx\r\n"
        for _ in range(40):  # 40 bytes of body, 160 KB of framing
            wire.send(chunk)
        status, _, body = await wire.answer()
        assert status == 413 and "chunked body is larger than 1000" in json.loads(body)["description"]
    finally:
        await server.stop()


async def test_connection_close_and_http_1_0(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(get("/echo/x", "Connection: close"))
    status, headers, _ = await wire.answer()
    assert status == 200 and headers["connection"] == "close"
    assert await wire.closed()

    wire = await Wire.open(server)
    wire.send(get("/echo/x", version="HTTP/1.0"))  # no Host needed, closed after
    assert (await wire.answer())[1]["connection"] == "close"
    assert await wire.closed()

    wire = await Wire.open(server)
    wire.send(get("/echo/x", "Connection: keep-alive", version="HTTP/1.0"))
    assert "connection" not in (await wire.answer())[1]
    wire.send(get("/echo/y"))
    assert json.loads((await wire.answer())[2])["name"] == "y"
    wire.close()


async def test_half_closed_client_still_gets_its_answer(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(get("/echo/x"))
    wire.writer.write_eof()
    assert (await wire.answer())[0] == 200
    assert await wire.closed()


async def test_idle_and_slow_connections_are_closed(
    served: tuple[App, HttpServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = served
    server.keepalive_timeout = 0.3
    server.request_timeout = 0.6
    idle = await Wire.open(server)
    idle.send(get("/echo/x"))
    await idle.answer()
    slow = await Wire.open(server)
    slow.send(b"PUT /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    started = asyncio.get_running_loop().time()
    assert await idle.closed()  # no answer: an idle connection is just closed
    status, headers, body = await slow.answer()
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["description"] == "the request did not arrive in time"
    assert asyncio.get_running_loop().time() - started >= 0.5


async def test_a_handler_is_not_cancelled_when_its_client_leaves(served: tuple[App, HttpServer]) -> None:
    app, server = served
    wire = await Wire.open(server)
    wire.send(get("/slow"))
    await asyncio.wait_for(app.started.wait(), 5)
    wire.writer.transport.abort()
    await asyncio.sleep(0.1)
    app.release.set()
    for _ in range(50):
        if app.finished:
            break
        await asyncio.sleep(0.02)
    assert app.finished == ["slow"]


async def test_stop_lets_a_running_request_answer(served: tuple[App, HttpServer]) -> None:
    app, server = served
    busy = await Wire.open(server)
    idle = await Wire.open(server)
    idle.send(get("/echo/x"))
    await idle.answer()
    busy.send(get("/slow"))
    await asyncio.wait_for(app.started.wait(), 5)
    stopping = asyncio.create_task(server.stop())
    assert await idle.closed()
    with pytest.raises(OSError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", server.port or 1)
    app.release.set()
    status, headers, body = await busy.answer()
    assert status == 200 and json.loads(body) == {"slow": True} and headers["connection"] == "close"
    await stopping


async def test_handler_failure_is_a_500_without_details(
    served: tuple[App, HttpServer], caplog: pytest.LogCaptureFixture
) -> None:
    _, server = served
    caplog.set_level(logging.ERROR)
    wire = await Wire.open(server)
    wire.send(get("/boom"))
    status, _, body = await wire.answer()
    assert status == 500
    assert json.loads(body) == {"error": "InternalError", "description": "the server failed; see its log"}
    assert "secret-detail" not in body.decode() and "secret-detail" in caplog.text
    wire.send(get("/echo/after"))  # the connection serves on
    assert (await wire.answer())[0] == 200
    wire.close()


async def test_answers_are_ascii_json_even_with_a_lone_surrogate(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    body = b'{"name": "\\ud800-caf\xc3\xa9"}'
    wire.send(b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, _, answer = await wire.answer()
    assert status == 200 and answer == b'{"got":{"name":"\\ud800-caf\\u00e9"}}'
    wire.close()


async def test_no_content_has_no_body_and_no_length(served: tuple[App, HttpServer]) -> None:
    _, server = served
    wire = await Wire.open(server)
    wire.send(b"DELETE /empty HTTP/1.1\r\nHost: t\r\n\r\n" + get("/echo/next"))
    status, headers, body = await wire.answer()
    assert status == 204 and body == b"" and "content-length" not in headers and "content-type" not in headers
    assert json.loads((await wire.answer())[2])["name"] == "next"  # nothing stray in between
    wire.close()


def test_router_refuses_a_pattern_without_slash() -> None:
    async def handler(request: Request) -> Response:
        return Response()

    with pytest.raises(ValueError, match="must start with /"):
        Router().add("GET", "x", handler)


def test_http_error_reason_and_date_header() -> None:
    error = HttpError(413, "too big")
    assert error.reason == "Request Entity Too Large" and not error.close
    first: Any = http_server._date()
    assert first.endswith(b" GMT") and http_server._date() is first  # formatted once a second


async def test_a_connection_is_handed_over_with_every_byte_not_answered() -> None:
    """``hand_over`` gives the connection, from the request it declines on, to another
    protocol (aiohttp's low-level server here, as the local Kubernetes API does): that
    request, the pipelined ones behind it and every later one are the successor's, and the
    first server answers no more on it."""
    from aiohttp import web

    async def successor_handler(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        return web.json_response({"by": "successor", "path": request.path, "body": body.decode()})

    successor = web.Server(successor_handler)
    app = App()
    declined: list[str] = []

    def hand_over(request: Request) -> asyncio.BaseProtocol | None:
        if not request.raw_path.startswith("/other"):
            return None
        declined.append(request.raw_path)
        return successor()

    server = HttpServer(app, hand_over=hand_over, keepalive_timeout=5, request_timeout=5, shutdown_timeout=5)
    await server.start("127.0.0.1", 0)
    try:
        wire = await Wire.open(server)
        wire.send(get("/echo/first"))
        status, headers, body = await wire.answer()
        assert status == 200 and headers["server"] == "pgbosh" and json.loads(body)["name"] == "first"

        # Declined with its body only half arrived, and two more pipelined behind it.
        post = b"POST /other/a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
        wire.send(post + b"he")
        await asyncio.sleep(0.05)
        wire.send(b"llo" + get("/echo/second") + get("/other/b"))
        answers = [await wire.answer() for _ in range(3)]
        assert [json.loads(body) for _, _, body in answers] == [
            {"by": "successor", "path": "/other/a", "body": "hello"},
            {"by": "successor", "path": "/echo/second", "body": ""},  # once handed over, all of it
            {"by": "successor", "path": "/other/b", "body": ""},
        ]
        assert all(h["server"] != "pgbosh" for _, h, _ in answers)
        assert declined == ["/other/a"]  # asked once: the connection was no longer its own
        assert not server._connections

        # Other connections still start with the first server.
        other = await Wire.open(server)
        other.send(get("/echo/third"))
        assert (await other.answer())[1]["server"] == "pgbosh"
        other.close()
        wire.close()
    finally:
        await server.stop()
        successor.pre_shutdown()
        await successor.shutdown(5)


class Recorder(asyncio.Protocol):
    """A successor that keeps what it is given, and answers once the client stops sending."""

    def __init__(self) -> None:
        self.data = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.data), self.data))
        self.transport.close()
        return True


async def test_the_end_of_sending_that_came_with_a_declined_request_reaches_the_successor() -> None:
    """The client stopped sending right after the request declined: the successor gets the
    request's bytes and then the end, and the first server does not close the connection
    under it. Also when the end came while the first server was still answering the request
    before it (the declined one waited in its buffer)."""
    recorders: list[Recorder] = []

    def hand_over(request: Request) -> asyncio.BaseProtocol | None:
        if request.raw_path == "/slow":
            return None
        recorders.append(Recorder())
        return recorders[-1]

    app = App()
    server = HttpServer(app, hand_over=hand_over, keepalive_timeout=5, request_timeout=5)
    await server.start("127.0.0.1", 0)
    request = b"PUT /anything HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    try:
        wire = await Wire.open(server)
        wire.send(request)
        wire.writer.write_eof()
        status, _, body = await wire.answer()
        assert status == 200 and body == request and len(recorders) == 1
        assert await wire.closed()
        wire.close()

        wire = await Wire.open(server)
        wire.send(get("/slow") + request)
        wire.writer.write_eof()
        await asyncio.wait_for(app.started.wait(), 5)
        await asyncio.sleep(0.1)  # the end has arrived while /slow is answered
        assert len(recorders) == 1
        app.release.set()
        assert json.loads((await wire.answer())[2]) == {"slow": True}
        status, _, body = await wire.answer()
        assert status == 200 and body == request and len(recorders) == 2
        assert await wire.closed()
        wire.close()
    finally:
        await server.stop()


async def test_a_hand_over_check_that_fails_gets_500_and_the_server_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def hand_over(request: Request) -> asyncio.BaseProtocol | None:
        if request.raw_path == "/boom":
            raise RuntimeError("secret-detail")
        return None

    server = HttpServer(App(), hand_over=hand_over, keepalive_timeout=5, request_timeout=5)
    await server.start("127.0.0.1", 0)
    try:
        wire = await Wire.open(server)
        with caplog.at_level(logging.ERROR, logger="controller.http_server"):
            wire.send(get("/boom"))
            status, headers, body = await wire.answer()
        assert status == 500 and headers["connection"] == "close"
        assert json.loads(body) == {"error": "Internal Server Error", "description": "the server failed; see its log"}
        assert "secret-detail" not in body.decode() and "handing over GET /boom" in caplog.text
        assert await wire.closed()
        wire.close()
        other = await Wire.open(server)
        other.send(get("/echo/after"))
        assert (await other.answer())[0] == 200
        other.close()
    finally:
        await server.stop()
