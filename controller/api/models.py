"""The PostgresCluster API: the single source of truth for the CRD and the operator.

The CRD's openAPIV3Schema is generated from these models (`controller.api.crd`);
validation rules a schema alone cannot express are declared here next to the
field they guard, as CEL (`x-kubernetes-validations`) plus an equivalent Python
check for the rules a Python CEL implementation cannot evaluate (quantities).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP = "pgbosh.dev"
VERSION = "v1alpha1"
KIND = "PostgresCluster"
PLURAL = "postgresclusters"
SINGULAR = "postgrescluster"
SHORT_NAMES = ["pgc"]
API_VERSION = f"{GROUP}/{VERSION}"

SUPPORTED_MAJOR_VERSIONS = (14, 15, 16, 17)

# postgresql.conf settings pgbosh writes itself: a user value would break replication,
# failover or the node's address. The list is part of the API (CRD rule and docs).
RESERVED_PARAMETERS: tuple[str, ...] = (
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "hba_file",
    "ident_file",
    "config_file",
    "data_directory",
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "recovery_target_timeline",
    "promote_trigger_file",
    "hot_standby",
    "wal_level",
    "wal_log_hints",
    "shared_preload_libraries",
    "synchronous_standby_names",
    "archive_mode",
    "archive_command",
    "max_wal_senders",
    "max_replication_slots",
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
)

# A Kubernetes quantity limited to what makes sense for a disk: 512Mi, 10Gi, 1Ti, 10G.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P|k)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_UNITS: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}
MIN_DISK_BYTES = 512 * 2**20

# BOSH names: vm types, disk types and AZs are cloud-config names.
BOSH_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
PARAMETER_NAME_PATTERN = r"^[a-z][a-z0-9_.]{0,62}$"


def quantity_bytes(text: str) -> int:
    """Bytes of a Kubernetes quantity such as ``10Gi``; ValueError says what is wrong."""
    match = _QUANTITY_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size: use a Kubernetes quantity such as 10Gi or 500Mi")
    number = text.strip()[: len(text.strip()) - len(match.group(2) or "")]
    return int(float(number) * _UNITS[match.group(2) or ""])


def quantity_mb(text: str) -> int:
    """Size in MiB (what BOSH's persistent_disk wants), rounded up."""
    return -(-quantity_bytes(text) // 2**20)


class Rule(BaseModel):
    """One CEL rule of the CRD, with the message Kubernetes shows when it fails."""

    rule: str
    message: str
    reason: str | None = None
    field_path: str | None = None


def cel_rules(*rules: Rule) -> dict[str, Any]:
    return {
        "x-kubernetes-validations": [
            {
                k: v
                for k, v in {
                    "rule": r.rule,
                    "message": r.message,
                    "reason": r.reason,
                    "fieldPath": r.field_path,
                }.items()
                if v is not None
            }
            for r in rules
        ]
    }


class ReplicationMode(StrEnum):
    ASYNC = "async"
    SYNC = "sync"


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", use_enum_values=True)


STORAGE_RULES = (
    Rule(
        rule="has(self.size) != has(self.diskType)",
        message="storage needs exactly one of size (a quantity such as 10Gi) or diskType (a BOSH disk type)",
    ),
)


class Storage(_Model):
    """The persistent disk of every instance."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*STORAGE_RULES))

    size: Annotated[
        str | None,
        Field(
            default=None,
            pattern=QUANTITY_PATTERN,
            description="Disk size as a Kubernetes quantity (for example 10Gi). Can grow, never shrink.",
        ),
    ]
    disk_type: Annotated[
        str | None,
        Field(
            default=None,
            alias="diskType",
            pattern=BOSH_NAME_PATTERN,
            description="A disk_types name from the BOSH cloud config, instead of size.",
        ),
    ]

    @field_validator("size")
    @classmethod
    def _size_at_least_minimum(cls, value: str | None) -> str | None:
        if value is not None and quantity_bytes(value) < MIN_DISK_BYTES:
            raise ValueError(f"storage.size {value} is too small: at least 512Mi")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Storage:
        if (self.size is None) == (self.disk_type is None):
            raise ValueError(STORAGE_RULES[0].message)
        return self


class Replication(_Model):
    mode: Annotated[
        ReplicationMode,
        Field(
            default=ReplicationMode.ASYNC,
            description="async: replicas may lag; sync: a commit waits for syncStandbys replicas.",
        ),
    ]
    sync_standbys: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=8,
            alias="syncStandbys",
            description="In sync mode, how many replicas must confirm each commit (ANY n).",
        ),
    ]


SPEC_RULES = (
    Rule(
        rule="self.replication.mode != 'sync' || self.instances >= 2",
        message="replication mode sync needs at least 2 instances",
        field_path=".replication.mode",
    ),
    Rule(
        rule="self.replication.mode != 'sync' || self.replication.syncStandbys < self.instances",
        message="replication.syncStandbys must be smaller than instances (one instance is the primary)",
        field_path=".replication.syncStandbys",
    ),
    Rule(
        rule="self.parameters.all(k, !(k in " + repr(list(RESERVED_PARAMETERS)).replace('"', "'") + "))",
        message="parameters may not set settings pgbosh manages: " + ", ".join(RESERVED_PARAMETERS),
        field_path=".parameters",
    ),
    Rule(
        rule="self.postgresVersion >= oldSelf.postgresVersion",
        message="postgresVersion may not go down (a major downgrade needs a dump and restore)",
        field_path=".postgresVersion",
    ),
    Rule(
        rule=(
            "!has(oldSelf.storage.size) || !has(self.storage.size) || "
            "quantity(self.storage.size).compareTo(quantity(oldSelf.storage.size)) >= 0"
        ),
        message="storage.size may not shrink (BOSH can only grow a persistent disk)",
        field_path=".storage.size",
    ),
)


class PostgresClusterSpec(_Model):
    """What the user asks for."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*SPEC_RULES))

    postgres_version: Annotated[
        Literal[14, 15, 16, 17],
        Field(default=15, alias="postgresVersion", description="PostgreSQL major version."),
    ]
    instances: Annotated[
        int, Field(default=3, ge=1, le=9, description="Number of PostgreSQL VMs: one primary, the rest replicas.")
    ]
    vm_type: Annotated[
        str,
        Field(
            default="small",
            alias="vmType",
            pattern=BOSH_NAME_PATTERN,
            description="A vm_types name from the BOSH cloud config.",
        ),
    ]
    storage: Annotated[Storage, Field(default_factory=lambda: Storage(size="10Gi"))]
    azs: Annotated[
        list[Annotated[str, Field(pattern=BOSH_NAME_PATTERN)]],
        Field(
            default_factory=lambda: ["z1", "z2", "z3"],
            min_length=1,
            max_length=9,
            description="Availability zones from the BOSH cloud config; instances are spread across them.",
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ]
    replication: Annotated[Replication, Field(default_factory=Replication)]
    resurrection: Annotated[
        bool, Field(default=True, description="Let BOSH recreate a lost VM on its persistent disk.")
    ]
    parameters: Annotated[
        dict[Annotated[str, Field(pattern=PARAMETER_NAME_PATTERN)], Annotated[str, Field(max_length=1024)]],
        Field(
            default_factory=dict,
            description="postgresql.conf settings, as strings. Settings pgbosh manages are refused.",
            json_schema_extra={"maxProperties": 200},
        ),
    ]
    paused: Annotated[
        bool,
        Field(default=False, description="Stop reconciling: pgbosh observes but changes nothing while paused."),
    ]

    @field_validator("azs")
    @classmethod
    def _unique_azs(cls, azs: list[str]) -> list[str]:
        duplicates = sorted({az for az in azs if azs.count(az) > 1})
        if duplicates:
            raise ValueError(f"azs lists {', '.join(duplicates)} more than once")
        return azs

    @field_validator("parameters")
    @classmethod
    def _no_reserved_parameters(cls, parameters: dict[str, str]) -> dict[str, str]:
        reserved = sorted(set(parameters) & set(RESERVED_PARAMETERS))
        if reserved:
            raise ValueError(f"parameters may not set {', '.join(reserved)}: pgbosh manages these settings")
        return parameters

    @model_validator(mode="after")
    def _replication_fits(self) -> PostgresClusterSpec:
        if self.replication.mode == ReplicationMode.SYNC:
            if self.instances < 2:
                raise ValueError(SPEC_RULES[0].message)
            if self.replication.sync_standbys >= self.instances:
                raise ValueError(SPEC_RULES[1].message)
        return self

    def transition_errors(self, old: PostgresClusterSpec) -> list[str]:
        """The transition rules (oldSelf) in Python: what an update may not do."""
        errors = []
        if self.postgres_version < old.postgres_version:
            errors.append(SPEC_RULES[3].message)
        if (
            self.storage.size is not None
            and old.storage.size is not None
            and quantity_bytes(self.storage.size) < quantity_bytes(old.storage.size)
        ):
            errors.append(SPEC_RULES[4].message)
        return errors


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    UPDATING = "Updating"
    DEGRADED = "Degraded"
    FAILING_OVER = "FailingOver"
    DELETING = "Deleting"
    FAILED = "Failed"


class Condition(_Model):
    """A Kubernetes condition (metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: Annotated[str, Field(alias="lastTransitionTime")]
    observed_generation: Annotated[int | None, Field(default=None, alias="observedGeneration", ge=0)]


class BoshTaskStatus(_Model):
    id: int
    state: str
    description: str = ""
    started_at: Annotated[str | None, Field(default=None, alias="startedAt")]
    progress: str | None = None


class InstanceStatus(_Model):
    name: str
    az: str | None = None
    address: str | None = None
    role: Literal["primary", "replica", "unknown"] = "unknown"
    state: str = "unknown"
    lag_bytes: Annotated[int | None, Field(default=None, alias="lagBytes")]
    resurrection_paused: Annotated[bool | None, Field(default=None, alias="resurrectionPaused")]


class Endpoint(_Model):
    host: str
    port: int = 5432


class PostgresClusterStatus(_Model):
    """What pgbosh observed and did, for people and for the next reconcile."""

    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: Annotated[int | None, Field(default=None, alias="observedGeneration")]
    deployment: str | None = None
    bosh_task: Annotated[BoshTaskStatus | None, Field(default=None, alias="boshTask")]
    instances: list[InstanceStatus] = Field(default_factory=list)
    instance_count: Annotated[
        int, Field(default=0, alias="instanceCount", description="Instances BOSH reports (scale subresource).")
    ]
    ready_instances: Annotated[int, Field(default=0, alias="readyInstances")]
    current_primary: Annotated[str | None, Field(default=None, alias="currentPrimary")]
    endpoint: Endpoint | None = None
    credentials_secret: Annotated[str | None, Field(default=None, alias="credentialsSecret")]
    last_deployed_generation: Annotated[int | None, Field(default=None, alias="lastDeployedGeneration")]
    deployed_hash: Annotated[
        str | None,
        Field(default=None, alias="deployedHash", description="Hash of the manifest template last deployed."),
    ]
    fenced: list[str] = Field(
        default_factory=list, description="Instances pgbosh stopped because they accepted writes beside the primary."
    )
    failed_attempt: Annotated[
        str | None,
        Field(
            default=None, alias="failedAttempt", description="The manifest that failed to deploy; not retried as is."
        ),
    ]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """Conditions with one replaced; lastTransitionTime moves only when status changes."""
    old = next((c for c in conditions if c.type == type_), None)
    replacement = Condition.model_validate(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": old.last_transition_time
            if old is not None and old.status == status
            else now_rfc3339(),
            "observedGeneration": generation,
        }
    )
    if old is None:
        return [*conditions, replacement]
    return [replacement if c is old else c for c in conditions]
