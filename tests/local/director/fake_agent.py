"""A test-only node agent: the socket API of docs/local-world.md with `sleep` as its job.

It lets the director's lifecycle tests run in seconds without PostgreSQL. The "job" is
a `sleep` child in the agent's session (so killing the VM must find it), restarted when
it dies like monit would. Each start appends a line to `<disk>/data/boots` so tests can
see that a recreated VM got the old disk.

Job properties under `fake`: `fail` (the job exits at once, forever), `start_delay`
(seconds a started job stays "starting" before it is "running"), and `events` (a file
shared by the instances: each start of the job appends `<index> start <t>` and
`<index> ready <t + start_delay>`, so tests can measure how many instances the director
updated at once). `boot_delay` (seconds the agent takes to answer after its VM starts)
and `shutdown_delay` (seconds a shutdown takes) log `<index> boot|booted <t>` and
`<index> shutdown|down <t>` to the same file: how many VMs the director creates and
deletes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web


class FakeAgent:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.vm_dir = Path(config["vm_dir"])
        self.data = Path(config["persistent_disk"]) / "data"
        self.child: subprocess.Popen[bytes] | None = None
        self.wanted = False
        self.started_at = 0.0
        self.restarts = 0
        self.ready_at = 0.0
        self.done = asyncio.Event()

    def _props(self) -> dict[str, Any]:
        props = self.config["jobs"][0]["properties"] if self.config["jobs"] else {}
        fake = props.get("fake") or {}
        return fake if isinstance(fake, dict) else {}

    def _spawn(self) -> None:
        if self._props().get("fail"):  # a job that exits at once, forever failing
            self.child = subprocess.Popen(["true"])
            return
        self.child = subprocess.Popen(["sleep", "infinity"])
        self.started_at = time.time()

    def _alive(self) -> bool:
        return self.child is not None and self.child.poll() is None

    async def monit(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.wanted and not self._alive():
                self.restarts += 1
                self._spawn()

    def state(self) -> str:
        if not self.wanted:
            return "stopped"
        if time.time() < self.ready_at:
            return "starting"
        return "running" if self._alive() else "failing"

    async def status(self, _: web.Request) -> web.Response:
        state = self.state()
        procs = [{"name": "postgres", "state": state, "uptime": {"secs": int(time.time() - self.started_at)},
                  "mem": {"kb": 1024, "percent": 0.1}, "cpu": {"total": 0.0}}]
        return web.json_response({"agent_id": self.config["agent_id"], "job_state": state, "processes": procs,
                                  "vitals": {"uptime": {"secs": 1}},
                                  "role": "primary" if self.config["bootstrap"] else "standby",
                                  "restarts": self.restarts, "pid": self.child.pid if self.child else None})

    async def start(self, _: web.Request) -> web.Response:
        if not self.wanted:
            self.data.mkdir(parents=True, exist_ok=True)
            self._record_boot()
            self._record_start()
            self.wanted = True
            if not self._alive():
                self._spawn()
        return web.json_response({"job_state": self.state()})

    def _record_boot(self) -> None:
        with open(self.data / "boots", "a") as out:
            out.write(f"{self.config['id']} {self.config['address']} {self.config['index']}\n")

    def _record_start(self) -> None:
        now = time.time()
        self.ready_at = now + float(self._props().get("start_delay") or 0)
        self.record("start", "ready", now, self.ready_at)

    def _stop_child(self) -> None:
        self.wanted = False
        if self._alive():
            assert self.child is not None
            self.child.terminate()
            self.child.wait()

    async def stop(self, _: web.Request) -> web.Response:
        self._stop_child()
        return web.json_response({"job_state": "stopped"})

    def record(self, first: str, second: str, begin: float, end: float) -> None:
        """`<index> <first> <begin>` and `<index> <second> <end>` in the events file."""
        if self._props().get("events"):
            with open(self._props()["events"], "a") as out:  # one write: lines of two agents never mix
                out.write(f"{self.config['index']} {first} {begin:.6f}\n{self.config['index']} {second} "
                          f"{end:.6f}\n")

    async def shutdown(self, _: web.Request) -> web.Response:
        delay = float(self._props().get("shutdown_delay") or 0)
        if delay:
            now = time.time()
            self.record("shutdown", "down", now, now + delay)
            await asyncio.sleep(delay)
        self._stop_child()
        asyncio.get_running_loop().call_later(0.05, self.done.set)
        return web.json_response({"job_state": "stopped"})


async def main(config: dict[str, Any]) -> None:
    if (Path(config["persistent_disk"]) / "data" / "crash").exists():
        raise SystemExit("crash marker on the disk: this VM cannot boot")
    agent = FakeAgent(config)
    boot_delay = float(agent._props().get("boot_delay") or 0)
    if boot_delay:
        now = time.time()
        agent.record("boot", "booted", now, now + boot_delay)
        await asyncio.sleep(boot_delay)
    app = web.Application()
    app.router.add_get("/status", agent.status)
    app.router.add_post("/jobs/start", agent.start)
    app.router.add_post("/jobs/stop", agent.stop)
    app.router.add_post("/shutdown", agent.shutdown)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = Path(config["vm_dir"]) / "agent.sock"
    if sock.exists():
        sock.unlink()
    await web.UnixSite(runner, str(sock)).start()
    if os.environ.get("FAKE_AGENT_AUTOSTART") == "1":
        await agent.start(None)  # type: ignore[arg-type]
    monit = asyncio.create_task(agent.monit())
    await agent.done.wait()
    monit.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    asyncio.run(main(json.loads(Path(args.config).read_text())))
    sys.exit(0)
