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
