"""Director tasks: records, output files and the event log.

A task's outputs live in `<state>/tasks/<id>/{event,result,debug}` like the Director's
task directories. Event lines follow `event_log.rb` (stage, tags, total, task, index,
state, progress, data.error; task-level `{"time","error":{"code","message"}}`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Task types listed by GET /tasks with the default verbose=1 (tasks_controller.rb).
VERBOSE_1_TYPES = frozenset({
    "attach_disk", "create_snapshot", "delete_deployment", "delete_release", "delete_snapshot", "delete_stemcell",
    "run_errand", "snapshot_deployment", "update_deployment", "update_release", "update_stemcell",
})
ACTIVE_STATES = frozenset({"queued", "processing", "cancelling"})


@dataclass
class TaskRecord:
    id: int
    type: str
    state: str
    description: str
    timestamp: int
    started_at: int | None = None
    result: str | None = None
    user: str = "admin"
    deployment: str | None = None
    context_id: str = ""

    def to_api(self) -> dict[str, Any]:
        """The shape of TaskManager#task_to_hash."""
        return {
            "id": self.id, "state": self.state, "description": self.description, "timestamp": self.timestamp,
            "started_at": self.started_at, "result": self.result, "user": self.user,
            "deployment": self.deployment, "context_id": self.context_id,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TaskRecord:
        return cls(**raw)


class TaskOutput:
    """Appends to a task's event/result/debug files."""

    def __init__(self, task_dir: Path) -> None:
        self.dir = task_dir
        task_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, kind: str, line: str) -> None:
        with open(self.dir / kind, "a", encoding="utf-8") as out:
            out.write(line if line.endswith("\n") else line + "\n")

    def debug(self, message: str) -> None:
        now = time.time()
        self._append("debug", f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now % 1 * 1000):03d}Z "
                              f"{message}")

    def result(self, obj: Any) -> None:
        self._append("result", json.dumps(obj, separators=(",", ":")))

    def event(self, entry: dict[str, Any]) -> None:
        self._append("event", json.dumps({"time": int(time.time()), **entry}, separators=(",", ":")))

    def error(self, code: int, message: str) -> None:
        self.event({"error": {"code": code, "message": message}})

    def warning(self, message: str) -> None:
        self.event({"type": "warning", "message": message})

    def stage(self, name: str, total: int, tags: list[str] | None = None) -> Stage:
        return Stage(self, name, total, tags or [])

    def read(self, kind: str) -> bytes | None:
        path = self.dir / kind
        try:
            return path.read_bytes()
        except OSError:
            return None


class Stage:
    """One event-log stage; `track` gives each step its index like Stage#advance_and_track."""

    def __init__(self, out: TaskOutput, name: str, total: int, tags: list[str]) -> None:
        self.out, self.name, self.total, self.tags = out, name, total, tags
        self.index = 0

    def track(self, task: str) -> StageTask:
        self.index += 1
        return StageTask(self, task, self.index)


class StageTask:
    def __init__(self, stage: Stage, name: str, index: int) -> None:
        self.stage, self.name, self.index = stage, name, index

    def _log(self, state: str, progress: int, data: dict[str, Any] | None = None) -> None:
        entry: dict[str, Any] = {"stage": self.stage.name, "tags": self.stage.tags, "total": self.stage.total,
                                 "task": self.name, "index": self.index, "state": state, "progress": progress}
        if data:
            entry["data"] = data
        self.stage.out.event(entry)

    def started(self) -> None:
        self._log("started", 0)

    def finished(self) -> None:
        self._log("finished", 100)

    def failed(self, error: str) -> None:
        self._log("failed", 100, {"error": error})
