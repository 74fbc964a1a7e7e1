"""Instances: provision, last_operation, update, deprovision and their error cases, on the emulator."""

from __future__ import annotations

import httpx
import pytest

from controller.broker import naming
from controller.broker.server import BrokerServer
from controller.broker.service import Broker
from controller.kube import NotFound

from .conftest import CREDENTIALS, HEADERS, NAMESPACE, PLANS, SERVICE, World

INSTANCE = "3f0f2c84-9a7e-4d11-8a6b-000000000001"
ASYNC = {"accepts_incomplete": "true"}


def op_query(plan: str = "small-single") -> dict[str, str]:
    return {"service_id": SERVICE.id, "plan_id": PLANS[plan].id, **ASYNC}


async def provision(
    world: World, instance: str = INSTANCE, plan: str = "small-single", **extra: object
) -> httpx.Response:
    return await world.http.put(
        f"/v2/service_instances/{instance}", params=ASYNC, json=world.provision_body(plan, **extra)
    )


async def last_op(world: World, instance: str = INSTANCE, operation: str | None = None) -> httpx.Response:
    params = {"operation": operation} if operation else {}
    return await world.http.get(f"/v2/service_instances/{instance}/last_operation", params=params)


async def assert_no_cluster(world: World, instance: str = INSTANCE) -> None:
    with pytest.raises(NotFound):
        await world.cluster(instance)


async def test_whole_instance_flow(world: World) -> None:
    response = await provision(world, parameters={"postgresVersion": 16, "parameters": {"work_mem": "8MB"}})
    assert response.status_code == 202, response.text
    operation = response.json()["operation"]
    assert operation.startswith("provision-")

    obj = await world.cluster(INSTANCE)
    assert obj["metadata"]["name"] == naming.cluster_name(INSTANCE)
    assert obj["metadata"]["namespace"] == NAMESPACE
    labels = obj["metadata"]["labels"]
    assert labels[naming.LABEL_SERVICE] == SERVICE.id
    assert labels[naming.LABEL_PLAN] == PLANS["small-single"].id
    assert labels[naming.LABEL_ORG] == "org-1"
    assert labels[naming.LABEL_SPACE] == "space-1"
    assert labels[naming.LABEL_INSTANCE] == INSTANCE
    spec = obj["spec"]
    assert spec["instances"] == 1 and spec["vmType"] == "small" and spec["storage"] == {"size": "10Gi"}
    assert spec["postgresVersion"] == 16 and spec["parameters"] == {"work_mem": "8MB"}
    assert spec["replication"]["mode"] == "async"

    response = await last_op(world, operation=operation)
    assert response.status_code == 200
    assert response.json()["state"] == "in progress"
    assert response.headers["Retry-After"] == "5"

    await world.play_operator(INSTANCE, "Provisioning", message="BOSH task 12 running")
    body = (await last_op(world, operation=operation)).json()
    assert body == {"state": "in progress", "description": "Provisioning: BOSH task 12 running"}

    await world.play_operator(INSTANCE, "Ready", message="3/3 ready")
    assert (await last_op(world, operation=operation)).json() == {"state": "succeeded", "description": "3/3 ready"}

    fetched = await world.http.get(f"/v2/service_instances/{INSTANCE}")
    assert fetched.status_code == 200
    assert fetched.json() == {
        "service_id": SERVICE.id,
        "plan_id": PLANS["small-single"].id,
        "parameters": {"postgresVersion": 16, "parameters": {"work_mem": "8MB"}},
        "maintenance_info": {"version": "1.0.0", "description": "pgbosh 0.1"},
    }

    # Plan change to HA and a new parameter set (work_mem removed, shared_buffers added).
    response = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={
            "service_id": SERVICE.id,
            "plan_id": PLANS["small-ha"].id,
            "parameters": {"parameters": {"shared_buffers": "256MB"}},
            "previous_values": {"plan_id": PLANS["small-single"].id},
        },
    )
    assert response.status_code == 202, response.text
    update_op = response.json()["operation"]
    obj = await world.cluster(INSTANCE)
    assert obj["spec"]["instances"] == 3
    assert obj["spec"]["parameters"] == {"shared_buffers": "256MB"}
    assert obj["spec"]["postgresVersion"] == 16
    assert obj["metadata"]["labels"][naming.LABEL_PLAN] == PLANS["small-ha"].id
    assert obj["metadata"]["generation"] == 2

    # The status still says Ready for generation 1: the update is not done until the operator saw generation 2.
    assert (await last_op(world, operation=update_op)).json()["state"] == "in progress"
    await world.play_operator(INSTANCE, "Updating")
    assert (await last_op(world, operation=update_op)).json()["state"] == "in progress"
    await world.play_operator(INSTANCE, "Ready", message="ready")
    assert (await last_op(world, operation=update_op)).json()["state"] == "succeeded"

    # An update that changes nothing answers 200 at once.
    same = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id},
    )
    assert (same.status_code, same.json()) == (200, {})

    response = await world.http.delete(f"/v2/service_instances/{INSTANCE}", params=op_query("small-ha"))
    assert response.status_code == 202
    delete_op = response.json()["operation"]
    assert delete_op.startswith("deprovision-")
    await assert_no_cluster(world)
    gone = await last_op(world, operation=delete_op)
    assert (gone.status_code, gone.json()) == (410, {})
    again = await world.http.delete(f"/v2/service_instances/{INSTANCE}", params=op_query("small-ha"))
    assert (again.status_code, again.json()) == (410, {})


