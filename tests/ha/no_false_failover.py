"""No false alarms under load: the scenario that test_no_false_failover.py asserts on
and benchmarks/no_false_failover prints.

Three real node agents with the local Consul and production failover timings
(harness.py). One replica's WAL replay is paused, so it falls further behind with
every commit. pgbench (TPC-B like, `--clients 16 --jobs 2`) then runs against the
primary for `seconds` (the issue's 3 minutes) while a watcher samples, every 0.5 s,
which nodes accept writes, what Consul's DNS names as the master, and how far the
paused replica's replay is behind what it received.

`run()` returns the figures; `Result.load_problems()` says whether the load really
ran (pgbench exited 0, enough transactions, the CPUs were busy) and
`Result.failover_signs()` lists every sign of a failover (0 expected).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from node.cluster import ADMIN_PASSWORD, ADMIN_USER, PORT

from controller.node.hooks import parse_event

from .harness import HACluster, HANode, dns_a, ha_cluster, master_name, timeline

# What "the load ran" means. On the 2-core development machine (shared with other
# test runs) pgbench did 750-1300 TPC-B transactions/s at scale 20 with the CPUs
# 99-100 % busy; the floors are far below, so that a slower machine passes, and far
# above what a pgbench that errored out, or sat blocked, would show.
MIN_TPS = 50.0
MIN_CPU_BUSY = 0.6
SAMPLE_EVERY = 0.5
SETTLE = 6.0  # seconds watched after the load: twice repmgrd's time to declare a primary lost


@dataclass
class Result:
    seconds: int
    clients: int
    scale: int
    pgbench_rc: int = -1
    pgbench_output: str = ""
    transactions: int | None = None
    failed_transactions: int | None = None
    tps: float | None = None
    elapsed: float = 0.0
    cpu_busy: float = 0.0  # machine-wide busy fraction (/proc/stat) while pgbench ran
    primary_cpu_seconds: float = 0.0  # CPU the primary's backends used (its postmaster's reaped children)
    lag_bytes_max: int = 0  # the paused replica: received minus replayed WAL, largest sample
    lag_bytes_end: int = 0
    replay_paused: bool = False  # pg_is_wal_replay_paused() on the lagging replica at the end
    primary: str = ""
    primary_after: str | None = None
    writable_seen: dict[str, int] = field(default_factory=dict)  # address -> samples in which it accepted writes
    master_records_seen: dict[str, int] = field(default_factory=dict)  # DNS answer -> samples
    timelines_before: dict[str, int] = field(default_factory=dict)
    timelines_after: dict[str, int | None] = field(default_factory=dict)
    hook_promotions: list[str] = field(default_factory=list)  # promote hook lines since the load started
    hook_lines: int = 0  # every line of the nodes' hook-events files (registrations write some)
    repmgr_events: list[str] = field(default_factory=list)  # repmgr.events since the load started
    repmgr_events_before: int = 0  # repmgr.events rows before it (the clones and registrations)
    samples: int = 0

    def load_problems(self) -> list[str]:
        """Why the load did not run as it should (empty: it did)."""
        problems = []
        if self.pgbench_rc != 0:
            problems.append(f"pgbench exited {self.pgbench_rc}")
        floor = int(MIN_TPS * self.seconds)
        if self.transactions is None or self.transactions < floor:
            problems.append(f"pgbench committed {self.transactions} transactions (at least {floor} expected)")
        if self.failed_transactions:
            problems.append(f"{self.failed_transactions} pgbench transactions failed")
        if self.elapsed < self.seconds * 0.95:
            problems.append(f"pgbench ran {self.elapsed:.0f} s of {self.seconds}")
        if self.cpu_busy < MIN_CPU_BUSY:
            problems.append(f"CPUs {self.cpu_busy:.0%} busy during the load (at least {MIN_CPU_BUSY:.0%} expected)")
        if self.samples < self.seconds / SAMPLE_EVERY / 4:
            problems.append(f"only {self.samples} watcher samples")
        elif self.writable_seen.get(self.primary, 0) < self.samples / 2:
            problems.append(f"the primary answered as writable in {self.writable_seen} of {self.samples} samples")
        return problems

    def observation_problems(self) -> list[str]:
        """Why the scenario's premises or its evidence are missing (empty: all there):
        the replica must have lagged, and the promotion records must be readable and
        hold the cluster's history, or "no promotion in them" would prove nothing."""
        problems = []
        if self.lag_bytes_max <= 0:
            problems.append("the paused replica never lagged")
        if not self.replay_paused:
            problems.append("the lagging replica's replay was not paused at the end")
        if self.hook_lines == 0:
            problems.append("no hook-events lines found: the promote hook record was not read")
        if self.repmgr_events_before == 0:
            problems.append("no repmgr.events rows from before the load: the table was not read")
        return problems

    def failover_signs(self) -> list[str]:
        """Every sign that a failover happened (empty: none)."""
        signs = []
        if self.primary_after != self.primary:
            signs.append(f"primary {self.primary} -> {self.primary_after}")
        if set(self.writable_seen) - {self.primary}:
            signs.append(f"writable nodes seen: {self.writable_seen}")
        if self.timelines_after != self.timelines_before:
            signs.append(f"timelines {self.timelines_before} -> {self.timelines_after}")
        if set(self.master_records_seen) != {self.primary}:
            signs.append(f"Consul master records seen: {self.master_records_seen}")
        if self.hook_promotions:
            signs.append(f"promote hook ran: {self.hook_promotions}")
        promotions = [e for e in self.repmgr_events if any(w in e for w in ("promote", "failover", "follow"))]
        if promotions:
            signs.append(f"repmgr events: {promotions}")
        return signs

    def report(self) -> str:
        lines = [
            self.pgbench_output.strip(),
            f"load: {self.elapsed:.0f} s of pgbench (exit {self.pgbench_rc}), {self.clients} clients, 2 threads,"
            f" scale {self.scale}: {self.transactions} transactions, {self.failed_transactions} failed,"
            f" {self.tps} tps",
            f"CPU busy during the load: {self.cpu_busy:.0%} of 2 cores (machine-wide, /proc/stat);"
            f" the primary's backends used {self.primary_cpu_seconds:.0f} CPU-s",
            f"lagging replica (replay paused={self.replay_paused}): up to {self.lag_bytes_max} bytes behind,"
            f" {self.lag_bytes_end} at the end",
            f"primary {self.primary} -> {self.primary_after}; writable nodes seen {self.writable_seen}"
            f" in {self.samples} samples",
            f"Consul master records seen: {self.master_records_seen}",
            f"timelines {self.timelines_before} -> {self.timelines_after}",
            f"promote hook runs: {len(self.hook_promotions)} (of {self.hook_lines} hook-events lines);"
            f" repmgr events during the load: {self.repmgr_events} ({self.repmgr_events_before} before it)",
            f"false failovers: {len(self.failover_signs())}",
        ]
        return "\n".join(lines)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs; iowait counts as idle."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]  # user..steal; guest is inside user
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def reaped_children_cpu(pid: int) -> float:
    """CPU seconds of a process's children that it has reaped (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def pgbench_figures(output: str) -> tuple[int | None, int | None, float | None]:
    def number(pattern: str) -> str | None:
        match = re.search(pattern, output)
        return match.group(1) if match else None

    transactions = number(r"number of transactions actually processed: (\d+)")
    failed = number(r"number of failed transactions: (\d+)")
    tps = number(r"tps = ([\d.]+)")
    return (
        int(transactions) if transactions else None,
        int(failed) if failed else None,
        float(tps) if tps else None,
    )


class Watcher(threading.Thread):
    """Every SAMPLE_EVERY s: which nodes accept writes, what DNS names the master, and
    the paused replica's replay lag. One connection per node, reopened on error."""

    def __init__(self, cluster: HACluster, lagging: HANode, result: Result) -> None:
        super().__init__(daemon=True)
        self.cluster, self.lagging, self.result = cluster, lagging, result
        self.stop_flag = threading.Event()
        self.conns: dict[int, psycopg.Connection[Any]] = {}

    def sample(self, node: HANode, sql: str) -> tuple[Any, ...] | None:
        try:
            conn = self.conns.get(node.index)
            if conn is None or conn.closed:
                conn = self.conns[node.index] = node.connect("postgres")
            return conn.execute(sql).fetchone()
        except psycopg.Error:
            with contextlib.suppress(Exception):
                self.conns.pop(node.index).close()
            return None

    def run(self) -> None:
        result = self.result
        while not self.stop_flag.is_set():
            for node in self.cluster.nodes:
                row = self.sample(node, "SELECT pg_is_in_recovery()")
                if row is not None and row[0] is False:
                    result.writable_seen[node.address] = result.writable_seen.get(node.address, 0) + 1
            with contextlib.suppress(OSError):
                answer = ",".join(dns_a(master_name(), self.cluster.dns_port))
                result.master_records_seen[answer] = result.master_records_seen.get(answer, 0) + 1
            row = self.sample(
                self.lagging, "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
            )
            if row is not None and row[0] is not None:
                result.lag_bytes_max = max(result.lag_bytes_max, int(row[0]))
            result.samples += 1
            self.stop_flag.wait(SAMPLE_EVERY)
        for conn in self.conns.values():
            with contextlib.suppress(Exception):
                conn.close()


