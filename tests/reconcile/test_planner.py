"""The planner is pure: every decision is checked here without I/O."""

from __future__ import annotations

from typing import Any

from controller.api.models import Phase, PostgresClusterSpec, PostgresClusterStatus
from controller.bosh.types import Instance, Process, Task
from controller.pg.types import NodeState
from controller.reconcile.planner import (
    DeleteDeployment,
    Deploy,
    Observed,
    SetResurrection,
    choose_primary,
    plan,
)

SPEC = PostgresClusterSpec.model_validate({"instances": 3})


def observed(**changes: Any) -> Observed:
    base: dict[str, Any] = {
        "generation": 1,
        "deployment": "pgbosh-default-demo",
        "status": PostgresClusterStatus.model_validate({}),
        "desired_hash": "h1",
        "deployed": False,
        "deployed_matches": None,
    }
    base.update(changes)
    return Observed(**base)


def running(i: int, *, paused: bool = False, job_state: str = "running") -> Instance:
    return Instance(
        job_name="postgres",
        index=i,
        id=f"id-{i}",
        az=f"z{i % 3 + 1}",
        ips=(f"127.1.0.{10 + i}",),
        job_state=job_state,
        processes=(Process("postgres", job_state),),
        resurrection_paused=paused,
    )


def cond(status: PostgresClusterStatus, type_: str) -> tuple[str, str]:
    c = next(c for c in status.conditions if c.type == type_)
    return c.status, c.reason


def test_new_cluster_is_deployed_and_provisioning() -> None:
    result = plan(SPEC, observed())
    assert result.actions == [Deploy("h1", "create the deployment")]
    assert result.status.phase == Phase.PROVISIONING
    assert cond(result.status, "Ready") == ("False", "Provisioning")
    assert [e.reason for e in result.events] == ["PhaseProvisioning", "Deploying"]


def test_running_task_is_waited_for_not_redeployed() -> None:
    task = Task(id=7, state="processing", description="create deployment")
    result = plan(SPEC, observed(task=task, task_progress="Updating instance postgres/0"))
    assert result.actions == []
    assert result.status.bosh_task is not None and result.status.bosh_task.id == 7
    assert cond(result.status, "Progressing") == ("True", "TaskRunning")
    assert result.requeue_after is not None and result.requeue_after <= 5


def test_finished_task_then_instances_running_gives_ready() -> None:
    status = PostgresClusterStatus.model_validate(
        {"boshTask": {"id": 7, "state": "processing"}, "phase": "Provisioning"}
    )
    result = plan(
        SPEC,
        observed(
            status=status,
            task=Task(id=7, state="done", description="create deployment"),
            deployed=True,
            deployed_matches=True,
            instances=tuple(running(i) for i in range(3)),
        ),
    )
    assert result.status.phase == Phase.READY
    assert result.status.ready_instances == 3 and result.status.last_deployed_generation == 1
    assert cond(result.status, "Ready") == ("True", "AllInstancesRunning")
    assert "TaskSucceeded" in [e.reason for e in result.events]


def test_failed_task_fails_and_is_not_retried_with_the_same_manifest() -> None:
    status = PostgresClusterStatus.model_validate({"boshTask": {"id": 7, "state": "processing"}})
    failed = Task(id=7, state="error", description="create deployment", result="vm_type 'x' not found")
    result = plan(SPEC, observed(status=status, task=failed))
    assert result.status.phase == Phase.FAILED
    assert cond(result.status, "Ready") == ("False", "DeployFailed")
    again = plan(SPEC, observed(status=result.status, task=failed))
    assert again.actions == []
    retried = plan(SPEC, observed(status=result.status, task=failed, redeploy_token="1"))
    assert retried.actions and isinstance(retried.actions[0], Deploy)


def test_changed_manifest_redeploys_as_updating() -> None:
    status = PostgresClusterStatus.model_validate({"lastDeployedGeneration": 1, "phase": "Ready"})
    result = plan(SPEC, observed(generation=2, status=status, deployed=True, deployed_matches=False))
    assert result.actions == [Deploy("h1", "the manifest changed")]
    assert result.status.phase == Phase.UPDATING


def test_settled_cluster_does_nothing() -> None:
    status = PostgresClusterStatus.model_validate({"lastDeployedGeneration": 1, "phase": "Ready"})
    result = plan(
        SPEC,
        observed(status=status, deployed=True, deployed_matches=True, instances=tuple(running(i) for i in range(3))),
    )
    assert result.actions == [] and result.events == []
    assert result.status.phase == Phase.READY


def test_instance_down_is_degraded_with_names() -> None:
    status = PostgresClusterStatus.model_validate({"lastDeployedGeneration": 1, "phase": "Ready"})
    instances = (running(0), running(1), running(2, job_state="failing"))
    result = plan(SPEC, observed(status=status, deployed=True, deployed_matches=True, instances=instances))
    assert result.status.phase == Phase.DEGRADED
    ready = next(c for c in result.status.conditions if c.type == "Ready")
    assert ready.status == "False" and "postgres/id-2" in ready.message and "2/3" in ready.message


def test_semantic_errors_change_nothing_but_the_condition() -> None:
    result = plan(SPEC, observed(spec_errors=("vmType 'huge' is not a vm_type",)))
    assert result.actions == []
    assert result.status.phase == Phase.PENDING
    assert cond(result.status, "Ready") == ("False", "InvalidSpec")
    assert [e.reason for e in result.events] == ["InvalidSpec"]
    # The same error again does not post the event again.
    again = plan(SPEC, observed(status=result.status, spec_errors=("vmType 'huge' is not a vm_type",)))
    assert again.events == []


def test_director_errors_back_off() -> None:
    delays = [plan(SPEC, observed(director_error="refused", director_failures=n)).requeue_after for n in range(8)]
    assert delays == sorted(delays) and delays[0] == 2.0 and delays[-1] == 60.0


def test_paused_cluster_is_observed_only() -> None:
    paused = PostgresClusterSpec.model_validate({"instances": 3, "paused": True})
    result = plan(paused, observed(deployed=True, deployed_matches=False, instances=(running(0),)))
    assert result.actions == []
    assert cond(result.status, "Progressing") == ("False", "Paused")


def test_resurrection_follows_the_spec() -> None:
    off = PostgresClusterSpec.model_validate({"instances": 2, "resurrection": False})
    result = plan(off, observed(deployed=True, deployed_matches=True, instances=(running(0), running(1, paused=True))))
    assert result.actions == [SetResurrection("id-0", paused=True)]


def test_delete_deletes_then_finishes() -> None:
    result = plan(SPEC, observed(deleting=True, deployed=True))
    assert result.actions == [DeleteDeployment("pgbosh-default-demo")]
    assert result.status.phase == Phase.DELETING
    waiting = plan(
        SPEC,
        observed(deleting=True, deployed=True, task=Task(id=9, state="processing", description="delete deployment x")),
    )
    assert waiting.actions == [] and not waiting.deleted
    done = plan(SPEC, observed(deleting=True, deployed=False))
    assert done.deleted


def test_primary_is_the_writable_node_on_the_highest_timeline() -> None:
    nodes = [
        NodeState("a", True, in_recovery=False, timeline=1, current_lsn=100),
        NodeState("b", True, in_recovery=False, timeline=2, current_lsn=50),
        NodeState("c", True, in_recovery=True, timeline=2),
        NodeState("d", False),
    ]
    primary = choose_primary(nodes)
    assert primary is not None and primary.address == "b"
    assert choose_primary([NodeState("c", True, in_recovery=True)]) is None
