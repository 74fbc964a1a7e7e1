"""What pgbosh needs from a BOSH Director, as types and one Protocol.

The operator depends on :class:`Director` only; the httpx client of the real
Director API (`controller.bosh.client`) implements it, and tests can hand the
operator any other implementation. Shapes follow the Director's JSON
(see ../shared/contracts/bosh-director-api.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

TaskState = Literal["queued", "processing", "cancelling", "cancelled", "done", "error", "timeout"]
FINISHED_TASK_STATES: frozenset[str] = frozenset({"done", "error", "cancelled", "timeout"})
JobStateRequest = Literal["started", "stopped", "detached", "restart", "recreate"]


@dataclass(frozen=True)
class Task:
    """A Director task (`GET /tasks/:id`)."""

    id: int
    state: str
    description: str = ""
    result: str | None = None
    deployment: str | None = None
    context_id: str | None = None
    started_at: int | None = None
    timestamp: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_TASK_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "done"


@dataclass(frozen=True)
class TaskEvent:
    """One line of `GET /tasks/:id/output?type=event`."""

    time: int
    stage: str = ""
    task: str = ""
    state: str = ""
    index: int = 0
    total: int = 0
    progress: int = 0
    tags: tuple[str, ...] = ()
    error: str | None = None

    @property
    def summary(self) -> str:
        where = f" ({self.index}/{self.total})" if self.total else ""
        text = f"{self.stage}: {self.task}{where} {self.state}".strip()
        return f"{text}: {self.error}" if self.error else text


@dataclass(frozen=True)
class Process:
    name: str
    state: str


@dataclass(frozen=True)
class Instance:
    """One object of the `instances?format=full` / `vms?format=full` result output."""

    job_name: str
    index: int | None
    id: str
    az: str | None
    ips: tuple[str, ...]
    job_state: str | None
    state: str | None = None
    processes: tuple[Process, ...] = ()
    resurrection_paused: bool = False
    bootstrap: bool = False
    vm_cid: str | None = None
    disk_cid: str | None = None

    @property
    def name(self) -> str:
        return f"{self.job_name}/{self.id}"

    @property
    def running(self) -> bool:
        """bosh-cli's rule: the job and every process are running."""
        return self.job_state == "running" and all(p.state == "running" for p in self.processes)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Instance:
        return cls(
            job_name=str(raw.get("job_name") or raw.get("job") or ""),
            index=raw.get("index"),
            id=str(raw.get("id") or ""),
            az=raw.get("az"),
            ips=tuple(raw.get("ips") or ()),
            job_state=raw.get("job_state"),
            state=raw.get("state"),
            processes=tuple(Process(str(p.get("name")), str(p.get("state"))) for p in raw.get("processes") or ()),
            resurrection_paused=bool(raw.get("resurrection_paused", False)),
            bootstrap=bool(raw.get("bootstrap", False)),
            vm_cid=raw.get("vm_cid"),
            disk_cid=raw.get("disk_cid"),
        )


@dataclass(frozen=True)
class CloudConfig:
    """The parts of the cloud config pgbosh checks a spec against."""

    azs: tuple[str, ...] = ()
    vm_types: tuple[str, ...] = ()
    disk_types: dict[str, int] = field(default_factory=dict)  # name -> disk_size in MB
    networks: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, doc: dict[str, Any]) -> CloudConfig:
        return cls(
            azs=tuple(str(a["name"]) for a in doc.get("azs") or () if "name" in a),
            vm_types=tuple(str(v["name"]) for v in doc.get("vm_types") or () if "name" in v),
            disk_types={str(d["name"]): int(d.get("disk_size", 0)) for d in doc.get("disk_types") or () if "name" in d},
            networks=tuple(str(n["name"]) for n in doc.get("networks") or () if "name" in n),
        )


class Director(Protocol):
    """The work pgbosh asks of a BOSH Director."""

    async def cloud_config(self) -> CloudConfig:
        """The latest cloud config (`GET /configs?type=cloud&latest=true`)."""
        ...

    async def deployed_manifest(self, deployment: str) -> str | None:
        """The manifest text of a deployment, or None when it does not exist."""
        ...

    async def deploy(self, manifest: str, *, context_id: str) -> int:
        """Start a deploy (`POST /deployments`) and return the task id without waiting."""
        ...

    async def delete_deployment(self, deployment: str, *, context_id: str) -> int | None:
        """Start deleting a deployment; None when there is nothing to delete."""
        ...

    async def task(self, task_id: int) -> Task: ...

    async def task_events(self, task_id: int, offset: int = 0) -> tuple[list[TaskEvent], int]:
        """Event lines from byte `offset` on, and the offset to continue from."""
        ...

    async def tasks(
        self,
        *,
        deployment: str | None = None,
        context_id: str | None = None,
        states: tuple[str, ...] = (),
        limit: int | None = None,
    ) -> list[Task]: ...

    async def instances(self, deployment: str) -> list[Instance]:
        """`GET /deployments/:name/instances?format=full`, followed to its result."""
        ...

    async def instances_brief(self, deployment: str) -> list[Instance]:
        """`GET /deployments/:name/instances`: one request, no task, no job state (job_state None)."""
        ...

    async def set_resurrection(self, deployment: str, group: str, instance_id: str, *, paused: bool) -> None: ...

    async def change_job_state(
        self, deployment: str, group: str, instance_id: str, state: JobStateRequest, *, context_id: str
    ) -> int:
        """`PUT /deployments/:name/jobs/:group/:id?state=...`; returns the task id."""
        ...
