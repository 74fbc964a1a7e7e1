"""Three real node agents (postgres + repmgrd as the postgres user) on loopback addresses."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .cluster import (
    ADMIN_PASSWORD,
    REPLICATION_PASSWORD,
    Node,
    agent_log_tail,
    running_cluster,
    wait_for,
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


def test_killed_postmaster_is_restarted(cluster: list[Node]) -> None:
    primary, _, standby = cluster
    pid = standby.postmaster_pid()
    os.kill(pid, signal.SIGKILL)
    seen_failing = wait_for(
        lambda: standby.process_state("postgres") == "failing", 10, "postgres failing", interval=0.05
    )
    assert seen_failing
    assert (standby.status() or {})["job_state"] == "failing"
    wait_for(lambda: (standby.status() or {}).get("job_state") == "running", 60, "job running again")
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
    try:
        wait_for(lambda: (standby.status() or {}).get("job_state") == "running", 60, "recreated node running")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{agent_log_tail(standby)}") from None
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
    wait_for(lambda: (standby.status() or {}).get("job_state") == "running", 60, "job running after start")
    wait_for(lambda: "node-2" in streaming_standbys(primary), 30, "node-2 streaming after start")
