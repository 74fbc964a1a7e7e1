"""A small Director client for the tests: UAA token, 302 -> task, waiting, event and result output."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

FAKE_AGENT = [sys.executable, str(Path(__file__).with_name("fake_agent.py")), "--config"]


def manifest(name: str, *, instances: int = 3, vm_type: str = "small", disk_mb: int = 1024,
             azs: tuple[str, ...] = ("z1", "z2", "z3"), jobs: list[dict[str, Any]] | None = None,
             port: int = 5432, extra: dict[str, Any] | None = None) -> str:
    """The manifest shape of docs/local-world.md."""
    doc: dict[str, Any] = {
        "name": name,
        "releases": [{"name": "pgbosh", "version": "0.1.0"}],
        "stemcells": [{"alias": "default", "os": "ubuntu-jammy", "version": "latest"}],
        "update": {"canaries": 1, "max_in_flight": 1, "canary_watch_time": "1000-120000",
                   "update_watch_time": "1000-120000", "serial": True},
        "instance_groups": [{
            "name": "postgres", "azs": list(azs), "instances": instances, "vm_type": vm_type,
            "stemcell": "default", "persistent_disk": disk_mb, "networks": [{"name": "default"}],
            "jobs": jobs if jobs is not None else [{"name": "postgres", "release": "pgbosh", "properties": {
                "postgres": {"major_version": 15, "port": port, "parameters": {"max_connections": "50"},
                             "replication": {"mode": "async"}, "admin_user": "pgbosh_admin",
                             "admin_password": "((admin_password))",
                             "replication_password": "((replication_password))", "databases": [{"name": "app"}]},
                "repmgr": {"monitor_interval_secs": 1, "reconnect_attempts": 2, "reconnect_interval": 1,
                           "failover": "automatic", "priority_by_index": True},
                "consul": {"service": f"pg-{name}"[:63], "http_addr": ""},
            }}],
        }],
        "variables": [{"name": "admin_password", "type": "password"},
                      {"name": "replication_password", "type": "password"}],
    }
    if extra:
        doc.update(extra)
    return yaml.safe_dump(doc, sort_keys=False)


class Client:
    def __init__(self, info_path: Path) -> None:
        info = json.loads(info_path.read_text())
        self.url = info["url"]
        self.client_id, self.client_secret = info["client_id"], info["client_secret"]
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30, follow_redirects=False)
        self.token = ""

    async def login(self) -> None:
        resp = await self.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                                    auth=(self.client_id, self.client_secret), headers={"Accept": "application/json"})
        resp.raise_for_status()
        self.token = resp.json()["access_token"]

    async def close(self) -> None:
        await self.http.aclose()

    async def req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if not self.token:
            await self.login()
        headers = {"Authorization": f"bearer {self.token}", **kw.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kw)

    async def task_of(self, resp: httpx.Response) -> int:
        assert resp.status_code == 302, (resp.status_code, resp.text)
        location = resp.headers["Location"]
        assert location.startswith("/tasks/")
        return int(location.rsplit("/", 1)[1])

    async def wait(self, task_id: int, limit: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            task: dict[str, Any] = (await self.req("GET", f"/tasks/{task_id}")).json()
            if task["state"] in ("done", "error", "cancelled", "timeout"):
                return task
            assert time.monotonic() < deadline, f"task {task_id} still {task['state']}"
            await asyncio.sleep(0.1)

    async def deploy(self, text: str, *, limit: float = 120, **headers: str) -> dict[str, Any]:
        resp = await self.req("POST", "/deployments", content=text,
                              headers={"Content-Type": "text/yaml", **headers})
        return await self.wait(await self.task_of(resp), limit)

    async def output(self, task_id: int, kind: str) -> str:
        resp = await self.req("GET", f"/tasks/{task_id}/output", params={"type": kind})
        return "" if resp.status_code == 204 else resp.text

    async def events(self, task_id: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (await self.output(task_id, "event")).splitlines() if line]

    async def vms(self, deployment: str, kind: str = "vms") -> list[dict[str, Any]]:
        resp = await self.req("GET", f"/deployments/{deployment}/{kind}", params={"format": "full"})
        task = await self.wait(await self.task_of(resp))
        assert task["state"] == "done", task
        rows = [json.loads(line) for line in (await self.output(task["id"], "result")).splitlines() if line]
        return sorted(rows, key=lambda r: r["index"])

    async def wait_for(self, deployment: str, check: Any, limit: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + limit
        while True:
            rows = await self.vms(deployment, "instances")
            if check(rows):
                return rows
            assert time.monotonic() < deadline, f"timed out; last: {json.dumps(rows)[:2000]}"
            await asyncio.sleep(0.3)


def running(rows: list[dict[str, Any]], count: int) -> bool:
    return len(rows) == count and all(
        r["job_state"] == "running" and all(p["state"] == "running" for p in r["processes"]) for r in rows)
