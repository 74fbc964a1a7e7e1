"""Monit-like supervision of one job process: restart with backoff when it dies.

The process itself is behind a small protocol so that the same loop watches the
postmaster (whose pid comes from postmaster.pid: repmgr may restart it with pg_ctl)
and repmgrd (a direct child).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class ProcessState(enum.StrEnum):
    RUNNING = "running"
    FAILING = "failing"
    STOPPED = "stopped"
    STARTING = "starting"


class ManagedProcess(Protocol):
    name: str

    async def launch(self) -> None:
        """Start the process; return once it is launched (not necessarily ready)."""

    def current_pid(self) -> int | None:
        """The pid of the live process, or None."""

    async def ready(self) -> bool:
        """True once the process serves (postgres accepts connections)."""

    async def terminate(self) -> None:
        """Stop it gracefully (and forcefully after a timeout)."""


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    maximum: float = 30.0
    # A process that ran this long is healthy again: the next failure starts over.
    reset_after: float = 60.0
    # Down this long before we act: repmgr's own pg_ctl restart leaves a short gap.
    grace: float = 1.0
    poll: float = 0.5
    ready_timeout: float = 120.0


class Supervisor:
    def __init__(
        self,
        process: ManagedProcess,
        backoff: Backoff | None = None,
        *,
        may_restart: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``may_restart`` is asked before a process that died is started again; False: it is
        not, and supervision ends (whoever said no takes over)."""
        self.process = process
        self.backoff = backoff or Backoff()
        self.may_restart = may_restart
        self.state = ProcessState.STOPPED
        self.restarts = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._running_since: float | None = None

    @property
    def name(self) -> str:
        return self.process.name

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.state = ProcessState.STARTING
            self._task = asyncio.create_task(self._loop(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        """Stop supervising, then stop the process."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.process.terminate()
        self.state = ProcessState.STOPPED

    async def wait_running(self, time_limit: float) -> None:
        deadline = time.monotonic() + time_limit
        while self.state != ProcessState.RUNNING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not running after {time_limit:.0f} s: {self.last_error}")
            await asyncio.sleep(0.2)

    async def _loop(self) -> None:
        delay = self.backoff.initial
        down_since: float | None = None
        first = True
        while True:
            pid = self.process.current_pid()
            if pid is not None:
                down_since = None
                if self.state != ProcessState.RUNNING:
                    if await self.process.ready():
                        self.state = ProcessState.RUNNING
                        self._running_since = time.monotonic()
                        self.last_error = None
                        log.info("%s is running (pid %d)", self.name, pid)
                elif (
                    self._running_since is not None
                    and time.monotonic() - self._running_since > self.backoff.reset_after
                ):
                    delay = self.backoff.initial
                await asyncio.sleep(self.backoff.poll)
                continue

            now = time.monotonic()
            if not first:
                if down_since is None:
                    down_since = now
                    if self.state in (ProcessState.RUNNING, ProcessState.STARTING):
                        log.warning("%s is not running", self.name)
                    self.state = ProcessState.FAILING
                    self.last_error = self.last_error or "process exited"
                if now - down_since < self.backoff.grace:
                    await asyncio.sleep(self.backoff.poll)
                    continue
                log.info("restarting %s in %.1f s", self.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff.maximum)
                self.restarts += 1
                if self.process.current_pid() is not None:
                    continue  # someone else (repmgr's pg_ctl) started it meanwhile
                if self.may_restart is not None and not await self.may_restart():
                    self.last_error = "not restarted: see the log"
                    log.warning("%s not restarted here", self.name)
                    return
            first = False
            down_since = None
            try:
                await self.process.launch()
            except Exception as error:
                self.state = ProcessState.FAILING
                self.last_error = str(error)
                log.warning("%s failed to start: %s", self.name, error)
                down_since = time.monotonic()
                continue
            if self.state != ProcessState.FAILING:
                self.state = ProcessState.STARTING
            await self._await_ready()

    async def _await_ready(self) -> None:
        deadline = time.monotonic() + self.backoff.ready_timeout
        while time.monotonic() < deadline:
            if self.process.current_pid() is None:
                self.state = ProcessState.FAILING
                self.last_error = "exited while starting"
                return
            if await self.process.ready():
                self.state = ProcessState.RUNNING
                self._running_since = time.monotonic()
                self.last_error = None
                log.info("%s is running (pid %s)", self.name, self.process.current_pid())
                return
            await asyncio.sleep(self.backoff.poll)
        self.last_error = "not ready in time"
