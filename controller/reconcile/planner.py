"""The planner: a pure function from (spec, observed world) to the next actions.

Every decision the operator makes about a PostgresCluster is taken here, from
values the handlers gathered; nothing here does I/O, so every branch has a fast
unit test. The handlers execute the actions and write the status it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from controller.api.models import (
    BoshTaskStatus,
    Condition,
    Endpoint,
    InstanceStatus,
    Phase,
    PostgresClusterSpec,
    PostgresClusterStatus,
    set_condition,
)
from controller.bosh.types import Instance, Task
from controller.consul.types import Published
from controller.pg.types import NodeState, choose_primary

# Seconds until the next look, by situation. Named so that they can be tuned and tested.
POLL_TASK_SECONDS = 2.0
POLL_CONVERGING_SECONDS = 5.0
DIRECTOR_RETRY_SECONDS = (2.0, 4.0, 8.0, 16.0, 32.0, 60.0)

COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_SPEC_VALID = "SpecValid"

REDEPLOY_ANNOTATION = "pgbosh.dev/redeploy"


@dataclass(frozen=True)
class Deploy:
    manifest_hash: str
    reason: str


@dataclass(frozen=True)
class DeleteDeployment:
    deployment: str


@dataclass(frozen=True)
class SetResurrection:
    instance_id: str
    paused: bool


@dataclass(frozen=True)
class PublishPrimary:
    """Point `master.<service>` at the primary and `replica.<service>` at the standbys."""

    primary: str | None
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class Fence:
    """Stop the job of a node that accepts writes but is not the primary."""

    instance_id: str
    address: str


@dataclass(frozen=True)
class StartJob:
    """Start a fenced node's job again: its agent rejoins it as a replica of the primary."""

    instance_id: str


@dataclass(frozen=True)
class WithdrawService:
    service: str


Action = Deploy | DeleteDeployment | SetResurrection | PublishPrimary | Fence | StartJob | WithdrawService


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """Everything the handlers found out, as plain values."""

    generation: int
    deployment: str
    status: PostgresClusterStatus
    deleting: bool = False
    # The director could not be asked (down, 5xx, timeouts): what went wrong, in words.
    director_error: str | None = None
    director_failures: int = 0
    # Semantic checks against the cloud config; empty when the spec fits.
    spec_errors: tuple[str, ...] = ()
    # Hash of the manifest the spec renders to (without secrets) and whether the
    # director's copy of the deployment matches it (None: no deployment).
    desired_hash: str = ""
    deployed: bool | None = None
    deployed_matches: bool | None = None
    # The task recorded in status (or adopted by context id), freshly read.
    task: Task | None = None
    task_progress: str | None = None
    instances: tuple[Instance, ...] | None = None
    nodes: tuple[NodeState, ...] | None = None
    endpoint_host: str | None = None
    redeploy_token: str = ""
    # What Consul publishes for the cluster now (None: not asked, or no Consul).
    published: Published | None = None
    consul_service: str | None = None


@dataclass
class Plan:
    status: PostgresClusterStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Seconds until the next reconcile; None: the resync period.
    requeue_after: float | None = None
    # Deletion finished: the finalizer may go.
    deleted: bool = False


def _attempt_key(observed: Observed) -> str:
    return f"{observed.desired_hash}:{observed.redeploy_token}"


class _Builder:
    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self.status = observed.status.model_copy(deep=True)
        self.events: list[Event] = []

    def condition(self, type_: str, status: Literal["True", "False", "Unknown"], reason: str, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, self.observed.generation
        )

    def phase(self, phase: Phase, message: str) -> None:
        if self.status.phase != phase:
            kind: Literal["Normal", "Warning"] = (
                "Warning" if phase in (Phase.FAILED, Phase.DEGRADED, Phase.FAILING_OVER) else "Normal"
            )
            self.events.append(Event(kind, f"Phase{phase.value}", message))
        self.status.phase = phase

    def plan(self, **kwargs: object) -> Plan:
        return Plan(status=self.status, events=self.events, **kwargs)  # type: ignore[arg-type]


