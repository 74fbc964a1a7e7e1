"""Node loss with production timings: a replica is promoted, the promote hook moves
Consul's master record (dig sees it), a client that connects by the DNS name writes,
and the old primary comes back as a replica on the new timeline (pg_rewind)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from node.cluster import agent_log_tail, wait_for

from .harness import HACluster, connect_by_name, ha_cluster, master_name, timeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[HACluster]:
    with ha_cluster(3) as ha:
        yield ha


def dig_master(cluster: HACluster) -> list[str]:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(cluster.dns_port), master_name(), "+short", "+time=1", "+tries=1"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return out.stdout.split()


def test_node_loss_promotes_a_replica_and_moves_the_dns_name(cluster: HACluster) -> None:
    old = cluster.nodes[0]
    assert dig_master(cluster) == [old.address]
    with connect_by_name(cluster.dns_port) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before the node loss')")
    cluster.wait_streaming(old, 2)
    old_timeline = timeline(old)

    killed = time.monotonic()
    old.kill_vm()

    def written_by_name() -> bool:
        with connect_by_name(cluster.dns_port) as conn:
            conn.execute("INSERT INTO notes (note) VALUES ('after the node loss')")
        return True

    try:
        wait_for(written_by_name, 30, "a write through the DNS name", interval=0.05)
    except AssertionError as error:
        logs = "".join(agent_log_tail(n) for n in cluster.nodes[1:])
        raise AssertionError(f"{error}\n{logs}") from None
    unavailable = time.monotonic() - killed
    new = wait_for(cluster.primary, 10, "the new primary's agent says so")  # /status caches the role 1 s
    assert new is not old
    assert dig_master(cluster) == [new.address]
    assert timeline(new) == old_timeline + 1
    print(f"write through {master_name()} {unavailable:.2f} s after the node loss")
    assert unavailable < 15, unavailable

    # The resurrected VM on its old disk: rewound and following, never a second writer.
    old.restart_vm()
    try:
        wait_for(lambda: (old.status() or {}).get("job_state") == "running", 120, "old primary running")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{agent_log_tail(old)}") from None
    wait_for(lambda: old.role() == "standby", 10, "old primary a standby")  # /status caches the role 1 s
    wait_for(lambda: timeline(old) == old_timeline + 1, 30, "old primary on the new timeline")
    with old.connect() as conn:
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM notes WHERE note = 'after the node loss'").fetchone() == (1,),
            30,
            "the new primary's row on the old primary",
        )
    cluster.wait_streaming(new, 2)
    assert dig_master(cluster) == [new.address]
