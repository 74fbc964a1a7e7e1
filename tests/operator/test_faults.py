"""Faults between the operator and the Director, injected in the production client's transport.

The operator runs with the real DirectorClient against the local director (with the
director tests' light agent, so VMs start in milliseconds). An httpx transport in
between answers 500s, times out, loses the answer to a deploy, or reports a task as
failed. Each test checks the condition a user sees, that retries are bounded (the
requests are counted), and that no second deployment is ever started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import eventually, running_operator

from controller.bosh.client import DirectorClient
from controller.bosh.config import BoshConfig, DirectorTimeouts, RetryPolicy, Secret
from controller.kube.client import KubeClient, NotFound, resource_path
from controller.local.director import LocalDirector

FAKE_AGENT = [
    __import__("sys").executable,
    str(Path(__file__).resolve().parents[1] / "local" / "director" / "fake_agent.py"),
    "--config",
]
PATH = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "default")
CLUSTER = {
    "apiVersion": "pgbosh.dev/v1alpha1",
    "kind": "PostgresCluster",
    "metadata": {"name": "demo", "namespace": "default"},
    "spec": {"instances": 2, "storage": {"size": "1Gi"}},
}


@dataclass
class Fault:
    method: str
    match: Callable[[str], bool]
    kind: str  # "500", "timeout", "lose-answer", "fail-task", "slow-task"
    times: int
    hits: int = 0


@dataclass
class FaultyTransport(httpx.AsyncBaseTransport):
    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.log if m == method and p.startswith(prefix))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        fault = next(
            (f for f in self.faults if f.method == request.method and f.match(path) and f.hits < f.times), None
        )
        if fault is not None:
            fault.hits += 1
            if fault.kind == "500":
                self.log.append((request.method, path, 500))
                body = {"code": 100, "description": "injected: the Director's database is unavailable"}
                return httpx.Response(500, json=body, request=request)
            if fault.kind == "timeout":
                self.log.append((request.method, path, 0))
                raise httpx.ReadTimeout("injected: no answer in time", request=request)
            if fault.kind == "lose-answer":
                response = await self.inner.handle_async_request(request)
                await response.aread()
                self.log.append((request.method, path, 0))
                raise httpx.RemoteProtocolError("injected: connection lost before the answer", request=request)
        response = await self.inner.handle_async_request(request)
        self.log.append((request.method, path, response.status_code))
        if fault is not None and fault.kind in ("fail-task", "slow-task"):
            raw = json.loads(await response.aread())
            if fault.kind == "fail-task":
                raw.update(state="error", result="injected: 'postgres/0' is not running after update")
            else:
                raw.update(state="processing")
            return httpx.Response(200, json=raw, request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def world(kube_url: str, transport: FaultyTransport) -> AsyncIterator[LocalDirector]:
    base = Path(tempfile.mkdtemp(prefix="pgbf-", dir="/tmp"))
    director = LocalDirector(base / "state", vm_root=base / "vms", agent_command=FAKE_AGENT, poll_interval=0.2)
    await director.start()
    bosh = BoshConfig(
        director_url=director.url,
        client_id=director.client_id,
        client_secret=Secret(director.client_secret),
        consul_http_addr="",
        timeouts=DirectorTimeouts(read=2.0, task_poll_interval=0.2),
        retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2),
    )
    try:
        async with DirectorClient(bosh, transport=transport) as client, running_operator(kube_url, client):
            yield director
    finally:
        await director.stop(stop_vms=True)
        shutil.rmtree(base, ignore_errors=True)


async def status(kube: KubeClient) -> dict[str, Any]:
    try:
        return (await kube.get(f"{PATH}/demo")).get("status") or {}
    except NotFound:
        return {}


def ready_condition(s: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in s.get("conditions", []) if c["type"] == "Ready"), {})


async def phase(kube: KubeClient, wanted: str) -> dict[str, Any] | None:
    s = await status(kube)
    return s if s.get("phase") == wanted else None


def deployment_path(path: str) -> bool:
    return path == "/deployments/pgbosh-default-demo"


async def test_500s_are_reported_retried_with_bounds_and_then_recovered(kube_api, kube: KubeClient) -> None:
    transport = FaultyTransport(faults=[Fault("GET", deployment_path, "500", times=9)])
    async with world(kube_api[1], transport) as director:
        await kube.create(PATH, CLUSTER)

        async def reported() -> dict[str, Any] | None:
            c = ready_condition(await status(kube))
            return c if c.get("reason") == "DirectorUnavailable" else None

        condition = await eventually(reported, timeout=20)
        assert "500" in condition["message"] and "database is unavailable" in condition["message"]
        assert "Retrying in" in condition["message"]
        await eventually(lambda: phase(kube, "Ready"), timeout=60)
        # 9 injected 500s with 3 tries per call: 3 failed cycles, each backing off, no storm.
        assert transport.count("GET", "/deployments/pgbosh-default-demo") <= 9 + 20
        assert transport.count("POST", "/deployments") == 1
        assert len(director.engine.state.deployments) == 1


async def test_timeouts_are_reported_and_do_not_storm(kube_api, kube: KubeClient) -> None:
    transport = FaultyTransport(faults=[Fault("GET", lambda p: p == "/configs", "timeout", times=6)])
    async with world(kube_api[1], transport):
        await kube.create(PATH, CLUSTER)

        async def reported() -> dict[str, Any] | None:
            c = ready_condition(await status(kube))
            return c if c.get("reason") == "DirectorUnavailable" else None

        condition = await eventually(reported, timeout=20)
        assert "no answer" in condition["message"]
        await asyncio.sleep(3)
        assert transport.count("GET", "/configs") <= 6
        await eventually(lambda: phase(kube, "Ready"), timeout=60)
        assert transport.count("POST", "/deployments") == 1


async def test_a_deploy_whose_answer_is_lost_is_adopted_not_repeated(kube_api, kube: KubeClient) -> None:
    transport = FaultyTransport(faults=[Fault("POST", lambda p: p == "/deployments", "lose-answer", times=1)])
    async with world(kube_api[1], transport) as director:
        await kube.create(PATH, CLUSTER)
        s = await eventually(lambda: phase(kube, "Ready"), timeout=60)
        # The Director got the deploy once; the operator found its task by context id.
        assert transport.count("POST", "/deployments") == 1
        tasks = [t for t in director.engine.state.tasks if t["description"] == "create deployment"]
        assert len(tasks) == 1 and s["boshTask"]["id"] == tasks[0]["id"]


async def test_failed_task_fails_the_cluster_with_the_task_error_and_is_not_retried(kube_api, kube: KubeClient) -> None:
    transport = FaultyTransport(
        faults=[Fault("GET", lambda p: p.startswith("/tasks/1") and "output" not in p, "fail-task", times=1000)]
    )
    async with world(kube_api[1], transport):
        await kube.create(PATH, CLUSTER)
        s = await eventually(lambda: phase(kube, "Failed"), timeout=30)
        condition = ready_condition(s)
        assert condition["reason"] == "DeployFailed" and "is not running after update" in condition["message"]
        await asyncio.sleep(3)
        assert transport.count("POST", "/deployments") == 1


async def test_slow_task_keeps_provisioning_without_a_second_deploy(kube_api, kube: KubeClient) -> None:
    transport = FaultyTransport(faults=[Fault("GET", lambda p: p == "/tasks/1", "slow-task", times=8)])
    async with world(kube_api[1], transport):
        await kube.create(PATH, CLUSTER)
        s = await eventually(lambda: phase(kube, "Provisioning"), timeout=20)
        progressing = next(c for c in s["conditions"] if c["type"] == "Progressing")
        assert progressing["reason"] in ("TaskRunning", "Deploying")
        await eventually(lambda: phase(kube, "Ready"), timeout=60)
        assert transport.count("POST", "/deployments") == 1


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
