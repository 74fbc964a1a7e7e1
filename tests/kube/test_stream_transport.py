"""StreamTransport (``KubeClient(backend="streams")``, the broker's): HTTP/1.1 framing,
keep-alive and its limits, errors, cancellation and TLS, against scripted servers.

The verbs against the local Kubernetes API, gzip, timeouts and the headers on the wire
are tested for every backend in tests/broker/test_broker_kube_transport.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from controller.http_transport import StreamTransport, _parse_head
from controller.kube import KubeClient, KubeError

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that plays ``script(reader, writer, connection number)`` on each connection."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await script(reader, writer, len(connections) - 1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length) if length else b""


def answer(body: bytes, *extra: bytes, status: bytes = b"200 OK", version: bytes = b"HTTP/1.1") -> bytes:
    head = [version + b" " + status, b"Content-Type: application/json", *extra]
    if not any(line.lower().startswith(b"transfer-encoding") for line in extra):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def test_chunked_keepalive_and_reuse() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, body = await read_request(reader)
            document = json.dumps({"request": head.split(b" ")[1].decode(), "body": body.decode()}).encode()
            middle = len(document) // 2
            chunks = b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (
                middle, document[:middle], len(document) - middle, document[middle:]
            )
            writer.write(answer(chunks, b"Transfer-Encoding: chunked"))
            await writer.drain()

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        assert await kube.get("/a?b=c") == {"request": "/a?b=c", "body": ""}
        assert await kube.create("/x", {"é": 1}) == {"request": "/x", "body": '{"é":1}'}
        assert await kube.get("/y") == {"request": "/y", "body": ""}
    assert connections == [0]  # one connection, kept alive


@pytest.mark.parametrize(
    ("version", "extra"),
    [(b"HTTP/1.1", (b"Connection: close",)), (b"HTTP/1.0", ()), (b"HTTP/1.1", (b"X-No-Length: 1",))],
)
async def test_connection_not_reused_when_the_server_closes(version: bytes, extra: tuple[bytes, ...]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        response = answer(b'{"n": %d}' % number, *extra, version=version)
        if b"X-No-Length: 1" in extra:  # the body runs to the close
            response = response.replace(b"Content-Length: 8\r\n", b"")
        writer.write(response)
        await writer.drain()

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        assert await kube.get("/1") == {"n": 0}
        assert await kube.get("/2") == {"n": 1}
    assert connections == [0, 1]


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("POST", False)])
async def test_kept_alive_connection_closed_under_a_request(method: str, replayed: bool) -> None:
    """The server drops a kept-alive connection as the next request arrives: a GET is sent
    again on a new connection, a POST is a 503 (it might have been acted on)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(answer(b'{"n": %d}' % number))
        await writer.drain()
        if number == 0:
            await read_request(reader)  # and close without an answer

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        assert await kube.get("/first") == {"n": 0}
        if replayed:
            assert await kube.get("/second") == {"n": 1}
        else:
            with pytest.raises(KubeError) as error:
                await kube.create("/second", {})
            assert error.value.status == 503 and "RemoteProtocolError" in error.value.message
            assert await kube.get("/third") == {"n": 1}  # and the pool recovers
    assert connections == [0, 1]


async def test_idle_connection_closed_by_the_server_is_not_used() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(answer(b'{"n": %d}' % number))
        await writer.drain()  # then close: an idle timeout on the server's side

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        assert await kube.get("/1") == {"n": 0}
        await asyncio.sleep(0.1)
        assert await kube.create("/2", {}) == {"n": 1}  # not a 503: the closed connection was seen
    assert connections == [0, 1]


async def test_idle_connection_with_unasked_bytes_is_not_used() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(answer(b'{"n": %d}' % number))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(b"{}", status=b"408 Request Timeout"))  # and keep it open
        await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        assert await kube.get("/1") == {"n": 0}
        await asyncio.sleep(0.2)
        assert await kube.get("/2") == {"n": 1}
    assert connections == [0, 1]