async def test_deprovision_while_finalizer_holds_answers_202_again(world: World) -> None:
    await provision(world)
    await world.kube.merge_patch(world.cluster_path(INSTANCE), {"metadata": {"finalizers": ["pgbosh.dev/bosh"]}})
    first = await world.http.delete(f"/v2/service_instances/{INSTANCE}", params=op_query())
    assert first.status_code == 202
    again = await world.http.delete(f"/v2/service_instances/{INSTANCE}", params=op_query())
    assert (again.status_code, again.json()) == (202, first.json())
    assert (await last_op(world, operation=first.json()["operation"])).json()["state"] == "in progress"
    # The operator removes its finalizer once BOSH deleted the deployment.
    await world.kube.merge_patch(world.cluster_path(INSTANCE), {"metadata": {"finalizers": None}})
    assert (await last_op(world, operation=first.json()["operation"])).status_code == 410


async def test_failed_cluster_reports_the_condition_message(world: World) -> None:
    operation = (await provision(world)).json()["operation"]
    await world.play_operator(INSTANCE, "Failed", message="vm_type 'small' not in the cloud config")
    assert (await last_op(world, operation=operation)).json() == {
        "state": "failed",
        "description": "vm_type 'small' not in the cloud config",
    }


async def test_provision_requires_accepts_incomplete(world: World) -> None:
    response = await world.http.put(f"/v2/service_instances/{INSTANCE}", json=world.provision_body())
    assert response.status_code == 422
    assert response.json()["error"] == "AsyncRequired"
    await assert_no_cluster(world)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"service_id": "nope"}, "unknown service_id 'nope'"),
        ({"plan_id": "nope"}, "unknown plan_id 'nope'"),
        ({"plan_id": None}, "plan_id"),
        ({"parameters": "not an object"}, "parameters"),
    ],
)
async def test_provision_bad_request(world: World, change: dict[str, object], reason: str) -> None:
    body = {k: v for k, v in {**world.provision_body(), **change}.items() if v is not None}
    response = await world.http.put(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequest"
    assert reason in response.json()["description"]
    await assert_no_cluster(world)


@pytest.mark.parametrize("content", [b"{not json", b'{"parameters": {"x": NaN}}', b'{"a": -Infinity}'])
async def test_provision_body_not_json(world: World, content: bytes) -> None:
    # NaN and Infinity: Python's json reads them, RFC 8259 does not have them.
    response = await world.http.put(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "BadRequest", "description": "the request body is not valid JSON"}
    await assert_no_cluster(world)


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({"postgresVersion": 13}, "postgresVersion: 13 is not one of [14, 15, 16, 17]"),
        ({"instances": 5}, "Additional properties are not allowed ('instances' was unexpected)"),
        ({"parameters": {"work_mem": 4}}, "parameters/work_mem: 4 is not of type 'string'"),
        ({"parameters": {"port": "5433"}}, "parameters may not set port"),
    ],
)
async def test_provision_invalid_parameters(world: World, parameters: dict[str, object], reason: str) -> None:
    response = await provision(world, parameters=parameters)
    assert response.status_code == 400
    assert response.json()["error"] == "InvalidParameters"
    assert reason in response.json()["description"]
    await assert_no_cluster(world)


