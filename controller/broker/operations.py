"""The state of a broker operation, read from the PostgresCluster itself.

The broker keeps nothing in memory. When it starts an operation it writes an
annotation (id, type, the ``metadata.generation`` the operation produced and a
fingerprint of the request); whether that operation still runs is then decided
from the resource alone:

- deleting (``deletionTimestamp``)                  -> in progress
- ``status.observedGeneration`` < the operation's   -> in progress (operator has not caught up)
- phase ``Ready``                                   -> succeeded
- phase ``Failed``                                  -> failed, with the Ready condition's message
- anything else                                     -> in progress

so a restarted (or a second) broker gives the same answers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from controller.broker.naming import ANNOTATION_OPERATION

State = Literal["in progress", "succeeded", "failed"]
IN_PROGRESS: State = "in progress"
SUCCEEDED: State = "succeeded"
FAILED: State = "failed"
OperationType = Literal["provision", "update", "deprovision"]


# What json.dumps(document, sort_keys=True, separators=(",", ":")) writes, without a new
# encoder per call. The fingerprints already stored in annotations depend on these bytes.
CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def fingerprint(document: Any) -> str:
    """A stable digest of a request's meaningful fields (for 'identical request' checks)."""
    return hashlib.sha256(CANONICAL_JSON.encode(document).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Operation:
    id: str
    type: OperationType
    generation: int | None = None
    request: str | None = None

    def annotation(self) -> str:
        # The fields in sorted order, as json.dumps(asdict(self), sort_keys=True) wrote them.
        return _COMPACT_JSON.encode(
            {"generation": self.generation, "id": self.id, "request": self.request, "type": self.type}
        )

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Operation | None:
        text = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OPERATION)
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                id=str(data["id"]),
                type=data["type"],
                generation=data.get("generation"),
                request=data.get("request"),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Observed:
    state: State
    description: str
    operation: Operation | None

    @property
    def running(self) -> bool:
        return self.state == IN_PROGRESS


def _ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    for condition in status.get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            return condition
    return {}


def _observed_generation(status: dict[str, Any]) -> int | None:
    seen = [status.get("observedGeneration"), _ready_condition(status).get("observedGeneration")]
    numbers = [int(g) for g in seen if isinstance(g, int)]
    return max(numbers) if numbers else None


def observe(obj: dict[str, Any]) -> Observed:
    operation = Operation.of(obj)
    metadata = obj.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return Observed(IN_PROGRESS, "deleting the cluster", operation)
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    message = str(_ready_condition(status).get("message") or "")
    if operation is not None and operation.generation is not None:
        observed = _observed_generation(status)
        # An operator that records no observedGeneration at all leaves only the phase to go by.
        if observed is not None and observed < operation.generation:
            waiting = f"waiting for the operator to act on generation {operation.generation}"
            return Observed(IN_PROGRESS, waiting, operation)
        if observed is None and not status:
            return Observed(IN_PROGRESS, "waiting for the operator", operation)
    if phase == "Ready":
        return Observed(SUCCEEDED, message or "the cluster is ready", operation)
    if phase == "Failed":
        return Observed(FAILED, message or "the cluster failed", operation)
    return Observed(IN_PROGRESS, f"{phase}: {message}" if message else str(phase), operation)
