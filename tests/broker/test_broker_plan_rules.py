"""A plan that is not plan_updateable: its plan cannot change, its parameters can."""

from __future__ import annotations

import pytest

from controller.broker.config import BrokerConfig

from .conftest import PLANS, SERVICE, World
from .test_broker_instances import ASYNC, INSTANCE, ready_instance


@pytest.fixture
def config() -> BrokerConfig:
    cfg = BrokerConfig.load()
    data = cfg.model_dump()
    for plan in data["catalog"]["services"][0]["plans"]:
        if plan["name"] == "medium-ha-sync":
            plan["plan_updateable"] = False
    return BrokerConfig.model_validate(data)


async def test_update_plan_not_updateable(world: World) -> None:
    before = await ready_instance(world, "medium-ha-sync")
    catalog = (await world.http.get("/v2/catalog")).json()
    plan = next(p for p in catalog["services"][0]["plans"] if p["name"] == "medium-ha-sync")
    assert plan["plan_updateable"] is False
    response = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "plan_id": PLANS["small-ha"].id},
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "PlanChangeNotSupported",
        "description": "plan medium-ha-sync cannot be changed to another plan",
    }
    assert await world.cluster(INSTANCE) == before
    # Parameters alone may still change.
    ok = await world.http.patch(
        f"/v2/service_instances/{INSTANCE}",
        params=ASYNC,
        json={"service_id": SERVICE.id, "parameters": {"postgresVersion": 16}},
    )
    assert ok.status_code == 202