async def test_provision_maintenance_info_conflict(world: World) -> None:
    response = await provision(world, maintenance_info={"version": "0.9.0"})
    assert response.status_code == 422
    assert response.json()["error"] == "MaintenanceInfoConflict"
    assert "0.9.0" in response.json()["description"]
    await assert_no_cluster(world)


async def test_repeated_provision(world: World) -> None:
    first = await provision(world)
    assert first.status_code == 202
    repeat = await provision(world)
    assert (repeat.status_code, repeat.json()) == (202, first.json())

    conflicting = await provision(world, plan="small-ha")
    assert conflicting.status_code == 409
    assert conflicting.json()["error"] == "Conflict"
    assert (await world.cluster(INSTANCE))["spec"]["instances"] == 1

    await world.play_operator(INSTANCE, "Ready")
    done = await provision(world)
    assert (done.status_code, done.json()) == (200, {})
    other_params = await provision(world, parameters={"postgresVersion": 17})
    assert other_params.status_code == 409


async def test_update_while_provisioning_is_a_concurrency_error_even_after_a_restart(world: World) -> None:
    await provision(world)
    before = await world.cluster(INSTANCE)
    body = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id}
    response = await world.http.patch(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "ConcurrencyError"
    assert (await world.cluster(INSTANCE))["spec"] == before["spec"]

    # A second broker (or this one after a restart) knows nothing in memory and answers the same.
    async with BrokerServer(Broker(world.config, world.kube, world.roles), CREDENTIALS) as other:
        async with httpx.AsyncClient(base_url=other.url, auth=(CREDENTIALS.username, CREDENTIALS.password)) as http:
            again = await http.patch(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body, headers=HEADERS)
            assert again.status_code == 422 and again.json()["error"] == "ConcurrencyError"
            fetched = await http.get(f"/v2/service_instances/{INSTANCE}", headers=HEADERS)
            assert fetched.status_code == 404  # still provisioning


async def test_update_while_updating(world: World) -> None:
    await provision(world)
    await world.play_operator(INSTANCE, "Ready")
    body = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id}
    first = await world.http.patch(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body)
    assert first.status_code == 202
    repeat = await world.http.patch(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body)
    assert (repeat.status_code, repeat.json()) == (202, first.json())

    other = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "parameters": {"postgresVersion": 17}},
    )
    assert other.status_code == 422
    assert other.json()["error"] == "ConcurrencyError"
    assert (await world.cluster(INSTANCE))["spec"]["postgresVersion"] == 15

    fetched = await world.http.get(f"/v2/service_instances/{INSTANCE}")
    assert fetched.status_code == 422 and fetched.json()["error"] == "ConcurrencyError"


async def ready_instance(world: World, plan: str) -> dict[str, object]:
    assert (await provision(world, plan=plan)).status_code == 202
    await world.play_operator(INSTANCE, "Ready")
    return await world.cluster(INSTANCE)


