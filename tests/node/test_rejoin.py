"""A former primary whose pg_rewind fails is cloned afresh (controller/node/rejoin.py).

The failure is PostgreSQL's own, with nothing injected: the classic way pg_rewind
cannot work in production. An async standby falls behind (here: its job is stopped),
the primary keeps writing, and its checkpoints invalidate the standby's slot and
remove the WAL from where the standby stopped (max_slot_wal_keep_size is small, as on
a small disk). The primary dies, the lagging standby is promoted (repmgrd's own
failover), so the timelines fork where the standby stopped. pg_rewind must read the
old primary's WAL from the last checkpoint before that fork, and that WAL is gone: it
exits with an error, and the agent must move the data directory aside and clone.

In the second variant that clone fails too, for a reason of its own: the new primary
has no free replication slot (max_replication_slots is used up). The node, which is
the bootstrap instance, must keep waiting to clone; its data directory is empty by
then, and a retry that planned an initdb would start a second, empty primary.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from .cluster import (
    FAST_DETECTION,
    Node,
    agent_log_tail,
    job_running,
    notes,
    role,
    running_cluster,
    streaming_from,
    wait_for,
    wait_for_node,
)

pytestmark = pytest.mark.slow

# Slots keep at most 32 MB (two segments) of WAL and nothing else keeps any: a standby
# that falls further behind loses its slot and the primary removes the WAL.
SMALL_WAL_RETENTION = {"wal_keep_size": "0", "max_slot_wal_keep_size": "32MB"}


@pytest.fixture
def cluster() -> Iterator[list[Node]]:
    # Two nodes: with three, the isolation guard and the third node's vote would be
    # part of the story; the rejoin path is the same.
    with running_cluster(2, FAST_DETECTION, parameters=SMALL_WAL_RETENTION) as nodes:
        yield nodes


def wal_receiver(node: Node) -> tuple[Any, ...] | None:
    with node.connect("postgres") as conn:
        return conn.execute("SELECT status, received_tli FROM pg_stat_wal_receiver").fetchone()


def current_timeline(primary: Node) -> int:
    with primary.connect("postgres") as conn:
        row = conn.execute(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
        ).fetchone()
    assert row is not None
    return int(row[0])


def fill_replication_slots(primary: Node) -> int:
    """Use up the primary's max_replication_slots; returns how many were created."""
    with primary.connect("postgres") as conn:
        row = conn.execute(
            "SELECT current_setting('max_replication_slots')::int - count(*) FROM pg_replication_slots"
        ).fetchone()
        assert row is not None
        free = int(row[0])
        for i in range(free):
            conn.execute("SELECT pg_create_physical_replication_slot(%s)", (f"filler_{i}",))
    return free


def provisioning_plans(node: Node) -> list[str]:
    return re.findall(r"provisioning plan: (\S+)", (node.vm_dir / "agent.log").read_text())


