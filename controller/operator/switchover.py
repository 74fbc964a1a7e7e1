"""Planned switchover: `pgbosh switchover <cluster> [--to <instance>]`, or the annotation
`pgbosh.dev/switchover-to: <instance name | instance id | any>` for kubectl and GitOps.

The operator cannot log in to VMs; it works through the Director and PostgreSQL:

1. On the primary, the target's repmgr priority is raised and every other standby's
   lowered (election_priorities says why both); repmgr.nodes is replicated, and the
   operator waits until every standby has replayed the change.
2. The primary's job is stopped through the Director. The agent drains it: repmgrd
   first, then PostgreSQL with a fast shutdown, which sends every WAL record to the
   connected standbys and waits for them to flush it before it exits: no
   acknowledged commit is lost.
3. repmgrd on the standbys sees the primary gone (2-3 s with the manifest's timings),
   and the election (most WAL, then priority) picks the target; its promote hook
   moves Consul's master record at once. The other standby follows.
4. The priority is restored and the old primary's job started again: its agent finds
   a writable peer and rejoins it as a standby (pg_rewind, not even needed after a
   clean shutdown).

Writes are unavailable from the fast shutdown until the promotion, about 3-5 s.
The CLI sets the annotation and waits for `status.currentPrimary` to change; the
operator (`reconcile_once`) carries it out and removes the annotation.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg

from controller.pg.probe import probe_all
from controller.pg.types import choose_primary

if TYPE_CHECKING:
    from controller.bosh.types import Instance
    from controller.operator.reconcile import Runtime
    from controller.pg.types import NodeState

log = logging.getLogger(__name__)

ANNOTATION = "pgbosh.dev/switchover-to"
TARGET_PRIORITY = 1000
PROMOTION_TIMEOUT = 60.0
TASK_TIMEOUT = 180.0
REPLAY_TIMEOUT = 30.0
REPMGRD_TIMEOUT = 60.0


class SwitchoverError(RuntimeError):
    """The switchover cannot be done (no such target, no primary, ...)."""


def pick_target(
    target: str, instances: list[Instance], nodes: list[NodeState], primary: NodeState
) -> tuple[Instance, NodeState]:
    """The standby to promote: named by instance name (`postgres/<id>`), id, or `any`
    (the healthy standby with the least lag)."""
    by_address = {inst.ips[0]: inst for inst in instances if inst.ips}
    standbys = [
        n for n in nodes if n.reachable and n.in_recovery and n.address != primary.address and n.address in by_address
    ]
    if target in ("", "any"):
        if not standbys:
            raise SwitchoverError("no healthy standby to switch over to")
        best = min(standbys, key=lambda n: n.lag_bytes if n.lag_bytes is not None else 1 << 62)
        return by_address[best.address], best
    for node in standbys:
        inst = by_address[node.address]
        if target in (inst.name, inst.id, f"{inst.job_name}/{inst.index}"):
            return inst, node
    current = [i for i in instances if i.ips and i.ips[0] == primary.address]
    if any(target in (i.name, i.id, f"{i.job_name}/{i.index}") for i in current):
        raise SwitchoverError(f"{target} is the primary already")
    raise SwitchoverError(f"{target} is not a healthy standby of this cluster")


def election_priorities(original: dict[str, int], target: str, label: str) -> dict[str, int]:
    """repmgr.nodes priorities of the standbys that make repmgrd elect `target` once the
    primary stops.

    repmgrd compares candidates by received LSN first, then by priority. It reads its
    siblings' priorities from repmgr.nodes, but its own is the one it loaded when it
    started. Raising the target's row alone is not enough: a standby whose own priority
    is above the target's loaded one sees the target win (from the table) while the
    target sees that standby win (from the table too), and each waits for the other's
    promotion: no primary at all (seen: "no notification received from new primary").
    So every other standby is set to 1, below the target's loaded priority and above 0:
    0 would take it out of the election altogether, and a standby that received more WAL
    must still win on every node (the LSN comparison is the same everywhere)."""
    own = original[target]
    if own < 2:
        raise SwitchoverError(f"{label} has repmgr priority {own}: a switchover needs 2 or more (0 never promotes)")
    return {name: (TARGET_PRIORITY if name == target else 1) for name in original}


async def _wait_replayed(address: str, port: int, user: str, password: str, lsn: str) -> None:
    async with await _connect(address, port, user, password) as conn:
        deadline = time.monotonic() + REPLAY_TIMEOUT
        while True:
            done = await (await conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))).fetchone()
            if done and done[0]:
                return
            if time.monotonic() > deadline:
                raise SwitchoverError(f"the standby at {address} did not replay {lsn} in {REPLAY_TIMEOUT:.0f} s")
            await asyncio.sleep(0.1)


async def _wait_repmgrd(new: Instance, port: int, user: str, password: str) -> None:
    """Only a running, unpaused repmgrd on the target promotes it once the primary stops
    (right after provisioning it may not have started yet): checked before stopping anything."""
    async with await _connect(new.ips[0], port, user, password) as conn:
        deadline = time.monotonic() + REPMGRD_TIMEOUT
        while True:
            row = await (
                await conn.execute("SELECT repmgr.repmgrd_is_running() AND NOT repmgr.repmgrd_is_paused()")
            ).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise SwitchoverError(
                    f"repmgrd is not monitoring on {new.name} after {REPMGRD_TIMEOUT:.0f} s: nothing was stopped"
                )
            await asyncio.sleep(0.2)


async def _restore_priorities(address: str, port: int, user: str, password: str, original: dict[str, int]) -> bool:
    """The standbys' own priorities back, written on the writable node at `address`
    (False: that node did not take them)."""
    try:
        async with await _connect(address, port, user, password) as conn:
            for name, priority in original.items():
                await conn.execute("UPDATE repmgr.nodes SET priority = %s WHERE node_name = %s", (priority, name))
    except psycopg.Error:
        return False
    return True


async def _connect(address: str, port: int, user: str, password: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host=address,
        port=port,
        user=user,
        password=password,
        dbname="repmgr",
        connect_timeout=3,
        autocommit=True,
        application_name="pgbosh-switchover",
    )


async def _wait_task(rt: Runtime, task_id: int) -> None:
    deadline = time.monotonic() + TASK_TIMEOUT
    while True:
        task = await rt.director.task(task_id)
        if task.state in ("done", "error", "cancelled", "timeout"):
            if task.state != "done":
                raise SwitchoverError(f"Director task {task_id} ended {task.state}")
            return
        if time.monotonic() > deadline:
            raise SwitchoverError(f"Director task {task_id} still {task.state} after {TASK_TIMEOUT:.0f} s")
        await asyncio.sleep(0.2)


async def perform_switchover(rt: Runtime, body: dict[str, Any], target: str) -> None:
    """Make `target` the primary (see the module docstring). Raises SwitchoverError."""
    from controller.operator.reconcile import context_id, ensure_credentials, parse_status

    meta = body["metadata"]
    status = parse_status(body)
    deployment = status.deployment
    if not deployment:
        raise SwitchoverError("the cluster has no deployment yet")
    _, credentials = await ensure_credentials(rt, meta["namespace"], meta["name"], body)
    user = credentials.get("username", rt.bosh.admin_user)
    password = credentials["password"]
    port = rt.bosh.postgres_port
    instances = await rt.director.instances_brief(deployment)
    addresses = [inst.ips[0] for inst in instances if inst.ips]
    nodes = await probe_all(rt.node_probe(user, password), addresses, port)
    primary = choose_primary(nodes)
    if primary is None:
        raise SwitchoverError("no primary right now (a failover is in progress?)")
    old = next(inst for inst in instances if inst.ips and inst.ips[0] == primary.address)
    new, _ = pick_target(target, instances, nodes, primary)
    log.info("switchover of %s: %s (%s) -> %s (%s)", meta["name"], old.name, primary.address, new.name, new.ips[0])

    # 1. The target wins the election: priorities in repmgr.nodes (election_priorities).
    async with await _connect(primary.address, port, user, password) as conn:
        rows = await (
            await conn.execute("SELECT node_name, priority FROM repmgr.nodes WHERE active AND type = 'standby'")
        ).fetchall()
        original = {str(name): int(priority) for name, priority in rows}
        if new.id not in original:
            raise SwitchoverError(f"{new.name} is not registered with repmgr")
        for name, priority in election_priorities(original, new.id, new.name).items():
            await conn.execute("UPDATE repmgr.nodes SET priority = %s WHERE node_name = %s", (priority, name))
        lsn_row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        assert lsn_row is not None
        lsn = str(lsn_row[0])
    try:
        # Every standby's repmgrd reads its siblings' priorities from its own copy of
        # repmgr.nodes: all of them must have replayed the change before the election.
        standbys = [n.address for n in nodes if n.reachable and n.in_recovery]
        await asyncio.gather(*(_wait_replayed(address, port, user, password, lsn) for address in standbys))
        await _wait_repmgrd(new, port, user, password)
    except BaseException:
        await _restore_priorities(primary.address, port, user, password, original)
        raise

    ctx = context_id(meta["uid"])
    try:
        # 2. Drain the primary: its fast shutdown hands every WAL record to the standbys.
        task_id = await rt.director.change_job_state(
            deployment, rt.bosh.instance_group, old.id, "stopped", context_id=ctx
        )
        await _wait_task(rt, task_id)
        # 3. repmgrd promotes the target.
        deadline = time.monotonic() + PROMOTION_TIMEOUT
        while True:
            state = (await probe_all(rt.node_probe(user, password), [new.ips[0]], port))[0]
            if state.writable:
                break
            if time.monotonic() > deadline:
                raise SwitchoverError(f"{new.name} was not promoted in {PROMOTION_TIMEOUT:.0f} s")
            await asyncio.sleep(0.2)
        log.info("switchover of %s: %s is the primary", meta["name"], new.name)
    finally:
        # 4. Restore the priorities (wherever the primary is now) and bring the old primary back.
        for address in [new.ips[0], primary.address]:
            if await _restore_priorities(address, port, user, password, original):
                break
        task_id = await rt.director.change_job_state(
            deployment, rt.bosh.instance_group, old.id, "started", context_id=ctx
        )
        await _wait_task(rt, task_id)


async def run_requested_switchover(rt: Runtime, body: dict[str, Any], target: str) -> dict[str, Any]:
    """What reconcile_once calls when the annotation is set: switch over, post an Event and
    return the resource as it is now. reconcile_once then writes the status and removes the
    annotation (also after a failure: a request is carried out once)."""
    from controller.operator.reconcile import cluster_path

    meta = body["metadata"]
    try:
        await perform_switchover(rt, body, target)
        rt.post_event(body, "Normal", "SwitchedOver", f"planned switchover to {target} done")
    except Exception as exc:  # reported on the resource, never fatal to reconciliation
        log.warning("switchover of %s/%s failed: %s", meta["namespace"], meta["name"], exc)
        rt.post_event(body, "Warning", "SwitchoverFailed", f"switchover to {target}: {exc}")
    fresh: dict[str, Any] = await rt.kube.get(cluster_path(meta["namespace"], meta["name"]))
    return fresh


async def clear_annotation(rt: Runtime, namespace: str, name: str) -> None:
    from controller.operator.reconcile import cluster_path

    await rt.kube.merge_patch(cluster_path(namespace, name), {"metadata": {"annotations": {ANNOTATION: None}}})


# --- the CLI ------------------------------------------------------------------------------
def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", help="PostgresCluster name")
    parser.add_argument("--to", default="any", help="instance name (postgres/<id>) or id of the new primary")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the new primary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    import os

    from controller.kube.client import KubeClient, NotFound
    from controller.operator.cli import connection_from_kubeconfig
    from controller.operator.reconcile import cluster_path

    path = args.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    conn = connection_from_kubeconfig(path)
    async with KubeClient(conn.server, token=conn.token, ca_file=conn.ca_file, verify=not conn.insecure) as kube:
        api_path = cluster_path(args.namespace, args.cluster)
        try:
            body = await kube.get(api_path)
        except NotFound:
            print(f"pgbosh switchover: no PostgresCluster {args.namespace}/{args.cluster}")
            return 1
        before = (body.get("status") or {}).get("currentPrimary")
        await kube.merge_patch(api_path, {"metadata": {"annotations": {ANNOTATION: args.to}}})
        print(f"switchover of {args.namespace}/{args.cluster} requested (primary now: {before}, to: {args.to})")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            body = await kube.get(api_path)
            annotations = body["metadata"].get("annotations") or {}
            current = (body.get("status") or {}).get("currentPrimary")
            if ANNOTATION not in annotations:
                if current and current != before:
                    print(f"the primary is now {current}")
                    return 0
                reason = await _failure_reason(kube, args.namespace, body["metadata"].get("uid"))
                print(f"switchover finished without a new primary (still {current}): {reason}")
                return 1
        print("pgbosh switchover: timed out waiting for the operator")
        return 1


async def _failure_reason(kube: Any, namespace: str, uid: str | None) -> str:
    """The operator's SwitchoverFailed event for this cluster (kopf posts events a moment
    after the fact, so look for a few seconds)."""
    for _ in range(10):
        events = await kube.list(f"/api/v1/namespaces/{namespace}/events")
        failed = [
            e
            for e in events
            if e.get("reason") == "SwitchoverFailed" and (e.get("involvedObject") or {}).get("uid") == uid
        ]
        if failed:
            latest = max(failed, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
            return str(latest.get("message") or "see the cluster's events")
        await asyncio.sleep(0.5)
    return "see the cluster's events"
