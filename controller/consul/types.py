"""What pgbosh needs from Consul (see ../shared/contracts/consul-api.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Member:
    address: str
    port: int = 5432


@dataclass(frozen=True)
class Published:
    """What the catalog says about one cluster's service."""

    primary: tuple[Member, ...]
    replicas: tuple[Member, ...]


class PrimaryPublisher(Protocol):
    async def publish(self, service: str, primary: Member | None, replicas: list[Member]) -> None:
        """Make `master.<service>` name exactly `primary` and `replica.<service>` the replicas."""
        ...

    async def published(self, service: str) -> Published: ...

    async def withdraw(self, service: str) -> None:
        """Remove every record of the service (cluster deleted)."""
        ...
