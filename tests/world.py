"""The local world for end-to-end tests: director (real PostgreSQL VMs), Consul, operator."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from conftest import running_operator

from controller.bosh.client import DirectorClient
from controller.bosh.config import BoshConfig, Secret
from controller.local.consul import ConsulServer
from controller.local.director import LocalDirector
from controller.local.director.vms import kill_vm


@contextlib.asynccontextmanager
async def local_director(resurrection_delay: float = 1.0) -> AsyncIterator[LocalDirector]:
    base = Path(tempfile.mkdtemp(prefix="pgbe-", dir="/tmp"))
    base.chmod(0o755)  # the database user must traverse to its disks
    director = LocalDirector(base / "state", vm_root=base / "vms", resurrection_delay=resurrection_delay)
    await director.start()
    try:
        yield director
    except BaseException:
        _keep_vm_logs(base)
        raise
    finally:
        await director.stop(stop_vms=True)
        engine = director.engine
        for dep in engine.state.deployments.values():
            for inst in dep.instances:
                await kill_vm(
                    inst.pid,
                    engine.vm_root / "vms" / (inst.vm_cid or "none"),
                    engine.vm_root / "disks" / inst.disk_cid,
                    grace=2,
                )
        shutil.rmtree(base, ignore_errors=True)


def _keep_vm_logs(base: Path) -> None:
    """A failed test's VMs are removed with their logs: keep the agents', PostgreSQL's and
    repmgr's logs (no data, no secrets: the agents never log them) for the post-mortem."""
    kept = Path(tempfile.gettempdir()) / f"pgbosh-failed-{base.name}"
    for vm in base.glob("vms/vms/*"):
        target = kept / vm.name
        target.mkdir(parents=True, exist_ok=True)
        for log in [*vm.glob("*.log"), *vm.glob("log/*.log")]:
            shutil.copy2(log, target / log.name)
    print(f"VM logs of the failed test kept in {kept}")


@dataclass
class World:
    director: LocalDirector
    consul: ConsulServer


@contextlib.asynccontextmanager
async def local_world(kube_url: str, resync: float = 2.0) -> AsyncIterator[World]:
    """Director, Consul and the in-process operator driving them with the production clients."""
    async with local_director() as director, ConsulServer(http_port=0, dns_port=0) as consul:
        bosh = BoshConfig(
            director_url=director.url,
            client_id=director.client_id,
            client_secret=Secret(director.client_secret),
            consul_http_addr=consul.http_addr,
        )
        async with (
            DirectorClient(bosh) as client,
            running_operator(
                kube_url, client, consul_http_addr=consul.http_addr, probe_nodes=True, resync_seconds=resync
            ),
        ):
            yield World(director, consul)


async def dig(port: int, name: str, rtype: str = "A") -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(port), name, rtype, "+short", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return sorted(out.decode().split())
