"""The local Kubernetes API's own shortcuts behave as kmock and the API server do:
routing straight to the emulator's handlers (and back to kmock's routing once a test adds
reactions), keyed object lookup, and validation ratcheting on updates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import kmock
import pytest

from controller.api import models
from controller.kube.client import Invalid, KubeClient, NotFound, resource_path
from controller.local.kube import PGC_RESOURCE, LocalKubernetes

PATH = resource_path(models.GROUP, models.VERSION, models.PLURAL, "default")


def cluster(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": f"{models.GROUP}/{models.VERSION}",
        "kind": models.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"instances": 3, "storage": {"size": "1Gi"}, **spec},
    }


async def test_reads_and_writes_find_the_object_by_its_key(kube_api, kube: KubeClient) -> None:
    for i in range(30):
        await kube.create(PATH, cluster(f"c{i:02d}"))
    got = await kube.get(f"{PATH}/c17")
    assert got["metadata"]["name"] == "c17" and got["spec"]["instances"] == 3
    patched = await kube.merge_patch(f"{PATH}/c17", {"spec": {"instances": 5}})
    assert patched["spec"]["instances"] == 5 and patched["metadata"]["generation"] == 2
    status = await kube.merge_patch(f"{PATH}/c17/status", {"status": {"phase": "Ready"}})
    assert status["status"]["phase"] == "Ready" and status["spec"]["instances"] == 5
    with pytest.raises(NotFound):
        await kube.get(f"{PATH}/nope")
    with pytest.raises(NotFound):
        await kube.get("/api/v1/namespaces/default/secrets/nope")
    with pytest.raises(NotFound):
        await kube.get(f"{PATH}/c17".replace("/default/", "/kube-system/"))
    deleted = await kube.delete(f"{PATH}/c17")
    assert deleted["metadata"]["name"] == "c17"
    with pytest.raises(NotFound):
        await kube.get(f"{PATH}/c17")
    assert len(await kube.list(PATH)) == 29
    # Discovery still goes to kmock's discovery routes.
    assert (await kube.get("/apis/coordination.k8s.io/v1"))["groupVersion"] == "coordination.k8s.io/v1"


async def test_a_reaction_added_by_a_test_still_wins(kube_api, kube: KubeClient) -> None:
    api: LocalKubernetes = kube_api[0]
    await kube.create(PATH, cluster("shadowed"))
    api["get"][kmock.resource(PGC_RESOURCE)] << {"metadata": {"name": "from-a-reaction"}}
    assert (await kube.get(f"{PATH}/shadowed"))["metadata"]["name"] == "from-a-reaction"


async def test_updates_ratchet_rules_on_unchanged_values(kube_api, kube: KubeClient) -> None:
    """KEP-4008: an object stored before a rule existed (here: seeded past admission) can
    still get metadata changes; changing the offending value is refused."""
    api: LocalKubernetes = kube_api[0]
    await kube.create(PATH, cluster("legacy"))
    stored = api.objects[kmock.resource(PGC_RESOURCE), "default", "legacy"]
    stored.patch({"spec": {"instances": 1, "replication": {"mode": "sync", "syncStandbys": 1}}})
    patched = await kube.merge_patch(f"{PATH}/legacy", {"metadata": {"labels": {"team": "a"}}})
    assert patched["metadata"]["labels"] == {"team": "a"}
    with pytest.raises(Invalid, match="sync"):
        await kube.merge_patch(f"{PATH}/legacy", {"spec": {"replication": {"syncStandbys": 2}}})
    assert (await kube.get(f"{PATH}/legacy"))["spec"]["replication"]["syncStandbys"] == 1


async def test_a_create_answers_201_and_a_refused_one_changes_nothing(kube_api) -> None:
    """As the API server: 201 Created for a new object (kubectl and client-go expect it), 409
    for a name in use, 422 for a refused object, and the refused body is not stored."""
    import httpx

    url = kube_api[1]
    async with httpx.AsyncClient(base_url=url) as http:
        created = await http.post(PATH, json=cluster("fresh"))
        assert created.status_code == 201, created.text
        assert created.json()["metadata"]["generation"] == 1
        again = await http.post(PATH, json=cluster("fresh"))
        assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"
        refused = await http.post(PATH, json=cluster("bad", instances=0))
        assert refused.status_code == 422 and "spec.instances" in refused.json()["message"]
        assert (await http.get(f"{PATH}/bad")).status_code == 404
        secret = {"metadata": {"name": "s1"}, "stringData": {"password": "x"}}
        assert (await http.post("/api/v1/namespaces/default/secrets", json=secret)).status_code == 201


async def test_missing_and_existing_objects_get_the_api_servers_status(kube_api) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=kube_api[1]) as http:
        missing = await http.get(f"{PATH}/nope")
        assert missing.status_code == 404
        assert missing.json() == {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "code": 404,
            "status": "Failure",
            "reason": "NotFound",
            "message": 'postgresclusters.pgbosh.dev "nope" not found',
            "details": {"name": "nope", "group": "pgbosh.dev", "kind": "postgresclusters"},
        }
        gone = await http.delete("/api/v1/namespaces/default/secrets/nope")
        assert gone.status_code == 404 and gone.json()["message"] == 'secrets "nope" not found'


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("POST", PATH, b'{"metadata": {"name": "a"}}', {"Content-Type": "application/json"}),
        ("GET", f"{PATH}/a?resourceVersion=0", b"", {}),
        ("PATCH", f"{PATH}/a/status", b'{"status": {}}', {"Content-Type": "application/merge-patch+json"}),
        ("DELETE", "/api/v1/namespaces/default/secrets/s", b"", {"Cookie": "c=1"}),
        ("GET", f"{PATH}?watch=true&labelSelector=a%3Db", b"", {}),
        ("GET", "/apis", b"", {}),
        ("GET", "/version", b"", {}),
        ("POST", "/form", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("POST", PATH, b"not json", {"Content-Type": "application/json"}),
    ],
)
async def test_requests_are_parsed_as_kmock_parses_them(method, path, body, headers) -> None:
    """The local API parses requests itself (a cached resource per spelling); the model must
    be the one kmock builds."""
    from aiohttp.test_utils import make_mocked_request
    from kmock._internal import rendering

    from controller.local.kube import _parse_request

    def raw():  # each parse reads the body once, as on the wire
        request = make_mocked_request(method, path, headers={**headers, "Content-Length": str(len(body))})
        request._read_bytes = body
        return request

    ours = await _parse_request(raw(), id=7)
    theirs = await rendering.Request._parse(raw(), id=7)
    fields = ("id", "method", "url", "params", "headers", "cookies", "body", "text", "data")
    fields += ("action", "resource", "namespace", "name", "subresource")
    for field in fields:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert (await _parse_request(raw(), id=8)).resource is ours.resource  # looked up, not built again


@pytest.mark.parametrize("forget", [True, False])
async def test_a_long_running_api_does_not_keep_refusals(forget: bool) -> None:
    """kmock keeps every error it answered for tests' assertions; `pgbosh dev` and the
    benchmarks (forget_served_requests) would grow without bound, so they keep none."""
    from controller.local.kube import serve

    async with serve(forget_served_requests=forget) as (api, url), KubeClient(url) as client:
        for _ in range(5):
            with pytest.raises(NotFound):
                await client.get(f"{PATH}/nope")
        assert len(api.errors) == (0 if forget else 5)
        assert len(api._requests) == (0 if forget else 5)


@pytest.mark.parametrize("forget", [True, False])
async def test_a_long_running_api_keeps_only_current_versions(forget: bool) -> None:
    """kmock keeps a deep copy of every version of every object; a long-running API
    (forget_served_requests) keeps the current one, and a deleted object's last version
    and deletion mark, so status writes every resync do not grow it."""
    from controller.local.kube import _PGC, serve

    async with serve(forget_served_requests=forget) as (api, url), KubeClient(url) as client:
        await client.create(PATH, cluster("kept"))
        for n in range(20):
            await client.merge_patch(f"{PATH}/kept/status", {"status": {"readyInstances": n % 4}})
        await client.merge_patch(f"{PATH}/kept", {"spec": {"instances": 5}})
        history = api.objects[_PGC, "default", "kept"].history
        assert len(history) == (1 if forget else 22)
        got = await client.get(f"{PATH}/kept")
        assert got["spec"]["instances"] == 5 and got["status"]["readyInstances"] == 3
        assert got["metadata"]["generation"] == 2
        await client.create(PATH, cluster("gone"))
        await client.merge_patch(f"{PATH}/gone/status", {"status": {"readyInstances": 1}})
        await client.delete(f"{PATH}/gone")
        history = api.objects[_PGC, "default", "gone"].history
        assert len(history) == (2 if forget else 3) and history[-1] is None
        with pytest.raises(NotFound):
            await client.get(f"{PATH}/gone")
        await client.create(PATH, cluster("gone"))  # a name can be used again
        assert (await client.get(f"{PATH}/gone"))["metadata"]["generation"] == 1


async def test_a_body_that_is_not_text_gets_400_and_changes_nothing(kube_api) -> None:
    """As the API server: 400 BadRequest (it cannot be JSON), not an internal error."""
    import httpx

    async with httpx.AsyncClient(base_url=kube_api[1]) as http:
        answer = await http.post(PATH, content=b"\xff\xfe\xfa", headers={"Content-Type": "application/json"})
        assert answer.status_code == 400
        assert answer.json() == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 400,
            "reason": "BadRequest", "message": "the body of the request is not UTF-8 text",
        }  # fmt: skip
        listed = await http.get(PATH)  # and the API goes on, with nothing stored
        assert listed.status_code == 200 and listed.json()["items"] == []


@pytest.mark.parametrize(("metadata", "kind"), [("orders", "string"), (["a"], "array"), (5, "number")])
async def test_metadata_that_is_not_an_object_gets_400_and_changes_nothing(kube_api, metadata, kind) -> None:
    """Not an internal error with a traceback: 400 Bad Request that says what to fix, for a
    create and a patch, of our resource and of a core one; nothing is stored or changed."""
    import httpx

    async with httpx.AsyncClient(base_url=kube_api[1]) as http:
        for path, body in [
            (PATH, {**cluster("x"), "metadata": metadata}),
            ("/api/v1/namespaces/default/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}),
        ]:
            refused = await http.post(path, json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["reason"] == "BadRequest"
            assert refused.json()["message"] == f"metadata must be an object (name, labels, ...), not a JSON {kind}"
            assert "traceback" not in refused.text
            assert (await http.get(path)).json()["items"] == []
        assert (await http.post(PATH, json=cluster("kept"))).status_code == 201
        patched = await http.patch(
            f"{PATH}/kept", json={"metadata": metadata}, headers={"Content-Type": "application/merge-patch+json"}
        )
        assert patched.status_code == 400, patched.text
        kept = (await http.get(f"{PATH}/kept")).json()
        assert kept["metadata"]["name"] == "kept" and kept["metadata"]["generation"] == 1


async def _answer(reader, writer, request: bytes) -> tuple[int, dict[str, str], bytes]:  # type: ignore[no-untyped-def]
    import asyncio

    writer.write(request)
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(head[0][9:12]), headers, body


async def test_the_front_answers_calls_and_hands_a_watch_to_kmock_on_the_same_connection(kube_api) -> None:
    """One keep-alive connection, as a client pool reuses it: creates and gets are answered by
    the API's front (the broker's HTTP server), a watch is handed with the connection to
    kmock's server and streams events, and a test's own reaction is kmock's too."""
    import asyncio
    import json
    from urllib.parse import urlsplit

    api: LocalKubernetes = kube_api[0]
    address = urlsplit(kube_api[1])
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    body = json.dumps(cluster("fronted")).encode()
    create = (
        f"POST {PATH} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, headers, answer = await _answer(reader, writer, create)
    assert status == 201 and headers["server"] == "pgbosh"
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer)["metadata"]["generation"] == 1
    status, headers, answer = await _answer(reader, writer, f"GET {PATH}/fronted HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200 and headers["server"] == "pgbosh" and json.loads(answer)["metadata"]["name"] == "fronted"
    status, headers, answer = await _answer(reader, writer, f"GET {PATH}/absent HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 404 and json.loads(answer)["reason"] == "NotFound"

    writer.write(f"GET {PATH}?watch=true HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    assert head.startswith("HTTP/1.1 200") and "aiohttp" in head  # kmock's server streams it
    assert "transfer-encoding: chunked" in head.lower()

    async def next_event() -> dict[str, object]:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
        chunk = await asyncio.wait_for(reader.readexactly(size + 2), 5)
        return json.loads(chunk.splitlines()[0])  # type: ignore[no-any-return]

    first = await next_event()
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "fronted"  # type: ignore[index]
    async with KubeClient(kube_api[1]) as other:  # a write on another connection, seen by the watch
        await other.merge_patch(f"{PATH}/fronted", {"metadata": {"labels": {"seen": "yes"}}})
    modified = await next_event()
    assert modified["type"] == "MODIFIED"
    assert modified["object"]["metadata"]["labels"] == {"seen": "yes"}  # type: ignore[index]
    writer.close()

    # A test's own reaction: kmock decides, on a connection the front handed over.
    api["get"][kmock.resource(PGC_RESOURCE)] << {"metadata": {"name": "from-a-reaction"}}
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    status, headers, answer = await _answer(reader, writer, f"GET {PATH}/fronted HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200 and "aiohttp" in headers["server"]
    assert json.loads(answer)["metadata"]["name"] == "from-a-reaction"
    writer.close()


async def _watch(
    url: str, params: dict[str, str], count: int, then: Callable[[], Awaitable[object]] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """A raw watch on the clusters: the stream's type and its first ``count`` events. ``then``
    runs once the stream is open (a replay comes before what it changes)."""
    import httpx

    seen: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        async with http.stream("GET", PATH, params={"watch": "true", **params}) as stream:
            if then is not None:
                await then()

            async def read() -> None:
                async for line in stream.aiter_lines():
                    if line.strip():
                        seen.append(json.loads(line))
                        if len(seen) == count:
                            return

            await asyncio.wait_for(read(), 20)
            return stream.headers["content-type"], seen


def _named(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(event["type"], event["object"]["metadata"]["name"]) for event in events]


async def test_a_watch_from_a_resource_version_leaves_out_what_did_not_change_since(kube_api, kube) -> None:
    """As the API server: a watch from the list's resourceVersion sends only what changed after
    it; without one (or from "0") it starts with every object as ADDED. Streams are JSON."""
    await kube.create(PATH, cluster("old"))
    await kube.create(PATH, cluster("older"))
    listed = await kube.get(PATH)
    version = listed["metadata"]["resourceVersion"]

    def change() -> Awaitable[object]:
        return kube.merge_patch(f"{PATH}/older", {"metadata": {"labels": {"changed": "yes"}}})

    content_type, seen = await _watch(kube_api[1], {"resourceVersion": version}, 1, then=change)
    assert content_type == "application/json" and _named(seen) == [("MODIFIED", "older")]  # no replay before it
    for params in ({}, {"resourceVersion": "0"}):
        _, seen = await _watch(kube_api[1], params, 2)
        assert sorted(_named(seen)) == [("ADDED", "old"), ("ADDED", "older")]


async def test_a_watch_from_a_resource_version_replays_changes_and_deletions_since_as_their_events(
    kube_api, kube
) -> None:
    """What changed between a client's list and its watch comes as the API server sends it:
    an object changed since as MODIFIED, one created since as ADDED, one deleted since as
    DELETED (also when finalizers held it, and when its name was taken again: the old uid's
    DELETED, then the new one's ADDED), with versions after the list's. Before, kmock's replay
    sent every changed object as ADDED and none deleted, so an informer (kopf) that listed,
    then watched, never learnt of a deletion in between."""
    for name in ("same", "changed", "gone", "reborn", "held"):
        await kube.create(PATH, cluster(name))
    await kube.merge_patch(f"{PATH}/held", {"metadata": {"finalizers": ["pgbosh.dev/test"]}})
    version = (await kube.get(PATH))["metadata"]["resourceVersion"]
    old_uid = (await kube.get(f"{PATH}/reborn"))["metadata"]["uid"]

    await kube.merge_patch(f"{PATH}/changed", {"spec": {"instances": 5}})
    await kube.delete(f"{PATH}/gone")
    await kube.delete(f"{PATH}/reborn")
    await kube.create(PATH, cluster("reborn"))
    await kube.create(PATH, cluster("new"))
    await kube.delete(f"{PATH}/held")  # deletionTimestamp set; the finalizer keeps it
    await kube.merge_patch(f"{PATH}/held", {"metadata": {"finalizers": None}})
    with pytest.raises(NotFound):
        await kube.get(f"{PATH}/held")

    def live_change() -> Awaitable[object]:
        return kube.merge_patch(f"{PATH}/same", {"metadata": {"labels": {"late": "yes"}}})

    _, seen = await _watch(kube_api[1], {"resourceVersion": version}, 7, then=live_change)
    replay, live = seen[:6], seen[6:]
    assert sorted(_named(replay)) == [
        ("ADDED", "new"),
        ("ADDED", "reborn"),
        ("DELETED", "gone"),
        ("DELETED", "held"),
        ("DELETED", "reborn"),
        ("MODIFIED", "changed"),
    ]
    reborn = [(e["type"], e["object"]["metadata"]["uid"]) for e in replay if _named([e])[0][1] == "reborn"]
    assert reborn[0] == ("DELETED", old_uid) and reborn[1][0] == "ADDED" and reborn[1][1] != old_uid
    assert all(int(e["object"]["metadata"]["resourceVersion"]) > int(version) for e in replay)
    assert _named(live) == [("MODIFIED", "same")]


async def test_a_watch_sends_only_objects_its_selectors_choose(kube_api, kube) -> None:
    """`kubectl get pgc -l tier=db -w`: label and field selectors apply to the watch's replay
    and to what follows, as they do to lists (before, a watch streamed every object)."""
    await kube.create(PATH, {**cluster("chosen"), "metadata": {"name": "chosen", "labels": {"tier": "db"}}})
    await kube.create(PATH, cluster("other"))

    async def changes() -> None:
        await kube.merge_patch(f"{PATH}/other", {"spec": {"instances": 5}})
        await kube.merge_patch(f"{PATH}/chosen", {"spec": {"instances": 5}})

    _, seen = await _watch(kube_api[1], {"labelSelector": "tier=db"}, 2, then=changes)
    assert _named(seen) == [("ADDED", "chosen"), ("MODIFIED", "chosen")]
    _, seen = await _watch(kube_api[1], {"fieldSelector": "metadata.name=other"}, 1)
    assert _named(seen) == [("ADDED", "other")]


async def test_a_watch_from_a_version_older_than_the_deletions_kept_gets_410_expired(
    kube_api, kube, monkeypatch
) -> None:
    """The API server answers a watch from a compacted resourceVersion with an ERROR event,
    410 Expired ("too old resource version"), and clients list again. The local API keeps the
    last MAX_DELETIONS deletions; a watch from before the oldest one it forgot gets that."""
    from controller.local import kube as local_kube

    monkeypatch.setattr(local_kube, "MAX_DELETIONS", 1)
    await kube.create(PATH, cluster("first"))
    await kube.create(PATH, cluster("second"))
    before = (await kube.get(PATH))["metadata"]["resourceVersion"]
    await kube.delete(f"{PATH}/first")
    await kube.delete(f"{PATH}/second")  # the first deletion is forgotten
    _, seen = await _watch(kube_api[1], {"resourceVersion": before}, 1)
    assert seen[0]["type"] == "ERROR"
    status = seen[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith(f"too old resource version: {before}")
    after = (await kube.get(PATH))["metadata"]["resourceVersion"]

    def create() -> Awaitable[object]:
        return kube.create(PATH, cluster("third"))

    _, seen = await _watch(kube_api[1], {"resourceVersion": after}, 1, then=create)
    assert _named(seen) == [("ADDED", "third")]
