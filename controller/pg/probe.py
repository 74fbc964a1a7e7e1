"""Observing PostgreSQL nodes with psycopg: role, timeline, LSNs, lag.

One short connection per node per observation, with a connect timeout, so a dead
or partitioned node costs at most that timeout and never blocks the others.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import psycopg

# choose_primary: the operator's rule for the primary, so that lag is measured against
# the node it publishes and fences for.
from controller.pg.types import NodeProbe, NodeState, choose_primary

CONNECT_TIMEOUT_SECONDS = 2
STATEMENT_TIMEOUT_MS = 2000

# One round trip. On a primary the timeline is the one of the WAL it writes now (the
# checkpoint's can lag right after a promotion); on a standby, the one it receives.
_QUERY = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() - '0/0' END,
       pg_last_wal_receive_lsn() - '0/0',
       pg_last_wal_replay_lsn() - '0/0'
"""


class PsycopgProbe:
    """Implements :class:`controller.pg.types.NodeProbe` with the cluster's admin login."""

    def __init__(self, user: str, password: str, dbname: str = "postgres") -> None:
        self._user = user
        self._password = password
        self._dbname = dbname

    async def probe(self, address: str, port: int) -> NodeState:
        try:
            conn = await psycopg.AsyncConnection.connect(
                host=address,
                port=port,
                user=self._user,
                password=self._password,
                dbname=self._dbname,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="pgbosh-operator",
                autocommit=True,
            )
        except psycopg.Error as exc:
            return NodeState(address=address, reachable=False, error=_describe(exc))
        try:
            async with conn:
                cur = await conn.execute(_QUERY)
                row = await cur.fetchone()
        except psycopg.Error as exc:
            return NodeState(address=address, reachable=False, error=_describe(exc))
        assert row is not None
        in_recovery, timeline, current, received, replayed = row
        return NodeState(
            address=address,
            reachable=True,
            in_recovery=bool(in_recovery),
            timeline=int(timeline) if timeline is not None else None,
            current_lsn=int(current) if current is not None else None,
            received_lsn=int(received) if received is not None else None,
            replayed_lsn=int(replayed) if replayed is not None else None,
        )


def _describe(exc: psycopg.Error) -> str:
    # psycopg's messages name host and port, never the password; keep only the first line.
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def with_lag(nodes: list[NodeState]) -> list[NodeState]:
    """Lag of each standby behind the primary, in bytes of WAL.

    The primary is the one `choose_primary` picks (the writable node on the highest
    timeline), not the writable node with the highest LSN: a stale former primary on
    an older timeline may have written further, and the lag shown must be the lag
    behind the node the operator publishes as the primary."""
    primary = choose_primary(nodes)
    if primary is None or primary.current_lsn is None:
        return nodes
    head = primary.current_lsn
    out = []
    for node in nodes:
        if node.reachable and node.in_recovery:
            position = node.replayed_lsn if node.replayed_lsn is not None else node.received_lsn
            node = replace(node, lag_bytes=max(0, head - position) if position is not None else None)
        out.append(node)
    return out


async def probe_all(probe: NodeProbe, addresses: list[str], port: int) -> list[NodeState]:
    return with_lag(list(await asyncio.gather(*(probe.probe(a, port) for a in addresses))))
