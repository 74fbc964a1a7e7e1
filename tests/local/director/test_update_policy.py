"""The update policy as the Director applies it, measured with the test agent's job start/ready times.

Sources: cloudfoundry/bosh src/bosh-director/lib/bosh/director/instance_group_updater.rb (AZ by AZ,
a pool of `max_in_flight` per AZ that runs the canaries too, canaries only in the first AZ),
deployment_plan/update_config.rb (`canaries(size)`, `max_in_flight(size)`: a percentage of the
instances updated in that AZ, rounded down, max_in_flight at least 1),
deployment_plan/instance_plan_sorter.rb (bootstrap first, then its AZ, then the others by name),
deployment_plan/multi_instance_group_updater.rb and docs-bosh content/manifest-v2.md#update-serial
(`serial: false` updates instance groups in parallel; instances still follow canaries/max_in_flight).

Each started job stays "starting" for `start_delay` seconds and logs `<index> start|ready <time>`,
so [start, ready] is a stretch of time the director had that instance in flight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.local.director import manifest as mf
from controller.local.director.errors import DirectorError

from .helpers import manifest, running

pytestmark = pytest.mark.asyncio(loop_scope="module")

DELAY = 1.0  # seconds each job takes to start


def policy_manifest(name: str, events: Path, *, instances: int, azs: tuple[str, ...], update: dict[str, Any],
                    groups: tuple[str, ...] = ("postgres",), vm_type: str = "small") -> str:
    doc = yaml.safe_load(manifest(name, instances=instances, azs=azs, vm_type=vm_type))
    doc["update"].update(update)
    base = doc["instance_groups"][0]
    base["jobs"][0]["properties"]["fake"] = {"start_delay": DELAY, "events": str(events)}
    doc["instance_groups"] = [{**base, "name": g} for g in groups]
    return yaml.safe_dump(doc, sort_keys=False)


def intervals(events: Path, first: str = "start", second: str = "ready") -> dict[int, tuple[float, float]]:
    """index -> (first, second) of each instance that logged them (the job's start and ready
    by default; one of each per instance per file)."""
    begins: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in events.read_text().splitlines():
        index, what, when = line.split()
        if what == first:
            begins[int(index)] = float(when)
        elif what == second:
            ends[int(index)] = float(when)
    assert set(begins) == set(ends), (begins, ends)
    return {i: (begins[i], ends[i]) for i in begins}


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def deploy_ok(client: Any, text: str) -> dict[str, Any]:
    task = await client.deploy(text)
    assert task["state"] == "done", (task, (await client.output(task["id"], "event"))[-800:])
    return task


async def delete(client: Any, name: str) -> None:
    resp = await client.req("DELETE", f"/deployments/{name}", params={"force": "true"})
    assert (await client.wait(await client.task_of(resp)))["state"] == "done"


async def update_labels(client: Any, task_id: int) -> list[str]:
    return [e["task"] for e in await client.events(task_id)
            if e.get("stage") == "Updating instance" and e["state"] == "started"]


async def test_canaries_then_batches_of_max_in_flight(fake_world, tmp_path):
    _, client = fake_world
    events = tmp_path / "events"
    task = await deploy_ok(client, policy_manifest("flight", events, instances=5, azs=("z1",),
                                                   update={"canaries": 2, "max_in_flight": 2}))
    spans = intervals(events)
    assert sorted(spans) == [0, 1, 2, 3, 4]
    # two at a time, never three: the canaries together, then the rest two by two
    assert max_overlap(list(spans.values())) == 2
    canaries_ready = max(spans[0][1], spans[1][1])
    assert all(spans[i][0] >= canaries_ready for i in (2, 3, 4)), spans
    labels = await update_labels(client, task["id"])
    assert [label.endswith("(canary)") for label in labels] == [True, True, False, False, False]
    assert running(await client.vms("flight"), 5)
    await delete(client, "flight")


async def test_max_in_flight_limits_the_canaries_too(fake_world, tmp_path):
    _, client = fake_world
    events = tmp_path / "events"
    task = await deploy_ok(client, policy_manifest("slow-canaries", events, instances=3, azs=("z1",),
                                                   update={"canaries": 2, "max_in_flight": 1}))
    spans = intervals(events)
    assert max_overlap(list(spans.values())) == 1, spans
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]  # in sorted order, one by one
    labels = await update_labels(client, task["id"])
    assert [label.endswith("(canary)") for label in labels] == [True, True, False]
    await delete(client, "slow-canaries")


async def test_percentages_are_of_the_instances_in_the_az_rounded_down(fake_world, tmp_path):
    _, client = fake_world
    first = tmp_path / "first"
    await deploy_ok(client, policy_manifest("percent", first, instances=5, azs=("z1",),
                                            update={"canaries": 1, "max_in_flight": 5}))
    # a recreate of all five: canaries 25% of 5 -> 1, max_in_flight 40% of 5 -> 2
    second = tmp_path / "second"
    task = await deploy_ok(client, policy_manifest("percent", second, instances=5, azs=("z1",), vm_type="medium",
                                                   update={"canaries": "25%", "max_in_flight": "40%"}))
    spans = intervals(second)
    assert sorted(spans) == [0, 1, 2, 3, 4]
    assert all(spans[i][0] >= spans[0][1] for i in (1, 2, 3, 4)), spans  # one canary, alone
    assert max_overlap(list(spans.values())) == 2, spans
    labels = await update_labels(client, task["id"])
    assert [label.endswith("(canary)") for label in labels] == [True, False, False, False, False]
    rows = await client.vms("percent")
    assert running(rows, 5) and {r["vm_type"] for r in rows} == {"medium"}
    await delete(client, "percent")


async def test_azs_are_updated_one_after_another_with_canaries_only_in_the_first(fake_world, tmp_path):
    _, client = fake_world
    events = tmp_path / "events"
    # z1: 0 (bootstrap), 2; z2: 1, 3. canaries 1, max_in_flight 2 (per AZ):
    # z1 -> 0 (canary) then 2; z2 -> 1 and 3 together.
    task = await deploy_ok(client, policy_manifest("zones", events, instances=4, azs=("z1", "z2"),
                                                   update={"canaries": 1, "max_in_flight": 2}))
    spans = intervals(events)
    rows = await client.vms("zones")
    assert [r["az"] for r in rows] == ["z1", "z2", "z1", "z2"]
    assert spans[2][0] >= spans[0][1]
    assert min(spans[1][0], spans[3][0]) >= spans[2][1]
    assert max_overlap([spans[1], spans[3]]) == 2
    labels = await update_labels(client, task["id"])
    assert [label.split(" ")[1] for label in labels] == ["(0)", "(2)", "(1)", "(3)"]
    assert labels[0].endswith("(canary)") and not any(label.endswith("(canary)") for label in labels[1:])
    await delete(client, "zones")


@pytest.mark.parametrize("serial", [True, False])
async def test_serial_is_about_instance_groups(fake_world, tmp_path, serial):
    _, client = fake_world
    events = tmp_path / "events"
    name = f"groups-{str(serial).lower()}"
    await deploy_ok(client, policy_manifest(name, events, instances=2, azs=("z1",), groups=("pg-a", "pg-b"),
                                            update={"canaries": 1, "max_in_flight": 1, "serial": serial}))
    # both groups have indexes 0 and 1: tell them apart by the order their lines were written
    lines = [line.split() for line in events.read_text().splitlines()]
    spans: list[tuple[float, float]] = [(float(a[2]), float(b[2])) for a, b in zip(lines[::2], lines[1::2],
                                                                                    strict=True)]
    assert len(spans) == 4
    # within a group one at a time either way (max_in_flight 1)
    if serial:
        assert max_overlap(spans) == 1, spans  # pg-a, then pg-b
    else:
        assert max_overlap(spans) == 2, spans  # pg-a and pg-b side by side, one instance each
    rows = await client.vms(name)
    assert running(rows, 4)
    await delete(client, name)


async def test_policy_numbers_are_worked_out_per_az_like_update_config():
    doc = yaml.safe_load(manifest("numbers"))
    doc["update"].update({"canaries": "25%", "max_in_flight": "10%"})
    policy = mf.parse(doc, mf.Cloud.parse(mf.DEFAULT_CLOUD_CONFIG)).groups[0].update
    assert [policy.canaries_for(n) for n in (1, 3, 4, 9)] == [0, 0, 1, 2]  # rounded down, may be 0
    assert [policy.max_in_flight_for(n) for n in (1, 9, 10, 25)] == [1, 1, 1, 2]  # at least 1
    doc["update"].update({"canaries": 3, "max_in_flight": 4})
    policy = mf.parse(doc, mf.Cloud.parse(mf.DEFAULT_CLOUD_CONFIG)).groups[0].update
    assert (policy.canaries_for(2), policy.canaries_for(5), policy.max_in_flight_for(2)) == (2, 3, 4)
    assert policy.serial is True
    doc["update"]["serial"] = "no"
    with pytest.raises(DirectorError, match="'serial'"):
        mf.parse(doc, mf.Cloud.parse(mf.DEFAULT_CLOUD_CONFIG))


async def test_vms_are_created_and_deleted_at_most_max_threads_at_a_time(short_tmp):
    """The Director creates missing VMs and deletes unneeded instances on thread pools of
    `director.max_threads` (vm_creator.rb, instance_deleter.rb; jobs/director/spec, default 32):
    with 2, five VMs boot two at a time, and a scale-down to one deletes four two at a time."""
    from .conftest import running_director
    from .helpers import FAKE_AGENT

    events = short_tmp / "events"
    async with running_director(short_tmp / "state", vm_root=short_tmp / "vms", agent_command=FAKE_AGENT,
                                max_threads=2, resurrection_delay=0.5, agent_timeout=1.0,
                                poll_interval=0.2) as (_, client):
        fake = {"boot_delay": 0.5, "shutdown_delay": 0.5, "events": str(events)}

        def sized(instances: int) -> str:
            doc = yaml.safe_load(manifest("pool", instances=instances, azs=("z1",)))
            doc["update"].update({"canaries": 5, "max_in_flight": 5})
            doc["instance_groups"][0]["jobs"][0]["properties"]["fake"] = fake
            return yaml.safe_dump(doc, sort_keys=False)

        await deploy_ok(client, sized(5))
        boots = list(intervals(events, "boot", "booted").values())
        assert len(boots) == 5 and max_overlap(boots) == 2, boots
        await deploy_ok(client, sized(1))
        shutdowns = list(intervals(events, "shutdown", "down").values())
        assert len(shutdowns) == 4 and max_overlap(shutdowns) == 2, shutdowns
        assert running(await client.vms("pool"), 1)
        await delete(client, "pool")


async def test_max_threads_must_be_positive(tmp_path):
    from controller.local.director.director import Engine

    with pytest.raises(ValueError, match="max_threads must be 1 or more, not 0"):
        Engine(tmp_path, max_threads=0)
