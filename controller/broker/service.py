"""What each OSB endpoint does, on PostgresCluster resources and database roles.

HTTP concerns (auth, headers, JSON) live in ``server.py``; this module answers
with ``(status, body)`` or raises ``BrokerError``. Every check that can refuse a
request runs before the first write, so a 4xx never leaves a change behind.
"""

from __future__ import annotations

import copy
import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from controller.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION, PostgresClusterSpec
from controller.broker import naming
from controller.broker.config import BrokerConfig, MaintenanceInfo, Plan, Service
from controller.broker.errors import BrokerError, async_required, bad_request, concurrency_error, gone
from controller.broker.operations import (
    CANONICAL_JSON,
    FAILED,
    IN_PROGRESS,
    Observed,
    Operation,
    fingerprint,
    observe,
)
from controller.broker.roles import AdminTarget, DatabaseUnavailable, RoleManager, generate_password
from controller.kube import Conflict, Invalid, KubeClient, NotFound, core_path, resource_path
from controller.pg.types import connection_uri

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any]]
APP_DATABASE = "app"
# The user parameters that become spec fields.
SPEC_PARAMETERS = ("postgresVersion", "parameters")
SPEC_CACHE_SIZE = 256


class _Request(BaseModel):
    # Unknown fields are ignored, as the spec asks.
    model_config = ConfigDict(extra="ignore")


class ProvisionRequest(_Request):
    service_id: str
    plan_id: str
    organization_guid: str | None = None
    space_guid: str | None = None
    context: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    maintenance_info: MaintenanceInfo | None = None


class UpdateRequest(_Request):
    service_id: str
    plan_id: str | None = None
    context: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    maintenance_info: MaintenanceInfo | None = None


class BindResource(_Request):
    app_guid: str | None = None
    route: str | None = None


class BindRequest(_Request):
    service_id: str
    plan_id: str
    app_guid: str | None = None
    bind_resource: BindResource | None = None
    context: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None


def parse(model: type[_Request], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise bad_request(reasons) from None


@dataclass(frozen=True)
class Cluster:
    """A PostgresCluster as the broker reads it."""

    obj: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.obj.get("metadata") or {})

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.get("labels") or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.metadata.get("annotations") or {})

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.obj.get("spec") or {})

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.obj.get("status") or {})

    @property
    def deleting(self) -> bool:
        return bool(self.metadata.get("deletionTimestamp"))


