"""The local Consul's HTTP API against py-consul (sync and asyncio) and raw HTTP.

Expected shapes cite their source:
- py-consul 1.8 `consul/api/*.py` and `consul/callback.py` (what the client sends and
  parses; e.g. CB.json(index=True) raises without an X-Consul-Index header),
- Consul's HTTP API docs, developer.hashicorp.com/consul/api-docs/{agent,agent/service,
  agent/check,catalog,health,kv,session,status} (paths, codes, JSON field names).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import consul
import consul.aio
import httpx
import pytest

from controller.local.consul import ConsulServer, serve_in_thread

TOKEN = "s3cret-token-value"


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with serve_in_thread(http_port=0, dns_port=0, session_ttl_min=0.5) as srv:
        yield srv


@pytest.fixture
def c(server: ConsulServer) -> consul.Consul:
    return consul.Consul(port=server.http_port, connections_timeout=10)


def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_status_and_agent_self_shapes(c: consul.Consul) -> None:
    # api-docs/status: GET /v1/status/leader -> "ip:port" (a JSON string)
    assert c.status.leader() == "127.0.0.1:8300"
    assert c.status.peers() == ["127.0.0.1:8300"]
    # api-docs/agent#read-configuration: Config.Datacenter, Config.NodeName, Member.Name
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Member"]["Name"] == me["Config"]["NodeName"]


def test_agent_service_ttl_check_lifecycle(c: consul.Consul) -> None:
    # py-consul agent.py Agent.Service.register sends lowercase keys and "checks": [check];
    # Consul decodes keys case-insensitively (api-docs/agent/service#register-service).
    assert c.agent.service.register(
        "pg-a",
        service_id="pg-a-1",
        address="127.0.0.11",
        port=5432,
        tags=["master"],
        check=consul.Check.ttl("30s"),
    )
    services = c.agent.services()
    # api-docs/agent/service#list-services: map ID -> {ID, Service, Tags, Address, Port, Meta, Weights...}
    assert services["pg-a-1"]["Service"] == "pg-a"
    assert services["pg-a-1"]["Tags"] == ["master"]
    assert services["pg-a-1"]["Port"] == 5432
    assert services["pg-a-1"]["Weights"] == {"Passing": 1, "Warning": 1}
    checks = c.agent.checks()
    # api-docs/agent/check: the default ID of a service's check is "service:<id>"; TTL checks start critical
    assert checks["service:pg-a-1"]["Status"] == "critical"
    assert checks["service:pg-a-1"]["ServiceID"] == "pg-a-1"
    assert checks["service:pg-a-1"]["Type"] == "ttl"
    _, passing = c.health.service("pg-a", passing=True)
    assert passing == []

    assert c.agent.check.ttl_pass("service:pg-a-1", notes="ok")
    _, passing = c.health.service("pg-a", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["pg-a-1"]
    assert c.agent.checks()["service:pg-a-1"]["Output"] == "ok"
    assert c.agent.check.ttl_warn("service:pg-a-1")
    assert c.health.service("pg-a", passing=True)[1] == []  # ?passing leaves warning out
    assert c.agent.check.ttl_fail("service:pg-a-1")
    assert c.agent.checks()["service:pg-a-1"]["Status"] == "critical"
    # PUT /v1/agent/check/update/:id {"Status","Output"} (api-docs/agent/check#ttl-check-update)
    r = httpx.put(f"{c.http.base_uri}/v1/agent/check/update/service:pg-a-1", json={"Status": "passing", "Output": "up"})
    assert r.status_code == 200
    assert c.agent.checks()["service:pg-a-1"]["Status"] == "passing"
    # unknown check: 404 (py-consul's CB.boolean returns False on 404)
    assert c.agent.check.ttl_pass("nope") is False

    assert c.agent.service.deregister("pg-a-1")
    assert "pg-a-1" not in c.agent.services()
    assert "service:pg-a-1" not in c.agent.checks()
    assert c.agent.service.deregister("pg-a-1") is False


def test_replace_existing_checks(c: consul.Consul) -> None:
    body = {
        "ID": "s1",
        "Name": "svc",
        "Checks": [
            {"CheckID": "one", "TTL": "30s"},
            {"CheckID": "two", "TTL": "30s"},
        ],
    }
    base = c.http.base_uri
    assert httpx.put(f"{base}/v1/agent/service/register", json=body).status_code == 200
    assert {"one", "two"} <= set(c.agent.checks())
    body["Checks"] = [{"CheckID": "one", "TTL": "30s"}]
    httpx.put(f"{base}/v1/agent/service/register", json=body)
    assert "two" in c.agent.checks()  # without the flag Consul keeps old checks
    httpx.put(f"{base}/v1/agent/service/register?replace-existing-checks=true", json=body)
    assert "two" not in c.agent.checks()
    assert "one" in c.agent.checks()


def test_ttl_expiry_goes_critical_and_deregister_critical_after(c: consul.Consul) -> None:
    check = {"TTL": "1s", "DeregisterCriticalServiceAfter": "1500ms"}
    assert c.agent.service.register("pg-b", service_id="pg-b-1", address="127.0.0.12", port=5432, check=check)
    assert c.agent.check.ttl_pass("service:pg-b-1")
    assert len(c.health.service("pg-b", passing=True)[1]) == 1
    wait_until(lambda: c.agent.checks()["service:pg-b-1"]["Status"] == "critical", timeout=3)
    assert "TTL expired" in c.agent.checks()["service:pg-b-1"]["Output"]
    assert c.health.service("pg-b", passing=True)[1] == []
    assert len(c.health.service("pg-b")[1]) == 1  # still registered, just critical
    wait_until(lambda: "pg-b-1" not in c.agent.services(), timeout=4)
    assert c.health.service("pg-b")[1] == []


def test_catalog_external_node_shapes(c: consul.Consul) -> None:
    base = c.http.base_uri
    body = {
        "Node": "pg-x",
        "Address": "127.0.0.20",
        "NodeMeta": {"external-node": "true"},
        "Service": {"ID": "pg-x-master", "Service": "pg-x", "Tags": ["master"], "Address": "127.0.0.21", "Port": 5433},
        "Check": {"CheckID": "service:pg-x-master", "Status": "passing", "ServiceID": "pg-x-master"},
    }
    # api-docs/catalog#register-entity returns `true`
    r = httpx.put(f"{base}/v1/catalog/register", json=body)
    assert (r.status_code, r.json()) == (200, True)
    # py-consul catalog.py Catalog.register: lowercase node/address/service keys; SkipNodeUpdate
    # keeps the node's NodeMeta (without it Consul rewrites the node from this request)
    replica = {"service": "pg-x", "id": "pg-x-r1", "tags": ["replica"], "address": "127.0.0.22", "port": 5432}
    assert c.catalog.register("pg-x", "127.0.0.20", service=replica, skip_node_update=True)
    _, services = c.catalog.services()
    assert services["pg-x"] == ["master", "replica"]  # api-docs/catalog#list-services: name -> tags
    index, entries = c.catalog.service("pg-x", tag="master")
    assert int(index) > 0
    (entry,) = entries
    # api-docs/catalog#list-nodes-for-service sample response fields
    for key in (
        "ID",
        "Node",
        "Address",
        "Datacenter",
        "TaggedAddresses",
        "NodeMeta",
        "ServiceID",
        "ServiceName",
        "ServiceTags",
        "ServiceAddress",
        "ServicePort",
        "ServiceMeta",
        "ServiceWeights",
        "ServiceEnableTagOverride",
        "CreateIndex",
        "ModifyIndex",
    ):
        assert key in entry, key
    assert (entry["Node"], entry["ServiceAddress"], entry["ServicePort"]) == ("pg-x", "127.0.0.21", 5433)
    assert entry["NodeMeta"] == {"external-node": "true"}
    _, nodes = c.catalog.nodes()
    assert {"pg-x", "pgbosh-local"} <= {n["Node"] for n in nodes}
    # api-docs/health#list-service-instances: [{Node, Service, Checks}]
    _, healthy = c.health.service("pg-x", passing=True)
    # an instance without checks counts as passing (api-docs/health, "passing" filter)
    assert [e["Service"]["ID"] for e in healthy] == ["pg-x-master", "pg-x-r1"]
    assert set(healthy[0]) == {"Node", "Service", "Checks"}
    _, checks = c.health.checks("pg-x")
    assert [ch["CheckID"] for ch in checks] == ["service:pg-x-master"]
    # catalog deregister of one service, then of the whole node
    assert c.catalog.deregister("pg-x", service_id="pg-x-r1")
    assert [e["ServiceID"] for e in c.catalog.service("pg-x")[1]] == ["pg-x-master"]
    assert c.catalog.deregister("pg-x")
    assert c.catalog.service("pg-x")[1] == []
    assert "pg-x" not in {n["Node"] for n in c.catalog.nodes()[1]}


def test_blocking_query_on_health_service(c: consul.Consul, server: ConsulServer) -> None:
    c.catalog.register("pg-w", "127.0.0.30", service={"Service": "pg-w", "ID": "w1", "Port": 1})
    index, _ = c.health.service("pg-w")
    started = time.monotonic()
    index2, _ = c.health.service("pg-w", index=index, wait="300ms")
    assert index2 == index
    assert 0.25 < time.monotonic() - started < 3
    # a change wakes the query early, with a higher X-Consul-Index
    writer = consul.Consul(port=server.http_port)
    import threading

    timer = threading.Timer(
        0.3, lambda: writer.catalog.register("pg-w", "127.0.0.30", service={"Service": "pg-w", "ID": "w1", "Port": 2})
    )
    timer.start()
    started = time.monotonic()
    index3, entries = c.health.service("pg-w", index=index, wait="10s")
    timer.join()
    assert time.monotonic() - started < 5
    assert int(index3) > int(index)
    assert entries[0]["Service"]["Port"] == 2


def test_errors_look_like_consul(server: ConsulServer) -> None:
    base = server.http_addr
    r = httpx.get(f"{base}/v1/nope")
    assert (r.status_code, r.text) == (404, "404 page not found\n")
    r = httpx.put(f"{base}/v1/agent/service/register", content=b"{not json")
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed")
    assert r.headers["content-type"].startswith("text/plain")
    r = httpx.put(f"{base}/v1/catalog/register", content=b"[1]")
    assert r.status_code == 400
    # a check naming a service that does not exist: refused, and nothing of the request is applied
    bad = {"Node": "half", "Address": "127.0.0.99", "Check": {"CheckID": "c", "ServiceID": "ghost"}}
    r = httpx.put(f"{base}/v1/catalog/register", json=bad)
    assert r.status_code == 400
    assert "half" not in {n["Node"] for n in httpx.get(f"{base}/v1/catalog/nodes").json()}
    r = httpx.put(f"{base}/v1/catalog/register", json={"Node": "no-address"})
    assert (r.status_code, r.text) == (400, "Must provide address")
    # unknown service on deregister: 404 with Consul's hint (agent/agent_endpoint.go)
    r = httpx.put(f"{base}/v1/agent/service/deregister/ghost")
    assert r.status_code == 404
    assert "Unknown service ID" in r.text
    r = httpx.get(f"{base}/v1/agent/services", params={"dc": "other"})
    assert r.status_code == 200  # agent endpoints ignore dc
    r = httpx.get(f"{base}/v1/catalog/services", params={"dc": "other"})
    assert (r.status_code, r.text) == (500, "No path to datacenter")


def test_acl_token_enforced() -> None:
    """Default-deny ACLs as Consul applies them (api-docs/api-structure#authentication, acl docs)."""
    with serve_in_thread(http_port=0, dns_port=0, token=TOKEN) as server:
        base = server.http_addr
        # status endpoints need no ACL (api-docs/status)
        assert httpx.get(f"{base}/v1/status/leader").status_code == 200
        # an unknown secret is refused everywhere
        wrong = httpx.get(f"{base}/v1/agent/services", headers={"X-Consul-Token": "nope"})
        assert (wrong.status_code, wrong.text) == (403, "ACL not found")
        # the anonymous token: writes and single reads refused, list reads filtered to nothing
        anon_put = httpx.put(f"{base}/v1/kv/k", content=b"v")
        assert anon_put.status_code == 403
        assert anon_put.text == (
            "Permission denied: token with AccessorID '00000000-0000-0000-0000-000000000002' "
            "lacks permission 'key:write' on \"k\""
        )
        assert httpx.get(f"{base}/v1/agent/self").status_code == 403
        good = consul.Consul(port=server.http_port, token=TOKEN)
        assert good.catalog.register("n1", "127.0.0.40", service={"Service": "s1"})
        anon_list = httpx.get(f"{base}/v1/health/service/s1")
        assert (anon_list.status_code, anon_list.json()) == (200, [])
        assert anon_list.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        assert httpx.get(f"{base}/v1/agent/services").json() == {}
        # the right token, as header or ?token=
        assert len(httpx.get(f"{base}/v1/health/service/s1", headers={"X-Consul-Token": TOKEN}).json()) == 1
        assert len(httpx.get(f"{base}/v1/health/service/s1", params={"token": TOKEN}).json()) == 1
        # py-consul raises ACLPermissionDenied on 403 (consul/callback.py CB._status)
        with pytest.raises(consul.ACLPermissionDenied):
            consul.Consul(port=server.http_port, token="nope").kv.put("k", "v")
        with pytest.raises(consul.ACLPermissionDenied):
            consul.Consul(port=server.http_port).kv.put("k", "v")
        assert good.kv.put("k", "v") is True
        # catalog register may carry the token in the body's WriteRequest (py-consul catalog.py)
        r = httpx.put(
            f"{base}/v1/catalog/register",
            json={"Node": "n2", "Address": "127.0.0.41", "WriteRequest": {"Token": TOKEN}},
        )
        assert r.status_code == 200
        r = httpx.put(f"{base}/v1/catalog/register", json={"Node": "n3", "Address": "127.0.0.42"})
        assert r.status_code == 403 and "'node:write' on \"n3\"" in r.text
        # unknown routes stay 404 whatever the token
        assert httpx.get(f"{base}/v1/nope").status_code == 404


async def test_async_client_against_in_loop_server() -> None:
    async with ConsulServer(http_port=0, dns_port=0) as server:
        c = consul.aio.Consul(port=server.http_port)
        try:
            assert await c.kv.put("a/one", "1")
            _index, entry = await c.kv.get("a/one")
            assert entry["Value"] == b"1"
            assert await c.agent.service.register("svc", service_id="svc1", port=1)
            _, nodes = await c.health.service("svc")
            assert nodes[0]["Service"]["ID"] == "svc1"
        finally:
            await c.close()


def test_state_file_survives_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = str(tmp_path / "consul.json")
    with serve_in_thread(http_port=0, dns_port=0, state_file=state) as server:
        c = consul.Consul(port=server.http_port)
        c.catalog.register(
            "pg-p", "127.0.0.50", service={"Service": "pg-p", "ID": "pg-p-master", "Tags": ["master"], "Port": 5432}
        )
        c.kv.put("cfg/x", "kept")
    with serve_in_thread(http_port=0, dns_port=0, state_file=state) as server:
        c = consul.Consul(port=server.http_port)
        assert [e["ServiceID"] for e in c.catalog.service("pg-p")[1]] == ["pg-p-master"]
        assert c.kv.get("cfg/x")[1]["Value"] == b"kept"
