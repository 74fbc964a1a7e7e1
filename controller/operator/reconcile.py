"""One reconcile step of one PostgresCluster: gather, plan, act, record.

The handlers call :func:`reconcile_once`; it reads the resource fresh, asks the
Director (and later Consul and the nodes) what the world looks like, hands both
to the pure planner, executes the actions it returns, and writes the status.
A BOSH task is recorded in the status the moment it starts, before anything
waits on it, so an operator restarted at any point picks the task up again.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from controller.api import models
from controller.api.models import PostgresClusterSpec, PostgresClusterStatus
from controller.bosh.client import BoshError, DirectorUnavailable
from controller.bosh.config import BoshConfig
from controller.bosh.manifest import (
    check_against_cloud_config,
    consul_service_name,
    deployment_name,
    dump_manifest,
    interpolate_doc,
    manifest_dict,
    manifests_equal,
    primary_dns_name,
)
from controller.bosh.types import CloudConfig, Director, Instance, JobStateRequest, Task
from controller.consul.types import Member, PrimaryPublisher, Published
from controller.kube.client import Conflict, KubeClient, NotFound, core_path, resource_path
from controller.pg.probe import PsycopgProbe, probe_all
from controller.pg.types import NodeProbe, NodeState, connection_uri
from controller.reconcile import planner
from controller.reconcile.planner import (
    DeleteDeployment,
    Deploy,
    Fence,
    Observed,
    Plan,
    PublishPrimary,
    SetResurrection,
    StartJob,
    WithdrawService,
)

log = logging.getLogger(__name__)

CREDENTIALS_SUFFIX = "-pgbosh-credentials"
EventSink = Callable[[dict[str, Any], str, str, str], None]


@dataclass
class ClusterMemory:
    """What the operator keeps between steps of one cluster, all of it re-derivable."""

    director_failures: int = 0
    event_offset: dict[int, int] = field(default_factory=dict)
    last_progress: dict[int, str] = field(default_factory=dict)
    # The manifest hash this operator saw deployed (checked against the Director, not assumed).
    verified_hash: str | None = None
    # The admin login from the cluster's Secret (read once; pgbosh never rotates it silently).
    credentials: dict[str, str] | None = field(default=None, repr=False)
    # Rendering a manifest is YAML work: done again only when the spec changes.
    template: tuple[str, str, dict[str, Any]] | None = None
    # The deploy task this operator started, and the hash of the manifest it posted.
    deploy_task: tuple[int, str] | None = None
    manifest: tuple[str, str] | None = field(default=None, repr=False)


@dataclass
class Runtime:
    kube: KubeClient
    director: Director
    bosh: BoshConfig
    post_event: EventSink
    resync_seconds: float = 60.0
    cloud_config_ttl: float = 300.0
    publisher: PrimaryPublisher | None = None
    probe_nodes: bool = True
    # At most this many clusters reconcile at once: the Director, the Kubernetes API and
    # the HTTP pools see a bounded queue however many clusters there are.
    max_concurrent_reconciles: int = 16
    _slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_reconciles)
        return self._slots
    # How to reach the nodes with the cluster's admin login (replaceable for benchmarks).
    node_probe: Callable[[str, str], NodeProbe] = PsycopgProbe
    memory: dict[str, ClusterMemory] = field(default_factory=dict)
    _cloud: tuple[float, CloudConfig] | None = None

    async def cloud_config(self) -> CloudConfig:
        # Every cluster checks its spec against the cloud config; one fetch serves them all for a while.
        now = time.monotonic()
        if self._cloud is None or now - self._cloud[0] > self.cloud_config_ttl:
            self._cloud = (now, await self.director.cloud_config())
        return self._cloud[1]


def cluster_path(namespace: str, name: str, subresource: str | None = None) -> str:
    return resource_path(models.GROUP, models.VERSION, models.PLURAL, namespace, name, subresource)


def context_id(uid: str) -> str:
    """Ties every BOSH task pgbosh starts to its PostgresCluster (X-Bosh-Context-Id)."""
    return f"pgbosh-{uid}"


def status_patch(status: PostgresClusterStatus) -> dict[str, Any]:
    # A top-level None removes the field in a merge patch, so fields the planner cleared
    # disappear; inside objects and lists, unset fields are left out.
    full = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    for name, info in PostgresClusterStatus.model_fields.items():
        full.setdefault(info.alias or name, None)
    return {"status": full}


def endpoint_host(rt: Runtime, namespace: str, name: str) -> str:
    """The Consul DNS name that follows the primary (status.endpoint.host, the Secret's host)."""
    return primary_dns_name(consul_service_name(namespace, name, rt.bosh))


def connection_fields(rt: Runtime, namespace: str, name: str, username: str, password: str) -> dict[str, str]:
    """What a client needs besides the login: the DNS name, port, application database and a URI."""
    host = endpoint_host(rt, namespace, name)
    port = str(rt.bosh.postgres_port)
    # The node agent creates the BOSH manifest's initial databases; the first is the application's.
    dbname = rt.bosh.initial_databases[0] if rt.bosh.initial_databases else "postgres"
    return {"host": host, "port": port, "dbname": dbname, "uri": connection_uri(username, password, host, port, dbname)}


async def ensure_credentials(
    rt: Runtime, namespace: str, name: str, owner: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """The cluster's connection Secret: the admin login (generated once, never rotated silently,
    a user's own kept as it is) plus host, port, dbname and uri. Values never reach a log."""
    secret_name = f"{name}{CREDENTIALS_SUFFIX}"
    mem = rt.memory.setdefault(owner["metadata"]["uid"], ClusterMemory())
    if mem.credentials is not None:
        return secret_name, mem.credentials
    # A cluster whose status names its Secret has one: read it. A new cluster does not:
    # create it, and read it only if it exists after all (409).
    if (owner.get("status") or {}).get("credentialsSecret"):
        try:
            existing = await rt.kube.get_secret(namespace, secret_name)
            mem.credentials = await _complete_secret(rt, namespace, name, secret_name, existing)
            return secret_name, mem.credentials
        except NotFound:
            pass
    username, password = rt.bosh.admin_user, secrets.token_urlsafe(24)
    data = {"username": username, "password": password, **connection_fields(rt, namespace, name, username, password)}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "pgbosh", "pgbosh.dev/cluster": name},
            "ownerReferences": [
                {
                    "apiVersion": models.API_VERSION,
                    "kind": models.KIND,
                    "name": name,
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "stringData": data,
    }
    try:
        await rt.kube.create(core_path("secrets", namespace), body)
    except Conflict:
        existing = await rt.kube.get_secret(namespace, secret_name)
        mem.credentials = await _complete_secret(rt, namespace, name, secret_name, existing)
        return secret_name, mem.credentials
    mem.credentials = data
    return secret_name, data


async def _complete_secret(
    rt: Runtime, namespace: str, name: str, secret_name: str, existing: dict[str, str]
) -> dict[str, str]:
    """Add what an existing Secret (made by a user, or by an older pgbosh) lacks. A login that
    is there is kept: only missing keys and pgbosh's own connection fields are written."""
    wanted = dict(existing)
    wanted.setdefault("username", rt.bosh.admin_user)
    if not wanted.get("password"):
        wanted["password"] = secrets.token_urlsafe(24)
    wanted.update(connection_fields(rt, namespace, name, wanted["username"], wanted["password"]))
    changed = {key: value for key, value in wanted.items() if existing.get(key) != value}
    if changed:
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in changed.items()}
        await rt.kube.merge_patch(core_path("secrets", namespace, secret_name), {"data": encoded})
        log.info("completed secret %s/%s (keys: %s)", namespace, secret_name, ", ".join(sorted(changed)))
    return wanted


async def _probe_nodes(
    rt: Runtime,
    status: PostgresClusterStatus,
    instances: tuple[Any, ...] | None,
    credentials: dict[str, str],
) -> list[NodeState] | None:
    if not rt.probe_nodes:
        return None
    if instances is not None:
        addresses = [i.ips[0] for i in instances if i.ips]
    else:
        addresses = [i.address for i in status.instances if i.address]
    if not addresses:
        return None
    probe = rt.node_probe(credentials.get("username", rt.bosh.admin_user), credentials["password"])
    return await probe_all(probe, addresses, rt.bosh.postgres_port)


async def _published(rt: Runtime, service: str) -> Published | None:
    if rt.publisher is None:
        return None
    try:
        return await rt.publisher.published(service)
    except Exception as exc:  # Consul down must not stop BOSH reconciliation
        log.warning("cannot read Consul's records of %s: %s", service, exc)
        return None


def _template(rt: Runtime, mem: ClusterMemory, namespace: str, name: str, spec: PostgresClusterSpec) -> str:
    key = spec.model_dump_json(by_alias=True)
    if mem.template is None or mem.template[0] != key:
        doc = manifest_dict(namespace, name, spec, rt.bosh)
        mem.template = (key, dump_manifest(doc), doc)
    return mem.template[1]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def _task_with_progress(rt: Runtime, mem: ClusterMemory, task_id: int) -> tuple[Task, str | None]:
    task = await rt.director.task(task_id)
    offset = mem.event_offset.get(task_id, 0)
    try:
        events, offset = await rt.director.task_events(task_id, offset)
    except BoshError:
        events = []
    mem.event_offset[task_id] = offset
    if events:
        mem.last_progress[task_id] = events[-1].summary
    return task, mem.last_progress.get(task_id)


async def gather(
    rt: Runtime, body: dict[str, Any], spec: PostgresClusterSpec, status: PostgresClusterStatus, deleting: bool
) -> tuple[Observed, str]:
    """Ask the world; returns the observation and the interpolated manifest to deploy."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    mem = rt.memory.setdefault(uid, ClusterMemory())
    deployment = deployment_name(namespace, name, rt.bosh)
    service = consul_service_name(namespace, name, rt.bosh)
    annotations = meta.get("annotations") or {}
    base: dict[str, Any] = {
        "generation": int(meta.get("generation") or 1),
        "deployment": deployment,
        "status": status,
        "deleting": deleting,
        "endpoint_host": endpoint_host(rt, namespace, name),
        "redeploy_token": str(annotations.get(planner.REDEPLOY_ANNOTATION, "")),
    }
    manifest = ""
    try:
        task: Task | None = None
        progress: str | None = None
        recorded = status.bosh_task
        if recorded is not None:
            if recorded.state in ("queued", "processing", "cancelling"):
                task, progress = await _task_with_progress(rt, mem, recorded.id)
            else:
                task = Task(id=recorded.id, state=recorded.state, description=recorded.description)
        if deleting:
            deployed_text = await rt.director.deployed_manifest(deployment)
            mem.director_failures = 0
            consul = service if rt.publisher is not None else None
            return (
                Observed(
                    **base, task=task, task_progress=progress, deployed=deployed_text is not None, consul_service=consul
                ),
                manifest,
            )
        # Semantic checks first: a spec the cloud config cannot serve changes nothing, so
        # nothing below (the Secret, the manifest, the deploy) is even prepared.
        cloud = await rt.cloud_config()
        spec_errors = tuple(check_against_cloud_config(spec, cloud, rt.bosh))
        if spec_errors:
            mem.director_failures = 0
            ha: dict[str, Any] = {}
            running = status.last_deployed_generation is not None and (task is None or task.finished)
            if running and status.credentials_secret:
                # A running cluster edited into a spec that cannot work keeps its high
                # availability: the nodes are still observed, Consul follows the primary and a
                # second writer is still fenced. Only the deploy waits for a valid spec.
                _, credentials = await ensure_credentials(rt, namespace, name, body)
                listed = tuple(await rt.director.instances(deployment))
                probed = await _probe_nodes(rt, status, listed, credentials)
                ha = {
                    "instances": listed,
                    "nodes": tuple(probed) if probed is not None else None,
                    "published": await _published(rt, service) if probed else None,
                    "consul_service": service if rt.publisher is not None else None,
                }
            return Observed(**base, spec_errors=spec_errors, task=task, task_progress=progress, **ha), manifest
        template = _template(rt, mem, namespace, name, spec)
        desired_hash = _hash(template)
        idle = task is None or task.finished
        # Steady state: what this operator deployed (or verified) is still what the spec renders
        # to. Then one Director request per resync (the instance list) is enough; the nodes'
        # own answers tell whether PostgreSQL runs. Anything unexpected falls back to the
        # full check (the deployed manifest and the agents' job states).
        steady = (
            rt.probe_nodes
            and idle
            and status.last_deployed_generation == base["generation"]
            and status.deployed_hash == desired_hash
            and mem.verified_hash == desired_hash
        )
        # The deploy this operator started with this very manifest runs or is done: the
        # Director has it, no need to download and compare it (instances are still listed in
        # full once it is done).
        ours = (
            task is not None
            and task.state in ("queued", "processing", "done")
            and mem.deploy_task == (task.id, desired_hash)
        )
        if ours and task is not None and task.state == "done":
            mem.verified_hash = desired_hash
        known = steady or ours
        deployed_text = None if known else await rt.director.deployed_manifest(deployment)
        deployed = known or deployed_text is not None
        _, credentials = await ensure_credentials(rt, namespace, name, body)
        if mem.manifest is None or mem.manifest[0] != template:
            assert mem.template is not None
            mem.manifest = (template, interpolate_doc(mem.template[2], {"admin_password": credentials["password"]}))
        manifest = mem.manifest[1]
        matches: bool | None = True if known else None
        if deployed_text is not None:
            matches = manifests_equal(deployed_text, manifest)
            if matches:
                mem.verified_hash = desired_hash
        instances: tuple[Instance, ...] | None = None
        nodes: list[NodeState] | None = None
        if deployed and idle:
            if steady:
                brief = tuple(await rt.director.instances_brief(deployment))
                nodes = await _probe_nodes(rt, status, brief, credentials)
                if nodes is not None and len(brief) == spec.instances and all(n.reachable for n in nodes):
                    instances = tuple(dataclasses.replace(i, job_state="running") for i in brief)
            if instances is None:
                instances = tuple(await rt.director.instances(deployment))
                nodes = await _probe_nodes(rt, status, instances, credentials)
        elif deployed:
            nodes = await _probe_nodes(rt, status, None, credentials)
        published = await _published(rt, service) if nodes else None
        observed = Observed(
            **base,
            nodes=tuple(nodes) if nodes is not None else None,
            published=published,
            consul_service=service if rt.publisher is not None else None,
            desired_hash=desired_hash,
            deployed=deployed,
            deployed_matches=matches,
            task=task,
            task_progress=progress,
            instances=instances,
        )
        mem.director_failures = 0
        return observed, manifest
    except BoshError as exc:
        observed = Observed(**base, director_error=str(exc), director_failures=mem.director_failures)
        mem.director_failures += 1
        return observed, manifest


async def execute(rt: Runtime, body: dict[str, Any], result: Plan, manifest: str) -> None:
    meta = body["metadata"]
    ctx = context_id(meta["uid"])
    for action in result.actions:
        if isinstance(action, Deploy):
            # Adopt a task of ours that is already running (a restart between POST and the
            # status write) instead of starting a second one.
            running = await rt.director.tasks(
                deployment=result.status.deployment, context_id=ctx, states=("queued", "processing")
            )
            if running:
                task = running[0]
            else:
                try:
                    task_id = await rt.director.deploy(manifest, context_id=ctx)
                    task = Task(id=task_id, state="queued", description="create deployment")
                except DirectorUnavailable:
                    # The answer was lost, not necessarily the deploy: find it by its context id.
                    found = await _started_since(rt, result, ctx)
                    if found is None:
                        raise
                    task = found
            _record_task(result, task.id, task.state, task.description or "create deployment")
            rt.memory.setdefault(meta["uid"], ClusterMemory()).deploy_task = (task.id, action.manifest_hash)
        elif isinstance(action, DeleteDeployment):
            task_id_or_none = await rt.director.delete_deployment(action.deployment, context_id=ctx)
            if task_id_or_none is not None:
                _record_task(result, task_id_or_none, "queued", "delete deployment")
        elif isinstance(action, SetResurrection):
            await rt.director.set_resurrection(
                result.status.deployment or "", rt.bosh.instance_group, action.instance_id, paused=action.paused
            )
        elif isinstance(action, PublishPrimary):
            if rt.publisher is not None:
                service = consul_service_name(meta["namespace"], meta["name"], rt.bosh)
                port = rt.bosh.postgres_port
                await rt.publisher.publish(
                    service,
                    Member(action.primary, port) if action.primary else None,
                    [Member(address, port) for address in action.replicas],
                )
        elif isinstance(action, Fence | StartJob):
            state: JobStateRequest = "stopped" if isinstance(action, Fence) else "started"
            task_id = await rt.director.change_job_state(
                result.status.deployment or "", rt.bosh.instance_group, action.instance_id, state, context_id=ctx
            )
            _record_task(result, task_id, "queued", f"{state} instance")
        elif isinstance(action, WithdrawService):
            if rt.publisher is not None:
                try:
                    await rt.publisher.withdraw(action.service)
                except Exception as exc:
                    log.warning("cannot remove %s from Consul: %s", action.service, exc)
            continue
        # Record what was started before anything waits on it.
        await rt.kube.merge_patch(cluster_path(meta["namespace"], meta["name"], "status"), status_patch(result.status))


def _record_task(result: Plan, task_id: int, state: str, description: str) -> None:
    result.status.bosh_task = models.BoshTaskStatus.model_validate(
        {"id": task_id, "state": state, "description": description, "startedAt": models.now_rfc3339()}
    )


async def _started_since(rt: Runtime, result: Plan, ctx: str) -> Task | None:
    known = result.status.bosh_task.id if result.status.bosh_task is not None else 0
    recent = await rt.director.tasks(deployment=result.status.deployment, context_id=ctx, limit=5)
    return next((t for t in recent if t.id > known and t.description == "create deployment"), None)


def parse_status(body: dict[str, Any]) -> PostgresClusterStatus:
    raw = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}
    try:
        return PostgresClusterStatus.model_validate(raw)
    except ValidationError:
        log.warning("status of %s is unreadable; starting from an empty one", body["metadata"].get("name"))
        return PostgresClusterStatus.model_validate({})


async def reconcile_once(rt: Runtime, namespace: str, name: str, *, deleting: bool = False) -> Plan | None:
    """One step. Returns the plan it carried out (None: the resource is gone)."""
    try:
        body = await rt.kube.get(cluster_path(namespace, name))
    except NotFound:
        return None
    status = parse_status(body)
    deleting = deleting or bool(body["metadata"].get("deletionTimestamp"))
    # --- pgbosh switchover (controller/operator/switchover.py): a planned change of primary.
    # The annotation is removed only after this step has written the status, so that whoever
    # waits on it (the CLI) sees the new currentPrimary as soon as the request is gone.
    switchover_to = (body["metadata"].get("annotations") or {}).get("pgbosh.dev/switchover-to")
    if switchover_to and not deleting:
        from controller.operator.switchover import clear_annotation, run_requested_switchover

        body = await run_requested_switchover(rt, body, str(switchover_to))
        status = parse_status(body)
        try:
            return await _reconcile_body(rt, body, status, deleting)
        finally:
            await clear_annotation(rt, namespace, name)
    # --- end switchover
    return await _reconcile_body(rt, body, status, deleting)


async def _reconcile_body(rt: Runtime, body: dict[str, Any], status: PostgresClusterStatus, deleting: bool) -> Plan:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        spec = PostgresClusterSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        if not deleting:
            return await _report_unparseable(rt, body, status, exc)
        spec = PostgresClusterSpec.model_validate({})  # deleting needs only the names
        log.debug("deleting a cluster whose spec does not parse: %s", exc.error_count())
    observed, manifest = await gather(rt, body, spec, status, deleting)
    if not deleting and observed.director_error is None and not observed.spec_errors:
        observed = _with_credentials(observed, f"{name}{CREDENTIALS_SUFFIX}")
    result = planner.plan(spec, observed)
    if result.actions:
        await execute(rt, body, result, manifest)
    elif result.status != status:
        await rt.kube.merge_patch(cluster_path(namespace, name, "status"), status_patch(result.status))
    for event in result.events:
        rt.post_event(body, event.type, event.reason, event.message)
    return result


def describe_spec_error(exc: ValidationError) -> str:
    """Where and what, per error; never the offending value (a spec may hold anything)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"spec.{where}: {err['msg']}" if where else f"spec: {err['msg']}")
    return "; ".join(parts)


async def _report_unparseable(
    rt: Runtime, body: dict[str, Any], status: PostgresClusterStatus, exc: ValidationError
) -> Plan:
    """The API server's schema and CEL rules normally stop such a spec; one stored before the
    CRD changed (or without them) gets here. Retrying cannot help: say so once, where the
    user looks, and wait for the spec to change (the update handler wakes the loop)."""
    meta = body["metadata"]
    result = planner.plan_unparseable(status, int(meta.get("generation") or 1), describe_spec_error(exc))
    if result.status != status:
        await rt.kube.merge_patch(cluster_path(meta["namespace"], meta["name"], "status"), status_patch(result.status))
    for event in result.events:
        rt.post_event(body, event.type, event.reason, event.message)
    return result


def _with_credentials(observed: Observed, secret_name: str) -> Observed:
    status = observed.status.model_copy(update={"credentials_secret": secret_name})
    return Observed(**{**observed.__dict__, "status": status})
