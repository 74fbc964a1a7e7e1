"""KubeClient against kmock's Kubernetes emulator served on a loopback port."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest

from controller.kube import Conflict, KubeClient, KubeError, NotFound, client, core_path, resource_path
from controller.kube.client import DEFAULT_TIMEOUT

CLUSTERS = "pgbosh.dev/v1alpha1/postgresclusters"


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, host="127.0.0.1") as server:
        k8s.resources[CLUSTERS] = kmock.ResourceInfo(
            kind="PostgresCluster",
            namespaced=True,
            verbs={"list", "watch", "get", "patch", "create", "delete"},
            subresources={"status"},
        )
        k8s.resources["v1/secrets"] = kmock.ResourceInfo(
            kind="Secret", namespaced=True, verbs={"list", "get", "patch", "create", "delete"}
        )
        yield k8s, f"http://{server.host}:{server.port}"


@pytest.fixture
async def kube(emulator: tuple[kmock.KubernetesEmulator, str]) -> AsyncIterator[KubeClient]:
    async with KubeClient(emulator[1]) as client:
        yield client


def test_paths() -> None:
    assert resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "ns", "a", "status") == (
        "/apis/pgbosh.dev/v1alpha1/namespaces/ns/postgresclusters/a/status"
    )
    collection = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters")
    assert collection == "/apis/pgbosh.dev/v1alpha1/postgresclusters"
    assert core_path("secrets", "ns") == "/api/v1/namespaces/ns/secrets"
    assert core_path("namespaces", name="ns") == "/api/v1/namespaces/ns"
    with pytest.raises(ValueError):
        resource_path("", "v1", "pods", "ns", subresource="log")


async def test_create_get_patch_list_delete(kube: KubeClient, emulator: tuple[kmock.KubernetesEmulator, str]) -> None:
    collection = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db")
    path = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db", "one")
    created = await kube.create(
        collection,
        {
            "apiVersion": "pgbosh.dev/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "one", "namespace": "db", "labels": {"a": "b"}},
            "spec": {"instances": 1},
        },
    )
    assert created["metadata"]["name"] == "one"
    with pytest.raises(Conflict) as conflict:
        await kube.create(collection, {"metadata": {"name": "one", "namespace": "db"}})
    assert conflict.value.status == 409

    patched = await kube.merge_patch(path, {"spec": {"instances": 3}, "metadata": {"labels": {"a": None}}})
    assert patched["spec"]["instances"] == 3
    assert "a" not in patched["metadata"].get("labels", {})
    await kube.merge_patch(
        resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db", "one", "status"),
        {"status": {"phase": "Ready"}},
    )
    fetched = await kube.get(path)
    assert fetched["status"]["phase"] == "Ready"
    items = await kube.list(collection, label_selector={"x": "y", "a": "b"})
    assert [item["metadata"]["name"] for item in items] == ["one"]

    # The emulator does not filter by labels; the selector must at least reach the server.
    lists = [r for r in emulator[0] if r.method == "GET" and r.url.path == collection]
    assert lists[-1].url.query["labelSelector"] == "a=b,x=y"

    await kube.delete(path)
    with pytest.raises(NotFound) as missing:
        await kube.get(path)
    assert missing.value.status == 404 and missing.value.reason
    with pytest.raises(NotFound):
        await kube.delete(path)


async def test_unknown_resource_is_an_error(kube: KubeClient) -> None:
    with pytest.raises(KubeError) as error:
        await kube.list(resource_path("nothing.dev", "v1", "things"))
    assert error.value.status == 404


async def test_secret_round_trip_never_logs_values(
    kube: KubeClient, emulator: tuple[kmock.KubernetesEmulator, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await kube.apply_secret("db", "creds", {"username": "u", "password": "s3cret-value"}, labels={"k": "v"})
    assert await kube.get_secret("db", "creds") == {"username": "u", "password": "s3cret-value"}
    raw = await kube.get(core_path("secrets", "db", "creds"))
    assert raw["data"]["password"] == base64.b64encode(b"s3cret-value").decode()
    assert raw["metadata"]["labels"] == {"k": "v"}

    await kube.apply_secret("db", "creds", {"password": "other-value"})
    assert await kube.get_secret("db", "creds") == {"password": "other-value"}

    assert await kube.delete_secret("db", "creds") is True
    assert await kube.delete_secret("db", "creds") is False
    with pytest.raises(NotFound):
        await kube.get_secret("db", "creds")
    assert "s3cret-value" not in caplog.text and "other-value" not in caplog.text


async def test_unreachable_server_times_out_as_kube_error() -> None:
    # A port nothing listens on: the error names the call, not a traceback from httpx.
    async with KubeClient("http://127.0.0.1:9", timeout=1.0) as client:
        with pytest.raises(KubeError) as error:
            await client.get("/api/v1/namespaces")
    assert error.value.status in (503, 504)


async def test_from_kubeconfig(emulator: tuple[kmock.KubernetesEmulator, str], tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        f"""
apiVersion: v1
kind: Config
current-context: dev
contexts:
- name: dev
  context: {{cluster: local, user: admin}}
- name: other
  context: {{cluster: nowhere, user: admin}}
clusters:
- name: local
  cluster: {{server: "{emulator[1]}"}}
- name: nowhere
  cluster: {{server: "https://127.0.0.1:9", insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: abc}}
