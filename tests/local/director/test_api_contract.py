"""The local director's HTTP answers compared with the real Director's shapes.

Sources (public repositories, read with the search tool):
- cloudfoundry/bosh src/bosh-director/lib/bosh/director/api/controllers/base_controller.rb
  (401 text + WWW-Authenticate, DirectorError -> {"code","description"} with its status)
- .../api/controllers/info_controller.rb (GET /info fields, no auth)
- .../api/controllers/deployments_controller.rb (list, get, post -> 302, instances, vms,
  jobs state PUT, resurrection PUT, diff, validate_instance_index_or_id)
- .../api/controllers/tasks_controller.rb (list filters, verbose=1 types, output 204/206/416)
- .../api/controllers/configs_controller.rb (latest required, sql_to_hash: content,id(str),type,name; 201)
- .../api/controllers/locks_controller.rb (type, resource, timeout, task_id)
- .../api/controllers/resurrection_controller.rb (PUT /resurrection -> 200)
- .../api/controllers/task_controller.rb (DELETE /task/:id -> 204 or 400 text), cloud_configs_controller.rb (legacy)
- .../api/task_manager.rb task_to_hash (id,state,description,timestamp,started_at,result,user,deployment,context_id)
- .../api/api_helper.rb validate_manifest_yml (BadManifest 440001), errors.rb codes
- .../jobs/vm_state.rb process_instance (format=full result fields)
- .../event_log.rb (stage, tags, total, task, index, state, progress, data.error; error lines)
- cloudfoundry/bosh-cli director/vms.go (VMInfo fields, vitals as strings, IsRunning),
  director/tasks.go (TaskResp: id, started_at, timestamp, state, user, deployment, description,
  result, context_id; verbose 1|2; DELETE /task/:id), director/info.go (InfoResp,
  user_authentication type + options, features[*].status)
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import yaml

from .helpers import manifest, running

pytestmark = pytest.mark.asyncio(loop_scope="module")

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TASK_KEYS = {"id", "state", "description", "timestamp", "started_at", "result", "user", "deployment", "context_id"}
VM_STATE_KEYS = {"vm_cid", "vm_created_at", "cloud_properties", "disk_cid", "disk_cids", "ips", "dns", "agent_id",
                 "job_name", "index", "job_state", "state", "resource_pool", "vm_type", "vitals", "processes",
                 "resurrection_paused", "az", "id", "bootstrap", "ignore"}


async def test_info_needs_no_auth_and_points_at_uaa(fake_world):
    director, client = fake_world
    resp = await client.http.get("/info")
    assert resp.status_code == 200
    info = resp.json()
    assert {"name", "uuid", "version", "user", "cpi", "user_authentication", "features"} <= set(info)
    assert info["user"] is None
    assert info["user_authentication"] == {"type": "uaa", "options": {"url": director.url, "urls": [director.url]}}
    authed = await client.req("GET", "/info")
    assert authed.json()["user"] == client.client_id


async def test_uaa_client_credentials(fake_world):
    _, client = fake_world
    ok = await client.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                                auth=(client.client_id, client.client_secret))
    assert ok.status_code == 200
    body = ok.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0 and body["access_token"].count(".") == 2
    bad = await client.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                                 auth=(client.client_id, "wrong"))
    assert bad.status_code == 401
    assert client.client_secret not in bad.text
    grant = await client.http.post("/oauth/token", data={"grant_type": "password"},
                                   auth=(client.client_id, client.client_secret))
    assert grant.status_code == 400


async def test_every_other_route_needs_a_bearer(fake_world):
    _, client = fake_world
    for path in ("/deployments", "/tasks", "/locks", "/configs?latest=true"):
        resp = await client.http.get(path)
        assert resp.status_code == 401
        assert resp.text == f"Not authorized: '{path.split('?')[0]}'\n"
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="BOSH Director"'
    forged = await client.http.get("/deployments", headers={"Authorization": "bearer a.b.c"})
    assert forged.status_code == 401


async def test_director_json_is_private(fake_world):
    director, _ = fake_world
    assert director.info_path.stat().st_mode & 0o777 == 0o600
    info = json.loads(director.info_path.read_text())
    assert info["url"] == director.url and info["client_secret"]


async def test_errors_have_the_directors_shape(fake_world):
    _, client = fake_world
    missing = await client.req("GET", "/deployments/nope")
    assert missing.status_code == 404
    assert missing.json() == {"code": 70000, "description": "Deployment 'nope' doesn't exist"}
    task = await client.req("GET", "/tasks/999999")
    assert task.status_code == 404 and task.json() == {"code": 10000, "description": "Task 999999 not found"}


async def test_cloud_config_default_and_replace(fake_world):
    _, client = fake_world
    need_latest = await client.req("GET", "/configs", params={"type": "cloud"})
    assert need_latest.status_code == 400 and set(need_latest.json()) == {"code", "description"}
    resp = await client.req("GET", "/configs", params={"type": "cloud", "latest": "true"})
    assert resp.status_code == 200
    [config] = resp.json()
    assert set(config) == {"content", "id", "type", "name"} and isinstance(config["id"], str)
    doc = yaml.safe_load(config["content"])
    assert [a["name"] for a in doc["azs"]] == ["z1", "z2", "z3"]
    assert [v["name"] for v in doc["vm_types"]] == ["small", "medium", "large"]
    assert {d["name"]: d["disk_size"] for d in doc["disk_types"]} == {"1GB": 1024, "5GB": 5120, "10GB": 10240}
    assert [n["name"] for n in doc["networks"]] == ["default"]
    doc["vm_types"].append({"name": "xlarge", "cloud_properties": {}})
    posted = await client.req("POST", "/configs", json={"type": "cloud", "name": "default",
                                                        "content": yaml.safe_dump(doc)})
    assert posted.status_code == 201 and int(posted.json()["id"]) > int(config["id"])
    again = await client.req("POST", "/configs", json={"type": "cloud", "name": "default",
                                                       "content": config["content"]})
    assert again.status_code == 201
    latest = (await client.req("GET", "/configs", params={"type": "cloud", "latest": "true"})).json()
    assert yaml.safe_load(latest[0]["content"]) == yaml.safe_load(config["content"])


async def test_bad_manifests_are_rejected_and_change_nothing(fake_world):
    _, client = fake_world
    not_yaml = await client.req("POST", "/deployments", content="name: [unclosed",
                                headers={"Content-Type": "text/yaml"})
    assert not_yaml.status_code == 400 and not_yaml.json()["code"] == 440001
    no_name = await client.req("POST", "/deployments", content=manifest("x").replace("name: x\n", "", 1),
                               headers={"Content-Type": "text/yaml"})
    assert no_name.status_code == 400
    assert no_name.json() == {"code": 40001, "description": "Deployment manifest must have a 'name' key"}
    cases = {
        "vm_type: small": ("vm_type: huge", "unknown vm type 'huge'"),
        "persistent_disk: 1024": ("persistent_disk_type: 3GB", "unknown disk type '3GB'"),
        "- z3": ("- z9", "unknown availability zone 'z9'"),
        "- name: postgres\n    release: pgbosh": ("- name: mysql\n    release: pgbosh", "unknown job"),
        "replication_password: ((replication_password))": ("replication_password: ((nowhere))",
                                                           "Failed to find variable '((nowhere))'"),
    }
    for old, (new, message) in cases.items():
        text = manifest("bad-one")
        assert old in text, old
        task = await client.deploy(text.replace(old, new, 1))
        assert task["state"] == "error", task
        assert message in task["result"]
        events = await client.events(task["id"])
        assert events[-1]["error"]["message"] == task["result"] and events[-1]["error"]["code"] > 0
        assert (await client.req("GET", "/deployments/bad-one")).status_code == 404
    assert all(d["name"] != "bad-one" for d in (await client.req("GET", "/deployments")).json())


async def test_deploy_reports_like_the_director(fake_world):
    director, client = fake_world
    resp = await client.req("POST", "/deployments", content=manifest("shapes"),
                            headers={"Content-Type": "text/yaml", "X-Bosh-Context-Id": "ctx-shapes"})
    task_id = await client.task_of(resp)
    assert resp.headers["Location"] == f"/tasks/{task_id}"
    task = await client.wait(task_id)
    assert set(task) == TASK_KEYS
    assert task["state"] == "done" and task["deployment"] == "shapes" and task["context_id"] == "ctx-shapes"
    assert task["description"] == "create deployment" and task["result"] == "/deployments/shapes"
    events = await client.events(task_id)
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages[0] == "Preparing deployment" and "Creating missing vms" in stages and "Updating instance" in stages
    for e in events:
        assert {"time", "stage", "tags", "total", "task", "index", "state", "progress"} <= set(e)
        assert e["state"] in ("started", "finished") and 0 <= e["progress"] <= 100
    updates = [e for e in events if e["stage"] == "Updating instance" and e["state"] == "started"]
    assert [u["index"] for u in updates] == [1, 2, 3] and updates[0]["tags"] == ["postgres"]
    assert updates[0]["task"].endswith("(0) (canary)") and "(canary)" not in updates[1]["task"]
    # serial, max_in_flight 1: each instance finishes before the next starts
    order = [(e["index"], e["state"]) for e in events if e["stage"] == "Updating instance"]
    assert order == [(1, "started"), (1, "finished"), (2, "started"), (2, "finished"), (3, "started"),
                     (3, "finished")]
    listed = (await client.req("GET", "/deployments")).json()
    entry = next(d for d in listed if d["name"] == "shapes")
    assert entry == {"name": "shapes", "releases": [{"name": "pgbosh", "version": "0.1.0"}],
                     "stemcells": [{"name": "ubuntu-jammy", "version": "latest"}], "cloud_config": "latest",
                     "teams": []}
    got = (await client.req("GET", "/deployments/shapes")).json()
    assert got == {"manifest": manifest("shapes")}
    assert "((replication_password))" in got["manifest"]

    rows = await client.vms("shapes")
    assert running(rows, 3)
    for row in rows:
        assert VM_STATE_KEYS <= set(row)
        assert UUID.match(row["id"]) and UUID.match(row["agent_id"]) and row["vm_cid"].startswith("vm-")
        assert row["disk_cids"] == [row["disk_cid"]] and row["state"] == "started" and row["vm_type"] == "small"
        assert set(row["vitals"]) >= {"cpu", "mem", "swap", "load", "uptime", "disk"}
        assert set(row["vitals"]["disk"]) == {"system", "ephemeral", "persistent"}
        assert {"name", "state", "uptime", "mem", "cpu"} <= set(row["processes"][0])
    assert [r["az"] for r in rows] == ["z1", "z2", "z3"]
    assert [r["bootstrap"] for r in rows] == [True, False, False]
    ips = [r["ips"][0] for r in rows]
    assert len(set(ips)) == 3 and all(ip.startswith("127.") for ip in ips)
    assert len({ip.rsplit(".", 1)[0] for ip in ips}) == 1
    plain = (await client.req("GET", "/deployments/shapes/instances")).json()
    assert {tuple(sorted(p)) for p in plain} == {tuple(sorted(["agent_id", "cid", "job", "index", "id", "az", "ips",
                                                               "vm_created_at", "expects_vm"]))}
    vms_plain = (await client.req("GET", "/deployments/shapes/vms")).json()
    assert len(vms_plain) == 3 and "expects_vm" not in vms_plain[0]

    # secrets: generated once, 0600, never in task output
    variables = director.state_dir / "variables.json"
    assert variables.stat().st_mode & 0o777 == 0o600
    assert (director.state_dir / "state.json").stat().st_mode & 0o777 == 0o600  # manifests may hold secrets
    secret = json.loads(variables.read_text())["shapes"]["replication_password"]
    assert len(secret) >= 20
    for kind in ("event", "result", "debug"):
        assert secret not in await client.output(task_id, kind)
    agent_json = director.engine.vm_root / "vms" / rows[0]["vm_cid"] / "agent.json"
    assert agent_json.stat().st_mode & 0o777 == 0o600
    props = json.loads(agent_json.read_text())["jobs"][0]["properties"]["postgres"]
    assert props["replication_password"] == secret and "((" not in json.dumps(props)
    again = await client.deploy(manifest("shapes"))
    assert again["state"] == "done"
    assert json.loads(variables.read_text())["shapes"]["replication_password"] == secret
    # an unchanged redeploy touches no VM
    assert [r["vm_cid"] for r in await client.vms("shapes")] == [r["vm_cid"] for r in rows]


async def test_tasks_list_filters_and_output_ranges(fake_world):
    _, client = fake_world
    await client.deploy(manifest("listing"), **{"X-Bosh-Context-Id": "ctx-list"})
    mine = (await client.req("GET", "/tasks", params={"context_id": "ctx-list"})).json()
    assert [t["context_id"] for t in mine] == ["ctx-list"] and set(mine[0]) == TASK_KEYS
    by_dep = (await client.req("GET", "/tasks", params={"deployment": "listing", "limit": "5"})).json()
    assert by_dep and all(t["deployment"] == "listing" for t in by_dep)
    ids = [t["id"] for t in (await client.req("GET", "/tasks")).json()]
    assert ids == sorted(ids, reverse=True)
    await client.vms("listing")
    verbose1 = {t["description"] for t in (await client.req("GET", "/tasks")).json()}
    verbose2 = {t["description"] for t in (await client.req("GET", "/tasks", params={"verbose": "2"})).json()}
    assert "retrieve vm-stats" not in verbose1 and "retrieve vm-stats" in verbose2
    done = (await client.req("GET", "/tasks", params={"state": "done", "deployment": "listing"})).json()
    assert all(t["state"] == "done" for t in done)

    task_id = mine[0]["id"]
    full = (await client.req("GET", f"/tasks/{task_id}/output", params={"type": "event"})).content
    part = await client.req("GET", f"/tasks/{task_id}/output", params={"type": "event"},
                            headers={"Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == full[10:]
    assert part.headers["Content-Range"] == f"bytes 10-{len(full) - 1}/{len(full)}"
    assert part.headers["Content-Type"].startswith("text/plain")
    past = await client.req("GET", f"/tasks/{task_id}/output", params={"type": "event"},
                            headers={"Range": f"bytes={len(full)}-"})
    assert past.status_code == 416
    empty = await client.req("GET", f"/tasks/{task_id}/output", params={"type": "result"})
    assert empty.status_code == 204  # a deploy writes no result output


async def test_locks_and_queueing(fake_world):
    _, client = fake_world
    first = await client.task_of(await client.req("POST", "/deployments", content=manifest("locked", instances=2),
                                                  headers={"Content-Type": "text/yaml"}))
    second = await client.task_of(await client.req("POST", "/deployments", content=manifest("locked", instances=1),
                                                   headers={"Content-Type": "text/yaml"}))
    seen_lock = seen_queue = False
    for _ in range(200):
        locks = (await client.req("GET", "/locks")).json()
        states = [(await client.req("GET", f"/tasks/{t}")).json()["state"] for t in (first, second)]
        if any(lock["resource"] == ["locked"] for lock in locks):
            lock = next(lock for lock in locks if lock["resource"] == ["locked"])
            assert lock["type"] == "deployment" and float(lock["timeout"]) > time.time()
            assert lock["task_id"] == str(first) or states[0] == "done"
            seen_lock = True
        if states == ["processing", "queued"]:
            seen_queue = True
        if states[1] == "done":
            break
        await asyncio.sleep(0.02)
    assert seen_lock and seen_queue
    assert (await client.wait(first))["state"] == "done" and (await client.wait(second))["state"] == "done"
    assert len(await client.vms("locked")) == 1
    assert all(lock["resource"] != ["locked"] for lock in (await client.req("GET", "/locks")).json())


async def test_diff(fake_world):
    _, client = fake_world
    await client.deploy(manifest("differ", instances=1))
    resp = await client.req("POST", "/deployments/differ/diff", content=manifest("differ", instances=2),
                            headers={"Content-Type": "text/yaml"})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"context", "diff"} and set(body["context"]) == {"cloud_config_ids", "runtime_config_ids"}
    changed = [(line.strip(), status) for line, status in body["diff"] if status]
    assert changed == [("instances: 1", "removed"), ("instances: 2", "added")]
    assert all(len(line) == 2 and line[1] in ("added", "removed", None) for line in body["diff"])


async def test_job_state_routes_validate_like_the_director(fake_world):
    _, client = fake_world
    await client.deploy(manifest("states", instances=1))
    bad = await client.req("PUT", "/deployments/states/jobs/postgres/not-an-id", params={"state": "stopped"},
                           headers={"Content-Type": "text/yaml"})
    assert bad.status_code == 400 and bad.json() == {"code": 70002,
                                                     "description": "Invalid instance index or id 'not-an-id'"}
    missing = await client.req("PUT", "/deployments/states/jobs/postgres/7", params={"state": "stopped"},
                               headers={"Content-Type": "text/yaml"})
    assert missing.status_code == 404 and missing.json()["code"] == 70001
    res = await client.req("PUT", "/resurrection", json={"resurrection_paused": False})
    assert res.status_code == 200
    per = await client.req("PUT", "/deployments/states/jobs/postgres/0/resurrection",
                           json={"resurrection_paused": True})
    assert per.status_code == 200
    rows = await client.vms("states")
    assert rows[0]["resurrection_paused"] is True


async def test_a_bad_manifest_for_a_running_deployment_changes_nothing(fake_world):
    """A bad manifest fails the deploy task in "Preparing deployment" (deployment_plan/planner_factory.rb
    validates before any step runs): the deployment's VMs and manifest stay as they were."""
    director, client = fake_world
    good = manifest("steady", instances=2)
    assert (await client.deploy(good))["state"] == "done"
    before = await client.vms("steady")
    pids = [next(i.pid for i in director.engine.state.deployments["steady"].instances if i.id == r["id"])
            for r in before]
    cases = [(good.replace("vm_type: small", "vm_type: huge", 1), "unknown vm type 'huge'"),
             (good.replace("- z2", "- z9", 1), "unknown availability zone 'z9'"),
             (good.replace("persistent_disk: 1024", "persistent_disk_type: 3GB", 1), "unknown disk type '3GB'")]
    for text, message in cases:
        assert text != good
        task = await client.deploy(text)
        assert task["state"] == "error" and message in task["result"], task
        assert "Instance group 'postgres'" in task["result"]
        events = await client.events(task["id"])
        assert {e["stage"] for e in events if "stage" in e} == {"Preparing deployment"}
        assert events[-1]["error"]["message"] == task["result"]
        after = await client.vms("steady")
        assert running(after, 2)
        assert [(r["id"], r["vm_cid"], r["disk_cid"], r["vm_type"]) for r in after] == \
            [(r["id"], r["vm_cid"], r["disk_cid"], r["vm_type"]) for r in before]
        assert [i.pid for i in sorted(director.engine.state.deployments["steady"].instances,
                                      key=lambda i: i.index)] == pids
        assert (await client.req("GET", "/deployments/steady")).json() == {"manifest": good}
    # and the deployment still takes a good manifest
    assert (await client.deploy(good))["state"] == "done"
    assert [r["vm_cid"] for r in await client.vms("steady")] == [r["vm_cid"] for r in before]