async def test_update_disk_shrink_is_refused(world: World) -> None:
    before = await ready_instance(world, "medium-ha-sync")
    response = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id},
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "UpdateNotSupported",
        "description": "storage.size may not shrink (BOSH can only grow a persistent disk)",
    }
    assert await world.cluster(INSTANCE) == before


async def test_update_version_downgrade_is_refused(world: World) -> None:
    before = await ready_instance(world, "small-single")
    response = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "parameters": {"postgresVersion": 14}},
    )
    assert response.status_code == 422
    assert response.json()["error"] == "UpdateNotSupported"
    assert "postgresVersion may not go down" in response.json()["description"]
    assert await world.cluster(INSTANCE) == before


async def test_update_error_cases(world: World) -> None:
    path = f"/v2/service_instances/{INSTANCE}"
    missing = await world.http.patch(path, params=ASYNC, json={"service_id": SERVICE.id})
    assert (missing.status_code, missing.json()["error"]) == (404, "NotFound")

    before = await ready_instance(world, "small-single")
    cases = [
        ({}, {"service_id": SERVICE.id, "parameters": {"postgresVersion": 16}}, 422, "AsyncRequired"),
        (ASYNC, {"plan_id": PLANS["small-ha"].id}, 400, "BadRequest"),
        (ASYNC, {"service_id": SERVICE.id, "plan_id": "nope"}, 400, "BadRequest"),
        (ASYNC, {"service_id": SERVICE.id, "parameters": {"postgresVersion": "16"}}, 400, "InvalidParameters"),
        (ASYNC, {"service_id": SERVICE.id, "maintenance_info": {"version": "2.0.0"}}, 422, "MaintenanceInfoConflict"),
    ]
    for params, body, status, error in cases:
        response = await world.http.patch(path, params=params, json=body)
        assert (response.status_code, response.json()["error"]) == (status, error), body
        assert response.json()["description"]
    assert await world.cluster(INSTANCE) == before


async def test_deprovision_error_cases(world: World) -> None:
    path = f"/v2/service_instances/{INSTANCE}"
    gone = await world.http.delete(path, params=op_query())
    assert (gone.status_code, gone.json()) == (410, {})
    await provision(world)
    cases = [
        ({"plan_id": PLANS["small-single"].id, **ASYNC}, 400, "BadRequest"),
        ({"service_id": SERVICE.id, **ASYNC}, 400, "BadRequest"),
        ({"service_id": SERVICE.id, "plan_id": "nope", **ASYNC}, 400, "BadRequest"),
        ({"service_id": SERVICE.id, "plan_id": PLANS["small-single"].id}, 422, "AsyncRequired"),
    ]
    for params, status, error in cases:
        response = await world.http.delete(path, params=params)
        assert (response.status_code, response.json()["error"]) == (status, error), params
    assert await world.cluster(INSTANCE)


async def test_fetch_and_last_operation_of_unknown_instance(world: World) -> None:
    fetched = await world.http.get("/v2/service_instances/nothing-here")
    assert (fetched.status_code, fetched.json()["error"]) == (404, "NotFound")
    unknown = await last_op(world, "nothing-here", operation="provision-abc")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "NotFound")
    assert (await last_op(world, "nothing-here")).status_code == 410


async def test_odd_instance_ids_give_valid_names_and_labels(world: World) -> None:
    odd = "Instance_With.Odd/Chars-" + "x" * 80
    response = await world.http.put(
        f"/v2/service_instances/{odd.replace('/', '%2F')}", params=ASYNC, json=world.provision_body()
    )
    assert response.status_code == 202, response.text
    (obj,) = await world.clusters()
    name = obj["metadata"]["name"]
    assert len(name) <= 40 and name.startswith("pg-instance-with-odd")
    label = obj["metadata"]["labels"][naming.LABEL_INSTANCE]
    assert len(label) <= 63 and label != odd
    assert obj["metadata"]["annotations"][naming.ANNOTATION_INSTANCE] == odd
