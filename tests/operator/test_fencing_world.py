"""Fencing end to end: two nodes accept writes at once, and the operator settles it.

The in-process operator drives the local director (real PostgreSQL and repmgr VMs) and
the local Consul. A replica is promoted behind repmgr's back (`pg_promote()`, as an
operator's mistake or a partition healing would leave it), so the old primary still
accepts writes on the old timeline while the promoted node writes on a new one. The
operator must:

- keep (or move) Consul's master record on the writable node on the highest timeline;
- stop the stale primary's job through the Director and post a `Fenced` Warning Event;
- report the new primary in `status.currentPrimary` with a `PrimaryChanged` Event;
- start the fenced job again, so that the old primary rejoins as a replica on the new
  timeline, and the cluster is Ready with one primary.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import ROOT, eventually, kubectl
from world import dig, local_world

from controller.kube.client import KubeClient, core_path, resource_path
from controller.pg.probe import PsycopgProbe

pytestmark = pytest.mark.slow
PATH = resource_path("pgbosh.dev", "v1alpha1", "postgresclusters", "default")
MASTER = "master.pg-default-demo.service.consul"


def connect(address: str, creds: dict[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=address,
        user=creds["username"],
        password=creds["password"],
        dbname="postgres",
        autocommit=True,
        connect_timeout=2,
    )


async def node_state(address: str, creds: dict[str, str]) -> tuple[bool, int | None] | None:
    """(in recovery, timeline) as the operator's probe sees the node; None: no answer."""
    state = await PsycopgProbe(creds["username"], creds["password"]).probe(address, 5432)
    return (bool(state.in_recovery), state.timeline) if state.reachable else None


async def test_a_second_writable_node_is_fenced_and_rejoins(kube_api, kube: KubeClient) -> None:
    _, url, kubeconfig = kube_api
    async with local_world(url, resync=1.0) as world:
        code, _, err = await kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "cluster.yaml"))
        assert code == 0, err

        async def settled() -> dict[str, Any] | None:
            st = (await kube.get(f"{PATH}/demo")).get("status") or {}
            primary = next((i for i in st.get("instances", []) if i["role"] == "primary"), None)
            replicas = [i for i in st.get("instances", []) if i["role"] == "replica"]
            if st.get("phase") != "Ready" or st.get("readyInstances") != 3 or primary is None or len(replicas) != 2:
                return None
            if await dig(world.consul.dns_port, MASTER) != [primary["address"]]:
                return None
            return st

        st = await eventually(settled, timeout=180, interval=0.5)
        old = next(i for i in st["instances"] if i["role"] == "primary")
        promoted = next(i for i in st["instances"] if i["role"] == "replica")
        creds = await kube.get_secret("default", "demo-pgbosh-credentials")
        with connect(old["address"], creds) as conn:
            conn.execute("CREATE TABLE fencing_notes (note text)")
            conn.execute("INSERT INTO fencing_notes VALUES ('before the split')")

        async def promoted_streams() -> bool:
            return await node_state(promoted["address"], creds) == (True, 1)

        await eventually(promoted_streams, timeout=30, interval=0.3)

        # Split brain: the replica is promoted outside repmgr; the old primary is untouched.
        with connect(promoted["address"], creds) as conn:
            assert conn.execute("SELECT pg_promote(true, 30)").fetchone() == (True,)
        assert await node_state(promoted["address"], creds) == (False, 2)

        # The operator stops the stale primary and names the promoted node everywhere.
        async def fenced_event() -> dict[str, Any] | None:
            events = await kube.list(core_path("events", "default"))
            return next((e for e in events if e.get("reason") == "Fenced"), None)

        event = await eventually(fenced_event, timeout=60, interval=0.5)
        assert event["type"] == "Warning"
        assert old["name"] in event["message"] and old["address"] in event["message"], event["message"]
        assert "timeline 1" in event["message"] and "timeline 2" in event["message"], event["message"]

        async def master_moved() -> bool:
            return await dig(world.consul.dns_port, MASTER) == [promoted["address"]]

        await eventually(master_moved, timeout=30, interval=0.3)

        async def primary_reported() -> dict[str, Any] | None:
            st = (await kube.get(f"{PATH}/demo")).get("status") or {}
            return st if st.get("currentPrimary") == promoted["name"] else None

        await eventually(primary_reported, timeout=30, interval=0.5)
        reasons = [e.get("reason") for e in await kube.list(core_path("events", "default"))]
        assert "PrimaryChanged" in reasons, reasons

        # The old primary never writes again as a primary: it comes back as a replica of
        # the promoted node on timeline 2, and the cluster is Ready with one primary.
        async def old_rejoined() -> bool:
            return await node_state(old["address"], creds) == (True, 2)

        await eventually(old_rejoined, timeout=120, interval=0.5)

        async def ready_again() -> dict[str, Any] | None:
            st = await settled()
            return st if st is not None and st.get("currentPrimary") == promoted["name"] else None

        st = await eventually(ready_again, timeout=120, interval=0.5)
        assert st.get("fenced") in (None, []), st
        assert sum(1 for i in st["instances"] if i["role"] == "primary") == 1
        reasons = [e.get("reason") for e in await kube.list(core_path("events", "default"))]
        assert reasons.count("Fenced") == 1, reasons
        assert "Rejoining" in reasons, reasons
        # Every node agrees on one writable node.
        states = {i["address"]: await node_state(i["address"], creds) for i in st["instances"]}
        assert [a for a, s in states.items() if s is not None and not s[0]] == [promoted["address"]], states
        with connect(promoted["address"], creds) as conn:
            notes = [r[0] for r in conn.execute("SELECT note FROM fencing_notes").fetchall()]
        assert notes == ["before the split"]
