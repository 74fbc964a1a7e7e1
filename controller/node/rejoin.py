"""A former primary comes back as a standby of the current primary, never as a writer.

1. Crash recovery is finished in single-user mode (pg_rewind wants a cleanly shut
   down target), then pg_rewind (data checksums and wal_log_hints are on) takes back
   whatever this node wrote after the timelines forked; the agent writes
   standby.signal and primary_conninfo, starts it as its own child and runs
   `repmgr standby register --force` (repmgr's metadata).
2. When that fails (the fork point's WAL is gone, a broken disk...), the old data
   directory is moved aside (one copy is kept: `data.former-primary`) and the node
   is cloned afresh from the primary. A marker on the disk (`pgbosh-clone-pending`,
   written before the move) says that this disk may only be cloned until a clone has
   completed: if the clone fails too (the primary is away, it has no free slot...),
   the job's retry finds an empty data directory, and without the marker the
   bootstrap instance would initdb a second, empty primary. The job writes the same
   marker before every clone (controller/node/job.py), so that an interrupted clone
   is cloned again, never initdb'd or started as a half-done bootstrap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import psycopg

from controller.node.config import Peer, PostgresJobProperties
from controller.node.layout import NodeLayout
from controller.node.pgconf import REPMGR_DATABASE, REPMGR_USER, quote_conf
from controller.node.runas import CommandFailed, RunAs

log = logging.getLogger(__name__)

REJOIN_TIME_LIMIT = 300.0
ASIDE_SUFFIX = ".former-primary"
CLONE_PENDING = "pgbosh-clone-pending"


def clone_pending_marker(layout: NodeLayout) -> Path:
    """Present from a rejoin's fallback, or the start of any clone, until the clone is
    done and registered: the disk belongs to a cluster that exists."""
    return layout.postgres_root / CLONE_PENDING


def former_data_dir(layout: NodeLayout) -> Path:
    """Where move_aside keeps the former primary's data directory."""
    return layout.data_dir.with_name(layout.data_dir.name + ASIDE_SUFFIX)


def primary_conninfo(primary: Peer, props: PostgresJobProperties) -> str:
    return (
        f"host={primary.address} port={props.postgres.port} user={REPMGR_USER} "
        f"dbname={REPMGR_DATABASE} connect_timeout=5"
    )


async def checkpoint(primary: Peer, props: PostgresJobProperties) -> None:
    """A primary promoted moments ago still has the old timeline in pg_control until
    its first checkpoint, and pg_rewind reads the source's timeline from there: it
    would say "source and target cluster are on the same timeline; no rewind
    required" (PostgreSQL's pg_rewind docs ask for this CHECKPOINT)."""
    async with await psycopg.AsyncConnection.connect(
        host=primary.address,
        port=props.postgres.port,
        user=REPMGR_USER,
        password=props.postgres.replication_password.get_secret_value(),
        dbname=REPMGR_DATABASE,
        connect_timeout=5,
        autocommit=True,
    ) as conn:
        await conn.execute("CHECKPOINT")


async def cluster_state(layout: NodeLayout, run_as: RunAs) -> str:
    """`Database cluster state` from pg_controldata ("shut down", "in production", ...)."""
    out = await run_as.run([layout.binary("pg_controldata"), "-D", layout.data_dir], time_limit=30, quiet=True)
    for line in out.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


async def finish_crash_recovery(layout: NodeLayout, run_as: RunAs) -> None:
    """A primary killed with SIGKILL left its data directory "in production". pg_rewind
    wants a cleanly shut down target: replay the WAL in single-user mode (no listener,
    so nothing can write meanwhile) and end with a shutdown checkpoint."""
    state = await cluster_state(layout, run_as)
    if state in ("shut down", "shut down in recovery"):
        return
    log.info("data directory is %r: finishing crash recovery in single-user mode", state)
    await run_as.run(
        [layout.binary("postgres"), "--single", "-D", layout.data_dir, "-c", "log_min_messages=warning", "postgres"],
        stdin_text="",
        time_limit=REJOIN_TIME_LIMIT,
    )


async def rewind(
    layout: NodeLayout, run_as: RunAs, primary: Peer, props: PostgresJobProperties, application_name: str
) -> None:
    """pg_rewind this stopped former primary onto `primary` and make it a standby of it.

    Not `repmgr node rejoin --force-rewind`, which was tried first (measured in
    tests/ha/test_node_loss.py): repmgr decides whether to rewind from the latest
    checkpoint's location, and after crash recovery that checkpoint can sit exactly
    at the fork point, so it skipped pg_rewind and the standby looped on "requested
    timeline 2 is not a child of this server's history"; and the server repmgr
    starts (pg_ctl) sat in state "startup" for node_rejoin_timeout. pg_rewind reads
    the WAL itself. The caller starts the server and runs `repmgr standby register
    --force` for repmgr's metadata.
    """
    await finish_crash_recovery(layout, run_as)
    await checkpoint(primary, props)
    await run_as.run(
        [layout.binary("pg_rewind"), "-D", layout.data_dir, f"--source-server={primary_conninfo(primary, props)}"],
        time_limit=REJOIN_TIME_LIMIT,
    )
    # pg_rewind copied the primary's postgresql.auto.conf; this node's own settings
    # (pgbosh.conf, pg_hba, pg_ident) are rewritten before every start anyway.
    conninfo = (
        f"host={primary.address} port={props.postgres.port} user={REPMGR_USER} "
        f"application_name={application_name} connect_timeout=2"
    )
    auto_conf = (
        "# Written by the pgbosh node agent after pg_rewind (rejoin).\n"
        f"primary_conninfo = {quote_conf(conninfo)}\n"
        "recovery_target_timeline = 'latest'\n"
    )
    run_as.write_file(layout.data_dir / "postgresql.auto.conf", auto_conf, 0o600)
    run_as.write_file(layout.data_dir / "standby.signal", "", 0o600)


def move_aside(layout: NodeLayout, reason: str) -> None:
    """Keep the former primary's data directory beside the new one, for a human, and
    mark the disk clone-only first (see the module's docstring)."""
    marker = clone_pending_marker(layout)
    marker.write_text(f"the data directory was moved aside: {reason}\n")
    aside = former_data_dir(layout)
    if aside.exists():
        shutil.rmtree(aside)
    if layout.data_dir.exists():
        layout.data_dir.rename(aside)
        log.warning("moved the former primary's data directory to %s", aside)


__all__ = [
    "CommandFailed",
    "clone_pending_marker",
    "cluster_state",
    "finish_crash_recovery",
    "former_data_dir",
    "move_aside",
    "rewind",
]
