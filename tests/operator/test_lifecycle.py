"""The real kopf operator on the local Kubernetes API, with a Director test double.

These tests cover the operator core: phases and conditions, events, the finalizer,
semantic validation, failures, and a restart in the middle of a task.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import kmock
import pytest
from conftest import eventually, running_operator
from fakes import FakeDirector

from controller.kube.client import KubeClient, NotFound, core_path, resource_path

PATH = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "default")
CLUSTER: dict[str, Any] = {
    "apiVersion": "pgbosh.dev/v1alpha1",
    "kind": "PostgresCluster",
    "metadata": {"name": "demo", "namespace": "default"},
    "spec": {"instances": 3, "storage": {"size": "1Gi"}},
}


def cluster(**spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(CLUSTER)
    body["spec"].update(spec)
    return body


async def status_of(kube: KubeClient, name: str = "demo") -> dict[str, Any]:
    try:
        body = await kube.get(f"{PATH}/{name}")
    except NotFound:
        return {}
    return body.get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def events_for(kube: KubeClient, name: str = "demo") -> list[dict[str, Any]]:
    items = await kube.list(core_path("events", "default"))
    return [e for e in items if e.get("involvedObject", {}).get("name") == name]


@pytest.fixture
def director() -> FakeDirector:
    return FakeDirector()


async def test_create_goes_through_provisioning_to_ready_and_delete_runs_the_finalizer(
    kube_api, kube, director, caplog
):
    _, url, _ = kube_api
    caplog.set_level(logging.DEBUG)
    phases: list[str] = []

    async def phase_seen() -> bool:
        status = await status_of(kube)
        if status.get("phase") and (not phases or phases[-1] != status["phase"]):
            phases.append(status["phase"])
        return status.get("phase") == "Ready"

    async with running_operator(url, director):
        await kube.create(PATH, cluster())
        await eventually(phase_seen, timeout=30, interval=0.05)
        status = await status_of(kube)
        assert "Provisioning" in phases and phases[-1] == "Ready"
        assert status["readyInstances"] == 3
        assert [i["az"] for i in status["instances"]] == ["z1", "z2", "z3"]
        assert condition(status, "Ready")["status"] == "True"
        assert condition(status, "Ready")["reason"] == "AllInstancesRunning"
        assert status["boshTask"]["state"] == "done"
        assert status["credentialsSecret"] == "demo-pgbosh-credentials"
        assert status["endpoint"] == {"host": "master.pg-default-demo.service.consul", "port": 5432}
        assert director.count("deploy") == 1
        # After its own deploy is done the operator does not download the manifest again.
        assert director.count("deployed_manifest") == 1, " ".join(director.calls)
        reasons = [e["reason"] for e in await eventually(lambda: events_for(kube))]
        assert "Deploying" in reasons
        body = await kube.get(f"{PATH}/demo")
        assert "pgbosh.dev/finalizer" in body["metadata"]["finalizers"]
        # The connection Secret: the login, and where to connect (the DNS name that follows the primary).
        secret = await kube.get_secret("default", "demo-pgbosh-credentials")
        password = secret["password"]
        assert len(password) >= 24
        assert secret["username"] == "pgbosh_admin"
        assert secret["host"] == status["endpoint"]["host"] == "master.pg-default-demo.service.consul"
        assert secret["port"] == "5432" and secret["dbname"] == "app"
        assert secret["uri"] == f"postgresql://pgbosh_admin:{password}@master.pg-default-demo.service.consul:5432/app"
        # The generated password is in the Secret, and nowhere in the status, events or logs.
        assert password not in str(body) and password not in str(await events_for(kube))
        assert caplog.records and not [r for r in caplog.records if password in _record_text(r)]

        await kube.delete(f"{PATH}/demo")

        async def gone() -> bool:
            try:
                await kube.get(f"{PATH}/demo")
            except NotFound:
                return True
            return False

        await eventually(gone, timeout=30)
        assert director.deployments == {}
        assert director.count("delete_deployment") == 1


async def test_a_credentials_secret_made_before_the_cluster_is_used_not_replaced(kube_api, kube, director, caplog):
    _, url, _ = kube_api
    caplog.set_level(logging.DEBUG)
    await kube.apply_secret(
        "default", "demo-pgbosh-credentials", {"username": "pgbosh_admin", "password": "chosen/by the user:1"}
    )
    async with running_operator(url, director):
        await kube.create(PATH, cluster())
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=30, interval=0.05)
    status = await status_of(kube)
    assert status["credentialsSecret"] == "demo-pgbosh-credentials"
    secret = await kube.get_secret("default", "demo-pgbosh-credentials")
    # The user's login is kept; the connection fields are added beside it, the URI quoting the password.
    assert secret["username"] == "pgbosh_admin" and secret["password"] == "chosen/by the user:1"
    assert secret["host"] == "master.pg-default-demo.service.consul"
    assert secret["port"] == "5432" and secret["dbname"] == "app"
    assert secret["uri"] == (
        "postgresql://pgbosh_admin:chosen%2Fby%20the%20user%3A1@master.pg-default-demo.service.consul:5432/app"
    )
    [manifest] = director.deployments.values()
    assert "chosen/by the user:1" in manifest
    assert "chosen" not in str(status) and "chosen" not in str(await events_for(kube))
    assert not [r for r in caplog.records if "chosen" in _record_text(r)]


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += repr(record.exc_info[1]) + str(record.exc_info[1])
    return text


async def _phase_is(kube: KubeClient, phase: str) -> bool:
    return (await status_of(kube)).get("phase") == phase


async def test_scaling_redeploys_once_and_settled_cluster_does_not_redeploy(kube_api, kube, director):
    _, url, _ = kube_api
    async with running_operator(url, director, resync_seconds=0.02):
        await kube.create(PATH, cluster())
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=30)
        await kube.merge_patch(f"{PATH}/demo", {"spec": {"instances": 5}})
        await eventually(lambda: _ready_count(kube, 5), timeout=30)
        deploys = director.count("deploy")
        assert deploys == 2
        observed_before = director.count("instances")
        await eventually(lambda: director.count("instances") >= observed_before + 100, timeout=60)
        assert director.count("deploy") == deploys  # 100 observations of a settled cluster, no deploy


async def _phase_is(kube: KubeClient, phase: str) -> bool:
    return (await status_of(kube)).get("phase") == phase


async def _ready_count(kube: KubeClient, n: int) -> bool:
    status = await status_of(kube)
    return status.get("phase") == "Ready" and status.get("readyInstances") == n


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"vmType": "huge"}, "vmType 'huge' is not a vm_type of the BOSH cloud config (it has: large, medium, small)"),
        ({"azs": ["z1", "z9"]}, "z9"),
        ({"storage": {"diskType": "50GB"}}, "50GB"),
    ],
)
async def test_semantic_errors_set_ready_false_and_change_nothing(kube_api, kube, director, spec, message):
    _, url, _ = kube_api
    async with running_operator(url, director):
        await kube.create(PATH, cluster(**spec))
        status = await eventually(lambda: _condition_reason(kube, "Ready", "InvalidSpec"), timeout=20)
        ready = condition(status, "Ready")
        assert ready["status"] == "False"
        assert message in ready["message"]
        assert "nothing was deployed" in ready["message"]
        assert director.count("deploy") == 0 and director.deployments == {}
        assert status.get("phase", "Pending") == "Pending"
        warnings = await eventually(lambda: _events_with_reason(kube, "InvalidSpec"))
        assert warnings[0]["type"] == "Warning" and message in warnings[0]["message"]
        # Nothing else was made or recorded: no Secret, no deployment name, no Secret name.
        assert "deployment" not in status and "credentialsSecret" not in status
        with pytest.raises(NotFound):
            await kube.get_secret("default", "demo-pgbosh-credentials")
        assert await kube.list(core_path("secrets", "default")) == []


async def test_a_ready_cluster_edited_to_an_unknown_vm_type_keeps_its_deployment(kube_api, kube, director):
    api, url, _ = kube_api
    async with running_operator(url, director, resync_seconds=0.1):
        await kube.create(PATH, cluster(vmType="small"))
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=30, interval=0.05)
        before = await status_of(kube)
        manifests = dict(director.deployments)
        assert director.count("deploy") == 1 and len(manifests) == 1

        await kube.merge_patch(f"{PATH}/demo", {"spec": {"vmType": "huge"}})
        status = await eventually(lambda: _condition_reason(kube, "Ready", "InvalidSpec"), timeout=20)
        ready = condition(status, "Ready")
        assert ready["status"] == "False" and "vmType 'huge'" in ready["message"]
        assert ready["observedGeneration"] == 2
        warnings = await eventually(lambda: _events_with_reason(kube, "InvalidSpec"))
        assert warnings[0]["type"] == "Warning"
        # Many reconciles later (resync 0.1 s): no deploy, the deployment and its manifest as they were.
        reads = _reads_of(api, "demo")
        await eventually(lambda: _reads_of(api, "demo") > reads + 10, timeout=20)
        status = await status_of(kube)
        assert director.count("deploy") == 1 and director.deployments == manifests
        assert status["deployment"] == before["deployment"] and status["boshTask"] == before["boshTask"]
        assert status["observedGeneration"] == before["observedGeneration"] == 1
        assert len(await _events_with_reason(kube, "InvalidSpec")) == 1  # said once, not per reconcile

        await kube.merge_patch(f"{PATH}/demo", {"spec": {"vmType": "small"}})
        status = await eventually(lambda: _condition_reason(kube, "Ready", "AllInstancesRunning"), timeout=20)
        assert condition(status, "Ready")["status"] == "True" and status["phase"] == "Ready"
        assert condition(status, "SpecValid")["status"] == "True"
        assert status["observedGeneration"] == 3
        assert director.count("deploy") == 1 and director.deployments == manifests


async def test_a_stored_spec_that_does_not_parse_is_reported_not_retried(kube_api, kube, director, caplog):
    api, url, _ = kube_api
    # Stored before the CRD refused reserved parameters: admission never saw it (and ratchets
    # the rule on an unchanged value, as the API server does), the operator's model refuses it.
    body = cluster(parameters={"port": "6543"})
    body["metadata"].update(generation=1)
    api.objects[kmock.resource("pgbosh.dev/v1alpha1/postgresclusters"), "default", "demo"] = api._stamp(body)
    async with running_operator(url, director, resync_seconds=0.2):
        status = await eventually(lambda: _condition_reason(kube, "Ready", "InvalidSpec"), timeout=20)
        ready = condition(status, "Ready")
        assert ready["status"] == "False" and ready["observedGeneration"] == 1
        assert "spec.parameters" in ready["message"] and "port" in ready["message"]
        assert "nothing was deployed" in ready["message"]
        warnings = await eventually(lambda: _events_with_reason(kube, "InvalidSpec"))
        assert warnings[0]["type"] == "Warning" and "spec.parameters" in warnings[0]["message"]
        # Not a hot loop: at most one look per resync, and the Warning is posted once.
        reads = _reads_of(api, "demo")
        import asyncio

        await asyncio.sleep(2)
        assert _reads_of(api, "demo") - reads <= 15
        assert len(await _events_with_reason(kube, "InvalidSpec")) == 1
        # kopf was told the change cannot work (PermanentError): its handler ran once, not retried.
        permanent = [r.getMessage() for r in caplog.records if "failed permanently" in r.getMessage()]
        assert len(permanent) == 1 and "the spec cannot work: spec.parameters" in permanent[0], permanent
        assert director.calls == [] and director.deployments == {}
        assert "deployment" not in status and "credentialsSecret" not in status
        assert await kube.list(core_path("secrets", "default")) == []

        # Fixed: the cluster is created as usual.
        await kube.merge_patch(f"{PATH}/demo", {"spec": {"parameters": {"port": None}}})
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=30, interval=0.05)
        assert director.count("deploy") == 1


def _reads_of(api: Any, name: str) -> int:
    """GETs of one PostgresCluster the emulator served: one per reconcile step."""
    return sum(
        1
        for r in api._requests
        if str(r.method).upper().endswith("GET") and r.name == name and "postgresclusters" in str(r.resource)
    )


async def _events_with_reason(kube: KubeClient, reason: str) -> list[dict[str, Any]]:
    return [e for e in await events_for(kube) if e["reason"] == reason]


async def _condition_reason(kube: KubeClient, type_: str, reason: str) -> dict[str, Any] | None:
    status = await status_of(kube)
    return status if condition(status, type_).get("reason") == reason else None


async def test_failed_task_is_reported_and_not_retried_until_the_spec_changes(kube_api, kube, director):
    _, url, _ = kube_api
    director.fail_next_deploy = "Instance 'postgres/0' failed to start"
    async with running_operator(url, director, resync_seconds=0.2):
        await kube.create(PATH, cluster())
        status = await eventually(lambda: _phase_status(kube, "Failed"), timeout=30)
        ready = condition(status, "Ready")
        assert ready["reason"] == "DeployFailed"
        assert "failed to start" in ready["message"] and "pgbosh.dev/redeploy" in ready["message"]
        calls = len(director.calls)
        await eventually(lambda: len(director.calls) > calls + 5, timeout=10)
        assert director.count("deploy") == 1  # no retry loop on a manifest that failed
        await kube.merge_patch(f"{PATH}/demo", {"metadata": {"annotations": {"pgbosh.dev/redeploy": "1"}}})
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=30)
        assert director.count("deploy") == 2


async def _phase_status(kube: KubeClient, phase: str) -> dict[str, Any] | None:
    status = await status_of(kube)
    return status if status.get("phase") == phase else None


async def test_director_down_is_reported_with_backoff_not_a_storm(kube_api, kube, director):
    _, url, _ = kube_api
    director.down = True
    async with running_operator(url, director):
        await kube.create(PATH, cluster())
        status = await eventually(lambda: _condition_reason(kube, "Ready", "DirectorUnavailable"), timeout=20)
        assert "connection refused" in condition(status, "Ready")["message"]
        import asyncio

        before = len(director.calls)
        await asyncio.sleep(6)
        # Backoff 2s, 4s, 8s...: at most a few attempts in six seconds, never a storm.
        assert len(director.calls) - before <= 4
        director.down = False
        await eventually(lambda: _phase_is(kube, "Ready"), timeout=60)


async def test_operator_restarted_during_a_task_resumes_it_without_a_second_deploy(kube_api, kube):
    _, url, _ = kube_api
    slow = FakeDirector(polls_per_task=1000)
    async with running_operator(url, slow):
        await kube.create(PATH, cluster())
        status = await eventually(lambda: _phase_status(kube, "Provisioning"), timeout=20)
        await eventually(lambda: _task_state(kube, "processing"), timeout=20)
    task_id = (await status_of(kube))["boshTask"]["id"]
    assert slow.count("deploy") == 1
    # The task finishes while no operator runs; a new operator picks the recorded task up.
    slow.tasks_by_id[task_id].polls_left = 1
    async with running_operator(url, slow):
        status = await eventually(lambda: _phase_status(kube, "Ready"), timeout=30)
    assert slow.count("deploy") == 1
    assert status["boshTask"]["id"] == task_id


async def test_restart_between_deploy_and_status_write_adopts_the_running_task(kube_api, kube):
    _, url, _ = kube_api
    director = FakeDirector(polls_per_task=1000)
    # A deploy that was started (by a previous operator that died before writing the status).
    await kube.create(PATH, cluster())
    body = await kube.get(f"{PATH}/demo")
    from controller.operator.reconcile import context_id

    orphan = await director.deploy(
        "name: pgbosh-default-demo\ninstance_groups: [{name: postgres, instances: 3, azs: [z1, z2, z3]}]\n",
        context_id=context_id(body["metadata"]["uid"]),
    )
    async with running_operator(url, director):
        await eventually(lambda: _task_state(kube, "processing"), timeout=20)
        assert (await status_of(kube))["boshTask"]["id"] == orphan
        assert director.count("deploy") == 1


async def _task_state(kube: KubeClient, state: str) -> bool:
    return ((await status_of(kube)).get("boshTask") or {}).get("state") == state
