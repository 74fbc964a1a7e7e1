"""The replication set-up the agent writes lets repmgrd fail over when a VM dies.

Failover tuning and the Consul hook belong to the HA work; this pins that the
repmgr.conf (promote/follow commands, location, priorities, PGPASSFILE) works."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator

import pytest

from .cluster import FAST_DETECTION, Node, job_running, running_cluster, wait_for, wait_for_node

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    with running_cluster(3, FAST_DETECTION) as nodes:
        yield nodes


def role(node: Node) -> str | None:
    status = node.status()
    return None if status is None else str(status["role"])


def streaming_from(node: Node) -> list[str]:
    with node.connect("postgres") as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'").fetchall()
    return [str(row[0]) for row in rows]


def test_vm_death_promotes_the_highest_priority_standby(cluster: list[Node]) -> None:
    old_primary, candidate, follower = cluster
    with old_primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before failover')")
    wait_for(lambda: len(streaming_from(old_primary)) == 2, 30, "2 standbys")

    killed = time.monotonic()
    old_primary.kill_agent()  # the VM's whole process group, postgres included
    try:
        wait_for(lambda: role(candidate) == "primary", 30, "node 1 promoted")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{(candidate.vm_dir / 'log' / 'repmgr.log').read_text()[-3000:]}") from None
    promoted_after = time.monotonic() - killed
    assert promoted_after < 20, promoted_after
    assert role(follower) == "standby"
    wait_for(lambda: streaming_from(candidate) == ["node-2"], 30, "node 2 follows node 1")
    with candidate.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('after failover')")
    wait_for(
        lambda: (
            {"before failover", "after failover"}
            <= {str(r[0]) for r in follower.connect().execute("SELECT note FROM notes").fetchall()}
        ),
        30,
        "rows on the follower",
    )


def test_former_primary_refuses_when_only_a_follower_of_the_new_primary_answers(cluster: list[Node]) -> None:
    """The promoted node is gone too; the follower's newer timeline still tells the old
    primary that it is stale."""
    old_primary, new_primary, follower = cluster
    # Freeze the follower's repmgrd, or it would (rightly) promote itself meanwhile.
    repmgrd = int((follower.vm_dir / "run" / "repmgrd.pid").read_text())
    os.kill(repmgrd, signal.SIGSTOP)
    try:
        old_primary.stop_agent()
        new_primary.kill_agent()
        old_primary.generation += 1
        old_primary.start_agent()
        old_primary.start_job()
        status = wait_for(
            lambda: (s := old_primary.status()) is not None and s.get("job_state") == "failing" and s,
            30,
            "refusal",
        )
        assert role(follower) == "standby"
    finally:
        os.kill(repmgrd, signal.SIGCONT)
    assert "timeline 2" in status["error"], status["error"]
    assert "refusing to start a second primary" in status["error"]


def test_former_primary_rejoins_as_a_standby_once_a_primary_answers(cluster: list[Node]) -> None:
    """After the previous test node 1 (the new primary) is gone and node 2 alone does not
    promote itself (repmgrd wants a majority of nodes visible). Node 1's VM comes back
    on its disk: it held the newest timeline, so it starts as the primary once the
    failover window has passed. The refused node 0 keeps retrying and rejoins it with
    pg_rewind (repmgr node rejoin --force-rewind): it never serves writes."""
    old_primary, new_primary, follower = cluster
    new_primary.generation += 1
    new_primary.start_agent()
    new_primary.start_job()
    wait_for(lambda: role(new_primary) == "primary", 90, "node 1 primary again")
    wait_for_node(old_primary, functools.partial(job_running, old_primary), 120, "old primary rejoined")
    wait_for(lambda: role(old_primary) == "standby", 10, "node 0 a standby")  # /status caches the role 1 s
    assert role(follower) == "standby"
    wait_for(lambda: "node-0" in streaming_from(new_primary), 30, "node 0 streams from node 1")
    with new_primary.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('after the rejoin')")
    wait_for(
        lambda: "after the rejoin" in {str(r[0]) for r in old_primary.connect().execute("SELECT note FROM notes")},
        30,
        "row on the rejoined node",
    )
