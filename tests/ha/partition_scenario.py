"""Partition scenario, run inside a network namespace of its own (test_partition.py).

Everything (the local Consul, three node agents, the client) lives on that
namespace's loopback; nftables then drops every packet between the primary's address
and any other address, in both directions. Prints one JSON line with the figures.

    ip netns exec <ns> python tests/ha/partition_scenario.py
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import psycopg  # noqa: E402
from node.cluster import agent_log_tail, wait_for  # noqa: E402

from ha.harness import HANode, connect_by_name, ha_cluster, timeline  # noqa: E402

TABLE = "inet pgbosh_partition"


def nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True)


def cut_off(address: str) -> None:
    nft("add", "table", *TABLE.split())
    nft("add", "chain", *TABLE.split(), "out", "{ type filter hook output priority 0; }")
    nft("add", "rule", *TABLE.split(), "out", "ip", "saddr", address, "ip", "daddr", "!=", address, "drop")
    nft("add", "rule", *TABLE.split(), "out", "ip", "daddr", address, "ip", "saddr", "!=", address, "drop")


def heal() -> None:
    nft("delete", "table", *TABLE.split())


def local_write(node: HANode, note: str = "isolated side") -> bool:
    """A client on the isolated side (the node's own unix socket) can commit."""
    with psycopg.connect(
        host=str(node.vm_dir / "run"), port=5432, user="postgres", dbname="app", connect_timeout=2, autocommit=True
    ) as conn:
        conn.execute("SET statement_timeout = '2s'")
        conn.execute("INSERT INTO notes (note) VALUES (%s)", (note,))
    return True


def refuses_writes(node: HANode) -> bool:
    try:
        local_write(node)
    except psycopg.Error:
        return True
    return False


def main() -> int:
    result: dict[str, Any] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with ha_cluster(3) as cluster:
        old = cluster.nodes[0]
        cluster.wait_streaming(old, 2)
        with connect_by_name(cluster.dns_port) as conn:
            conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, note text)")
            conn.execute("INSERT INTO notes (note) VALUES ('before the partition')")
        assert local_write(old, "local client before the partition")
        old_timeline = timeline(old)
        cut_off(old.address)
        cut = time.monotonic()
        isolated_writes: list[float] = []
        stop_writer = threading.Event()

        def isolated_writer() -> None:
            # A client on the isolated side keeps writing; when did it last succeed?
            while not stop_writer.is_set():
                with contextlib.suppress(psycopg.Error):
                    local_write(old)
                    isolated_writes.append(time.monotonic() - cut)
                time.sleep(0.1)

        writer = threading.Thread(target=isolated_writer, daemon=True)
        writer.start()
        try:
            new = wait_for(
                lambda: next((n for n in cluster.nodes[1:] if n.role() == "primary"), None), 30, "majority promotes"
            )
            result["majority_promoted_after_s"] = round(time.monotonic() - cut, 2)
            wait_for(lambda: cluster.published_master() == [new.address], 10, "DNS names the new primary")

            def write_by_name() -> bool:
                with connect_by_name(cluster.dns_port) as conn:
                    conn.execute("INSERT INTO notes (note) VALUES ('majority side')")
                return True

            wait_for(write_by_name, 10, "write through the DNS name")
            result["dns_write_after_s"] = round(time.monotonic() - cut, 2)
            wait_for(lambda: refuses_writes(old), 30, "the isolated old primary refuses writes", interval=0.1)
            result["isolated_refuses_writes_after_s"] = round(time.monotonic() - cut, 2)
            time.sleep(3)
            result["isolated_still_refuses_after_3s"] = refuses_writes(old)
            stop_writer.set()
            writer.join(10)
            result["isolated_writes_accepted"] = len(isolated_writes)
            result["isolated_last_write_after_s"] = round(isolated_writes[-1], 2) if isolated_writes else None
        except AssertionError as error:
            print(json.dumps({"error": str(error), "logs": agent_log_tail(old)}))
            heal()
            return 1
        heal()
        healed = time.monotonic()
        try:
            wait_for(lambda: (old.status() or {}).get("job_state") == "running", 120, "old primary back")
            wait_for(lambda: old.role() == "standby", 10, "old primary a standby")
        except AssertionError as error:
            print(json.dumps({"error": str(error), "logs": agent_log_tail(old)}))
            return 1
        result["rejoined_after_heal_s"] = round(time.monotonic() - healed, 2)
        result["old_timeline"] = old_timeline
        result["rejoined_timeline"] = timeline(old)
        result["new_primary"] = new.index
        with new.connect() as conn:
            notes = [str(r[0]) for r in conn.execute("SELECT note FROM notes ORDER BY id")]
        result["notes_on_new_primary"] = notes
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
