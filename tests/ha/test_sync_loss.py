"""Sync mode loses no acknowledged commit across repeated node loss.

A writer inserts through the DNS name and records every commit the server
acknowledged; the primary's node is lost (SIGKILL of its agent group and postmaster)
PGBOSH_SYNC_LOSS_ROUNDS times (default the issue's 10, about 2 minutes), each time
the old primary comes back as a replica before the next loss. After every loss, the
new primary holds every commit acknowledged before it took over and its
synchronous_standby_names is still `ANY 1 (...)`; once the old primary is back, both
standbys are quorum standbys. At the end every acknowledged row is on the last primary."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from node.cluster import agent_log_tail, wait_for

from .harness import HACluster, HANode, connect_by_name, ha_cluster

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("PGBOSH_SYNC_LOSS_ROUNDS", "10"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[HACluster]:
    with ha_cluster(3, replication={"mode": "sync", "sync_standbys": 1}) as ha:
        yield ha


class Writer(threading.Thread):
    def __init__(self, dns_port: int) -> None:
        super().__init__(daemon=True)
        self.dns_port = dns_port
        self.acked: list[int] = []
        self.attempted = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop_flag.is_set():
            try:
                if conn is None:
                    conn = connect_by_name(self.dns_port, timeout=1)
                self.attempted += 1
                conn.execute("INSERT INTO acked (id) VALUES (%s)", (self.attempted,))
                self.acked.append(self.attempted)  # only once the server said COMMIT
            except (psycopg.Error, OSError):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(0.02)
            time.sleep(0.005)
        if conn is not None:
            conn.close()


def sync_names(node: HANode) -> str:
    with node.connect("postgres") as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
    assert row is not None
    return str(row[0])


def quorum_standbys(node: HANode) -> int:
    with node.connect("postgres") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'quorum'"
        ).fetchone()
    return 0 if row is None else int(row[0])


def lost_commits(node: HANode, acked: list[int]) -> list[int]:
    """The acknowledged ids (a snapshot taken before this query) that `node` lacks."""
    with node.connect() as conn:
        present = {int(r[0]) for r in conn.execute("SELECT id FROM acked").fetchall()}
    return sorted(set(acked) - present)


def test_no_acknowledged_commit_is_lost_across_node_losses(cluster: HACluster) -> None:
    with connect_by_name(cluster.dns_port) as conn:
        conn.execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
    first = wait_for(cluster.primary, 60, "a primary")
    assert sync_names(first).startswith("ANY 1 ("), sync_names(first)
    writer = Writer(cluster.dns_port)
    writer.start()
    try:
        for round_ in range(ROUNDS):
            primary = wait_for(cluster.primary, 60, "a primary")
            cluster.wait_streaming(primary, 2, timeout=120)
            before = len(writer.acked)
            time.sleep(random.uniform(0.5, 2.0))
            assert len(writer.acked) > before, "the writer makes progress in sync mode"
            primary.kill_vm()
            acked_at_kill = len(writer.acked)
            try:
                wait_for(lambda n=acked_at_kill: len(writer.acked) > n + 5, 30, f"writes after loss {round_ + 1}")
            except AssertionError as error:
                logs = "".join(agent_log_tail(n) for n in cluster.nodes)
                raise AssertionError(f"{error}\n{logs}") from None
            new = wait_for(cluster.primary, 10, "the new primary's agent says so")  # /status caches the role 1 s
            assert new is not primary
            acked = list(writer.acked)  # every one acknowledged before the query below
            lost = lost_commits(new, acked)
            assert lost == [], f"round {round_ + 1}: {len(lost)} of {len(acked)} acknowledged commits lost: {lost[:20]}"
            names = sync_names(new)
            assert names.startswith("ANY 1 ("), f"round {round_ + 1}: synchronous_standby_names = {names!r}"
            primary.restart_vm()
            wait_for(lambda p=primary: (p.status() or {}).get("job_state") == "running", 120, "old primary back")
            # /status caches the role for a second.
            wait_for(lambda p=primary: p.role() == "standby", 10, "old primary a standby")
            wait_for(lambda n=new: quorum_standbys(n) == 2, 60, f"two quorum standbys after round {round_ + 1}")
            print(
                f"round {round_ + 1}: node {primary.index} lost, node {new.index} primary ({names}),"
                f" {len(acked)} acked, 0 lost"
            )
    finally:
        writer.stop_flag.set()
        writer.join(15)
    with connect_by_name(cluster.dns_port) as conn:
        present = {int(r[0]) for r in conn.execute("SELECT id FROM acked").fetchall()}
    lost = sorted(set(writer.acked) - present)
    print(f"{ROUNDS} node losses, {len(writer.acked)} acknowledged commits, {len(lost)} lost")
    assert lost == []