"""
    )
    async with KubeClient.from_kubeconfig(config) as client:
        assert client.server == emulator[1]
        await client.apply_secret("db", "x", {"k": "v"})
        assert await client.get_secret("db", "x") == {"k": "v"}
    requests = [r for r in emulator[0] if r.url.path.endswith("/secrets")]
    assert requests and requests[0].headers["Authorization"] == "Bearer abc"
    with pytest.raises(ValueError):
        KubeClient.from_kubeconfig(config, context="missing")


class Recording(httpx.AsyncBaseTransport):
    """Keeps what each request would put on the wire; answers 200, with a cookie if asked."""

    def __init__(self, cookie: bool) -> None:
        self.cookie = cookie
        self.sent: list[tuple[str, str, list[tuple[bytes, bytes]], bytes, dict[str, Any]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.sent.append((request.method, str(request.url), request.headers.raw, body, dict(request.extensions)))
        headers = {"Set-Cookie": "session=abc; Path=/"} if self.cookie else {}
        return httpx.Response(200, json={"kind": "Status"}, headers=headers)


@pytest.mark.parametrize("token", [None, "a-token"])
async def test_requests_are_what_httpx_builds(token: str | None) -> None:
    """KubeClient builds its requests from parts merged once; they are byte for byte the ones
    httpx's client.request(json=..., params=..., headers=...) builds, and no cookie is kept."""
    wire = Recording(cookie=True)
    calls: list[tuple[str, str, Any, dict[str, str] | None, str]] = [
        ("GET", "/api/v1/namespaces/x/secrets/a", None, None, "application/json"),
        ("GET", "/apis/g/v1/namespaces/x/things", None, {"labelSelector": "a=b,c=d"}, "application/json"),
        ("POST", "/apis/g/v1/namespaces/x/things", {"metadata": {"name": "é", "v": [1, 2.5, None]}}, None,
         "application/json"),
        ("PATCH", "/apis/g/v1/namespaces/x/things/n", {"metadata": {"labels": {"a": None}}}, None,
         "application/merge-patch+json"),
        ("DELETE", "/apis/g/v1/namespaces/x/things/n", None, None, "application/json"),
        ("DELETE", "/apis/g/v1/namespaces/x/things/n", {"propagationPolicy": "Foreground"}, None, "application/json"),
    ]  # fmt: skip
    async with KubeClient("http://127.0.0.1:6443/prefix", token=token, transport=wire) as kube:
        for method, path, body, params, content_type in calls:
            for _ in range(2):  # the second time from the cached URL and headers
                await kube._request(method, path, body=body, params=params, content_type=content_type)
    async with httpx.AsyncClient(
        base_url="http://127.0.0.1:6443/prefix",
        headers={"Accept": "application/json", "User-Agent": "pgbosh"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
        timeout=DEFAULT_TIMEOUT,
        transport=(reference := Recording(cookie=False)),
    ) as http:
        for method, path, body, params, content_type in calls:
            headers = {"Content-Type": content_type} if body is not None else {}
            await http.request(method, path, json=body, params=params, headers=headers)
    assert wire.sent[::2] == reference.sent
    assert wire.sent[1::2] == reference.sent
    # Given a cookie with every answer, KubeClient sends none back.
    assert all(b"cookie" not in dict(headers) for _, _, headers, _, _ in wire.sent)


@pytest.mark.parametrize(
    "body",
    [
        {"metadata": {"name": "é-ü", "labels": {"a": "b"}}, "spec": {"instances": 3, "ok": True, "ratio": 0.25}},
        {"metadata": {"labels": {"gone": None}}, "items": [1, "x", None]},  # nulls: the json module's bytes
        {"big": 2**70, "list": [[], {}]},  # beyond 64 bits: the json module's bytes
        ["ü\u2028", 1.5],
    ],
)
def test_bodies_are_the_bytes_httpx_json_sends(body: Any) -> None:
    assert client._json_body(body) == httpx.Request("POST", "http://x", json=body).content


async def test_no_nan_in_bodies(kube: KubeClient) -> None:
    with pytest.raises(ValueError):
        await kube.create(resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "db"), {"x": float("nan")})


async def test_calls_go_straight_to_a_given_transport() -> None:
    """With a transport (ours, or a test's), KubeClient hands requests to it itself:
    AsyncClient.send's auth, redirect, hook and cookie steps do nothing for it, and httpx
    applies no environment proxy to a given transport. Answers and errors are the same;
    backend="httpcore" (no transport: httpx's own, with proxies) keeps client.send."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/missing"):
            return httpx.Response(404, json={"kind": "Status", "reason": "NotFound", "message": "gone"})
        return httpx.Response(201, json={"metadata": {"name": "n"}, "echo": json.loads(request.content or b"{}")})

    transport = httpx.MockTransport(answer)
    async with KubeClient("http://127.0.0.1:6443", transport=transport) as kube:
        assert kube._direct is transport
        created = await kube.create("/api/v1/namespaces/x/things", {"a": 1})
        assert created == {"metadata": {"name": "n"}, "echo": {"a": 1}}
        with pytest.raises(NotFound) as missing:
            await kube.get("/api/v1/namespaces/x/things/missing")
        assert missing.value.status == 404 and "gone" in str(missing.value)
    async with KubeClient("http://127.0.0.1:6443", backend="httpcore") as kube:
        assert kube._direct is None
