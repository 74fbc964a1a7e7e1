"""`pgbosh broker serve --workers 2` as a process, against the local Kubernetes API: both
workers answer on one port, a killed worker is replaced, SIGTERM stops them all, and a
worker that cannot start (or a port in use) makes the command fail with a clear error."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from controller.broker import workers
from controller.local.kube import serve, write_kubeconfig

pytestmark = pytest.mark.skipif(not workers.supported(), reason="--workers needs Linux")

AUTH = ("cf", "workers-Secret-pw")
HEADERS = {"X-Broker-API-Version": "2.17"}
# "2026-... INFO [1234] controller.broker.server: broker listening on http://..."
LISTENING = re.compile(r"\[(\d+)\] controller\.broker\.server: broker listening on ")
STOPPED = re.compile(r"\[(\d+)\] controller\.broker\.server: broker on \S+ stopped")
ANSWERED = re.compile(r"\[(\d+)\] controller\.broker\.server: GET /v2/catalog -> 200")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def start(*args: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "broker", "serve", *args,
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def fails_silently(*args: str, log: Path) -> None:
    """`pgbosh broker serve ARGS` exits with 1 and announces nothing on stdout."""
    process = await start(*args, log=log)
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        await stop(process)
    assert process.returncode == 1
    assert stdout == b""


async def wait_for(predicate: object, timeout: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def catalog_many(url: str, count: int) -> None:
    # A new connection each time: the kernel spreads connections (not requests) over workers.
    for _ in range(count):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answer = await http.get("/v2/catalog", auth=AUTH, headers=HEADERS)
            assert answer.status_code == 200


@pytest.fixture
async def kubeconfig(tmp_path: Path) -> AsyncIterator[Path]:
    async with serve() as (_, url):
        path = tmp_path / "kubeconfig"
        write_kubeconfig(str(path), url)
        yield path


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "credentials"
    path.write_text(f"{AUTH[0]}:{AUTH[1]}\n")
    return path


async def start_two_workers(kubeconfig: Path, credentials: Path, log: Path) -> asyncio.subprocess.Process:
    return await start(
        "--listen", "127.0.0.1:0", "--kubeconfig", str(kubeconfig), "--credentials-file", str(credentials),
        "--workers", "2", log=log,
    )  # fmt: skip


async def test_two_workers_share_the_port_restart_and_stop(
    tmp_path: Path, kubeconfig: Path, credentials: Path
) -> None:
    log = tmp_path / "broker.log"
    process = await start_two_workers(kubeconfig, credentials, log)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert "2 workers" in line, line
        url = line.split("listening on ", 1)[1].split()[0]
        assert not url.endswith(":0")
        first = set(LISTENING.findall(log.read_text()))
        assert len(first) == 2 and str(process.pid) not in first

        await catalog_many(url, 40)
        answered = set(ANSWERED.findall(log.read_text()))
        assert answered == first, "both workers answer"

        # A worker that dies is replaced; requests keep succeeding.
        killed = int(sorted(first)[0])
        os.kill(killed, signal.SIGKILL)
        await wait_for(lambda: len(set(LISTENING.findall(log.read_text())) - first) == 1)
        (replacement,) = set(LISTENING.findall(log.read_text())) - first
        assert "was killed by SIGKILL; starting another" in log.read_text()
        await catalog_many(url, 40)
        assert set(ANSWERED.findall(log.read_text())) == first | {replacement}

        survivors = [int(pid) for pid in (first - {str(killed)}) | {replacement}]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=40) == 0
        assert not any(alive(pid) for pid in survivors), "SIGTERM stops every worker"
    finally:
        await stop(process)
    text = log.read_text()
    assert "SIGTERM: stopping 2 workers" in text
    # Each worker's last line, logged as its loop ends, is written before it exits.
    assert set(STOPPED.findall(text)) == {str(pid) for pid in survivors}
    assert AUTH[1] not in text
    with pytest.raises(httpx.ConnectError):
        await catalog_many(url, 1)


async def test_worker_follows_its_supervisor(tmp_path: Path, kubeconfig: Path, credentials: Path) -> None:
    """Killed without a chance to clean up, the supervisor leaves no worker holding the port."""
    log = tmp_path / "broker.log"
    process = await start_two_workers(kubeconfig, credentials, log)
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), timeout=60)
        pids = [int(pid) for pid in LISTENING.findall(log.read_text())]
        process.kill()
        await process.wait()
        await wait_for(lambda: not any(alive(pid) for pid in pids))
    finally:
        await stop(process)


async def test_port_in_use_fails_clearly(tmp_path: Path, kubeconfig: Path, credentials: Path) -> None:
    # Taken with SO_REUSEPORT, as another broker's workers would: ours must not join it.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "broker.log"
        await fails_silently(
            "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig),
            "--credentials-file", str(credentials), "--workers", "2", log=log,
        )  # fmt: skip
    assert f"pgbosh broker: cannot listen on 127.0.0.1:{port}: Address already in use" in log.read_text()


async def test_worker_that_cannot_start_fails_the_command(tmp_path: Path, kubeconfig: Path) -> None:
    log = tmp_path / "broker.log"
    await fails_silently(
        "--listen", "127.0.0.1:0", "--kubeconfig", str(kubeconfig),
        "--credentials-secret", "default/no-such-secret", "--workers", "2", log=log,
    )  # fmt: skip
    text = log.read_text()
    assert "pgbosh broker: worker 1: 404" in text
    assert "pgbosh broker: worker 1 (pid " in text and "could not start: it exited with code 1" in text


def test_workers_argument() -> None:
    from controller.cli import build_parser

    parser = build_parser()
    base = ["broker", "serve", "--credentials-file", "f"]
    assert parser.parse_args(base).workers == 1
    assert parser.parse_args([*base, "--workers", "3"]).workers == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--workers", bad])
