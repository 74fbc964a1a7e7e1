"""The node agent: one per VM. Reads agent.json, runs the `postgres` job and serves
the director on <vm_dir>/agent.sock (docs/local-world.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.node.config import AgentConfig, ConfigError, Peer, load_agent_config
from controller.node.job import PostgresJob
from controller.node.layout import NodeLayout
from controller.node.procinfo import CpuSampler, process_figures, vitals
from controller.node.runas import RunAs

log = logging.getLogger("controller.node")

ROLE_TIMEOUT = 2.0
ROLE_CACHE_SECONDS = 1.0


class Agent:
    def __init__(self, config: AgentConfig, job: PostgresJob | None) -> None:
        self.config = config
        self.job = job
        self.shutdown_requested = asyncio.Event()
        self._cpu = CpuSampler()
        self._role_cache: tuple[float, str] | None = None

    async def status(self) -> dict[str, Any]:
        processes: list[dict[str, Any]] = []
        role = "unknown"
        job_state = "stopped"
        if self.job is not None:
            job_state = self.job.job_state()
            for supervisor in self.job.supervisors:
                pid = supervisor.process.current_pid()
                entry: dict[str, Any] = {"name": supervisor.name, "state": supervisor.state.value}
                if pid is not None and supervisor.state.value != "stopped":
                    entry.update(process_figures(pid, self._cpu))
                else:
                    entry.update({"uptime": {"secs": 0}, "mem": {"kb": 0, "percent": 0.0}, "cpu": {"total": 0.0}})
                if supervisor.last_error:
                    entry["error"] = supervisor.last_error
                processes.append(entry)
            role = await self._role(self.job)
        result: dict[str, Any] = {
            "agent_id": self.config.agent_id,
            "job_state": job_state,
            "processes": processes,
            "vitals": vitals(self.config.vm_dir, self.config.persistent_disk),
            "role": role,
        }
        if self.job is not None and self.job.error:
            result["error"] = self.job.error
        return result

    async def _role(self, job: PostgresJob) -> str:
        # The director polls every agent twice a second; one query a second is plenty.
        now = time.monotonic()
        if self._role_cache is not None and now - self._role_cache[0] < ROLE_CACHE_SECONDS:
            return self._role_cache[1]
        role = "unknown"
        with contextlib.suppress(TimeoutError):
            role = await asyncio.wait_for(job.role(), ROLE_TIMEOUT)
        # "unknown" (PostgreSQL starting or down) is asked again next time: kept for a second,
        # it hid the role of a node that had just come up.
        self._role_cache = (time.monotonic(), role) if role != "unknown" else None
        return role

    async def start_jobs(self) -> None:
        if self.job is not None:
            self.job.start()

    async def stop_jobs(self) -> None:
        if self.job is not None:
            await self.job.stop()

    # --- HTTP ----------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/status", self._get_status)
        app.router.add_post("/jobs/start", self._post_start)
        app.router.add_post("/jobs/stop", self._post_stop)
        app.router.add_post("/shutdown", self._post_shutdown)
        return app

    async def _get_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def _post_start(self, request: web.Request) -> web.Response:
        # Returns at once; the director polls /status until job_state is running.
        await self.start_jobs()
        return web.json_response(await self.status())

    async def _post_stop(self, request: web.Request) -> web.Response:
        await self.stop_jobs()
        return web.json_response(await self.status())

    async def _post_shutdown(self, request: web.Request) -> web.Response:
        await self.stop_jobs()
        self.shutdown_requested.set()
        return web.json_response({"agent_id": self.config.agent_id, "job_state": "stopped"})


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _environment(layout: NodeLayout) -> dict[str, str]:
    env = {
        "PATH": f"{layout.bindir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(layout.vm_dir),
        "LANG": "C.UTF-8",
        "PGPASSFILE": str(layout.pgpass),
        "PGCONNECT_TIMEOUT": "5",
    }
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


def _current_peers(config_path: Path, started_with: AgentConfig) -> list[Peer]:
    """The other peers as agent.json lists them now (the director rewrites it when
    scaling); the start-up list if the file cannot be read."""
    try:
        config, _ = load_agent_config(config_path)
    except ConfigError as error:
        log.warning("keeping the previous peers: %s", error)
        return started_with.other_peers()
    return config.other_peers()


async def run_agent(config_path: Path) -> int:
    config, props = load_agent_config(config_path)
    config.vm_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(config.vm_dir / "agent.log")
    log.info(
        "agent %s for %s/%s index %d at %s",
        config.agent_id,
        config.deployment,
        config.instance_group,
        config.index,
        config.address,
    )
    job: PostgresJob | None = None
    if props is not None:
        layout = NodeLayout.for_config(config, props.postgres.major_version)
        run_as = RunAs.lookup(config.run_as, cwd=config.vm_dir, env=_environment(layout))
        job = PostgresJob(config, props, run_as, current_peers=functools.partial(_current_peers, config_path, config))
    agent = Agent(config, job)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.shutdown_requested.set)

    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    socket_path = config.vm_dir / "agent.sock"
    socket_path.unlink(missing_ok=True)
    site = web.UnixSite(runner, str(socket_path))
    await site.start()
    os.chmod(socket_path, 0o600)
    log.info("serving on %s", socket_path)
    try:
        # No job starts before the director's POST /jobs/start (docs/local-world.md).
        await agent.shutdown_requested.wait()
        log.info("shutting down")
        await agent.stop_jobs()
    finally:
        # Give an in-flight /shutdown response the chance to leave.
        await asyncio.sleep(0.1)
        await runner.cleanup()
        socket_path.unlink(missing_ok=True)
    log.info("agent exits")
    return 0


def main_agent(config_path: Path) -> int:
    try:
        return asyncio.run(run_agent(config_path))
    except (ConfigError, ValueError) as error:
        # ValueError: run_as is not a usable user. Neither message carries a value
        # of agent.json beyond names.
        print(f"pgbosh node agent: {error}", file=sys.stderr)
        return 2
