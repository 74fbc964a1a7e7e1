"""Issue 3's "Done when", with the real node agent, PostgreSQL and repmgr.

One 3-instance deployment is shared by the tests of this module, in order: it is
deployed over HTTP, loses a postgres and an agent, is paused, scaled 3 -> 5 -> 3,
survives a director restart and is finally deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import yaml

from controller.local.director import LocalDirector

from .conftest import kill_everything
from .helpers import Client, manifest, running

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

NAME = "pgbosh-test-real"
ADMIN_PASSWORD = "adm'in:pw"  # interpolated by the client, like the operator does
SETTINGS = {"resurrection_delay": 1.0, "agent_timeout": 2.0}


def real_manifest(instances: int = 3) -> str:
    doc = yaml.safe_load(manifest(NAME, instances=instances))
    doc["instance_groups"][0]["jobs"][0]["properties"]["postgres"]["admin_password"] = ADMIN_PASSWORD
    doc["variables"] = [v for v in doc["variables"] if v["name"] != "admin_password"]
    return yaml.safe_dump(doc, sort_keys=False)


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.director: LocalDirector | None = None
        self.client: Client | None = None

    async def start(self) -> None:
        self.director = LocalDirector(self.state, **SETTINGS)  # type: ignore[arg-type]
        await self.director.start()
        self.client = Client(self.director.info_path)

    async def stop(self) -> None:
        if self.client:
            await self.client.close()
        if self.director:
            await self.director.stop()

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    @property
    def d(self) -> LocalDirector:
        assert self.director is not None
        return self.director

    def disk(self, row: dict[str, Any]) -> Path:
        return self.d.engine.vm_root / "disks" / row["disk_cid"]

    def postmaster_pid(self, row: dict[str, Any]) -> int | None:
        try:
            return int((self.disk(row) / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # between a crash and the restart

    def agent_pid(self, row: dict[str, Any]) -> int:
        inst = next(i for i in self.d.engine.state.deployments[NAME].instances if i.id == row["id"])
        assert inst.pid
        return inst.pid


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world() -> AsyncIterator[World]:
    base = Path(tempfile.mkdtemp(prefix="pgbd-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # the postgres user must reach <state>/vms-and-disks
    w = World(base)
    await w.start()
    try:
        yield w
    finally:
        director = w.director
        if director is not None and NAME in director.engine.state.deployments:
            with_task = await w.c.req("DELETE", f"/deployments/{NAME}")
            if with_task.status_code == 302:
                await w.c.wait(await w.c.task_of(with_task), 60)
        await w.stop()
        if director is not None:
            await kill_everything(director)
            shutil.rmtree(director.engine.vm_root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def query(address: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(host=address, port=5432, user="pgbosh_admin", password=ADMIN_PASSWORD, dbname="app",
                         connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


async def eventually(check: Any, limit: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
            if last:
                return last
        except psycopg.Error as exc:
            last = exc
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def streaming(address: str) -> int:
    return int(query(address, "select count(*) from pg_stat_replication where state = 'streaming'")[0][0])


async def test_deploy_three_streaming_instances(world: World) -> None:
    task = await world.c.deploy(real_manifest(), limit=180)
    assert task["state"] == "done", (task, await world.c.output(task["id"], "event"))
    rows = await world.c.vms(NAME)
    assert running(rows, 3)
    assert [r["az"] for r in rows] == ["z1", "z2", "z3"]
    primary, *replicas = (r["ips"][0] for r in rows)
    assert await eventually(lambda: streaming(primary) == 2, 30, "2 streaming standbys")
    assert os.stat(world.d.engine.vm_root).st_mode & 0o005 == 0o005  # the postgres user gets in
    owner = os.stat(world.disk(rows[0]) / "postgres" / "data").st_uid
    assert owner == __import__("pwd").getpwnam("postgres").pw_uid  # the database does not run as root
    query(primary, "create table if not exists marks (id int primary key, note text)")
    query(primary, "insert into marks values (1, 'written on the primary')")
    for replica in replicas:
        assert await eventually(lambda r=replica: query(r, "select note from marks where id = 1"), 30,
                                f"the row on {replica}") == [("written on the primary",)]


async def test_killed_postgres_is_restarted(world: World) -> None:
    rows = await world.c.vms(NAME)
    victim = rows[1]
    old = world.postmaster_pid(victim)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await eventually(lambda: world.postmaster_pid(victim) not in (None, old), 60, "a new postmaster")
    after = await world.c.wait_for(NAME, lambda r: running(r, 3), limit=60)
    assert after[1]["vm_cid"] == victim["vm_cid"]  # the agent restarted it, the VM stayed
    assert await eventually(lambda: query(victim["ips"][0], "select count(*) from marks")[0][0] == 1, 30, "data")


async def test_killed_agent_is_resurrected_on_its_disk_with_its_data(world: World) -> None:
    rows = await world.c.vms(NAME)
    victim = rows[2]
    query(rows[0]["ips"][0], "insert into marks values (2, 'before the agent died')")
    os.kill(world.agent_pid(victim), signal.SIGKILL)
    await world.c.wait_for(NAME, lambda r: r[2]["job_state"] == "unresponsive agent", limit=15)
    after = await world.c.wait_for(NAME, lambda r: running(r, 3) and r[2]["vm_cid"] != victim["vm_cid"], limit=90)
    assert after[2]["disk_cid"] == victim["disk_cid"] and after[2]["ips"] == victim["ips"]
    address = victim["ips"][0]
    assert await eventually(lambda: query(address, "select note from marks where id = 2"), 30,
                            "the row on the resurrected VM") == [("before the agent died",)]
    assert await eventually(lambda: streaming(rows[0]["ips"][0]) == 2, 30, "2 streaming standbys again")


async def test_paused_instance_stays_down(world: World) -> None:
    rows = await world.c.vms(NAME)
    victim = rows[2]
    resp = await world.c.req("PUT", f"/deployments/{NAME}/jobs/postgres/{victim['id']}/resurrection",
                             json={"resurrection_paused": True})
    assert resp.status_code == 200
    os.kill(world.agent_pid(victim), signal.SIGKILL)
    await world.c.wait_for(NAME, lambda r: r[2]["job_state"] == "unresponsive agent", limit=15)
    await asyncio.sleep(SETTINGS["resurrection_delay"] * 4)
    still = await world.c.vms(NAME)
    assert still[2]["job_state"] == "unresponsive agent" and still[2]["vm_cid"] == victim["vm_cid"]
    assert still[2]["resurrection_paused"] is True
    await world.c.req("PUT", f"/deployments/{NAME}/jobs/postgres/{victim['id']}/resurrection",
                      json={"resurrection_paused": False})
    await world.c.wait_for(NAME, lambda r: running(r, 3), limit=90)
    assert await eventually(lambda: streaming(rows[0]["ips"][0]) == 2, 30, "2 streaming standbys again")


async def test_scale_three_to_five_to_three(world: World) -> None:
    before = await world.c.vms(NAME)
    primary = before[0]["ips"][0]
    task = await world.c.deploy(real_manifest(5), limit=180)
    assert task["state"] == "done", (task, await world.c.output(task["id"], "event"))
    five = await world.c.vms(NAME)
    assert running(five, 5) and [r["az"] for r in five] == ["z1", "z2", "z3", "z1", "z2"]
    assert [r["vm_cid"] for r in five[:3]] == [r["vm_cid"] for r in before]
    assert await eventually(lambda: streaming(primary) == 4, 30, "4 streaming standbys")
    for row in five[3:]:
        assert await eventually(lambda r=row: query(r["ips"][0], "select count(*) from marks")[0][0] == 2, 30,
                                "data on the new replica")
    task = await world.c.deploy(real_manifest(3), limit=120)
    assert task["state"] == "done", task
    three = await world.c.vms(NAME)
    assert [r["id"] for r in three] == [r["id"] for r in before] and running(three, 3)
    assert await eventually(lambda: streaming(primary) == 2, 30, "2 streaming standbys after scaling down")
    for row in five[3:]:
        assert not world.disk(row).exists()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.to_thread(query, row["ips"][0], "select 1")


async def test_director_restart_keeps_the_deployment_running(world: World) -> None:
    before = await world.c.vms(NAME)
    pids = [world.agent_pid(r) for r in before]
    await world.stop()
    await world.start()
    after = await world.c.wait_for(NAME, lambda r: running(r, 3), limit=30)
    assert [r["vm_cid"] for r in after] == [r["vm_cid"] for r in before]
    assert [world.agent_pid(r) for r in after] == pids
    assert [d["name"] for d in (await world.c.req("GET", "/deployments")).json()] == [NAME]
    assert query(after[1]["ips"][0], "select count(*) from marks")[0][0] == 2


async def test_delete_stops_everything_and_frees_addresses_and_disks(world: World) -> None:
    rows = await world.c.vms(NAME)
    resp = await world.c.req("DELETE", f"/deployments/{NAME}")
    task = await world.c.wait(await world.c.task_of(resp), 60)
    assert task["state"] == "done", task
    for row in rows:
        assert not world.disk(row).exists()
        assert not (world.d.engine.vm_root / "vms" / row["vm_cid"]).exists()
    listening = json.dumps(sorted(__import__("controller.local.director.director",
                                             fromlist=["x"]).listening_addresses()))
    assert all(row["ips"][0] not in listening for row in rows)
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and str(world.d.engine.vm_root) in _cmdline(p)]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