def _task_status(task: Task, progress: str | None) -> BoshTaskStatus:
    return BoshTaskStatus.model_validate(
        {"id": task.id, "state": task.state, "description": task.description, "progress": progress}
    )


def _invalid_spec(b: _Builder, problems: str) -> Plan:
    """Say what is wrong (Ready=False, SpecValid=False, one Warning per new message), change nothing else."""
    message = problems + ". Fix the spec: nothing was deployed or changed."
    already = any(
        c.type == COND_SPEC_VALID and c.status == "False" and c.message == message for c in b.status.conditions
    )
    b.condition(COND_SPEC_VALID, "False", "InvalidSpec", message)
    b.condition(COND_READY, "False", "InvalidSpec", message)
    if not already:
        b.events.append(Event("Warning", "InvalidSpec", message))
    # No requeue of its own: the next spec change wakes the cluster, a resync looks again.
    return b.plan()


def plan_unparseable(status: PostgresClusterStatus, generation: int, problems: str) -> Plan:
    """A stored spec that does not parse (it got past admission, e.g. stored before the CRD
    changed): the cluster cannot be planned at all. Report it where the user looks."""
    b = _Builder(Observed(generation=generation, deployment=status.deployment or "", status=status))
    return _invalid_spec(b, f"The spec cannot work: {problems}")


