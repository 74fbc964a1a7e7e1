"""agent.json: what the (local) director tells one VM about itself and its job.

The shape is the contract in docs/local-world.md. Secrets are `SecretStr` so that a
repr, a log line or a validation error never shows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# PostgreSQL identifiers we create (roles, databases): plain lower-case names only,
# so that they never need quoting tricks and never carry SQL.
IDENTIFIER_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
PARAMETER_NAME_PATTERN = r"^[a-z_][a-z0-9_.]{0,62}$"
MAX_SOCKET_PATH = 107


class ConfigError(Exception):
    """agent.json is missing, unreadable or does not match the contract."""


class _Model(BaseModel):
    # Unknown keys are ignored: the director and the manifest may grow fields before
    # the agent uses them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Replication(_Model):
    mode: Literal["async", "sync"] = "async"
    sync_standbys: int = Field(default=1, ge=1)


class Database(_Model):
    name: str = Field(pattern=IDENTIFIER_PATTERN)


class PostgresProperties(_Model):
    major_version: int = Field(default=15, ge=10)
    port: int = Field(default=5432, ge=1, le=65535)
    parameters: dict[str, str] = Field(default_factory=dict)
    replication: Replication = Field(default_factory=Replication)
    admin_user: str = Field(default="pgbosh_admin", pattern=IDENTIFIER_PATTERN)
    admin_password: SecretStr
    replication_password: SecretStr
    databases: list[Database] = Field(default_factory=list)

    @field_validator("admin_password", "replication_password")
    @classmethod
    def _password_fits_a_pgpass_line(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret or any(char in secret for char in "\r\n\0"):
            raise ValueError("must be non-empty, one line, without NUL")
        return value

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters_as_strings(cls, value: object) -> object:
        # Manifests written by hand carry numbers (max_connections: 200); PostgreSQL
        # takes every setting as text anyway.
        if isinstance(value, dict):
            return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name in value:
            if not re.match(PARAMETER_NAME_PATTERN, name):
                raise ValueError(f"not a PostgreSQL parameter name: {name!r}")
        return value


class RepmgrProperties(_Model):
    monitor_interval_secs: int = Field(default=2, ge=1)
    reconnect_attempts: int = Field(default=6, ge=1)
    reconnect_interval: int = Field(default=10, ge=1)
    failover: Literal["automatic", "manual"] = "automatic"
    priority_by_index: bool = True
    # repmgr's own setting; see pgconf.render_repmgr_conf for why false is the default.
    primary_visibility_consensus: bool = False


class ConsulProperties(_Model):
    service: str = ""
    http_addr: str = ""
    token: SecretStr | None = None


class PostgresJobProperties(_Model):
    postgres: PostgresProperties
    repmgr: RepmgrProperties = Field(default_factory=RepmgrProperties)
    consul: ConsulProperties = Field(default_factory=ConsulProperties)


class Job(_Model):
    name: str
    # The release has one job; its properties are typed so that secrets stay SecretStr
    # everywhere (repr, dumps, errors).
    properties: PostgresJobProperties | None = None

    @field_validator("properties", mode="before")
    @classmethod
    def _properties_of_known_job_only(cls, value: object, info: ValidationInfo) -> object:
        if info.data.get("name") != "postgres":
            return None
        return value

    @model_validator(mode="after")
    def _postgres_job_has_properties(self) -> Job:
        if self.name == "postgres" and self.properties is None:
            raise ValueError("job postgres needs properties.postgres")
        return self


class Peer(_Model):
    index: int = Field(ge=0)
    id: str
    az: str = ""
    address: str
    bootstrap: bool = False


class AgentConfig(_Model):
    deployment: str
    instance_group: str
    index: int = Field(ge=0)
    id: str
    az: str = ""
    address: str
    bootstrap: bool = False
    agent_id: str
    vm_dir: Path
    persistent_disk: Path
    run_as: str = "postgres"
    peers: list[Peer] = Field(default_factory=list)
    jobs: list[Job] = Field(default_factory=list)

    @field_validator("vm_dir")
    @classmethod
    def _socket_paths_fit(cls, value: Path) -> Path:
        # Unix socket paths are limited to 107 bytes; PostgreSQL's is the longest.
        longest = len(str(value).encode()) + len("/run/.s.PGSQL.65535")
        if longest > MAX_SOCKET_PATH:
            raise ValueError(
                f"vm_dir is too long for unix sockets ({longest} > {MAX_SOCKET_PATH} bytes for run/.s.PGSQL.<port>)"
            )
        return value

    @field_validator("jobs")
    @classmethod
    def _only_known_jobs(cls, value: list[Job]) -> list[Job]:
        unknown = [job.name for job in value if job.name != "postgres"]
        if unknown:
            raise ValueError(f"unknown job(s): {', '.join(unknown)} (release pgbosh has only 'postgres')")
        return value

    @property
    def node_name(self) -> str:
        return self.id or f"{self.instance_group}-{self.index}"

    def other_peers(self) -> list[Peer]:
        return [peer for peer in self.peers if peer.index != self.index and peer.address != self.address]

    def postgres_job(self) -> PostgresJobProperties | None:
        for job in self.jobs:
            if job.name == "postgres":
                return job.properties
        return None


def describe_validation_error(error: ValidationError) -> str:
    """Field locations and messages only: pydantic's own str() would echo the input
    values, and those can be passwords."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def load_agent_config(path: Path) -> tuple[AgentConfig, PostgresJobProperties | None]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error.__class__.__name__}") from None
    try:
        config = AgentConfig.model_validate(raw)
        job = config.postgres_job()
    except ValidationError as error:
        raise ConfigError(f"invalid {path}: {describe_validation_error(error)}") from None
    return config, job
