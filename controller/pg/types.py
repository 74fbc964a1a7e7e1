"""What the operator observes of one PostgreSQL node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote


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


def connection_uri(user: str, password: str, host: str, port: int | str, dbname: str) -> str:
    """A libpq connection URI, every part percent-encoded (a password may hold anything)."""
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(dbname, safe='')}"


def choose_primary(nodes: Sequence[NodeState]) -> NodeState | None:
    """The one writable node on the highest timeline (ties: the most advanced LSN)."""
    writable = [n for n in nodes if n.writable]
    if not writable:
        return None
    return max(writable, key=lambda n: (n.timeline or 0, n.current_lsn or 0))


class NodeProbe(Protocol):
    async def probe(self, address: str, port: int) -> NodeState: ...
