"""`pgbosh broker serve` as a process: it starts, serves the catalog with the file's credentials, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import httpx

from controller.broker import cli
from controller.local.kube import serve, write_kubeconfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_listen_parsing() -> None:
    assert cli._listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert cli._listen("[::1]:9000") == ("::1", 9000)


async def test_serve_process(tmp_path: Path) -> None:
    credentials = tmp_path / "broker-credentials.yaml"
    credentials.write_text("username: cf\npassword: cli-Secret-pw\n")
    port = free_port()
    async with serve() as (_, url):
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(str(kubeconfig), url)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "broker", "serve",
            "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig),
            "--credentials-file", str(credentials),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
            assert f"listening on http://127.0.0.1:{port}" in line.decode()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                ok = await http.get(
                    "/v2/catalog", auth=("cf", "cli-Secret-pw"), headers={"X-Broker-API-Version": "2.17"}
                )
                assert ok.status_code == 200 and ok.json()["services"][0]["name"] == "postgresql"
                denied = await http.get("/v2/catalog", auth=("cf", "nope"), headers={"X-Broker-API-Version": "2.17"})
                assert denied.status_code == 401
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert "GET /v2/catalog -> 200" in log
        assert "cli-Secret-pw" not in log


async def test_serve_without_credentials_file_fails(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "broker", "serve", "--server", "http://127.0.0.1:9",
        "--credentials-file", str(tmp_path / "missing"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    assert "pgbosh broker:" in stderr.decode()


async def test_a_serving_broker_freezes_start_up_objects_and_collects_rarely() -> None:
    """Start-up objects are frozen out of the collector and young collections run every
    GC_YOUNG_THRESHOLD allocations, not Python's 700 (measured in controller/broker/README.md)."""
    import argparse
    import gc
    import os

    from controller.broker.config import BrokerConfig
    from controller.broker.server import BasicCredentials

    saved = gc.get_threshold()
    seen: dict[str, object] = {}

    def ready(server: object) -> None:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)  # the broker's own handler stops it

    try:
        async with serve() as (_, url):
            args = argparse.Namespace(server=url, kubeconfig=None, credentials_secret=None)
            config = BrokerConfig.load()
            code = await cli.serve(args, config, BasicCredentials("u", "p"), "127.0.0.1", 0, ready=ready)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
    assert code == 0
    assert seen["threshold"] == (cli.GC_YOUNG_THRESHOLD, *saved[1:])
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 10_000
