"""A former primary comes back as a standby of the current primary, never as a writer.

1. `repmgr node rejoin --force-rewind`: pg_rewind (data checksums and wal_log_hints
   are on) takes back whatever this node wrote after the timelines forked, repmgr
   writes standby.signal and primary_conninfo and updates its metadata.
2. When that fails (the fork point's WAL is gone, a broken disk...), the old data
   directory is moved aside (one copy is kept: `data.former-primary`) and the node
   is cloned afresh from the primary.

repmgr starts the rejoined server with `service_start_command` (pg_ctl, which
detaches it from the VM's process group); the agent stops it again so that its own
supervisor launches the postmaster as a child it owns.
"""

from __future__ import annotations

import logging
import shutil

from controller.node.config import Peer, PostgresJobProperties
from controller.node.layout import NodeLayout
from controller.node.pgconf import PGBOSH_CONF, REPMGR_DATABASE, REPMGR_USER
from controller.node.runas import CommandFailed, RunAs

log = logging.getLogger(__name__)

REJOIN_TIME_LIMIT = 600.0
# Files pg_rewind would copy from the primary (its listen address, its hba) but that
# belong to this node; repmgr keeps them across the rewind.
KEPT_CONFIG_FILES = ("postgresql.conf", PGBOSH_CONF, "pg_hba.conf", "pg_ident.conf")
ASIDE_SUFFIX = ".former-primary"


def primary_conninfo(primary: Peer, props: PostgresJobProperties) -> str:
    return (
        f"host={primary.address} port={props.postgres.port} user={REPMGR_USER} "
        f"dbname={REPMGR_DATABASE} connect_timeout=5"
    )


def rejoin_command(layout: NodeLayout, primary: Peer, props: PostgresJobProperties) -> list[str]:
    return [
        str(layout.binary("repmgr")),
        "-f",
        str(layout.repmgr_conf),
        "node",
        "rejoin",
        "-d",
        primary_conninfo(primary, props),
        "--force-rewind",
        f"--config-files={','.join(KEPT_CONFIG_FILES)}",
        f"--config-archive-dir={layout.socket_dir / 'rejoin-config'}",
        "--verbose",
    ]


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


async def rewind(layout: NodeLayout, run_as: RunAs, primary: Peer, props: PostgresJobProperties) -> None:
    (layout.socket_dir / "rejoin-config").mkdir(exist_ok=True)
    run_as.chown(layout.socket_dir / "rejoin-config", 0o700)
    await finish_crash_recovery(layout, run_as)
    await run_as.run(rejoin_command(layout, primary, props), time_limit=REJOIN_TIME_LIMIT)


def move_aside(layout: NodeLayout) -> None:
    aside = layout.data_dir.with_name(layout.data_dir.name + ASIDE_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    if layout.data_dir.exists():
        layout.data_dir.rename(aside)
        log.warning("moved the former primary's data directory to %s", aside)


__all__ = ["CommandFailed", "cluster_state", "finish_crash_recovery", "move_aside", "rejoin_command", "rewind"]
