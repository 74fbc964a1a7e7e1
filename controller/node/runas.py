"""Running PostgreSQL and repmgr programs as the unprivileged database user.

Python stays root; only the child becomes `run_as`, through setpriv, with a working
directory that user can enter. Commands never carry a password: libpq reads it from
the PGPASSFILE named in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OUTPUT_TAIL_CHARS = 2000


class CommandFailed(Exception):
    def __init__(self, program: str, returncode: int | None, output: str) -> None:
        self.program = program
        self.returncode = returncode
        self.output = output
        tail = output[-OUTPUT_TAIL_CHARS:].strip()
        super().__init__(f"{program} failed (exit {returncode}): {tail}")


@dataclass(frozen=True)
class RunAs:
    user: str
    uid: int
    gid: int
    cwd: Path
    env: Mapping[str, str]

    @classmethod
    def lookup(cls, user: str, cwd: Path, env: Mapping[str, str]) -> RunAs:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"run_as user {user!r} does not exist") from None
        if entry.pw_uid == 0:
            raise ValueError("run_as must be an unprivileged user, not root")
        return cls(user=user, uid=entry.pw_uid, gid=entry.pw_gid, cwd=cwd, env=dict(env))

    def command(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [
            setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *(str(arg) for arg in args),
        ]

    def chown(self, path: Path, mode: int) -> None:
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)

    def make_dir(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.chown(path, mode)

    def write_file(self, path: Path, content: str, mode: int) -> None:
        """Write atomically, owned by the user, never readable by others before chmod."""
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
        self.chown(tmp, mode)
        os.replace(tmp, path)

    async def spawn(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        stdout: int | None = None,
        stderr: int | None = None,
        stdin: int | None = asyncio.subprocess.DEVNULL,
    ) -> asyncio.subprocess.Process:
        argv = self.command(args)
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=self.cwd, env=dict(self.env)
        )

    async def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        time_limit: float,
        stdin_text: str | None = None,
        check: bool = True,
        quiet: bool = False,
    ) -> str:
        """Run to completion; output goes to the agent log (it holds no secrets: none
        are ever passed to these programs) and is returned."""
        program = Path(str(args[0])).name
        if not quiet:
            log.info("running %s", " ".join(str(arg) for arg in args))
        process = await self.spawn(
            args,
            stdin=asyncio.subprocess.PIPE if stdin_text is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(
                process.communicate(stdin_text.encode() if stdin_text is not None else None), time_limit
            )
        except TimeoutError:
            await _kill(process)
            raise CommandFailed(program, None, f"timed out after {time_limit:.0f} s") from None
        except asyncio.CancelledError:
            # A job stopped mid-clone must not leave repmgr/pg_basebackup running.
            await _kill(process)
            raise
        output = out.decode(errors="replace")
        if not quiet:
            for line in output.splitlines():
                log.info("%s: %s", program, line)
        if check and process.returncode != 0:
            raise CommandFailed(program, process.returncode, output)
        return output


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
