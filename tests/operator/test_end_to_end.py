"""End to end on the local world: kubectl, the real kopf operator (as a process), the
local director with real PostgreSQL and repmgr VMs.

apply gives Ready with 3 running instances across z1, z2, z3; scaling to 5 gives
Ready with 5 even when the operator is killed -9 in the middle of the deploy and
started again (one deploy task per change, never two); delete removes the BOSH
deployment and then the resource; no secret reaches the status, the events or the
operator's log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, eventually, kubectl
from world import dig, local_director

from controller.kube.client import KubeClient, NotFound, core_path, resource_path
from controller.local.consul import ConsulServer
from controller.local.director import LocalDirector

PATH = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "default")
pytestmark = pytest.mark.slow


class OperatorProcess:
    def __init__(self, kubeconfig: str, log: Path, consul_http: str) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.env = {**os.environ, "PGBOSH_BOSH_CONSUL_HTTP_ADDR": consul_http}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = open(self.log, "ab")  # noqa: ASYNC230 - the child owns it for its whole life
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller",
            "operator",
            "--kubeconfig",
            self.kubeconfig,
            "--director-secret",
            "pgbosh-system/pgbosh-director",
            "--resync",
            "2",
            "--log-level",
            "debug",
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
        )
        out.close()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                await self.kill()


async def status(kube: KubeClient) -> dict[str, Any]:
    try:
        return (await kube.get(f"{PATH}/demo")).get("status") or {}
    except NotFound:
        return {}


async def deploy_tasks(director: LocalDirector) -> list[dict[str, Any]]:
    token = await _token(director)
    async with httpx.AsyncClient(base_url=director.url, headers={"Authorization": f"bearer {token}"}) as http:
        tasks = (await http.get("/tasks", params={"deployment": "pgbosh-default-demo", "verbose": "2"})).json()
    return [t for t in tasks if t["description"] == "create deployment"]


async def _token(director: LocalDirector) -> str:
    async with httpx.AsyncClient(base_url=director.url) as http:
        answer = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(director.client_id, director.client_secret),
            headers={"Accept": "application/json"},
        )
    return str(answer.json()["access_token"])


async def test_apply_scale_with_a_killed_operator_and_delete(kube_api, kube: KubeClient, tmp_path: Path) -> None:
    api, _, kubeconfig = kube_api
    api.add_namespace("pgbosh-system")
    log = tmp_path / "operator.log"
    async with local_director() as director, ConsulServer(http_port=0, dns_port=0) as consul:
        await kube.apply_secret(
            "pgbosh-system",
            "pgbosh-director",
            {"url": director.url, "client_id": director.client_id, "client_secret": director.client_secret},
        )
        operator = OperatorProcess(kubeconfig, log, consul.http_addr)
        await operator.start()
        try:
            code, _, err = await kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "cluster.yaml"))
            assert code == 0, err

            async def ready_with(n: int) -> dict[str, Any] | None:
                s = await status(kube)
                ok = s.get("phase") == "Ready" and s.get("readyInstances") == n and s.get("observedGeneration")
                return s if ok else None

            s = await eventually(lambda: ready_with(3), timeout=150, interval=0.5)
            assert sorted(i["az"] for i in s["instances"]) == ["z1", "z2", "z3"]
            assert all(i["state"] == "running" for i in s["instances"])
            assert len({i["address"] for i in s["instances"]}) == 3
            assert len(await deploy_tasks(director)) == 1

            # The primary is known, and Consul's DNS names it.
            async def primary_published() -> str | None:
                st = await status(kube)
                primary = next((i for i in st.get("instances", []) if i["role"] == "primary"), None)
                if primary is None or st.get("currentPrimary") != primary["name"]:
                    return None
                answer = await dig(consul.dns_port, "master.pg-default-demo.service.consul")
                return primary["address"] if answer == [primary["address"]] else None

            primary_address = await eventually(primary_published, timeout=30, interval=0.5)
            replicas = await dig(consul.dns_port, "replica.pg-default-demo.service.consul")
            assert len(replicas) == 2 and primary_address not in replicas

            # Scale to 5 and kill -9 the operator while the deploy task runs.
            await kube.merge_patch(f"{PATH}/demo", {"spec": {"instances": 5}})

            async def task_running() -> bool:
                task = (await status(kube)).get("boshTask") or {}
                return task.get("state") in ("queued", "processing") and len(await deploy_tasks(director)) == 2

            await eventually(task_running, timeout=60, interval=0.2)
            await operator.kill()
            await operator.start()
            s = await eventually(lambda: ready_with(5), timeout=180, interval=0.5)
            assert sorted(i["az"] for i in s["instances"]) == ["z1", "z1", "z2", "z2", "z3"]
            assert len(await deploy_tasks(director)) == 2, "the restarted operator started a second deploy"

            secret = await kube.get_secret("default", "demo-pgbosh-credentials")
            events = await kube.list(core_path("events", "default"))
            reasons = {e["reason"] for e in events}
            assert {"Deploying", "TaskSucceeded"} <= reasons

            code, _, err = await kubectl(kubeconfig, "delete", "pgc", "demo", "--wait=false")
            assert code == 0, err

            async def gone() -> bool:
                try:
                    await kube.get(f"{PATH}/demo")
                except NotFound:
                    return True
                return False

            await eventually(gone, timeout=120, interval=0.5)
            assert not director.engine.state.deployments
        finally:
            await operator.stop()
        text = log.read_text()
        for value in (secret["password"], director.client_secret):
            assert value not in text, "a secret reached the operator's log"
            assert value not in str(events) and value not in str(s)
