"""Bindings on the emulator with a recording role manager: repeats and error cases."""

from __future__ import annotations

import logging

import httpx
import pytest

from controller.broker import naming

from .conftest import NAMESPACE, PLANS, SERVICE, FakeRoles, World

INSTANCE = "bind-instance-1"
BINDING = "binding-1"
ASYNC = {"accepts_incomplete": "true"}
ADMIN_PASSWORD = "admin-Secret-pw"


def bind_body(**extra: object) -> dict[str, object]:
    return {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id, "bind_resource": {"app_guid": "app-1"}, **extra}


def unbind_query() -> dict[str, str]:
    return {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id}


async def ready_cluster(world: World, instance: str = INSTANCE) -> None:
    response = await world.http.put(
        f"/v2/service_instances/{instance}", params=ASYNC, json=world.provision_body("small-ha")
    )
    assert response.status_code == 202
    name = naming.cluster_name(instance)
    await world.kube.apply_secret(NAMESPACE, f"{name}-admin", {"username": "pgbosh_admin", "password": ADMIN_PASSWORD})
    await world.play_operator(
        instance,
        "Ready",
        ready_status={
            "currentPrimary": f"{name}/1",
            "instances": [
                {"name": f"{name}/0", "address": "127.0.9.1", "role": "replica"},
                {"name": f"{name}/1", "address": "127.0.9.2", "role": "primary"},
            ],
            "endpoint": {"host": f"master.{name}.service.consul", "port": 5432},
            "credentialsSecret": f"{name}-admin",
        },
    )


async def binding_secrets(world: World) -> list[str]:
    """Names of the binding's Secrets (the emulator ignores label selectors: filter here)."""
    secrets = await world.kube.list(f"/api/v1/namespaces/{NAMESPACE}/secrets")
    return [
        s["metadata"]["name"]
        for s in secrets
        if (s["metadata"].get("labels") or {}).get(naming.LABEL_BINDING) == BINDING
    ]


def bind_path(instance: str = INSTANCE, binding: str = BINDING) -> str:
    return f"/v2/service_instances/{instance}/service_bindings/{binding}"


async def test_bind_fetch_unbind(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await ready_cluster(world)
    roles: FakeRoles = world.roles
    response = await world.http.put(bind_path(), json=bind_body())
    assert response.status_code == 201, response.text
    body = response.json()
    credentials = body["credentials"]
    role = naming.binding_role_name(BINDING)
    password = roles.roles[role]
    host = f"master.{naming.cluster_name(INSTANCE)}.service.consul"
    assert credentials == {
        "uri": f"postgresql://{role}:{password}@{host}:5432/app",
        "hostname": host,
        "port": 5432,
        "name": "app",
        "username": role,
        "password": password,
        "jdbcUrl": f"jdbc:postgresql://{host}:5432/app?user={role}&password={password}",
        "endpoints": [{"host": host, "ports": ["5432"], "protocol": "tcp"}],
    }
    assert body["endpoints"] == [{"host": host, "ports": ["5432"], "protocol": "tcp"}]
    # Roles are created through the primary's address with the admin Secret's credentials.
    assert roles.targets[-1].host == "127.0.9.2"
    assert roles.targets[-1].username == "pgbosh_admin"
    assert roles.targets[-1].password == ADMIN_PASSWORD

    secret_name = naming.binding_secret_name(BINDING)
    assert await world.kube.get_secret(NAMESPACE, secret_name) == {
        "username": role,
        "password": password,
        "database": "app",
    }
    secret = await world.kube.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}")
    assert secret["metadata"]["labels"][naming.LABEL_INSTANCE] == INSTANCE
    assert secret["metadata"]["labels"][naming.LABEL_BINDING] == BINDING

    repeat = await world.http.put(bind_path(), json=bind_body())
    assert (repeat.status_code, repeat.json()) == (200, body)
    fetched = await world.http.get(bind_path())
    assert (fetched.status_code, fetched.json()) == (200, body)

    conflicting = await world.http.put(bind_path(), json=bind_body(bind_resource={"app_guid": "app-2"}))
    assert conflicting.status_code == 409
    assert conflicting.json()["error"] == "Conflict"
    assert roles.roles[role] == password

    unbound = await world.http.delete(bind_path(), params=unbind_query())
    assert (unbound.status_code, unbound.json()) == (200, {})
    assert role not in roles.roles
    again = await world.http.delete(bind_path(), params=unbind_query())
    assert (again.status_code, again.json()) == (410, {})
    missing = await world.http.get(bind_path())
    assert (missing.status_code, missing.json()["error"]) == (404, "NotFound")

    assert password not in caplog.text and ADMIN_PASSWORD not in caplog.text


