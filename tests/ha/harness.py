"""Three real node agents with the local Consul: what the HA tests and benchmarks/failover use.

The agents run as the local director runs them (tests/node/cluster.py), with
production failover timings and Consul configured, so that the promote hook moves
`master.<service>.service.consul`. Clients find the primary the way applications do:
resolve the DNS name at the local Consul DNS, then connect.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from node.cluster import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PORT,
    Node,
    free_addresses,
    link_peers,
    make_base_dir,
    start_nodes,
    wait_for,
)

from controller.local.consul.server import ConsulServer, serve_in_thread

SERVICE = "pg-ha-test"
# The timings the manifest builder sends (controller/bosh/config.py RepmgrTimings).
PRODUCTION_TIMINGS = {"monitor_interval_secs": 1, "reconnect_attempts": 2, "reconnect_interval": 1}


@dataclass
class HANode(Node):
    consul_http: str = ""

    def agent_json(self) -> dict[str, Any]:
        doc = super().agent_json()
        doc["jobs"][0]["properties"]["consul"] = {"service": SERVICE, "http_addr": self.consul_http}
        return doc

    def role(self) -> str | None:
        status = self.status()
        return None if status is None else str(status.get("role"))

    def kill_vm(self) -> None:
        """Node loss: SIGKILL the postmaster and the agent's whole process group at once."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(self.postmaster_pid(), signal.SIGKILL)
        self.kill_agent()

    def restart_vm(self) -> None:
        """The resurrected VM: a new VM directory on the same disk, then POST /jobs/start."""
        self.generation += 1
        self.start_agent()
        self.start_job()


def dns_a(name: str, port: int, server: str = "127.0.0.1", timeout: float = 1.0) -> list[str]:
    """A records of `name` from a DNS server (one UDP query, no cache, no search list)."""
    query_id = random.randint(0, 0xFFFF)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, port))
        data, _ = sock.recvfrom(4096)
    (rid, _flags, qd, an, _ns, _ar) = struct.unpack("!HHHHHH", data[:12])
    if rid != query_id:
        return []
    offset = 12
    for _ in range(qd):
        offset = _skip_name(data, offset) + 4
    answers = []
    for _ in range(an):
        offset = _skip_name(data, offset)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", data[offset : offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            answers.append(socket.inet_ntoa(data[offset : offset + 4]))
        offset += length
    return answers


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += length + 1


def master_name(service: str = SERVICE) -> str:
    return f"master.{service}.service.consul"


def connect_by_name(dns_port: int, timeout: float = 2.0) -> psycopg.Connection[tuple[Any, ...]]:
    """What an application does with the endpoint: resolve it, then connect."""
    addresses = dns_a(master_name(), dns_port)
    if not addresses:
        raise OSError("no master record")
    return psycopg.connect(
        host=addresses[0],
        port=PORT,
        user=ADMIN_USER,
        password=ADMIN_PASSWORD,
        dbname="app",
        connect_timeout=max(1, int(timeout)),
        autocommit=True,
    )


@dataclass
class HACluster:
    nodes: list[HANode]
    consul: ConsulServer

    @property
    def dns_port(self) -> int:
        return self.consul.dns_port

    def primary(self) -> HANode | None:
        for node in self.nodes:
            if node.process is not None and node.role() == "primary":
                return node
        return None

    def published_master(self) -> list[str]:
        return dns_a(master_name(), self.dns_port)

    def wait_streaming(self, primary: HANode, count: int, timeout: float = 60) -> None:
        def streaming() -> bool:
            with primary.connect("postgres") as conn:
                rows = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()
            return rows is not None and int(rows[0]) >= count

        wait_for(streaming, timeout, f"{count} standbys streaming from node {primary.index}")


def publish_initial_primary(cluster: HACluster, primary: HANode) -> None:
    """What the operator does once the cluster is up (the agent only publishes promotions)."""
    from controller.consul.publisher import publish_primary_sync

    publish_primary_sync(cluster.consul.http_addr, SERVICE, primary.address, PORT)


@contextlib.contextmanager
def ha_cluster(
    size: int = 3, replication: dict[str, Any] | None = None, repmgr: dict[str, Any] | None = None
) -> Iterator[HACluster]:
    with serve_in_thread(http_port=0, dns_port=0) as consul:
        addresses = free_addresses(size)
        base = make_base_dir()
        timings = {**PRODUCTION_TIMINGS, **(repmgr or {})}
        nodes = [
            HANode(
                index=i,
                address=address,
                base=base,
                repmgr=timings,
                replication=replication or {},
                consul_http=consul.http_addr,
            )
            for i, address in enumerate(addresses)
        ]
        link_peers(nodes)
        cluster = HACluster(nodes, consul)
        try:
            start_nodes(nodes, 180)
            publish_initial_primary(cluster, nodes[0])
            yield cluster
        finally:
            for node in nodes:
                node.stop_agent()
            if os.environ.get("PGBOSH_KEEP_TEST_DIRS"):
                print(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    return wait_for(predicate, timeout, what, interval)


def timeline(node: Node) -> int:
    with node.connect("postgres") as conn:
        # The checkpoint's timeline lags a promotion; the WAL being written or received does not.
        row = conn.execute(
            "SELECT CASE WHEN pg_is_in_recovery()"
            " THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),"
            "               (SELECT timeline_id FROM pg_control_checkpoint()))"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
        ).fetchone()
        assert row is not None
        return int(row[0])


def monotonic() -> float:
    return time.monotonic()
