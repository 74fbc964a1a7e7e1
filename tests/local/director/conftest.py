"""Fixtures: a local director in-process on an ephemeral port, with the fake or the real agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from controller.local.director import LocalDirector

from .helpers import FAKE_AGENT, Client


async def kill_everything(director: LocalDirector) -> None:
    """Last-resort cleanup: every VM process the state knows about."""
    from controller.local.director.vms import kill_vm

    engine = director.engine
    for dep in engine.state.deployments.values():
        for inst in dep.instances:
            await kill_vm(inst.pid, engine.vm_root / "vms" / (inst.vm_cid or "none"),
                          engine.vm_root / "disks" / inst.disk_cid, grace=2)
    for rt in engine.runtime.values():
        if rt.popen is not None and rt.popen.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(rt.popen.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_director(state_dir: Path, **kw: object) -> AsyncIterator[tuple[LocalDirector, Client]]:
    director = LocalDirector(state_dir, **kw)  # type: ignore[arg-type]
    await director.start()
    client = Client(director.info_path)
    try:
        yield director, client
    finally:
        await client.close()
        await director.stop()
        await kill_everything(director)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: VM socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pgbd-", dir="/tmp"))
    path.chmod(0o755)  # so the default vm root stays inside it (the postgres user can traverse it)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fake_world() -> AsyncIterator[tuple[LocalDirector, Client]]:
    base = Path(tempfile.mkdtemp(prefix="pgbd-", dir="/tmp"))
    async with running_director(base / "state", vm_root=base / "vms", agent_command=FAKE_AGENT,
                                resurrection_delay=0.5, agent_timeout=1.0, poll_interval=0.2) as world:
        yield world
    shutil.rmtree(base, ignore_errors=True)
    await asyncio.sleep(0)
