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
        state="started",
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


# --- the primary, Consul and fencing ------------------------------------------------------

from controller.consul.types import Member, Published  # noqa: E402
from controller.reconcile.planner import Fence, PublishPrimary, StartJob  # noqa: E402


def settled(**changes: Any) -> Observed:
    status = changes.pop(
        "status", PostgresClusterStatus.model_validate({"lastDeployedGeneration": 1, "phase": "Ready"})
    )
    base: dict[str, Any] = {
        "status": status,
        "deployed": True,
        "deployed_matches": True,
        "instances": tuple(running(i) for i in range(3)),
        "consul_service": "pg-default-demo",
    }
    base.update(changes)
    return observed(**base)


def primary_at(i: int, timeline: int = 1, lsn: int = 1000) -> NodeState:
    return NodeState(f"127.1.0.{10 + i}", True, in_recovery=False, timeline=timeline, current_lsn=lsn)


def standby_at(i: int, timeline: int = 1, replayed: int = 900) -> NodeState:
    return NodeState(f"127.1.0.{10 + i}", True, in_recovery=True, timeline=timeline, replayed_lsn=replayed)


def test_consul_is_pointed_at_the_primary_and_replicas() -> None:
    nodes = (primary_at(0), standby_at(1), standby_at(2))
    result = plan(SPEC, settled(nodes=nodes, published=Published((), ())))
    assert PublishPrimary("127.1.0.10", ("127.1.0.11", "127.1.0.12")) in result.actions
    assert result.status.current_primary == "postgres/id-0"
    roles = [i.role for i in result.status.instances]
    assert roles == ["primary", "replica", "replica"]


def test_published_records_that_match_change_nothing() -> None:
    nodes = (primary_at(0), standby_at(1), standby_at(2))
    published = Published((Member("127.1.0.10"),), (Member("127.1.0.11"), Member("127.1.0.12")))
    result = plan(SPEC, settled(nodes=nodes, published=published))
    assert result.actions == []


def test_no_writable_node_is_failing_over() -> None:
    nodes = (NodeState("127.1.0.10", False, error="refused"), standby_at(1), standby_at(2))
    result = plan(SPEC, settled(nodes=nodes, published=Published((Member("127.1.0.10"),), ())))
    assert result.status.phase == Phase.FAILING_OVER
    assert cond(result.status, "Ready") == ("False", "NoPrimary")
    assert result.requeue_after == 1.0
    assert not any(isinstance(a, PublishPrimary) for a in result.actions)


def test_new_primary_moves_the_record_and_the_stale_one_is_fenced() -> None:
    status = PostgresClusterStatus.model_validate(
        {"lastDeployedGeneration": 1, "phase": "Ready", "currentPrimary": "postgres/id-0"}
    )
    nodes = (primary_at(0, timeline=1, lsn=500), primary_at(1, timeline=2, lsn=900), standby_at(2, timeline=2))
    published = Published((Member("127.1.0.10"),), (Member("127.1.0.11"), Member("127.1.0.12")))
    result = plan(SPEC, settled(status=status, nodes=nodes, published=published))
    assert Fence("id-0", "127.1.0.10") in result.actions
    assert PublishPrimary("127.1.0.11", ("127.1.0.12",)) in result.actions
    assert result.status.current_primary == "postgres/id-1"
    assert result.status.fenced == ["postgres/id-0"]
    assert {"Fenced", "PrimaryChanged", "PrimaryPublished"} <= {e.reason for e in result.events}


def test_fenced_node_is_started_again_then_forgotten_once_it_replicates() -> None:
    status = PostgresClusterStatus.model_validate(
        {"lastDeployedGeneration": 1, "phase": "Degraded", "fenced": ["postgres/id-0"]}
    )
    instances = (running(0, job_state="stopped"), running(1), running(2))
    nodes = (NodeState("127.1.0.10", False), primary_at(1, timeline=2), standby_at(2, timeline=2))
    result = plan(SPEC, settled(status=status, instances=instances, nodes=nodes, published=None))
    assert StartJob("id-0") in result.actions
    rejoined = plan(
        SPEC,
        settled(
            status=result.status,
            nodes=(standby_at(0, timeline=2), primary_at(1, timeline=2), standby_at(2, timeline=2)),
        ),
    )
    assert rejoined.status.fenced == []
    assert not any(isinstance(a, StartJob) for a in rejoined.actions)


def test_consul_follows_the_primary_even_while_a_task_runs() -> None:
    status = PostgresClusterStatus.model_validate({"lastDeployedGeneration": 1, "phase": "Updating"})
    task = Task(id=9, state="processing", description="create deployment")
    nodes = (standby_at(0, timeline=2), primary_at(1, timeline=2))
    result = plan(SPEC, settled(status=status, task=task, instances=None, nodes=nodes, published=Published((), ())))
    assert result.actions == [PublishPrimary("127.1.0.11", ("127.1.0.10",))]


def test_an_invalid_edit_of_a_running_cluster_keeps_it_highly_available() -> None:
    """vmType edited to one the cloud config lacks: nothing is deployed, but a failover that
    happens meanwhile still moves Consul's record and fences the stale primary."""
    status = PostgresClusterStatus.model_validate(
        {"lastDeployedGeneration": 1, "phase": "Ready", "currentPrimary": "postgres/id-0", "deployment": "d"}
    )
    nodes = (primary_at(0, timeline=1, lsn=500), primary_at(1, timeline=2, lsn=900), standby_at(2, timeline=2))
    published = Published((Member("127.1.0.10"),), (Member("127.1.0.11"), Member("127.1.0.12")))
    errors = ("vmType 'huge' is not a vm_type",)
    result = plan(SPEC, settled(status=status, nodes=nodes, published=published, spec_errors=errors))
    assert not any(isinstance(a, Deploy) for a in result.actions)
    assert Fence("id-0", "127.1.0.10") in result.actions
    assert PublishPrimary("127.1.0.11", ("127.1.0.12",)) in result.actions
    assert result.status.current_primary == "postgres/id-1"
    assert result.status.deployment == "d"
    assert cond(result.status, "Ready") == ("False", "InvalidSpec")
    assert {"InvalidSpec", "Fenced", "PrimaryChanged"} <= {e.reason for e in result.events}
    # Without an observation (a new cluster), only the condition is written.
    fresh = plan(SPEC, observed(spec_errors=errors))
    assert fresh.actions == [] and fresh.status.instances == []
