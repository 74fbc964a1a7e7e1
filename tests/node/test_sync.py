"""replication.mode sync: bootstrap and registration must not wait for standbys that do
not exist yet, and once a standby streams, commits are acknowledged by it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .cluster import Node, running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    with running_cluster(2, replication={"mode": "sync", "sync_standbys": 1}) as nodes:
        yield nodes


def test_sync_standby_confirms_commits(cluster: list[Node]) -> None:
    primary, standby = cluster
    with primary.connect("postgres") as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
        # The other peers by name (never `*`): see pgconf.sync_standby_names.
        assert row is not None and row[0] == 'ANY 1 ("node-1")'
        wait_for(
            lambda: (
                conn.execute("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'node-1'").fetchone()
                == ("quorum",)
            ),
            30,
            "node-1 a quorum standby",
        )
    with primary.connect() as conn:
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("CREATE TABLE synced (note text)")
        conn.execute("INSERT INTO synced VALUES ('confirmed by the standby')")
    with standby.connect() as conn:
        # remote_apply is not asked for, so replay may trail the flush by a moment.
        wait_for(lambda: conn.execute("SELECT count(*) FROM synced").fetchone() == (1,), 10, "row replayed")


def test_sync_names_follow_the_peers_in_agent_json(cluster: list[Node]) -> None:
    """Scaling: the director rewrites agent.json's peers; the primary's agent rewrites
    pgbosh.conf and reloads, so the new standby is named too."""
    import json

    primary, _ = cluster
    config = primary.vm_dir / "agent.json"
    doc = json.loads(config.read_text())
    doc["peers"].append({"index": 2, "id": "node-2", "address": "127.0.0.3"})
    config.write_text(json.dumps(doc))
    with primary.connect("postgres") as conn:
        wait_for(
            lambda: conn.execute("SHOW synchronous_standby_names").fetchone() == ('ANY 1 ("node-1", "node-2")',),
            20,
            "synchronous_standby_names naming node-2",
        )