@pytest.mark.parametrize("slots_exhausted", [False, True], ids=["clone", "clone-fails-first"])
def test_former_primary_whose_fork_point_wal_is_gone_is_cloned_afresh(
    cluster: list[Node], slots_exhausted: bool
) -> None:
    old_primary, standby = cluster
    with old_primary.connect() as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before the fork')")
    wait_for(lambda: "before the fork" in notes(standby), 30, "row on the standby")

    # The standby falls behind: its job stops (a clean shutdown; it stays a standby).
    assert standby.request("POST", "/jobs/stop", timeout=90)["job_state"] == "stopped"

    # The primary writes on; its checkpoints drop the standby's slot and the WAL.
    with old_primary.connect() as conn:
        slot = conn.execute("SELECT slot_name, restart_lsn FROM pg_replication_slots").fetchone()
        assert slot is not None and slot[1] is not None, slot
        slot_name, stopped_at = slot
        fork_segment = conn.execute("SELECT pg_walfile_name(%s::pg_lsn)", (str(stopped_at),)).fetchone()
        assert fork_segment is not None
        for i in range(6):
            conn.execute("INSERT INTO notes (note) VALUES (%s)", (f"lost with the old primary {i}",))
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        wal_status = conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot_name,)
        ).fetchone()
        assert wal_status == ("lost",), wal_status
        segments = {str(row[0]) for row in conn.execute("SELECT name FROM pg_ls_waldir()").fetchall()}
        assert fork_segment[0] not in segments, (fork_segment[0], sorted(segments))

    # The standby comes back, cannot stream any more (its WAL is gone on the primary)...
    assert standby.request("POST", "/jobs/start")["job_state"] in ("starting", "running")
    wait_for(functools.partial(job_running, standby), 60, "standby running again")
    assert "node-1" not in streaming_from(old_primary)

    # ... and is promoted by repmgrd when the primary's VM dies: timeline 2 forks there.
    old_primary.kill_agent()
    try:
        wait_for(lambda: role(standby) == "primary", 30, "the lagging standby promoted")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{(standby.vm_dir / 'log' / 'repmgr.log').read_text()[-3000:]}") from None
    new_timeline = wait_for(lambda: current_timeline(standby) > 1 and current_timeline(standby), 10, "new timeline")
    with standby.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('on the new timeline')")

    if slots_exhausted:
        assert fill_replication_slots(standby) > 0

    # The old primary's VM comes back on its disk.
    old_primary.generation += 1
    old_primary.start_agent()
    old_primary.start_job()
    if slots_exhausted:
        # pg_rewind fails, the data directory goes aside, the clone fails; the job
        # retries, and every retry waits to clone: none starts an empty primary.
        wait_for(lambda: len(provisioning_plans(old_primary)) >= 3, 60, "two retries after the failed clone")
        assert "all replication slots are in use" in (old_primary.vm_dir / "agent.log").read_text()
        assert provisioning_plans(old_primary)[0] == "reuse"
        assert set(provisioning_plans(old_primary)[1:]) == {"clone"}, agent_log_tail(old_primary, 80)
        assert (old_primary.status() or {}).get("job_state") == "failing"
        assert (old_primary.disk / "postgres" / "pgbosh-clone-pending").is_file()
        with pytest.raises(psycopg.OperationalError):
            old_primary.connect().close()
        with standby.connect("postgres") as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'filler_%'"
            )
    wait_for_node(old_primary, functools.partial(job_running, old_primary), 180, "old primary back", log_lines=80)

    agent_log = (old_primary.vm_dir / "agent.log").read_text()
    assert "rejoin with pg_rewind failed, cloning afresh" in agent_log, agent_log_tail(old_primary, 80)
    # pg_rewind's own reason (PostgreSQL 15's wording): the target's WAL at the fork is gone.
    assert "pg_rewind failed" in agent_log
    assert "could not find previous WAL record" in agent_log
    assert (old_primary.disk / "postgres" / "data.former-primary" / "PG_VERSION").is_file()
    assert not (old_primary.disk / "postgres" / "pgbosh-clone-pending").exists()  # the clone completed

    # A streaming standby of the new primary, on its timeline, with its data only.
    wait_for(lambda: role(old_primary) == "standby", 10, "old primary a standby")
    wait_for(lambda: "node-0" in streaming_from(standby), 30, "node 0 streams from node 1")
    wait_for(lambda: wal_receiver(old_primary) == ("streaming", new_timeline), 30, "streaming on the new timeline")
    with standby.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('after the rejoin')")
    wait_for(lambda: "after the rejoin" in notes(old_primary), 30, "row on the rejoined node")
    assert notes(old_primary) == {"before the fork", "on the new timeline", "after the rejoin"}
    with old_primary.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    # repmgr's metadata agrees, so that repmgrd can fail over again later.
    with standby.connect("repmgr") as conn:
        nodes = conn.execute("SELECT node_id, type, upstream_node_id, active FROM repmgr.nodes ORDER BY 1").fetchall()
    assert nodes == [(1, "standby", 2, True), (2, "primary", None, True)]