async def test_a_failed_deploy_reports_the_instance_and_keeps_the_last_good_manifest(fake_world):
    _, client = fake_world
    good = manifest("flaky", instances=1)
    assert (await client.deploy(good))["state"] == "done"
    doc = yaml.safe_load(good)
    doc["update"].update({"canary_watch_time": "100-1500", "update_watch_time": "100-1500"})
    doc["instance_groups"][0]["jobs"][0]["properties"]["fake"] = {"fail": True}
    task = await client.deploy(yaml.safe_dump(doc))
    assert task["state"] == "error"
    assert "is not running after update" in task["result"] and "postgres/" in task["result"]
    events = await client.events(task["id"])
    failed = [e for e in events if e.get("state") == "failed"]
    assert failed and failed[0]["stage"] == "Updating instance" and failed[0]["data"]["error"] == task["result"]
    assert events[-1]["error"] == {"code": 400007, "message": task["result"]}
    # GET still shows the last manifest that deployed, so a client comparing manifests retries
    assert (await client.req("GET", "/deployments/flaky")).json() == {"manifest": good}
    assert (await client.deploy(good))["state"] == "done"
    assert running(await client.vms("flaky"), 1)


async def test_cancel_a_queued_task(fake_world):
    """task_controller.rb: DELETE /task/:id -> 204; a finished task -> 400 with a text body."""
    _, client = fake_world
    first = await client.task_of(await client.req("POST", "/deployments", content=manifest("cancel", instances=1),
                                                  headers={"Content-Type": "text/yaml"}))
    second = await client.task_of(await client.req("POST", "/deployments", content=manifest("cancel", instances=2),
                                                   headers={"Content-Type": "text/yaml"}))
    resp = await client.req("DELETE", f"/task/{second}")
    assert resp.status_code == 204
    assert (await client.wait(second))["state"] == "cancelled"
    assert (await client.wait(first))["state"] == "done"
    late = await client.req("DELETE", f"/task/{first}")
    assert late.status_code == 400 and late.text == f"Cannot cancel task {first}: invalid state (done)"
    assert len(await client.vms("cancel")) == 1


