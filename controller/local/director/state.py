"""The director's persistent state: JSON files in the state directory, written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .vms import write_private


@dataclass
class InstanceRecord:
    id: str
    group: str
    index: int
    az: str
    address: str
    disk_cid: str
    disk_mb: int
    vm_type: str
    bootstrap: bool = False
    state: str = "started"  # started | stopped | detached
    resurrection_paused: bool = False
    vm_cid: str | None = None
    agent_id: str | None = None
    pid: int | None = None
    vm_created_at: str | None = None
    spec_digest: str = ""
    ignore: bool = False
    # Set while this instance's data moves to a new disk (disk growth): the new disk's cid.
    pending_disk_cid: str | None = None

    @property
    def name(self) -> str:
        return f"{self.group}/{self.id}"

    def label(self) -> str:
        return f"{self.group}/{self.id} ({self.index})"


@dataclass
class DeploymentRecord:
    name: str
    manifest: str
    slot: int
    cloud_config_id: str | None
    releases: list[dict[str, str]] = field(default_factory=list)
    stemcells: list[dict[str, str]] = field(default_factory=list)
    instances: list[InstanceRecord] = field(default_factory=list)
    # What the VMs are configured from (set when a deploy starts); `manifest` is the last
    # one that deployed successfully, so a failed deploy is retried by a client that
    # compares manifests.
    applied_manifest: str = ""

    @property
    def config_manifest(self) -> str:
        return self.applied_manifest or self.manifest

    def group(self, group: str) -> list[InstanceRecord]:
        return sorted((i for i in self.instances if i.group == group), key=lambda i: i.index)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DeploymentRecord:
        instances = [InstanceRecord(**i) for i in raw.pop("instances", [])]
        return cls(**raw, instances=instances)


@dataclass
class ConfigRecord:
    id: str
    type: str
    name: str
    content: str
    created_at: int

    def to_api(self) -> dict[str, Any]:
        """configs_controller.rb `sql_to_hash`: content, id (a string), type, name."""
        return {"content": self.content, "id": self.id, "type": self.type, "name": self.name}


@dataclass
class DirectorState:
    deployments: dict[str, DeploymentRecord] = field(default_factory=dict)
    configs: list[ConfigRecord] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    next_task_id: int = 1
    next_config_id: int = 1
    resurrection_paused: bool = False
    vm_root: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DirectorState:
        return cls(
            deployments={k: DeploymentRecord.from_json(v) for k, v in raw.get("deployments", {}).items()},
            configs=[ConfigRecord(**c) for c in raw.get("configs", [])],
            tasks=list(raw.get("tasks", [])),
            next_task_id=int(raw.get("next_task_id", 1)),
            next_config_id=int(raw.get("next_config_id", 1)),
            resurrection_paused=bool(raw.get("resurrection_paused", False)),
            vm_root=raw.get("vm_root"),
        )


class StateStore:
    """`state.json` (deployments, VMs, tasks, configs) and `variables.json` (0600, secrets)."""

    MAX_TASKS = 2000

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state_path = state_dir / "state.json"
        self.variables_path = state_dir / "variables.json"

    def load(self) -> DirectorState:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return DirectorState()
        return DirectorState.from_json(raw)

    def save(self, state: DirectorState) -> None:
        if len(state.tasks) > self.MAX_TASKS:
            del state.tasks[: len(state.tasks) - self.MAX_TASKS]
        # 0600: manifests may carry credentials the client interpolated (like `bosh deploy -v`).
        write_private(self.state_path, json.dumps(state.to_json(), indent=1, sort_keys=True))

    def load_variables(self) -> dict[str, dict[str, str]]:
        try:
            raw = json.loads(self.variables_path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): {str(n): str(v) for n, v in vals.items()} for k, vals in raw.items()}

    def save_variables(self, variables: dict[str, dict[str, str]]) -> None:
        write_private(self.variables_path, json.dumps(variables, indent=1, sort_keys=True))
