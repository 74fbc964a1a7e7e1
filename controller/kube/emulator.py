"""kmock's Kubernetes emulator with the bookkeeping pgbosh relies on.

kmock keeps objects as plain JSON and leaves API-server bookkeeping out. pgbosh's
broker decides whether an operation still runs by comparing ``metadata.generation``
with ``status.observedGeneration`` (as on a real API server), and ``kubectl get``
needs ``kind`` on list responses, so this subclass adds:

- ``metadata.generation`` = 1 on create, +1 on every write that changes ``spec``
  outside the ``status`` subresource;
- ``metadata.uid`` and ``metadata.creationTimestamp`` on create.

kmock is a test/dev dependency: import this module only from tests and ``pgbosh dev``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import kmock


class KubeEmulator(kmock.KubernetesEmulator):
    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            action = str(getattr(request.action, "name", request.action) or "").upper()
            metadata = data.setdefault("metadata", {}) if action in ("CREATE", "UPDATE") else None
            if action == "CREATE" and isinstance(metadata, dict):
                metadata.setdefault("generation", 1)
                metadata.setdefault("uid", str(uuid.uuid4()))
                metadata.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif (
                action == "UPDATE"
                and isinstance(metadata, dict)
                and request.subresource != "status"
                and "spec" in data
                and request.name is not None
            ):
                current = self._current(request)
                if current is not None and current.get("spec") != _merged(current.get("spec"), data["spec"]):
                    metadata["generation"] = int(current.get("metadata", {}).get("generation") or 0) + 1
        return await super()._handle(request)

    def _current(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw = self.objects[key].raw
        return dict(raw) if raw is not None else None


def _merged(old: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, to tell whether a patch changes the spec."""
    if not isinstance(patch, dict):
        return patch
    result = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(result.get(key), value)
    return result