async def test_unbind_removes_a_role_left_without_its_secret(world: World) -> None:
    await ready_cluster(world)
    roles: FakeRoles = world.roles
    roles.roles[naming.binding_role_name("half-done")] = "x"
    response = await world.http.delete(bind_path(binding="half-done"), params=unbind_query())
    assert (response.status_code, response.json()) == (200, {})
    assert not roles.roles


async def test_deprovision_deletes_binding_secrets(world: World) -> None:
    await ready_cluster(world)
    assert (await world.http.put(bind_path(), json=bind_body())).status_code == 201
    assert await binding_secrets(world) == [naming.binding_secret_name(BINDING)]
    response = await world.http.delete(f"/v2/service_instances/{INSTANCE}", params={**unbind_query(), **ASYNC})
    assert response.status_code == 202
    assert await binding_secrets(world) == []


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"plan_id": PLANS["small-ha"].id}, 400, "BadRequest"),
        ({"service_id": SERVICE.id}, 400, "BadRequest"),
        ({"service_id": "nope", "plan_id": PLANS["small-ha"].id}, 400, "BadRequest"),
        (bind_body(parameters={"x": 1}), 400, "InvalidParameters"),
    ],
)
async def test_bind_bad_requests(world: World, body: dict[str, object], status: int, error: str) -> None:
    await ready_cluster(world)
    response = await world.http.put(bind_path(), json=body)
    assert (response.status_code, response.json()["error"]) == (status, error)
    assert response.json()["description"]
    assert not world.roles.roles
    assert await binding_secrets(world) == []


async def test_bind_to_missing_or_unready_instances(world: World) -> None:
    missing = await world.http.put(bind_path(instance="nope"), json=bind_body())
    assert (missing.status_code, missing.json()["error"]) == (404, "NotFound")

    await world.http.put("/v2/service_instances/young", params=ASYNC, json=world.provision_body("small-ha"))
    provisioning = await world.http.put(bind_path(instance="young"), json=bind_body())
    assert (provisioning.status_code, provisioning.json()["error"]) == (422, "ConcurrencyError")

    await world.play_operator("young", "Ready")  # Ready, but no primary or endpoint in the status
    no_primary = await world.http.put(bind_path(instance="young"), json=bind_body())
    assert (no_primary.status_code, no_primary.json()["error"]) == (422, "InstanceNotReady")

    await world.play_operator("young", "Failed", message="disk full")
    failed = await world.http.put(bind_path(instance="young"), json=bind_body())
    assert failed.status_code == 422
    assert failed.json() == {"error": "InstanceNotReady", "description": "the instance failed: disk full"}
    assert not world.roles.roles


async def test_unbind_bad_requests(world: World) -> None:
    await ready_cluster(world)
    assert (await world.http.put(bind_path(), json=bind_body())).status_code == 201
    for params in ({"plan_id": PLANS["small-ha"].id}, {"service_id": SERVICE.id}, {}):
        response = await world.http.delete(bind_path(), params=params)
        assert (response.status_code, response.json()["error"]) == (400, "BadRequest")
    assert world.roles.roles  # nothing dropped
    other_instance = await world.http.delete(bind_path(instance="other"), params=unbind_query())
    assert (other_instance.status_code, other_instance.json()) == (410, {})
    assert world.roles.roles


async def test_binding_of_another_instance_conflicts(world: World) -> None:
    await ready_cluster(world)
    await ready_cluster(world, "bind-instance-2")
    assert (await world.http.put(bind_path(), json=bind_body())).status_code == 201
    response = await world.http.put(bind_path(instance="bind-instance-2"), json=bind_body())
    assert response.status_code == 409
    fetched = await world.http.get(bind_path(instance="bind-instance-2"))
    assert fetched.status_code == 404


async def test_database_unreachable_is_502(world: World) -> None:
    class Down(FakeRoles):
        async def ensure_login_role(self, target: object, role: str, password: str) -> None:
            from controller.broker.roles import DatabaseUnavailable

            raise DatabaseUnavailable("cannot connect to 127.0.9.2:5432 database app as pgbosh_admin: OperationalError")

    world.server.broker.roles = Down()
    await ready_cluster(world)
    response = await world.http.put(bind_path(), json=bind_body())
    assert response.status_code == 502
    assert response.json()["error"] == "DatabaseUnavailable"
    assert ADMIN_PASSWORD not in response.text
    assert await binding_secrets(world) == []


async def test_http_client_sees_json_errors_only(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.server.url) as http:
        response = await http.get("/v2/catalog")
    assert response.headers["Content-Type"].startswith("application/json")
