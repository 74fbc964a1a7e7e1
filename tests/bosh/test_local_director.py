"""DirectorClient and the manifest builder against the real local director, in-process.

The director is `controller.local.director.LocalDirector` on an ephemeral loopback port
(real HTTP, real UAA-style token); its VMs run the director tests' fake agent
(`tests/local/director/fake_agent.py`, a `sleep` job) so this runs in seconds without
PostgreSQL. What is checked is the client's side: auth, redirects, task following,
event tailing, result parsing, 404s, error codes, context ids.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.api.models import PostgresClusterSpec
from controller.bosh.client import BoshError, DirectorClient, DirectorError, TaskFailed
from controller.bosh.config import BoshConfig, Secret
from controller.bosh.manifest import (
    check_against_cloud_config,
    deployment_name,
    interpolate,
    manifests_equal,
    render_manifest,
)
from controller.bosh.types import Instance, TaskEvent
from controller.local.director import LocalDirector

FAKE_AGENT = [
    sys.executable,
    str(Path(__file__).parents[1] / "local" / "director" / "fake_agent.py"),
    "--config",
]


@pytest.fixture
async def director() -> AsyncIterator[LocalDirector]:
    # A short root: each VM's agent.sock must fit a unix socket path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="pgbosh-bosh-"))
    local = LocalDirector(
        root / "state",
        vm_root=root / "vms",
        agent_command=FAKE_AGENT,
        resurrection_delay=0.5,
        agent_timeout=1.0,
        poll_interval=0.2,
    )
    await local.start()
    try:
        yield local
    finally:
        await local.stop(stop_vms=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def client(director: LocalDirector) -> AsyncIterator[DirectorClient]:
    config = BoshConfig(
        director_url=director.url,
        client_id=director.client_id,
        client_secret=Secret(director.client_secret),
    )
    async with DirectorClient(config) as c:  # the default transport: real HTTP
        yield c


def spec(**fields: Any) -> PostgresClusterSpec:
    return PostgresClusterSpec.model_validate({"storage": {"size": "1Gi"}, **fields})


async def wait_until_running(client: DirectorClient, deployment: str, count: int) -> list[Instance]:
    for _ in range(100):
        instances = await client.instances(deployment)
        if len(instances) == count and all(i.running for i in instances):
            return sorted(instances, key=lambda i: i.index or 0)
    raise AssertionError(f"{deployment}: not {count} running instances: {instances}")


async def test_deploy_observe_and_delete_a_cluster(director: LocalDirector, client: DirectorClient) -> None:
    config = client.config
    cluster = spec(instances=2, azs=["z1", "z2"])
    cloud = await client.cloud_config()
    assert check_against_cloud_config(cluster, cloud, config) == []

    name = deployment_name("team-a", "orders", config)
    assert await client.deployed_manifest(name) is None

    manifest = interpolate(render_manifest("team-a", "orders", cluster, config), {"admin_password": "pw-1"})
    context = "pgbosh:team-a/orders:create"
    task_id = await client.deploy(manifest, context_id=context)

    # Recorded before waiting, found again by its context id (what a restarted operator does).
    found = await client.tasks(context_id=context)
    assert [t.id for t in found] == [task_id]
    assert found[0].context_id == context

    seen: list[TaskEvent] = []

    async def on_events(events: list[TaskEvent]) -> None:
        seen.extend(events)

    done = await client.wait_for_task(task_id, give_up_after=120, on_events=on_events)
    assert done.succeeded and done.deployment == name
    assert seen and all(e.error is None for e in seen)
    assert any(e.state == "finished" for e in seen)

    deployed = await client.deployed_manifest(name)
    assert deployed is not None and manifests_equal(deployed, manifest)
    # An unchanged spec renders the same manifest: the operator would not deploy again.
    again = interpolate(render_manifest("team-a", "orders", cluster, config), {"admin_password": "pw-1"})
    assert manifests_equal(deployed, again)
    assert not manifests_equal(
        deployed,
        interpolate(render_manifest("team-a", "orders", spec(instances=3, azs=["z1", "z2"]), config), {}),
    )

    instances = await wait_until_running(client, name, 2)
    assert [(i.job_name, i.index, i.az) for i in instances] == [("postgres", 0, "z1"), ("postgres", 1, "z2")]
    assert all(i.ips and i.vm_cid and i.disk_cid for i in instances)
    assert [i.bootstrap for i in instances] == [True, False]

    await client.set_resurrection(name, "postgres", instances[1].id, paused=True)
    paused = {i.id: i.resurrection_paused for i in await client.instances(name)}
    assert paused == {instances[0].id: False, instances[1].id: True}

    stop_task = await client.change_job_state(
        name, "postgres", instances[1].id, "stopped", context_id="c-stop"
    )
    assert (await client.wait_for_task(stop_task, give_up_after=60)).succeeded
    states = {i.id: (i.state, i.job_state) for i in await client.instances(name)}
    assert states[instances[1].id][0] == "stopped"

    delete_task = await client.delete_deployment(name, context_id="pgbosh:team-a/orders:delete")
    assert delete_task is not None
    assert (await client.wait_for_task(delete_task, give_up_after=60)).succeeded
    assert await client.deployed_manifest(name) is None
    assert await client.delete_deployment(name, context_id="again") is None  # already gone is fine


async def test_the_director_refuses_what_the_cloud_config_lacks(client: DirectorClient) -> None:
    cluster = spec(vmType="huge", azs=["z1"])
    cloud = await client.cloud_config()
    problems = check_against_cloud_config(cluster, cloud, client.config)
    assert len(problems) == 1 and problems[0].startswith("vmType 'huge' is not a vm_type")

    manifest = render_manifest("default", "big", cluster, client.config)
    # Like the real Director, the manifest is checked against the cloud config inside the task
    # (deployments_controller.rb only parses YAML before creating it), so the task fails.
    task_id = await client.deploy(manifest, context_id="c")
    with pytest.raises(TaskFailed) as caught:
        await client.wait_for_task(task_id, give_up_after=60)
    assert caught.value.state == "error" and "huge" in caught.value.detail


async def test_an_unknown_task_is_a_404(client: DirectorClient) -> None:
    with pytest.raises(DirectorError) as caught:
        await client.task(987654)
    assert caught.value.not_found


async def test_wrong_credentials_fail_without_showing_them(director: LocalDirector) -> None:
    config = BoshConfig(
        director_url=director.url, client_id=director.client_id, client_secret=Secret("wrong-0xBEEF")
    )
    async with DirectorClient(config) as client:
        with pytest.raises(BoshError) as caught:
            await client.deployed_manifest("x")
    assert "401" in str(caught.value) and "wrong-0xBEEF" not in str(caught.value)
    assert director.client_secret not in str(caught.value)


def test_manifest_matches_the_local_world_shape_the_director_parses() -> None:
    doc = yaml.safe_load(render_manifest("default", "demo", spec(), BoshConfig()))
    assert doc["instance_groups"][0]["jobs"][0]["name"] == "postgres"
