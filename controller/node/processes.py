"""The two processes of the `postgres` job: the postmaster and repmgrd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import psycopg

from controller.node.layout import NodeLayout
from controller.node.procinfo import pid_alive, process_name
from controller.node.runas import CommandFailed, RunAs

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0
REPMGRD_STOP_TIMEOUT = 10.0


class _Child:
    """A direct child we must reap, whose output is appended to a log file."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self._reaper: asyncio.Task[int] | None = None

    async def spawn(self, run_as: RunAs, args: list[str | os.PathLike[str]], log_file: Path) -> None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.chown(log_file, run_as.uid, run_as.gid)
            self.process = await run_as.spawn(args, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        self._reaper = asyncio.create_task(self.process.wait())

    def alive_pid(self) -> int | None:
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return None

    async def wait(self, time_limit: float) -> bool:
        if self._reaper is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._reaper), time_limit)
        except TimeoutError:
            return False
        return True


class PostgresServer:
    """The postmaster, started in the foreground as our child so that it lives in the
    VM's process group (pg_ctl would setsid() it away from the director's kill)."""

    name = "postgres"

    def __init__(self, layout: NodeLayout, run_as: RunAs, port: int) -> None:
        self.layout = layout
        self.run_as = run_as
        self.port = port
        self._child = _Child()

    def pid_from_file(self) -> int | None:
        try:
            first_line = (self.layout.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first_line)
        except (OSError, IndexError, ValueError):
            return None

    def current_pid(self) -> int | None:
        child = self._child.alive_pid()
        if child is not None:
            return child
        pid = self.pid_from_file()
        # A stale postmaster.pid (SIGKILL) may name a pid reused by something else.
        if pid is not None and pid_alive(pid) and process_name(pid) == "postgres":
            return pid
        return None

    def is_our_child(self) -> bool:
        return self._child.alive_pid() is not None

    async def launch(self) -> None:
        await self._child.spawn(
            self.run_as, [self.layout.binary("postgres"), "-D", self.layout.data_dir], self.layout.postgres_log
        )

    async def ready(self) -> bool:
        try:
            await self.run_as.run(
                [
                    self.layout.binary("pg_isready"),
                    "-q",
                    "-h",
                    self.layout.socket_dir,
                    "-p",
                    str(self.port),
                    "-t",
                    "2",
                ],
                time_limit=5,
                quiet=True,
            )
        except CommandFailed:
            return False
        return True

    async def terminate(self) -> None:
        if self.current_pid() is None:
            return
        try:
            await self.run_as.run(
                [
                    self.layout.binary("pg_ctl"),
                    "-D",
                    self.layout.data_dir,
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(STOP_TIMEOUT)),
                    "stop",
                ],
                time_limit=STOP_TIMEOUT + 5,
            )
        except CommandFailed as error:
            log.warning("fast stop failed (%s); stopping postgres immediately", error)
            pid = self.current_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
        await self._child.wait(10)

    async def connect(self, dbname: str = "postgres") -> psycopg.AsyncConnection[tuple[object, ...]]:
        """Local superuser session over the unix socket (peer, ident map root -> run_as)."""
        return await psycopg.AsyncConnection.connect(
            host=str(self.layout.socket_dir),
            port=self.port,
            user=self.run_as.user,
            dbname=dbname,
            connect_timeout=3,
            autocommit=True,
        )

    async def in_recovery(self) -> bool | None:
        try:
            async with await self.connect() as conn:
                cursor = await conn.execute("SELECT pg_is_in_recovery()")
                row = await cursor.fetchone()
        except psycopg.Error:
            return None
        return bool(row[0]) if row else None


class RepmgrDaemon:
    """repmgrd in the foreground (--daemonize=false): a direct child we supervise."""

    name = "repmgrd"

    def __init__(self, layout: NodeLayout, run_as: RunAs) -> None:
        self.layout = layout
        self.run_as = run_as
        self._child = _Child()

    def current_pid(self) -> int | None:
        return self._child.alive_pid()

    async def launch(self) -> None:
        # A pid file left by a repmgrd that died with its VM would stop this one.
        pid_file = self.layout.repmgrd_pid_file
        with contextlib.suppress(OSError, ValueError):
            old = int(pid_file.read_text().strip())
            if not pid_alive(old):
                pid_file.unlink()
        await self._child.spawn(
            self.run_as,
            [self.layout.binary("repmgrd"), "-f", self.layout.repmgr_conf, "--daemonize=false"],
            self.layout.repmgr_log,
        )

    async def ready(self) -> bool:
        return self.current_pid() is not None

    async def terminate(self) -> None:
        process = self._child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        if not await self._child.wait(REPMGRD_STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await self._child.wait(5)
