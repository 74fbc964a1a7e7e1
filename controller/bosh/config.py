"""Operator configuration for the BOSH side: where the Director is, how to log in, and
the names the manifest builder uses.

Defaults match the local director (`pgbosh director serve --listen 127.0.0.1:25555`)
and the local Consul, so `pgbosh dev` needs no configuration. In production the Helm
values set these (environment variables `PGBOSH_BOSH_*`, see :meth:`BoshConfig.from_env`).
The UAA client secret never lives in this object's repr: it is a :class:`Secret`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


class Secret:
    """A string that does not show itself in repr, str, logs or exception messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class DirectorTimeouts:
    """Seconds. Every network wait of the client has one of these bounds."""

    connect: float = 5.0
    read: float = 30.0
    write: float = 30.0
    pool: float = 5.0
    # POST {uaa}/oauth/token as a whole.
    token: float = 15.0
    # How long `instances()` waits for its read-only task before giving up.
    instances_task: float = 120.0
    # How often a task is polled while waiting for it.
    task_poll_interval: float = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls after 5xx answers and connection errors.

    The wait before retry n (1-based) is ``min(max_delay, base_delay * 2 ** (n - 1))``,
    shortened by up to ``jitter`` of itself so that many clusters whose calls failed
    together do not retry together. Calls that start work (POST /deployments, DELETE,
    job state changes) are never retried: a second attempt could start a second task.
    """

    attempts: int = 4  # total tries, the first one included
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25  # fraction of the delay, 0 for exact delays

    def delay(self, retry: int, draw: float = 0.0) -> float:
        """`draw` is a random number in [0, 1); 0 gives the full (capped) delay."""
        full = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return float(full * (1.0 - self.jitter * draw))


@dataclass(frozen=True)
class RepmgrTimings:
    """repmgrd's failure detection. Small values fail over in seconds (local world);
    production clusters on real networks may want larger ones."""

    monitor_interval_secs: int = 1
    reconnect_attempts: int = 2
    reconnect_interval: int = 1
    failover: str = "automatic"
    priority_by_index: bool = True


@dataclass(frozen=True)
class BoshConfig:
    # Director and its login.
    director_url: str = "http://127.0.0.1:25555"
    ca_cert: Path | None = None  # PEM bundle to verify the Director and UAA; None: system CAs
    client_id: str = ""
    client_secret: Secret | None = field(default=None, repr=False)
    timeouts: DirectorTimeouts = field(default_factory=DirectorTimeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Refresh a UAA token this many seconds before it expires.
    token_refresh_margin: float = 60.0
    # HTTP connections to the Director at most (requests beyond wait for one).
    max_connections: int = 16

    # Manifest names.
    deployment_prefix: str = "pgbosh"
    release_name: str = "pgbosh"
    release_version: str = "0.1.0"
    stemcell_alias: str = "default"
    stemcell_os: str = "ubuntu-jammy"
    stemcell_version: str = "latest"
    network: str = "default"
    instance_group: str = "postgres"
    job_name: str = "postgres"
    postgres_port: int = 5432
    admin_user: str = "pgbosh_admin"
    initial_databases: tuple[str, ...] = ("app",)
    canary_watch_time: str = "1000-120000"
    update_watch_time: str = "1000-120000"
    repmgr: RepmgrTimings = field(default_factory=RepmgrTimings)
    consul_http_addr: str = "http://127.0.0.1:8500"  # "" when there is no Consul
    consul_service_prefix: str = "pg"
    # Put `token: ((consul_token))` in the Consul hook; the operator interpolates it.
    consul_token: bool = False
    # Generate a CA and a server certificate (BOSH variables) and hand them to postgres.
    # Off by default: the local director generates passwords only.
    tls: bool = False

    def with_changes(self, **changes: object) -> BoshConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BoshConfig:
        """Read `PGBOSH_BOSH_<FIELD>` variables (upper-case field names) over the defaults.

        The client secret comes from `PGBOSH_BOSH_CLIENT_SECRET_FILE` (a mounted Kubernetes
        Secret) or `PGBOSH_BOSH_CLIENT_SECRET`.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"PGBOSH_BOSH_{f.name.upper()}")
            if raw is None or f.name in ("client_secret", "timeouts", "retry", "repmgr"):
                continue
            default = getattr(cls(), f.name)
            if f.name == "ca_cert":
                changes[f.name] = Path(raw) if raw else None
            elif isinstance(default, bool):
                changes[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                changes[f.name] = int(raw)
            elif isinstance(default, float):
                changes[f.name] = float(raw)
            elif isinstance(default, tuple):
                changes[f.name] = tuple(x.strip() for x in raw.split(",") if x.strip())
            else:
                changes[f.name] = raw
        secret_file = env.get("PGBOSH_BOSH_CLIENT_SECRET_FILE")
        if secret_file:
            changes["client_secret"] = Secret(Path(secret_file).read_text().strip())
        elif env.get("PGBOSH_BOSH_CLIENT_SECRET"):
            changes["client_secret"] = Secret(env["PGBOSH_BOSH_CLIENT_SECRET"])
        return replace(cls(), **changes)  # type: ignore[arg-type]
