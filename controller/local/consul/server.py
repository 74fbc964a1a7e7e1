"""The local Consul-compatible agent: HTTP API, DNS and the timers, in one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from aiohttp import web

from controller.local.consul.dns import DNSServer, Resolver
from controller.local.consul.http import ConsulHTTP, PathOnlyAccessLogger
from controller.local.consul.state import Store

log = logging.getLogger(__name__)


class ConsulServer:
    """Run in-process: ``async with ConsulServer(http_port=0, dns_port=0) as consul: ...``.

    Port 0 picks a free port; after `start()` read `http_port`, `dns_port` and
    `http_addr` ("http://127.0.0.1:<port>"). `token`, when set, is required on every
    HTTP call except /v1/status/*; DNS answers need none (Consul's DNS uses the
    agent's own token).
    """

    def __init__(
        self,
        http_host: str = "127.0.0.1",
        http_port: int = 8500,
        dns_host: str = "127.0.0.1",
        dns_port: int = 8600,
        token: str | None = None,
        state_file: str | None = None,
        datacenter: str = "dc1",
        node_name: str = "pgbosh-local",
        dns_only_passing: bool = False,
        session_ttl_min: float = 10.0,
        tick_interval: float = 0.1,
    ) -> None:
        self.http_host, self.http_port = http_host, http_port
        self.dns_host, self.dns_port = dns_host, dns_port
        self.state_file = state_file
        self.tick_interval = tick_interval
        # the agent's own node address: what agent-registered services without an Address resolve to
        node_address = "127.0.0.1" if http_host in ("", "0.0.0.0", "::") else http_host
        self.store = Store(
            node_name=node_name,
            node_address=node_address,
            datacenter=datacenter,
            session_ttl_min=session_ttl_min,
        )
        self._http = ConsulHTTP(self.store, token)
        self._dns = DNSServer(Resolver(self.store, only_passing=dns_only_passing), dns_host, dns_port)
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def http_addr(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    async def start(self) -> None:
        if self.state_file and os.path.exists(self.state_file):
            self.store.load(self.state_file)
        self._runner = web.AppRunner(
            self._http.app,
            access_log_class=PathOnlyAccessLogger,
            access_log=logging.getLogger("pgbosh.consul.http"),
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http_host, self.http_port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.http_port = server.sockets[0].getsockname()[1]
        try:
            await self._dns.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.dns_port = self._dns.port
        self._ticker = asyncio.create_task(self._tick_forever(), name="consul-timers")

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.store.tick()
                if self.state_file and self.store.dirty:
                    self.store.save(self.state_file)
            except Exception:  # the timers must outlive one bad round
                log.exception("consul: timer round failed")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self._dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.state_file and self.store.dirty:
            self.store.save(self.state_file)

    async def __aenter__(self) -> ConsulServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


@contextlib.contextmanager
def serve_in_thread(**kwargs: Any) -> Iterator[ConsulServer]:
    """Run a ConsulServer on its own event loop in a daemon thread.

    For callers that are not async themselves (py-consul's sync client, node hooks
    under test): the server is started when the block begins and stopped after it.
    """
    loop = asyncio.new_event_loop()
    server_box: list[ConsulServer] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            server = ConsulServer(**kwargs)
            await server.start()
            server_box.append(server)

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server_box[0].stop())
        loop.close()

    thread = threading.Thread(target=main, name="consul-server", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if failure:
        raise failure[0]
    if not server_box:
        raise TimeoutError("consul: the server thread did not start in 30 s")
    try:
        yield server_box[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
