"""Response shapes of the local Consul against Consul's own Go API client structs.

Field lists are taken from hashicorp/consul `api/catalog.go` (Node, CatalogService),
`api/health.go` (ServiceEntry, HealthCheck), `api/session.go` (SessionEntry) and
`api/kv.go` (KVPair); a Go client decodes exactly these names, so each must be present
with the JSON type the struct declares. py-consul passes the JSON through unchanged
(consul/callback.py CB.json), so the same names are what pgbosh code reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import consul
import httpx
import pytest

from controller.local.consul import ConsulServer, serve_in_thread

# api/catalog.go: type Node struct
NODE = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": dict,
    "Meta": dict,
    "CreateIndex": int,
    "ModifyIndex": int,
}
# api/catalog.go: type CatalogService struct (Checks and Namespace are not sent by a server without them)
CATALOG_SERVICE = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": dict,
    "NodeMeta": dict,
    "ServiceID": str,
    "ServiceName": str,
    "ServiceAddress": str,
    "ServiceTaggedAddresses": dict,
    "ServiceTags": list,
    "ServiceMeta": dict,
    "ServicePort": int,
    "ServiceWeights": dict,
    "ServiceEnableTagOverride": bool,
    "CreateIndex": int,
    "ModifyIndex": int,
}
# api/health.go: type HealthCheck struct
HEALTH_CHECK = {
    "Node": str,
    "CheckID": str,
    "Name": str,
    "Status": str,
    "Notes": str,
    "Output": str,
    "ServiceID": str,
    "ServiceName": str,
}
# api/agent.go: type AgentService struct (the fields without omitempty)
AGENT_SERVICE = {
    "ID": str,
    "Service": str,
    "Tags": list,
    "Meta": dict,
    "Port": int,
    "Address": str,
    "Weights": dict,
    "EnableTagOverride": bool,
}
# api/session.go: type SessionEntry struct
SESSION = {
    "CreateIndex": int,
    "ID": str,
    "Name": str,
    "Node": str,
    "Checks": list,
    "LockDelay": int,
    "Behavior": str,
    "TTL": str,
}
# api/kv.go: type KVPair struct (Session is omitempty on the server side)
KV_PAIR = {"Key": str, "CreateIndex": int, "ModifyIndex": int, "LockIndex": int, "Flags": int, "Value": str}


def assert_shape(obj: dict[str, Any], shape: dict[str, type]) -> None:
    for name, kind in shape.items():
        assert name in obj, f"missing {name}"
        assert isinstance(obj[name], kind), f"{name}: {type(obj[name]).__name__} is not {kind.__name__}"


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with serve_in_thread(http_port=0, dns_port=0) as srv:
        c = consul.Consul(port=srv.http_port)
        c.catalog.register(
            "ext",
            "127.0.0.90",
            service={"ID": "svc-1", "Service": "svc", "Tags": ["master"], "Port": 5432},
            check={"CheckID": "service:svc-1", "Status": "passing", "ServiceID": "svc-1"},
        )
        c.agent.service.register("agent-svc", service_id="a1", port=1, check=consul.Check.ttl("30s"))
        c.kv.put("k", "v")
        yield srv


def get(server: ConsulServer, path: str) -> Any:
    r = httpx.get(f"{server.http_addr}{path}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def test_catalog_shapes(server: ConsulServer) -> None:
    for node in get(server, "/v1/catalog/nodes"):
        assert_shape(node, NODE)
    (entry,) = get(server, "/v1/catalog/service/svc")
    assert_shape(entry, CATALOG_SERVICE)
    assert get(server, "/v1/catalog/services")["svc"] == ["master"]
    node = get(server, "/v1/catalog/node/ext")
    assert_shape(node["Node"], NODE)
    assert_shape(node["Services"]["svc-1"], AGENT_SERVICE)


def test_health_shapes(server: ConsulServer) -> None:
    (entry,) = get(server, "/v1/health/service/svc")
    assert set(entry) == {"Node", "Service", "Checks"}  # api/health.go: type ServiceEntry struct
    assert_shape(entry["Node"], NODE)
    assert_shape(entry["Service"], AGENT_SERVICE)
    for check in entry["Checks"]:
        assert_shape(check, HEALTH_CHECK)
    for check in get(server, "/v1/health/checks/agent-svc"):
        assert_shape(check, HEALTH_CHECK)
    for check in get(server, "/v1/health/state/any"):
        assert_shape(check, HEALTH_CHECK)


def test_agent_shapes(server: ConsulServer) -> None:
    assert_shape(get(server, "/v1/agent/services")["a1"], AGENT_SERVICE)
    assert_shape(get(server, "/v1/agent/checks")["service:a1"], HEALTH_CHECK)


def test_session_and_kv_shapes(server: ConsulServer) -> None:
    sid = httpx.put(f"{server.http_addr}/v1/session/create", json={"TTL": "15s"}).json()["ID"]
    (entry,) = get(server, f"/v1/session/info/{sid}")
    assert_shape(entry, SESSION)
    assert entry["Checks"] == ["serfHealth"]  # Consul's default session check
    (pair,) = get(server, "/v1/kv/k")
    assert_shape(pair, KV_PAIR)
    # every read carries X-Consul-Index (py-consul CB.json(index=True) raises without it)
    for path in (
        "/v1/kv/k",
        "/v1/kv/missing",
        "/v1/health/service/svc",
        "/v1/catalog/service/svc",
        "/v1/catalog/nodes",
        "/v1/catalog/services",
        f"/v1/session/info/{sid}",
    ):
        assert int(httpx.get(f"{server.http_addr}{path}").headers["X-Consul-Index"]) >= 1, path
