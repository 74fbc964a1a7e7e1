"""The instance flow on kmock's bare KubernetesEmulator, resources registered as the emulator contract says.

The bare emulator keeps no metadata.generation, so the broker can only go by the status phase
(the operator's phase change marks an update as running); the local API (conftest) covers generations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import kmock
import pytest

from controller.api.models import GROUP, PLURAL, VERSION
from controller.broker import naming
from controller.broker.server import BrokerServer
from controller.broker.service import Broker
from controller.kube import KubeClient, NotFound, resource_path

from .conftest import CONFIG, CREDENTIALS, HEADERS, PLANS, SERVICE, FakeRoles

INSTANCE = "plain-kmock-1"
ASYNC = {"accepts_incomplete": "true"}
READ_WRITE = {"list", "watch", "get", "patch", "create", "delete"}


@pytest.fixture
async def setup() -> AsyncIterator[tuple[KubeClient, httpx.AsyncClient]]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, host="127.0.0.1") as server:
        k8s.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}
        )
        k8s.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=READ_WRITE)
        k8s.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})
        k8s.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=READ_WRITE)
        k8s.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind="PostgresCluster", namespaced=True, verbs=READ_WRITE, subresources={"status"}
        )
        async with KubeClient(f"http://{server.host}:{server.port}") as kube:
            async with BrokerServer(Broker(CONFIG, kube, FakeRoles()), CREDENTIALS) as broker:
                async with httpx.AsyncClient(
                    base_url=broker.url, auth=(CREDENTIALS.username, CREDENTIALS.password), headers=HEADERS
                ) as http:
                    yield kube, http


async def test_flow_on_the_bare_emulator(setup: tuple[KubeClient, httpx.AsyncClient]) -> None:
    kube, http = setup
    path = resource_path(GROUP, VERSION, PLURAL, CONFIG.namespace, naming.cluster_name(INSTANCE))

    async def operator_sets(phase: str) -> None:
        await kube.merge_patch(f"{path}/status", {"status": {"phase": phase}})

    async def state() -> str:
        response = await http.get(f"/v2/service_instances/{INSTANCE}/last_operation")
        assert response.status_code == 200
        return str(response.json()["state"])

    body = {"service_id": SERVICE.id, "plan_id": PLANS["small-single"].id}
    assert (await http.put(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=body)).status_code == 202
    assert (await kube.get(path))["spec"]["instances"] == 1
    assert await state() == "in progress"
    await operator_sets("Ready")
    assert await state() == "succeeded"

    update = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id}
    assert (await http.patch(f"/v2/service_instances/{INSTANCE}", params=ASYNC, json=update)).status_code == 202
    assert (await kube.get(path))["spec"]["instances"] == 3
    await operator_sets("Updating")
    assert await state() == "in progress"
    refused = await http.patch(
        f"/v2/service_instances/{INSTANCE}", params=ASYNC, json={"service_id": SERVICE.id, "parameters": {}}
    )
    assert (refused.status_code, refused.json()["error"]) == (422, "ConcurrencyError")
    await operator_sets("Ready")
    assert await state() == "succeeded"

    query = {"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id, **ASYNC}
    assert (await http.delete(f"/v2/service_instances/{INSTANCE}", params=query)).status_code == 202
    with pytest.raises(NotFound):
        await kube.get(path)
    gone = await http.get(f"/v2/service_instances/{INSTANCE}/last_operation")
    assert (gone.status_code, gone.json()) == (410, {})