def plan(spec: PostgresClusterSpec, observed: Observed) -> Plan:
    b = _Builder(observed)
    if observed.deleting:
        b.status.deployment = observed.deployment
        return _plan_delete(b, observed)

    if observed.director_error is not None:
        b.status.deployment = observed.deployment
        delay = DIRECTOR_RETRY_SECONDS[min(observed.director_failures, len(DIRECTOR_RETRY_SECONDS) - 1)]
        b.condition(
            COND_READY,
            "False" if b.status.phase in (Phase.PENDING, Phase.PROVISIONING) else "Unknown",
            "DirectorUnavailable",
            f"Cannot reach the BOSH Director: {observed.director_error}. Retrying in {delay:.0f}s; "
            "nothing is changed meanwhile.",
        )
        if observed.director_failures == 0:
            b.events.append(Event("Warning", "DirectorUnavailable", observed.director_error))
        return b.plan(requeue_after=delay)

    if observed.spec_errors:
        # Semantic errors change nothing else: no deployment name, Secret or deploy for a new
        # cluster, and an existing deployment is left exactly as it runs.
        invalid = _invalid_spec(b, "; ".join(observed.spec_errors))
        if observed.instances is None:
            return invalid
        # Deployed already: the instances are still reported and the primary still
        # followed (Consul, fencing), though nothing is deployed until the spec is fixed.
        _observe_instances(b, spec, observed)
        ha_actions, ha_requeue = _plan_primary(b, observed)
        return b.plan(actions=ha_actions, requeue_after=ha_requeue)
    b.status.deployment = observed.deployment
    b.condition(COND_SPEC_VALID, "True", "Valid", "The spec fits the BOSH cloud config.")

    _observe_instances(b, spec, observed)

    # A task of ours is running: wait for it, whatever else changed.
    task = observed.task
    if task is not None and not task.finished:
        b.status.bosh_task = _task_status(task, observed.task_progress)
        first = observed.status.last_deployed_generation is None
        b.phase(
            Phase.PROVISIONING if first else Phase.UPDATING,
            f"BOSH task {task.id} ({task.description}) is {task.state}",
        )
        b.condition(
            COND_PROGRESSING,
            "True",
            "TaskRunning",
            f"BOSH task {task.id} ({task.description}) is {task.state}"
            + (f": {observed.task_progress}" if observed.task_progress else ""),
        )
        if first:
            b.condition(COND_READY, "False", "Provisioning", "The VMs are being created; see Progressing.")
        # Consul follows the primary even while BOSH works; fencing waits for the task.
        ha_actions, _ = _plan_primary(b, observed, allow_bosh=False) if not first else ([], None)
        return b.plan(actions=ha_actions, requeue_after=POLL_TASK_SECONDS)

    recorded = observed.status.bosh_task
    if task is not None and recorded is not None and recorded.id == task.id and recorded.state != task.state:
        # The task we were waiting for just finished.
        b.status.bosh_task = _task_status(task, observed.task_progress)
        if task.succeeded:
            b.status.last_deployed_generation = observed.generation
            if task.description == "create deployment":
                b.status.deployed_hash = observed.desired_hash
            b.status.failed_attempt = None
            b.events.append(Event("Normal", "TaskSucceeded", f"BOSH task {task.id} ({task.description}) is done"))
            b.condition(COND_PROGRESSING, "False", "TaskDone", f"BOSH task {task.id} ({task.description}) is done.")
        else:
            b.status.failed_attempt = _attempt_key(observed)
            message = (
                f"BOSH task {task.id} ({task.description}) ended {task.state}: {task.result or 'no result'}. "
                f"Change the spec, or annotate the cluster with {REDEPLOY_ANNOTATION}=<new value> to retry."
            )
            b.events.append(Event("Warning", "TaskFailed", message))
            b.condition(COND_PROGRESSING, "False", "TaskFailed", message)
            b.condition(COND_READY, "False", "DeployFailed", message)
            b.phase(Phase.FAILED, message)
            return b.plan()

    if spec.paused:
        b.condition(COND_PROGRESSING, "False", "Paused", "spec.paused is true: pgbosh observes but changes nothing.")
        _derive_readiness(b, spec, observed)
        return b.plan()

    needs_deploy = observed.deployed is False or observed.deployed_matches is False
    if needs_deploy:
        if b.status.failed_attempt == _attempt_key(observed):
            # This exact manifest failed already: do not loop on it.
            return b.plan()
        reason = "create the deployment" if not observed.deployed else "the manifest changed"
        first = observed.status.last_deployed_generation is None and not observed.deployed
        b.phase(Phase.PROVISIONING if first else Phase.UPDATING, f"Deploying: {reason}")
        b.condition(COND_PROGRESSING, "True", "Deploying", f"Starting a BOSH deploy to {reason}.")
        if first:
            b.condition(COND_READY, "False", "Provisioning", "The VMs are being created.")
        b.events.append(Event("Normal", "Deploying", f"Deploying {observed.deployment}: {reason}"))
        return b.plan(actions=[Deploy(observed.desired_hash, reason)], requeue_after=POLL_TASK_SECONDS)

    if observed.deployed and b.status.last_deployed_generation is None:
        # Deployed before this status existed (adopted): record it as ours.
        b.status.last_deployed_generation = observed.generation
    if observed.deployed_matches and observed.desired_hash:
        b.status.deployed_hash = observed.desired_hash
    b.status.observed_generation = observed.generation
    actions: list[Action] = []
    for instance in observed.instances or ():
        # Only a full listing (state known) says whether resurrection is paused.
        if instance.state is not None and instance.resurrection_paused == spec.resurrection:
            actions.append(SetResurrection(instance.id, paused=not spec.resurrection))
    requeue = _derive_readiness(b, spec, observed)
    ha_actions, ha_requeue = _plan_primary(b, observed)
    actions += ha_actions
    if ha_requeue is not None:
        requeue = ha_requeue if requeue is None else min(requeue, ha_requeue)
    return b.plan(actions=actions, requeue_after=requeue)


FAILOVER_POLL_SECONDS = 1.0


