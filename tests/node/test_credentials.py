"""The job's properties are the truth on every start: a redeploy with new passwords (rotated,
or credentials made anew for an adopted deployment, as `pgbosh dev` does after a restart)
applies them to a primary that starts on its disk again, and standbys follow with them."""

from __future__ import annotations

import psycopg
import pytest

from .cluster import ADMIN_PASSWORD, Node, running_cluster, start_nodes, wait_for, wait_for_node

pytestmark = pytest.mark.slow


def streaming(primary: Node) -> int:
    with primary.connect("postgres") as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()
    return int(row[0]) if row else 0


def test_new_passwords_apply_when_the_nodes_start_again() -> None:
    with running_cluster(2) as nodes:
        primary, standby = nodes
        wait_for(lambda: streaming(primary) == 1, 60, "the standby streaming")
        with primary.connect() as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('before the new passwords')")
        for node in nodes:
            node.stop_agent()
        # The redeploy: same disks, new VMs, new passwords in the job properties.
        for node in nodes:
            node.generation += 1
            node.passwords = ("new-admin'pw:3", "new-repl'pw:4")
        start_nodes(nodes, 120)
        wait_for_node(standby, lambda: streaming(primary) == 1, 60, "the standby streaming with the new password")
        with primary.connect() as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("before the new passwords",)]
        wait_for(lambda: (standby.status() or {}).get("role") == "standby", 30, "standby role")
        old = Node(index=primary.index, address=primary.address, base=primary.base, passwords=(ADMIN_PASSWORD, ""))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            old.connect()
