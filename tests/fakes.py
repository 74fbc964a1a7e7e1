"""A Director test double for the operator-core tests.

It implements the `Director` Protocol in memory (tasks advance one state per poll,
instances follow the deployed manifest) so that the operator's own logic can be
tested fast. The BOSH integration tests run the real client against the local
director instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import yaml

from controller.bosh.client import DirectorUnavailable
from controller.bosh.types import CloudConfig, Instance, Process, Task, TaskEvent

DEFAULT_CLOUD = CloudConfig(
    azs=("z1", "z2", "z3"),
    vm_types=("small", "medium", "large"),
    disk_types={"1GB": 1024, "5GB": 5120, "10GB": 10240},
    networks=("default",),
)


@dataclass
class FakeTask:
    task: Task
    polls_left: int
    on_done: object = None
    fail_with: str | None = None


@dataclass
class FakeDirector:
    cloud: CloudConfig = DEFAULT_CLOUD
    polls_per_task: int = 2
    deployments: dict[str, str] = field(default_factory=dict)
    tasks_by_id: dict[int, FakeTask] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    down: bool = False
    fail_next_deploy: str | None = None
    resurrection: dict[str, bool] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise DirectorUnavailable("GET", "/info", "connection refused", attempts=4, director="http://127.0.0.1:1")

    def count(self, prefix: str) -> int:  # calls of exactly this method
        return sum(1 for c in self.calls if c == prefix)

    async def cloud_config(self) -> CloudConfig:
        self._call("cloud_config")
        return self.cloud

    async def deployed_manifest(self, deployment: str) -> str | None:
        self._call("deployed_manifest")
        return self.deployments.get(deployment)

    def _start(self, description: str, deployment: str, context_id: str, manifest: str | None) -> int:
        task_id = next(self._ids)
        fail = None
        if manifest is not None and self.fail_next_deploy:
            fail, self.fail_next_deploy = self.fail_next_deploy, None
        self.tasks_by_id[task_id] = FakeTask(
            Task(id=task_id, state="queued", description=description, deployment=deployment, context_id=context_id),
            self.polls_per_task,
            on_done=manifest if manifest is not None else "delete",
            fail_with=fail,
        )
        return task_id

    async def deploy(self, manifest: str, *, context_id: str) -> int:
        self._call("deploy")
        name = yaml.safe_load(manifest)["name"]
        return self._start("create deployment", name, context_id, manifest)

    async def delete_deployment(self, deployment: str, *, context_id: str) -> int | None:
        self._call("delete_deployment")
        if deployment not in self.deployments:
            return None
        return self._start(f"delete deployment {deployment}", deployment, context_id, None)

    async def task(self, task_id: int) -> Task:
        self._call("task")
        fake = self.tasks_by_id[task_id]
        if not fake.task.finished:
            fake.polls_left -= 1
            if fake.polls_left <= 0:
                state, result = ("error", fake.fail_with) if fake.fail_with else ("done", None)
                if state == "done":
                    name = fake.task.deployment or ""
                    if fake.on_done == "delete":
                        self.deployments.pop(name, None)
                    else:
                        self.deployments[name] = str(fake.on_done)
                fake.task = Task(**{**fake.task.__dict__, "state": state, "result": result})
            else:
                fake.task = Task(**{**fake.task.__dict__, "state": "processing"})
        return fake.task

    async def task_events(self, task_id: int, offset: int = 0) -> tuple[list[TaskEvent], int]:
        self._call("task_events")
        if offset:
            return [], offset
        return [TaskEvent(time=0, stage="Updating instance", task="postgres/0", state="started", index=1, total=3)], 1

    async def tasks(
        self,
        *,
        deployment: str | None = None,
        context_id: str | None = None,
        states: tuple[str, ...] = (),
        limit: int | None = None,
    ) -> list[Task]:
        self._call("tasks")
        found = [
            f.task
            for f in self.tasks_by_id.values()
            if (deployment is None or f.task.deployment == deployment)
            and (context_id is None or f.task.context_id == context_id)
            and (not states or f.task.state in states)
        ]
        return sorted(found, key=lambda t: -t.id)

    async def instances(self, deployment: str) -> list[Instance]:
        self._call("instances")
        manifest = self.deployments.get(deployment)
        if manifest is None:
            return []
        group = yaml.safe_load(manifest)["instance_groups"][0]
        azs = group["azs"]
        return [
            Instance(
                job_name=group["name"],
                index=i,
                id=f"id-{i}",
                az=azs[i % len(azs)],
                ips=(f"127.9.0.{10 + i}",),
                job_state="running",
                state="started",
                processes=(Process("postgres", "running"), Process("repmgrd", "running")),
                resurrection_paused=self.resurrection.get(f"id-{i}", False),
                bootstrap=i == 0,
            )
            for i in range(int(group["instances"]))
        ]

    async def instances_brief(self, deployment: str) -> list[Instance]:
        full = await self.instances(deployment)
        self.calls[-1] = "instances_brief"  # one request, not the full listing
        return [Instance(**{**i.__dict__, "job_state": None, "processes": ()}) for i in full]

    async def set_resurrection(self, deployment: str, group: str, instance_id: str, *, paused: bool) -> None:
        self._call("set_resurrection")
        self.resurrection[instance_id] = paused

    async def change_job_state(
        self, deployment: str, group: str, instance_id: str, state: str, *, context_id: str
    ) -> int:
        self._call("change_job_state")
        return self._start(f"{state} instance", deployment, context_id, self.deployments.get(deployment))