def hook_lines(node: HANode) -> list[str]:
    """Every line of the node's hook-events files (one per VM generation)."""
    lines = []
    for path in sorted(node.base.glob(f"vms/vm-{node.index}-*/run/hook-events")):
        lines += path.read_text().splitlines()
    return lines


def promotions_in(lines: list[str], since: float) -> list[str]:
    promoted = []
    for line in lines:
        event = parse_event(line)
        if event is not None and event.promoted and event.at >= since:
            promoted.append(line)
    return promoted


def repmgr_events(cluster: HACluster, since: datetime) -> tuple[int, list[str]]:
    """(rows before `since`, events since `since`) of repmgr.events, from every node
    that answers (the table is replicated; the paused replica's copy is behind)."""
    before = 0
    events: set[str] = set()
    for node in cluster.nodes:
        with contextlib.suppress(psycopg.Error), node.connect("repmgr") as conn:
            rows = conn.execute("SELECT node_id, event, successful, event_timestamp FROM repmgr.events").fetchall()
            before = max(before, sum(1 for r in rows if r[3] < since))
            events.update(f"node {r[0]} {r[1]}{'' if r[2] else ' (failed)'}" for r in rows if r[3] >= since)
    return before, sorted(events)


def run(seconds: int = 180, clients: int = 16, scale: int = 20) -> Result:
    result = Result(seconds=seconds, clients=clients, scale=scale)
    with ha_cluster(3) as cluster:
        primary, lagging, _ = cluster.nodes
        result.primary = primary.address
        env = {**os.environ, "PGPASSWORD": ADMIN_PASSWORD}
        target = ["-h", primary.address, "-p", str(PORT), "-U", ADMIN_USER, "app"]
        init = subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(scale), *target], env=env, capture_output=True, text=True
        )
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i exited {init.returncode}: {init.stderr[-2000:]}")
        cluster.wait_streaming(primary, 2, timeout=120)
        with lagging.connect("postgres") as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        try:
            result.timelines_before = {node.address: timeline(node) for node in cluster.nodes}
            with primary.connect("postgres") as conn:
                row = conn.execute("SELECT now()").fetchone()
                assert row is not None
                db_started: datetime = row[0]
            wall_started = time.time()
            postmaster = primary.postmaster_pid()
            backends_cpu = reaped_children_cpu(postmaster)
            watcher = Watcher(cluster, lagging, result)
            watcher.start()
            busy0, total0 = cpu_times()
            started = time.monotonic()
            bench = subprocess.run(
                ["pgbench", "-c", str(clients), "-j", "2", "-T", str(seconds), "-P", "30", *target],
                env=env,
                capture_output=True,
                text=True,
            )
            result.elapsed = time.monotonic() - started
            busy1, total1 = cpu_times()
            # A node starved near the end would be failed over a few seconds later
            # (repmgrd: ~3 s): keep watching past the load, and let the postmaster
            # reap pgbench's backends.
            time.sleep(SETTLE)
            watcher.stop_flag.set()
            watcher.join(10)
            result.cpu_busy = (busy1 - busy0) / max(1, total1 - total0)
            result.pgbench_rc = bench.returncode
            result.pgbench_output = bench.stdout[-1500:] + ("" if bench.returncode == 0 else bench.stderr[-2000:])
            result.transactions, result.failed_transactions, result.tps = pgbench_figures(bench.stdout)
            with contextlib.suppress(OSError):
                result.primary_cpu_seconds = reaped_children_cpu(postmaster) - backends_cpu
            with lagging.connect("postgres") as conn:
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()),"
                    " pg_is_wal_replay_paused()"
                ).fetchone()
            assert row is not None
            result.lag_bytes_end = int(row[0] or 0)
            result.lag_bytes_max = max(result.lag_bytes_max, result.lag_bytes_end)
            result.replay_paused = bool(row[1])
            after = cluster.primary()
            result.primary_after = after.address if after is not None else None
            result.timelines_after = {}
            for node in cluster.nodes:
                try:
                    result.timelines_after[node.address] = timeline(node)
                except psycopg.Error:
                    result.timelines_after[node.address] = None
            answer = ",".join(cluster.published_master())
            result.master_records_seen[answer] = result.master_records_seen.get(answer, 0) + 1
            for node in cluster.nodes:
                lines = hook_lines(node)
                result.hook_lines += len(lines)
                result.hook_promotions += [f"node {node.index}: {line}" for line in promotions_in(lines, wall_started)]
            result.repmgr_events_before, result.repmgr_events = repmgr_events(cluster, db_started)
        finally:
            with contextlib.suppress(psycopg.Error), lagging.connect("postgres") as conn:
                conn.execute("SELECT pg_wal_replay_resume()")
    return result
