"""Protocol hygiene: auth, API version, identities, catalog, error bodies."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import httpx
import pytest

from controller.broker.server import BasicCredentials

from .conftest import CREDENTIALS, PLANS, SERVICE, World, identity_header

INSTANCE = "proto-instance-1"


async def test_catalog(world: World) -> None:
    response = await world.http.get("/v2/catalog")
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert service["name"] == "postgresql" and service["bindable"] is True
    assert service["instances_retrievable"] is True and service["bindings_retrievable"] is True
    plans = {p["name"]: p for p in service["plans"]}
    assert set(plans) == {"small-single", "small-ha", "medium-ha-sync"}
    assert plans["small-ha"]["metadata"]["cluster"]["instances"] == 3
    assert plans["medium-ha-sync"]["metadata"]["cluster"]["replication"]["mode"] == "sync"
    assert plans["small-single"]["plan_updateable"] is True
    assert plans["small-single"]["maintenance_info"] == {"version": "1.0.0", "description": "pgbosh 0.1"}
    create = plans["small-single"]["schemas"]["service_instance"]["create"]["parameters"]
    assert create["properties"]["postgresVersion"]["enum"] == [14, 15, 16, 17]
    assert plans["small-single"]["schemas"]["service_instance"]["update"]["parameters"] == create


@pytest.mark.parametrize("version", [None, "2.11", "2.18", "3.0", "two"])
async def test_unsupported_api_version_is_412(world: World, version: str | None) -> None:
    headers = {"X-Broker-API-Version": version} if version else {}
    async with httpx.AsyncClient(base_url=world.server.url, auth=(CREDENTIALS.username, CREDENTIALS.password)) as http:
        response = await http.put(
            f"/v2/service_instances/{INSTANCE}",
            params={"accepts_incomplete": "true"},
            json=world.provision_body(),
            headers=headers,
        )
    assert response.status_code == 412
    assert response.json()["error"] == "PreconditionFailed"
    assert "X-Broker-API-Version must be 2.13 to 2.17" in response.json()["description"]
    assert await world.clusters() == []


@pytest.mark.parametrize(
    "auth",
    [None, ("broker", "wrong"), ("other", CREDENTIALS.password), ("broker", CREDENTIALS.password + "x"), "garbage"],
)
async def test_bad_credentials_are_401(world: World, auth: object) -> None:
    headers = {"X-Broker-API-Version": "2.17"}
    kwargs: dict[str, object] = {}
    if isinstance(auth, tuple):
        kwargs["auth"] = auth
    elif auth == "garbage":
        headers["Authorization"] = "Basic !!!notbase64"
    async with httpx.AsyncClient(base_url=world.server.url, **kwargs) as http:  # type: ignore[arg-type]
        response = await http.put(
            f"/v2/service_instances/{INSTANCE}",
            params={"accepts_incomplete": "true"},
            json=world.provision_body(),
            headers=headers,
        )
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized", "description": "missing or wrong broker credentials"}
    assert response.headers["WWW-Authenticate"] == 'Basic realm="pgbosh"'
    assert await world.clusters() == []


async def test_request_identity_is_echoed_and_originating_identity_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ok = await world.http.get(
        "/v2/catalog",
        headers={
            "X-Broker-API-Request-Identity": "req-123",
            "X-Broker-API-Originating-Identity": identity_header("u-42"),
        },
    )
    assert ok.headers["X-Broker-API-Request-Identity"] == "req-123"
    failed = await world.http.get("/v2/service_instances/none", headers={"X-Broker-API-Request-Identity": "req-456"})
    assert failed.status_code == 404
    assert failed.headers["X-Broker-API-Request-Identity"] == "req-456"
    assert "identity: cloudfoundry u-42" in caplog.text
    assert CREDENTIALS.password not in caplog.text


async def test_unknown_route_has_an_error_body(world: World) -> None:
    response = await world.http.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["error"] == "Not Found"


def test_credentials_from_file(tmp_path: Path) -> None:
    yaml_file = tmp_path / "creds.yaml"
    yaml_file.write_text("username: a\npassword: b:c\n")
    assert BasicCredentials.from_file(yaml_file) == BasicCredentials("a", "b:c")
    line = tmp_path / "creds.txt"
    line.write_text("user:pa:ss\n")
    assert BasicCredentials.from_file(line) == BasicCredentials("user", "pa:ss")
    bad = tmp_path / "bad"
    bad.write_text("nothing")
    with pytest.raises(ValueError):
        BasicCredentials.from_file(bad)
    assert "b:c" not in repr(BasicCredentials.from_file(yaml_file))
    header = "Basic " + base64.b64encode(b"a:b:c").decode()
    assert BasicCredentials("a", "b:c").matches(header)
    assert not BasicCredentials("a", "b:c").matches("Bearer x")


async def test_credentials_from_secret(world: World) -> None:
    await world.kube.apply_secret("ops", "broker-auth", {"username": "x", "password": "y"})
    assert await BasicCredentials.from_secret(world.kube, "ops", "broker-auth") == BasicCredentials("x", "y")


async def test_kubernetes_failure_is_502_and_keeps_the_cluster(world: World) -> None:
    await world.http.put(
        f"/v2/service_instances/{INSTANCE}", params={"accepts_incomplete": "true"}, json=world.provision_body()
    )
    # Secrets become unknown to the emulator: listing them fails before the cluster is touched.
    del world.k8s.resources["v1/secrets"]
    response = await world.http.delete(
        f"/v2/service_instances/{INSTANCE}",
        params={"service_id": SERVICE.id, "plan_id": PLANS["small-single"].id, "accepts_incomplete": "true"},
    )
    assert response.status_code == 502
    assert response.json() == {
        "error": "KubernetesUnavailable",
        "description": "the Kubernetes API answered 404 Resource Not Found",
    }
    assert await world.cluster(INSTANCE)
