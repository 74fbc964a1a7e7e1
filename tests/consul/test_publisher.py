"""ConsulPublisher and publish_primary_sync against the local Consul, followed with `dig`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import Iterator

import consul
import pytest

from controller.consul.publisher import (
    ConsulPublisher,
    ConsulPublishError,
    master_id,
    publish_primary_sync,
)
from controller.consul.types import Member, PrimaryPublisher, Published
from controller.local.consul import ConsulServer, serve_in_thread

DIG = shutil.which("dig") or "/usr/bin/dig"
SERVICE = "pg-default-demo"
TOKEN = "publisher-token-xyz"


def dig_short(server: ConsulServer, name: str, qtype: str = "A") -> list[str]:
    out = subprocess.run(
        [DIG, "@127.0.0.1", "-p", str(server.dns_port), "+time=2", "+tries=1", name, qtype, "+short"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return sorted(line for line in out.stdout.splitlines() if line)


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with serve_in_thread(http_port=0, dns_port=0, token=TOKEN) as srv:
        yield srv


async def test_publish_moves_master_and_dig_follows(server: ConsulServer) -> None:
    a, b, c = Member("127.0.1.10", 5432), Member("127.0.1.11", 5432), Member("127.0.1.12", 5432)
    async with ConsulPublisher(server.http_addr, token=TOKEN, timeout=5) as pub:
        _: PrimaryPublisher = pub  # satisfies the protocol the operator depends on
        await pub.publish(SERVICE, a, [b, c])
        assert await pub.published(SERVICE) == Published(primary=(a,), replicas=(b, c))
        master = f"master.{SERVICE}.service.consul"
        assert await asyncio.to_thread(dig_short, server, master) == ["127.0.1.10"]
        replicas = await asyncio.to_thread(dig_short, server, f"replica.{SERVICE}.service.consul")
        assert replicas == ["127.0.1.11", "127.0.1.12"]

        # failover: b becomes primary, a is gone
        await pub.publish(SERVICE, b, [c])
        assert await pub.published(SERVICE) == Published(primary=(b,), replicas=(c,))
        assert await asyncio.to_thread(dig_short, server, master) == ["127.0.1.11"]
        srv = await asyncio.to_thread(dig_short, server, master, "SRV")
        assert srv == ["1 1 5432 7f00010b.addr.dc1.consul."]
        assert await asyncio.to_thread(dig_short, server, f"replica.{SERVICE}.service.consul") == ["127.0.1.12"]

        # the old primary rejoins as a replica; publishing again is idempotent
        await pub.publish(SERVICE, b, [a, c])
        await pub.publish(SERVICE, b, [a, c])
        assert await pub.published(SERVICE) == Published(primary=(b,), replicas=(a, c))

        await pub.publish(SERVICE, None, [a, c])
        assert (await pub.published(SERVICE)).primary == ()
        assert await asyncio.to_thread(dig_short, server, master) == []

        await pub.withdraw(SERVICE)
        assert await pub.published(SERVICE) == Published(primary=(), replicas=())


async def test_never_two_masters_while_moving(server: ConsulServer) -> None:
    """Watch the catalog with blocking queries while the master moves back and forth."""
    members = [Member(f"127.0.2.{n}", 5432) for n in range(10, 14)]
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        c = consul.Consul(port=server.http_port, token=TOKEN)
        index = None
        while not stop.is_set():
            index, entries = c.health.service(SERVICE, tag="master", passing=True, index=index, wait="200ms")
            seen.append(len(entries))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    async with ConsulPublisher(server.http_addr, token=TOKEN) as pub:
        for i in range(8):
            primary = members[i % len(members)]
            await pub.publish(SERVICE, primary, [m for m in members if m != primary])
            assert await asyncio.to_thread(dig_short, server, f"master.{SERVICE}.service.consul") == [primary.address]
    stop.set()
    watcher.join(timeout=5)
    assert seen and max(seen) == 1


def test_publish_primary_sync_for_the_promote_hook(server: ConsulServer) -> None:
    old, new = Member("127.0.3.10", 5432), Member("127.0.3.11", 5433)

    async def setup() -> None:
        async with ConsulPublisher(server.http_addr, token=TOKEN) as pub:
            await pub.publish(SERVICE, old, [new])

    asyncio.run(setup())
    publish_primary_sync(server.http_addr, SERVICE, new.address, new.port, token=TOKEN, timeout=5)
    assert dig_short(server, f"master.{SERVICE}.service.consul") == ["127.0.3.11"]
    assert dig_short(server, f"master.{SERVICE}.service.consul", "SRV") == ["1 1 5433 7f00030b.addr.dc1.consul."]
    # the promoted node's replica record is gone, so it is not both at once
    assert dig_short(server, f"replica.{SERVICE}.service.consul") == []
    c = consul.Consul(port=server.http_port, token=TOKEN)
    (entry,) = c.catalog.service(SERVICE, tag="master")[1]
    assert entry["ServiceID"] == master_id(SERVICE)


async def test_errors_are_clear_and_never_show_the_token(server: ConsulServer) -> None:
    wrong = "wrong-token-that-must-not-leak"
    async with ConsulPublisher(server.http_addr, token=wrong, timeout=5) as pub:
        with pytest.raises(ConsulPublishError) as err:
            await pub.publish(SERVICE, Member("127.0.4.10"), [])
    assert "ACL not found" in str(err.value)
    assert wrong not in str(err.value) and wrong not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__

    with pytest.raises(ConsulPublishError) as err2:
        await asyncio.to_thread(publish_primary_sync, server.http_addr, SERVICE, "127.0.4.10", 5432, wrong, 5.0)
    assert "ACL not found" in str(err2.value) and wrong not in str(err2.value)
    assert repr(ConsulPublisher(server.http_addr, token=wrong)).count(wrong) == 0


async def test_timeout_on_an_unanswering_agent() -> None:
    # a listening socket that never answers: the call must give up after `timeout`
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with ConsulPublisher(f"http://127.0.0.1:{port}", token=TOKEN, timeout=0.5) as pub:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConsulPublishError, match="timed out"):
                await pub.published(SERVICE)
            assert loop.time() - started < 3
    finally:
        silent.close()
