"""What the operator observes of one PostgreSQL node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NodeState:
    address: str
    reachable: bool
    in_recovery: bool | None = None
    timeline: int | None = None
    received_lsn: int | None = None
    replayed_lsn: int | None = None
    current_lsn: int | None = None
    lag_bytes: int | None = None
    error: str | None = None

    @property
    def writable(self) -> bool:
        return self.reachable and self.in_recovery is False


class NodeProbe(Protocol):
    async def probe(self, address: str, port: int) -> NodeState: ...