def _plan_primary(b: _Builder, observed: Observed, allow_bosh: bool = True) -> tuple[list[Action], float | None]:
    """The primary, Consul's records, fencing and healing, from the nodes' own answers."""
    if not observed.nodes:
        return [], None
    actions: list[Action] = []
    instances = observed.instances or ()
    by_address = {inst.ips[0]: inst for inst in instances if inst.ips}
    primary = choose_primary(observed.nodes)
    if primary is None:
        if allow_bosh:
            message = (
                "No node accepts writes: repmgr is promoting a replica, and pgbosh moves "
                f"master.{observed.consul_service or '<service>'} to it as soon as it is writable."
            )
            b.phase(Phase.FAILING_OVER, message)
            b.condition(COND_READY, "False", "NoPrimary", message)
        return [], FAILOVER_POLL_SECONDS
    # Any other node that accepts writes is a stale primary: it must stop before clients
    # that still hold its address write to it.
    for node in observed.nodes if allow_bosh else ():
        if node.writable and node.address != primary.address:
            inst = by_address.get(node.address)
            if inst is not None and inst.name not in b.status.fenced:
                actions.append(Fence(inst.id, node.address))
                b.status.fenced = [*b.status.fenced, inst.name]
                b.events.append(
                    Event(
                        "Warning",
                        "Fenced",
                        f"{inst.name} ({node.address}) accepts writes on timeline {node.timeline} while "
                        f"{by_address[primary.address].name if primary.address in by_address else primary.address} "
                        f"is the primary on timeline {primary.timeline}: its job is stopped",
                    )
                )
    # A fenced node whose job is stopped comes back as a replica.
    still_fenced = []
    for name in b.status.fenced if allow_bosh else ():
        inst = next((i for i in instances if i.name == name), None)
        if inst is None:
            continue
        member = next((n for n in observed.nodes if inst.ips and n.address == inst.ips[0]), None)
        if inst.job_state == "stopped" and not any(isinstance(a, Fence) and a.instance_id == inst.id for a in actions):
            actions.append(StartJob(inst.id))
            b.events.append(Event("Normal", "Rejoining", f"Starting {name} again to rejoin as a replica"))
            still_fenced.append(name)
        elif member is not None and member.reachable and member.in_recovery:
            continue  # rejoined: no longer fenced
        else:
            still_fenced.append(name)
    if allow_bosh:
        b.status.fenced = still_fenced
    if observed.consul_service and observed.published is not None:
        replicas = tuple(sorted(n.address for n in observed.nodes if n.reachable and n.in_recovery))
        current_master = tuple(m.address for m in observed.published.primary)
        current_replicas = tuple(sorted(m.address for m in observed.published.replicas))
        if current_master != (primary.address,) or current_replicas != replicas:
            actions.append(PublishPrimary(primary.address, replicas))
            if current_master and current_master != (primary.address,):
                b.events.append(
                    Event("Normal", "PrimaryPublished", f"master.{observed.consul_service} now names {primary.address}")
                )
    return actions, (FAILOVER_POLL_SECONDS if actions else None)


def _observe_instances(b: _Builder, spec: PostgresClusterSpec, observed: Observed) -> None:
    if observed.instances is None:
        return
    nodes = {n.address: n for n in observed.nodes or ()}
    primary = choose_primary(observed.nodes or ())
    rows = []
    previous = {i.name: i.resurrection_paused for i in observed.status.instances}
    for inst in sorted(observed.instances, key=lambda i: (i.index if i.index is not None else 1 << 30, i.id)):
        address = inst.ips[0] if inst.ips else None
        node = nodes.get(address or "")
        role: Literal["primary", "replica", "unknown"] = "unknown"
        if node is not None and node.reachable:
            role = "primary" if primary is not None and node.address == primary.address else "replica"
        rows.append(
            InstanceStatus.model_validate(
                {
                    "name": inst.name,
                    "az": inst.az,
                    "address": address,
                    "role": role,
                    "state": "running" if inst.running else (inst.job_state or "unknown"),
                    "lagBytes": node.lag_bytes if node is not None and role == "replica" else None,
                    "resurrectionPaused": inst.resurrection_paused
                    if inst.state is not None
                    else previous.get(inst.name),
                }
            )
        )
    b.status.instances = rows
    b.status.instance_count = len(rows)
    b.status.ready_instances = sum(1 for i in observed.instances if i.running)
    if primary is not None:
        primary_row = next((r for r in rows if r.address == primary.address), None)
        if primary_row is not None and b.status.current_primary != primary_row.name:
            if b.status.current_primary is not None:
                b.events.append(
                    Event(
                        "Warning",
                        "PrimaryChanged",
                        f"Primary moved from {b.status.current_primary} to {primary_row.name}",
                    )
                )
            b.status.current_primary = primary_row.name
    if observed.endpoint_host:
        b.status.endpoint = Endpoint(host=observed.endpoint_host, port=5432)


