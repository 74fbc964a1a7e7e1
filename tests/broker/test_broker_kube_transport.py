"""KubeClient with ``backend="streams"`` (the broker's) or ``"aiohttp"`` (the operator's)
behaves as with httpcore.

`pgbosh broker serve` carries its httpx requests over StreamTransport (HTTP/1.1 on asyncio
streams), the operator over aiohttp's connection pool (AiohttpTransport); the answers, the
errors and what is logged must be the same as on httpx's default transport.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from controller.broker import cli
from controller.broker.config import BrokerConfig
from controller.kube import Conflict, Invalid, KubeClient, KubeError, NotFound, resource_path
from controller.kube.client import StreamTransport
from controller.local.kube import serve

BACKENDS = ["httpcore", "aiohttp", "streams"]
WIRE = {"accept", "accept-encoding", "user-agent", "content-type", "content-length", "authorization", "host"}
COLLECTION = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db")
SPEC = BrokerConfig.load().catalog.services[0].plans[0].cluster


def cluster(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pgbosh.dev/v1alpha1",
        "kind": "PostgresCluster",
        "metadata": {"name": name, "namespace": "db", "labels": {"a": "b"}},
        "spec": {**SPEC, **spec},
    }


@pytest.fixture
async def api_url() -> AsyncIterator[str]:
    async with serve() as (_, url):
        yield url


@pytest.mark.parametrize("backend", BACKENDS)
async def test_verbs_and_errors_match(api_url: str, backend: Any) -> None:
    async with KubeClient(api_url, backend=backend, max_connections=8) as kube:
        created = await kube.create(COLLECTION, cluster("one"))
        assert created["metadata"]["name"] == "one" and created["metadata"]["generation"] == 1
        with pytest.raises(Conflict) as conflict:
            await kube.create(COLLECTION, cluster("one"))
        assert conflict.value.status == 409 and "Exists" in conflict.value.reason
        with pytest.raises(Invalid) as invalid:
            await kube.create(COLLECTION, cluster("two", instances=0))
        assert invalid.value.status == 422 and invalid.value.message

        path = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db", "one")
        patched = await kube.merge_patch(path, {"metadata": {"labels": {"a": None, "c": "d"}}})
        assert patched["metadata"]["labels"] == {"c": "d"}
        assert [item["metadata"]["name"] for item in await kube.list(COLLECTION, {"c": "d"})] == ["one"]
        await kube.delete(path)
        with pytest.raises(NotFound) as missing:
            await kube.get(path)
        assert missing.value.status == 404


@pytest.mark.parametrize("backend", BACKENDS)
async def test_secret_values_never_logged(
    api_url: str, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with KubeClient(api_url, backend=backend) as kube:
        await kube.apply_secret("db", "creds", {"password": "s3cret-value"})
        await kube.apply_secret("db", "creds", {"password": "other-value"})
        assert await kube.get_secret("db", "creds") == {"password": "other-value"}
        assert await kube.delete_secret("db", "creds") is True
    assert "s3cret-value" not in caplog.text and "other-value" not in caplog.text


@pytest.fixture
async def odd_server() -> AsyncIterator[tuple[str, list[tuple[str, int]]]]:
    """Answers gzip-encoded JSON, or slowly; records the client's (host, port) of every request."""
    peers: list[tuple[str, int]] = []

    async def handle(request: web.Request) -> web.Response:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peers.append(tuple(peername[:2]) if peername else ("", 0))
        if request.path == "/slow":
            await asyncio.sleep(1)
        await asyncio.sleep(0.01)  # long enough for concurrent requests to overlap
        answer: dict[str, Any] = {"got": request.headers.get("Content-Type", ""), "path": request.path_qs}
        if request.path == "/headers":
            answer = {"headers": sorted((k.lower(), v) for k, v in request.headers.items() if k.lower() in WIRE)}
        body = gzip.compress(json.dumps(answer).encode())
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", peers
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_gzip_bodies_are_decoded(odd_server: tuple[str, list[tuple[str, int]]], backend: Any) -> None:
    async with KubeClient(odd_server[0], backend=backend) as kube:
        assert await kube.create("/x", {"a": 1}) == {"got": "application/json", "path": "/x"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_server_path_prefix_and_query(odd_server: tuple[str, list[tuple[str, int]]], backend: Any) -> None:
    # An API server behind a path prefix (a proxy) gets the prefix on every call.
    async with KubeClient(odd_server[0] + "/k8s/c-1/", backend=backend) as kube:
        listed = await kube._request("GET", "/api/v1/namespaces/a%2Fb/secrets", params={"labelSelector": "a=b"})
        merged = await kube.merge_patch("/api/v1/x", {"a": 1})
    assert listed["path"] == "/k8s/c-1/api/v1/namespaces/a%2Fb/secrets?labelSelector=a%3Db"
    assert merged == {"got": "application/merge-patch+json", "path": "/k8s/c-1/api/v1/x"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_read_timeout_is_a_504(odd_server: tuple[str, list[tuple[str, int]]], backend: Any) -> None:
    async with KubeClient(odd_server[0], backend=backend, timeout=0.3) as kube:
        with pytest.raises(KubeError) as error:
            await kube.get("/slow")
    assert error.value.status == 504 and error.value.reason == "Timeout"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_unreachable_server_is_a_kube_error(backend: Any) -> None:
    async with KubeClient("http://127.0.0.1:9", backend=backend, timeout=1.0) as kube:
        with pytest.raises(KubeError) as error:
            await kube.get("/api/v1/namespaces")
    assert error.value.status == 503 and "ConnectError" in error.value.message


@pytest.mark.parametrize("backend", ["aiohttp", "streams"])
async def test_pool_keeps_connections_alive_and_bounded(
    odd_server: tuple[str, list[tuple[str, int]]], backend: Any
) -> None:
    url, peers = odd_server
    async with KubeClient(url, backend=backend, max_connections=5) as kube:
        await asyncio.gather(*(kube.get(f"/n/{i}") for i in range(20)))
        first = set(peers)
        await asyncio.gather(*(kube.get(f"/n/{i}") for i in range(20)))
    assert len(first) == 5  # bounded by max_connections
    assert set(peers) == first  # and reused by the second burst


async def test_same_headers_on_the_wire(odd_server: tuple[str, list[tuple[str, int]]]) -> None:
    seen = {}
    for backend in BACKENDS:
        async with KubeClient(odd_server[0], token="t0ken", backend=backend) as kube:  # type: ignore[arg-type]
            seen[backend] = (await kube.create("/headers", {"a": 1}), await kube.get("/headers"))
    assert seen["aiohttp"] == seen["httpcore"] == seen["streams"]
    assert ["authorization", "Bearer t0ken"] in seen["streams"][1]["headers"]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        KubeClient("http://127.0.0.1:9", backend="curl")  # type: ignore[arg-type]


async def test_broker_serve_uses_the_stream_transport(tmp_path: Any) -> None:
    class Args:
        server = "http://127.0.0.1:9"
        kubeconfig = None

    kube = cli._kube(Args())  # type: ignore[arg-type]
    try:
        transport = kube._http._transport
        assert isinstance(transport, StreamTransport)
        assert transport._max_connections >= 50  # a platform's burst of 50 provisions
    finally:
        await kube.aclose()
