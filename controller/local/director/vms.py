"""The "VMs" of the local director: one node-agent process per instance.

A VM is a directory (`<vm_root>/vms/<vm_cid>`) with `agent.json` and the agent's unix
socket, plus the agent process in its own session. Deleting a VM kills every process
that belongs to it, even ones the agent left behind when it was killed: the agent's
session, anything whose command line names the VM or its disk, and the postmaster
recorded in the disk's `postmaster.pid`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

import controller

AGENT_MODULE = "controller.node"


class AgentError(Exception):
    pass


def default_agent_command() -> list[str]:
    return [sys.executable, "-m", AGENT_MODULE, "agent", "--config"]


def write_private(path: Path, text: str) -> None:
    """Atomic write of a file only its owner can read."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, sid) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], int(fields[2]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def agent_alive(pid: int | None, config_path: Path) -> bool:
    """True when `pid` is a live agent started with `config_path` (guards against pid reuse)."""
    if not pid:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return False
    if stat[0] in ("Z", "X"):
        _reap(pid)
        return False
    return str(config_path) in _cmdline(pid)


def spawn_agent(command: list[str], vm_dir: Path) -> subprocess.Popen[bytes]:
    config = vm_dir / "agent.json"
    env = dict(os.environ)
    project_root = str(Path(controller.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH", "")) if p)
    log = open(vm_dir / "agent.stdout.log", "ab")
    try:
        return subprocess.Popen(
            [*command, str(config)], cwd=vm_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, close_fds=True,
        )
    finally:
        log.close()


def vm_processes(agent_pid: int | None, markers: Iterable[str], pidfiles: Iterable[Path]) -> set[int]:
    """Every process that belongs to a VM (see the module docstring)."""
    marks = [m for m in markers if m]
    found: set[int] = set()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        stat = _proc_stat(pid)
        if stat is None:
            continue
        if agent_pid and agent_pid in (stat[1], stat[2]):
            found.add(pid)
            continue
        cmd = _cmdline(pid)
        if cmd and any(m in cmd for m in marks):
            found.add(pid)
    for pidfile in pidfiles:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if _proc_stat(pid) is not None and "postgres" in _cmdline(pid):
                found.add(pid)
    if agent_pid and _proc_stat(agent_pid) is not None:
        found.add(agent_pid)
    return found


async def kill_vm(agent_pid: int | None, vm_dir: Path | None, disk_dir: Path | None, grace: float = 5.0) -> None:
    """Stop a VM's processes: SIGTERM the agent, SIGQUIT postmasters, then SIGKILL what is left."""
    markers = [str(p) for p in (vm_dir, disk_dir) if p is not None]
    pidfiles = [disk_dir / "postgres" / "data" / "postmaster.pid"] if disk_dir else []
    if agent_pid and vm_dir is not None:
        stat = _proc_stat(agent_pid)
        if stat is not None and stat[0] not in ("Z", "X") and str(vm_dir / "agent.json") not in _cmdline(agent_pid):
            agent_pid = None  # the pid now belongs to someone else: its session is not this VM's
    pids = vm_processes(agent_pid, markers, pidfiles)
    if not pids:
        return
    for pid in pids:
        sig = signal.SIGQUIT if "postgres" in _cmdline(pid) and "repmgr" not in _cmdline(pid) else signal.SIGTERM
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in list(pids):
            _reap(pid)
            stat = _proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                pids.discard(pid)
        if not pids:
            break
        await asyncio.sleep(0.05)
    for _ in range(3):
        pids = vm_processes(agent_pid, markers, pidfiles)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.1)
        for pid in pids:
            _reap(pid)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class AgentClient:
    """HTTP over the agent's unix socket (the API in docs/local-world.md)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def _request(self, method: str, path: str, limit: float) -> dict[str, Any]:
        if not self.socket_path.exists():
            raise AgentError(f"agent socket {self.socket_path} does not exist")
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=limit)) as s:
                async with s.request(method, f"http://agent{path}") as resp:
                    text = await resp.text()
                    if resp.status >= 300:
                        raise AgentError(f"agent answered {resp.status} to {method} {path}: {text[:200]}")
                    if not text.strip():
                        return {}
                    data = json.loads(text)
                    return data if isinstance(data, dict) else {"value": data}
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise AgentError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def status(self, limit: float) -> dict[str, Any]:
        return await self._request("GET", "/status", limit)

    async def start_jobs(self, limit: float) -> None:
        await self._request("POST", "/jobs/start", limit)

    async def stop_jobs(self, limit: float) -> None:
        await self._request("POST", "/jobs/stop", limit)

    async def shutdown(self, limit: float) -> None:
        await self._request("POST", "/shutdown", limit)
