"""Planned switchover end to end: kubectl applies a cluster, the in-process operator
drives the local director (real PostgreSQL VMs) and Consul; `pgbosh switchover demo
--to <replica>` (a process) moves the primary while a writer commits through the
Consul DNS name. No acknowledged commit is lost, writes pause a few seconds at most,
and the old primary comes back as a replica. Without --to, the operator picks a
replica itself, with the same guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from conftest import ROOT, eventually, kubectl
from world import World, dig, local_world

from controller.kube.client import KubeClient, resource_path
from controller.operator.switchover import SwitchoverError, election_priorities

from .harness import dns_a

pytestmark = pytest.mark.slow
PATH = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "default")
MASTER = "master.pg-default-demo.service.consul"


class Writer(threading.Thread):
    def __init__(self, dns_port: int, user: str, password: str, table: str) -> None:
        super().__init__(daemon=True)
        self.dns_port, self.user, self.password, self.table = dns_port, user, password, table
        self.acked: list[tuple[int, float]] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        seq = 0
        while not self.stop_flag.is_set():
            try:
                if conn is None:
                    address = dns_a(MASTER, self.dns_port)[0]
                    conn = psycopg.connect(
                        host=address,
                        user=self.user,
                        password=self.password,
                        dbname="postgres",
                        connect_timeout=1,
                        autocommit=True,
                    )
                seq += 1
                conn.execute(f"INSERT INTO {self.table} (id) VALUES (%s)", (seq,))
                self.acked.append((seq, time.monotonic()))
            except (psycopg.Error, OSError, IndexError):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            time.sleep(0.02)
        if conn is not None:
            conn.close()

    def longest_gap(self) -> float:
        times = [t for _, t in self.acked]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def published_cluster(kube: KubeClient, world: World) -> dict[str, Any]:
    """The cluster's status once it is Ready with one primary, two replicas and the
    master record on the primary."""

    async def primary_published() -> dict[str, Any] | None:
        st = (await kube.get(f"{PATH}/demo")).get("status") or {}
        primary = next((i for i in st.get("instances", []) if i["role"] == "primary"), None)
        if st.get("phase") != "Ready" or st.get("readyInstances") != 3 or primary is None:
            return None
        replicas = [i for i in st["instances"] if i["role"] == "replica"]
        if len(replicas) != 2 or await dig(world.consul.dns_port, MASTER) != [primary["address"]]:
            return None
        return st

    st: dict[str, Any] = await eventually(primary_published, timeout=180, interval=0.5)
    return st


async def switchover_while_writing(
    world: World, kubeconfig: str, creds: dict[str, str], primary_address: str, to: str | None, table: str
) -> tuple[int | None, str, Writer]:
    """A writer commits into `table` through the DNS name from 2 s before the CLI runs to 2 s
    after it returned."""
    with connect(primary_address, creds) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY)")
    writer = Writer(world.consul.dns_port, creds["username"], creds["password"], table)
    writer.start()
    await asyncio.sleep(2)
    code, out = await switchover_cli(kubeconfig, to)
    await asyncio.sleep(2)
    writer.stop_flag.set()
    await asyncio.to_thread(writer.join, 15)
    return code, out, writer


def assert_no_write_lost(new_primary_address: str, creds: dict[str, str], writer: Writer) -> None:
    with connect(new_primary_address, creds) as conn:
        present = {int(r[0]) for r in conn.execute(f"SELECT id FROM {writer.table}").fetchall()}
    acked = {seq for seq, _ in writer.acked}
    assert acked, "the writer committed nothing"
    assert acked - present == set(), "acknowledged commits lost"
    gap = writer.longest_gap()
    print(f"switchover: {len(acked)} commits, none lost, longest write pause {gap:.2f} s")
    assert gap < 10, gap


async def test_switchover_moves_the_primary_without_losing_writes(kube_api, kube: KubeClient) -> None:
    _, url, kubeconfig = kube_api
    async with local_world(url, resync=1.0) as world:
        code, _, err = await kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "cluster.yaml"))
        assert code == 0, err
        st = await published_cluster(kube, world)
        old = next(i for i in st["instances"] if i["role"] == "primary")
        # The replica with the highest index has the lowest repmgr priority: the other
        # standby outranks it, the case where raising the target's priority alone left
        # both standbys waiting for each other's promotion.
        target = [i for i in st["instances"] if i["role"] == "replica"][-1]
        creds = await kube.get_secret("default", "demo-pgbosh-credentials")
        code, out, writer = await switchover_while_writing(
            world, kubeconfig, creds, old["address"], target["name"], "writes_to"
        )
        assert code == 0, out
        assert await dig(world.consul.dns_port, MASTER) == [target["address"]]
        assert_no_write_lost(target["address"], creds, writer)

        async def old_is_replica() -> bool:
            st = (await kube.get(f"{PATH}/demo")).get("status") or {}
            roles = {i["name"]: i["role"] for i in st.get("instances", [])}
            return roles.get(old["name"]) == "replica" and st.get("currentPrimary") == target["name"]

        await eventually(old_is_replica, timeout=120, interval=0.5)

        # Requests that cannot be carried out: the CLI says why, nothing moves.
        code, out = await switchover_cli(kubeconfig, target["name"])
        assert code == 1 and f"{target['name']} is the primary already" in out, out
        code, out = await switchover_cli(kubeconfig, "postgres/no-such-instance")
        assert code == 1 and "postgres/no-such-instance is not a healthy standby of this cluster" in out, out
        st = (await kube.get(f"{PATH}/demo")).get("status") or {}
        assert st.get("currentPrimary") == target["name"]
        assert "pgbosh.dev/switchover-to" not in ((await kube.get(f"{PATH}/demo"))["metadata"].get("annotations") or {})
        assert await dig(world.consul.dns_port, MASTER) == [target["address"]]

        # `pgbosh switchover demo` with no --to: the operator picks the healthy standby with
        # the least lag; one of the two replicas (the old primary among them) becomes primary.
        st = (await kube.get(f"{PATH}/demo")).get("status") or {}
        replicas = {i["name"]: i["address"] for i in st["instances"] if i["role"] == "replica"}
        assert len(replicas) == 2 and old["name"] in replicas, st
        code, out, writer = await switchover_while_writing(
            world, kubeconfig, creds, target["address"], None, "writes_any"
        )
        assert code == 0, out
        st = (await kube.get(f"{PATH}/demo")).get("status") or {}
        new = st.get("currentPrimary")
        assert new in replicas, (new, replicas, out)
        print(f"switchover without --to: {target['name']} -> {new} (replicas were {sorted(replicas)})")
        assert await dig(world.consul.dns_port, MASTER) == [replicas[new]]
        with connect(replicas[new], creds) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert_no_write_lost(replicas[new], creds, writer)


def connect(address: str, creds: dict[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=address, user=creds["username"], password=creds["password"], dbname="postgres", autocommit=True
    )


async def switchover_cli(kubeconfig: str, to: str | None) -> tuple[int | None, str]:
    """`pgbosh switchover demo [--to <to>]` as a process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "switchover",
        "demo",
        *(["--to", to] if to is not None else []),
        "--kubeconfig",
        kubeconfig,
        "--timeout",
        "150",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


def test_election_priorities_make_the_target_win_on_every_node() -> None:
    """repmgrd ranks siblings by the table and itself by the priority it loaded at start:
    with the target raised and the others at 1, every standby ranks the target first."""
    loaded = {"a": 90, "b": 80, "c": 70}
    for target in loaded:
        table = election_priorities(loaded, target, f"postgres/{target}")
        assert table[target] == 1000 and all(table[n] == 1 for n in loaded if n != target)
        for node in loaded:  # node's view: its own loaded priority, the others' from the table
            view = {n: (loaded[n] if n == node else table[n]) for n in loaded}
            assert max(view, key=lambda n: view[n]) == target, (node, view)
    with pytest.raises(SwitchoverError, match="postgres/x has repmgr priority 0"):
        election_priorities({"x": 0, "y": 90}, "x", "postgres/x")
