"""VM lifecycle with the test-only agent: resurrection, pause, scaling, recreate, disks, restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from controller.local.director import LocalDirector
from controller.local.director.vms import AgentClient, agent_alive

from .conftest import kill_everything, running_director
from .helpers import FAKE_AGENT, Client, manifest, running

pytestmark = pytest.mark.asyncio(loop_scope="module")


def boots(director, row) -> list[str]:
    path = director.engine.vm_root / "disks" / row["disk_cid"] / "data" / "boots"
    return path.read_text().splitlines() if path.exists() else []


def agent_pid(director, row) -> int:
    inst = next(i for d in director.engine.state.deployments.values() for i in d.instances if i.id == row["id"])
    assert inst.pid
    return inst.pid


async def test_killed_agent_is_resurrected_on_its_disk(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("phoenix")))["state"] == "done"
    before = await client.vms("phoenix")
    victim = before[1]
    pid = agent_pid(director, victim)
    status = director.engine.runtime[victim["id"]].status
    assert status is not None
    job_pid = status["pid"]  # the fake agent's `sleep` job, in the agent's session
    assert _sid(job_pid) == pid
    os.kill(pid, signal.SIGKILL)
    down = await client.wait_for("phoenix", lambda rows: rows[1]["job_state"] == "unresponsive agent", limit=10)
    assert down[1]["processes"] == []
    after = await client.wait_for("phoenix", lambda rows: running(rows, 3) and rows[1]["vm_cid"] != victim["vm_cid"])
    again = after[1]
    assert again["id"] == victim["id"] and again["disk_cid"] == victim["disk_cid"]
    assert again["ips"] == victim["ips"] and again["az"] == victim["az"]
    assert again["agent_id"] != victim["agent_id"]
    assert len(boots(director, again)) == 2
    assert not (director.engine.vm_root / "vms" / victim["vm_cid"]).exists()
    scans = (await client.req("GET", "/tasks", params={"verbose": "2", "deployment": "phoenix"})).json()
    assert any(t["description"] == "scan and fix" and t["state"] == "done" for t in scans)
    # the old VM's job (a child in the agent's session) did not survive
    assert _sid(job_pid) != pid


def _sid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[3])  # a zombie is dead, whoever reaps it


async def test_paused_instance_stays_down(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("paused", instances=2)))["state"] == "done"
    resp = await client.req("PUT", "/deployments/paused/jobs/postgres/1/resurrection",
                            json={"resurrection_paused": True})
    assert resp.status_code == 200
    rows = await client.vms("paused")
    os.kill(agent_pid(director, rows[1]), signal.SIGKILL)
    await client.wait_for("paused", lambda r: r[1]["job_state"] == "unresponsive agent", limit=10)
    await asyncio.sleep(2.0)  # four resurrection delays
    still = await client.vms("paused")
    assert still[1]["job_state"] == "unresponsive agent" and still[1]["vm_cid"] == rows[1]["vm_cid"]
    assert still[0]["job_state"] == "running"
    # global pause also holds; unpausing the instance lets the resurrector act
    await client.req("PUT", "/resurrection", json={"resurrection_paused": True})
    await client.req("PUT", "/deployments/paused/jobs/postgres/1/resurrection", json={"resurrection_paused": False})
    await asyncio.sleep(1.5)
    assert (await client.vms("paused"))[1]["job_state"] == "unresponsive agent"
    await client.req("PUT", "/resurrection", json={"resurrection_paused": False})
    await client.wait_for("paused", lambda r: running(r, 2))


async def test_scale_up_and_down(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("scaling")))["state"] == "done"
    three = await client.vms("scaling")
    assert (await client.deploy(manifest("scaling", instances=5)))["state"] == "done"
    five = await client.vms("scaling")
    assert running(five, 5)
    assert [r["index"] for r in five] == [0, 1, 2, 3, 4]
    assert [r["az"] for r in five] == ["z1", "z2", "z3", "z1", "z2"]
    assert [r["vm_cid"] for r in five[:3]] == [r["vm_cid"] for r in three]  # untouched
    assert len({r["ips"][0] for r in five}) == 5
    peers = __import__("json").loads(
        (director.engine.vm_root / "vms" / five[0]["vm_cid"] / "agent.json").read_text())["peers"]
    assert [p["index"] for p in peers] == [0, 1, 2, 3, 4]
    assert (await client.deploy(manifest("scaling", instances=3)))["state"] == "done"
    back = await client.vms("scaling")
    assert [r["id"] for r in back] == [r["id"] for r in three] and running(back, 3)
    for gone in five[3:]:
        assert not (director.engine.vm_root / "disks" / gone["disk_cid"]).exists()
        assert not (director.engine.vm_root / "vms" / gone["vm_cid"]).exists()
    # a freed address is reused by the next new instance
    assert (await client.deploy(manifest("scaling", instances=4)))["state"] == "done"
    four = await client.vms("scaling")
    assert four[3]["ips"] == five[3]["ips"] and four[3]["id"] != five[3]["id"]


async def test_vm_type_change_recreates_on_the_same_disk_and_disk_growth_moves_data(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("resize", instances=2)))["state"] == "done"
    before = await client.vms("resize")
    task = await client.deploy(manifest("resize", instances=2, vm_type="medium"))
    assert task["state"] == "done"
    after = await client.vms("resize")
    assert [r["vm_type"] for r in after] == ["medium", "medium"]
    for old, new in zip(before, after, strict=True):
        assert new["vm_cid"] != old["vm_cid"] and new["disk_cid"] == old["disk_cid"] and new["id"] == old["id"]
        assert len(boots(director, new)) == 2
    updates = [e for e in await client.events(task["id"]) if e.get("stage") == "Updating instance"]
    assert [e["task"].split(" ")[1] for e in updates if e["state"] == "started"] == ["(0)", "(1)"]
    grown = await client.deploy(manifest("resize", instances=2, vm_type="medium", disk_mb=4096))
    assert grown["state"] == "done"
    bigger = await client.vms("resize")
    for old, new in zip(after, bigger, strict=True):
        assert new["disk_cid"] != old["disk_cid"]
        assert len(boots(director, new)) == 3  # the data came along
        assert not (director.engine.vm_root / "disks" / old["disk_cid"]).exists()


async def job_status(director, row) -> dict:
    """GET /status straight from the instance's agent (the test agent reports its job's pid)."""
    return await AgentClient(director.engine.vm_root / "vms" / row["vm_cid"] / "agent.sock").status(limit=5)


async def test_job_state_changes(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("jobs", instances=2)))["state"] == "done"

    async def change(index: int, state: str) -> dict:
        resp = await client.req("PUT", f"/deployments/jobs/jobs/postgres/{index}", params={"state": state},
                                headers={"Content-Type": "text/yaml"})
        return await client.wait(await client.task_of(resp))

    assert (await change(1, "stopped"))["state"] == "done"
    rows = await client.vms("jobs")
    assert rows[1]["job_state"] == "stopped" and rows[1]["state"] == "stopped"
    # a stopped instance stays stopped when a deploy comes along
    assert (await client.deploy(manifest("jobs", instances=2)))["state"] == "done"
    assert (await client.vms("jobs"))[1]["job_state"] == "stopped"
    assert (await change(1, "started"))["state"] == "done"
    assert (await client.vms("jobs"))[1]["job_state"] == "running"
    cid = rows[1]["vm_cid"]
    assert (await change(1, "recreate"))["state"] == "done"
    assert (await client.vms("jobs"))[1]["vm_cid"] != cid
    assert (await change(1, "detached"))["state"] == "done"
    assert len(await client.vms("jobs")) == 1
    detached = next(r for r in await client.vms("jobs", "instances") if r["index"] == 1)
    assert detached["vm_cid"] is None and detached["state"] == "detached" and detached["job_state"] is None
    assert (await change(1, "started"))["state"] == "done"
    assert running(await client.vms("jobs"), 2)
    # restart: the job is stopped and started again on the same VM (a new job process)
    before = (await client.vms("jobs"))[0]
    job_pid = (await job_status(director, before))["pid"]
    started = len(boots(director, before))
    assert (await change(0, "restart"))["state"] == "done"
    after = await client.vms("jobs")
    assert running(after, 2)
    assert after[0]["vm_cid"] == before["vm_cid"] and agent_pid(director, after[0]) == agent_pid(director, before)
    restarted = await job_status(director, after[0])
    assert restarted["pid"] != job_pid and _sid(job_pid) is None  # the old job process is gone
    assert len(boots(director, after[0])) == started + 1  # its job was started once more


async def test_delete_frees_everything(fake_world):
    director, client = fake_world
    assert (await client.deploy(manifest("doomed", instances=2)))["state"] == "done"
    rows = await client.vms("doomed")
    pids = [agent_pid(director, r) for r in rows]
    resp = await client.req("DELETE", "/deployments/doomed", params={"force": "true"},
                            headers={"X-Bosh-Context-Id": "bye"})
    task = await client.wait(await client.task_of(resp))
    assert task["state"] == "done" and task["description"] == "delete deployment doomed"
    assert task["context_id"] == "bye"
    assert (await client.req("GET", "/deployments/doomed")).status_code == 404
    for row, pid in zip(rows, pids, strict=True):
        assert not (director.engine.vm_root / "disks" / row["disk_cid"]).exists()
        assert not (director.engine.vm_root / "vms" / row["vm_cid"]).exists()
        assert not agent_alive(pid, director.engine.vm_root / "vms" / row["vm_cid"] / "agent.json")
        assert _sid(pid) is None
    again = await client.req("DELETE", "/deployments/doomed")
    assert again.status_code == 404 and again.json()["code"] == 70000


async def test_restart_adopts_live_vms_and_recreates_dead_ones(short_tmp):
    tmp_path = short_tmp
    state = tmp_path / "state"
    kw = {"vm_root": tmp_path / "vms", "agent_command": FAKE_AGENT, "resurrection_delay": 0.5,
          "agent_timeout": 1.0, "poll_interval": 0.2}
    async with running_director(state, **kw) as (director, client):
        deployed = await client.deploy(manifest("survivor"))
        assert deployed["state"] == "done", (deployed, (await client.output(deployed["id"], "event"))[-600:])
        before = await client.vms("survivor")
        pids = [agent_pid(director, r) for r in before]
        secret = client.client_secret

        # a second director on the same state while the first one is stopped (VMs keep running)
        await director.stop()
        second = LocalDirector(state, **kw)
        await second.start()
        client2 = Client(second.info_path)
        try:
            assert client2.client_secret == secret
            after = await client2.wait_for("survivor", lambda r: running(r, 3))
            assert [r["vm_cid"] for r in after] == [r["vm_cid"] for r in before]
            assert [agent_pid(second, r) for r in after] == pids
            assert (await client2.req("GET", "/deployments")).json()[0]["name"] == "survivor"
        finally:
            await client2.close()
            await second.stop()
        os.kill(pids[2], signal.SIGKILL)  # dies while no director runs
        await asyncio.sleep(0.3)

    # (running_director's cleanup killed what the first object knew; start from the state again)
    async with running_director(state, **kw) as (third, client3):
        final = await client3.wait_for("survivor", lambda r: running(r, 3))
        assert [r["disk_cid"] for r in final] == [r["disk_cid"] for r in before]
        assert all(r["vm_cid"] not in {b["vm_cid"] for b in before} for r in final)
        assert [len(boots(third, r)) for r in final] == [2, 2, 2]
        resp = await client3.req("DELETE", "/deployments/survivor")
        assert (await client3.wait(await client3.task_of(resp)))["state"] == "done"


async def test_a_vm_that_cannot_come_back_is_retried_with_backoff(fake_world):
    director, client = fake_world
    doc = __import__("yaml").safe_load(manifest("stubborn", instances=1))
    doc["update"].update({"canary_watch_time": "100-800", "update_watch_time": "100-800"})
    assert (await client.deploy(__import__("yaml").safe_dump(doc)))["state"] == "done"
    [row] = await client.vms("stubborn")
    (director.engine.vm_root / "disks" / row["disk_cid"] / "data" / "crash").touch()  # the agent will not boot
    os.kill(agent_pid(director, row), signal.SIGKILL)
    await asyncio.sleep(8)
    scans = [t for t in (await client.req("GET", "/tasks", params={"verbose": "2", "deployment": "stubborn"})).json()
             if t["description"] == "scan and fix"]
    # delay 0.5 s, then 1, 2, 4 s of backoff: about 4 attempts, where no backoff would have made 10 or more
    assert 2 <= len(scans) <= 5, scans
    assert all(t["state"] in ("error", "processing", "queued") for t in scans)
    (director.engine.vm_root / "disks" / row["disk_cid"] / "data" / "crash").unlink()
    await client.wait_for("stubborn", lambda r: running(r, 1), limit=30)


async def test_a_stopped_instance_stays_stopped_when_its_vm_is_resurrected(fake_world, monkeypatch):
    director, client = fake_world
    assert (await client.deploy(manifest("sleeper", instances=1)))["state"] == "done"
    resp = await client.req("PUT", "/deployments/sleeper/jobs/postgres/0", params={"state": "stopped"},
                            headers={"Content-Type": "text/yaml"})
    assert (await client.wait(await client.task_of(resp)))["state"] == "done"
    [row] = await client.vms("sleeper")
    monkeypatch.setenv("FAKE_AGENT_AUTOSTART", "1")  # an agent that starts its jobs when it boots
    os.kill(agent_pid(director, row), signal.SIGKILL)
    after = await client.wait_for("sleeper", lambda r: r[0]["vm_cid"] != row["vm_cid"] and r[0]["job_state"]
                                  not in (None, "unresponsive agent"), limit=20)
    await asyncio.sleep(0.5)
    [now] = await client.vms("sleeper")
    assert now["vm_cid"] == after[0]["vm_cid"] and now["state"] == "stopped" and now["job_state"] == "stopped"


async def test_stop_with_vms_then_start_brings_the_vms_back_on_their_disks(short_tmp):
    kw = {"vm_root": short_tmp / "vms", "agent_command": FAKE_AGENT, "poll_interval": 0.2}
    async with running_director(short_tmp / "state", **kw) as (director, client):
        assert (await client.deploy(manifest("sleepy", instances=2)))["state"] == "done"
        before = await client.vms("sleepy")
        await director.stop(stop_vms=True)
        assert not any((short_tmp / "vms" / "vms" / r["vm_cid"]).exists() for r in before)
    async with running_director(short_tmp / "state", **kw) as (_, client2):
        after = await client2.wait_for("sleepy", lambda r: running(r, 2), limit=30)
        assert [r["disk_cid"] for r in after] == [r["disk_cid"] for r in before]
        assert all(r["vm_cid"] not in {b["vm_cid"] for b in before} for r in after)
        resp = await client2.req("DELETE", "/deployments/sleepy", params={"force": "true"})
        assert (await client2.wait(await client2.task_of(resp)))["state"] == "done"


async def test_a_failed_disk_growth_leaves_the_rest_on_their_disks_and_delete_frees_all(short_tmp):
    """Disk growth happens per instance as it is updated (like the Director's disk migration in
    instance_updater): a canary that fails leaves the others on their old disks with their data."""
    kw = {"vm_root": short_tmp / "vms", "agent_command": FAKE_AGENT, "resurrection_delay": 30.0,
          "agent_timeout": 1.0, "poll_interval": 0.2}
    disks = short_tmp / "vms" / "disks"
    async with running_director(short_tmp / "state", **kw) as (director, client):

        def state_disks() -> set[str]:
            return {i.disk_cid for d in director.engine.state.deployments.values() for i in d.instances}

        for name in ("grow", "grow-and-go"):
            assert (await client.deploy(manifest(name)))["state"] == "done"
            before = await client.vms(name)
            canary = disks / before[0]["disk_cid"]
            (canary / "data" / "crash").touch()  # the canary's new VM will not boot
            failed = await client.deploy(manifest(name, disk_mb=4096))
            assert failed["state"] == "error" and "exited with code" in failed["result"], failed
            after = await client.vms(name, "instances")
            # the canary's data moved to its new disk; the others were not touched
            assert after[0]["disk_cid"] != before[0]["disk_cid"] and not canary.exists()
            assert (disks / after[0]["disk_cid"] / "data" / "crash").exists()
            assert len(boots(director, after[0])) == 1
            for old, new in zip(before[1:], after[1:], strict=True):
                assert new["disk_cid"] == old["disk_cid"] and new["vm_cid"] == old["vm_cid"]
                assert new["job_state"] == "running" and len(boots(director, new)) == 1
            # the state names exactly the disks that exist
            assert {p.name for p in disks.iterdir()} == state_disks()
            (disks / after[0]["disk_cid"] / "data" / "crash").unlink()

        # a retry grows the rest, data included
        assert (await client.deploy(manifest("grow", disk_mb=4096)))["state"] == "done"
        grown = await client.wait_for("grow", lambda r: running(r, 3))
        assert [len(boots(director, r)) for r in grown] == [2, 2, 2]
        assert {p.name for p in disks.iterdir()} == state_disks()

        for name in ("grow", "grow-and-go"):  # the second one straight after its failed deploy
            resp = await client.req("DELETE", f"/deployments/{name}", params={"force": "true"})
            assert (await client.wait(await client.task_of(resp)))["state"] == "done"
        assert list(disks.iterdir()) == []
        assert list((short_tmp / "vms" / "vms").iterdir()) == []


async def test_a_global_pause_holds_across_a_director_restart(short_tmp):
    state = short_tmp / "state"
    kw = {"vm_root": short_tmp / "vms", "agent_command": FAKE_AGENT, "resurrection_delay": 0.5,
          "agent_timeout": 1.0, "poll_interval": 0.2}
    first = LocalDirector(state, **kw)
    await first.start()
    client = Client(first.info_path)
    try:
        assert (await client.deploy(manifest("held", instances=2)))["state"] == "done"
        before = await client.vms("held")
        assert (await client.req("PUT", "/resurrection", json={"resurrection_paused": True})).status_code == 200
    except BaseException:
        await kill_everything(first)
        raise
    finally:
        await client.close()
        await first.stop()  # the VMs keep running
    os.kill(agent_pid(first, before[1]), signal.SIGKILL)  # dies while no director runs
    await asyncio.sleep(0.3)

    async with running_director(state, **kw) as (second, client2):
        await asyncio.sleep(2.5)  # five resurrection delays
        rows = await client2.vms("held", "instances")
        assert rows[0]["job_state"] == "running" and rows[0]["vm_cid"] == before[0]["vm_cid"]
        assert rows[1]["job_state"] == "unresponsive agent" and rows[1]["vm_cid"] == before[1]["vm_cid"]
        scans = (await client2.req("GET", "/tasks", params={"verbose": "2", "deployment": "held"})).json()
        assert not [t for t in scans if t["description"] == "scan and fix"]
        # VMs the director stopped itself stay down too while paused, and come back when unpaused
        await second.stop(stop_vms=True)
    async with running_director(state, **kw) as (third, client3):
        await asyncio.sleep(2.5)
        rows = await client3.vms("held", "instances")
        assert [r["vm_cid"] for r in rows] == [None, None]
        assert (await client3.req("PUT", "/resurrection", json={"resurrection_paused": False})).status_code == 200
        back = await client3.wait_for("held", lambda r: running(r, 2), limit=30)
        assert [r["disk_cid"] for r in back] == [r["disk_cid"] for r in before]
        assert [len(boots(third, r)) for r in back] == [2, 2]
        resp = await client3.req("DELETE", "/deployments/held", params={"force": "true"})
        assert (await client3.wait(await client3.task_of(resp)))["state"] == "done"


async def test_resurrection_waits_for_the_detection_delay(short_tmp):
    delay = 3.0
    kw = {"vm_root": short_tmp / "vms", "agent_command": FAKE_AGENT, "resurrection_delay": delay,
          "agent_timeout": 1.0, "poll_interval": 0.2}
    async with running_director(short_tmp / "state", **kw) as (director, client):
        assert (await client.deploy(manifest("patient", instances=1)))["state"] == "done"
        [row] = await client.vms("patient")

        async def scans() -> list[dict]:
            listed = (await client.req("GET", "/tasks", params={"verbose": "2", "deployment": "patient"})).json()
            return [t for t in listed if t["description"] == "scan and fix"]

        killed = time.monotonic()
        os.kill(agent_pid(director, row), signal.SIGKILL)
        # well inside the delay: noticed as down, not recreated
        await client.wait_for("patient", lambda r: r[0]["job_state"] == "unresponsive agent", limit=delay / 2)
        await asyncio.sleep(max(0.0, killed + delay / 2 - time.monotonic()))
        [down] = await client.vms("patient", "instances")
        assert down["vm_cid"] == row["vm_cid"] and down["job_state"] == "unresponsive agent"
        assert await scans() == []
        # a scan-and-fix appears, not before the delay has passed since the kill
        while not await scans():
            assert time.monotonic() - killed < 30, "never resurrected"
            await asyncio.sleep(0.1)
        assert time.monotonic() - killed >= delay
        back = await client.wait_for("patient", lambda r: running(r, 1) and r[0]["vm_cid"] != row["vm_cid"])
        assert back[0]["disk_cid"] == row["disk_cid"]
        resp = await client.req("DELETE", "/deployments/patient", params={"force": "true"})
        assert (await client.wait(await client.task_of(resp)))["state"] == "done"
