"""`pgbosh broker serve` as a process: it starts, serves the catalog with the file's credentials, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
from pathlib import Path

import httpx
from ports import free_port

from controller.broker import cli
from controller.local.kube import serve, write_kubeconfig


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


class Recording(io.StringIO):
    """A stream that records each write (a write is one syscall on a real stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def batching_logger(stream: Recording) -> tuple[logging.Logger, cli.BatchingStreamHandler]:
    handler = cli.BatchingStreamHandler(stream)
    handler.setFormatter(cli._SecondsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(f"batching-test-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


async def test_log_lines_of_one_loop_turn_are_written_at_once() -> None:
    stream = Recording()
    logger, _ = batching_logger(stream)
    for n in range(50):  # a burst of requests answered in one turn of the loop
        logger.info("request %d", n)
    assert stream.writes == []  # nothing yet: the turn is not over
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(stream.writes) == 1 and stream.getvalue().count("\n") == 50
    assert stream.getvalue().splitlines()[49].endswith("INFO " + logger.name + ": request 49")

    logger.info("before a warning")
    logger.warning("trouble")  # a warning is written at once, with what came before it
    assert stream.getvalue().splitlines()[-2:][0].endswith("before a warning")
    assert stream.getvalue().rstrip().endswith("WARNING " + logger.name + ": trouble")


def test_log_lines_outside_a_loop_are_written_at_once() -> None:
    stream = Recording()
    logger, handler = batching_logger(stream)
    logger.info("no loop here")
    assert stream.writes and stream.getvalue().endswith(": no loop here\n")
    # The formatter's cached time reads as logging's own.
    record = logging.LogRecord("n", logging.INFO, "", 0, "m", None, None)
    assert handler.formatter is not None
    default = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    assert handler.formatter.format(record) == default.format(record)


async def test_log_lines_pending_at_shutdown_are_flushed() -> None:
    stream = Recording()
    logger, handler = batching_logger(stream)
    logger.info("last words")
    handler.flush()  # what logging.shutdown() does at exit
    assert stream.getvalue().endswith(": last words\n")
