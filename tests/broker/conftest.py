"""A broker served on loopback, talking to the local Kubernetes API (kmock's emulator with
the project's admission and bookkeeping, as `pgbosh dev` runs it) on loopback."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from controller.api.models import GROUP, PLURAL, VERSION
from controller.broker import naming
from controller.broker.config import BrokerConfig
from controller.broker.roles import AdminTarget
from controller.broker.server import BasicCredentials, BrokerServer
from controller.broker.service import Broker
from controller.kube import KubeClient, resource_path
from controller.local.kube import LocalKubernetes, serve

NAMESPACE = "pgbosh-instances"
CREDENTIALS = BasicCredentials("broker", "broker-Secret-pw")
CONFIG = BrokerConfig.load()
SERVICE = CONFIG.catalog.services[0]
PLANS = {plan.name: plan for plan in SERVICE.plans}
HEADERS = {"X-Broker-API-Version": "2.17"}


@dataclass
class FakeRoles:
    """Records role calls for the protocol tests; the real PostgreSQL test uses PsycopgRoleManager."""

    roles: dict[str, str] = field(default_factory=dict)
    targets: list[AdminTarget] = field(default_factory=list)

    async def ensure_login_role(self, target: AdminTarget, role: str, password: str) -> None:
        self.targets.append(target)
        self.roles[role] = password

    async def drop_login_role(self, target: AdminTarget, role: str) -> bool:
        self.targets.append(target)
        return self.roles.pop(role, None) is not None


@dataclass
class World:
    k8s: LocalKubernetes
    kube: KubeClient
    server: BrokerServer
    http: httpx.AsyncClient
    roles: Any
    config: BrokerConfig

    def cluster_path(self, instance_id: str, subresource: str | None = None) -> str:
        return resource_path(GROUP, VERSION, PLURAL, NAMESPACE, naming.cluster_name(instance_id), subresource)

    async def clusters(self) -> list[dict[str, Any]]:
        return await self.kube.list(resource_path(GROUP, VERSION, PLURAL))

    async def cluster(self, instance_id: str) -> dict[str, Any]:
        return await self.kube.get(self.cluster_path(instance_id))

    async def play_operator(
        self,
        instance_id: str,
        phase: str,
        *,
        observed: int | None = None,
        message: str = "",
        ready_status: dict[str, Any] | None = None,
    ) -> None:
        """Write the status the operator would write."""
        obj = await self.cluster(instance_id)
        generation = obj["metadata"].get("generation") if observed is None else observed
        status: dict[str, Any] = {
            "phase": phase,
            "observedGeneration": generation,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if phase == "Ready" else "False",
                    "reason": phase,
                    "message": message,
                    "lastTransitionTime": "2026-11-25T00:00:00Z",
                    "observedGeneration": generation,
                }
            ],
        }
        status.update(ready_status or {})
        await self.kube.merge_patch(self.cluster_path(instance_id, "status"), {"status": status})

    def provision_body(self, plan: str = "small-single", **extra: Any) -> dict[str, Any]:
        return {
            "service_id": SERVICE.id,
            "plan_id": PLANS[plan].id,
            "organization_guid": "org-1",
            "space_guid": "space-1",
            "context": {"platform": "cloudfoundry"},
            **extra,
        }


def identity_header(user: str) -> str:
    return "cloudfoundry " + base64.b64encode(json.dumps({"user_id": user}).encode()).decode()


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[LocalKubernetes, str]]:
    async with serve() as (k8s, url):
        yield k8s, url


@pytest.fixture
def roles() -> Any:
    return FakeRoles()


@pytest.fixture
def config() -> BrokerConfig:
    return CONFIG


@pytest.fixture
async def world(emulator: tuple[LocalKubernetes, str], roles: Any, config: BrokerConfig) -> AsyncIterator[World]:
    k8s, url = emulator
    async with KubeClient(url) as kube:
        async with BrokerServer(Broker(config, kube, roles), CREDENTIALS, host="127.0.0.1", port=0) as server:
            async with httpx.AsyncClient(
                base_url=server.url, auth=(CREDENTIALS.username, CREDENTIALS.password), headers=HEADERS, timeout=30
            ) as http:
                yield World(k8s, kube, server, http, roles, config)
