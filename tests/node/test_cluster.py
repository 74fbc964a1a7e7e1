"""Three real node agents (postgres + repmgrd as the postgres user) on loopback addresses."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from controller.pg.probe import PsycopgProbe, probe_all
from controller.pg.types import NodeState
from controller.reconcile.planner import choose_primary

from .cluster import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PORT,
    REPLICATION_PASSWORD,
    Node,
    free_addresses,
    job_running,
    running_cluster,
    wait_for,
    wait_for_node,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    with running_cluster(3) as nodes:
        yield nodes


def streaming_standbys(primary: Node) -> list[str]:
    with primary.connect("postgres") as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1"
        ).fetchall()
    return [str(row[0]) for row in rows]


def read_rows(node: Node) -> list[str]:
    with node.connect() as conn:
        return [str(row[0]) for row in conn.execute("SELECT note FROM notes ORDER BY id").fetchall()]


def has_row(node: Node, note: str) -> bool:
    return note in read_rows(node)


def test_primary_streams_to_two_standbys(cluster: list[Node]) -> None:
    primary, *standbys = cluster
    # The agent reports the role it last read from postgres (at most a second old).
    wait_for(lambda: (primary.status() or {}).get("role") == "primary", 30, "primary role")
    for standby in standbys:
        wait_for(lambda n=standby: (n.status() or {}).get("role") == "standby", 30, "standby role")
    names = wait_for(lambda: len(streaming_standbys(primary)) == 2 and streaming_standbys(primary), 30, "2 standbys")
    assert names == ["node-1", "node-2"]


def test_status_reports_processes(cluster: list[Node]) -> None:
    status: dict[str, Any] = wait_for(
        lambda: (s := cluster[1].status()) is not None and s["job_state"] == "running" and s, 30, "running"
    )
    assert status["agent_id"] == "agent-1-0"
    assert [p["name"] for p in status["processes"]] == ["postgres", "repmgrd"]
    for process in status["processes"]:
        assert process["state"] == "running"
        assert process["uptime"]["secs"] >= 0
        assert process["mem"]["kb"] > 0
        assert isinstance(process["cpu"]["total"], float)
    assert set(status["vitals"]) >= {"load", "mem", "disk"}


def test_row_written_on_primary_is_read_on_both_standbys(cluster: list[Node]) -> None:
    primary, *standbys = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('written on the primary')")
    for standby in standbys:
        wait_for(functools.partial(has_row, standby, "written on the primary"), 30, f"row on node {standby.index}")


# What render_pg_hba (controller/node/pgconf.py) writes, as the server parsed it:
# (type, database, user_name, address, netmask, auth_method, options). The one
# password-less rule is local peer for the OS user the server runs as (and root,
# through the ident map); every TCP connection, replication included, is SCRAM.
EXPECTED_HBA_RULES = [
    ("local", ["all"], ["postgres"], None, None, "peer", ["map=pgbosh"]),
    ("local", ["all"], ["all"], None, None, "scram-sha-256", None),
    ("host", ["replication"], ["all"], "127.0.0.0", "255.0.0.0", "scram-sha-256", None),
    ("host", ["all"], ["all"], "127.0.0.0", "255.0.0.0", "scram-sha-256", None),
]


def test_checksums_and_scram_on_every_node(cluster: list[Node]) -> None:
    """initdb --data-checksums on the primary, cloned to the standbys; passwords are
    stored and checked as SCRAM-SHA-256 only."""
    for node in cluster:
        with node.connect("postgres") as conn:
            assert conn.execute("SHOW data_checksums").fetchone() == ("on",), node.index
            assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",), node.index
            assert conn.execute("SHOW wal_log_hints").fetchone() == ("on",), node.index  # pg_rewind needs it
            rules = conn.execute(
                "SELECT type, database, user_name, address, netmask, auth_method, options, error"
                " FROM pg_hba_file_rules ORDER BY line_number"
            ).fetchall()
            assert [row[:7] for row in rules] == EXPECTED_HBA_RULES, (node.index, rules)
            assert [row[7] for row in rules] == [None] * len(EXPECTED_HBA_RULES)
            verifiers = conn.execute(
                "SELECT rolname, left(rolpassword, 14) FROM pg_authid WHERE rolpassword IS NOT NULL ORDER BY 1"
            ).fetchall()
            assert verifiers == [(ADMIN_USER, "SCRAM-SHA-256$"), ("repmgr", "SCRAM-SHA-256$")], node.index
    # The host rule is enforced: a wrong password is refused, not trusted.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=cluster[0].address, port=PORT, user=ADMIN_USER, password="wrong", dbname="app", connect_timeout=3
        ).close()


def observe(cluster: list[Node]) -> dict[str, NodeState]:
    """What the operator sees (controller/operator/reconcile.py _probe_nodes): every
    node probed by PsycopgProbe with the admin login, lag computed by with_lag."""
    probe = PsycopgProbe(ADMIN_USER, ADMIN_PASSWORD)
    states = asyncio.run(probe_all(probe, [node.address for node in cluster], PORT))
    return {state.address: state for state in states}


def lsn(node: Node, expression: str) -> int:
    with node.connect("postgres") as conn:
        row = conn.execute(f"SELECT {expression} - '0/0'").fetchone()
    assert row is not None and row[0] is not None, expression
    return int(row[0])


def replay_pause_state(node: Node) -> str:
    with node.connect("postgres") as conn:
        row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
    return str(row[0]) if row else ""


def all_caught_up(cluster: list[Node]) -> dict[str, NodeState] | None:
    states = observe(cluster)
    standbys = [states[node.address] for node in cluster[1:]]
    return states if all(state.lag_bytes == 0 for state in standbys) else None


def test_probe_reports_role_timeline_lsns_and_lag(cluster: list[Node]) -> None:
    primary, lagging, other = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
    states = wait_for(lambda: all_caught_up(cluster), 30, "standbys caught up")

    head = states[primary.address]
    assert head.reachable and head.writable and head.in_recovery is False and head.error is None
    assert head.timeline == 1  # a fresh cluster, no failover in this module
    assert head.current_lsn is not None and 0 < head.current_lsn <= lsn(primary, "pg_current_wal_lsn()")
    assert head.received_lsn is None and head.replayed_lsn is None and head.lag_bytes is None
    for node in (lagging, other):
        state = states[node.address]
        assert state.reachable and not state.writable and state.in_recovery is True
        assert state.timeline == 1
        assert state.current_lsn is None
        assert state.received_lsn is not None and state.replayed_lsn == head.current_lsn
        assert state.received_lsn >= state.replayed_lsn
    assert choose_primary(list(states.values())) == head
    # A node that does not answer is reported as such and leaves the others' lag alone.
    (nobody,) = free_addresses(1)
    probe = PsycopgProbe(ADMIN_USER, ADMIN_PASSWORD)
    with_dead = asyncio.run(probe_all(probe, [primary.address, nobody, lagging.address], PORT))
    assert [(s.address, s.reachable) for s in with_dead] == [
        (primary.address, True),
        (nobody, False),
        (lagging.address, True),
    ]
    assert with_dead[1].error and with_dead[1].lag_bytes is None and with_dead[1].in_recovery is None
    assert with_dead[2].lag_bytes is not None

    with lagging.connect("postgres") as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        wait_for(lambda: replay_pause_state(lagging) == "paused", 10, "replay paused")
        with primary.connect() as conn:
            conn.execute("INSERT INTO notes (note) SELECT 'while replay is paused' FROM generate_series(1, 100)")
        written = lsn(primary, "pg_current_wal_lsn()")
        # Received (streaming goes on) but not replayed.
        wait_for(lambda: lsn(lagging, "pg_last_wal_receive_lsn()") >= written, 30, "WAL received by node 1")
        states = observe(cluster)
        head, behind = states[primary.address], states[lagging.address]
        assert head.current_lsn is not None and head.current_lsn >= written
        assert behind.received_lsn is not None and behind.replayed_lsn is not None
        assert behind.received_lsn >= written > behind.replayed_lsn
        assert behind.lag_bytes == head.current_lsn - behind.replayed_lsn > 0
        assert behind.in_recovery is True and behind.timeline == 1
        with lagging.connect() as conn:
            assert conn.execute("SELECT count(*) FROM notes WHERE note = 'while replay is paused'").fetchone() == (0,)
        # The other standby replays on.
        wait_for(lambda: observe(cluster)[other.address].lag_bytes == 0, 30, "node 2 caught up")
    finally:
        with lagging.connect("postgres") as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    states = wait_for(lambda: all_caught_up(cluster), 30, "node 1 caught up after resume")
    replayed, head_lsn = states[lagging.address].replayed_lsn, states[primary.address].current_lsn
    assert replayed is not None and head_lsn is not None and replayed >= head_lsn
    with lagging.connect() as conn:
        assert conn.execute("SELECT count(*) FROM notes WHERE note = 'while replay is paused'").fetchone() == (100,)


def test_killed_postmaster_is_restarted(cluster: list[Node]) -> None:
    primary, _, standby = cluster
    pid = standby.postmaster_pid()
    os.kill(pid, signal.SIGKILL)
    seen_failing = wait_for(
        lambda: standby.process_state("postgres") == "failing", 10, "postgres failing", interval=0.05
    )
    assert seen_failing
    assert (standby.status() or {})["job_state"] == "failing"
    wait_for(functools.partial(job_running, standby), 60, "job running again")
    assert standby.postmaster_pid() != pid
    assert standby.process_state("postgres") == "running"
    wait_for(lambda: "node-2" in streaming_standbys(primary), 30, "node-2 streaming again")


def test_new_agent_on_the_same_disk_brings_the_node_back(cluster: list[Node]) -> None:
    primary, standby, _ = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO notes (note) VALUES ('before the VM was recreated')")
    wait_for(lambda: "before the VM was recreated" in read_rows(standby), 30, "row on node 1")

    standby.stop_agent()
    assert not standby.socket.exists()
    # Recreated VM: new VM directory, same persistent disk and address.
    standby.generation += 1
    standby.start_agent()
    # The agent starts no job on its own: the director's POST /jobs/start does.
    idle = wait_for(standby.status, 30, "new agent answering")
    assert idle["job_state"] == "stopped"
    assert [p["state"] for p in idle["processes"]] == ["stopped", "stopped"]
    standby.start_job()
    standby.start_job()  # idempotent
    started = time.monotonic()
    wait_for_node(standby, functools.partial(job_running, standby), 60, "recreated node running")
    assert time.monotonic() - started < 60
    # Running: PostgreSQL's process is up; it answers as a standby moments later.
    wait_for(lambda: (standby.status() or {}).get("role") == "standby", 10, "recreated node a standby")
    assert "before the VM was recreated" in read_rows(standby)
    with primary.connect() as conn:
        conn.execute("INSERT INTO notes (note) VALUES ('after the VM was recreated')")
    wait_for(lambda: "after the VM was recreated" in read_rows(standby), 30, "new row on recreated node")
    wait_for(lambda: len(streaming_standbys(primary)) == 2, 30, "2 standbys again")


def test_no_password_in_logs_or_command_lines(cluster: list[Node]) -> None:
    base = cluster[0].base
    for path in base.rglob("*"):
        if path.is_file() and (path.suffix in (".log", ".out", ".conf") or path.parent.name == "log"):
            text = path.read_text(errors="replace")
            assert ADMIN_PASSWORD not in text, path
            assert REPLICATION_PASSWORD not in text, path
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            assert ADMIN_PASSWORD not in cmdline
            assert REPLICATION_PASSWORD not in cmdline


def test_jobs_stop_and_start_over_the_api(cluster: list[Node]) -> None:
    primary, _, standby = cluster
    stopped = standby.request("POST", "/jobs/stop", timeout=90)
    assert stopped["job_state"] == "stopped"
    assert [p["state"] for p in stopped["processes"]] == ["stopped", "stopped"]
    assert not (standby.disk / "postgres" / "data" / "postmaster.pid").exists()
    assert standby.status() is not None  # the agent itself stays up
    started = standby.request("POST", "/jobs/start")
    assert started["job_state"] in ("starting", "running")
    wait_for(functools.partial(job_running, standby), 60, "job running after start")
    wait_for(lambda: "node-2" in streaming_standbys(primary), 30, "node-2 streaming after start")
