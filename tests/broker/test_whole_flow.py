"""The whole Cloud Foundry flow against the local world: provision, poll, bind, connect
by the Consul DNS name and write, unbind, deprovision, poll until 410.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from conftest import eventually
from world import dig, local_world

from controller.broker.config import BrokerConfig
from controller.broker.roles import PsycopgRoleManager
from controller.broker.server import BasicCredentials, BrokerServer
from controller.broker.service import Broker
from controller.kube.client import KubeClient

pytestmark = pytest.mark.slow

SERVICE = "6c1d3f5e-7f0a-4c53-9a57-4b1f2a6a7c01"


async def test_provision_bind_write_unbind_deprovision(kube_api, kube: KubeClient) -> None:
    api, url, _ = kube_api
    config = BrokerConfig.load(None)
    api.add_namespace(config.namespace)
    plan = next(p for s in config.catalog.services for p in s.plans if p.name == "small-single")
    credentials = BasicCredentials("cf", "broker-test-password")
    headers = {"X-Broker-API-Version": "2.17"}
    auth = ("cf", "broker-test-password")
    instance, binding = str(uuid.uuid4()), str(uuid.uuid4())
    body: dict[str, Any] = {
        "service_id": SERVICE,
        "plan_id": plan.id,
        "organization_guid": "org-1",
        "space_guid": "space-1",
        "parameters": {"parameters": {"max_connections": "50"}},
    }
    async with (
        local_world(url) as world,
        BrokerServer(Broker(config, kube, PsycopgRoleManager()), credentials) as broker,
        httpx.AsyncClient(base_url=broker.url, headers=headers, auth=auth, timeout=30) as osb,
    ):
        answer = await osb.put(f"/v2/service_instances/{instance}", params={"accepts_incomplete": "true"}, json=body)
        assert answer.status_code == 202, answer.text
        operation = answer.json().get("operation")

        async def succeeded() -> bool:
            params = {"service_id": SERVICE, "plan_id": plan.id, **({"operation": operation} if operation else {})}
            state = (await osb.get(f"/v2/service_instances/{instance}/last_operation", params=params)).json()
            assert state["state"] != "failed", state
            return state["state"] == "succeeded"

        await eventually(succeeded, timeout=150, interval=1.0)

        answer = await osb.put(
            f"/v2/service_instances/{instance}/service_bindings/{binding}",
            json={"service_id": SERVICE, "plan_id": plan.id, "bind_resource": {"app_guid": "app-1"}},
        )
        assert answer.status_code == 201, answer.text
        creds = answer.json()["credentials"]
        assert creds["hostname"].endswith(".service.consul") and creds["hostname"].startswith("master.")
        assert creds["uri"].startswith("postgresql://") and creds["jdbcUrl"].startswith("jdbc:postgresql://")

        # Resolve the name through the local Consul DNS, as an app's resolver would, and write.
        addresses = await eventually(lambda: dig(world.consul.dns_port, creds["hostname"]), timeout=30)
        assert len(addresses) == 1
        dsn = {
            "host": creds["hostname"],
            "hostaddr": addresses[0],
            "port": creds["port"],
            "dbname": creds["name"],
            "user": creds["username"],
            "password": creds["password"],
            "connect_timeout": 5,
        }
        async with await psycopg.AsyncConnection.connect(**dsn, autocommit=True) as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, item text)")
            await conn.execute("INSERT INTO orders (item) VALUES ('tea')")
            row = await (await conn.execute("SELECT count(*) FROM orders")).fetchone()
            assert row is not None and row[0] == 1

        answer = await osb.delete(
            f"/v2/service_instances/{instance}/service_bindings/{binding}",
            params={"service_id": SERVICE, "plan_id": plan.id},
        )
        assert answer.status_code == 200, answer.text
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(**dsn)

        answer = await osb.delete(
            f"/v2/service_instances/{instance}",
            params={"service_id": SERVICE, "plan_id": plan.id, "accepts_incomplete": "true"},
        )
        assert answer.status_code == 202, answer.text

        async def gone() -> bool:
            answer = await osb.get(
                f"/v2/service_instances/{instance}/last_operation", params={"service_id": SERVICE, "plan_id": plan.id}
            )
            return answer.status_code == 410

        await eventually(gone, timeout=120, interval=1.0)
        assert not world.director.engine.state.deployments
        await asyncio.sleep(0)