async def test_line_breaks_in_headers_are_refused() -> None:
    async with httpx.AsyncClient(transport=StreamTransport()) as http:
        with pytest.raises(httpx.LocalProtocolError):
            await http.get("http://127.0.0.1:9/", headers={"X-A": "b\r\nX-Injected: 1"})


async def test_keepalive_expiry() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            await read_request(reader)
            writer.write(answer(b'{"n": %d}' % number))
            await writer.drain()

    async with raw_server(script) as (url, connections):
        transport = StreamTransport(keepalive_expiry=0.2)
        async with KubeClient(url, transport=transport) as kube:
            await kube.get("/1")
            await kube.get("/2")
            await asyncio.sleep(0.3)
            await kube.get("/3")
    assert connections == [0, 1]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # closed mid-body
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n bad: header\r\n\r\n",
        b"",  # closed before answering, on a new connection
    ],
)
async def test_malformed_responses_are_protocol_errors(response: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()

    async with raw_server(script) as (url, _):
        async with httpx.AsyncClient(transport=StreamTransport()) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(url)


async def test_informational_responses_are_skipped_and_head_has_no_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, _ = await read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with raw_server(script) as (url, connections), httpx.AsyncClient(transport=StreamTransport()) as http:
        head = await http.head(url)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "5"
        empty = await http.delete(url)
        assert empty.status_code == 204 and empty.reason_phrase == "No Content"
    assert connections == [0]


async def test_cancelled_call_leaves_no_half_read_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/slow" in head:
                await asyncio.sleep(0.5)
            writer.write(answer(b'{"n": %d, "path": "%s"}' % (number, head.split(b" ")[1])))
            await writer.drain()

    async with raw_server(script) as (url, connections), KubeClient(url, backend="streams") as kube:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await kube.get("/slow")
        # The late answer to /slow must not be read as this one's.
        assert await kube.get("/next") == {"n": 1, "path": "/next"}
    assert connections == [0, 1]


async def test_pool_is_bounded_and_waits_for_a_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(answer(b'{"n": %d}' % number))
            await writer.drain()

    async with raw_server(script) as (url, connections):
        async with KubeClient(url, backend="streams", max_connections=3) as kube:
            await asyncio.gather(*(kube.get(f"/{i}") for i in range(12)))
        assert connections == [0, 1, 2]
        timeout = httpx.Timeout(5.0, pool=0.01)
        async with httpx.AsyncClient(transport=StreamTransport(max_connections=1), timeout=timeout) as http:
            slow = asyncio.create_task(http.get(url))
            await asyncio.sleep(0.01)
            with pytest.raises(httpx.PoolTimeout):
                await http.get(url)
            assert (await slow).status_code == 200


async def test_connect_errors() -> None:
    async with KubeClient("http://127.0.0.1:9", backend="streams") as kube:
        with pytest.raises(KubeError) as error:
            await kube.get("/")
    assert error.value.status == 503 and "ConnectError" in error.value.message
    async with httpx.AsyncClient(transport=StreamTransport()) as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


def test_parse_head() -> None:
    status, reason, headers, length, chunked, close = _parse_head(
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: keep-alive, Upgrade\r\nX-A: b c\r\n\r\n"
    )
    assert (status, reason, length, chunked, close) == (201, b"Created", 2, False, False)
    assert headers == [(b"Content-Length", b"2"), (b"Connection", b"keep-alive, Upgrade"), (b"X-A", b"b c")]
    assert _parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")[5] is False
    assert _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")[4] is True


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "tls": request.secure})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with KubeClient(f"https://127.0.0.1:{port}", ca_file=cert, backend="streams") as kube:
            assert await kube.get("/api") == {"path": "/api", "tls": True}
            assert await kube.get("/again") == {"path": "/again", "tls": True}
        async with KubeClient(f"https://localhost:{port}", verify=False, backend="streams") as kube:
            assert await kube.get("/insecure") == {"path": "/insecure", "tls": True}
        async with KubeClient(f"https://127.0.0.1:{port}", backend="streams") as kube:
            with pytest.raises(KubeError) as error:  # not signed by a CA the client trusts
                await kube.get("/api")
            assert error.value.status == 503 and "ConnectError" in error.value.message
    finally:
        await runner.cleanup()