def _derive_readiness(b: _Builder, spec: PostgresClusterSpec, observed: Observed) -> float | None:
    if observed.instances is None:
        return None
    running = b.status.ready_instances
    total = len(observed.instances)
    if total == spec.instances and running == total:
        b.condition(COND_READY, "True", "AllInstancesRunning", f"{running}/{spec.instances} instances are running.")
        b.condition(COND_PROGRESSING, "False", "Settled", "The deployment matches the spec.")
        b.phase(Phase.READY, f"{running}/{spec.instances} instances are running")
        return None
    down = [i.name for i in observed.instances if not i.running]
    message = (
        f"{running}/{spec.instances} instances are running"
        + (f"; not running: {', '.join(down)}" if down else "")
        + ". BOSH restarts failed jobs and resurrects lost VMs"
        + ("" if spec.resurrection else " (resurrection is off for this cluster)")
        + "."
    )
    b.condition(COND_READY, "False", "InstancesNotRunning", message)
    b.phase(Phase.DEGRADED, message)
    return POLL_CONVERGING_SECONDS


def _plan_delete(b: _Builder, observed: Observed) -> Plan:
    b.phase(Phase.DELETING, f"Deleting BOSH deployment {observed.deployment}")
    if observed.director_error is not None:
        delay = DIRECTOR_RETRY_SECONDS[min(observed.director_failures, len(DIRECTOR_RETRY_SECONDS) - 1)]
        b.condition(
            COND_READY,
            "False",
            "DirectorUnavailable",
            f"Cannot delete yet, the BOSH Director is unavailable: {observed.director_error}. "
            f"Retrying in {delay:.0f}s.",
        )
        return b.plan(requeue_after=delay)
    task = observed.task
    if task is not None and not task.finished:
        b.status.bosh_task = _task_status(task, observed.task_progress)
        b.condition(COND_READY, "False", "Deleting", f"BOSH task {task.id} ({task.description}) is {task.state}.")
        if task.description.startswith("delete"):
            return b.plan(requeue_after=POLL_TASK_SECONDS)
    if task is not None and task.finished and task.description.startswith("delete") and not task.succeeded:
        b.status.bosh_task = _task_status(task, observed.task_progress)
        message = f"BOSH task {task.id} ({task.description}) ended {task.state}: {task.result or 'no result'}"
        if observed.deployed:
            b.condition(COND_READY, "False", "DeleteFailed", message + "; retrying.")
            b.events.append(Event("Warning", "DeleteFailed", message))
            return b.plan(actions=[DeleteDeployment(observed.deployment)], requeue_after=POLL_TASK_SECONDS)
    if observed.deployed:
        b.condition(COND_READY, "False", "Deleting", f"Deleting BOSH deployment {observed.deployment}.")
        b.events.append(Event("Normal", "Deleting", f"Deleting BOSH deployment {observed.deployment}"))
        return b.plan(actions=[DeleteDeployment(observed.deployment)], requeue_after=POLL_TASK_SECONDS)
    b.events.append(Event("Normal", "Deleted", f"BOSH deployment {observed.deployment} is gone"))
    withdraw: list[Action] = [WithdrawService(observed.consul_service)] if observed.consul_service else []
    return b.plan(actions=withdraw, deleted=True)


__all__ = [
    "Action",
    "Condition",
    "DeleteDeployment",
    "Deploy",
    "Event",
    "Fence",
    "Observed",
    "Plan",
    "PublishPrimary",
    "SetResurrection",
    "StartJob",
    "WithdrawService",
    "choose_primary",
    "plan",
    "plan_unparseable",
]