async def test_smaller_routes(fake_world):
    """configs_controller.rb get '/:id'; deployments_controller.rb get jobs/:job/:index_or_id, variables,
    errands runs; cloud_configs_controller.rb (legacy list: properties, created_at)."""
    _, client = fake_world
    [latest] = (await client.req("GET", "/configs", params={"type": "cloud", "latest": "true"})).json()
    one = await client.req("GET", f"/configs/{latest['id']}")
    assert one.status_code == 200 and one.json() == latest
    assert (await client.req("GET", "/configs/abc")).status_code == 400
    legacy = (await client.req("GET", "/cloud_configs", params={"limit": "1"})).json()
    assert set(legacy[0]) == {"properties", "created_at"} and legacy[0]["properties"] == latest["content"]
    assert len(legacy) == 1 and legacy[0]["created_at"].endswith(" UTC")
    no_limit = await client.req("GET", "/cloud_configs")
    assert no_limit.status_code == 400 and no_limit.text == "limit is required"

    await client.deploy(manifest("small-routes", instances=1))
    [row] = await client.vms("small-routes")
    job = (await client.req("GET", f"/deployments/small-routes/jobs/postgres/{row['id']}")).json()
    assert job == {"deployment": "small-routes", "job": "postgres", "index": 0, "id": row["id"],
                   "state": "started", "disks": [row["disk_cid"]]}
    variables = (await client.req("GET", "/deployments/small-routes/variables")).json()
    assert {v["name"].rsplit("/", 1)[1] for v in variables} == {"admin_password", "replication_password"}
    assert all(set(v) == {"id", "name"} for v in variables)
    errand = await client.req("POST", "/deployments/small-routes/errands/smoke-tests/runs",
                              json={"keep-alive": False, "when-changed": False, "instances": []})
    task = await client.wait(await client.task_of(errand))
    assert task["state"] == "error" and "smoke-tests" in task["result"]
    assert task["description"] == "run errand smoke-tests from deployment small-routes"