class Broker:
    def __init__(self, config: BrokerConfig, kube: KubeClient, roles: RoleManager) -> None:
        self.config = config
        self.kube = kube
        self.roles = roles
        # (plan id, parameters as JSON) -> the validated spec as JSON; see _new_spec.
        self._spec_cache: dict[tuple[str, str], bytes] = {}
        self._collection_of = ("", "")

    @property
    def namespace(self) -> str:
        return self.config.namespace

    @property
    def _collection(self) -> str:
        """The PostgresClusters' collection path in the namespace (computed once per namespace)."""
        namespace = self.config.namespace
        if self._collection_of[0] != namespace:
            self._collection_of = (namespace, resource_path(GROUP, VERSION, PLURAL, namespace))
        return self._collection_of[1]

    # ---- lookups -------------------------------------------------------------------------

    def _service_and_plan(self, service_id: str, plan_id: str) -> tuple[Service, Plan]:
        service = self.config.service(service_id)
        if service is None:
            raise bad_request(f"unknown service_id {service_id!r}")
        plan = service.plan(plan_id)
        if plan is None:
            raise bad_request(f"unknown plan_id {plan_id!r} for service {service.name}")
        return service, plan

    def _cluster_path(self, instance_id: str, subresource: str | None = None) -> str:
        return resource_path(
            GROUP, VERSION, PLURAL, self.namespace, naming.cluster_name(instance_id), subresource
        )

    async def _cluster(self, instance_id: str) -> Cluster | None:
        try:
            obj = await self.kube.get(self._cluster_path(instance_id))
        except NotFound:
            return None
        cluster = Cluster(obj)
        # Names carry a hash whenever ids are altered; the annotation makes a mix-up impossible.
        recorded = cluster.annotations.get(naming.ANNOTATION_INSTANCE)
        if recorded is not None and recorded != instance_id:
            return None
        return cluster

    def _check_parameters(self, plan: Plan, parameters: dict[str, Any] | None) -> dict[str, Any]:
        parameters = parameters or {}
        errors = self.config.parameter_errors(plan, parameters)
        if errors:
            raise BrokerError(400, "InvalidParameters", "; ".join(errors))
        return parameters

    @staticmethod
    def _check_maintenance_info(plan: Plan, requested: MaintenanceInfo | None) -> None:
        if requested is None:
            return
        offered = plan.maintenance_info.version if plan.maintenance_info else None
        if requested.version != offered:
            raise BrokerError(
                422,
                "MaintenanceInfoConflict",
                f"maintenance_info.version {requested.version} does not match the plan's ({offered or 'none'})",
            )

    def _new_spec(self, plan: Plan, parameters: dict[str, Any]) -> dict[str, Any]:
        """The spec of a new cluster of ``plan`` with the user's parameters.

        Platforms provision the same few plan/parameter combinations over and over: the
        validated spec is kept as JSON per combination (bounded) and handed out as a fresh copy.
        """
        used = {key: parameters[key] for key in SPEC_PARAMETERS if key in parameters}
        key = (plan.id, CANONICAL_JSON.encode(used))
        cached = self._spec_cache.get(key)
        if cached is None:
            cached = orjson.dumps(self._spec({}, plan, used))
            if len(self._spec_cache) >= SPEC_CACHE_SIZE:
                self._spec_cache.pop(next(iter(self._spec_cache)))
            self._spec_cache[key] = cached
        spec: dict[str, Any] = orjson.loads(cached)  # a fresh copy (~1 us; deepcopy ~10)
        return spec

    @staticmethod
    def _spec(base: dict[str, Any], plan: Plan | None, parameters: dict[str, Any]) -> dict[str, Any]:
        """The spec after applying a plan's fixed fields and the user's parameters."""
        spec = copy.deepcopy(base)
        if plan is not None:
            spec.update(copy.deepcopy(plan.cluster))
        for key in SPEC_PARAMETERS:
            if key in parameters:
                spec[key] = copy.deepcopy(parameters[key])
        try:
            model = PostgresClusterSpec.model_validate(spec)
        except ValidationError as exc:
            reasons = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in exc.errors())
            raise BrokerError(400, "InvalidParameters", reasons) from None
        return model.model_dump(by_alias=True, exclude_none=True, mode="json")

    def _operation(self, kind: str) -> str:
        return f"{kind}-{secrets.token_hex(6)}"

    # ---- catalog -------------------------------------------------------------------------

    def catalog(self) -> Answer:
        return 200, self.config.catalog_document()

    # ---- provision -----------------------------------------------------------------------

    async def provision(self, instance_id: str, body: Any, accepts_incomplete: bool) -> Answer:
        request: ProvisionRequest = parse(ProvisionRequest, body)
        _, plan = self._service_and_plan(request.service_id, request.plan_id)
        if not accepts_incomplete:
            raise async_required()
        self._check_maintenance_info(plan, request.maintenance_info)
        parameters = self._check_parameters(plan, request.parameters)
        spec = self._new_spec(plan, parameters)
        context = request.context or {}
        org = request.organization_guid or context.get("organization_guid")
        space = request.space_guid or context.get("space_guid")
        identity = fingerprint(
            {
                "service_id": request.service_id,
                "plan_id": request.plan_id,
                "organization_guid": org,
                "space_guid": space,
                "parameters": parameters,
            }
        )

        # Create first, look only on a conflict: one API call for the common case.
        operation = Operation(self._operation("provision"), "provision", generation=1, request=identity)
        name = naming.cluster_name(instance_id)
        labels = {
            naming.MANAGED_BY: naming.MANAGER,
            naming.LABEL_SERVICE: naming.label_value(request.service_id),
            naming.LABEL_PLAN: naming.label_value(request.plan_id),
            naming.LABEL_INSTANCE: naming.label_value(instance_id),
        }
        if org:
            labels[naming.LABEL_ORG] = naming.label_value(str(org))
        if space:
            labels[naming.LABEL_SPACE] = naming.label_value(str(space))
        body_obj = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": {
                    naming.ANNOTATION_INSTANCE: instance_id,
                    naming.ANNOTATION_PROVISION: identity,
                    naming.ANNOTATION_OPERATION: operation.annotation(),
                },
            },
            "spec": spec,
        }
        try:
            created = await self.kube.create(self._collection, body_obj)
        except Conflict:
            # A repeat, a conflicting request for the same id, or one being deleted.
            existing = await self._cluster(instance_id)
            if existing is None:
                raise BrokerError(
                    409, "Conflict", "a cluster of this name exists for another instance or was just removed"
                ) from None
            return self._repeat_provision(existing, identity)
        except Invalid as exc:
            raise BrokerError(400, "InvalidParameters", exc.message) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "provisioning instance %s as %s/%s (plan %s, generation %s)",
                instance_id,
                self.namespace,
                name,
                plan.name,
                (created.get("metadata") or {}).get("generation"),
            )
        return 202, {"operation": operation.id}

    @staticmethod
    def _repeat_provision(existing: Cluster, identity: str) -> Answer:
        if existing.annotations.get(naming.ANNOTATION_PROVISION) != identity:
            raise BrokerError(
                409, "Conflict", "an instance with this id already exists with different attributes"
            )
        if existing.deleting:
            raise concurrency_error("this instance is being deprovisioned")
        observed = observe(existing.obj)
        if observed.running and observed.operation is not None and observed.operation.type == "provision":
            return 202, {"operation": observed.operation.id}
        return 200, {}

    # ---- update --------------------------------------------------------------------------

    async def update(self, instance_id: str, body: Any, accepts_incomplete: bool) -> Answer:
        request: UpdateRequest = parse(UpdateRequest, body)
        service = self.config.service(request.service_id)
        if service is None:
            raise bad_request(f"unknown service_id {request.service_id!r}")
        target_plan: Plan | None = None
        if request.plan_id is not None:
            target_plan = service.plan(request.plan_id)
            if target_plan is None:
                raise bad_request(f"unknown plan_id {request.plan_id!r} for service {service.name}")
        if not accepts_incomplete:
            raise async_required()

        cluster = await self._cluster(instance_id)
        if cluster is None:
            raise BrokerError(404, "NotFound", "no such service instance")
        current_plan_id = self._plan_id_of(cluster, service)
        current_plan = service.plan(current_plan_id) if current_plan_id else None
        plan = target_plan or current_plan
        if plan is None:
            raise bad_request("the instance's plan is not in the catalog: give plan_id")
        identity = fingerprint(
            {
                "plan_id": plan.id,
                "parameters": request.parameters,
                "maintenance_info": request.maintenance_info.version if request.maintenance_info else None,
            }
        )

        observed = observe(cluster.obj)
        if cluster.deleting:
            raise concurrency_error("this instance is being deprovisioned")
        if observed.running:
            op = observed.operation
            if op is not None and op.type == "update" and op.request == identity:
                return 202, {"operation": op.id}
            raise concurrency_error(f"another operation on this instance is in progress ({observed.description})")

        plan_changes = current_plan is None or plan.id != current_plan.id
        if plan_changes and current_plan is not None and not service.plan_updateable_from(current_plan):
            raise BrokerError(
                422, "PlanChangeNotSupported", f"plan {current_plan.name} cannot be changed to another plan"
            )
        self._check_maintenance_info(plan, request.maintenance_info)
        parameters = self._check_parameters(plan, request.parameters)
        old_spec = cluster.spec
        new_spec = self._spec(old_spec, plan if plan_changes else None, parameters)
        try:
            old_model = PostgresClusterSpec.model_validate(old_spec)
        except ValidationError:
            old_model = None
        if old_model is not None:
            refused = PostgresClusterSpec.model_validate(new_spec).transition_errors(old_model)
            if refused:
                raise BrokerError(422, "UpdateNotSupported", "; ".join(refused))

        spec_patch = merge_diff(old_spec, new_spec)
        if not spec_patch and not plan_changes:
            return 200, {}

        generation = int(cluster.metadata.get("generation") or 0)
        operation = Operation(
            self._operation("update"),
            "update",
            generation=generation + 1 if spec_patch and generation else None,
            request=identity,
        )
        metadata: dict[str, Any] = {
            "labels": {naming.LABEL_PLAN: naming.label_value(plan.id)},
            "annotations": {naming.ANNOTATION_OPERATION: operation.annotation()},
        }
        if cluster.metadata.get("resourceVersion") not in (None, "", "..."):
            # Optimistic concurrency: a write that raced us turns into 409 -> ConcurrencyError.
            metadata["resourceVersion"] = cluster.metadata["resourceVersion"]
        patch: dict[str, Any] = {"metadata": metadata}
        if spec_patch:
            patch["spec"] = spec_patch
        try:
            patched = await self.kube.merge_patch(self._cluster_path(instance_id), patch)
        except Conflict:
            raise concurrency_error("the instance changed while updating; retry") from None
        except Invalid as exc:
            raise BrokerError(422, "UpdateNotSupported", exc.message) from None
        except NotFound:
            raise BrokerError(404, "NotFound", "no such service instance") from None
        new_generation = (patched.get("metadata") or {}).get("generation")
        if spec_patch and isinstance(new_generation, int) and new_generation != operation.generation:
            # Record what the API server really assigned (it is the one to compare with).
            operation = Operation(operation.id, "update", new_generation, identity)
            await self.kube.merge_patch(
                self._cluster_path(instance_id),
                {"metadata": {"annotations": {naming.ANNOTATION_OPERATION: operation.annotation()}}},
            )
        log.debug("updating instance %s (plan %s): %s", instance_id, plan.name, sorted(spec_patch))
        if not spec_patch:
            return 200, {}
        return 202, {"operation": operation.id}

    @staticmethod
    def _plan_id_of(cluster: Cluster, service: Service) -> str | None:
        label = cluster.labels.get(naming.LABEL_PLAN)
        for plan in service.plans:
            if label in (plan.id, naming.label_value(plan.id)):
                return plan.id
        return None

    # ---- deprovision ---------------------------------------------------------------------

    async def deprovision(
        self, instance_id: str, service_id: str | None, plan_id: str | None, accepts_incomplete: bool
    ) -> Answer:
        if not service_id or not plan_id:
            raise bad_request("service_id and plan_id query parameters are required")
        self._service_and_plan(service_id, plan_id)
        if not accepts_incomplete:
            raise async_required()
        cluster = await self._cluster(instance_id)
        if cluster is None:
            raise gone()
        if cluster.deleting:
            op = Operation.of(cluster.obj)
            return 202, {"operation": op.id if op is not None and op.type == "deprovision" else "deprovision"}
        operation = Operation(self._operation("deprovision"), "deprovision")
        path = self._cluster_path(instance_id)
        # Secrets first: if Kubernetes fails here, the platform retries with the cluster intact.
        await self._delete_binding_secrets(instance_id)
        try:
            await self.kube.merge_patch(
                path, {"metadata": {"annotations": {naming.ANNOTATION_OPERATION: operation.annotation()}}}
            )
            await self.kube.delete(path)
        except NotFound:
            raise gone() from None
        log.debug("deprovisioning instance %s (%s/%s)", instance_id, self.namespace, naming.cluster_name(instance_id))
        return 202, {"operation": operation.id}

    async def _delete_binding_secrets(self, instance_id: str) -> None:
        # The database roles go with the cluster; their Secrets must not outlive it.
        secrets = await self.kube.list(
            core_path("secrets", self.namespace),
            label_selector={
                naming.MANAGED_BY: naming.MANAGER,
                naming.LABEL_INSTANCE: naming.label_value(instance_id),
            },
        )
        for secret in secrets:
            annotations = (secret.get("metadata") or {}).get("annotations") or {}
            if annotations.get(naming.ANNOTATION_INSTANCE) == instance_id:
                await self.kube.delete_secret(self.namespace, secret["metadata"]["name"])

    # ---- last operation, fetch -----------------------------------------------------------

    async def last_operation(self, instance_id: str, operation: str | None) -> Answer:
        cluster = await self._cluster(instance_id)
        if cluster is None:
            if operation is None or operation.startswith("deprovision"):
                raise gone()
            raise BrokerError(404, "NotFound", "no such service instance")
        observed = observe(cluster.obj)
        return 200, {"state": observed.state, "description": observed.description}

    async def fetch_instance(self, instance_id: str) -> Answer:
        cluster = await self._cluster(instance_id)
        if cluster is None:
            raise BrokerError(404, "NotFound", "no such service instance")
        observed = observe(cluster.obj)
        if observed.running:
            op = observed.operation
            if op is not None and op.type == "provision":
                raise BrokerError(404, "NotFound", "the instance is still being provisioned")
            raise concurrency_error(f"the instance is being changed ({observed.description})")
        service_id = self._label_id(cluster, naming.LABEL_SERVICE, [s.id for s in self.config.catalog.services])
        service = self.config.service(service_id or "")
        plan_id = self._plan_id_of(cluster, service) if service else None
        spec = cluster.spec
        body: dict[str, Any] = {
            "service_id": service_id,
            "plan_id": plan_id,
            "parameters": {k: spec[k] for k in ("postgresVersion", "parameters") if k in spec},
        }
        plan = service.plan(plan_id) if service and plan_id else None
        if plan is not None and plan.maintenance_info is not None:
            body["maintenance_info"] = plan.maintenance_info.model_dump(exclude_none=True)
        return 200, body

    @staticmethod
    def _label_id(cluster: Cluster, label: str, candidates: list[str]) -> str | None:
        value = cluster.labels.get(label)
        return next((c for c in candidates if value in (c, naming.label_value(c))), None)

    # ---- bindings ------------------------------------------------------------------------

    async def _admin_target(self, cluster: Cluster) -> tuple[AdminTarget, str, int]:
        """Where to create roles (the primary's address) and what to hand out (the DNS name)."""
        status = cluster.status
        primary = status.get("currentPrimary")
        address = next(
            (
                i.get("address")
                for i in status.get("instances") or []
                if isinstance(i, dict) and i.get("name") == primary
            ),
            None,
        )
        endpoint = status.get("endpoint") or {}
        secret_name = status.get("credentialsSecret")
        if not primary or not address or not endpoint.get("host") or not secret_name:
            raise BrokerError(
                422, "InstanceNotReady", "the cluster has no primary, endpoint or credentials in its status yet"
            )
        port = int(endpoint.get("port") or 5432)
        try:
            admin = await self.kube.get_secret(self.namespace, str(secret_name))
        except NotFound:
            raise BrokerError(422, "InstanceNotReady", f"credentials Secret {secret_name} not found") from None
        if not admin.get("username") or not admin.get("password"):
            raise BrokerError(422, "InstanceNotReady", f"credentials Secret {secret_name} lacks username/password")
        target = AdminTarget(host=str(address), port=port, username=admin["username"], password=admin["password"])
        return target, str(endpoint["host"]), port

    async def _binding_secret(self, instance_id: str, binding_id: str) -> dict[str, Any] | None:
        try:
            secret = await self.kube.get(core_path("secrets", self.namespace, naming.binding_secret_name(binding_id)))
        except NotFound:
            return None
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        if annotations.get(naming.ANNOTATION_BINDING) != binding_id:
            return None
        return secret

    async def bind(self, instance_id: str, binding_id: str, body: Any) -> Answer:
        request: BindRequest = parse(BindRequest, body)
        self._service_and_plan(request.service_id, request.plan_id)
        if request.parameters:
            raise BrokerError(400, "InvalidParameters", "bindings take no parameters")
        app_guid = request.app_guid or (request.bind_resource.app_guid if request.bind_resource else None)
        identity = fingerprint(
            {"instance_id": instance_id, "service_id": request.service_id, "plan_id": request.plan_id,
             "app_guid": app_guid}
        )

        existing = await self._binding_secret(instance_id, binding_id)
        cluster = await self._cluster(instance_id)
        if existing is not None:
            annotations = existing["metadata"].get("annotations") or {}
            if annotations.get(naming.ANNOTATION_INSTANCE) != instance_id or (
                annotations.get(naming.ANNOTATION_BINDING_REQUEST) != identity
            ):
                raise BrokerError(409, "Conflict", "a binding with this id already exists with different attributes")
            if cluster is None:
                raise BrokerError(404, "NotFound", "no such service instance")
            return 200, self._binding_document(cluster, self._secret_values(existing))

        if cluster is None:
            raise BrokerError(404, "NotFound", "no such service instance")
        if cluster.deleting:
            raise concurrency_error("this instance is being deprovisioned")
        observed = observe(cluster.obj)
        if observed.running and observed.operation is not None and observed.operation.type == "provision":
            raise concurrency_error(f"the instance is still being provisioned ({observed.description})")
        if observed.state == FAILED:
            raise BrokerError(422, "InstanceNotReady", f"the instance failed: {observed.description}")
        target, _, _ = await self._admin_target(cluster)

        role = naming.binding_role_name(binding_id)
        password = generate_password()
        try:
            await self.roles.ensure_login_role(target, role, password)
        except DatabaseUnavailable as exc:
            raise BrokerError(502, "DatabaseUnavailable", str(exc)) from None
        await self.kube.apply_secret(
            self.namespace,
            naming.binding_secret_name(binding_id),
            {"username": role, "password": password, "database": APP_DATABASE},
            labels={
                naming.MANAGED_BY: naming.MANAGER,
                naming.LABEL_INSTANCE: naming.label_value(instance_id),
                naming.LABEL_BINDING: naming.label_value(binding_id),
            },
            annotations={
                naming.ANNOTATION_INSTANCE: instance_id,
                naming.ANNOTATION_BINDING: binding_id,
                naming.ANNOTATION_BINDING_REQUEST: identity,
                "pgbosh.dev/cluster": naming.cluster_name(instance_id),
            },
        )
        log.debug("bound %s to instance %s as role %s", binding_id, instance_id, role)
        values = {"username": role, "password": password, "database": APP_DATABASE}
        return 201, self._binding_document(cluster, values)

    @staticmethod
    def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
        import base64

        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    @staticmethod
    def _binding_document(cluster: Cluster, values: dict[str, str]) -> dict[str, Any]:
        endpoint = cluster.status.get("endpoint") or {}
        host = str(endpoint.get("host") or "")
        port = int(endpoint.get("port") or 5432)
        database = values.get("database") or APP_DATABASE
        user = values["username"]
        password = values["password"]
        endpoints = [{"host": host, "ports": [str(port)], "protocol": "tcp"}]
        credentials = {
            "uri": connection_uri(user, password, host, port, database),
            "hostname": host,
            "port": port,
            "name": database,
            "username": user,
            "password": password,
            "jdbcUrl": (
                f"jdbc:postgresql://{host}:{port}/{quote(database)}"
                f"?user={quote(user, safe='')}&password={quote(password, safe='')}"
            ),
            "endpoints": endpoints,
        }
        return {"credentials": credentials, "endpoints": endpoints}

    async def fetch_binding(self, instance_id: str, binding_id: str) -> Answer:
        secret = await self._binding_secret(instance_id, binding_id)
        annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
        cluster = await self._cluster(instance_id)
        if secret is None or cluster is None or annotations.get(naming.ANNOTATION_INSTANCE) != instance_id:
            raise BrokerError(404, "NotFound", "no such service binding")
        return 200, self._binding_document(cluster, self._secret_values(secret))

    async def unbind(self, instance_id: str, binding_id: str, service_id: str | None, plan_id: str | None) -> Answer:
        if not service_id or not plan_id:
            raise bad_request("service_id and plan_id query parameters are required")
        self._service_and_plan(service_id, plan_id)
        secret = await self._binding_secret(instance_id, binding_id)
        if secret is not None:
            annotations = secret["metadata"].get("annotations") or {}
            if annotations.get(naming.ANNOTATION_INSTANCE) != instance_id:
                secret = None
        cluster = await self._cluster(instance_id)
        role = naming.binding_role_name(binding_id)
        if secret is not None:
            role = self._secret_values(secret).get("username") or role

        dropped = False
        reachable = cluster is not None and not cluster.deleting
        if cluster is not None and reachable and (secret is not None or cluster.status.get("currentPrimary")):
            try:
                target, _, _ = await self._admin_target(cluster)
            except BrokerError:
                if secret is not None:
                    raise
                target = None
            if target is not None:
                try:
                    # Also cleans up after a bind that created the role but died before its Secret.
                    dropped = await self.roles.drop_login_role(target, role)
                except DatabaseUnavailable as exc:
                    if secret is not None:
                        raise BrokerError(502, "DatabaseUnavailable", str(exc)) from None
                    log.warning("unbind %s: %s", binding_id, exc)
        if secret is not None:
            await self.kube.delete_secret(self.namespace, secret["metadata"]["name"])
        if secret is None and not dropped:
            raise gone()
        log.debug("unbound %s from instance %s (role %s dropped: %s)", binding_id, instance_id, role, dropped)
        return 200, {}


def merge_diff(old: Any, new: Any) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (both JSON objects)."""
    patch: dict[str, Any] = {}
    old = old if isinstance(old, dict) else {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_diff(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


__all__ = ["IN_PROGRESS", "Broker", "Observed", "merge_diff"]
