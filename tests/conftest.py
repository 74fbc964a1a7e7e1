"""Shared fixtures: the local Kubernetes API, and the real kopf operator against it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from controller.bosh.config import BoshConfig
from controller.bosh.types import Director
from controller.kube.client import KubeClient
from controller.local.kube import LocalKubernetes, serve, write_kubeconfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture
async def kube_api(tmp_path: Path) -> AsyncIterator[tuple[LocalKubernetes, str, str]]:
    """The local Kubernetes API on a loopback port: (emulator, url, kubeconfig path)."""
    async with serve() as (api, url):
        kubeconfig = str(tmp_path / "kubeconfig")
        write_kubeconfig(kubeconfig, url)
        yield api, url, kubeconfig


@pytest.fixture
async def kube(kube_api: tuple[LocalKubernetes, str, str]) -> AsyncIterator[KubeClient]:
    async with KubeClient(kube_api[1]) as client:
        yield client


@asynccontextmanager
async def running_operator(url: str, director: Director, **kwargs: Any) -> AsyncIterator[None]:
    from controller.operator.main import KubeConnection, run

    stop = asyncio.Event()
    ready = asyncio.Event()
    # The operator-core tests use a Director double whose VMs do not exist: no node probes, no Consul.
    kwargs.setdefault("probe_nodes", False)
    bosh = getattr(director, "config", None) or BoshConfig()
    bosh = bosh.with_changes(consul_http_addr=kwargs.pop("consul_http_addr", ""))
    task = asyncio.create_task(
        run(KubeConnection(server=url), bosh, director=director, stop_flag=stop, ready_flag=ready, **kwargs)
    )
    done, _ = await asyncio.wait([task, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            task.cancel()


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll an async or sync check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def kubectl_binary() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl is not installed: run scripts/setup (Debian: apt-get install kubernetes-client)")
    return found


_KUBECTL_MINOR: int | None = None


def kubectl_minor_version() -> int:
    global _KUBECTL_MINOR
    if _KUBECTL_MINOR is None:
        import json
        import subprocess

        out = subprocess.run([kubectl_binary(), "version", "--client", "-o", "json"], capture_output=True, text=True)
        minor = json.loads(out.stdout or "{}").get("clientVersion", {}).get("minor", "0")
        _KUBECTL_MINOR = int("".join(ch for ch in minor if ch.isdigit()) or 0)
    return _KUBECTL_MINOR


async def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    extra: list[str] = []
    if args and args[0] == "apply" and kubectl_minor_version() < 27:
        # kubectl before 1.27 validates with OpenAPI v2 in protobuf, which the local API does not
        # serve; the API server's own validation (the one under test) still refuses bad input.
        extra = ["--validate=false"]
    proc = await asyncio.create_subprocess_exec(
        kubectl_binary(),
        "--kubeconfig",
        kubeconfig,
        *args,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": os.path.dirname(kubeconfig)},
    )
    out, err = await proc.communicate(stdin.encode() if stdin else None)
    return proc.returncode or 0, out.decode(), err.decode()
